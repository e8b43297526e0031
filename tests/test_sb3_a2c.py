"""Stable-Baselines3 adapter: SlimmableA2C on real gymnasium / ALE environments (the SlimmablePPO mechanism on
SB3's A2C)."""
from __future__ import annotations

import csv
import json
import os
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

import slim_plugins as slim  # noqa: E402
from stable_baselines3 import A2C, DQN  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from slim_plugins.errors import InvalidArgumentError  # noqa: E402
from slim_plugins.integrations.sb3 import SlimmableA2C, SlimmablePPO, USNetsAtariCNN  # noqa: E402
from sb3_utils import assert_same_actions  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::slim_plugins.convert.SlimWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A2C_YAML = os.path.join(REPO, "configs", "sb3", "a2c_cartpole.yml")
BREAKOUT_A2C_YAML = os.path.join(REPO, "configs", "sb3", "breakout_us_a2c.yaml")


def _cartpole(seed=1, n_envs=8, **slim_kw):
    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)
    slim_kw = slim_kw or dict(width_range=[0.25, 1.0])
    return SlimmableA2C("MlpPolicy", env, ent_coef=0.0, seed=seed, verbose=0, policy_kwargs=dict(slimmable=slim_kw))


def test_cartpole_learns_at_min_and_max_width_and_reloads(tmp_path):
    """rl-zoo's A2C CartPole settings, 50k steps (~15 s on one thread): the narrowest and widest widths play far
    above a random policy (~22); the zip reloads with SlimmableA2C.load to the same actions at every width."""
    model = _cartpole()
    model.learn(50_000)
    ev = make_vec_env("CartPole-v1", n_envs=1, seed=1001)
    for w in (0.25, 1.0):
        with slim.width(w):
            mean, _ = evaluate_policy(model, ev, n_eval_episodes=10, deterministic=True)
        assert mean > 150, (w, mean)
    assert model.width_iteration == model._n_updates == 50_000 // 40  # one width schedule step per A2C update
    assert model.logger.name_to_value["train/distill_kl"] > 0
    model.save(tmp_path / "a2c.zip")
    with zipfile.ZipFile(tmp_path / "a2c.zip") as z:  # plain JSON in SB3's zip
        assert json.loads(z.read("data"))["slim_config"]["width_range"] == [0.25, 1.0]
    loaded = SlimmableA2C.load(tmp_path / "a2c.zip")
    assert loaded.slim_settings == model.slim_settings and loaded.width_iteration == model.width_iteration
    assert isinstance(loaded.policy.optimizer, torch.optim.RMSprop)
    probs = assert_same_actions(model, loaded, np.random.RandomState(0).randn(64, 4).astype(np.float32))
    assert not torch.allclose(probs[0], probs[-1])  # the widths are different networks
    with pytest.raises(InvalidArgumentError, match="saved by SlimmableA2C; load it with SlimmableA2C.load"):
        SlimmablePPO.load(tmp_path / "a2c.zip")  # another algorithm's zip is refused, not loaded as PPO


