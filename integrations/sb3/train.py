"""``slim train <zoo.yaml>`` for Stable-Baselines3: the config checked whole, periodic checkpoints, exact ``--resume``.

Every key is checked before anything is built or written (:func:`validate`): a bad value raises
:class:`~slim_plugins.errors.ConfigError` naming the key, the value and what is allowed, and leaves no file or
folder behind.

Checkpoints follow SB3's ``CheckpointCallback``: ``<output>/checkpoints/rl_model_<steps>_steps.zip``, written
atomically (the bytes go to a temporary file in the same folder, then ``os.replace``). ``save_freq`` (rl-zoo key,
environment steps of all envs together, as rl-zoo's ``--save-freq``; absent or 0: ``eval_freq``, whose default is
25 000) sets how often; a checkpoint is written at the first roll-out boundary (every ``n_steps x n_envs`` steps)
at or after each multiple, since only there is the whole training state at rest. Each file is SB3's own
``model.save`` zip (policy, optimizer state, ``num_timesteps``, ``_n_updates``, ``_last_obs``,
``_last_episode_starts``, ``ep_info_buffer``, ``_current_progress_remaining``, the learning-rate / clip-range
schedules and ``SlimmablePPO.width_iteration`` (``SlimmableA2C``'s for ``algo: a2c``), the width sampler's
position: its widths are drawn per ``(seed, iteration)``, so that number is its whole state) plus one more zip
entry, ``slim_resume.pkl`` (SB3's ``load`` ignores it), holding what SB3 does not save:

* the python / numpy / torch (and CUDA) RNG states;
* the training and evaluation VecEnv stacks, pickled whole (``DummyVecEnv`` of ``Monitor`` + ``AtariWrapper``
  envs, ``VecFrameStack``'s stacked frames, ``VecTransposeImage``): an ALE ``AtariEnv`` pickles through
  ``EzPickle`` as a fresh emulator, so here it is saved as its attributes (its ``np_random``) plus
  ``ale.cloneState(include_rng=True)`` (emulator and ALE RNG: sticky actions) and restored with ``restoreState``
  into a new emulator of the same ROM; other envs pickle with their attributes (classic control: exact);
* the evaluation callback's call counter, its ``evaluations.csv`` rows and its per-width costs;
* the effective config (the YAML entry after ``--set`` / ``--lr`` / ``--batch-size``, with ``seed``).

``--resume <checkpoint zip>`` restores all of it (``SlimmablePPO.load`` without an env, ``set_env`` with the
unpickled stack without a reset, the RNG states last) and calls ``learn(n_timesteps - steps,
reset_num_timesteps=False)``: every random draw after the checkpoint (actions, minibatch permutations, env
dynamics, stochastic evaluation) then is the one the uninterrupted run makes, so the final policy is bit-identical
(on CPU; CUDA kernels are not all deterministic). Only ``n_timesteps`` and ``save_freq`` may differ from the
checkpoint's config (a larger ``n_timesteps`` trains on, with the learning-rate schedule stretched: no longer the
uninterrupted run); any other difference is refused. Output goes to the checkpoint's run folder unless
``--output`` is given. An env that cannot be pickled still gets checkpoints, without env state: its resume resets
the envs and says it is not exact. Checkpoints hold pickled objects: resume trusted files only.
"""
from __future__ import annotations

import inspect
import io
import json
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from slim_plugins.checkpoint import rng_state, set_rng_state
from slim_plugins.config import parse_overrides
from slim_plugins.errors import CheckpointError, ConfigError, SlimError
from slim_plugins.spectrum import print_table

from .cli import _ZOO_ONLY, _columns, algo_classes, is_atari, make_env, ppo_kwargs

__all__ = ["train", "validate", "ResumeCheckpointCallback", "RESUME_ENTRY", "dumps_env", "rng_state",
           "set_rng_state"]

RESUME_ENTRY = "slim_resume.pkl"  # the zip entry next to SB3's own (SB3's load reads only data and *.pth)
RESUME_FORMAT = "slim_plugins.sb3.resume/1"
DEFAULT_EVAL_FREQ = 25_000
_TRAIN_ONLY = ("save_freq", "algo")  # keys handled here, not arguments of the algorithm
_MAY_DIFFER = ("n_timesteps", "save_freq")  # what a resumed run may change
_ABSENT = "(absent)"


