"""Row statistics: the light first pass of the fused update (docs/spec.md §2, step 1), and its totals.

For x of shape (N, D) and an optional row mask / gate, per row i:

    sq_i     = Σ_d x_id²                                   (fp32)
    live_i   = mask_i (if HAS_MASK; the mask read with its own stride, 0 for an expanded one)
    ok_i     = the row rule of docs/spec.md §1: finite entries and, if NORMALIZE, not all zero
    valid_i  = live_i ∧ ok_i ∧ (gate_i ≠ 0 if HAS_GATE)
    scale_i  = valid_i ? 1/||x_i|| (NORMALIZE) or 1 : 0; a *tiny* row (NORMALIZE, ||x_i|| < 2^-100:
               1/||x_i|| may exceed fp32) stores −2^-64/||x_i||, and y_i = (x_i·2^64)·|scale_i|
               wherever it is applied (both factors exact: x_i/||x_i|| rounded once)
    status_i = 2 valid, 1 skipped (live, not valid), 0 masked           (uint8)

The fp32 sum decides alone when it is finite and (normalizing) at least SQ_TINY; a live row
whose sum is zero, below SQ_TINY (subnormal squares lost bits) or not finite (a non-finite entry,
or finite entries whose squares overflow) is measured again in float64, where no square of an
fp32 value under- or overflows. That second look runs only in a tile holding such a row.

Program p covers rows [p·ROWS, (p+1)·ROWS) in tiles of BLOCK_N rows and writes

    count[p] = (valid rows, skipped rows, 1 if a tiny row else 0)        (int32)
    psum[p, d] = Σ_{i in its rows, valid} scale_i · x_id                 (when WITH_SUM)

**One read of x** (ONE_READ, the launcher's choice when BLOCK_D ≥ D): a tile of BLOCK_N whole
rows is loaded once and kept in registers; its norms, then its scaled column sums, come from
that one load, and the column sums accumulate over the program's tiles in float64 registers
(psum float64). **Wide rows** (D > BLOCK_D, the launcher's bound is in backends/triton.py):
the norm loop and the column-sum loop each read the tile's rows in chunks of BLOCK_D columns
(the second read mostly hits L2: the tile of a few rows was read just before); the column sums
accumulate in the program's psum row (float64, read-modify-write after a barrier).

Offsets are int32 unless INT64 (the launcher sets it when an element offset of x can reach
2^31: a transposed view with N·D ≥ 2^31, a huge row stride), then every offset is int64.

``_batch_totals_kernel`` finishes pass 1 in one launch: counts = Σ_p count[p] (int64), the
batch mean μ_b = Σ_p psum[p] / max(n, 1) (float64, the partials summed in float64), the shift
K = fp32(μ_b) of the main pass and ``tiny`` (int32 (1,): nonzero when some row is tiny, which
switches the main pass to the copy of its K loop with the pre-factor, kernels/syrk.py); with
ZERO it also zeroes the (D, D) accumulator of the atomic
main pass, so that no memset launch is needed. The status encoding is ROW_VALID / ROW_SKIPPED /
ROW_MASKED of :mod:`crh_kernels.backends.base`, as in ``csrc/`` (a row that the gate drops is
skipped: the cross moment counts it in ``n_skipped``).
"""
import triton
import triton.language as tl


#: fp32 squared norms below 2^-100 (2^26 above FLT_MIN) may have lost bits to subnormal
#: squares: such rows are measured again (the same bound as SQ_TINY in backends/torch.py)
SQ_TINY: tl.constexpr = tl.constexpr(2.0 ** -100)
#: a row whose float64 squared norm is below 2^-200 (norm < 2^-100) is tiny: its scale is stored
#: as −2^-64/||x|| (TINY_PRE = 2^64), as in backends/torch.py and csrc/
SQ64_TINY: tl.constexpr = tl.constexpr(2.0 ** -200)
TINY_PRE: tl.constexpr = tl.constexpr(2.0 ** 64)


@triton.jit
def _offsets(o, stride, INT64: tl.constexpr):
    if INT64:
        off = o.to(tl.int64) * stride
    else:
        off = o * stride
    return off