def test_one_switch_at_full_width_is_sb3_a2c():
    """A single switch 1.0 (one width, no distillation): SlimmableA2C.train is SB3's A2C.train (same roll-outs,
    losses, RMSprop steps -> the same weights and logs)."""
    plain = A2C("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), seed=0, verbose=0)
    plain.learn(400)  # each model seeds the global RNGs when built: build and train one after the other
    ours = SlimmableA2C("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), seed=0, verbose=0,
                        policy_kwargs=dict(slimmable=dict(widths=[1.0])))
    ours.learn(400)
    a, b = plain.policy.state_dict(), ours.policy.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    for key in ("train/policy_loss", "train/value_loss", "train/entropy_loss", "train/explained_variance"):
        assert ours.logger.name_to_value[key] == pytest.approx(plain.logger.name_to_value[key], rel=1e-6), key


def test_four_widths_and_distillation_change_the_update():
    """The sandwich widths and their KL term reach the weights: distill_weight 0 trains as no distillation, the
    default weight differs, and a single width differs from both."""
    def trained(**kw):
        model = _cartpole(seed=0, n_envs=4, width_range=[0.25, 1.0], **kw)
        model.learn(400)
        return torch.cat([p.detach().flatten() for p in model.policy.parameters()])

    none, zero, one = trained(distill=None), trained(distill="kl", distill_weight=0.0), trained(distill="kl")
    assert torch.equal(none, zero) and not torch.allclose(none, one)
    assert not torch.allclose(none, trained(distill=None, num_widths=2))


def test_rollouts_run_the_widest_policy_whatever_width_is_set():
    from sb3_utils import RolloutWidthCheck

    model, cb = _cartpole(seed=0, n_envs=4), RolloutWidthCheck()
    with slim.width(0.25):  # a width set around learn() does not reach the roll-outs
        model.learn(200, callback=cb)
    assert cb.max_diff is not None and cb.max_diff < 1e-5


def test_bad_slimmable_keys_are_refused_with_the_typed_error(tmp_path):
    env = make_vec_env("CartPole-v1", n_envs=1)
    for cls in (SlimmableA2C, SlimmablePPO):
        with pytest.raises(InvalidArgumentError, match=r"unknown slimmable key.*temperature"):
            cls("MlpPolicy", env, policy_kwargs=dict(slimmable=dict(width_range=[0.25, 1.0], temperature=2)))
        with pytest.raises(InvalidArgumentError, match="distill must be one of"):
            cls("MlpPolicy", env, policy_kwargs=dict(slimmable=dict(width_range=[0.25, 1.0], distill="l1")))
    with pytest.raises(InvalidArgumentError, match="use_sde"):
        SlimmableA2C("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1), use_sde=True)
    # SB3's algorithms without a slimmable version refuse the key themselves (SB3's TypeError, not ours)
    with pytest.raises(TypeError, match="slimmable"):
        A2C("MlpPolicy", env, policy_kwargs=dict(slimmable=True))
    with pytest.raises(TypeError, match="slimmable"):
        DQN("MlpPolicy", env, policy_kwargs=dict(slimmable=True))
    A2C("MlpPolicy", env, verbose=0).save(tmp_path / "plain.zip")
    with pytest.raises(InvalidArgumentError, match="not saved by SlimmableA2C.*stable_baselines3.A2C"):
        SlimmableA2C.load(tmp_path / "plain.zip")


# ---- slim train with algo: a2c ------------------------------------------------------------------------------------
def _sets(*pairs):
    return [a for s in pairs for a in ("--set", s)]


def test_slim_train_a2c_config_eval_and_resume(tmp_path):
    """The rl-zoo-style A2C config through slim train on a tiny budget: SlimmableA2C zip, per-width spectrum,
    checkpoints; slim eval reads it back; resumed from the middle checkpoint it ends with the uninterrupted
    run's weights."""
    from slim_plugins.cli import main
    from slim_plugins.integrations.sb3.train import read_resume_state

    tiny = _sets("n_timesteps=1600", "n_envs=4", "eval_freq=800", "save_freq=400", "n_eval_episodes=2")
    out = tmp_path / "full"
    assert main(["train", A2C_YAML, "--output", str(out), *tiny]) == 0
    model = SlimmableA2C.load(out / "CartPole-v1.zip")
    assert model.num_timesteps == 1600 and model.width_iteration == 1600 // 20
    assert model.slim_settings.distill == "kl" and model.slim_settings.spec.min == 0.25
    with open(out / "spectrum.csv") as f:
        assert [float(r["width"]) for r in csv.DictReader(f)] == [0.25, 0.5, 0.75, 1.0]
    assert any(n.startswith("A2C_") for n in os.listdir(out))  # TensorBoard run, as SB3 names it
    ckpts = sorted(os.listdir(out / "checkpoints"), key=lambda n: int(n.split("_")[2]))
    assert ckpts == [f"rl_model_{n}_steps.zip" for n in (400, 800, 1200)]
    assert read_resume_state(str(out / "checkpoints" / ckpts[1]))["config"]["algo"] == "a2c"
    assert main(["eval", str(out / "CartPole-v1.zip"), "--widths", "0.25", "1.0", "--csv",
                 str(tmp_path / "ev.csv")]) == 0
    with open(tmp_path / "ev.csv") as f:
        assert [float(r["width"]) for r in csv.DictReader(f)] == [0.25, 1.0]

    resumed = tmp_path / "resumed"
    assert main(["train", "--resume", str(out / "checkpoints" / "rl_model_800_steps.zip"),
                 "--output", str(resumed)]) == 0
    b = SlimmableA2C.load(resumed / "CartPole-v1.zip")
    sa, sb = model.policy.state_dict(), b.policy.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (model.num_timesteps, model._n_updates, model.width_iteration) == \
        (b.num_timesteps, b._n_updates, b.width_iteration)
    assert (out / "evaluations.csv").read_text() == (resumed / "evaluations.csv").read_text()
    # the checkpoint trains A2C: resuming it as PPO (the config's algo changed) is refused
    ppo_yaml = tmp_path / "ppo.yml"
    ppo_yaml.write_text(open(A2C_YAML).read().replace("algo: a2c", "algo: ppo"))
    assert main(["train", str(ppo_yaml), "--resume", str(out / "checkpoints" / "rl_model_800_steps.zip"),
                 "--output", str(tmp_path / "bad"), *tiny]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, message", [
    (_sets("batch_size=64"), "unknown key(s) ['batch_size']"),  # PPO's minibatches: A2C uses the whole roll-out
    (["--batch-size", "64"], "unknown key(s) ['batch_size']"),
    (_sets("n_epochs=4"), "unknown key(s) ['n_epochs']"),
    (_sets("clip_range=0.2"), "unknown key(s) ['clip_range']"),
    (_sets("target_kl=0.01"), "unknown key(s) ['target_kl']"),
    (_sets("n_step=5"), "A2C takes ["),
    (_sets("algo=dqn"), "algo='dqn' is not allowed: algo must be one of ['ppo', 'a2c']"),
    (_sets("policy_kwargs={slimmable: {width_range: [0.25, 1.0], temperature: 2}}"), "unknown slimmable key"),
    (_sets("policy_kwargs={net_arc: [8]}"), "unknown policy_kwargs key(s) ['net_arc']"),
    (_sets("policy_kwargs={optimizer_class: torch.optim.NoSuchOpt}"), "cannot import 'torch.optim.NoSuchOpt'"),
])
def test_bad_a2c_config_is_refused_before_any_file(tmp_path, monkeypatch, capsys, argv, message):
    from slim_plugins.cli import main

    monkeypatch.chdir(tmp_path)  # the default output, logs/us_a2c/..., would land here
    assert main(["train", A2C_YAML, *argv]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err, err
    assert os.listdir(tmp_path) == []


def test_slim_train_breakout_a2c_config(tmp_path):
    """The Atari A2C config (rl-zoo's RMSpropTFLike optimizer given as an import path, the paper's CNN) builds and
    trains on a tiny budget."""
    from slim_plugins.cli import main
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    out = tmp_path / "run"
    assert main(["train", BREAKOUT_A2C_YAML, "--output", str(out),
                 *_sets("n_timesteps=160", "n_envs=2", "eval_freq=160", "n_eval_episodes=1",
                        "policy_kwargs={optimizer_class: stable_baselines3.common.sb2_compat.rmsprop_tf_like."
                        "RMSpropTFLike, optimizer_kwargs: {eps: 1.0e-5}, features_extractor_class: "
                        "slim_plugins.integrations.sb3.USNetsAtariCNN, net_arch: [], slimmable: "
                        "{width_range: [0.25, 1.0], eval_widths: [0.25, 1.0]}}")]) == 0
    model = SlimmableA2C.load(out / "BreakoutNoFrameskip-v4.zip")
    assert isinstance(model.policy.optimizer, RMSpropTFLike) and model.policy.optimizer.defaults["eps"] == 1e-5
    assert isinstance(model.policy.features_extractor, USNetsAtariCNN) and model.num_timesteps == 160
    with open(out / "spectrum.csv") as f:
        assert [float(r["width"]) for r in csv.DictReader(f)] == [0.25, 1.0]
