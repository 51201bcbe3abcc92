"""The ``cpp`` backend (CPU): the compiled ``crh::`` ops of ``csrc/``, and their loading.

Owns: loading the C++ extensions (prebuilt by setup.py, else a JIT build on first use, else a
one-line reason; :mod:`crh_kernels.backends.cuda` loads the CUDA one through
:func:`load_extension` too), the fake (meta) kernels of the ops, the op wrappers both compiled
backends share (:class:`OpsBackend`) and :class:`CppBackend`. The kernels themselves are in
``csrc/``; they follow the row rule of :mod:`crh_kernels.backends.base` and docs/spec.md §2: fp32 row
norms, shift by the batch mean in fp32 before the product, upper-triangle tiles only, fp32
accumulation, exact mirror.

Ops (registered by ``TORCH_LIBRARY(crh)`` in csrc/bindings.cpp)::

    torch.ops.crh.batch_stats(x (N, D), mask (N,) | None, normalize)
        -> mean f64 (D,), scatter f32 (D, D), counts i64 [n, n_skipped]
    torch.ops.crh.cross_stats(g (N, Dg), h (N, Dh), mask | None, normalize)
        -> mean_g f64 (Dg,), mean_h f64 (Dh,), scatter f32 (Dg, Dh), counts i64 [n, n_skipped]

    torch.ops.crh.batch_update_(x, mask | None, normalize, strict, state_counts, state_mean,
                                state_scatter)
        -> mean f64 (D,), counts of the batch   (CPU only: the batch merged into the state,
           counts i64 [n, n_skipped], mean and scatter f32/f64, in place: one commit point)
    torch.ops.crh.stage_rows_(x (R, D), mask | None, normalize, buf (R, D), scale f32 (R,),
                              status u8 (R,), sum f64 (D,)) -> None
        (CPU only: x copied into buf with pass 1 on the way; sum += Σ s_i x_i;
         status 0 masked, 1 skipped, 2 valid: ROW_MASKED, ROW_SKIPPED, ROW_VALID of base.py;
         scale < 0 on a tiny row, norm < 2^-100: −2^-64/||x||, the row enters as (x·2^64)·|s|)
    torch.ops.crh.batch_update_staged_(x, scale, status, sum, strict, state_counts, state_mean,
                                       state_scatter)
        -> mean f64 (D,), counts     (CPU only: batch_update_ of rows staged by stage_rows_)
    torch.ops.crh.matmul_rows(x (N, K) f32, w (K, M) f32) -> (N, M) f32   (CPU only)

:class:`CppBackend` offers every optional capability: ``fused_update`` (batch_update_),
``row_staging`` (stage_rows_, batch_update_staged_) and ``row_matmul`` (matmul_rows).
``fp32_precision`` is accepted and ignored: fp32 operands always take the IEEE fp32 path.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from .. import _env
from .base import Backend, BatchStats, CrossStats, FusedResult

_LOCK = threading.Lock()
# name -> (module or None, how it was loaded or why it was not)
_LOADED: dict = {}


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


# kind -> (prebuilt module under crh_kernels, name of its JIT builder in crh_kernels._build)
_EXTENSIONS = {"cpu": ("_C", "jit_cpu"), "cuda": ("_C_cuda", "jit_cuda")}


def load_extension(kind: str):
    """``(module or None, how it was loaded or why it was not)`` for the ``kind`` ("cpu" or
    "cuda") extension: prebuilt, else JIT-built. Cached per process; the first successful
    CPU load registers the ops' fake kernels."""
    loaded = _LOADED.get(kind)  # no lock once loaded: the dict entry is written once
    if loaded is not None:
        return loaded
    with _LOCK:
        if kind in _LOADED:
            return _LOADED[kind]
        from .. import _build

        prebuilt, builder = _EXTENSIONS[kind]
        try:
            module = __import__(f"crh_kernels.{prebuilt}", fromlist=["_"])
            result = (module, "prebuilt")
        except ImportError as exc:
            why = f"no prebuilt crh_kernels.{prebuilt} ({_first_line(exc)})"
            try:
                result = (getattr(_build, builder)(), "JIT-built")
            except Exception as jexc:  # compiler, ninja or headers missing; a compile error
                result = (None, f"{why}; JIT build failed: {_first_line(jexc)}")
        if kind == "cpu" and result[0] is not None:
            _register_fakes()
        _LOADED[kind] = result
        return result


def extension_loaded(kind: str) -> bool:
    """Whether the ``kind`` extension is loaded already; never loads or builds it."""
    loaded = _LOADED.get(kind)
    return loaded is not None and loaded[0] is not None