# ---- the config -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    env_id: str
    hp: dict  # the effective entry (overrides, --lr, --batch-size, seed): config.yml and the checkpoints record it
    seed: int
    n_timesteps: int
    n_envs: int
    eval_freq: int
    n_eval_episodes: int
    save_freq: int
    kwargs: dict  # the SlimmablePPO / SlimmableA2C arguments
    out: str
    algo: str = "ppo"  # SlimmablePPO or SlimmableA2C (cli.ALGOS)
    resume: dict | None = None  # the checkpoint's resume state (--resume)
    resume_path: str | None = None
    notes: list = field(default_factory=list)


def _as_int(v, numbers_as_text: bool):
    """``v`` as an int, or ``None``: ints and integral floats; with ``numbers_as_text`` also any finite number or
    numeric string, truncated (rl-zoo reads ``n_timesteps`` as ``int(float(x))``)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, str):
        if not numbers_as_text:
            return None
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v) or (not numbers_as_text and not float(v).is_integer()):
            return None
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return None


def _int_key(env_id: str, hp: dict, key: str, default, minimum: int, allowed: str, numbers_as_text=False) -> int:
    v = hp.get(key, default)
    n = _as_int(v, numbers_as_text)
    if n is None or n < minimum:
        raise ConfigError(f"{env_id}: {key}={v!r} is not allowed: {key} must be {allowed}")
    return n


def _accepts(fn) -> tuple[set, bool]:
    """``(named parameters, takes **kwargs)`` of ``fn``."""
    params = inspect.signature(fn).parameters.values()
    return ({p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)},
            any(p.kind == p.VAR_KEYWORD for p in params))


def _check_policy(env_id: str, hp: dict, kwargs: dict, algo_cls):
    """The policy alias, ``policy_kwargs`` against the policy class's ``__init__`` (and ``features_extractor_kwargs``
    against the extractor's), the ``slimmable`` entry parsed."""
    from .ppo import parse_slimmable

    policy = hp.get("policy")
    aliases = algo_cls.policy_aliases
    if not isinstance(policy, str) or policy not in aliases:
        raise ConfigError(f"{env_id}: policy={policy!r} is not allowed: policy must be one of {sorted(aliases)}")
    cls = aliases[policy]
    pk = kwargs.get("policy_kwargs")
    if pk is None:
        pk = {}
    if not isinstance(pk, dict):
        raise ConfigError(f"{env_id}: policy_kwargs={pk!r} is not allowed: policy_kwargs must be a mapping of "
                          f"{cls.__name__} arguments plus 'slimmable'")
    names, var_kw = _accepts(cls.__init__)
    names -= {"self", "observation_space", "action_space", "lr_schedule"}
    unknown = sorted(set(pk) - names - {"slimmable"})
    if unknown and not var_kw:
        raise ConfigError(f"{env_id}: unknown policy_kwargs key(s) {unknown}: {policy} ({cls.__name__}) takes "
                          f"{sorted(names | {'slimmable'})}")
    fe_kwargs = pk.get("features_extractor_kwargs")
    if fe_kwargs is not None:
        fe_cls = pk.get("features_extractor_class") or inspect.signature(cls.__init__).parameters[
            "features_extractor_class"].default
        if not isinstance(fe_kwargs, dict):
            raise ConfigError(f"{env_id}: policy_kwargs.features_extractor_kwargs={fe_kwargs!r} is not allowed: it "
                              f"must be a mapping of {getattr(fe_cls, '__name__', fe_cls)} arguments")
        if inspect.isclass(fe_cls):
            fe_names, fe_var = _accepts(fe_cls.__init__)
            fe_unknown = sorted(set(fe_kwargs) - (fe_names - {"self", "observation_space"}))
            if fe_unknown and not fe_var:
                raise ConfigError(f"{env_id}: unknown policy_kwargs.features_extractor_kwargs key(s) {fe_unknown}: "
                                  f"{fe_cls.__name__} takes {sorted(fe_names - {'self', 'observation_space'})}")
    slimmable = pk.get("slimmable", True)
    if isinstance(slimmable, dict) and "eval_widths" in slimmable and slimmable["eval_widths"] is not None \
            and len(slimmable["eval_widths"]) == 0:
        raise ConfigError(f"{env_id}: policy_kwargs.slimmable.eval_widths={slimmable['eval_widths']!r} is not "
                          "allowed: give at least one width in the slimmable range, or leave the key out (default: "
                          "the switches, or 4 widths evenly spaced over the range)")
    try:
        parse_slimmable(slimmable)
    except SlimError as e:
        raise ConfigError(f"{env_id}: policy_kwargs.slimmable: {e}") from None
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{env_id}: policy_kwargs.slimmable={slimmable!r} is not allowed: give true or a "
                          f"mapping with widths / width_range and the keys of PPOSlimSettings ({e})") from None


