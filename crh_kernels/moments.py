"""Moments: the streaming, mergeable second-moment state of one stream (docs/spec.md §1).

Owns the state ``(n, μ, C)``, input validation, the exact Chan–Golub–LeVeque merge, the
derived views, and (de)serialisation. The batch statistics come from a backend
(:mod:`crh_kernels.backends`); nothing here knows how they are computed.

No host sync on the update path: the counts ``[n, n_skipped]`` are a tensor on the state's
device and the merge weights (n₁n₂/n, n₂/n) are device tensors, so :meth:`Moments.update`
reads nothing on the host unless ``strict=True`` (see its docstring for the skipped-row
warning). Reading ``n``, ``n_skipped`` or a view is where a CUDA state syncs.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import _env
from . import backends as _backends
from . import distributed as _distributed
from .backends.base import ROW_MASKED, MergedState, host_reads_free

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_input(x, dim: Optional[int], mask, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 on the torch "
                        f"backend), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., dim), got a 0-d tensor")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension {dim}, got shape {tuple(x.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x's leading dims), "
                             f"got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but {name} is on {x.device}")


def _rows(x: torch.Tensor, mask):
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    m2 = None if mask is None else mask.reshape(-1)
    return x2, m2


def _fp32_precision(value: Optional[str]) -> str:
    value = value or _env.fp32_precision()
    if value not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {value!r}")
    return value


def _counts(n: int, n_skipped: int, device=None) -> torch.Tensor:
    return torch.tensor([n, n_skipped], dtype=torch.int64, device=device)


def _batch_counts(n, n_skipped, device) -> torch.Tensor:
    """A batch's ``[n, n_skipped]`` (ints, or 0-d tensors from a sync-free backend) as a (2,)
    int64 tensor on ``device``, read on the host at no point."""
    if isinstance(n, torch.Tensor):
        return torch.stack((n, n_skipped)).to(device=device, dtype=torch.int64)
    return _counts(int(n), int(n_skipped), device)


def _device(device) -> torch.device:
    """``device`` with its index: "cuda" is the current CUDA device, as tensors made there say
    (``cuda:0``), so that the state's device compares equal to theirs."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


class _State:
    """One whole state of a :class:`Moments`: ``counts`` int64 (2,) = ``[n, n_skipped]``,
    ``mean`` (D,) and ``scatter`` (D, D) (None until allocated) and the ``device`` they live
    on. An allocated state keeps its counts on its device; an unallocated one has ``counts``
    None (no row seen) or a CPU tensor (skipped rows only).

    A Moments changes its state in one step that no exception can split: either a new _State
    is built aside (by Moments itself, or by a backend's aside fused update: Triton's epilogue
    writes new tensors) and stored with one attribute assignment, or (the fused CPU path) one
    compiled op writes counts, mean and scatter together. Nothing edits a live state field by
    field."""

    __slots__ = ("counts", "mean", "scatter", "device")

    def __init__(self, counts: torch.Tensor, mean: Optional[torch.Tensor],
                 scatter: Optional[torch.Tensor], device: Optional[torch.device]):
        self.counts = counts
        self.mean = mean
        self.scatter = scatter
        self.device = device



