"""Backend registry: names, availability with reasons, the choice rule, and ``matmul_rows``.

Choice: the ``backend=`` argument, else ``CRH_BACKEND``, else the fastest available
backend for the tensor's device (CUDA: triton > cuda > torch; CPU: cpp > torch).
The Triton interpreter is never chosen automatically: it is a correctness tool.
Backends are imported lazily, so importing crh_kernels never imports triton.

The protocol every backend follows (required methods, optional capabilities and their
flags, the row-status vocabulary) is declared in :mod:`crh_kernels.backends.base`.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

# PyTorch under another name: importing the submodule ``crh_kernels.backends.torch`` (the torch
# backend) binds the name ``torch`` in this package's namespace to that submodule.
import torch as _torch

from .. import _env
from .base import ROW_MASKED, ROW_SKIPPED, ROW_VALID, Backend, BatchStats, CrossStats

# name -> (module, class name); modules are imported on first use
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "torch": ("crh_kernels.backends.torch", "TorchBackend"),
    "triton": ("crh_kernels.backends.triton", "TritonBackend"),
    "cpp": ("crh_kernels.backends.cpp", "CppBackend"),
    "cuda": ("crh_kernels.backends.cuda", "CudaBackend"),
}
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_INSTANCES: Dict[str, Backend] = {}
_FAILED: Dict[str, str] = {}


def _instance(name: str) -> Optional[Backend]:
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _FAILED:
        return None
    module, cls = _REGISTRY[name]
    try:
        obj = getattr(importlib.import_module(module), cls)()
    except Exception as exc:  # an optional dependency missing or broken
        _FAILED[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None
    _INSTANCES[name] = obj
    return obj


def names():
    return tuple(_REGISTRY)


def backend_class(name: str) -> type:
    """The class registered as ``name`` (imports its module; instantiates nothing)."""
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``name -> (available, reason)`` for every known backend."""
    out = {}
    for name in _REGISTRY:
        be = _instance(name)
        out[name] = (False, _FAILED[name]) if be is None else tuple(be.availability())
    return out


def get(name: str) -> Backend:
    """The backend called ``name``; raises with the reason when it cannot be used."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)}, got {name!r}")
    be = _instance(name)
    if be is None:
        raise RuntimeError(f"backend {name!r} is unavailable: {_FAILED[name]}")
    ok, why = be.availability()
    if not ok:
        raise RuntimeError(f"backend {name!r} is unavailable: {why}")
    return be


def resolve(name: Optional[str], device: _torch.device, dtype: _torch.dtype) -> Backend:
    """Apply the choice rule for a tensor on ``device`` of ``dtype``."""
    device = _torch.device(device)
    explicit = name or _env.backend()
    if explicit:
        be = get(explicit)
        ok, why = be.supports(device)
        if not ok:
            raise RuntimeError(f"backend {explicit!r} cannot handle tensors on {device}: {why}")
        if dtype not in be.dtypes:
            raise TypeError(f"backend {explicit!r} accepts dtypes {[str(d) for d in be.dtypes]}, "
                            f"got {dtype}")
        return be
    if device.type == "cpu" and dtype != _torch.float64 and _env.require_cpp():
        return get("cpp")  # CRH_REQUIRE_CPP: raise with the reason rather than fall back
    for cand in _PREFERENCE.get(device.type, ("torch",)):
        be = _instance(cand)
        if be is None or dtype not in be.dtypes:
            continue
        if be.availability()[0] and be.supports(device)[0]:
            return be
    return get("torch")


def matmul_rows(x: _torch.Tensor, w: _torch.Tensor) -> _torch.Tensor:
    """``x @ w``: for 2-D float32 CPU tensors outside autograd, through a backend that offers
    the ``row_matmul`` capability and is already instantiated and loaded (by a Moments that
    uses it: nothing is loaded or built here), else torch's matmul. Same values either way up
    to fp32 rounding (fp32 accumulation over K); which one is faster is recorded in NOTES.md."""
    if (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == _torch.float32
            and w.dtype == _torch.float32 and x.dim() == 2 and w.dim() == 2
            and not (_torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        for be in tuple(_INSTANCES.values()):
            if be.row_matmul:
                out = be.matmul_rows(x, w)  # None while the backend is not loaded
                if out is not None:
                    return out
    return x @ w


__all__ = ["Backend", "BatchStats", "CrossStats", "ROW_MASKED", "ROW_SKIPPED", "ROW_VALID",
           "available_backends", "backend_class", "get", "resolve", "names", "matmul_rows"]