def validate(args, cfg: dict) -> Plan:
    """Everything ``slim train`` checks before it builds or writes anything (``--resume``: the checkpoint too).

    Raises:
        ConfigError: a bad key or value (named, with what is allowed); a resume checkpoint whose config differs.
        CheckpointError: ``--resume`` of a file that is not a periodic SlimmablePPO / SlimmableA2C checkpoint of
            ``slim train``.
    """
    if cfg is None:  # `slim train --resume CKPT` without the YAML: the checkpoint's own config
        state = read_resume_state(args.resume)
        cfg = {state["env_id"]: dict(state["config"])}
    (env_id, hp), = cfg.items()
    hp = dict(hp)
    hp.update(parse_overrides(args.set))
    if args.lr is not None:  # recorded in config.yml (the hyperparameters used) and checked on resume
        hp["learning_rate"] = args.lr
    if args.batch_size is not None:
        hp["batch_size"] = args.batch_size
    seed = args.seed if args.seed is not None else _int_key(env_id, hp, "seed", 0, 0, "an integer >= 0")
    hp.pop("seed", None)
    n_timesteps = _int_key(env_id, hp, "n_timesteps", None, 1, "a positive number of environment steps (e.g. 1e6)",
                           numbers_as_text=True)
    n_envs = _int_key(env_id, hp, "n_envs", 1, 1, "an integer >= 1 (parallel environments)")
    eval_freq = _int_key(env_id, hp, "eval_freq", DEFAULT_EVAL_FREQ, 1,
                         "an integer >= 1 (environment steps between evaluations)")
    n_eval = _int_key(env_id, hp, "n_eval_episodes", 5, 1, "an integer >= 1 (episodes per width and evaluation)")
    save_freq = _int_key(env_id, hp, "save_freq", 0, 0, "an integer >= 0 (environment steps between checkpoints; "
                         f"0 or absent: eval_freq, {DEFAULT_EVAL_FREQ} by default)") or eval_freq
    if hp.get("frame_stack") not in (None, False):
        _int_key(env_id, hp, "frame_stack", None, 1, "an integer >= 1 (frames stacked per observation)")
    if "eval_widths" in hp:
        raise ConfigError(f"{env_id}: eval_widths={hp['eval_widths']!r} is not allowed at the top level: the widths "
                          "to evaluate go in policy_kwargs.slimmable.eval_widths (a non-empty list of widths in the "
                          "slimmable range)")
    slim_cls, sb3_cls = algo_classes(env_id, hp)
    name = sb3_cls.__name__
    kwargs = ppo_kwargs({k: v for k, v in hp.items() if k not in _TRAIN_ONLY})
    reserved = {"device": "--device", "tensorboard_log": "--output", "verbose": "slim train (1)",
                "_init_setup_model": "SB3's load"}
    given = sorted(set(kwargs) & set(reserved))
    if given:
        raise ConfigError(f"{env_id}: {given} not allowed in the config: set by "
                          f"{', '.join(reserved[k] for k in given)}")
    allowed = set(inspect.signature(sb3_cls.__init__).parameters) - {"self", "policy", "env", "seed", *reserved}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {env_id!r}: not a {name} argument nor an rl-zoo key "
                          f"{list(_ZOO_ONLY) + list(_TRAIN_ONLY)}; {name} takes {sorted(allowed)}")
    _check_policy(env_id, hp, kwargs, slim_cls)
    hp["seed"] = seed
    plan = Plan(env_id=env_id, hp=hp, seed=seed, n_timesteps=n_timesteps, n_envs=n_envs, eval_freq=eval_freq,
                n_eval_episodes=n_eval, save_freq=save_freq, kwargs=kwargs, algo=slim_cls.__name__[9:].lower(),
                out=args.output or os.path.join("logs", f"us_{slim_cls.__name__[9:].lower()}", f"{env_id}_1"))
    if args.resume:
        _check_resume(plan, args)
    return plan


