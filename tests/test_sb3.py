"""Stable-Baselines3 adapter: SlimmablePPO on real gymnasium / ALE environments."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

import slim_plugins as slim  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_util import make_atari_env, make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.vec_env import VecFrameStack  # noqa: E402
from slim_plugins.errors import InvalidArgumentError, WidthError  # noqa: E402
from slim_plugins.integrations.sb3 import (SlimmablePPO, USNetsAtariCNN, WidthEvalCallback,  # noqa: E402
                                           parse_slimmable)

# the actor-critic must trace (both heads found as output layers), never fall back to the prefix rule
pytestmark = pytest.mark.filterwarnings("error::slim_plugins.convert.SlimWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _cartpole_kwargs(seed=0):
    return dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=1e-3,
                clip_range=0.2, seed=seed, verbose=0)


def _cartpole(seed=0, ppo_kw=None, **slim_kw):
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    return SlimmablePPO("MlpPolicy", env, policy_kwargs=dict(slimmable=dict(width_range=[0.25, 1.0], **slim_kw)),
                        **_cartpole_kwargs(seed), **(ppo_kw or {}))


def _breakout(n_envs=2, seed=0):
    import ale_py  # noqa: F401  registers the Atari envs

    return VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=n_envs, seed=seed), n_stack=4)


def test_cartpole_learns_at_every_width(tmp_path):
    model = _cartpole()
    model.learn(30_000)
    ev = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    for w in WIDTHS:
        with slim.width(w):
            mean, _ = evaluate_policy(model, ev, n_eval_episodes=10, deterministic=True)
        assert mean > 150, (w, mean)  # random play: ~22
    model.save(tmp_path / "ppo.zip")
    import json
    import zipfile

    with zipfile.ZipFile(tmp_path / "ppo.zip") as z:  # plain JSON in the zip, not a pickled object
        assert json.loads(z.read("data"))["slim_config"]["width_range"] == [0.25, 1.0]
    loaded = SlimmablePPO.load(tmp_path / "ppo.zip")
    assert loaded.slim_settings == model.slim_settings
    assert loaded.width_iteration == model.width_iteration > 0
    from sb3_utils import assert_same_actions

    assert_same_actions(model, loaded, np.random.RandomState(0).randn(32, 4).astype(np.float32))


def test_one_switch_at_full_width_is_sb3_ppo():
    """With a single switch 1.0 (one width, no distillation) SlimmablePPO.train is SB3's PPO.train: same
    roll-outs, same losses, same optimizer steps -> the same weights."""
    kw = dict(_cartpole_kwargs(), n_epochs=3, batch_size=64)
    plain = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), **kw)
    plain.learn(512)  # each model seeds the global RNGs when built: build and train one after the other
    ours = SlimmablePPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0),
                        policy_kwargs=dict(slimmable=dict(widths=[1.0])), **kw)
    ours.learn(512)
    a, b = plain.policy.state_dict(), ours.policy.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert ours.logger.name_to_value["train/loss"] == pytest.approx(plain.logger.name_to_value["train/loss"],
                                                                     rel=1e-5)


def test_distillation_gradient_stops_at_the_widest_policy():
    """The narrower widths' KL term reaches the weights only through the student: the gradients equal those of
    KL(teacher || student) with the widest width's logits computed under no_grad, and differ from a teacher left
    in the graph."""
    model = _cartpole(distill="kl")
    obs = torch.as_tensor(np.random.RandomState(0).randn(64, 4).astype(np.float32))
    params = list(model.policy.parameters())

    def grads():
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        model.policy.zero_grad()
        return g

    model.policy.zero_grad()
    widths = []
    for p in model.width_step.iterate(0):
        with p:
            dist = model._evaluate(obs, torch.zeros(64, dtype=torch.long))[3]
            loss = p.loss({"distribution": dist}, dist.logits.sum() * 0)
            widths.append(p.width)
            loss.backward()
    ours = grads()
    assert widths[0] == 1.0 and len(widths) == 4

    def manual(detach: bool):
        for w in widths[1:]:
            with slim.width(1.0):
                t = model.policy.get_distribution(obs).distribution
            if detach:
                t = torch.distributions.Categorical(logits=t.logits.detach())
            with slim.width(w):
                s = model.policy.get_distribution(obs).distribution
            torch.distributions.kl_divergence(t, s).mean().backward()
        return grads()

    for a, b in zip(ours, manual(detach=True)):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, manual(detach=False)))


def test_rollouts_run_the_widest_policy_whatever_width_is_set():
    from sb3_utils import RolloutWidthCheck

    model, cb = _cartpole(), RolloutWidthCheck()
    with slim.width(0.25):  # a width set around learn() does not reach the roll-outs
        model.learn(256, callback=cb)
    assert cb.max_diff < 1e-5


def test_distill_weight_reaches_the_update():
    """distill_weight 0 trains exactly as no distillation; weight 1 changes the update."""
    def trained(**kw):
        model = _cartpole(**kw)
        model.learn(256)
        return torch.cat([p.detach().flatten() for p in model.policy.parameters()])

    none, zero, one = trained(distill=None), trained(distill="kl", distill_weight=0.0), trained(distill="kl")
    assert torch.equal(none, zero) and not torch.allclose(none, one)


def test_continuous_actions_kl_sums_over_action_dims(tmp_path):
    """A Gaussian policy (Box actions, state-independent log_std): the KL term is summed over action dims as SB3
    sums log-probs; log_std keeps its size; save/load of switches."""
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = SlimmablePPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0, verbose=0,
                         policy_kwargs=dict(slimmable=dict(widths=[0.5, 1.0], distill="kl")))
    model.learn(128)
    assert model.logger.name_to_value["train/distill_kl"] > 0 and model.policy.log_std.shape == (1,)
    t = torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    s = torch.distributions.Normal(torch.ones(5, 3), torch.ones(5, 3))
    assert slim.train.policy_kl(s, t).item() == pytest.approx(1.5)  # 3 dims x (1 - 0)^2 / 2
    model.save(tmp_path / "p.zip")
    loaded = SlimmablePPO.load(tmp_path / "p.zip")
    assert loaded.slim_settings == model.slim_settings and loaded.slim_settings.spec.is_switches
    with pytest.raises(InvalidArgumentError, match="use_sde"):
        SlimmablePPO("MlpPolicy", env, use_sde=True, policy_kwargs=dict(slimmable=True))


def test_rollouts_run_the_widest_policy_and_target_kl_stops_on_it():
    model = _cartpole(ppo_kw=dict(target_kl=1e-9))
    obs = np.random.RandomState(1).randn(16, 4).astype(np.float32)
    with torch.no_grad():
        default = model.policy.get_distribution(torch.as_tensor(obs)).distribution.probs
        with slim.width(1.0):
            widest = model.policy.get_distribution(torch.as_tensor(obs)).distribution.probs
        with slim.width(0.25):
            narrow = model.policy.get_distribution(torch.as_tensor(obs)).distribution.probs
    assert torch.equal(default, widest) and not torch.allclose(default, narrow)  # collect_rollouts: the widest
    model.learn(256)
    # SB3's early stop on the widest width's approximate KL: 0 in epoch 1 (one minibatch, policy not yet moved),
    # past 1.5 x target_kl at epoch 2's first minibatch -> 2 of the 20 epochs counted, as SB3 counts them
    assert model._n_updates == 2 and model.logger.name_to_value["train/approx_kl"] > 1.5e-9


def test_breakout_runs_at_every_width_and_heads_keep_their_sizes(tmp_path):
    env = _breakout(n_envs=4)
    model = SlimmablePPO("CnnPolicy", env, n_steps=128, n_epochs=1, batch_size=128, seed=0, verbose=0,
                         policy_kwargs=dict(features_extractor_class=USNetsAtariCNN, net_arch=[],
                                            slimmable=dict(width_range=[0.25, 1.0])))
    cb = WidthEvalCallback(_breakout(n_envs=1, seed=5), widths=WIDTHS, eval_freq=128, n_eval_episodes=1,
                           deterministic=False, log_path=str(tmp_path), verbose=0)
    model.learn(2048, callback=cb)
    assert model.num_timesteps == 2048 and model.width_iteration == 4 * 4  # 4 updates x 4 minibatches
    x = torch.zeros(3, 4, 84, 84)
    channels = []
    for w in WIDTHS:
        with slim.width(w), torch.no_grad():
            logits = model.policy.get_distribution(x).distribution.logits
            v = model.policy.predict_values(x)
            channels.append(model.policy.features_extractor.linear(
                model.policy.features_extractor.cnn(x)).shape[1])
        assert logits.shape == (3, 4) and v.shape == (3, 1)
    assert channels == [128, 256, 384, 512]
    with open(tmp_path / "spectrum.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["width"]) for r in rows] == list(WIDTHS)
    mflops = [float(r["mflops"]) for r in rows]
    assert mflops == sorted(mflops) and 7.6 < mflops[-1] < 7.7  # the paper's CNN: ~7.6 M multiply-adds
    assert float(rows[-1]["params_m"]) == pytest.approx(0.8654, abs=1e-4)  # 862,848 + heads 512 x (4 + 1) + 5
    with open(tmp_path / "evaluations.csv") as f:
        # eval_freq counts callback calls (one per vectorised step of 4 envs), as in SB3: every 512 env steps
        assert [float(r["timesteps"]) for r in csv.DictReader(f)] == [t for t in (512, 1024, 1536, 2048) for _ in WIDTHS]


def test_individual_baseline_cnn_has_the_slice_channels():
    """USNetsAtariCNN(width_mult=w) (the individually trained baselines) has the US net's channels at w."""
    env = _breakout(n_envs=1)
    us = SlimmablePPO("CnnPolicy", env, policy_kwargs=dict(features_extractor_class=USNetsAtariCNN), verbose=0)
    for w in WIDTHS:
        plain = PPO("CnnPolicy", env, verbose=0, policy_kwargs=dict(
            features_extractor_class=USNetsAtariCNN, features_extractor_kwargs=dict(width_mult=w)))
        exported = slim.export(us.policy.features_extractor, w, example_input=torch.zeros(1, 4, 84, 84))
        assert [tuple(p.shape) for p in plain.policy.features_extractor.parameters()] == \
            [tuple(p.shape) for p in exported.parameters()]


