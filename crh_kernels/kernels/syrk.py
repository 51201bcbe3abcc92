"""The fused symmetric update (docs/spec.md §2, steps 2–3): upper-triangle tiles of the centered scatter.

For x (N, D), per-row scales s (0 for rows that must not count) and a shift K (D,):

    y_i  = valid_i ? s_i · x_i − K : 0          (fp32, on load; never stored)
    C    = Σ_i y_i y_iᵀ                           (only tiles (I, J) with I ≤ J)

Grid: (T, S) with T = nb(nb+1)/2 upper-triangle tile pairs of BLOCK_M×BLOCK_M (nb = ⌈D/BLOCK_M⌉)
and S splits of the rows. Program (t, s) writes its partial tile to ``out[s, I, J]``
(deterministic; the epilogue of kernels/merge.py sums over s) or, with USE_ATOMIC, adds it into
``out[0]``. Program (0, 0) writes the number of partials (S, or 1 with USE_ATOMIC) to
``splits_ptr``: the autotuner picks BLOCK_M and the launcher's S follows it, so the epilogue
reads S there.
Offsets of x are int32 unless INT64 (set by the launcher when an element offset of x can
reach 2^31, e.g. a transposed view with N·D ≥ 2^31): then row and column offsets are int64.
Operands are cast to DOT_DTYPE after centering (bf16/fp16 inputs: their own type; fp32: fp32
with INPUT_PRECISION "ieee" or "tf32"); accumulation is fp32. ROUND_ONLY (interpreter):
round operands to the 16-bit type and multiply in fp32, since the interpreter's 16-bit dot
is wrong.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_pair(t):
    """Column-major enumeration of the upper triangle: t = J(J+1)/2 + I, 0 ≤ I ≤ J."""
    i_j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # the float root can be off by one either way near perfect squares
    i_j = tl.where((i_j + 1) * (i_j + 2) // 2 <= t, i_j + 1, i_j)
    i_j = tl.where(i_j * (i_j + 1) // 2 > t, i_j - 1, i_j)
    i_i = t - i_j * (i_j + 1) // 2
    return i_i, i_j


@triton.jit
def _load_centered(p_x, o_n, m_n, o_c, m_c, b_s, b_k, stride_xn, stride_xd, INT64: tl.constexpr):
    if INT64:
        o_x = o_n.to(tl.int64)[:, None] * stride_xn + o_c.to(tl.int64)[None, :] * stride_xd
    else:
        o_x = o_n[:, None] * stride_xn + o_c[None, :] * stride_xd
    b_x = tl.load(p_x + o_x, mask=m_n[:, None] & m_c[None, :], other=0.0)
    b_y = b_x.to(tl.float32) * b_s[:, None] - b_k[None, :]
    return tl.where((b_s != 0.0)[:, None] & m_c[None, :], b_y, 0.0)


@triton.jit
def _scatter_tile(a_ptr, b_ptr, sa_ptr, sb_ptr, b_ka, b_kb, o_i, m_i, o_j, m_j, N,
                  stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, INT64: tl.constexpr):
    """This program's split of the rows: Σ_i (s_a,i a_i − K_a)[o_i] (s_b,i b_i − K_b)[o_j]ᵀ."""
    i_s = tl.program_id(1)
    # whole BLOCK_K chunks per split, so that only the last chunk of the last split is ragged
    rows = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_K) * BLOCK_K
    n_lo = i_s * rows
    n_hi = tl.minimum(n_lo + rows, N)

    b_acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_K):
        o_n = n0 + tl.arange(0, BLOCK_K)
        m_n = o_n < n_hi
        b_sa = tl.load(sa_ptr + o_n, mask=m_n, other=0.0)
        b_sb = tl.load(sb_ptr + o_n, mask=m_n, other=0.0)
        b_a = _load_centered(a_ptr, o_n, m_n, o_i, m_i, b_sa, b_ka, stride_an, stride_ad, INT64)
        b_b = _load_centered(b_ptr, o_n, m_n, o_j, m_j, b_sb, b_kb, stride_bn, stride_bd, INT64)
        if ROUND_ONLY:
            b_a = b_a.to(DOT_DTYPE).to(tl.float32)
            b_b = b_b.to(DOT_DTYPE).to(tl.float32)
            b_acc = tl.dot(tl.trans(b_a), b_b, b_acc, input_precision="ieee")
        else:
            b_acc = tl.dot(tl.trans(b_a.to(DOT_DTYPE)), b_b.to(DOT_DTYPE), b_acc,
                           input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _scatter_upper_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, splits_ptr,
    N, D, stride_xn, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, USE_ATOMIC: tl.constexpr,
    INT64: tl.constexpr,
):
    i_i, i_j = _tile_pair(tl.program_id(0))
    i_s = tl.program_id(1)
    if (tl.program_id(0) == 0) & (i_s == 0):
        if USE_ATOMIC:
            tl.store(splits_ptr, 1)
        else:
            tl.store(splits_ptr, tl.num_programs(1))

    o_i = i_i * BLOCK_M + tl.arange(0, BLOCK_M)
    o_j = i_j * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < D
    m_j = o_j < D
    b_ki = tl.load(shift_ptr + o_i, mask=m_i, other=0.0)
    b_kj = tl.load(shift_ptr + o_j, mask=m_j, other=0.0)
    b_acc = _scatter_tile(x_ptr, x_ptr, scale_ptr, scale_ptr, b_ki, b_kj, o_i, m_i, o_j, m_j, N,
                          stride_xn, stride_xd, stride_xn, stride_xd,
                          BLOCK_M, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64)

    o_out = o_i.to(tl.int64)[:, None] * D + o_j[None, :]
    m_out = m_i[:, None] & m_j[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptr + o_out, b_acc, mask=m_out)
    else:
        tl.store(out_ptr + i_s.to(tl.int64) * D * D + o_out, b_acc, mask=m_out)
