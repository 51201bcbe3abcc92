"""The ``cuda`` backend: the ``crh::`` ops' CUDA kernels (``csrc/moments_cuda.cu``).

Tiled CUDA kernels (tensor-core MMA for bf16/fp16, fp32 FMA for fp32), for GPUs or setups
where Triton is unavailable. The op schemas, their fake kernels and the loading of both
extensions are those of :mod:`crh_kernels.backends.cpp` (the CUDA extension only adds CUDA
implementations of ``crh::batch_stats`` and ``crh::cross_stats``), so this file holds the
backend class, its probe, and the two required methods in their sync-free form: the counts
are returned as 0-d tensors on the device, never read on the host. No optional capability
(:mod:`crh_kernels.backends.base`).

A fallback until it is reworked (issue 14): ``mma.sync`` with single-buffered shared memory,
and the row status and scale loaded per element; the ``triton`` backend is the GPU path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import BatchStats, CrossStats
from .cpp import OpsBackend, load_extension


class CudaBackend(OpsBackend):
    """CUDA tensors through the CUDA extension; unavailable on a CPU build of torch, without
    the CPU extension (it defines the ops), without the CUDA extension, or without a GPU."""

    name = "cuda"

    def __init__(self):
        self._ok: Optional[Tuple[bool, str]] = None

    def availability(self) -> Tuple[bool, str]:
        if self._ok is None:
            self._ok = self._probe()
        return self._ok

    @staticmethod
    def _probe() -> Tuple[bool, str]:
        if torch.version.cuda is None:
            return False, "torch is a CPU build (torch.version.cuda is None)"
        cpu, how = load_extension("cpu")
        if cpu is None:  # it defines the op schemas the CUDA kernels implement
            return False, f"needs the C++ extension, which defines the crh:: ops: {how}"
        module, how = load_extension("cuda")
        if module is None:
            return False, how
        if not torch.cuda.is_available():
            return False, "no CUDA device visible (torch.cuda.is_available() is False)"
        return True, f"CUDA extension ({how}), CUDA {torch.version.cuda}"

    def batch_stats(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                    fp32_precision: str = "ieee") -> BatchStats:
        mean, scatter, counts = torch.ops.crh.batch_stats(x, mask, bool(normalize))
        return BatchStats(*counts.unbind(), mean, scatter)  # 0-d views: no host read

    def cross_stats(self, g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor],
                    normalize: bool, fp32_precision: str = "ieee") -> CrossStats:
        mean_g, mean_h, scatter, counts = torch.ops.crh.cross_stats(g, h, mask, bool(normalize))
        return CrossStats(*counts.unbind(), mean_g, mean_h, scatter)

    def supports(self, device) -> Tuple[bool, str]:
        if torch.device(device).type == "cuda":
            return True, ""
        return False, "the cuda backend handles CUDA tensors (use 'cpp' or 'torch' on the CPU)"
