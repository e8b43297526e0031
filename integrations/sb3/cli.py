"""``slim`` commands for Stable-Baselines3 (entry-point group ``slim_plugins.frameworks``, ``sb3``)::

    slim train configs/sb3/breakout_us_ppo.yaml [--set n_timesteps=200000] [--output logs/us_ppo/run]
    slim eval logs/us_ppo/run/BreakoutNoFrameskip-v4.zip [--widths 0.25 0.5 1.0]
    slim profile logs/us_ppo/run/BreakoutNoFrameskip-v4.zip
    slim export logs/us_ppo/run/BreakoutNoFrameskip-v4.zip --width 0.5 [--onnx]

The YAML is rl-zoo's format: one top-level key, the environment id, holding ``policy``, ``n_envs``, ``n_timesteps``,
``frame_stack``, ``env_wrapper``, the PPO arguments (``lin_2.5e-4`` = a linear schedule, as rl-zoo reads it) and
``policy_kwargs`` with the ``slimmable`` entry; plus optional ``eval_freq`` / ``n_eval_episodes``. Output follows
rl-zoo: ``<output>/<env>.zip``, ``<output>/config.yml`` (the hyperparameters used, in the same format: what
``slim eval`` rebuilds the environment from), TensorBoard logs, ``spectrum.csv`` (reward per width) and
``evaluations.csv``.
"""
from __future__ import annotations

import os
from typing import Any

from slim_plugins.errors import ConfigError

from slim_plugins.config import parse_overrides
from slim_plugins.spectrum import print_table
CONFIG_SUFFIXES = (".yml", ".yaml")
_ZOO_ONLY = ("n_timesteps", "n_envs", "frame_stack", "env_wrapper", "normalize", "policy", "eval_freq",
             "n_eval_episodes", "vec_env_wrapper", "callback", "env_kwargs")
_ZOO_UNSUPPORTED = ("normalize", "vec_env_wrapper", "callback")  # rl-zoo keys slim train does not build (yet)


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


def is_atari(env_id: str, hp: dict) -> bool:
    """An ALE environment (rl-zoo: an ``env_wrapper`` entry, or a ``NoFrameskip`` id)."""
    return bool(hp.get("env_wrapper")) or "NoFrameskip" in env_id


def make_env(env_id: str, hp: dict, n_envs: int, seed: int):
    """SB3's vectorised envs as rl-zoo builds them: ``make_atari_env`` (AtariWrapper) + ``VecFrameStack`` for
    Atari ids, ``make_vec_env`` otherwise; ``env_kwargs`` go to ``gym.make``.

    Raises:
        ConfigError: an rl-zoo key this command does not build (``normalize``, ``vec_env_wrapper``, ``callback``,
            an ``env_wrapper`` other than SB3's AtariWrapper).
    """
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    unsupported = [k for k in _ZOO_UNSUPPORTED if hp.get(k)]
    wrapper = hp.get("env_wrapper")
    if wrapper and wrapper != "stable_baselines3.common.atari_wrappers.AtariWrapper":
        unsupported.append(f"env_wrapper={wrapper!r}")
    if unsupported:
        raise ConfigError(f"slim train does not build the rl-zoo setting(s) {unsupported} yet; supported: "
                          "env_wrapper AtariWrapper, frame_stack, env_kwargs, n_envs and PPO's own arguments")
    env_kwargs = dict(hp.get("env_kwargs") or {})
    if is_atari(env_id, hp):
        import ale_py  # noqa: F401  registers the ALE environments with gymnasium

        env = make_atari_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    else:
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    if hp.get("frame_stack"):
        env = VecFrameStack(env, n_stack=int(hp["frame_stack"]))
    return env


def cmd_train(args, cfg: dict) -> int:
    """``slim train ZOO.yaml [--resume CKPT]``: see :func:`slim_plugins.integrations.sb3.train.train` (the config
    checked whole before anything is written, checkpoints every ``save_freq`` steps, exact resume)."""
    from .train import train

    return train(args, cfg)


