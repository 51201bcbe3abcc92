"""The epilogue of the fused update (docs/spec.md §2, step 3): one launch after the main pass.

It sums the main pass's row splits, removes the shift, mirrors the upper triangle and, with
MERGE, merges the batch into a state (Chan–Golub–LeVeque), writing a *new* state: the old one is
only read, so the caller's commit stays one assignment. Inputs:

    part   (≥S, D, D) fp32  the main pass's partial upper-triangle tiles; S (int32) read from
                            splits_ptr, where the main pass wrote it
    μ_b    (D,) float64     the batch mean;  K (D,) fp32 the shift the main pass used
    c_b    (2,) int64       the batch's [n_b, n_skipped_b]
    state  c_1 (2,) int64, μ_1 (D,), C_1 (D, D) (float32 or float64)      (MERGE)

and per upper-triangle tile (I ≤ J) of BLOCK×BLOCK, in float64:

    C_b  = Σ_s part[s] − n_b·(μ_b − K)(μ_b − K)ᵀ          (UNSHIFT; else Σ_s part[s])
    C    = C_1 + C_b + δδᵀ·n_1·n_b/n,   δ = μ_b − μ_1,  n = n_1 + n_b        (MERGE)
           (C_1 when n_b = 0, C_b when n_1 = 0)
    μ    = μ_1 + δ·n_b/n  (μ_1 when n_b = 0, μ_b when n_1 = 0)   written by the diagonal tiles
    c    = c_1 + c_b                                              written by program 0

C is stored in the output's dtype at (i, j) for i ≤ j and, from the same value, at (j, i): the
result is exactly symmetric. BLOCK must divide the main pass's BLOCK_M, so that every entry the
epilogue reads lies in a tile the main pass wrote. :func:`epilogue_reference` is the same
computation in float64 PyTorch (tests/test_triton_interp.py checks one against the other).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .syrk import _tile_pair


@triton.jit
def _epilogue_kernel(
    part_ptr, splits_ptr, meanb_ptr, shift_ptr, countsb_ptr, counts1_ptr, mean1_ptr, c1_ptr,
    out_ptr, out_mean_ptr, out_counts_ptr, D,
    UNSHIFT: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr,
):
    i_i, i_j = _tile_pair(tl.program_id(0))
    o_i = i_i * BLOCK + tl.arange(0, BLOCK)
    o_j = i_j * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < D
    m_j = o_j < D
    o_ij = o_i.to(tl.int64)[:, None] * D + o_j[None, :]
    m_ij = m_i[:, None] & m_j[None, :]

    dd = (tl.zeros([], dtype=tl.int64) + D) * D  # one split's (D, D), in int64
    b_c = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
    for s in range(0, tl.load(splits_ptr)):
        b_c += tl.load(part_ptr + s * dd + o_ij, mask=m_ij, other=0.0).to(tl.float64)
    if UNSHIFT:
        # Σ(y−K)(y−K)ᵀ = C_b + n_b(μ_b−K)(μ_b−K)ᵀ: the shift's rounding-sized error removed
        n_b = tl.load(countsb_ptr).to(tl.float64)
        b_di = (tl.load(meanb_ptr + o_i, mask=m_i, other=0.0)
                - tl.load(shift_ptr + o_i, mask=m_i, other=0.0).to(tl.float64))
        b_dj = (tl.load(meanb_ptr + o_j, mask=m_j, other=0.0)
                - tl.load(shift_ptr + o_j, mask=m_j, other=0.0).to(tl.float64))
        b_c = b_c - n_b * (b_di[:, None] * b_dj[None, :])
    if MERGE:
        n1 = tl.load(counts1_ptr)
        n2 = tl.load(countsb_ptr)
        n = tl.maximum(n1 + n2, 1).to(tl.float64)
        f = n1.to(tl.float64) * n2.to(tl.float64) / n
        b_mbi = tl.load(meanb_ptr + o_i, mask=m_i, other=0.0)
        b_m1i = tl.load(mean1_ptr + o_i, mask=m_i, other=0.0).to(tl.float64)
        b_dli = b_mbi - b_m1i
        b_dlj = (tl.load(meanb_ptr + o_j, mask=m_j, other=0.0)
                 - tl.load(mean1_ptr + o_j, mask=m_j, other=0.0).to(tl.float64))
        b_c1 = tl.load(c1_ptr + o_ij, mask=m_ij, other=0.0).to(tl.float64)
        b_new = b_c1 + b_c + f * (b_dli[:, None] * b_dlj[None, :])
        b_c = tl.where(n2 == 0, b_c1, tl.where(n1 == 0, b_c, b_new))
        if i_i == i_j:
            b_mean = b_m1i + b_dli * (n2.to(tl.float64) / n)
            b_mean = tl.where(n2 == 0, b_m1i, tl.where(n1 == 0, b_mbi, b_mean))
            tl.store(out_mean_ptr + o_i, b_mean.to(out_mean_ptr.dtype.element_ty), mask=m_i)
        if tl.program_id(0) == 0:
            tl.store(out_counts_ptr, n1 + n2)
            tl.store(out_counts_ptr + 1, tl.load(counts1_ptr + 1) + tl.load(countsb_ptr + 1))
    b_out = b_c.to(out_ptr.dtype.element_ty)
    # the upper triangle where it lies, and the same values at the mirrored addresses
    tl.store(out_ptr + o_ij, b_out, mask=m_ij & (o_i[:, None] <= o_j[None, :]))
    tl.store(out_ptr + o_j.to(tl.int64)[None, :] * D + o_i[:, None], b_out,
             mask=m_ij & (o_i[:, None] < o_j[None, :]))


def epilogue_reference(part: torch.Tensor, mean_b: Optional[torch.Tensor] = None,
                       shift: Optional[torch.Tensor] = None,
                       counts_b: Optional[torch.Tensor] = None,
                       state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None):
    """What :func:`_epilogue_kernel` computes, in float64 PyTorch, from the upper triangle of
    ``part`` (S, D, D) only: ``C`` (D, D) float64, and with ``state = (c_1, μ_1, C_1)`` also
    ``(μ, c)``. Unshifts when ``mean_b`` is given (with ``shift`` and ``counts_b``)."""
    c = torch.triu(part.double().sum(dim=0))
    if mean_b is not None:
        d = mean_b.double() - shift.double()
        c = c - float(counts_b[0]) * torch.triu(torch.outer(d, d))
    c = c + torch.triu(c, diagonal=1).T
    if state is None:
        return c
    c1, m1, s1 = state
    n1, n2 = int(c1[0]), int(counts_b[0])
    counts = c1 + counts_b
    if n2 == 0:
        return s1.double(), m1.double(), counts
    if n1 == 0:
        return c, mean_b.double(), counts
    n = n1 + n2
    delta = mean_b.double() - m1.double()
    upper = torch.triu(s1.double()) + torch.triu(c) + torch.triu(torch.outer(delta, delta)) * (n1 * n2 / n)
    return upper + torch.triu(upper, diagonal=1).T, m1.double() + delta * (n2 / n), counts
