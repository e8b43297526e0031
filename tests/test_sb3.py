"""Stable-Baselines3 adapter: SlimmablePPO on real gymnasium / ALE environments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

import slim_plugins as slim  # noqa: E402
from stable_baselines3.common.env_util import make_atari_env, make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.vec_env import VecFrameStack  # noqa: E402
from slim_plugins.errors import InvalidArgumentError  # noqa: E402
from slim_plugins.integrations.sb3 import SlimmablePPO, parse_slimmable  # noqa: E402


def _cartpole(seed=0, **slim_kw):
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    return SlimmablePPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                        ent_coef=0.0, learning_rate=1e-3, clip_range=0.2, seed=seed, verbose=0,
                        policy_kwargs=dict(slimmable=dict(width_range=[0.25, 1.0], **slim_kw)))


def test_cartpole_learns_at_every_width(tmp_path):
    model = _cartpole()
    model.learn(30_000)
    ev = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    for w in (0.25, 0.5, 0.75, 1.0):
        with slim.width(w):
            mean, _ = evaluate_policy(model, ev, n_eval_episodes=10, deterministic=True)
        assert mean > 150, (w, mean)  # random play: ~22
    model.save(tmp_path / "ppo.zip")
    loaded = SlimmablePPO.load(tmp_path / "ppo.zip")
    assert loaded.slim_settings == model.slim_settings
    obs = np.random.RandomState(0).randn(32, 4).astype(np.float32)
    for w in (0.25, 0.6, 1.0):
        with slim.width(w):
            a, _ = model.predict(obs, deterministic=True)
            b, _ = loaded.predict(obs, deterministic=True)
        assert (a == b).all()


def test_breakout_runs_and_heads_keep_their_sizes():
    import ale_py  # noqa: F401  registers the Atari envs
    env = VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=2, seed=0), n_stack=4)
    model = SlimmablePPO("CnnPolicy", env, n_steps=64, n_epochs=1, batch_size=64, seed=0, verbose=0,
                         policy_kwargs=dict(slimmable=dict(width_range=[0.25, 1.0])))
    model.learn(256)
    x = torch.zeros(3, 4, 84, 84)
    for w in (0.25, 0.5, 1.0):
        with slim.width(w), torch.no_grad():
            logits = model.policy.get_distribution(x).distribution.logits
            v = model.policy.predict_values(x)
        assert logits.shape == (3, 4) and v.shape == (3, 1)
    assert model.width_iteration > 0


def test_distillation_does_not_reach_the_widest_target():
    model = _cartpole(distill="kl")
    model.learn(256)
    res = model.width_step.last
    assert res.results[0].distilled is False and all(r.distilled for r in res.results[1:])
    assert all("distill" in r.parts for r in res.results[1:])


def test_parse_errors():
    with pytest.raises(InvalidArgumentError, match="distill must be one of"):
        parse_slimmable({"width_range": [0.25, 1.0], "distill": "l1"})
    with pytest.raises(InvalidArgumentError, match="unknown slimmable key"):
        parse_slimmable({"width_range": [0.25, 1.0], "temperature": 2})