def claims_checkpoint(path: str) -> bool:
    """An SB3 model zip saved by ``SlimmablePPO`` (its ``data`` entry holds ``slim_config``)."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return "slim_config" in json.loads(z.read("data"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return False


def _loaded(args):
    """``(model, env_id, hp)``: the ``SlimmablePPO`` of the zip and the ``config.yml`` written next to it by
    ``slim train`` (``--config`` to give another)."""
    from slim_plugins.config import load_yaml_config

    from .ppo import SlimmablePPO

    path = getattr(args, "config", None) or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                                         "config.yml")
    if not os.path.isfile(path):
        raise ConfigError(f"no rl-zoo config next to {args.checkpoint!r} (expected {path}); give it with --config")
    cfg = load_yaml_config(path)
    if not claims_config(path, cfg):
        raise ConfigError(f"{path!r} is not an rl-zoo hyperparameter file (one env id -> policy, n_timesteps, ...)")
    (env_id, hp), = cfg.items()
    model = SlimmablePPO.load(args.checkpoint, device=getattr(args, "device", None) or "cpu")
    return model, env_id, dict(hp)


def _columns(extra=()):
    return [("width", "width", "{:g}"), ("mflops", "MFLOPs/obs", "{:.2f}"), ("params_m", "params (M)", "{:.3f}"),
            *extra]


def cmd_eval(args) -> int:
    """``slim eval MODEL.zip``: SB3's ``evaluate_policy`` at each width (``--widths`` / ``--step``, default the
    model's ``eval_widths``) on the config's environment, ``n_eval_episodes`` games (default 10; stochastic
    actions on Atari); rich table, spectrum CSV (``--csv``, default ``eval_spectrum.csv`` next to the zip, beside
    the training's ``spectrum.csv``) and plot (``--plot``)."""
    from slim_plugins.spectrum import plot_spectrum, print_table, write_spectrum_csv

    from slim_plugins.config import requested_widths
    from .callbacks import evaluate_widths

    model, env_id, hp = _loaded(args)
    widths = requested_widths(args, model.slim_settings)
    env = make_env(env_id, hp, 1, int(hp.get("seed", 0)) + 1000)
    n = int(hp.get("n_eval_episodes", 10))
    deterministic = not is_atari(env_id, hp)
    rows = evaluate_widths(model, env, widths, n, deterministic=deterministic)
    print_table(rows, title=f"{env_id}: mean episode reward per width ({n} episodes, "
                f"{'deterministic' if deterministic else 'stochastic'} actions)",
                columns=_columns([("mean_reward", "reward", "{:.1f}"), ("std_reward", "± std", "{:.1f}")]))
    out = args.csv or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval_spectrum.csv")
    write_spectrum_csv(rows, out)
    if args.plot:
        plot_spectrum([out], args.plot)
    return 0


def cmd_profile(args) -> int:
    """``slim profile MODEL.zip``: MFLOPs (multiply-adds), params and latency of the actor-critic per width for a
    batch of ``--batch-size`` observations; ``--csv`` writes the table (the format ``slim serve --table`` reads)."""
    import torch

    import slim_plugins as slim
    from slim_plugins.spectrum import print_table

    from slim_plugins.config import requested_widths
    from .ppo import ActorCriticGraph

    model, _, _ = _loaded(args)
    net = ActorCriticGraph(model.policy)
    x = torch.zeros(args.batch_size, *model.policy.observation_space.shape, device=model.device)
    table = slim.profile(net, x, widths=requested_widths(args, model.slim_settings), latency=not args.no_latency,
                         repeats=args.repeats)
    rows = [{"width": r.width, "mflops": r.mflops, "params_m": r.params_m, "latency_ms": r.latency_ms}
            for r in table]
    print_table(rows, title=f"{args.checkpoint}: batch {args.batch_size} of {tuple(x.shape[1:])} observations",
                columns=_columns([("latency_ms", "ms", "{:.2f}")]))
    if args.csv:
        table.to_csv(args.csv)
    return 0


def cmd_export(args) -> int:
    """``slim export MODEL.zip --width W``: the plain fixed-width actor-critic (``obs -> (action logits, value)``,
    SB3's image scaling included; for a Gaussian policy the first output is the action mean, ``log_std`` is not
    in the graph) saved whole with ``torch.save`` (default ``exported/width_<w>.pth`` next to the zip); ``--onnx``
    also writes its ONNX graph (outputs ``logits``, ``value``; dynamic batch). Written atomically."""
    import torch

    import slim_plugins as slim
    from slim_plugins.checkpoint import atomic_write

    from .ppo import ActorCriticGraph

    if args.fuse_bn:
        raise ConfigError("--fuse-bn is not implemented for SB3 policies")
    model, _, _ = _loaded(args)
    w = model.slim_settings.spec.validate(args.width)
    net = ActorCriticGraph(model.policy).cpu()
    x = torch.as_tensor(model.policy.observation_space.sample()[None]).float()
    plain = slim.export(net, w, example_input=x)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "exported",
                                   f"width_{w:g}.pth")
    atomic_write(out, lambda f: torch.save(plain, f))
    msg = f"wrote {out}"
    if args.onnx:
        msg += " and " + slim.export_onnx(plain, x, os.path.splitext(out)[0] + ".onnx",
                                          output_names=("logits", "value"))
    print(msg)
    return 0
