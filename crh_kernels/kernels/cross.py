"""The cross moment: every tile of Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ (not symmetric, so no triangle).

g (N, Dg), h (N, Dh), per-row scales s_g, s_h that are both zero on rows that must not
count (negative on tiny rows, with ``tiny_ptr`` set: see syrk.py), shifts K_g, K_h. Grid
(⌈Dg/BLOCK_M⌉·⌈Dh/BLOCK_M⌉, S); program (t, s) writes ``out[s, I, J]`` with
I = t // ⌈Dh/BLOCK_M⌉, J = t % ⌈Dh/BLOCK_M⌉. The two K loops (fast and general), casting rules
and INT64 as in syrk.py.
"""
import triton
import triton.language as tl

from .syrk import _scatter_tile


@triton.jit
def _cross_scatter_kernel(
    g_ptr, h_ptr, sg_ptr, sh_ptr, kg_ptr, kh_ptr, tiny_ptr, out_ptr,
    N, DG, DH, stride_gn, stride_gd, stride_hn, stride_hd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, INT64: tl.constexpr,
):
    nbh = tl.cdiv(DH, BLOCK_M)
    i_i = tl.program_id(0) // nbh
    i_j = tl.program_id(0) % nbh
    i_s = tl.program_id(1)

    b_acc = _scatter_tile(g_ptr, h_ptr, sg_ptr, sh_ptr, kg_ptr, kh_ptr, tiny_ptr,
                          i_i * BLOCK_M, i_j * BLOCK_M, DG, DH, N,
                          stride_gn, stride_gd, stride_hn, stride_hd,
                          BLOCK_M, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64)

    o_i = i_i * BLOCK_M + tl.arange(0, BLOCK_M)
    o_j = i_j * BLOCK_M + tl.arange(0, BLOCK_M)
    o_out = i_s.to(tl.int64) * DG * DH + o_i.to(tl.int64)[:, None] * DH + o_j[None, :]
    tl.store(out_ptr + o_out, b_acc, mask=(o_i < DG)[:, None] & (o_j < DH)[None, :])