@triton.jit
def _row_rule(p_row, o_n, m_n, b_sq, mask_ptr, gate_ptr, D, stride_xd, stride_m,
              HAS_MASK: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
              INT64: tl.constexpr, BLOCK_D: tl.constexpr):
    """(valid, live, scale, tiny, slow) of a tile's rows from their fp32 squared norms
    (docs/spec.md §1); tiny: the valid rows whose scale is encoded negative; slow (a scalar):
    some row took the second look (none did: no row is tiny)."""
    if HAS_MASK:
        b_live = m_n & (tl.load(mask_ptr + _offsets(o_n, stride_m, INT64), mask=m_n, other=0) != 0)
    else:
        b_live = m_n
    # the fast rule, from the fp32 sum (NaN fails every comparison)
    if NORMALIZE:
        b_ok = (b_sq >= SQ_TINY) & (b_sq < float("inf"))
        # round-to-nearest sqrt and division: the approximate ones cost accuracy in the mean
        b_scale = tl.div_rn(1.0, tl.sqrt_rn(tl.where(b_ok, b_sq, 1.0)))
    else:
        b_ok = b_sq < float("inf")
        b_scale = tl.full(b_sq.shape, 1.0, tl.float32)
    b_slow = b_live & (b_ok == 0)
    b_tiny = b_slow & (b_slow == 0)  # all False
    t_slow = tl.max(b_slow.to(tl.int32), axis=0)
    if t_slow > 0:
        # rare: the rows the fp32 sum cannot decide, measured again in float64
        # (narrower chunks: a float64 tile of BLOCK_D columns would raise the kernel's registers)
        b_sq64 = tl.zeros(b_sq.shape, dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D // 4):
            o_d = d0 + tl.arange(0, BLOCK_D // 4)
            m_d = o_d < D
            b_x = tl.load(p_row[:, None] + _offsets(o_d, stride_xd, INT64)[None, :],
                          mask=b_slow[:, None] & m_d[None, :], other=0.0)
            b_x = b_x.to(tl.float64)
            b_sq64 += tl.sum(b_x * b_x, axis=1)
        b_fin = b_sq64 < float("inf")  # every entry finite
        if NORMALIZE:
            b_pos = b_fin & (b_sq64 > 0.0)
            # 1/||x|| rounded once to fp32 (at most 2^100); a tiny row's −2^-64/||x|| (at most 2^85)
            b_tiny = b_slow & b_pos & (b_sq64 < SQ64_TINY)
            b_r = 1.0 / tl.sqrt(tl.where(b_pos, b_sq64, 1.0))
            b_s = tl.where(b_tiny, b_r * (-1.0 / TINY_PRE), b_r).to(tl.float32)
            b_ok = tl.where(b_slow, b_pos, b_ok)
            b_scale = tl.where(b_slow, b_s, b_scale)
        else:
            b_ok = tl.where(b_slow, b_fin, b_ok)
    b_valid = b_live & b_ok
    if HAS_GATE:
        b_valid = b_valid & (tl.load(gate_ptr + o_n, mask=m_n, other=0.0) != 0.0)
    b_scale = tl.where(b_valid, b_scale, 0.0)
    return b_valid, b_live, b_scale, b_tiny & b_valid, t_slow


@triton.jit
def _scaled_rows(b_x, b_valid, b_scale, TINY: tl.constexpr):
    """s_i·x_i of a tile's valid rows (0 elsewhere: selected, never multiplied away, inf·0 is
    NaN); TINY: some row is tiny, (x_i·2^64)·|s_i| for those."""
    if TINY:
        b_p = tl.where(b_scale < 0.0, TINY_PRE, 1.0)
        b_y = (b_x.to(tl.float32) * b_p[:, None]) * tl.abs(b_scale)[:, None]
    else:
        b_y = b_x.to(tl.float32) * b_scale[:, None]
    return tl.where(b_valid[:, None], b_y, 0.0)


@triton.jit
def _row_stats_kernel(
    x_ptr, mask_ptr, gate_ptr, scale_ptr, status_ptr, psum_ptr, count_ptr,
    N, D, ROWS, stride_xn, stride_xd, stride_m,
    HAS_MASK: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
    WITH_SUM: tl.constexpr, ONE_READ: tl.constexpr, INT64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_p = tl.program_id(0)
    n_lo = i_p * ROWS
    n_hi = tl.minimum(n_lo + ROWS, N)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    c_off = _offsets(o_c, stride_xd, INT64)

    b_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    if WITH_SUM:
        if not ONE_READ:
            # wide rows: this program's column sums accumulate in its psum row (float64)
            for d0 in range(0, D, BLOCK_D):
                tl.store(psum_ptr + i_p.to(tl.int64) * D + d0 + o_c,
                         tl.zeros([BLOCK_D], dtype=tl.float64), mask=d0 + o_c < D)
    b_nv = tl.zeros([BLOCK_N], dtype=tl.int32)
    b_ns = tl.zeros([BLOCK_N], dtype=tl.int32)
    b_nt = tl.zeros([BLOCK_N], dtype=tl.int32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n_hi
        p_row = x_ptr + _offsets(o_n, stride_xn, INT64)
        if ONE_READ:
            # the whole tile, once: norms and column sums both come from these registers
            b_x = tl.load(p_row[:, None] + c_off[None, :], mask=m_n[:, None] & m_c[None, :],
                          other=0.0).to(tl.float32)
            b_sq = tl.sum(b_x * b_x, axis=1)
        else:
            b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + o_c
                b_x = tl.load(p_row[:, None] + _offsets(o_d, stride_xd, INT64)[None, :],
                              mask=m_n[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
                b_sq += tl.sum(b_x * b_x, axis=1)
        b_valid, b_live, b_scale, b_tiny, t_slow = _row_rule(
            p_row, o_n, m_n, b_sq, mask_ptr, gate_ptr, D, stride_xd, stride_m, HAS_MASK, HAS_GATE,
            NORMALIZE, INT64, BLOCK_D)
        # 2 valid, 1 skipped, 0 masked (ROW_VALID, ROW_SKIPPED, ROW_MASKED)
        b_status = tl.where(b_valid, 2, tl.where(b_live, 1, 0))
        tl.store(scale_ptr + o_n, b_scale, mask=m_n)
        tl.store(status_ptr + o_n, b_status.to(tl.uint8), mask=m_n)
        b_nv += b_valid.to(tl.int32)
        b_ns += (b_live & (b_valid == 0)).to(tl.int32)
        b_nt = tl.maximum(b_nt, b_tiny.to(tl.int32))

        if WITH_SUM:
            if ONE_READ:
                # a tile-uniform branch: the tiny rows' pre-factor only in a tile where some row
                # took the second look (no further reduction: _row_rule's own flag)
                if t_slow > 0:
                    b_y = _scaled_rows(b_x, b_valid, b_scale, True)
                else:
                    b_y = _scaled_rows(b_x, b_valid, b_scale, False)
                b_acc += tl.sum(b_y, axis=0).to(tl.float64)
            else:
                # the previous tile's psum stores, by other threads, become visible to all
                tl.debug_barrier()
                for d0 in range(0, D, BLOCK_D):
                    o_d = d0 + o_c
                    m_d = o_d < D
                    b_x = tl.load(p_row[:, None] + _offsets(o_d, stride_xd, INT64)[None, :],
                                  mask=m_n[:, None] & m_d[None, :], other=0.0)
                    if t_slow > 0:
                        b_y = _scaled_rows(b_x, b_valid, b_scale, True)
                    else:
                        b_y = _scaled_rows(b_x, b_valid, b_scale, False)
                    p_sum = psum_ptr + i_p.to(tl.int64) * D + o_d
                    tl.store(p_sum, tl.load(p_sum, mask=m_d, other=0.0)
                             + tl.sum(b_y, axis=0).to(tl.float64), mask=m_d)

    if WITH_SUM:
        if ONE_READ:
            tl.store(psum_ptr + i_p.to(tl.int64) * D + o_c, b_acc, mask=m_c)
    tl.store(count_ptr + 3 * i_p, tl.sum(b_nv, axis=0))
    tl.store(count_ptr + 3 * i_p + 1, tl.sum(b_ns, axis=0))
    tl.store(count_ptr + 3 * i_p + 2, tl.max(b_nt, axis=0))


@triton.jit
def _batch_totals_kernel(
    psum_ptr, count_ptr, mean_ptr, shift_ptr, counts_ptr, tiny_ptr, zero_ptr, P, D,
    WITH_SUM: tl.constexpr, ZERO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_d = tl.program_id(0)
    # every program sums the P per-program counts (P is small): it needs n for the mean
    b_nv = tl.zeros([BLOCK_P], dtype=tl.int64)
    b_ns = tl.zeros([BLOCK_P], dtype=tl.int64)
    b_nt = tl.zeros([BLOCK_P], dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        b_nv += tl.load(count_ptr + 3 * o_p, mask=m_p, other=0).to(tl.int64)
        b_ns += tl.load(count_ptr + 3 * o_p + 1, mask=m_p, other=0).to(tl.int64)
        b_nt = tl.maximum(b_nt, tl.load(count_ptr + 3 * o_p + 2, mask=m_p, other=0))
    n_valid = tl.sum(b_nv, axis=0)
    if i_d == 0:
        tl.store(counts_ptr, n_valid)
        tl.store(counts_ptr + 1, tl.sum(b_ns, axis=0))
        tl.store(tiny_ptr, tl.max(b_nt, axis=0))

    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if WITH_SUM:
        b_sum = tl.zeros([BLOCK_D], dtype=tl.float64)
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            b_part = tl.load(psum_ptr + o_p.to(tl.int64)[:, None] * D + o_d[None, :],
                             mask=(o_p < P)[:, None] & m_d[None, :], other=0.0)
            b_sum += tl.sum(b_part.to(tl.float64), axis=0)
        # no valid row: a zero mean (and a zero scatter: every scale is 0)
        b_mean = b_sum / tl.maximum(n_valid, 1).to(tl.float64)
        tl.store(mean_ptr + o_d, b_mean, mask=m_d)
        tl.store(shift_ptr + o_d, b_mean.to(tl.float32), mask=m_d)
    if ZERO:
        # the rows of this block of the atomic main pass's (D, D) accumulator
        for c0 in range(0, D, 32):
            o_c = c0 + tl.arange(0, 32)
            tl.store(zero_ptr + o_d.to(tl.int64)[:, None] * D + o_c[None, :],
                     tl.zeros([BLOCK_D, 32], dtype=tl.float32),
                     mask=m_d[:, None] & (o_c < D)[None, :])
