"""``slim`` commands for Stable-Baselines3 (entry-point group ``slim_plugins.frameworks``, ``sb3``)::

    slim train configs/sb3/breakout_us_ppo.yaml [--set n_timesteps=200000] [--output logs/us_ppo/run]
    slim train configs/sb3/a2c_cartpole.yml          # algo: a2c -> SlimmableA2C
    slim eval logs/us_ppo/run/BreakoutNoFrameskip-v4.zip [--widths 0.25 0.5 1.0]
    slim profile logs/us_ppo/run/BreakoutNoFrameskip-v4.zip
    slim export logs/us_ppo/run/BreakoutNoFrameskip-v4.zip --width 0.5 [--onnx]

The YAML is rl-zoo's format: one top-level key, the environment id, holding ``policy``, ``n_envs``, ``n_timesteps``,
``frame_stack``, ``env_wrapper``, the algorithm's arguments (``lin_2.5e-4`` = a linear schedule, as rl-zoo reads
it) and ``policy_kwargs`` with the ``slimmable`` entry; plus optional ``eval_freq`` / ``n_eval_episodes`` and
``algo`` (``ppo``, the default: ``SlimmablePPO``; ``a2c``: ``SlimmableA2C``; rl-zoo takes it as ``--algo``).
Output follows rl-zoo: ``<output>/<env>.zip``, ``<output>/config.yml`` (the hyperparameters used, in the same
format: what ``slim eval`` rebuilds the environment from), TensorBoard logs, ``spectrum.csv`` (reward per width) and
``evaluations.csv``.
"""
from __future__ import annotations

import os
from typing import Any

from slim_plugins.adapter import OpenedCheckpoint
from slim_plugins.errors import ConfigError

CONFIG_SUFFIXES = (".yml", ".yaml")
_ZOO_ONLY = ("n_timesteps", "n_envs", "frame_stack", "env_wrapper", "normalize", "policy", "eval_freq",
             "n_eval_episodes", "vec_env_wrapper", "callback", "env_kwargs")
_ZOO_UNSUPPORTED = ("normalize", "vec_env_wrapper", "callback")  # rl-zoo keys slim train does not build (yet)
ALGOS = ("ppo", "a2c")  # the `algo` key: the algorithms with a slimmable version


