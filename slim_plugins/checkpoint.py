"""Checkpoints that carry their width spec, written atomically."""
from __future__ import annotations

import os
import tempfile

import torch

from .context import find_state
from .errors import WidthSpecMismatchError
from .width import WidthSpec


def save_checkpoint(path: str, model, **extra) -> str:
    """Save ``{"model": state_dict, "width_spec": ..., "bn_mode": ..., **extra}`` to ``path`` atomically
    (temporary file in the same folder, then ``os.replace``): a crash never leaves a half-written file."""
    state = find_state(model)
    module = getattr(model, "module", model)  # unwrap DDP
    payload = {"model": module.state_dict(), "width_spec": state.spec.to_dict(), "bn_mode": state.bn_mode, **extra}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file written by :func:`save_checkpoint` (trusted files only: it holds Python objects)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def load_checkpoint(path_or_payload, model, strict: bool = True) -> dict:
    """Load a checkpoint into a converted model after checking its width spec.

    Returns:
        the checkpoint payload (for optimizer state, epoch, ...).

    Raises:
        WidthSpecMismatchError: the checkpoint's spec or BN mode differs from the model's (model unchanged).
    """
    ck = read_checkpoint(path_or_payload) if isinstance(path_or_payload, (str, os.PathLike)) else path_or_payload
    state = find_state(model)
    saved = ck.get("width_spec")
    if saved is None or WidthSpec.from_dict(saved) != state.spec or ck.get("bn_mode", state.bn_mode) != state.bn_mode:
        raise WidthSpecMismatchError(
            f"checkpoint width spec {saved} (bn={ck.get('bn_mode')}) does not match the model's "
            f"{state.spec.to_dict()} (bn={state.bn_mode}); build the model with the checkpoint's spec")
    getattr(model, "module", model).load_state_dict(ck["model"], strict=strict)
    return ck
