"""The backend protocol: what every backend computes, and what some may offer besides (docs/spec.md §2).

A backend never owns the running state. Its required methods receive a 2-D view ``x`` of
shape (N, D) (any strides) and an optional boolean row mask of shape (N,), and return the
batch's ``(n_b, n_skipped, μ_b, C_b)``; :class:`crh_kernels.Moments` merges that into the
state.

Row vocabulary, identical on every backend (Triton, C++, CUDA, torch):
  * a row is **masked** when ``mask[i]`` is False: it counts nowhere, not even in
    ``n_skipped``;
  * otherwise it is **skipped** (counted in ``n_skipped`` only) when an entry is not finite
    or, with ``normalize=True``, it is the zero row (every finite nonzero row counts);
  * every other row is **valid**: ``x̂ = x/||x||`` (or ``x`` when ``normalize=False``).

Where a kernel stores the outcome per row it is a uint8 ``status`` with the encoding
:data:`ROW_MASKED` = 0, :data:`ROW_SKIPPED` = 1, :data:`ROW_VALID` = 2 (the same numbers in
``csrc/`` and in the Triton kernel ``row_stats``).

Required methods (every backend): :meth:`Backend.availability`, :meth:`Backend.supports`,
:meth:`Backend.batch_stats`, :meth:`Backend.cross_stats`. ``mean`` is float64 (D,),
``scatter`` (D, D) exactly symmetric, ``Σ_valid (x̂ − μ_b)(x̂ − μ_b)ᵀ`` in fp32 or better.
With no valid row, ``mean`` and ``scatter`` are zeros. ``n`` and ``n_skipped`` are ints or
0-d int64 tensors on the batch's device: a GPU backend returns tensors, so that nothing on
the update path reads a count on the host (no host sync); :class:`crh_kernels.Moments` keeps
its counts on the state's device and merges them with tensor arithmetic.

Optional capabilities: a class flag says whether the backend offers them; the base methods
raise ``NotImplementedError`` naming the backend and the capability. Callers test the flag,
never the presence of a method.

  ============  ==========================================  ===================================
  flag          methods                                     used by
  ============  ==========================================  ===================================
  fused_update  :meth:`Backend.update_state`                ``Moments.update``
  row_staging   :meth:`Backend.stage_rows`,                 the row stager
                :meth:`Backend.update_staged`               (:mod:`crh_kernels.collect.staging`)
  row_matmul    :meth:`Backend.matmul_rows`                 :func:`crh_kernels.backends.matmul_rows`
  ============  ==========================================  ===================================
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

#: ``status`` of a row whose mask entry is False: it counts nowhere.
ROW_MASKED = 0
#: ``status`` of a live row with a non-finite entry (or, normalizing, the zero row): counted in
#: ``n_skipped`` only.
ROW_SKIPPED = 1
#: ``status`` of a row that enters the mean and the scatter.
ROW_VALID = 2


Count = Union[int, torch.Tensor]  # an int, or a 0-d int64 tensor on the batch's device


class BatchStats(NamedTuple):
    n: Count
    n_skipped: Count
    mean: torch.Tensor
    scatter: torch.Tensor


class CrossStats(NamedTuple):
    n: Count
    n_skipped: Count
    mean_g: torch.Tensor
    mean_h: torch.Tensor
    scatter: torch.Tensor  # (Dg, Dh), Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ, not symmetric


#: the fused result of :meth:`Backend.update_state` / :meth:`Backend.update_staged`: the batch's
#: ``(n_b, n_skipped, μ_b)`` with μ_b float64 (D,) (the state has taken it already, unless
#: refused)
FusedResult = Tuple[int, int, torch.Tensor]


class MergedState(NamedTuple):
    """The result of :meth:`Backend.update_state` for a backend that builds the merged state
    aside (new tensors; the state passed in is only read): the caller commits it by installing
    these tensors. ``batch_counts`` (2,) int64 = the batch's ``[n_b, n_skipped_b]``; all on
    the state's device."""

    counts: torch.Tensor
    mean: torch.Tensor
    scatter: torch.Tensor
    batch_counts: torch.Tensor