# Where this package and torch live: a warning about the user's rows names the first frame
# outside both (the user's call), as Python 3.12's warnings.warn(skip_file_prefixes=...) would;
# 3.10 and 3.11 lack that argument, so the stack level is counted here.
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _user_stacklevel(fallback: int) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names
    the first frame outside crh_kernels and torch: the user's ``m.update(x)``, ``model(x)``,
    ``loss.backward()``, ``col.step()`` or ``with col:`` rather than the collector's hooks or row
    stager. ``fallback`` when every frame is internal (autograd's worker threads)."""
    f, level = sys._getframe(1), 1
    while f is not None and f.f_code.co_filename.startswith(_INTERNAL_DIRS):
        f, level = f.f_back, level + 1
    return level if f is not None else fallback


class Moments:
    """Streaming covariance of (optionally normalized) rows.

    Args:
        dim: feature dimension D (> 0).
        normalize: scale each row to unit norm first (the paper's default).
        device: where the state lives; ``None`` adopts the device of the first update.
        backend: ``"torch"``, ``"triton"``, ``"cpp"``, ``"cuda"`` or ``None`` (choice rule of
            :mod:`crh_kernels.backends`).
        strict: raise on rows that would be skipped (zero norm, non-finite) instead of
            skipping them with a warning.
        dtype: dtype of the stored state (float64 default; float32 halves memory).
        fp32_precision: ``"ieee"`` or ``"tf32"`` for fp32 operands on GPUs.

    State: ``n`` rows counted, ``n_skipped`` rows skipped, ``mean`` (D,) and
    ``scatter`` ``C = Σ (x̂ − μ)(x̂ − μ)ᵀ`` (D, D), exactly symmetric. Masked rows count
    nowhere (vocabulary of :mod:`crh_kernels.backends.base`).

    Every state-changing call (:meth:`update`, :meth:`merge`, :meth:`reset`, :meth:`to`, the
    loads, the row stager's flush) is all or nothing: under any exception, a
    ``KeyboardInterrupt`` or a warning turned into an error included, the state is the one
    before the call or the one after it, never a mixture. Calls from several threads are
    serialised by a lock per Moments; :meth:`cov`, :meth:`second_moment`, :meth:`mean_ratio`
    and :meth:`state_dict` read a consistent state. ``mean`` and ``scatter`` are the live
    tensors (an update on the CPU may write into them in place).

    Host syncs: the counts live on the state's device, and :meth:`update` reads none of them
    on the host, except (a) with ``strict=True``, which reads the batch's skipped count before
    the commit (one sync per update on a GPU), and (b) on a CPU state in eager mode, where the
    read is free. So the skipped-row warning comes at once on the CPU (before the commit: a
    warning turned into an error leaves the state unchanged), while on a GPU, under
    ``torch.compile`` or on fake tensors the update commits and records that its skipped rows
    are unchecked; the next host read of the counts (``n``, ``n_skipped``, a view,
    :meth:`state_dict`, ``repr``, :meth:`merge`) warns then, once per Moments, with the number
    skipped since. ``torch.compile`` cannot trace a lock: a compiled update is not serialised
    with other threads' calls.
    """

    def __init__(self, dim: int, *, normalize: bool = True, device=None, backend: Optional[str] = None,
                 strict: bool = False, dtype: torch.dtype = torch.float64,
                 fp32_precision: Optional[str] = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype (the state's) must be torch.float32 or torch.float64, got {dtype}")
        if backend is not None and backend not in _backends.names():
            raise ValueError(f"backend must be one of {list(_backends.names())} or None, got {backend!r}")
        self.dim = dim
        self.normalize = bool(normalize)
        self.backend = backend
        self.strict = bool(strict)
        self.dtype = dtype
        self.fp32_precision = _fp32_precision(fp32_precision)
        self._warned = False
        # updates whose skipped rows no host read has seen yet (GPU / compiled / fake), and the
        # counts before the first of them (None: zero)
        self._unchecked = False
        self._unchecked_base: Optional[torch.Tensor] = None
        self._lock = threading.RLock()
        self._state = _State(None, None, None, None)
        if device is not None:
            self._state = self._zeros(_device(device), None)

    # ------------------------------------------------------------------ state
    def _zeros(self, device: torch.device, counts: Optional[torch.Tensor]) -> _State:
        """A new allocated state of zeros on ``device`` with a copy of ``counts`` there (None:
        zero counts, made on the device: no copy from the host)."""
        counts = (torch.zeros(2, dtype=torch.int64, device=device) if counts is None
                  else counts.to(device=device, copy=True))
        return _State(counts, torch.zeros(self.dim, dtype=self.dtype, device=device),
                      torch.zeros(self.dim, self.dim, dtype=self.dtype, device=device), device)

    def _guard(self):
        """The lock, except while torch.compile traces (it cannot trace a lock)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock

    def _host_counts(self, st: _State, stacklevel: int = 3):
        """``(n, n_skipped)`` of ``st`` as ints, read on the host (a sync for a GPU state);
        issues the skipped-row warning that unchecked updates deferred to this read."""
        n, k = (0, 0) if st.counts is None else st.counts.tolist()
        if self._unchecked:
            base = self._unchecked_base
            new = k - (0 if base is None else base.tolist()[1])
            if new > 0 and not self._warned:
                self._warn_skipped(new, stacklevel + 1, " in updates since the last read")
            self._unchecked, self._unchecked_base = False, None
        return n, k

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        state = dict(state)
        # pickled before the counts moved to the state's device (and had no deferred check)
        state.setdefault("_unchecked", False)
        state.setdefault("_unchecked_base", None)
        st = state.get("_state")
        if st is not None and st.mean is not None and st.counts.device != st.device:
            state["_state"] = _State(st.counts.to(st.device), st.mean, st.scatter, st.device)
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def n(self) -> int:
        """Rows counted (in the mean and the scatter). Read on the host: a GPU state syncs."""
        return self._host_counts(self._state)[0]

    @property
    def n_skipped(self) -> int:
        """Rows skipped (zero norm when normalizing, or non-finite); masked rows count nowhere.
        Read on the host: a GPU state syncs."""
        return self._host_counts(self._state)[1]

    @property
    def device(self) -> Optional[torch.device]:
        return self._state.device

    @property
    def mean(self) -> torch.Tensor:
        """(dim,) mean of the counted rows (zeros before any row)."""
        mean = self._state.mean
        if mean is None:
            return torch.zeros(self.dim, dtype=self.dtype)
        return mean

    @property
    def scatter(self) -> torch.Tensor:
        """(dim, dim) centered scatter C = Σ (x̂ − μ)(x̂ − μ)ᵀ, exactly symmetric."""
        scatter = self._state.scatter
        if scatter is None:
            return torch.zeros(self.dim, self.dim, dtype=self.dtype)
        return scatter

    def backend_for(self, x: torch.Tensor) -> _backends.Backend:
        """Internal: for the row stager in :mod:`crh_kernels.collect.staging`. The backend that
        :meth:`update` uses for rows like ``x`` (its device and dtype), by the choice rule of
        :mod:`crh_kernels.backends`; raises as :meth:`update` would when none can."""
        return _backends.resolve(self.backend, x.device, x.dtype)

    def _check_device(self, x: torch.Tensor, name: str = "x") -> None:
        device = self._state.device
        if device is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but this Moments lives on {device}; "
                             f"move {name} there (or create the Moments with device={x.device})")

    # ----------------------------------------------------------------- update
    def update(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "Moments":
        """Add the rows of ``x`` (shape ``(..., dim)``); ``mask`` (bool, ``x.shape[:-1]``)
        drops rows (padding) so that they count nowhere. Returns ``self``.

        All or nothing: a failed call (bad input, strict violation, the skipped-row warning
        raised as an error, backend error, KeyboardInterrupt) leaves the state as it was.

        No host sync unless ``strict=True`` (one per update, to refuse before the commit):
        on a GPU, under ``torch.compile`` or on fake tensors the skipped-row warning is
        deferred to the next host read of the counts (see the class docstring).
        """
        _check_input(x, self.dim, mask)
        self._check_device(x)
        x2, m2 = _rows(x.detach(), mask)
        if x2.shape[0] == 0:
            return self
        backend = self.backend_for(x)
        if backend.fused_update:
            kw = {"fp32_precision": self.fp32_precision} if backend.fused_precision else {}
            with self._guard():
                self._check_device(x)
                if self._update_fused(
                        x.device, 4, lambda refuse, c, m, s: backend.update_state(
                            x2, m2, self.normalize, refuse, c, m, s, **kw)):
                    return self
        stats = backend.batch_stats(x2, m2, self.normalize, self.fp32_precision)
        with self._guard():
            self._check_device(x)
            st = self._state
            counts_b = _batch_counts(stats.n, stats.n_skipped, x.device)
            new = self._merged(st, counts_b, stats.mean, stats.scatter, x.device, owned=True)
            self._check_skipped(counts_b, st, 3)
            self._state = new  # the commit
        return self

    def update_staged(self, x: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                      sum_: torch.Tensor) -> "Moments":
        """Internal: for the row stager in :mod:`crh_kernels.collect.staging`.

        The end of :meth:`update` for rows ``x`` (R, D) that the backend of
        :meth:`backend_for` staged with ``stage_rows`` (capability ``row_staging``): their
        ``status`` uint8 (R,), ``scale`` fp32 (R,) (negative for a tiny row, docs/spec.md §1)
        and ``sum_`` = Σ scale_i·x_i float64 (D,) (all read, never changed). Same state, errors, warnings and all-or-nothing as
        ``update(x, status != ROW_MASKED)``. Returns ``self``."""
        self._check_device(x)
        backend = self.backend_for(x)
        with self._lock:
            self._check_device(x)
            if self._update_fused(
                    x.device, 4, lambda refuse, c, m, s: backend.update_staged(
                        x, scale, status, sum_, refuse, c, m, s)):
                return self
            # a state the kernel does not take: the plain path
            return self.update(x, status != ROW_MASKED)

    def _update_fused(self, device, stacklevel: int, run) -> bool:
        """The fused update under the lock: ``run(refuse, counts, mean, scatter)`` calls the
        backend's op. Built aside (a :class:`MergedState`): the skipped rows are checked, then
        the new state is installed (the commit). In place: the op writes the whole state in
        one step (the commit), or nothing when ``refuse`` and a row is skipped; a batch with
        skipped rows is first offered with ``refuse`` so that the warning (which may raise)
        comes before the commit. An unallocated state is allocated aside and stored once the
        op has written it. False when the backend does not take the state (nothing has
        changed then)."""
        st = self._state
        fresh = st.mean is None
        if fresh:
            st = self._zeros(device, st.counts)
        refuse = self.strict or not self._warned
        res = run(refuse, st.counts, st.mean, st.scatter)
        if res is None:
            return False
        if isinstance(res, MergedState):
            self._check_skipped(res.batch_counts, st, stacklevel + 1)
            self._state = _State(res.counts, res.mean, res.scatter, st.device)  # the commit
            return True
        skipped = res[1]
        if refuse and skipped:
            self._note_skipped(skipped, stacklevel)  # raises when strict (nothing written)
            run(False, st.counts, st.mean, st.scatter)  # the commit
        if fresh:
            self._state = st
        return True

    def _check_skipped(self, counts_b: torch.Tensor, before: _State, stacklevel: int) -> None:
        """Before the commit of a batch whose ``[n_b, n_skipped_b]`` is the device tensor
        ``counts_b``, onto the state ``before``: strict, or on a CPU state in eager mode, the
        skipped count is read now (:meth:`_note_skipped`; strict on a GPU: the update's one
        host sync); elsewhere the batch is recorded as unchecked, for the next host read."""
        if self.strict or (not self._warned and host_reads_free(counts_b)):
            self._note_skipped(counts_b.select(0, 1).item(), stacklevel + 1)
        elif not self._warned and not self._unchecked:
            self._unchecked_base = before.counts
            self._unchecked = True

    def _note_skipped(self, k: int, stacklevel: int) -> None:
        """Before a commit that counts ``k`` skipped rows: raises when strict, else warns the
        first time (the warning may raise too; the state is unchanged then)."""
        if k == 0:
            return
        if self.strict:
            raise ValueError(f"x has {k} {self._what()} row(s); strict=True refuses them (state "
                             f"unchanged)")
        if not self._warned:
            self._warn_skipped(k, stacklevel + 1, "")

    def _what(self) -> str:
        return "zero-norm or non-finite" if self.normalize else "non-finite"

    def _warn_skipped(self, k: int, stacklevel: int, since: str) -> None:
        warnings.warn(f"Moments(dim={self.dim}): skipped {k} {self._what()} row(s){since}; they "
                      f"are counted in n_skipped (further occurrences are not reported)",
                      RuntimeWarning, stacklevel=_user_stacklevel(stacklevel + 1))
        self._warned = True

    def _merged(self, st: _State, counts_b: torch.Tensor, mean2: torch.Tensor,
                c2: torch.Tensor, device, owned: bool) -> _State:
        """The state ``st`` merged with the batch ``(counts_b, μ2, C2)``, built aside (``st`` is
        not changed), with tensor arithmetic only (no count is read on the host).
        Chan–Golub–LeVeque: n = n1+n2, δ = μ2−μ1, μ = μ1 + δ·n2/n, C = C1 + C2 + δδᵀ·n1·n2/n,
        the weights float64 device tensors; a state with n1 = 0 contributes nothing (μ = μ2,
        C = C2) and a batch with n2 = 0 (zero μ2, C2) leaves μ1 and C1 as they were.
        ``owned``: C2 and μ2 are the caller's to reuse (a batch's fresh statistics), else they
        are copied. An unallocated ``st`` takes the batch as it is, on ``device``."""
        dev = st.device if st.mean is not None else torch.device(device)
        counts_b = counts_b.to(dev)
        if st.mean is None:
            # a copy: they may be another Moments' (merge), and the C++ CPU path writes a
            # state's counts in place
            counts = (counts_b.clone() if st.counts is None
                      else counts_b + st.counts.to(dev))
            mean = mean2.to(device=dev, dtype=self.dtype, copy=not owned)
            scatter = c2.to(device=dev, dtype=self.dtype, copy=not owned).contiguous()
            return _State(counts, mean, scatter, dev)
        counts = st.counts + counts_b
        # select(), not [i]: indexing fake CUDA tensors fails on a CPU build of torch
        n1, n2 = st.counts.select(0, 0).double(), counts_b.select(0, 0).double()
        n = (n1 + n2).clamp_min(1.0)
        # 0 or 1 (multiplying by it is exact): the old μ1, C1 count unless the state has no
        # row and the batch has some
        keep = ((n1 > 0) | (n2 == 0)).to(self.dtype)
        mean1 = st.mean * keep
        delta = mean2.to(device=dev, dtype=self.dtype) - mean1
        mean = torch.addcmul(mean1, delta, (n2 / n).to(self.dtype))
        c2 = c2.to(device=dev)
        if owned and c2.dtype == self.dtype and c2.is_contiguous():
            scatter = c2.addcmul_(st.scatter, keep)  # the batch's own buffer takes the sum
        else:
            scatter = torch.addcmul(c2, st.scatter, keep).to(self.dtype)
        # outer() times the weight, then add: entry (i, j) and (j, i) round alike, so C stays
        # exactly symmetric (BLAS ger, or an fma in one of them, would not)
        scatter.add_(torch.outer(delta, delta).mul_((n1 * n2 / n).to(self.dtype)))
        return _State(counts, mean, scatter, dev)

    def merge(self, other: "Moments") -> "Moments":
        """Merge ``other`` into ``self`` (exact up to rounding; all or nothing). Returns
        ``self``. Reads ``other``'s counts on the host (a GPU state syncs once), so that an
        empty state stays unallocated."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has dim {other.dim}, expected {self.dim}")
        if other.normalize != self.normalize:
            raise ValueError(f"other has normalize={other.normalize}, expected {self.normalize}")
        if other is self:
            raise ValueError("cannot merge a Moments into itself")
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._lock, second._lock:  # one order for every pair: no deadlock
            ost = other._state
            n2, k2 = other._host_counts(ost)
            if n2 == 0 and k2 == 0:
                return self
            st = self._state
            if n2 == 0:  # skipped rows only: the counts change, nothing is allocated
                n1, k1 = self._host_counts(st)
                dev = st.device if st.mean is not None else None
                self._state = _State(_counts(n1, k1 + k2, dev), st.mean, st.scatter, st.device)
                return self
            self._state = self._merged(st, ost.counts, ost.mean, ost.scatter, ost.device,
                                       owned=False)
        return self

    def reset(self) -> "Moments":
        """Forget every row (n = n_skipped = 0); an allocated state stays allocated, as zeros."""
        with self._lock:
            st = self._state
            if st.mean is None:
                self._state = _State(None, None, None, st.device)
            else:
                self._state = _State(torch.zeros_like(st.counts), torch.zeros_like(st.mean),
                                     torch.zeros_like(st.scatter), st.device)
            self._unchecked, self._unchecked_base = False, None
        return self

    def to(self, device) -> "Moments":
        """Move the state to ``device`` (in place). Returns ``self``."""
        device = _device(device)
        with self._lock:
            st = self._state
            if st.mean is None:
                self._state = _State(st.counts, None, None, device)
            else:
                self._state = _State(st.counts.to(device), st.mean.to(device),
                                     st.scatter.to(device), device)
        return self

    def all_reduce(self, group=None, *, timeout=None) -> "Moments":
        """Exact merge of this state across the ranks of ``group`` (torch.distributed), in place:
        every rank ends with the state over all ranks' rows. ``timeout`` (seconds or a
        ``datetime.timedelta``; ``None``: the group's own) bounds every collective's wait, so a
        rank that fails mid-call makes the others raise instead of hanging. All or nothing. See
        :mod:`crh_kernels.distributed`."""
        _distributed.all_reduce_moments([self], group=group, timeout=timeout)
        return self

    # ------------------------------------------------------------------ views
    def _need_rows(self, st: _State, what: str) -> int:
        n, k = self._host_counts(st, 4)
        if n == 0:
            raise ValueError(f"{what} is undefined: no rows counted yet (n=0, n_skipped={k})")
        return n

    def cov(self) -> torch.Tensor:
        """C / n: the covariance (population normalisation)."""
        with self._lock:
            st = self._state
            return st.scatter / self._need_rows(st, "cov()")

    def second_moment(self) -> torch.Tensor:
        """C / n + μμᵀ = E[x̂x̂ᵀ]."""
        with self._lock:
            st = self._state
            n = self._need_rows(st, "second_moment()")
            return st.scatter / n + torch.outer(st.mean, st.mean)

    def mean_ratio(self) -> float:
        """r = ||μ||² / trace(second moment) (the paper's r_h, r_g)."""
        with self._lock:
            st = self._state
            n = self._need_rows(st, "mean_ratio()")
            m2 = float(st.mean.double().square().sum())
            tr = float(torch.diagonal(st.scatter).double().sum()) / n + m2
        if tr == 0.0:
            return float("nan")
        return m2 / tr

    def nbytes(self) -> int:
        """Bytes the state occupies (mean + full scatter)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return item * (self.dim + self.dim * self.dim)

    # -------------------------------------------------------- serialisation
    def state_dict(self) -> dict:
        """Plain dict; the scatter is stored as its packed upper triangle (row-major)."""
        with self._lock:
            st = self._state
            n, k = self._host_counts(st)
            mean, scatter = self.mean, self.scatter
            return {
                "dim": self.dim, "normalize": self.normalize, "n": n, "n_skipped": k,
                "dtype": str(self.dtype).replace("torch.", ""),
                "mean": mean.detach().clone(),
                "scatter_triu": scatter[_distributed._triu_mask(self.dim, scatter.device, {})].detach(),
            }

    @classmethod
    def from_state_dict(cls, sd: dict, *, device=None, backend: Optional[str] = None) -> "Moments":
        """The Moments a :meth:`state_dict` describes. Everything is checked before anything
        is allocated: the keys, ``dim`` (a positive int), ``normalize`` (a bool), ``dtype``
        ("float32" or "float64"), ``n`` and ``n_skipped`` (ints >= 0), ``mean`` and
        ``scatter_triu`` (float32/float64 tensors of shapes (dim,) and (dim·(dim+1)/2,),
        finite; zero when n = 0). A bad one raises a one-line error naming the field: KeyError
        for a missing key, TypeError for a wrong type (a tensor, a bool), ValueError for a bad
        value (an int field that is not a nonnegative int, a shape, a non-finite entry)."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"state dict must be a dict, got {type(sd).__name__}")
        required = ("dim", "normalize", "n", "n_skipped", "mean", "scatter_triu")
        missing = [k for k in required if k not in sd]
        if missing:
            raise KeyError(f"state dict lacks {missing}")
        dim = sd["dim"]
        if not _is_int(dim) or dim <= 0:  # ValueError, as Moments(dim=2.5) gives
            raise ValueError(f"state dict field 'dim' must be an int > 0, got "
                             f"{type(dim).__name__} {dim!r}")
        dim = int(dim)
        normalize = sd["normalize"]
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"state dict field 'normalize' must be a bool, got "
                            f"{type(normalize).__name__} {normalize!r}")
        dtype_name = sd.get("dtype", "float64")
        if dtype_name not in ("float32", "float64"):
            raise ValueError(f"state dict field 'dtype' must be 'float32' or 'float64', got "
                             f"{dtype_name!r}")
        if backend is not None and backend not in _backends.names():
            raise ValueError(f"backend must be one of {list(_backends.names())} or None, "
                             f"got {backend!r}")
        n, k = _check_counts(sd["n"], sd["n_skipped"], "state dict field ")
        mean, packed = sd["mean"], sd["scatter_triu"]
        _check_packed(dim, n, mean, packed, "state dict field ")
        dev = _device(device) if device is not None else mean.device
        m = cls(dim, normalize=bool(normalize), backend=backend, dtype=getattr(torch, dtype_name))
        m._state = m._from_packed(_counts(n, k), mean, packed, dev)
        return m

    def _from_packed(self, counts: Optional[torch.Tensor], mean: torch.Tensor,
                     packed: torch.Tensor, device: torch.device) -> _State:
        """A new state (counts, μ, C) from checked values, all on ``device``: C from its packed
        upper triangle, mirrored exactly; the counts (None: zero), μ and C copied (never shared
        with the caller's tensors)."""
        c = torch.empty(self.dim, self.dim, dtype=self.dtype, device=device)
        mask = _distributed._triu_mask(self.dim, device, {})
        p = packed.detach().to(device=device, dtype=self.dtype)
        c[mask] = p
        c.T[mask] = p  # the same values, read column-wise: the lower triangle
        counts = (torch.zeros(2, dtype=torch.int64, device=device) if counts is None
                  else counts.to(device=device, copy=True))
        return _State(counts, mean.detach().to(device=device, dtype=self.dtype, copy=True),
                      c, device)

    def load_packed(self, mean: torch.Tensor, packed: torch.Tensor) -> None:
        """Set μ and C from a mean (dim,) and a packed upper triangle (dim·(dim+1)/2,), row-major
        (the order of state dicts); the counts stay. All or nothing; checked first."""
        with self._lock:
            st = self._state
            _check_packed(self.dim, None, mean, packed, "")
            dev = st.device if st.mean is not None else mean.device
            self._state = self._from_packed(st.counts, mean, packed, dev)

    def replace_state(self, n: int, n_skipped: int, mean: Optional[torch.Tensor] = None,
                      packed: Optional[torch.Tensor] = None) -> None:
        """Internal: for :mod:`crh_kernels.distributed`. Replace the whole state in one step
        (checked first, then all or nothing): ``n`` rows and ``n_skipped`` (ints >= 0) with the
        mean (dim,) and the packed upper triangle of the scatter (dim·(dim+1)/2,), row-major;
        with ``n = 0`` pass no tensors: the state becomes zeros (an unallocated one stays
        unallocated). An unallocated state is allocated on ``mean``'s device, an allocated one
        keeps its device and dtype."""
        n, n_skipped = _check_counts(n, n_skipped, "")
        if n == 0:
            if mean is not None or packed is not None:
                raise ValueError("replace_state: with n=0 pass no mean and no packed scatter")
            with self._lock:
                st = self._state
                counts = _counts(0, n_skipped)
                self._state = (_State(counts, None, None, st.device) if st.mean is None
                               else self._zeros(st.device, counts))
            return
        if mean is None or packed is None:
            raise ValueError(f"replace_state: n={n} needs a mean and a packed scatter")
        _check_packed(self.dim, None, mean, packed, "")
        with self._lock:
            st = self._state
            dev = st.device if st.mean is not None else mean.device
            self._state = self._from_packed(_counts(n, n_skipped), mean, packed, dev)

    def __repr__(self) -> str:
        n, k = self._host_counts(self._state)
        return (f"Moments(dim={self.dim}, n={n}, n_skipped={k}, "
                f"normalize={self.normalize}, device={self.device}, backend={self.backend})")