def _register_fakes() -> None:
    """Shapes and dtypes of the ops' outputs, for FakeTensor / torch.compile / opcheck."""

    @torch.library.register_fake("crh::batch_stats")
    def _batch_stats_fake(x, mask, normalize):
        d = x.shape[1]
        return (x.new_empty((d,), dtype=torch.float64), x.new_empty((d, d), dtype=torch.float32),
                x.new_empty((2,), dtype=torch.int64))

    @torch.library.register_fake("crh::batch_update_")
    def _batch_update_fake(x, mask, normalize, strict, state_counts, state_mean, state_scatter):
        d = x.shape[1]
        return x.new_empty((d,), dtype=torch.float64), x.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("crh::batch_update_staged_")
    def _batch_update_staged_fake(x, scale, status, sum_, strict, state_counts, state_mean,
                                  state_scatter):
        d = x.shape[1]
        return x.new_empty((d,), dtype=torch.float64), x.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("crh::stage_rows_")
    def _stage_rows_fake(x, mask, normalize, buf, scale, status, sum_):
        return None

    @torch.library.register_fake("crh::matmul_rows")
    def _matmul_rows_fake(x, w):
        return x.new_empty((x.shape[0], w.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("crh::cross_stats")
    def _cross_stats_fake(g, h, mask, normalize):
        dg, dh = g.shape[1], h.shape[1]
        return (g.new_empty((dg,), dtype=torch.float64), g.new_empty((dh,), dtype=torch.float64),
                g.new_empty((dg, dh), dtype=torch.float32), g.new_empty((2,), dtype=torch.int64))


def cpu_extension():
    """The loaded CPU extension module, or None; loads it on first call."""
    return load_extension("cpu")[0]


class OpsBackend(Backend):
    """The required methods on the ``crh::`` ops, whose device dispatch picks the CPU or the
    CUDA kernels: the base of :class:`CppBackend` and of the ``cuda`` backend."""

    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def batch_stats(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                    fp32_precision: str = "ieee") -> BatchStats:
        mean, scatter, counts = torch.ops.crh.batch_stats(x, mask, bool(normalize))
        n, skipped = (int(v) for v in counts.tolist())
        return BatchStats(n, skipped, mean, scatter)

    def cross_stats(self, g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor],
                    normalize: bool, fp32_precision: str = "ieee") -> CrossStats:
        mean_g, mean_h, scatter, counts = torch.ops.crh.cross_stats(g, h, mask, bool(normalize))
        n, skipped = (int(v) for v in counts.tolist())
        return CrossStats(n, skipped, mean_g, mean_h, scatter)


class CppBackend(OpsBackend):
    """CPU tensors: blocked, OpenMP-parallel C++ kernels (AVX-512 inner kernel where the CPU
    has it, a portable one elsewhere); uses ``torch.get_num_threads()`` threads."""

    name = "cpp"
    fused_update = True
    row_staging = True
    row_matmul = True

    def update_state(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                     strict: bool, counts: torch.Tensor, mean: torch.Tensor,
                     scatter: torch.Tensor) -> Optional[FusedResult]:
        """Merge the batch into a CPU state (counts, mean and scatter) in one op call, the
        scatter in the kernel's last pass (no (D, D) batch scatter, no separate merge).
        Returns the batch's ``(n, n_skipped, mean)``, or None when the state is not one the
        kernel takes (then use :meth:`batch_stats`)."""
        if not self._takes_state(counts, mean, scatter):
            return None
        mean_b, counts_b = torch.ops.crh.batch_update_(x, mask, bool(normalize), bool(strict),
                                                       counts, mean, scatter)
        n, skipped = counts_b.tolist()
        return n, skipped, mean_b

    def stage_rows(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                   buf: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                   sum_: torch.Tensor) -> None:
        """Copy the rows of x into buf and do pass 1 of the update on the way (row status and
        scale, ``sum_ += Σ s_i x_i``; a tiny row's scale is encoded negative, docs/spec.md §1):
        :meth:`update_staged` finishes the staged rows later.
        CPU tensors only (the op checks every argument)."""
        torch.ops.crh.stage_rows_(x, mask, bool(normalize), buf, scale, status, sum_)

    def update_staged(self, x: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                      sum_: torch.Tensor, strict: bool, counts: torch.Tensor,
                      mean: torch.Tensor, scatter: torch.Tensor) -> Optional[FusedResult]:
        """:meth:`update_state` of rows that :meth:`stage_rows` staged (its status, scale and
        sum, which are read, never changed); None when the state is not one the kernel
        takes."""
        if not self._takes_state(counts, mean, scatter):
            return None
        mean_b, counts_b = torch.ops.crh.batch_update_staged_(x, scale, status, sum_,
                                                              bool(strict), counts, mean, scatter)
        n, skipped = counts_b.tolist()
        return n, skipped, mean_b

    @staticmethod
    def _takes_state(counts: torch.Tensor, mean: torch.Tensor, scatter: torch.Tensor) -> bool:
        return (scatter.device.type == "cpu" and scatter.dtype in (torch.float32, torch.float64)
                and scatter.is_contiguous() and mean.is_contiguous()
                and counts.dtype == torch.int64 and counts.device.type == "cpu")

    def matmul_rows(self, x: torch.Tensor, w: torch.Tensor) -> Optional[torch.Tensor]:
        """``x @ w`` (2-D float32 CPU tensors) through the covariance's inner kernels
        (``crh::matmul_rows``); None while the CPU extension is not loaded (by a cpp-backed
        Moments): it is never loaded or built here."""
        if not extension_loaded("cpu"):
            return None
        return torch.ops.crh.matmul_rows(x, w)

    def availability(self) -> Tuple[bool, str]:
        module, how = load_extension("cpu")
        if module is None:
            if _env.require_cpp():
                how += " (CRH_REQUIRE_CPP=1: this is an error, not a fallback)"
            return False, how
        return True, (f"C++ extension ({how}), {module.cpu_isa()} inner kernel, "
                      f"{torch.get_num_threads()} OpenMP threads")

    def supports(self, device) -> Tuple[bool, str]:
        if torch.device(device).type == "cpu":
            return True, ""
        return False, "the cpp backend handles CPU tensors (use 'cuda' or 'triton' on GPUs)"