class Backend:
    """Base class of every backend: subclasses set ``name`` (and ``dtypes``), implement the four
    required methods, and set a capability flag to True for each optional capability whose
    methods they override."""

    name: str = "?"
    #: dtypes of ``x`` the backend accepts
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    #: offers :meth:`update_state` (the batch merged into the running state in the kernel)
    fused_update: bool = False
    #: offers :meth:`stage_rows` and :meth:`update_staged` (pass 1 done while rows are copied)
    row_staging: bool = False
    #: offers :meth:`matmul_rows` (``x @ w`` on the backend's own inner kernels)
    row_matmul: bool = False
    #: :meth:`update_state` takes ``fp32_precision`` (a keyword); the C++ CPU backend, which
    #: always multiplies fp32 in IEEE fp32, does not
    fused_precision: bool = False

    # ------------------------------------------------------------------ required
    def availability(self) -> Tuple[bool, str]:
        """``(usable, reason)``: whether the backend can run in this process, and a one-line
        description (how it was loaded) or the reason it cannot."""
        raise NotImplementedError(f"backend {self.name!r} does not implement availability()")

    def supports(self, device: torch.device) -> Tuple[bool, str]:
        """Whether tensors on ``device`` can be handled; the reason when not."""
        raise NotImplementedError(f"backend {self.name!r} does not implement supports()")

    def batch_stats(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                    fp32_precision: str = "ieee") -> BatchStats:
        """Statistics of the rows of ``x`` (N, D) under ``mask`` (N,) bool or None:
        ``n`` valid rows, ``n_skipped``, ``mean`` f64 (D,) = Σ_valid x̂_i / n and
        ``scatter`` (D, D) = Σ_valid (x̂_i − mean)(x̂_i − mean)ᵀ, exactly symmetric.
        ``fp32_precision`` ("ieee" or "tf32") says how fp32 operands enter matrix units."""
        raise NotImplementedError(f"backend {self.name!r} does not implement batch_stats()")

    def cross_stats(self, g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor],
                    normalize: bool, fp32_precision: str = "ieee") -> CrossStats:
        """Cross statistics of row pairs ``g`` (N, Dg), ``h`` (N, Dh): a row is valid only when
        both its g and h rows are; ``n``, ``n_skipped`` (live rows that are not valid), means
        f64 (Dg,), (Dh,), and ``scatter`` (Dg, Dh) = Σ_valid (ĝ_i − μ_g)(ĥ_i − μ_h)ᵀ."""
        raise NotImplementedError(f"backend {self.name!r} does not implement cross_stats()")

    # ------------------------------------------------------- optional capabilities
    def _unsupported(self, method: str, flag: str) -> NotImplementedError:
        return NotImplementedError(
            f"backend {self.name!r} does not offer {method}() (capability {flag!r} is False)")

    def update_state(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                     strict: bool, counts: torch.Tensor, mean: torch.Tensor,
                     scatter: torch.Tensor) -> Union[FusedResult, MergedState, None]:
        """Capability ``fused_update``: merge the batch into a running state in one step that
        cannot be interrupted half-way. Two forms: **in place** (the C++ CPU backend: one
        compiled op writes the state, the commit point; returns a :data:`FusedResult`) or
        **aside** (Triton: new tensors, the state is only read; returns a
        :class:`MergedState`, which the caller commits by installing it, and ``strict`` is the
        caller's to apply). A backend with ``fused_precision`` takes ``fp32_precision`` too.

        ``x`` (N, D), ``mask`` (N,) bool or None; the state is ``counts`` int64 (2,) =
        ``[n1, n_skipped]`` (on the CPU for the in-place form, on x's device for the aside
        one), ``mean`` (D,) and ``scatter`` (D, D), float32 or float64. The new state is

            scatter ← scatter + C_b + δδᵀ · n1·n_b/(n1 + n_b),   δ = μ_b − mean
            (scatter ← C_b when n1 = 0; C_b is never materialised)
            mean ← mean + δ · n_b/(n1 + n_b)   (float64, rounded once)
            counts ← counts + [n_b, n_skipped_b]

        (Chan–Golub–LeVeque). In place: with ``strict`` and a skipped row, or when an argument
        is refused, nothing is written, and the batch's ``(n_b, n_skipped, μ_b)`` (μ_b float64
        (D,)) is returned. Either form returns None when the state is not one the kernel takes
        (then the caller uses :meth:`batch_stats`).
        """
        raise self._unsupported("update_state", "fused_update")

    def stage_rows(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                   buf: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                   sum_: torch.Tensor) -> None:
        """Capability ``row_staging``: copy the rows of ``x`` (R, D) into ``buf`` (R, D) and do
        pass 1 of the update on the way: per row ``status`` uint8 (R,)
        (:data:`ROW_MASKED` / :data:`ROW_SKIPPED` / :data:`ROW_VALID`), ``scale`` fp32 (R,)
        (``1/||x_i||``, or 1 without normalizing, 0 unless valid; a row of norm below 2^-100
        stores −2^-64/||x_i|| and enters as (x_i·2^64)·|scale_i|, docs/spec.md §1), and
        ``sum_ += Σ_valid scale_i · x_i`` (float64 (D,)). :meth:`update_staged` finishes."""
        raise self._unsupported("stage_rows", "row_staging")

    def update_staged(self, x: torch.Tensor, scale: torch.Tensor, status: torch.Tensor,
                      sum_: torch.Tensor, strict: bool, counts: torch.Tensor, mean: torch.Tensor,
                      scatter: torch.Tensor) -> Optional[FusedResult]:
        """Capability ``row_staging``: :meth:`update_state` of rows ``x`` (R, D) that
        :meth:`stage_rows` staged (their ``status``, ``scale`` and ``sum_``, read and never
        changed), without reading them for pass 1 again. Same state, commit, result and None
        case as :meth:`update_state`."""
        raise self._unsupported("update_staged", "row_staging")

    def matmul_rows(self, x: torch.Tensor, w: torch.Tensor) -> Optional[torch.Tensor]:
        """Capability ``row_matmul``: ``x @ w`` for 2-D float32 ``x`` (N, K) and ``w`` (K, M)
        on the backend's device, fp32 accumulation over K, outside autograd (the caller
        checks all that). Returns None while the backend is not loaded: it never loads or
        builds anything to answer. Call it through :func:`crh_kernels.backends.matmul_rows`."""
        raise self._unsupported("matmul_rows", "row_matmul")


#: capability flag -> the methods a backend declaring it overrides
CAPABILITIES = {
    "fused_update": ("update_state",),
    "row_staging": ("stage_rows", "update_staged"),
    "row_matmul": ("matmul_rows",),
}


def mirror_upper(c: torch.Tensor) -> torch.Tensor:
    """Exactly symmetric matrix from the upper triangle of ``c`` (the lower part is ignored,
    even if it holds garbage): never average two halves (docs/spec.md §2)."""
    upper = torch.triu(c)
    return upper + torch.triu(upper, diagonal=1).transpose(0, 1)


def host_reads_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host is free: a real CPU tensor, in eager mode
    (not traced by torch.compile, not a FakeTensor)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not isinstance(t, torch._subclasses.fake_tensor.FakeTensor))
