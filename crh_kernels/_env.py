"""Every environment variable crh_kernels reads, read here and nowhere else.

| variable | meaning |
| --- | --- |
| ``CRH_BACKEND`` | backend used when no ``backend=`` argument is given (``torch``, ``triton``, ``cpp``, ``cuda``) |
| ``CRH_FP32_PRECISION`` | ``ieee`` (default) or ``tf32``: how fp32 operands enter the matrix units |
| ``CRH_TRITON_ATOMICS`` | ``1``: Triton split-N partials are summed with atomics (faster, not bitwise reproducible) |
| ``CRH_REQUIRE_CPP`` | ``1``: failing to build/load the C++ extension is an error instead of a fallback |
| ``CRH_SKIP_CUDA_BUILD`` / ``CRH_FORCE_CUDA_BUILD`` | build-time switches of ``setup.py`` (read there: the package is not importable before it is built) |
| ``CRH_CUDA_ARCHS`` | GPU architectures to build for, e.g. ``8.0;9.0`` (``setup.py`` and the JIT build) |
| ``CRH_CPU_ISA`` | ``generic`` or ``avx512``: cap the C++ CPU inner kernel (read by the C++ code in ``csrc/``; the tests use it) |
| ``CRH_CPU_HELP`` | ``0``: a C++ CPU thread done with its rows does not help with another thread's last chunk (read in ``csrc/``; same sums bit for bit, for A/B timing) |
| ``TRITON_INTERPRET`` | ``1``: Triton kernels run on CPU tensors through Triton's interpreter (set before import) |
"""
from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def backend() -> str | None:
    value = os.environ.get("CRH_BACKEND", "").strip().lower()
    return value or None


def fp32_precision() -> str:
    value = os.environ.get("CRH_FP32_PRECISION", "ieee").strip().lower() or "ieee"
    if value not in ("ieee", "tf32"):
        raise ValueError(f"CRH_FP32_PRECISION must be 'ieee' or 'tf32', got {value!r}")
    return value


def triton_atomics() -> bool:
    return _flag("CRH_TRITON_ATOMICS")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")


def require_cpp() -> bool:
    return _flag("CRH_REQUIRE_CPP")


def cuda_archs() -> str:
    return os.environ.get("CRH_CUDA_ARCHS", "").strip()