def _check_counts(n, n_skipped, prefix: str):
    """``(n, n_skipped)`` as Python ints, after checking they are ints >= 0 (not bools, not
    floats: ValueError, as for ``dim``)."""
    for name, v in (("n", n), ("n_skipped", n_skipped)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{prefix}{name!r} must be an int >= 0, got {type(v).__name__} {v!r}")
    return int(n), int(n_skipped)


def _check_packed(dim: int, n: Optional[int], mean, packed, prefix: str) -> None:
    """Types, shapes (before anything of size dim² exists), finiteness, and zeros when n = 0."""
    for name, t, shape in (("mean", mean, (dim,)), ("scatter_triu", packed, (_distributed._tri(dim),))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{prefix}{name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{prefix}{name!r} must be float32 or float64, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{prefix}{name!r} must have shape {shape} for dim={dim}, got "
                             f"{tuple(t.shape)}")
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{prefix}{name!r} has non-finite entries")
        if n == 0 and t.device.type != "meta" and bool(t.any()):
            raise ValueError(f"{prefix}{name!r} must be zeros when n=0 (no row counted)")


def moments(x: torch.Tensor, *, normalize: bool = True, mask: Optional[torch.Tensor] = None,
            backend: Optional[str] = None, **kwargs) -> Moments:
    """One-shot :class:`Moments` of the rows of ``x`` (shape ``(..., D)``)."""
    _check_input(x, None, mask)
    return Moments(x.shape[-1], normalize=normalize, device=x.device, backend=backend,
                   **kwargs).update(x, mask)


class CrossMoments(NamedTuple):
    n: int
    mean_g: torch.Tensor
    mean_h: torch.Tensor
    C_gh: torch.Tensor


def cross_moments(g: torch.Tensor, h: torch.Tensor, *, normalize: bool = True,
                  mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                  fp32_precision: Optional[str] = None) -> CrossMoments:
    """``(n, mean_g, mean_h, C_gh)`` with ``C_gh = Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ`` (not symmetric);
    ``n`` is an int (a GPU batch syncs once to return it).

    ``g`` is ``(..., Dg)`` and ``h`` ``(..., Dh)`` with the same leading dims; a row counts
    only when both ``g`` and ``h`` rows are valid (and the mask keeps it).
    """
    _check_input(g, None, mask, "g")
    _check_input(h, None, None, "h")
    if tuple(g.shape[:-1]) != tuple(h.shape[:-1]):
        raise ValueError(f"g and h must share leading dims, got {tuple(g.shape)} and {tuple(h.shape)}")
    if g.device != h.device:
        raise ValueError(f"g is on {g.device} but h is on {h.device}")
    if g.dtype != h.dtype:
        raise TypeError(f"g and h must share a dtype, got {g.dtype} and {h.dtype}")
    g2, m2 = _rows(g, mask)
    h2, _ = _rows(h, None)
    be = _backends.resolve(backend, g.device, g.dtype)
    if g2.shape[0] == 0:
        dg, dh, dev = g.shape[-1], h.shape[-1], g.device
        return CrossMoments(0, torch.zeros(dg, dtype=torch.float64, device=dev),
                            torch.zeros(dh, dtype=torch.float64, device=dev), torch.zeros(dg, dh, device=dev))
    st = be.cross_stats(g2, h2, m2, normalize, _fp32_precision(fp32_precision))
    return CrossMoments(int(st.n), st.mean_g, st.mean_h, st.scatter)  # n: the caller's, on the host
