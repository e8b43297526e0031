"""Checkpoints that carry their width spec, written atomically."""
from __future__ import annotations

import os
import tempfile

import torch

from .context import find_state
from .errors import CheckpointError, WidthError, WidthSpecMismatchError
from .width import WidthSpec


def atomic_write(path: str, write, mode: str = "wb") -> str:
    """Write a file atomically: ``write(f)`` into a temporary file in the same folder, flushed and fsynced, then
    ``os.replace`` onto ``path``. A crash or an exception never leaves a half-written ``path``; returns ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def rng_state(cuda: bool | None = None) -> dict:
    """The Python, NumPy, torch (and CUDA: by default when available) global generator states, for a resume that
    continues the random streams exactly; :func:`set_rng_state` restores them."""
    import random

    import numpy as np

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if (torch.cuda.is_available() if cuda is None else cuda and torch.cuda.is_available()):
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state` (CUDA states only where the dict has them and CUDA is available)."""
    import random

    import numpy as np

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str, model, **extra) -> str:
    """Save ``{"model": state_dict, "width_spec": ..., "bn_mode": ..., **extra}`` to ``path`` atomically
    (temporary file in the same folder, then ``os.replace``): a crash never leaves a half-written file."""
    state = find_state(model)
    module = getattr(model, "module", model)  # unwrap DDP
    payload = {"model": module.state_dict(), "width_spec": state.spec.to_dict(), "bn_mode": state.bn_mode, **extra}
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file written by :func:`save_checkpoint` (trusted files only: it holds Python objects).

    Raises:
        FileNotFoundError: no such file. CheckpointError: truncated, corrupt or not a slim_plugins checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, ...: one typed error naming the file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}); the file is "
                              "truncated or not a torch checkpoint") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a slim_plugins checkpoint (no 'model' entry); write one with "
                              "slim.save_checkpoint")
    return ck


def load_checkpoint(path_or_payload, model, strict: bool = True) -> dict:
    """Load a checkpoint into a converted model after checking its width spec.

    Returns:
        the checkpoint payload (for optimizer state, epoch, ...).

    Raises:
        WidthSpecMismatchError: the checkpoint's spec or BN mode differs from the model's.
        CheckpointError: a tensor's shape differs (e.g. another classifier head), or keys are missing /
            unexpected with ``strict``; every mismatch is named.
    The model is unchanged when an error is raised (shapes and keys are checked before anything is copied).
    """
    ck = read_checkpoint(path_or_payload) if isinstance(path_or_payload, (str, os.PathLike)) else path_or_payload
    state = find_state(model)
    saved = ck.get("width_spec")
    try:
        saved_spec = WidthSpec.from_dict(saved) if saved is not None else None
    except (WidthError, KeyError, TypeError):
        saved_spec = None
    if saved_spec is None or saved_spec != state.spec or ck.get("bn_mode", state.bn_mode) != state.bn_mode:
        raise WidthSpecMismatchError(
            f"checkpoint width spec {saved} (bn={ck.get('bn_mode')}) does not match the model's "
            f"{state.spec.to_dict()} (bn={state.bn_mode}); build the model with the checkpoint's spec")
    module = getattr(model, "module", model)
    _check_loadable(module, ck["model"], strict)
    module.load_state_dict(ck["model"], strict=strict)
    return ck


# Entries a slimmable layer reshapes itself when loading (broadcast stock BN, per-width statistics).
_FLEXIBLE = ("post_keys", "post_mean", "post_var", "_extra_state")


def _check_loadable(module, sd: dict, strict: bool) -> None:
    own = module.state_dict()
    bad = []
    for k, v in sd.items():
        if k.endswith(_FLEXIBLE) or k not in own or not torch.is_tensor(v):
            continue
        mine = own[k]
        if v.shape != mine.shape and not (mine.dim() == v.dim() + 1 and mine.shape[1:] == v.shape):
            bad.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(mine.shape)}")
    if strict:
        missing = [k for k in own if k not in sd and not k.endswith(_FLEXIBLE + ("min_mean", "min_var", "min_tracked"))]
        unexpected = [k for k in sd if k not in own and not k.endswith(_FLEXIBLE)]
        bad += [f"missing {k}" for k in missing[:10]] + [f"unexpected {k}" for k in unexpected[:10]]
    if bad:
        raise CheckpointError(f"checkpoint does not fit the model ({len(bad)} mismatch(es), nothing loaded): "
                              + "; ".join(bad[:10]))
