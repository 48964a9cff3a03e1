"""Small helpers shared by every module (dimension-agnostic broadcasting, devices, safe checkpoint IO)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch


def expand_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Append singleton axes to ``values`` (``(B,)`` per sample or ``(B, C)`` per channel) so it broadcasts
    against ``x`` of shape ``(B, C, *spatial)``.

    The single broadcast helper of the package: works for 2D and 3D alike (never ``[:, None, None, None]``).
    """
    return values.reshape(*values.shape, *([1] * (x.ndim - values.ndim))).to(x.dtype)


def merge_nested(base: dict, overrides: dict) -> dict:
    """A deep copy of ``base`` with ``overrides`` on top, nested dicts merged key by key (a plans section and its
    overrides: ``{"ema": {"enabled": False}}`` changes only that entry of ``ema``)."""
    import copy
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge_nested(out.get(key, {}), value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``mps`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device (use -device cpu)")
    return torch.device(name)


def _numpy_safe_globals() -> list:
    """Numpy objects that nnU-Net checkpoints contain (logged float scalars); all are inert data types."""
    core = getattr(np, "_core", None) or np.core
    safe = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    safe += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    return safe


_torch_load = torch.load  # bound at import: callers may swap torch.load for this very function


def load_checkpoint_safely(path: str, map_location="cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True``: tensors, containers and numpy scalars only.

    Raises ``RuntimeError`` naming the file when it is unreadable or holds anything executable.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals() + [torch.device]):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name, the only thing a user can act on
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{path}: cannot load checkpoint safely ({first})") from e


def partial_path(path: str) -> str:
    """The temporary name an output is written under before it is renamed to ``path`` (same folder, hidden)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, ".partial_" + name)


@contextmanager
def atomic_outputs():
    """Several output files, all or none: yields a list to which the block appends each final path before writing
    it to ``partial_path(path)``; when the block succeeds every file is renamed into place in the order appended
    (append the file whose presence marks a finished output last), and whatever was left under a partial name is
    removed, also when the block raises."""
    written = []
    try:
        yield written
        for path in written:
            os.replace(partial_path(path), path)
    finally:
        for path in written:
            if os.path.exists(partial_path(path)):
                os.remove(partial_path(path))


def write_text(path: str, text: str) -> None:
    """``text`` at ``path``, written under :func:`partial_path` and renamed (never half-written)."""
    with atomic_outputs() as written:
        written.append(path)
        with open(partial_path(path), "w") as f:
            f.write(text)


def write_json(path: str, data) -> None:
    """``data`` as indented JSON at ``path``, through :func:`write_text` (never half-written)."""
    import json
    write_text(path, json.dumps(data, indent=2))


@contextmanager
def swapped(module, name: str, value):
    """Temporarily replace ``module.name``: the one seam used where nnU-Net hard-codes a class or function
    inside a long method (``perform_actual_validation`` builds a stock predictor, for example)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