def test_slim_train_on_the_zoo_yaml(tmp_path):
    from slim_plugins.cli import main

    out = tmp_path / "run"
    sets = ["n_timesteps=512", "n_envs=2", "n_steps=64", "batch_size=64", "n_epochs=1", "eval_freq=256",
            "n_eval_episodes=1"]
    rc = main(["train", os.path.join(REPO, "configs", "sb3", "breakout_us_ppo.yaml"), "--output", str(out),
               *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    model = SlimmablePPO.load(out / "BreakoutNoFrameskip-v4.zip")
    assert model.slim_settings.distill == "kl" and model.slim_settings.spec.min == 0.25
    assert isinstance(model.policy.features_extractor, USNetsAtariCNN)
    with open(out / "spectrum.csv") as f:
        assert [float(r["width"]) for r in csv.DictReader(f)] == list(WIDTHS)
    assert any(n.startswith("PPO_") for n in os.listdir(out))  # TensorBoard run, as SB3 names it
    zip_path = str(out / "BreakoutNoFrameskip-v4.zip")

    assert main(["eval", zip_path, "--widths", "0.25", "0.6", "--csv", str(tmp_path / "ev.csv")]) == 0
    with open(tmp_path / "ev.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["width"]) for r in rows] == [0.25, 0.6] and float(rows[0]["mflops"]) < float(rows[1]["mflops"])
    assert main(["profile", zip_path, "--no-latency", "--csv", str(tmp_path / "prof.csv")]) == 0
    # every verb for every adapter: `slim serve` on a policy; `slim calibrate` refused with the reason
    assert main(["serve", zip_path, "--budget-ms", "1e9", "--calls", "4", "--no-live", "--widths", "0.25", "1.0",
                 "--csv", str(tmp_path / "calls.csv"), "--plot", str(tmp_path / "serve.png")]) == 0
    calls = (tmp_path / "calls.csv").read_text().splitlines()
    assert len(calls) == 5 and all(c.split(",")[1] == "1" for c in calls[1:])  # any budget: the widest width
    assert main(["calibrate", zip_path]) == 2
    assert main(["eval", zip_path, "--widths", "0.1"]) == 2  # outside the range: a typed error, exit status 2
    yaml_path = os.path.join(REPO, "configs", "sb3", "breakout_us_ppo.yaml")
    assert main(["train", yaml_path, "--output", str(tmp_path / "bad"), "--set", "n_step=64"]) == 2  # a typo
    assert main(["train", yaml_path, "--output", str(tmp_path / "bad"), "--set", "normalize=true"]) == 2
    assert not (tmp_path / "bad").exists()  # refused before anything is written

    assert main(["export", zip_path, "--width", "0.5", "--onnx"]) == 0
    import onnxruntime as ort

    plain = torch.load(out / "exported" / "width_0.5.pth", weights_only=False)
    obs = np.stack([_breakout(n_envs=1, seed=s).reset()[0] for s in range(3)]).astype(np.float32)  # (3, 84, 84, 4)
    obs = obs.transpose(0, 3, 1, 2)  # VecTransposeImage: channels first, as the policy sees them
    with slim.width(0.5), torch.no_grad():
        dist = model.policy.get_distribution(torch.as_tensor(obs)).distribution
        value = model.policy.predict_values(torch.as_tensor(obs))
        logits, v = plain(torch.as_tensor(obs))
    assert torch.allclose(logits.log_softmax(-1), dist.logits, atol=1e-5) and torch.allclose(v, value, atol=1e-5)
    sess = ort.InferenceSession(str(out / "exported" / "width_0.5.onnx"))
    o_logits, o_value = sess.run(None, {"input": obs})
    assert o_logits.shape == (3, 4) and np.allclose(o_logits, logits.numpy(), atol=1e-4)
    assert np.allclose(o_value, v.numpy(), atol=1e-4)


def test_a_plain_ppo_zip_is_refused(tmp_path):
    PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), verbose=0).save(tmp_path / "plain.zip")
    with pytest.raises(InvalidArgumentError, match="not saved by SlimmablePPO"):
        SlimmablePPO.load(tmp_path / "plain.zip")


def test_parse_errors():
    with pytest.raises(InvalidArgumentError, match="distill must be one of"):
        parse_slimmable({"width_range": [0.25, 1.0], "distill": "l1"})
    with pytest.raises(InvalidArgumentError, match="unknown slimmable key"):
        parse_slimmable({"width_range": [0.25, 1.0], "temperature": 2})
    with pytest.raises(InvalidArgumentError, match="distill_weight"):
        parse_slimmable({"width_range": [0.25, 1.0], "distill_weight": -1})
    with pytest.raises(WidthError):
        parse_slimmable({"width_range": [1.0, 0.25]})
    with pytest.raises(InvalidArgumentError, match="share_features_extractor"):
        SlimmablePPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1),
                     policy_kwargs=dict(share_features_extractor=False))


