"""US-PPO (with policy distillation) vs four individually trained PPO agents on Breakout (US-Nets Section 5.1,
Fig. 5, scaled to the machine at hand).

Every run uses `configs/sb3/breakout_us_ppo.yaml` (rl-zoo's PPO Atari hyperparameters: 8 envs, 128 steps, 4 epochs,
batch 256, linear lr 2.5e-4 and clip 0.1, ent 0.01; SB3's AtariWrapper + 4-frame stack), the same number of
environment steps and the same seed, and the paper's CNN (32-64-32 convs + 512 FC):
  - ``us_ppo``: ``SlimmablePPO`` over widths 0.25-1.0 (sandwich rule, 4 widths per minibatch, KL distillation);
  - ``ppo_w<w>``: SB3's plain ``PPO`` with ``USNetsAtariCNN(width_mult=w)`` (the channel counts of the US net at w).
Every ``--eval-every`` steps each run is evaluated with SB3's ``evaluate_policy`` (stochastic actions, as rl-zoo
evaluates Atari; whole games, all lives) at 0.25 / 0.5 / 0.75 / 1.0 (US) or at its own width.

    # one process per lane (2 cores: one thread each), then the report
    .venv/bin/python experiments/rl/compare.py --runs us_ppo --steps 200000 --tag cpu_200k &
    .venv/bin/python experiments/rl/compare.py --runs ppo_w0.25 ppo_w0.5 ppo_w0.75 ppo_w1 --steps 200000 \
        --tag cpu_200k
    .venv/bin/python experiments/rl/compare.py --report --tag cpu_200k

Writes ``results/rl/<tag>/<run>.csv`` (timesteps, width, mflops, params_m, mean/std reward, train_s) and, with
``--report`` (which re-evaluates each saved final model on ``--report-episodes`` games per width, and random
actions as the chance level), ``results/rl/<tag>.csv`` (final table), ``docs/results/rl/<tag>.png`` (reward curves
per width) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "sb3", "breakout_us_ppo.yaml")
WIDTHS = [0.25, 0.5, 0.75, 1.0]
RUNS = ["us_ppo"] + [f"ppo_w{w:g}" for w in WIDTHS]


def _config():
    with open(CONFIG) as f:
        (env_id, hp), = yaml.safe_load(f).items()
    return env_id, dict(hp)


def train_run(name: str, args) -> list[dict]:
    """Train one run, evaluating every ``args.eval_every`` steps; returns the evaluation rows."""
    from stable_baselines3 import PPO

    from slim_plugins.integrations.sb3 import SlimmablePPO, USNetsAtariCNN, WidthEvalCallback
    from slim_plugins.integrations.sb3.cli import make_env, ppo_kwargs

    env_id, hp = _config()
    n_envs = int(hp["n_envs"])
    env = make_env(env_id, hp, n_envs, args.seed)
    eval_env = make_env(env_id, hp, 1, args.seed + 1000)
    kwargs = ppo_kwargs(hp)
    log_dir = os.path.join(args.work_dir, args.tag, name)
    if name == "us_ppo":
        model = SlimmablePPO(hp["policy"], env, seed=args.seed, device="cpu", tensorboard_log=log_dir, **kwargs)
        widths = WIDTHS
    else:
        w = float(name[len("ppo_w"):])
        pk = {k: v for k, v in kwargs.pop("policy_kwargs").items() if k != "slimmable"}
        pk.update(features_extractor_class=USNetsAtariCNN, features_extractor_kwargs={"width_mult": w})
        model = PPO(hp["policy"], env, seed=args.seed, device="cpu", tensorboard_log=log_dir, policy_kwargs=pk,
                    **kwargs)
        widths = [w]
    cb = WidthEvalCallback(eval_env, widths=widths, eval_freq=args.eval_every // n_envs,
                           n_eval_episodes=args.eval_episodes, deterministic=False, log_path=log_dir, verbose=1)
    t0 = time.time()
    model.learn(args.steps, callback=cb)
    train_s = time.time() - t0
    cb.history = [r for r in cb.history if r["timesteps"] < model.num_timesteps]  # replaced by the final one
    cb.n_eval_episodes = args.final_episodes
    cb.evaluate()
    model.save(os.path.join(log_dir, env_id))
    rows = [dict(r, run=name, train_s=train_s) for r in cb.history]
    out = os.path.join(REPO, "results", "rl", args.tag, f"{name}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cols = ["run", "timesteps", "width", "mflops", "params_m", "mean_reward", "std_reward", "train_s"]
    with open(out + ".tmp", "w", newline="") as f:
        wr = csv.DictWriter(f, cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    os.replace(out + ".tmp", out)
    print(f"{name}: {args.steps} steps in {train_s:.0f} s -> {out}")
    return rows


def random_reward(args) -> tuple[float, float]:
    """Mean / std game reward of uniformly random actions on the evaluation env (the chance level)."""
    import numpy as np

    from slim_plugins.integrations.sb3.cli import make_env

    env_id, hp = _config()
    env = make_env(env_id, hp, 1, args.seed + 2000)
    env.reset()
    rewards = []
    while len(rewards) < args.report_episodes:
        _, _, _, infos = env.step(np.array([env.action_space.sample()]))
        rewards += [i["episode"]["r"] for i in infos if "episode" in i]
    return float(np.mean(rewards)), float(np.std(rewards))


def final_rewards(args) -> dict:
    """``{(run, width): (mean, std)}``: each run's saved final model re-evaluated on ``--report-episodes`` games
    per width (stochastic actions, the evaluation env's seed), a tighter estimate than the runs' own final
    evaluation."""
    from stable_baselines3 import PPO

    from slim_plugins.integrations.sb3 import SlimmablePPO, evaluate_widths, parse_slimmable
    from slim_plugins.integrations.sb3.cli import claims_checkpoint, make_env

    env_id, hp = _config()
    out = {}
    for name in RUNS:
        path = os.path.join(args.work_dir, args.tag, name, f"{env_id}.zip")
        if name == "us_ppo":
            # the cpu_200k US model was saved before SlimmablePPO stored its settings as `slim_config`: give
            # them (the YAML's) to load(), which sets keyword arguments on the model before building it
            extra = {} if claims_checkpoint(path) else {
                "slim_config": parse_slimmable(hp["policy_kwargs"]["slimmable"]).to_dict()}
            model = SlimmablePPO.load(path, device="cpu", **extra)
        else:
            model = PPO.load(path, device="cpu")
        widths = WIDTHS if name == "us_ppo" else [float(name[len("ppo_w"):])]
        env = make_env(env_id, hp, 1, args.seed + 2000)
        for r in evaluate_widths(model, env, widths, args.report_episodes, deterministic=False):
            out[(name, r["width"])] = (r["mean_reward"], r["std_reward"])
            print(f"{name} at {r['width']:g}: {r['mean_reward']:.2f} +/- {r['std_reward']:.2f}", flush=True)
    return out


def report(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name in RUNS:
        path = os.path.join(REPO, "results", "rl", args.tag, f"{name}.csv")
        with open(path) as f:
            rows += list(csv.DictReader(f))
    final_t = max(int(float(r["timesteps"])) for r in rows)
    chance, chance_std = random_reward(args)
    final = final_rewards(args)
    table = []
    for w in WIDTHS:
        u = [r for r in rows if r["run"] == "us_ppo" and float(r["width"]) == w][-1]
        i = [r for r in rows if r["run"] == f"ppo_w{w:g}"][-1]
        (us, us_std), (ind, ind_std) = final[("us_ppo", w)], final[(f"ppo_w{w:g}", w)]
        table.append({"width": w, "mflops": float(u["mflops"]), "params_m": float(i["params_m"]),
                      "us_reward": us, "us_std": us_std, "ind_reward": ind, "ind_std": ind_std,
                      "us_train_s": float(u["train_s"]), "ind_train_s": float(i["train_s"])})
    out = os.path.join(REPO, "results", "rl", f"{args.tag}.csv")
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, list(table[0]) + ["random_reward", "random_std", "games"])
        wr.writeheader()
        wr.writerows([dict(t, random_reward=chance, random_std=chance_std, games=args.report_episodes)
                      for t in table])
    fig, axes = plt.subplots(1, len(WIDTHS), figsize=(4 * len(WIDTHS), 3.2), sharey=True)
    for ax, w in zip(axes, WIDTHS):
        for run, label in (("us_ppo", "US-PPO (one model)"), (f"ppo_w{w:g}", "individual PPO")):
            # the periodic evaluations (5 games each); the run's own final one is replaced by the re-evaluation
            pts = [(int(float(r["timesteps"])), float(r["mean_reward"])) for r in rows
                   if r["run"] == run and float(r["width"]) == w and int(float(r["timesteps"])) < final_t]
            line, = ax.plot([p[0] / 1e3 for p in pts], [p[1] for p in pts], marker="o", label=label)
            mean, std = final[(run, w)]
            ax.errorbar([final_t / 1e3], [mean], yerr=[std / args.report_episodes ** 0.5], marker="*", ms=12,
                        color=line.get_color(), capsize=3)
        ax.axhline(chance, color="grey", linestyle=":", label="random actions")
        ax.set_title(f"width {w:g}x")
        ax.set_xlabel("environment steps (k)")
    axes[0].set_ylabel("mean game reward")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Breakout, {final_t // 1000}k steps per run, seed {args.seed}: mean game reward of 5 games per "
                 f"evaluation; star = final model, {args.report_episodes} games, ± standard error")
    fig.tight_layout()
    png = os.path.join(REPO, "docs", "results", "rl", f"{args.tag}.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)
    print("| width | MFLOPs/obs | US-PPO reward | individual PPO reward |\n|---|---|---|---|")
    for t in table:
        print(f"| {t['width']:g} | {t['mflops']:.2f} | {t['us_reward']:.1f} ± {t['us_std']:.1f} | "
              f"{t['ind_reward']:.1f} ± {t['ind_std']:.1f} |")
    print(f"random actions: {chance:.1f} ± {chance_std:.1f}; US-PPO trained in {table[0]['us_train_s']:.0f} s; "
          f"individual: " + ", ".join(f"{t['ind_train_s']:.0f} s" for t in table))
    print(f"-> {out}, {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    ap.add_argument("--steps", type=int, default=200_000, help="environment steps per run")
    ap.add_argument("--eval-every", type=int, default=40_000, help="environment steps between evaluations")
    ap.add_argument("--eval-episodes", type=int, default=5, help="games per width at each evaluation")
    ap.add_argument("--final-episodes", type=int, default=10, help="games per width at the final evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--tag", default="cpu_200k")
    ap.add_argument("--work-dir", default=os.path.join(REPO, "logs", "rl"))
    ap.add_argument("--report", action="store_true", help="only merge the runs' CSVs into the table and plot")
    ap.add_argument("--report-episodes", type=int, default=30,
                    help="games per width when --report re-evaluates the final models (and random actions)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        report(args)
        return
    for name in args.runs:
        train_run(name, args)


if __name__ == "__main__":
    main()
