"""Moments: the streaming, mergeable second-moment state of one stream (SPEC §1).

Owns the state ``(n, μ, C)``, input validation, the exact Chan–Golub–LeVeque merge, the
derived views, and (de)serialisation. The batch statistics come from a backend
(:mod:`crh_kernels.backends`); nothing here knows how they are computed.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from . import _env
from . import backends as _backends
from . import distributed as _distributed
from .backends.base import ROW_MASKED

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
        self.n = 0
        self.n_skipped = 0
        self._warned = False
        self._mean: Optional[torch.Tensor] = None
        self._scatter: Optional[torch.Tensor] = None
        self._device = None if device is None else torch.device(device)
        if self._device is not None:
            self._allocate(self._device)

    # ------------------------------------------------------------------ state
    def _allocate(self, device):
        self._device = torch.device(device)
        self._mean = torch.zeros(self.dim, dtype=self.dtype, device=self._device)
        self._scatter = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self._device)

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    @property
    def mean(self) -> torch.Tensor:
        """(dim,) mean of the counted rows (zeros before any row)."""
        if self._mean is None:
            return torch.zeros(self.dim, dtype=self.dtype)
        return self._mean

    @property
    def scatter(self) -> torch.Tensor:
        """(dim, dim) centered scatter C = Σ (x̂ − μ)(x̂ − μ)ᵀ, exactly symmetric."""
        if self._scatter is None:
            return torch.zeros(self.dim, self.dim, dtype=self.dtype)
        return self._scatter

    def backend_for(self, x: torch.Tensor) -> _backends.Backend:
        """Internal: for the row stager in :mod:`crh_kernels.collect.staging`. The backend that
        :meth:`update` uses for rows like ``x`` (its device and dtype), by the choice rule of
        :mod:`crh_kernels.backends`; raises as :meth:`update` would when none can."""
        return _backends.resolve(self.backend, x.device, x.dtype)

    def _check_device(self, x: torch.Tensor, name: str = "x") -> None:
        if self._device is not None and x.device != self._device:
            raise ValueError(f"{name} is on {x.device} but this Moments lives on {self._device}; "
                             f"move {name} there (or create the Moments with device={x.device})")

    # ----------------------------------------------------------------- update
    def update(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "Moments":
        """Add the rows of ``x`` (shape ``(..., dim)``); ``mask`` (bool, ``x.shape[:-1]``)
        drops rows (padding) so that they count nowhere. Returns ``self``.

        A failed call (bad input, strict violation, backend error) leaves the state as it was.
        """
        _check_input(x, self.dim, mask)
        self._check_device(x)
        x2, m2 = _rows(x.detach(), mask)
        if x2.shape[0] == 0:
            return self
        backend = self.backend_for(x)
        if self._device is not None and backend.fused_update:
            with torch.no_grad():
                fused = backend.update_state(x2, m2, self.normalize, self.strict, self.n,
                                             self._mean, self._scatter)
            if fused is not None:
                # the kernel has merged the batch into the scatter (or, with strict and a
                # skipped row, left it untouched: _absorb_skipped raises then)
                n2, skipped, mean2 = fused
                self._absorb_skipped(skipped)
                with torch.no_grad():
                    self._merge_mean(n2, mean2)
                return self
        with torch.no_grad():
            stats = backend.batch_stats(x2, m2, self.normalize, self.fp32_precision)
        self._absorb_skipped(stats.n_skipped)
        if self._device is None:
            self._allocate(x.device)
        with torch.no_grad():
            self._merge_stats(stats.n, stats.mean, stats.scatter)
        return self

    def update_staged(self, x: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                      sum_: torch.Tensor) -> "Moments":
        """Internal: for the row stager in :mod:`crh_kernels.collect.staging`.

        The end of :meth:`update` for rows ``x`` (R, D) that the backend of
        :meth:`backend_for` staged with ``stage_rows`` (capability ``row_staging``): their
        ``status`` uint8 (R,), ``scale`` fp32 (R,) and ``sum_`` = Σ scale_i·x_i float64 (D,).
        Same state, errors and warnings as ``update(x, status != ROW_MASKED)``. Returns
        ``self``."""
        self._check_device(x)
        backend = self.backend_for(x)
        if self._device is None:
            self._allocate(x.device)
        with torch.no_grad():
            fused = backend.update_staged(x, scale, status, sum_, self.strict, self.n, self._mean,
                                          self._scatter)
        if fused is None:  # a state the kernel does not take: the plain path
            return self.update(x, status != ROW_MASKED)
        n2, skipped, mean2 = fused
        self._absorb_skipped(skipped)
        with torch.no_grad():
            self._merge_mean(n2, mean2)
        return self

    def _absorb_skipped(self, k: int) -> None:
        if k == 0:
            return
        what = "zero-norm or non-finite" if self.normalize else "non-finite"
        if self.strict:
            raise ValueError(f"x has {k} {what} row(s); strict=True refuses them (state unchanged)")
        self.n_skipped += k
        if not self._warned:
            self._warned = True
            warnings.warn(f"Moments(dim={self.dim}): skipped {k} {what} row(s); they are counted "
                          f"in n_skipped (further occurrences are not reported)", RuntimeWarning,
                          stacklevel=3)

    def _merge_stats(self, n2: int, mean2: torch.Tensor, c2: torch.Tensor) -> None:
        """Chan–Golub–LeVeque: n = n1+n2, δ = μ2−μ1, μ = μ1 + δ·n2/n, C = C1 + C2 + δδᵀ·n1·n2/n."""
        if n2 == 0:
            return
        n1 = self.n
        if n1 == 0:
            self._scatter.copy_(c2)
        else:
            delta = mean2.to(device=self._device, dtype=self.dtype) - self._mean
            # in place and mixed-dtype: no D×D copy of the batch scatter
            self._scatter.add_(c2.to(self._device))
            # outer() then add, not addr_: BLAS ger is not bitwise symmetric, and C must be
            self._scatter.add_(torch.outer(delta, delta), alpha=n1 * n2 / (n1 + n2))
        self._merge_mean(n2, mean2)

    def _merge_mean(self, n2: int, mean2: torch.Tensor) -> None:
        """μ = μ1 + (μ2 − μ1)·n2/n and n = n1 + n2 (the scatter has been merged already)."""
        if n2 == 0:
            return
        mean2 = mean2.to(device=self._device, dtype=self.dtype)
        n = self.n + n2
        if self.n == 0:
            self._mean.copy_(mean2)
        else:
            self._mean.add_(mean2 - self._mean, alpha=n2 / n)
        self.n = n

    def merge(self, other: "Moments") -> "Moments":
        """Merge ``other`` into ``self`` in place (exact up to rounding). Returns ``self``."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has dim {other.dim}, expected {self.dim}")
        if other.normalize != self.normalize:
            raise ValueError(f"other has normalize={other.normalize}, expected {self.normalize}")
        if other is self:
            raise ValueError("cannot merge a Moments into itself")
        if other.n and self._device is None:
            self._allocate(other._device)
        self.n_skipped += other.n_skipped
        if other.n:
            with torch.no_grad():
                self._merge_stats(other.n, other._mean, other._scatter)
        return self

    def reset(self) -> "Moments":
        self.n = 0
        self.n_skipped = 0
        if self._mean is not None:
            self._mean.zero_()
            self._scatter.zero_()
        return self

    def to(self, device) -> "Moments":
        """Move the state to ``device`` (in place). Returns ``self``."""
        device = torch.device(device)
        if self._mean is not None:
            self._mean = self._mean.to(device)
            self._scatter = self._scatter.to(device)
        self._device = device
        return self

    def all_reduce(self, group=None) -> "Moments":
        """Exact merge of this state across the ranks of ``group`` (torch.distributed), in place:
        every rank ends with the state over all ranks' rows. See :mod:`crh_kernels.distributed`."""
        _distributed.all_reduce_moments([self], group=group)
        return self

    # ------------------------------------------------------------------ views
    def _need_rows(self, what: str) -> None:
        if self.n == 0:
            raise ValueError(f"{what} is undefined: no rows counted yet (n=0, n_skipped={self.n_skipped})")

    def cov(self) -> torch.Tensor:
        """C / n: the covariance (population normalisation)."""
        self._need_rows("cov()")
        return self._scatter / self.n

    def second_moment(self) -> torch.Tensor:
        """C / n + μμᵀ = E[x̂x̂ᵀ]."""
        self._need_rows("second_moment()")
        return self._scatter / self.n + torch.outer(self._mean, self._mean)

    def mean_ratio(self) -> float:
        """r = ||μ||² / trace(second moment) (the paper's r_h, r_g)."""
        self._need_rows("mean_ratio()")
        m2 = float(self._mean.double().square().sum())
        tr = float(torch.diagonal(self._scatter).double().sum()) / self.n + m2
        if tr == 0.0:
            return float("nan")
        return m2 / tr

    def nbytes(self) -> int:
        """Bytes the state occupies (mean + full scatter)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return item * (self.dim + self.dim * self.dim)

    # -------------------------------------------------------- serialisation
    def state_dict(self) -> dict:
        """Plain dict; the scatter is stored as its packed upper triangle."""
        iu = torch.triu_indices(self.dim, self.dim, device=self.scatter.device)
        return {
            "dim": self.dim, "normalize": self.normalize, "n": self.n, "n_skipped": self.n_skipped,
            "dtype": str(self.dtype).replace("torch.", ""),
            "mean": self.mean.detach().clone(),
            "scatter_triu": self.scatter[iu[0], iu[1]].detach().clone(),
        }

    @classmethod
    def from_state_dict(cls, sd: dict, *, device=None, backend: Optional[str] = None) -> "Moments":
        required = ("dim", "normalize", "n", "n_skipped", "mean", "scatter_triu")
        missing = [k for k in required if k not in sd]
        if missing:
            raise KeyError(f"state dict lacks {missing}")
        dim = int(sd["dim"])
        dtype = getattr(torch, sd.get("dtype", "float64"))
        mean = sd["mean"]
        dev = device if device is not None else mean.device
        m = cls(dim, normalize=bool(sd["normalize"]), device=dev, backend=backend, dtype=dtype)
        packed = sd["scatter_triu"]
        if tuple(mean.shape) != (dim,) or tuple(packed.shape) != (dim * (dim + 1) // 2,):
            raise ValueError(f"state dict shapes do not match dim={dim}: mean {tuple(mean.shape)}, "
                             f"scatter_triu {tuple(packed.shape)}")
        m.n = int(sd["n"])
        m.n_skipped = int(sd["n_skipped"])
        m.load_packed(mean, packed)
        return m

    def load_packed(self, mean: torch.Tensor, packed: torch.Tensor) -> None:
        """Set μ and C from a mean and a packed upper triangle (used by state dicts and ranks)."""
        if self._device is None:
            self._allocate(mean.device)
        iu = torch.triu_indices(self.dim, self.dim, device=self._device)
        c = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self._device)
        c[iu[0], iu[1]] = packed.to(device=self._device, dtype=self.dtype)
        c[iu[1], iu[0]] = packed.to(device=self._device, dtype=self.dtype)
        self._scatter = c
        self._mean = mean.to(device=self._device, dtype=self.dtype).clone()

    def __repr__(self) -> str:
        return (f"Moments(dim={self.dim}, n={self.n}, n_skipped={self.n_skipped}, "
                f"normalize={self.normalize}, device={self._device}, backend={self.backend})")


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
    """``(n, mean_g, mean_h, C_gh)`` with ``C_gh = Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ`` (not symmetric).

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
    return CrossMoments(st.n, st.mean_g, st.mean_h, st.scatter)
