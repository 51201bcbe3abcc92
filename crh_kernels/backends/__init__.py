"""Backend registry: names, availability with reasons, and the choice rule.

Choice: the ``backend=`` argument, else ``CRH_BACKEND``, else the fastest available
backend for the tensor's device (CUDA: triton > cuda > torch; CPU: cpp > torch).
The Triton interpreter is never chosen automatically: it is a correctness tool.
Backends are imported lazily, so importing crh_kernels never imports triton.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

from .. import _env
from .base import Backend, BatchStats, CrossStats

# name -> (module, class name); modules are imported on first use
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "torch": ("crh_kernels.backends.reference", "TorchBackend"),
    "triton": ("crh_kernels.backends.triton", "TritonBackend"),
    "cpp": ("crh_kernels.backends.cpp", "CppBackend"),
    "cuda": ("crh_kernels.backends.cpp", "CudaBackend"),
}
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_INSTANCES: Dict[str, object] = {}
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


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """Apply the choice rule for a tensor on ``device`` of ``dtype``."""
    device = torch.device(device)
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
    if device.type == "cpu" and dtype != torch.float64 and _env.require_cpp():
        return get("cpp")  # CRH_REQUIRE_CPP: raise with the reason rather than fall back
    for cand in _PREFERENCE.get(device.type, ("torch",)):
        be = _instance(cand)
        if be is None or dtype not in be.dtypes:
            continue
        if be.availability()[0] and be.supports(device)[0]:
            return be
    return get("torch")


__all__ = ["Backend", "BatchStats", "CrossStats", "available_backends", "get", "resolve", "names"]