# ---- the resume state -------------------------------------------------------------------------------------------
def _new(cls, args, kwargs):
    return cls(*args, **kwargs)


def _blank(cls):
    return cls.__new__(cls)


def _set_atari_state(obj, state) -> None:
    attrs, ale_state = state
    obj.__dict__.update(attrs)
    obj.ale.restoreState(ale_state)


def _set_attrs(obj, attrs) -> None:
    obj.__dict__.update(attrs)


def _set_vec_wrapper_state(obj, attrs) -> None:
    obj.__dict__.update(attrs)
    obj.class_attributes = dict(inspect.getmembers(type(obj)))


def _env_pickler():
    import cloudpickle
    from gymnasium.utils import EzPickle
    from stable_baselines3.common.vec_env import VecEnvWrapper

    try:
        from ale_py.env import AtariEnv
    except ImportError:  # no ALE installed: no Atari env to meet
        AtariEnv = ()

    class EnvPickler(cloudpickle.Pickler):
        """Pickles an env stack with its state: an ALE env as its attributes + the emulator state with its RNG; an
        ``EzPickle`` env (which would otherwise pickle as its constructor arguments, i.e. a fresh env) by its
        attributes; an SB3 ``VecEnvWrapper`` without its ``class_attributes`` cache (class members, rebuilt)."""

        def reducer_override(self, obj):
            if AtariEnv and isinstance(obj, AtariEnv):
                attrs = {k: v for k, v in obj.__dict__.items() if k != "ale"}
                return (_new, (type(obj), obj._ezpickle_args, obj._ezpickle_kwargs),
                        (attrs, obj.ale.cloneState(include_rng=True)), None, None, _set_atari_state)
            if isinstance(obj, VecEnvWrapper) and "class_attributes" in obj.__dict__:
                attrs = {k: v for k, v in obj.__dict__.items() if k != "class_attributes"}
                return _blank, (type(obj),), attrs, None, None, _set_vec_wrapper_state
            if isinstance(obj, EzPickle):
                return _blank, (type(obj),), dict(obj.__dict__), None, None, _set_attrs
            return super().reducer_override(obj)

    return EnvPickler


def dumps_env(obj) -> bytes:
    """``obj`` (an env stack, or a tuple of them) pickled with its state (see the module docstring); ``pickle.loads``
    restores it."""
    buf = io.BytesIO()
    _env_pickler()(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _run_dir(checkpoint: str) -> str:
    """The run folder of ``<run>/checkpoints/rl_model_<n>_steps.zip`` (the zip's folder otherwise)."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def read_resume_state(path: str) -> dict:
    """The resume state in a periodic checkpoint of ``slim train``.

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a SlimmablePPO zip, or one without resume state.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path!r} does not exist")
    hint = "give a periodic checkpoint of slim train, <run>/checkpoints/rl_model_<steps>_steps.zip"
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            data = json.loads(z.read("data")) if "data" in names else None
            blob = z.read(RESUME_ENTRY) if RESUME_ENTRY in names else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"--resume {path!r} is not a Stable-Baselines3 checkpoint zip ({e}); {hint}") \
            from None
    if not isinstance(data, dict) or "slim_config" not in data:
        raise CheckpointError(f"--resume {path!r} is not a SlimmablePPO checkpoint (no SB3 'data' entry with "
                              f"slim_config); {hint}")
    if blob is None:
        raise CheckpointError(f"--resume {path!r} is a SlimmablePPO model without resume state (a final model or "
                              f"a model.save zip: no {RESUME_ENTRY} entry); {hint}")
    try:
        state = pickle.loads(blob)
    except Exception as e:  # noqa: BLE001  any unpickling failure means the entry is unusable
        raise CheckpointError(f"--resume {path!r}: its resume state cannot be read ({type(e).__name__}: {e})") \
            from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"--resume {path!r}: {RESUME_ENTRY} is not in the format {RESUME_FORMAT!r}")
    return state