# ---- slim train: periodic checkpoints, exact --resume, the config checked before anything is written ----------
CARTPOLE_YAML = """\
CartPole-v1:
  policy: MlpPolicy
  n_envs: 2
  n_steps: 32
  batch_size: 32
  n_epochs: 2
  n_timesteps: 512
  learning_rate: lin_1e-3
  clip_range: lin_0.2
  eval_freq: 128
  n_eval_episodes: 2
  save_freq: 128
  policy_kwargs:
    net_arch: [32, 32]
    slimmable:
      width_range: [0.25, 1.0]
      eval_widths: [0.25, 1.0]
"""

BREAKOUT_YAML = """\
BreakoutNoFrameskip-v4:
  env_wrapper: stable_baselines3.common.atari_wrappers.AtariWrapper
  frame_stack: 4
  policy: CnnPolicy
  n_envs: 2
  n_steps: 32
  n_epochs: 1
  batch_size: 64
  n_timesteps: 384
  learning_rate: lin_2.5e-4
  clip_range: lin_0.1
  ent_coef: 0.01
  eval_freq: 128
  n_eval_episodes: 1
  save_freq: 128
  policy_kwargs:
    features_extractor_class: slim_plugins.integrations.sb3.USNetsAtariCNN
    net_arch: []
    slimmable:
      width_range: [0.25, 1.0]
      eval_widths: [0.25, 1.0]
"""


