"""The fused symmetric update (docs/spec.md §2, steps 2–3): upper-triangle tiles of the centered scatter.

For x (N, D), per-row scales s (0 for rows that must not count) and a shift K (D,):

    y_i  = valid_i ? s_i · x_i − K : 0          (fp32, on load; never stored)
    C    = Σ_i y_i y_iᵀ                           (only tiles (I, J) with I ≤ J)

Tiny rows (kernels/row_stats.py): s_i < 0 means y_i = (x_i·2^64)·|s_i| − K.

Two K loops (issue 14: a main loop that can feed the tensor cores). Each program first reads
the scales of its split of the rows (4 bytes a row, against 2·BLOCK_M elements of x a row in
the loop). When every row of the split counts with an ordinary scale (s > 0: no masked,
skipped or tiny row), its whole BLOCK_K chunks run the *fast loop*: no row mask and no select,
y = s·x − K straight from the loaded tile (a column past D loads x = 0 against K = 0, so y = 0
there without a select), pointers advanced by one add a chunk. Everything else (the ragged
last chunk of the last split, and every chunk of a split that holds a row with s ≤ 0) runs
the *general loop*, which masks rows and selects y = 0 where s = 0; ``tiny_ptr`` (int32,
nonzero when the batch holds a tiny row) picks its copy with the pre-factor (``TINY``), read
once per program, so an ordinary batch runs neither the pre-factor nor the select. Both loops
compute the same fp32 values y = s·x − K for a row that counts, so which loop a chunk runs
changes no bit of the result. bench/sass_model.py reads both from the machine code.

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

# rows of scales a program reads per step of its scan (the fast-loop decision)
_SCAN = tl.constexpr(1024)


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
def _load_centered(p_x, o_n, m_n, o_c, m_c, b_s, b_k, stride_xn, stride_xd, INT64: tl.constexpr,
                   TINY: tl.constexpr):
    if INT64:
        o_x = o_n.to(tl.int64)[:, None] * stride_xn + o_c.to(tl.int64)[None, :] * stride_xd
    else:
        o_x = o_n[:, None] * stride_xn + o_c[None, :] * stride_xd
    b_x = tl.load(p_x + o_x, mask=m_n[:, None] & m_c[None, :], other=0.0)
    if TINY:
        # a tiny row (s < 0): (x·2^64)·|s|, both factors exact
        b_p = tl.where(b_s < 0.0, 18446744073709551616.0, 1.0)
        b_y = (b_x.to(tl.float32) * b_p[:, None]) * tl.abs(b_s)[:, None] - b_k[None, :]
    else:
        b_y = b_x.to(tl.float32) * b_s[:, None] - b_k[None, :]
    return tl.where((b_s != 0.0)[:, None] & m_c[None, :], b_y, 0.0)


@triton.jit
def _mma(b_a, b_b, b_acc, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
         ROUND_ONLY: tl.constexpr):
    """b_acc + b_aᵀ b_b, the operands cast to DOT_DTYPE."""
    if ROUND_ONLY:
        b_a = b_a.to(DOT_DTYPE).to(tl.float32)
        b_b = b_b.to(DOT_DTYPE).to(tl.float32)
        return tl.dot(tl.trans(b_a), b_b, b_acc, input_precision="ieee")
    else:
        return tl.dot(tl.trans(b_a.to(DOT_DTYPE)), b_b.to(DOT_DTYPE), b_acc,
                      input_precision=INPUT_PRECISION)


@triton.jit
def _scatter_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, i0, j0, DA, DB, n_lo, n_hi, b_acc,
                  stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, INT64: tl.constexpr,
                  TINY: tl.constexpr):
    """The general K loop over rows [n_lo, n_hi): any scale, a ragged last chunk."""
    # tile offsets are rebuilt here from scalars: fewer registers live across the loops
    o_i = i0 + tl.arange(0, BLOCK_M)
    o_j = j0 + tl.arange(0, BLOCK_M)
    m_i = o_i < DA
    m_j = o_j < DB
    b_ka = tl.load(ka_ptr + o_i, mask=m_i, other=0.0)
    b_kb = tl.load(kb_ptr + o_j, mask=m_j, other=0.0)
    for n0 in range(n_lo, n_hi, BLOCK_K):
        o_n = n0 + tl.arange(0, BLOCK_K)
        m_n = o_n < n_hi
        b_sa = tl.load(sa_ptr + o_n, mask=m_n, other=0.0)
        b_sb = tl.load(sb_ptr + o_n, mask=m_n, other=0.0)
        b_a = _load_centered(a_ptr, o_n, m_n, o_i, m_i, b_sa, b_ka, stride_an, stride_ad, INT64, TINY)
        b_b = _load_centered(b_ptr, o_n, m_n, o_j, m_j, b_sb, b_kb, stride_bn, stride_bd, INT64, TINY)
        b_acc = _mma(b_a, b_b, b_acc, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY)
    return b_acc


@triton.jit
def _fast_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, i0, j0, DA, DB, n_lo, n_hi, b_acc,
               stride_an, stride_ad, stride_bn, stride_bd,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, INT64: tl.constexpr):
    """Whole chunks [n_lo, n_hi) whose rows all have s > 0: no row mask, no select."""
    o_i = i0 + tl.arange(0, BLOCK_M)
    o_j = j0 + tl.arange(0, BLOCK_M)
    m_i = o_i < DA
    m_j = o_j < DB
    # a column past D: x loads as 0 and K as 0, so y = s·0 − 0 = 0
    b_ka = tl.load(ka_ptr + o_i, mask=m_i, other=0.0)
    b_kb = tl.load(kb_ptr + o_j, mask=m_j, other=0.0)
    o_n = n_lo + tl.arange(0, BLOCK_K)
    if INT64:
        p_a = a_ptr + (o_n.to(tl.int64)[:, None] * stride_an + o_i.to(tl.int64)[None, :] * stride_ad)
        p_b = b_ptr + (o_n.to(tl.int64)[:, None] * stride_bn + o_j.to(tl.int64)[None, :] * stride_bd)
        step_a = tl.full([], BLOCK_K, tl.int64) * stride_an
        step_b = tl.full([], BLOCK_K, tl.int64) * stride_bn
    else:
        p_a = a_ptr + o_n[:, None] * stride_an + o_i[None, :] * stride_ad
        p_b = b_ptr + o_n[:, None] * stride_bn + o_j[None, :] * stride_bd
        step_a = stride_an * BLOCK_K
        step_b = stride_bn * BLOCK_K
    p_sa = sa_ptr + o_n
    p_sb = sb_ptr + o_n
    for n0 in range(n_lo, n_hi, BLOCK_K):
        b_sa = tl.load(p_sa)
        b_sb = tl.load(p_sb)
        b_xa = tl.load(p_a, mask=m_i[None, :], other=0.0)
        b_xb = tl.load(p_b, mask=m_j[None, :], other=0.0)
        b_a = b_xa.to(tl.float32) * b_sa[:, None] - b_ka[None, :]
        b_b = b_xb.to(tl.float32) * b_sb[:, None] - b_kb[None, :]
        b_acc = _mma(b_a, b_b, b_acc, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY)
        p_a += step_a
        p_b += step_b
        p_sa += BLOCK_K
        p_sb += BLOCK_K
    return b_acc


@triton.jit
def _scatter_tile(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, tiny_ptr, i0, j0, DA, DB, N,
                  stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, INT64: tl.constexpr):
    """This program's split of the rows: Σ_i (s_a,i a_i − K_a)[I] (s_b,i b_i − K_b)[J]ᵀ over the
    tile I = i0 + [0, BLOCK_M) of a's DA columns, J = j0 + [0, BLOCK_M) of b's DB columns."""
    i_s = tl.program_id(1)
    # whole BLOCK_K chunks per split, so that only the last chunk of the last split is ragged
    rows = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_K) * BLOCK_K
    n_lo = i_s * rows
    # a split past N (rows rounded up to whole chunks) is empty: n_hi = n_lo, no loop runs
    n_hi = tl.maximum(tl.minimum(n_lo + rows, N), n_lo)

    # the scan: does every row of the split count with an ordinary scale (s > 0)?
    n_other = 0
    for n0 in range(n_lo, n_hi, _SCAN):
        o_q = n0 + tl.arange(0, _SCAN)
        m_q = o_q < n_hi
        b_qa = tl.load(sa_ptr + o_q, mask=m_q, other=1.0)
        b_qb = tl.load(sb_ptr + o_q, mask=m_q, other=1.0)
        n_other += tl.sum(tl.where((b_qa > 0.0) & (b_qb > 0.0), 0, 1))

    b_acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    n_gen = n_lo
    if n_other == 0:
        n_gen = n_lo + (n_hi - n_lo) // BLOCK_K * BLOCK_K
        b_acc = _fast_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, i0, j0, DA, DB, n_lo, n_gen,
                           b_acc, stride_an, stride_ad, stride_bn, stride_bd, BLOCK_M, BLOCK_K,
                           DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64)
    # the rest: one program-uniform branch, so the pre-factor of tiny rows costs nothing in an
    # ordinary batch
    if tl.load(tiny_ptr) != 0:
        b_acc = _scatter_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, i0, j0, DA, DB, n_gen,
                              n_hi, b_acc, stride_an, stride_ad, stride_bn, stride_bd, BLOCK_M,
                              BLOCK_K, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64, True)
    else:
        b_acc = _scatter_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, ka_ptr, kb_ptr, i0, j0, DA, DB, n_gen,
                              n_hi, b_acc, stride_an, stride_ad, stride_bn, stride_bd, BLOCK_M,
                              BLOCK_K, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64, False)
    return b_acc


@triton.jit
def _scatter_upper_kernel(
    x_ptr, scale_ptr, shift_ptr, tiny_ptr, out_ptr, splits_ptr,
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

    b_acc = _scatter_tile(x_ptr, x_ptr, scale_ptr, scale_ptr, shift_ptr, shift_ptr, tiny_ptr,
                          i_i * BLOCK_M, i_j * BLOCK_M, D, D, N,
                          stride_xn, stride_xd, stride_xn, stride_xd,
                          BLOCK_M, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, ROUND_ONLY, INT64)

    o_i = i_i * BLOCK_M + tl.arange(0, BLOCK_M)
    o_j = i_j * BLOCK_M + tl.arange(0, BLOCK_M)
    o_out = o_i.to(tl.int64)[:, None] * D + o_j[None, :]
    m_out = (o_i < D)[:, None] & (o_j < D)[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptr + o_out, b_acc, mask=m_out)
    else:
        tl.store(out_ptr + i_s.to(tl.int64) * D * D + o_out, b_acc, mask=m_out)
