"""The cross moment: every tile of Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ (not symmetric, so no triangle).

g (N, Dg), h (N, Dh), per-row scales s_g, s_h that are both zero on rows that must not
count, shifts K_g, K_h. Grid (⌈Dg/BLOCK_M⌉·⌈Dh/BLOCK_M⌉, S); program (t, s) writes
``out[s, I, J]`` with I = t // ⌈Dh/BLOCK_M⌉, J = t % ⌈Dh/BLOCK_M⌉. Casting rules as in syrk.py.
"""
import triton
import triton.language as tl

from .syrk import _load_centered


@triton.jit
def _cross_fwd_kernel(
    g_ptr, h_ptr, sg_ptr, sh_ptr, kg_ptr, kh_ptr, out_ptr,
    N, DG, DH, stride_gn, stride_gd, stride_hn, stride_hd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr,
):
    nbh = tl.cdiv(DH, BLOCK_M)
    i_i = tl.program_id(0) // nbh
    i_j = tl.program_id(0) % nbh
    i_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    o_i = i_i * BLOCK_M + tl.arange(0, BLOCK_M)
    o_j = i_j * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < DG
    m_j = o_j < DH
    b_ki = tl.load(kg_ptr + o_i, mask=m_i, other=0.0)
    b_kj = tl.load(kh_ptr + o_j, mask=m_j, other=0.0)

    rows = tl.cdiv(tl.cdiv(N, n_split), BLOCK_K) * BLOCK_K
    n_lo = i_s * rows
    n_hi = tl.minimum(n_lo + rows, N)

    b_acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_K):
        o_n = n0 + tl.arange(0, BLOCK_K)
        m_n = o_n < n_hi
        b_sg = tl.load(sg_ptr + o_n, mask=m_n, other=0.0)
        b_sh = tl.load(sh_ptr + o_n, mask=m_n, other=0.0)
        b_a = _load_centered(g_ptr, o_n, m_n, o_i, m_i, b_sg, b_ki, stride_gn, stride_gd)
        b_b = _load_centered(h_ptr, o_n, m_n, o_j, m_j, b_sh, b_kj, stride_hn, stride_hd)
        if ROUND_ONLY:
            b_a = b_a.to(DOT_DTYPE).to(tl.float32)
            b_b = b_b.to(DOT_DTYPE).to(tl.float32)
            b_acc = tl.dot(tl.trans(b_a), b_b, b_acc, input_precision="ieee")
        else:
            b_acc = tl.dot(tl.trans(b_a.to(DOT_DTYPE)), b_b.to(DOT_DTYPE), b_acc,
                           input_precision=INPUT_PRECISION)

    o_out = i_s.to(tl.int64) * DG * DH + o_i.to(tl.int64)[:, None] * DH + o_j[None, :]
    tl.store(out_ptr + o_out, b_acc, mask=m_i[:, None] & m_j[None, :])
