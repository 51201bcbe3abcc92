"""Row statistics: the light first pass of the fused update (SPEC §2, step 1).

For x of shape (N, D) and an optional row mask / gate, per row i:

    sq_i     = Σ_d x_id²                                   (fp32)
    live_i   = mask_i (if HAS_MASK)
    valid_i  = live_i ∧ finite(sq_i) ∧ (sq_i > 0 if NORMALIZE) ∧ (gate_i ≠ 0 if HAS_GATE)
    scale_i  = valid_i ? 1/√sq_i (NORMALIZE) or 1 : 0
    status_i = 2 valid, 1 skipped (live, not valid), 0 masked           (uint8)

and, when WITH_SUM, the per-program partial column sums of the scaled valid rows,

    psum[pid, d] = Σ_{i in block pid, valid} scale_i · x_id     (fp32; summed in fp64 outside)

which give the batch mean used as the shift of the main pass. The status encoding is
ROW_VALID / ROW_SKIPPED / ROW_MASKED of :mod:`crh_kernels.backends.base`, as in ``csrc/``
(a row that the gate drops is skipped: the cross moment counts it in ``n_skipped``).
"""
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    x_ptr, mask_ptr, gate_ptr, scale_ptr, status_ptr, psum_ptr,
    N, D, stride_xn, stride_xd,
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

    # NaN fails sq == sq; inf (or an overflowing square) fails sq < inf
    b_ok = (b_sq == b_sq) & (b_sq < float("inf"))
    if NORMALIZE:
        b_ok = b_ok & (b_sq > 0.0)
    if HAS_MASK:
        b_live = m_n & (tl.load(mask_ptr + o_n, mask=m_n, other=0) != 0)
    else:
        b_live = m_n
    b_valid = b_live & b_ok
    if HAS_GATE:
        b_valid = b_valid & (tl.load(gate_ptr + o_n, mask=m_n, other=0.0) != 0.0)
    if NORMALIZE:
        # round-to-nearest sqrt and division: the approximate ones cost accuracy in the mean
        b_scale = tl.where(b_valid, tl.div_rn(1.0, tl.sqrt_rn(tl.where(b_valid, b_sq, 1.0))), 0.0)
    else:
        b_scale = tl.where(b_valid, 1.0, 0.0)
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