def _check_resume(plan: Plan, args) -> None:
    """Read ``--resume``, refuse a config that differs from its own, choose the output folder."""
    state = read_resume_state(args.resume)
    where = f"--resume {args.resume!r}"
    if state["env_id"] != plan.env_id:
        raise ConfigError(f"{where}: the checkpoint trains {state['env_id']!r}, the config {plan.env_id!r}")
    saved, now = state["config"], plan.hp
    diff = [k for k in sorted(set(saved) | set(now), key=str)
            if k not in _MAY_DIFFER and saved.get(k, _ABSENT) != now.get(k, _ABSENT)]
    if diff:
        raise ConfigError(f"{where}: the config differs from the checkpoint's in "
                          + "; ".join(f"{k}: checkpoint {saved.get(k, _ABSENT)!r}, now {now.get(k, _ABSENT)!r}"
                                      for k in diff)
                          + f" (only {list(_MAY_DIFFER)} may change on resume; the run's config.yml holds the rest)")
    steps = int(state["num_timesteps"])
    if plan.n_timesteps <= steps:
        raise ConfigError(f"{where}: n_timesteps={plan.n_timesteps} is not allowed: the checkpoint is at step "
                          f"{steps}, so n_timesteps must be more than {steps}")
    if plan.n_timesteps != int(_as_int(saved.get("n_timesteps"), True) or 0):
        plan.notes.append(f"n_timesteps {saved.get('n_timesteps')!r} -> {plan.n_timesteps}: the schedules stretch, "
                          "so this is not the uninterrupted run of either config")
    plan.resume, plan.resume_path = state, args.resume
    plan.out = args.output or _run_dir(args.resume)


