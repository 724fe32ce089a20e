"""Triton kernels of the streamed log-prob op: logits tiles are formed, reduced and dropped on chip.

Notation (one token row i, vocab column j):
    z_ij = softcap(((h_i . w_j) + b_j) / temperature)        softcap(x) = c * tanh(x / c)
    lse_i = logsumexp_j z_ij,  logp_i = z_i,t_i - lse_i,  H_i = lse_i - sum_j p_ij z_ij
    lse is saved as the pair [N, 2] (m_i = max_j z_ij, ls_i = lse_i - m_i): the backward forms
    p_ij = exp((z_ij - m_i) - ls_i), which one fp32 lse would round to the ulp of m_i.

Kernels (launched from ``logprobs_launch.py``):
- ``_fwd_kernel``: grid (token blocks, vocab splits). A program streams its vocab range block by
  block; each [BLOCK_N, BLOCK_V] logit tile is a ``tl.dot`` accumulated over D in BLOCK_D chunks
  (fp32), reduced on the fly into four fp32 vectors (running max m, s = sum exp(z - m),
  t = sum exp(z - m) (z - m), target logit) and dropped. With one split the program writes
  logp / lse (m, ls) / entropy; with several it writes the four partials and ``_fwd_combine_kernel``
  merges them (flash-decoding style), so small N still fills the GPU.
- ``_bwd_dh_kernel``: grid (token blocks, vocab splits). Recomputes each tile from the saved (m, ls),
  forms dz (the gradient w.r.t. the raw logits) and accumulates dH[rows] += dz @ W[cols] into an
  fp32 buffer the program owns (no atomics).
- ``_bwd_dw_kernel``: grid (vocab blocks, token splits). Same tiles seen from the vocab side:
  dW[cols] += dz^T @ H[rows] into an fp32 buffer the program owns, dbias[cols] += sum_i dz.
- ``_split_sum_cast_kernel``: sums the per-split fp32 partial buffers and casts once to the
  output dtype (the "split reduction").

Only switches that change the generated code and block sizes are ``tl.constexpr``;
temperature and softcap are runtime scalars (a new temperature does not recompile).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """float32 tanh from exp only (Cephes tanhf: ~1 ulp); works in the interpreter, unlike libdevice."""
    ax = tl.abs(x)
    x2 = x * x
    small = ((((-5.70498872745e-3 * x2 + 2.06390887954e-2) * x2 - 5.37397155531e-2) * x2
              + 1.33314422036e-1) * x2 - 3.33332819422e-1) * x2 * ax + ax
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)  # exp overflow -> inf -> 1.0, no NaN
    r = tl.where(ax > 0.625, big, small)
    return tl.where(x < 0, -r, r)


@triton.jit
def _round_fp32(x, dtype: tl.constexpr):
    """Interpreter only: fp32 x rounded to ``dtype`` (nearest, ties to even), kept in fp32.

    The interpreter's tl.dot multiplies bfloat16 bit patterns as integers, so its dot operands stay
    fp32 holding the rounded values; and its fp32 -> bfloat16 cast truncates instead of rounding,
    so bfloat16 rounding is done on the bits here (on a GPU ``.to(tl.bfloat16)`` rounds to nearest).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype).to(tl.float32)
    return y


