"""``slim train`` for rl-zoo-style hyperparameter YAMLs (entry-point group ``slim_plugins.frameworks``, ``sb3``)::

    slim train configs/sb3/breakout_us_ppo.yaml [--set n_timesteps=200000] [--output logs/us_ppo/run]

The YAML is rl-zoo's format: one top-level key, the environment id, holding ``policy``, ``n_envs``, ``n_timesteps``,
``frame_stack``, ``env_wrapper``, the PPO arguments (``lin_2.5e-4`` = a linear schedule, as rl-zoo reads it) and
``policy_kwargs`` with the ``slimmable`` entry; plus optional ``eval_freq`` / ``n_eval_episodes``. Output follows
rl-zoo: ``<output>/<env>.zip``, TensorBoard logs, ``spectrum.csv`` (reward per width) and ``evaluations.csv``.
"""
from __future__ import annotations

import os
from typing import Any

from slim_plugins.cli import ConfigError, parse_overrides, print_table

CONFIG_SUFFIXES = (".yml", ".yaml")
_ZOO_ONLY = ("n_timesteps", "n_envs", "frame_stack", "env_wrapper", "normalize", "policy", "eval_freq",
             "n_eval_episodes", "vec_env_wrapper", "callback", "env_kwargs")


def claims_config(path: str, cfg) -> bool:
    """An rl-zoo hyperparameter file: one top-level environment id mapping to ``policy`` + ``n_timesteps``."""
    return (isinstance(cfg, dict) and len(cfg) == 1
            and all(isinstance(v, dict) and "policy" in v and "n_timesteps" in v for v in cfg.values()))


def _schedule(value):
    """rl-zoo's ``lin_<x>``: linear from x to 0 over training (SB3's ``progress_remaining``)."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


def _resolve_policy_kwargs(pk):
    """rl-zoo writes ``policy_kwargs`` as a Python string; here it is a mapping whose ``features_extractor_class``
    may be a dotted import path (``slim_plugins.integrations.sb3.USNetsAtariCNN``)."""
    import importlib

    pk = dict(pk or {})
    cls = pk.get("features_extractor_class")
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        try:
            pk["features_extractor_class"] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"policy_kwargs.features_extractor_class: cannot import {cls!r} ({e})") from None
    return pk


def ppo_kwargs(hp: dict) -> dict:
    """The PPO constructor arguments of an rl-zoo entry: everything but rl-zoo's own keys, ``lin_`` schedules
    made callables, ``policy_kwargs`` resolved."""
    kwargs: dict[str, Any] = {k: _schedule(v) for k, v in hp.items() if k not in _ZOO_ONLY}
    if "policy_kwargs" in kwargs:
        kwargs["policy_kwargs"] = _resolve_policy_kwargs(kwargs["policy_kwargs"])
    return kwargs


def make_env(env_id: str, hp: dict, n_envs: int, seed: int):
    """SB3's vectorised envs as rl-zoo builds them: ``make_atari_env`` (AtariWrapper) + ``VecFrameStack`` for
    Atari ids, ``make_vec_env`` otherwise."""
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    wrapper = str(hp.get("env_wrapper", ""))
    if "AtariWrapper" in wrapper or "NoFrameskip" in env_id:
        import ale_py  # noqa: F401  registers the ALE environments with gymnasium

        env = make_atari_env(env_id, n_envs=n_envs, seed=seed)
    else:
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if hp.get("frame_stack"):
        env = VecFrameStack(env, n_stack=int(hp["frame_stack"]))
    return env


def cmd_train(args, cfg: dict) -> int:
    """``slim train ZOO.yaml``: ``SlimmablePPO`` with the file's hyperparameters; evaluates every width at the end
    (and every ``eval_freq`` steps) with SB3's ``evaluate_policy``."""
    from slim_plugins.cli import write_spectrum_csv

    from .callbacks import WidthEvalCallback, evaluate_widths
    from .ppo import SlimmablePPO

    if args.default or args.epochs or args.onnx or args.data_dir:
        raise ConfigError("--default/--epochs/--onnx/--data-dir do not apply to an RL config; use "
                          "--set n_timesteps=N")
    (env_id, hp), = cfg.items()
    hp = dict(hp)
    hp.update(parse_overrides(args.set))
    seed = args.seed if args.seed is not None else int(hp.pop("seed", 0))
    out = args.output or os.path.join("logs", "us_ppo", f"{env_id}_1")
    n_envs = int(hp.get("n_envs", 1))
    env = make_env(env_id, hp, n_envs, seed)
    eval_env = make_env(env_id, hp, 1, seed + 1000)
    kwargs = ppo_kwargs(hp)
    if args.lr is not None:
        kwargs["learning_rate"] = args.lr
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    device = args.device or "auto"
    model = SlimmablePPO(hp["policy"], env, seed=seed, tensorboard_log=out, device=device, verbose=1, **kwargs)
    n_eval = int(hp.get("n_eval_episodes", 5))
    cb = WidthEvalCallback(eval_env, eval_freq=max(1, int(hp.get("eval_freq", 25_000)) // n_envs),
                           n_eval_episodes=n_eval, log_path=out, verbose=1)
    model.learn(int(float(hp["n_timesteps"])), callback=cb)
    model.save(os.path.join(out, env_id))
    rows = evaluate_widths(model, eval_env, model.slim_settings.eval_widths, n_eval)
    write_spectrum_csv(rows, os.path.join(out, "spectrum.csv"))
    print_table(rows, title=f"{env_id}: mean episode reward per width ({n_eval} episodes)",
                columns=[("width", "width", "{:g}"), ("mflops", "MFLOPs/obs", "{:.2f}"),
                         ("params_m", "params (M)", "{:.3f}"), ("mean_reward", "reward", "{:.1f}"),
                         ("std_reward", "± std", "{:.1f}")])
    return 0
