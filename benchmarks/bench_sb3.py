"""SlimmablePPO vs plain SB3 PPO on Breakout: roll-out and update cost, same process, interleaved.

The paper's actor-critic (``USNetsAtariCNN``: 32-64-32 convs + 512 FC), rl-zoo's PPO Atari settings (8 envs x 128
steps, 4 epochs, batch 256), ``BreakoutNoFrameskip-v4`` through SB3's AtariWrapper + 4-frame stack:

  roll-out: SB3's ``collect_rollouts`` (1,024 env steps) of SlimmablePPO (policy at its default, the widest
      width) / the same of plain PPO with the 1.0x CNN                                      target <= 1.05x
  update:   ``SlimmablePPO.train`` on one roll-out, switches 0.25/0.5/0.75/1.0 every minibatch with KL
      distillation / the sum of plain ``PPO.train`` of the four individual CNNs (``width_mult`` = w) on a
      roll-out of the same size                                                             target <= 1.05x
  env steps/s of one whole iteration (roll-out + update) of each, for the record.

    python benchmarks/bench_sb3.py [--threads 1 --clock thread] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import now, setup, table  # noqa: E402

WIDTHS = [1.0, 0.75, 0.5, 0.25]
PPO_KW = dict(n_steps=128, n_epochs=4, batch_size=256, learning_rate=2.5e-4, clip_range=0.1, vf_coef=0.5,
              ent_coef=0.01, verbose=0, device="cpu")


def _env(seed):
    import ale_py  # noqa: F401  registers the Atari envs
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    return VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=8, seed=seed), n_stack=4)


class Runner:
    """One model with SB3's learn() set-up done, so roll-outs and updates can be timed separately."""

    def __init__(self, model):
        self.model = model
        _, self.callback = model._setup_learn(10**9, callback=None)
        self.callback.on_training_start(locals(), globals())

    def rollout(self) -> float:
        t = now()
        self.model.collect_rollouts(self.model.env, self.callback, self.model.rollout_buffer, self.model.n_steps)
        return now() - t

    def update(self) -> float:
        t = now()
        self.model.train()
        return now() - t


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "thread"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    setup(args)

    from stable_baselines3 import PPO

    from slim_plugins.integrations.sb3 import SlimmablePPO, USNetsAtariCNN

    pk = dict(features_extractor_class=USNetsAtariCNN, net_arch=[])  # the paper's net: heads on the shared FC
    slim = Runner(SlimmablePPO("CnnPolicy", _env(0), seed=0, **PPO_KW, policy_kwargs=dict(
        pk, slimmable=dict(widths=WIDTHS, distill="kl", num_widths=4))))
    plain = {w: Runner(PPO("CnnPolicy", _env(0), seed=0, **PPO_KW, policy_kwargs=dict(
        pk, features_extractor_kwargs=dict(width_mult=w)))) for w in WIDTHS}
    for r in [slim, *plain.values()]:  # warm-up: one roll-out and one update each
        r.rollout()
        r.update()
    times = {"slim_rollout": [], "plain_rollout": [], "slim_update": [], "plain_update_sum": [],
             **{f"plain_update_{w:g}": [] for w in WIDTHS}}
    for i in range(args.rounds):
        order = [slim, plain[1.0]] if i % 2 == 0 else [plain[1.0], slim]
        for r in order:
            times["slim_rollout" if r is slim else "plain_rollout"].append(r.rollout())
        for w in WIDTHS[1:]:
            plain[w].rollout()  # not timed: fills the buffer its update reads
        ups = {}
        for key in (["slim", *WIDTHS] if i % 2 == 0 else [*WIDTHS, "slim"]):
            ups[key] = slim.update() if key == "slim" else plain[key].update()
        times["slim_update"].append(ups["slim"])
        for w in WIDTHS:
            times[f"plain_update_{w:g}"].append(ups[w])
        times["plain_update_sum"].append(sum(ups[w] for w in WIDTHS))
        print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    def ratio(a, b):
        return med([x / y for x, y in zip(times[a], times[b])])

    steps = 8 * PPO_KW["n_steps"]
    cols = ["phase", "plain s", "slimmable s", "ratio", "min ratio", "target", "verdict"]
    rows = []
    for phase, a, b in (("roll-out (1,024 env steps)", "slim_rollout", "plain_rollout"),
                        ("update (4 widths vs sum of 4 plain)", "slim_update", "plain_update_sum")):
        r = ratio(a, b)
        rows.append(dict(zip(cols, [phase, med(times[b]), med(times[a]), r, min(times[a]) / min(times[b]), 1.05,
                                    "met" if r <= 1.05 else "missed"])))
    print(table(rows, cols))
    print("plain updates per width (s): " + ", ".join(f"{w:g}: {med(times[f'plain_update_{w:g}']):.2f}"
                                                     for w in WIDTHS))
    it_plain = med(times["plain_rollout"]) + med(times["plain_update_1"])
    it_slim = med(times["slim_rollout"]) + med(times["slim_update"])
    print(f"env steps/s of one iteration: plain PPO (1.0x) {steps / it_plain:.0f}, SlimmablePPO (4 widths) "
          f"{steps / it_slim:.0f} ({it_slim / it_plain:.2f}x the time)")


if __name__ == "__main__":
    main()