@triton.jit
def _split_operand(x, dtype: tl.constexpr, SPLIT_DZ: tl.constexpr, DOT_FP32: tl.constexpr):
    """fp32 dz as dot operands in the inputs' dtype: (hi, lo) with hi + lo = x to ~16 mantissa bits
    when SPLIT_DZ (two tensor-core dots instead of one); else (hi, hi) and only hi is used.

    Rounding dz to bfloat16 once costs 2^-9 relative per element, as much as the materializing bf16
    path loses; the split keeps the gradient GEMMs at the accuracy of their fp32 accumulation.
    """
    if DOT_FP32:
        hi = _round_fp32(x, dtype)
        lo = hi
        if SPLIT_DZ:
            lo = _round_fp32(x - hi, dtype)
    else:
        hi = x.to(dtype)
        lo = hi
        if SPLIT_DZ:
            lo = (x - hi.to(tl.float32)).to(dtype)
    return hi, lo


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D,
                 stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The [BLOCK_N, BLOCK_V] tile of z in fp32 (masked rows/columns hold finite garbage)."""
    acc = tl.full((BLOCK_N, BLOCK_V), 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:  # interpreter: its tl.dot cannot multiply bfloat16 (exact upcast, same result)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc / temperature
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _grad_tile(z, rows_valid, cols, col_mask, tgt, m, ls, g_logp, g_ent, ybar, temperature, softcap,
               HAS_ENT_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """dLoss / d(raw logits) of a tile, fp32; exactly 0 outside the valid rows/columns.

    With y = z - m (exact near the max): p_j = exp(y_j - ls); d logp / dz_j = onehot_j - p_j;
    d H / dz_j = -p_j (y_j - ybar) with ybar = sum_k p_k y_k = ls - H; then the softcap derivative
    1 - (z/c)^2 (z capped) and 1/temperature.
    """
    valid = rows_valid[:, None] & col_mask[None, :]
    y = z - m[:, None]
    p = tl.exp(tl.where(valid, y - ls[:, None], -float("inf")))
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = g_logp[:, None] * (onehot - p)
    if HAS_ENT_GRAD:
        dz -= g_ent[:, None] * p * (y - ybar[:, None])
    if HAS_SOFTCAP:
        zc = z / softcap
        dz *= 1.0 - zc * zc
    dz = dz / temperature
    return tl.where(valid, dz, 0.0)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, part_ptr,
                N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                v_per_split, n_split,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENT: tl.constexpr,
                FINALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)

    # A finite start for the running max: exp(m - m_new) is then 0 and s * (m - m_new) is 0, never NaN.
    m = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
    s = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    t = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    zt = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # 64-bit addressing: V * D may exceed 2**31
        col_mask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                         HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
        z = tl.where(col_mask[None, :], z, -float("inf"))
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zm = z - m_new[:, None]
        e = tl.exp(zm)  # 0 in masked columns
        if WANT_ENT:
            zm = tl.where(col_mask[None, :], zm, 0.0)  # not -inf: 0 * -inf would be NaN
            t = alpha * (t + s * (m - m_new)) + tl.sum(e * zm, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    if FINALIZE:
        ls = tl.log(s)
        tl.store(logp_ptr + rows, (zt - m) - ls, mask=row_mask)
        tl.store(lse_ptr + 2 * rows, m, mask=row_mask)
        tl.store(lse_ptr + 2 * rows + 1, ls, mask=row_mask)
        if WANT_ENT:
            tl.store(ent_ptr + rows, ls - t / s, mask=row_mask)
    else:  # partials [4, n_split, N]: m, s, t, target logit
        base = part_ptr + pid_s * N + rows
        plane = n_split * N
        tl.store(base, m, mask=row_mask)
        tl.store(base + plane, s, mask=row_mask)
        tl.store(base + 2 * plane, t, mask=row_mask)
        tl.store(base + 3 * plane, zt, mask=row_mask)


@triton.jit
def _fwd_combine_kernel(part_ptr, logp_ptr, lse_ptr, ent_ptr, N, n_split,
                        WANT_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merges the per-split online-softmax partials of ``_fwd_kernel`` into logp / lse (m, ls) / entropy."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    sp = tl.arange(0, BLOCK_S)
    mask = row_mask[:, None] & (sp < n_split)[None, :]
    plane = n_split * N
    offs = sp[None, :] * N + rows[:, None]
    m_i = tl.load(part_ptr + offs, mask=mask, other=-float("inf"))
    s_i = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
    zt = tl.sum(tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0), axis=1)
    m = tl.max(m_i, axis=1)
    m = tl.where(row_mask, m, 0.0)
    dm = tl.where(mask, m_i - m[:, None], 0.0)
    a = tl.where(mask, tl.exp(dm), 0.0)
    s = tl.sum(a * s_i, axis=1)
    s = tl.where(row_mask, s, 1.0)
    ls = tl.log(s)
    tl.store(logp_ptr + rows, (zt - m) - ls, mask=row_mask)
    tl.store(lse_ptr + 2 * rows, m, mask=row_mask)
    tl.store(lse_ptr + 2 * rows + 1, ls, mask=row_mask)
    if WANT_ENT:
        t_i = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
        t = tl.sum(a * (t_i + s_i * dm), axis=1)
        tl.store(ent_ptr + rows, ls - t / s, mask=row_mask)


@triton.jit
def _load_row_vectors(tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, rows, row_mask,
                      HAS_ENT_GRAD: tl.constexpr):
    """Per-row inputs of a backward tile: target, m, ls, the two coefficients, ybar = ls - H."""
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.load(lse_ptr + 2 * rows, mask=row_mask, other=0.0)
    ls = tl.load(lse_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0)
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
        ybar = ls - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)  # both O(log V): no cancellation
    else:
        g_ent = g_logp
        ybar = ls
    return tgt, m, ls, g_logp, g_ent, ybar


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dh_ptr,
                   N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                   v_per_split,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                   SPLIT_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dh_ptr: contiguous fp32 [n_split, N, D]; split s gets the contribution of its vocab range."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt, m, ls, g_logp, g_ent, ybar = _load_row_vectors(tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                                                      rows, row_mask, HAS_ENT_GRAD)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    out = dh_ptr + pid_s.to(tl.int64) * N * D
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # 64-bit addressing: V * D may exceed 2**31
        col_mask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                         HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
        dz = _grad_tile(z, row_mask, cols, col_mask, tgt, m, ls, g_logp, g_ent, ybar, temperature, softcap,
                        HAS_ENT_GRAD, HAS_SOFTCAP)
        # The gradient GEMMs run in the inputs' dtype (tensor cores), fp32 accumulation.
        dz_hi, dz_lo = _split_operand(dz, h_ptr.dtype.element_ty, SPLIT_DZ, DOT_FP32)
        # The first vocab block overwrites (the buffer starts uninitialized), later ones accumulate:
        # its loads see D_read = 0 columns. (A scalar & block mask is mistyped by the interpreter.)
        d_read = (v0 > v_start).to(tl.int32) * D
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            o_ptrs = out + rows[:, None] * D + ds[None, :]
            o_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(o_ptrs, mask=row_mask[:, None] & (ds < d_read)[None, :], other=0.0)
            acc = tl.dot(dz_hi, w, acc, input_precision=DOT_PRECISION)
            if SPLIT_DZ:
                acc = tl.dot(dz_lo, w, acc, input_precision=DOT_PRECISION)
            tl.store(o_ptrs, acc, mask=o_mask)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dw_ptr, db_ptr,
                   N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                   n_per_split,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                   COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SPLIT_DZ: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dw_ptr: contiguous fp32 [n_split, V, D]; db_ptr: fp32 [n_split, V]; split s sums its token range."""
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    n_start = pid_s * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    out = dw_ptr + pid_s.to(tl.int64) * V * D
    db = tl.full((BLOCK_V,), 0.0, dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_mask = rows < n_end
        tgt, m, ls, g_logp, g_ent, ybar = _load_row_vectors(tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                                                          rows, row_mask, HAS_ENT_GRAD)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
                         HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
        dz = _grad_tile(z, row_mask, cols, col_mask, tgt, m, ls, g_logp, g_ent, ybar, temperature, softcap,
                        HAS_ENT_GRAD, HAS_SOFTCAP)
        if COMPUTE_DB:
            db += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            dz_hi, dz_lo = _split_operand(dz, h_ptr.dtype.element_ty, SPLIT_DZ, DOT_FP32)
            dzt_hi = tl.trans(dz_hi)
            dzt_lo = tl.trans(dz_lo)
            d_read = (n0 > n_start).to(tl.int32) * D  # first token block overwrites, see _bwd_dh_kernel
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                if DOT_FP32:
                    h = h.to(tl.float32)
                o_ptrs = out + cols[:, None] * D + ds[None, :]
                o_mask = col_mask[:, None] & d_mask[None, :]
                acc = tl.load(o_ptrs, mask=col_mask[:, None] & (ds < d_read)[None, :], other=0.0)
                acc = tl.dot(dzt_hi, h, acc, input_precision=DOT_PRECISION)
                if SPLIT_DZ:
                    acc = tl.dot(dzt_lo, h, acc, input_precision=DOT_PRECISION)
                tl.store(o_ptrs, acc, mask=o_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_s.to(tl.int64) * V + cols, db, mask=col_mask)


@triton.jit
def _split_sum_cast_kernel(src_ptr, dst_ptr, numel, n_split, BLOCK: tl.constexpr, BF16_BITS: tl.constexpr):
    """dst[i] = sum_s src[s, i] (fp32), cast to dst's dtype: the one cast of a split reduction.

    BF16_BITS (interpreter only): dst is an int16 view of a bfloat16 tensor and the rounding is done
    by hand (see ``_round_fp32``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    src = src_ptr + offs
    acc = tl.load(src, mask=mask, other=0.0)
    for _ in range(1, n_split):
        src += numel  # 64-bit pointer arithmetic: n_split * numel may exceed 2**31
        acc += tl.load(src, mask=mask, other=0.0)
    if BF16_BITS:
        out = (_round_fp32(acc, tl.bfloat16).to(tl.uint32, bitcast=True) >> 16).to(tl.int16)
    else:
        out = acc.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs, out, mask=mask)