def _yaml(folder, text, name="zoo.yaml"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _assert_same_policy(a_zip, b_zip):
    a, b = SlimmablePPO.load(a_zip), SlimmablePPO.load(b_zip)
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (a.num_timesteps, a._n_updates, a.width_iteration) == (b.num_timesteps, b._n_updates, b.width_iteration)


def _tree(folder):
    """Every file under ``folder`` with its size and mtime (to show a refused command changed nothing)."""
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """An uninterrupted CartPole run with checkpoints every 128 steps (2 envs x 32 steps per roll-out)."""
    from slim_plugins.cli import main

    root = tmp_path_factory.mktemp("cartpole")
    yaml_path = _yaml(root / "cfg", CARTPOLE_YAML)
    assert main(["train", yaml_path, "--output", str(root / "full")]) == 0
    return yaml_path, root / "full"


def test_killed_run_resumes_to_the_uninterrupted_weights(cartpole_run, tmp_path):
    """A run killed mid-roll-out after its 384-step checkpoint, resumed from the 256-step one in its own folder,
    ends with the uninterrupted run's weights (torch.equal), counters and evaluations.csv rows."""
    from slim_plugins.cli import main
    from slim_plugins.integrations.sb3.callbacks import WidthEvalCallback as CB

    yaml_path, full = cartpole_run
    assert sorted(os.listdir(full / "checkpoints")) == [f"rl_model_{n}_steps.zip" for n in (128, 256, 384)]
    run = tmp_path / "run"
    on_step = CB._on_step

    def killed(self):
        if self.num_timesteps >= 416:
            raise KeyboardInterrupt  # as a kill: no final save, nothing cleaned up
        return on_step(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CB, "_on_step", killed)
        assert main(["train", yaml_path, "--output", str(run)]) == 130
    assert not (run / "CartPole-v1.zip").exists() and sorted(os.listdir(run / "checkpoints")) == \
        sorted(os.listdir(full / "checkpoints"))  # atomic writes: no temporary file left behind
    ckpt = run / "checkpoints" / "rl_model_256_steps.zip"
    loaded = SlimmablePPO.load(ckpt)  # SB3's own load reads a checkpoint (it skips the resume entry)
    assert loaded.num_timesteps == 256 and loaded.width_iteration > 0
    assert main(["train", yaml_path, "--resume", str(ckpt)]) == 0  # no --output: the checkpoint's run folder
    _assert_same_policy(full / "CartPole-v1.zip", run / "CartPole-v1.zip")
    _assert_same_policy(full / "checkpoints" / "rl_model_384_steps.zip", run / "checkpoints" / "rl_model_384_steps.zip")
    assert (full / "evaluations.csv").read_text() == (run / "evaluations.csv").read_text()


def test_breakout_resume_restores_the_emulators(tmp_path):
    """Atari: the ALE emulators (and their RNG), the frame stacks, the stochastic evaluation's env and the eval
    counter come back: resumed at 128 of 384 steps (evaluations at 128, 256 and 384) into another --output, the
    final weights and every evaluation equal the uninterrupted run's."""
    from slim_plugins.cli import main

    yaml_path = _yaml(tmp_path / "cfg", BREAKOUT_YAML)
    assert main(["train", yaml_path, "--output", str(tmp_path / "full")]) == 0
    ckpt = tmp_path / "full" / "checkpoints" / "rl_model_128_steps.zip"
    # no YAML: the framework and the config come from the checkpoint
    assert main(["train", "--resume", str(ckpt), "--output", str(tmp_path / "resumed")]) == 0
    _assert_same_policy(tmp_path / "full" / "BreakoutNoFrameskip-v4.zip",
                        tmp_path / "resumed" / "BreakoutNoFrameskip-v4.zip")
    full_rows = (tmp_path / "full" / "evaluations.csv").read_text()
    assert full_rows == (tmp_path / "resumed" / "evaluations.csv").read_text()
    assert [float(r["timesteps"]) for r in csv.DictReader(full_rows.splitlines())] == [128] * 2 + [256] * 2 + [384] * 4


def test_resume_refuses_other_files_and_other_configs(cartpole_run, tmp_path, capsys):
    """Not a periodic SlimmablePPO checkpoint, or a config that differs from the checkpoint's: exit status 2
    naming the problem, before any file is written (the run folder unchanged, no --output folder)."""
    from slim_plugins.cli import main

    yaml_path, full = cartpole_run
    ckpt = str(full / "checkpoints" / "rl_model_256_steps.zip")
    before = _tree(full)
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), verbose=0).save(tmp_path / "plain.zip")
    acrobot = _yaml(tmp_path / "cfg", CARTPOLE_YAML.replace("CartPole-v1", "Acrobot-v1"))
    out = tmp_path / "out"
    cases = [
        ([yaml_path, "--resume", str(text)], "not a Stable-Baselines3 checkpoint"),
        ([yaml_path, "--resume", str(tmp_path / "plain.zip")], "not a SlimmablePPO checkpoint"),
        ([yaml_path, "--resume", str(full / "CartPole-v1.zip")], "without resume state"),
        ([yaml_path, "--resume", str(tmp_path / "missing.zip")], "FileNotFoundError"),
        ([acrobot, "--resume", ckpt], "trains 'CartPole-v1'"),
        ([yaml_path, "--resume", ckpt, "--set", "n_steps=16"], "n_steps: checkpoint 32, now 16"),
        ([yaml_path, "--resume", ckpt, "--seed", "3"], "seed: checkpoint 0, now 3"),
        ([yaml_path, "--resume", ckpt, "--set", "policy_kwargs={net_arch: [32, 32], slimmable: {widths: [0.5, 1.0]}}"],
         "policy_kwargs: checkpoint"),
        ([yaml_path, "--resume", ckpt, "--set", "n_timesteps=256"], "n_timesteps=256 is not allowed"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["train", *argv, "--output", str(out)]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists(), argv
    assert main(["train", yaml_path, "--resume", ckpt, "--set", "n_steps=16"]) == 2  # default output: the run folder
    assert _tree(full) == before


@pytest.mark.parametrize("override, message", [
    ("n_timesteps=abc", "n_timesteps='abc' is not allowed"),
    ("n_timesteps=0", "n_timesteps=0 is not allowed"),
    ("n_timesteps=-5", "n_timesteps=-5 is not allowed"),
    ("n_envs=0", "n_envs=0 is not allowed"),
    ("n_envs=-2", "n_envs=-2 is not allowed"),
    ("n_step=64", "unknown key(s) ['n_step']"),
    ("policy_kwargs={net_arch: [32], net_arc: [8]}", "unknown policy_kwargs key(s) ['net_arc']"),
    ("policy_kwargs={slimmable: {width_range: [0.25, 1.0], eval_widths: []}}", "eval_widths=[] is not allowed"),
    ("policy_kwargs={slimmable: {width_range: [0.25, 1.0], temperature: 2}}", "unknown slimmable key"),
    ("eval_widths=[]", "eval_widths=[] is not allowed"),
    ("save_freq=-1", "save_freq=-1 is not allowed"),
    ("n_eval_episodes=0", "n_eval_episodes=0 is not allowed"),
    ("eval_freq=0", "eval_freq=0 is not allowed"),
    ("eval_freq=-100", "eval_freq=-100 is not allowed"),
    ("policy=LstmPolicy", "policy='LstmPolicy' is not allowed"),
])
def test_bad_train_config_is_refused_before_any_file(tmp_path, monkeypatch, capsys, override, message):
    from slim_plugins.cli import main

    monkeypatch.chdir(tmp_path)  # the default output, logs/us_ppo/..., would land here
    yaml_path = _yaml(tmp_path / "cfg", CARTPOLE_YAML)
    assert main(["train", yaml_path, "--set", override]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["cfg"] and os.listdir(tmp_path / "cfg") == ["zoo.yaml"]


class _RowCol:
    """FrozenLake's state as ``MultiDiscrete([4, 4])`` (row, column) or as a ``Dict``."""

    @staticmethod
    def wrap(kind):
        import gymnasium as gym
        from gymnasium import spaces

        class W(gym.ObservationWrapper):
            def __init__(self, env):
                super().__init__(env)
                self.observation_space = (spaces.MultiDiscrete([4, 4]) if kind == "multidiscrete" else
                                          spaces.Dict({"state": env.observation_space}))

            def observation(self, s):
                return np.array([s // 4, s % 4]) if kind == "multidiscrete" else {"state": s}

        return W(gym.make("FrozenLake-v1"))


@pytest.mark.parametrize("kind", ["discrete", "multidiscrete"])
def test_discrete_observations_one_hot_and_export(kind):
    """Discrete / MultiDiscrete observations (SB3 one-hot encodes them; its ``preprocess_obs`` does not trace):
    the policy at each width gives the logits and value of its export (the analysis sees SB3's preprocessing).
    They were refused with a misleading ``ChannelGroupError``."""
    from slim_plugins.integrations.sb3 import ActorCriticGraph

    import gymnasium as gym
    env = gym.make("FrozenLake-v1") if kind == "discrete" else _RowCol.wrap(kind)
    model = SlimmablePPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0,
                         policy_kwargs=dict(slimmable=True))
    model.learn(64)
    obs = np.stack([env.observation_space.sample() for _ in range(8)])
    t, _ = model.policy.obs_to_tensor(obs)
    for w in (1.0, 0.5, 0.25):
        with torch.no_grad(), slim.width(w):
            logits = model.policy.get_distribution(t).distribution.logits
            value = model.policy.predict_values(t)
        plain = slim.export(ActorCriticGraph(model.policy), w, example_input=torch.as_tensor(obs))
        with torch.no_grad():
            el, ev = plain(torch.as_tensor(obs))
        assert el.shape == (8, 4) and ev.shape == (8, 1)
        assert (torch.log_softmax(el, -1) - logits).abs().max() <= 1e-5 and (ev - value).abs().max() <= 1e-5


def test_dict_observations_are_refused():
    with pytest.raises(InvalidArgumentError, match="Dict"):
        SlimmablePPO("MultiInputPolicy", _RowCol.wrap("dict"), n_steps=64, policy_kwargs=dict(slimmable=True))
