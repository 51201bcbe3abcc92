"""Row statistics: the light first pass of the fused update (SPEC §2, step 1).

For x of shape (N, D) and an optional row mask / gate, per row i:

    sq_i     = Σ_d x_id²                                   (fp32)
    live_i   = mask_i (if HAS_MASK; the mask read with its own stride, 0 for an expanded one)
    ok_i     = the row rule of SPEC §1: finite entries and, if NORMALIZE, 1/√sq_i finite and
               nonzero in fp32
    valid_i  = live_i ∧ ok_i ∧ (gate_i ≠ 0 if HAS_GATE)
    scale_i  = valid_i ? 1/√sq_i (NORMALIZE) or 1 : 0
    status_i = 2 valid, 1 skipped (live, not valid), 0 masked           (uint8)

The fp32 sum decides alone when it is finite and (normalizing) at least SQ_TINY; a live row
whose sum is zero, below SQ_TINY (subnormal squares lost bits) or not finite (a non-finite entry,
or finite entries whose squares overflow) is measured again in float64, where no square of an
fp32 value under- or overflows. That second look runs only in a block holding such a row.

When WITH_SUM, the per-program partial column sums of the scaled valid rows,

    psum[pid, d] = Σ_{i in block pid, valid} scale_i · x_id     (fp32; summed in fp64 outside)

give the batch mean used as the shift of the main pass. The status encoding is
ROW_VALID / ROW_SKIPPED / ROW_MASKED of :mod:`crh_kernels.backends.base`, as in ``csrc/``
(a row that the gate drops is skipped: the cross moment counts it in ``n_skipped``).
"""
import triton
import triton.language as tl


#: fp32 squared norms below 2^-100 (2^26 above FLT_MIN) may have lost bits to subnormal
#: squares: such rows are measured again (the same bound as SQ_TINY in backends/torch.py)
SQ_TINY: tl.constexpr = tl.constexpr(2.0 ** -100)


@triton.jit
def _row_stats_kernel(
    x_ptr, mask_ptr, gate_ptr, scale_ptr, status_ptr, psum_ptr,
    N, D, stride_xn, stride_xd, stride_m,
    HAS_MASK: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
    WITH_SUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    # int64 offsets: N·stride overflows int32 for large activations
    p_row = x_ptr + o_n.to(tl.int64)[:, None] * stride_xn

    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_x = tl.load(p_row + o_d[None, :] * stride_xd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_x = b_x.to(tl.float32)
        b_sq += tl.sum(b_x * b_x, axis=1)

    if HAS_MASK:
        b_live = m_n & (tl.load(mask_ptr + o_n.to(tl.int64) * stride_m, mask=m_n, other=0) != 0)
    else:
        b_live = m_n
    # the fast rule, from the fp32 sum (NaN fails every comparison)
    if NORMALIZE:
        b_ok = (b_sq >= SQ_TINY) & (b_sq < float("inf"))
        # round-to-nearest sqrt and division: the approximate ones cost accuracy in the mean
        b_scale = tl.div_rn(1.0, tl.sqrt_rn(tl.where(b_ok, b_sq, 1.0)))
    else:
        b_ok = b_sq < float("inf")
        b_scale = tl.full([BLOCK_N], 1.0, tl.float32)
    b_slow = b_live & (b_ok == 0)
    if tl.max(b_slow.to(tl.int32), axis=0) > 0:
        # rare: the rows the fp32 sum cannot decide, measured again in float64
        # (narrower chunks: a float64 tile of BLOCK_D columns would raise the kernel's registers)
        b_sq64 = tl.zeros([BLOCK_N], dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D // 4):
            o_d = d0 + tl.arange(0, BLOCK_D // 4)
            m_d = o_d < D
            b_x = tl.load(p_row + o_d[None, :] * stride_xd, mask=b_slow[:, None] & m_d[None, :],
                          other=0.0)
            b_x = b_x.to(tl.float64)
            b_sq64 += tl.sum(b_x * b_x, axis=1)
        b_fin = b_sq64 < float("inf")  # every entry finite
        if NORMALIZE:
            b_pos = b_fin & (b_sq64 > 0.0)
            # 1/||x|| rounded once to fp32: inf when it exceeds the fp32 range
            b_s = (1.0 / tl.sqrt(tl.where(b_pos, b_sq64, 1.0))).to(tl.float32)
            b_ok = tl.where(b_slow, b_pos & (b_s < float("inf")), b_ok)
            b_scale = tl.where(b_slow, b_s, b_scale)
        else:
            b_ok = tl.where(b_slow, b_fin, b_ok)
    b_valid = b_live & b_ok
    if HAS_GATE:
        b_valid = b_valid & (tl.load(gate_ptr + o_n, mask=m_n, other=0.0) != 0.0)
    b_scale = tl.where(b_valid, b_scale, 0.0)
    # 2 valid, 1 skipped, 0 masked (ROW_VALID, ROW_SKIPPED, ROW_MASKED)
    b_status = tl.where(b_valid, 2, tl.where(b_live, 1, 0))
    tl.store(scale_ptr + o_n, b_scale, mask=m_n)
    tl.store(status_ptr + o_n, b_status.to(tl.uint8), mask=m_n)

    if WITH_SUM:
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_x = tl.load(p_row + o_d[None, :] * stride_xd, mask=m_n[:, None] & m_d[None, :], other=0.0)
            # select, never multiply, invalid rows away: inf · 0 is NaN
            b_y = tl.where(b_valid[:, None], b_x.to(tl.float32) * b_scale[:, None], 0.0)
            tl.store(psum_ptr + i_n * D + o_d, tl.sum(b_y, axis=0), mask=m_d)