def algo_classes(env_id: str, hp: dict):
    """``(slimmable class, SB3 class)`` of the entry's ``algo`` (default ``ppo``).

    Raises:
        ConfigError: an ``algo`` without a slimmable version here.
    """
    import stable_baselines3

    from .a2c import SlimmableA2C
    from .ppo import SlimmablePPO

    algo = hp.get("algo", "ppo")
    if algo not in ALGOS:
        raise ConfigError(f"{env_id}: algo={algo!r} is not allowed: algo must be one of {list(ALGOS)} (the SB3 "
                          "algorithms with a slimmable version: SlimmablePPO, SlimmableA2C)")
    return {"ppo": (SlimmablePPO, stable_baselines3.PPO), "a2c": (SlimmableA2C, stable_baselines3.A2C)}[algo]


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
    and ``optimizer_class`` may be dotted import paths (``slim_plugins.integrations.sb3.USNetsAtariCNN``)."""
    import importlib

    pk = dict(pk or {})
    for key in ("features_extractor_class", "optimizer_class"):  # e.g. SB3's RMSpropTFLike for rl-zoo's Atari A2C
        cls = pk.get(key)
        if isinstance(cls, str):
            module, _, name = cls.rpartition(".")
            try:
                pk[key] = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise ConfigError(f"policy_kwargs.{key}: cannot import {cls!r} ({e})") from None
    return pk


def ppo_kwargs(hp: dict) -> dict:
    """The algorithm's constructor arguments of an rl-zoo entry: everything but rl-zoo's own keys, ``lin_`` schedules
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
                          "env_wrapper AtariWrapper, frame_stack, env_kwargs, n_envs and the algorithm's own "
                          "arguments")
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
    """An SB3 model zip saved by ``SlimmablePPO`` / ``SlimmableA2C`` (its ``data`` entry holds ``slim_config``)."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return "slim_config" in json.loads(z.read("data"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return False


def _loaded(args):
    """``(model, env_id, hp)``: the ``SlimmablePPO`` / ``SlimmableA2C`` (the config's ``algo``) of the zip and
    the ``config.yml`` written next to it by ``slim train`` (``--config`` to give another)."""
    from slim_plugins.config import load_yaml_config

    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.basename(folder) == "checkpoints" and not os.path.isfile(os.path.join(folder, "config.yml")):
        folder = os.path.dirname(folder)  # a periodic checkpoint: <run>/checkpoints/rl_model_<n>_steps.zip
    path = getattr(args, "config", None) or os.path.join(folder, "config.yml")
    if not os.path.isfile(path):
        raise ConfigError(f"no rl-zoo config next to {args.checkpoint!r} (expected {path}); give it with --config")
    cfg = load_yaml_config(path)
    if not claims_config(path, cfg):
        raise ConfigError(f"{path!r} is not an rl-zoo hyperparameter file (one env id -> policy, n_timesteps, ...)")
    (env_id, hp), = cfg.items()
    model = algo_classes(env_id, hp)[0].load(args.checkpoint, device=getattr(args, "device", None) or "cpu")
    return model, env_id, dict(hp)


def _columns(extra=()):
    return [("width", "width", "{:g}"), ("mflops", "MFLOPs/obs", "{:.2f}"), ("params_m", "params (M)", "{:.3f}"),
            *extra]


#: The options each verb reads (the adapter protocol, :mod:`slim_plugins.adapter`); the core refuses the others.
HONOURS = {
    "train": {"config", "resume", "output", "batch_size", "lr", "seed", "device", "set"},
    "eval": {"device", "config"},
    "calibrate": set(),
    "export": {"onnx", "device", "config"},
    "profile": {"batch_size", "device", "config"},
    "serve": {"batch_size", "device", "config"},
}
REFUSALS = {"default": "--default runs the embedded timm job", "epochs": "RL counts steps: --set n_timesteps=N",
            "data_dir": "the environment is the data", "workers": "the environments are SB3's vectorised envs",
            "onnx": "export a width with `slim export --onnx`", "fuse_bn": "not implemented for SB3 policies",
            "input_size": "the observation shape is the environment's", "calib_samples": "no BN post-statistics",
            "no_calibrate": "no BN post-statistics", "val_num_samples": "the config's n_eval_episodes decides",
            "batch_size": "SB3's evaluate_policy steps one environment"}
NOT_APPLICABLE = {"calibrate": "S-Net policies keep private BN statistics per switch and US policies have no BN "
                  "(refused at training), so there are no post-statistics to compute"}


class PolicyCheckpoint(OpenedCheckpoint):
    """A ``SlimmablePPO`` / ``SlimmableA2C`` zip: its actor-critic as one module (:class:`ActorCriticGraph`,
    ``obs -> (logits, value)``) and the ``config.yml`` written next to it (the environment to evaluate on)."""

    framework = "sb3"
    metric_columns = (("mean_reward", "reward", "{:.1f}"), ("std_reward", "± std", "{:.1f}"))
    cost_columns = (("width", "width", "{:g}"), ("mflops", "MFLOPs/obs", "{:.2f}"), ("params_m", "params (M)", "{:.3f}"))

    def __init__(self, args):
        from .ppo import ActorCriticGraph

        self.ppo, self.env_id, self.hp = _loaded(args)
        s = self.ppo.slim_settings
        super().__init__(args.checkpoint, ActorCriticGraph(self.ppo.policy), s.spec, s.eval_widths, self.env_id,
                         os.path.dirname(os.path.abspath(args.checkpoint)), self.ppo.device)
        self.default_eval_csv = os.path.join(self.run_dir, "eval_spectrum.csv")

    def example_input(self, batch_size, input_size=None):
        import torch

        if input_size:
            self.resolve_input_size(input_size)  # refused: the observation shape is fixed
        return (torch.zeros(batch_size, *self.ppo.policy.observation_space.shape, device=self.device),)

    def uncalibrated(self, widths):
        return []  # S-Net BN keeps statistics per switch; a US policy has no BN

    def evaluate(self, widths, args):
        """SB3's ``evaluate_policy`` at each width on the config's environment, ``n_eval_episodes`` games (default
        10; stochastic actions on Atari, as rl-zoo evaluates it)."""
        from .callbacks import evaluate_widths

        env = make_env(self.env_id, self.hp, 1, int(self.hp.get("seed", 0)) + 1000)
        n = int(self.hp.get("n_eval_episodes", 10))
        deterministic = not is_atari(self.env_id, self.hp)
        self.title = (f"{self.env_id}: mean episode reward per width ({n} episodes, "
                      f"{'deterministic' if deterministic else 'stochastic'} actions)")
        return evaluate_widths(self.ppo, env, widths, n, deterministic=deterministic)

    def export(self, w, out, onnx, fuse_bn):
        """The plain fixed-width actor-critic (``obs -> (action logits, value)``, SB3's image scaling included; for
        a Gaussian policy the first output is the action mean, ``log_std`` is not in the graph) saved whole with
        ``torch.save``; ``onnx``: its ONNX graph too (outputs ``logits``, ``value``; dynamic batch)."""
        import torch

        import slim_plugins as slim
        from slim_plugins.checkpoint import atomic_write

        net = self.model.cpu()
        x = torch.as_tensor(self.ppo.policy.observation_space.sample()[None]).float()
        plain = slim.export(net, w, example_input=x)
        atomic_write(out, lambda f: torch.save(plain, f))
        if not onnx:
            return [out]
        return [out, slim.export_onnx(plain, x, os.path.splitext(out)[0] + ".onnx", output_names=("logits", "value"))]


def open_checkpoint(args) -> PolicyCheckpoint:
    """The adapter protocol's loader: the ``SlimmablePPO`` / ``SlimmableA2C`` of the zip and its ``config.yml``."""
    return PolicyCheckpoint(args)