# ---- the callback -----------------------------------------------------------------------------------------------
class ResumeCheckpointCallback(BaseCallback):
    """SB3's ``CheckpointCallback`` habits (``<save_path>/rl_model_<steps>_steps.zip``), written at roll-out
    boundaries (``on_rollout_start``: the last update done, no step of the next roll-out taken) once ``save_freq``
    environment steps have passed since the last one, with the resume state (module docstring) in the zip.

    Args:
        save_freq: environment steps of all envs together between checkpoints. eval_callback: the
            ``WidthEvalCallback`` whose counter and rows are saved. config: the effective config, recorded.
        env_state: save the env stacks (``False`` when they cannot be pickled: resume is then not exact).
    """

    def __init__(self, save_freq: int, save_path: str, env_id: str, config: dict, eval_callback,
                 env_state: bool = True, name_prefix: str = "rl_model", verbose: int = 1):
        super().__init__(verbose)
        self.save_freq, self.save_path, self.name_prefix = save_freq, save_path, name_prefix
        self.env_id, self.config, self.eval_callback, self.env_state = env_id, config, eval_callback, env_state
        self.last_saved = 0
        self.saved: list = []

    def _init_callback(self) -> None:
        self.last_saved = self.model.num_timesteps  # 0, or the resumed checkpoint's step (not saved again)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        n = self.model.num_timesteps
        if n > self.last_saved and n // self.save_freq > self.last_saved // self.save_freq:
            self.save()

    def save(self) -> str:
        from slim_plugins.checkpoint import atomic_write

        n = self.model.num_timesteps
        cb = self.eval_callback
        state = {"format": RESUME_FORMAT, "env_id": self.env_id, "config": self.config, "num_timesteps": n,
                 "rng": rng_state(cuda=self.model.device.type == "cuda"),
                 "eval_callback": {"n_calls": cb.n_calls, "history": list(cb.history),
                                   "last_rows": list(cb.last_rows), "costs": cb._costs},
                 "envs": dumps_env((self.model.env, cb.eval_env)) if self.env_state else None}
        buf = io.BytesIO()
        self.model.save(buf)
        with zipfile.ZipFile(buf, "a") as z:
            z.writestr(RESUME_ENTRY, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        path = os.path.join(self.save_path, f"{self.name_prefix}_{n}_steps.zip")
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        self.last_saved = n
        self.saved.append(path)
        if self.verbose:
            print(f"Saving model checkpoint to {path}")
        return path


# ---- slim train -------------------------------------------------------------------------------------------------
def _envs_picklable(env, eval_env) -> str | None:
    """``None``, or why the env stacks cannot be saved (then checkpoints carry no env state)."""
    try:
        dumps_env((env, eval_env))
    except Exception as e:  # noqa: BLE001  whatever the env holds that does not pickle
        return f"{type(e).__name__}: {e}"
    return None


def train(args, cfg: dict) -> int:
    """``slim train ZOO.yaml [--resume CKPT]``: ``SlimmablePPO`` (``SlimmableA2C`` for ``algo: a2c``) with the
    file's hyperparameters; evaluates every width every ``eval_freq`` steps and at the end with SB3's
    ``evaluate_policy`` (stochastic actions on Atari, as rl-zoo evaluates it; deterministic otherwise); checkpoints
    every ``save_freq`` steps (module docstring)."""
    import yaml

    from slim_plugins.checkpoint import atomic_write

    from .callbacks import WidthEvalCallback

    plan = validate(args, cfg)  # nothing built or written before this returns
    env_id, hp, out = plan.env_id, plan.hp, plan.out
    device = args.device or "auto"
    state = plan.resume
    slim_cls = algo_classes(env_id, hp)[0]  # plan.algo's class
    if state is None:
        env = make_env(env_id, hp, plan.n_envs, plan.seed)
        eval_env = make_env(env_id, hp, 1, plan.seed + 1000)
        model = slim_cls(hp["policy"], env, seed=plan.seed, tensorboard_log=out, device=device, verbose=1,
                         **plan.kwargs)
        why = _envs_picklable(model.env, eval_env)
    else:
        steps = int(state["num_timesteps"])
        if state["envs"] is not None:
            env, eval_env = pickle.loads(state["envs"])
            why = None
        else:  # saved without env state: fresh envs, reset by learn
            why = "no env state"
            env = make_env(env_id, hp, plan.n_envs, plan.seed + steps)
            eval_env = make_env(env_id, hp, 1, plan.seed + 1000 + steps)
        model = slim_cls.load(plan.resume_path, env=None, device=device, tensorboard_log=out, verbose=1)
        model.set_env(env, force_reset=why is not None)
        if model.num_timesteps != steps:
            raise CheckpointError(f"--resume {plan.resume_path!r}: the model is at step {model.num_timesteps}, its "
                                  f"resume state at {steps}")
    if why is not None:
        warnings.warn(f"{env_id}: {plan.resume_path} holds no env state: the envs restart (reset with seed + steps), "
                      "so this run does not reproduce the uninterrupted one" if state is not None else
                      f"{env_id}: the env state cannot be checkpointed ({why}); a --resume will restart the envs "
                      "and not reproduce the uninterrupted run", RuntimeWarning, stacklevel=2)
    deterministic = not is_atari(env_id, hp)
    cb = WidthEvalCallback(eval_env, eval_freq=max(1, plan.eval_freq // plan.n_envs),
                           n_eval_episodes=plan.n_eval_episodes, deterministic=deterministic, log_path=out,
                           verbose=1)
    ckpt = ResumeCheckpointCallback(plan.save_freq, os.path.join(out, "checkpoints"), env_id, hp, cb,
                                    env_state=why is None)
    if state is not None:
        saved = state["eval_callback"]
        cb.n_calls, cb.history, cb.last_rows, cb._costs = (saved["n_calls"], list(saved["history"]),
                                                           list(saved["last_rows"]), saved["costs"])
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "config.yml"), lambda f: yaml.safe_dump({env_id: hp}, f), mode="w")
    if state is None:
        model.learn(plan.n_timesteps, callback=[cb, ckpt])
    else:
        print(f"resuming {env_id} from {plan.resume_path} at step {model.num_timesteps} of {plan.n_timesteps}"
              + "".join(f"; {n}" for n in plan.notes))
        set_rng_state(state["rng"])  # last: nothing between here and the first roll-out step draws a number
        model.learn(plan.n_timesteps - model.num_timesteps, callback=[cb, ckpt], reset_num_timesteps=False)
    tmp = os.path.join(out, f".{env_id}.tmp.zip")  # SB3 writes the zip in place: save, then rename (atomic)
    model.save(tmp)
    os.replace(tmp, os.path.join(out, f"{env_id}.zip"))
    rows = cb.evaluate()  # the final evaluation: logged, spectrum.csv and evaluations.csv like the periodic ones
    print_table(rows, title=f"{env_id}: mean episode reward per width ({plan.n_eval_episodes} episodes)",
                columns=_columns([("mean_reward", "reward", "{:.1f}"), ("std_reward", "± std", "{:.1f}")]))
    return 0

