"""The gate on small pooled tensors: Conv3d(2 -> 1, 3x3x3, padding 1, no bias), BN
folded into (scale, shift), and their backward. Sigmoid is applied by consumers
(``weights.gate_at``), so the only outputs are z and two scalars.

Every reduction across programs goes through per-program partials summed in a
fixed order: the BN batch statistics as per-program (count, mean, M2) merged by
Chan's formula in ``bn_fold_kernel`` (robust, no E[z^2] - E[z]^2 cancellation),
the BN backward sums and the conv weight gradient as per-program rows summed by
the host with ``torch.sum`` of a small tensor. Deterministic, no atomics.
"""
import triton
import triton.language as tl


@triton.jit
def _gate_block(M, D1, D2, D3, BLOCK: tl.constexpr):
    """This program's block of positions of an (N, D1, D2, D3) gate tensor: flat index
    (int64: no overflow on huge gates), mask, batch item, offset inside the item's
    volume, coordinates, volume."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    volume = D1 * D2 * D3
    n = i // volume
    rel = i - n * volume
    return i, i < M, n, rel, rel // (D2 * D3), (rel // D3) % D2, rel % D3, volume


@triton.jit
def _inside(d, k, SIGN: tl.constexpr, D):
    """Whether position d + SIGN * (k - 1) along one axis is inside [0, D)."""
    e = d + SIGN * (k - 1)
    return (e >= 0) & (e < D)


@triton.jit
def conv_forward_kernel(p_ptr, w_ptr, z_ptr, part_ptr, M, D1, D2, D3,
                        STATS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """z[n, d] = sum_{ci, k} w[ci, k] * P[n, ci, d + k - 1]; with STATS also this
    program's (count, mean, M2) of z for the BN batch statistics."""
    pid = tl.program_id(0)
    i, mask, n, rel, d1, d2, d3, volume = _gate_block(M, D1, D2, D3, BLOCK)
    z = tl.zeros([BLOCK], ACC)
    # A tap's neighbour is a constant offset away in memory; only its validity varies.
    for k1 in tl.static_range(3):
        in1 = mask & _inside(d1, k1, 1, D1)
        for k2 in tl.static_range(3):
            in12 = in1 & _inside(d2, k2, 1, D2)
            for k3 in tl.static_range(3):
                valid = in12 & _inside(d3, k3, 1, D3)
                shift = ((k1 - 1) * D2 + (k2 - 1)) * D3 + (k3 - 1)
                for ci in tl.static_range(2):
                    x = tl.load(p_ptr + (2 * n + ci) * volume + rel + shift, mask=valid, other=0.0).to(ACC)
                    z += tl.load(w_ptr + ci * 27 + k1 * 9 + k2 * 3 + k3).to(ACC) * x
    tl.store(z_ptr + i, z, mask=mask)
    if STATS:
        count = tl.sum(mask.to(ACC), axis=0)
        mean = tl.sum(z, axis=0) / count
        centered = tl.where(mask, z - mean, 0.0)
        tl.store(part_ptr + 3 * pid, count)
        tl.store(part_ptr + 3 * pid + 1, mean)
        tl.store(part_ptr + 3 * pid + 2, tl.sum(centered * centered, axis=0))


@triton.jit
def bn_fold_kernel(part_ptr, num_parts, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, ss_ptr, stats_ptr, eps,
                   MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program: the statistics that normalise z, and (scale, shift) with
    gate = sigmoid(scale * z + shift). MODE is primitives.BN_*: 0 none ((1, 0), zero
    stats), 1 batch statistics, 2 running statistics."""
    if MODE == 0:
        tl.store(ss_ptr, tl.full([], 1.0, ACC))
        tl.store(ss_ptr + 1, tl.full([], 0.0, ACC))
        tl.store(stats_ptr, tl.full([], 0.0, ACC))
        tl.store(stats_ptr + 1, tl.full([], 0.0, ACC))
    else:
        if MODE == 1:
            # Chan et al.: merge chunk (count, mean, M2) triples in a fixed order.
            count = tl.full([], 0.0, ACC)
            mean = tl.full([], 0.0, ACC)
            m2 = tl.full([], 0.0, ACC)
            for start in range(0, num_parts, BLOCK):
                j = start + tl.arange(0, BLOCK)
                valid = j < num_parts
                cnt = tl.load(part_ptr + 3 * j, mask=valid, other=0.0)
                mu = tl.load(part_ptr + 3 * j + 1, mask=valid, other=0.0)
                q = tl.load(part_ptr + 3 * j + 2, mask=valid, other=0.0)
                chunk_count = tl.sum(cnt, axis=0)
                chunk_mean = tl.sum(cnt * mu, axis=0) / chunk_count
                chunk_m2 = tl.sum(q + cnt * (mu - chunk_mean) * (mu - chunk_mean), axis=0)
                total = count + chunk_count
                delta = chunk_mean - mean
                mean = mean + delta * (chunk_count / total)
                m2 = m2 + chunk_m2 + delta * delta * (count * chunk_count / total)
                count = total
            var = m2 / count
        else:
            mean = tl.load(rmean_ptr).to(ACC)
            var = tl.load(rvar_ptr).to(ACC)
        scale = 1.0 / tl.sqrt(var + eps)
        if HAS_GAMMA:
            scale = scale * tl.load(gamma_ptr).to(ACC)
        shift = -mean * scale
        if HAS_BETA:
            shift = shift + tl.load(beta_ptr).to(ACC)
        tl.store(ss_ptr, scale)
        tl.store(ss_ptr + 1, shift)
        tl.store(stats_ptr, mean)
        tl.store(stats_ptr + 1, var)


@triton.jit
def bn_backward_kernel(gg_ptr, z_ptr, ss_ptr, stats_ptr, gamma_ptr, sums_ptr, out_ptr, M, eps,
                       MODE: tl.constexpr, PHASE: tl.constexpr, HAS_GAMMA: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Backward of sigmoid(BN(z)). PHASE 0: this program's (sum dy, sum dy * zhat) into
    out[pid] (dy = d loss / d BN output). PHASE 1: dz, given the global sums."""
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M
    z = tl.load(z_ptr + i, mask=mask, other=0.0)
    g = 1.0 / (1.0 + tl.exp(-(tl.load(ss_ptr) * z + tl.load(ss_ptr + 1))))
    dy = tl.where(mask, tl.load(gg_ptr + i, mask=mask, other=0.0).to(ACC) * g * (1.0 - g), 0.0)
    if MODE == 0:
        tl.store(out_ptr + i, dy, mask=mask)
    else:
        rstd = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + eps)
        zhat = (z - tl.load(stats_ptr)) * rstd
        if PHASE == 0:
            tl.store(out_ptr + 2 * pid, tl.sum(dy, axis=0))
            tl.store(out_ptr + 2 * pid + 1, tl.sum(dy * zhat, axis=0))
        else:
            if HAS_GAMMA:
                gamma = tl.load(gamma_ptr).to(ACC)
            else:
                gamma = 1.0
            if MODE == 1:  # batch statistics depend on z too
                dz = gamma * rstd * (dy - tl.load(sums_ptr) / M - zhat * (tl.load(sums_ptr + 1) / M))
            else:
                dz = gamma * rstd * dy
            tl.store(out_ptr + i, dz, mask=mask)


@triton.jit
def conv_backward_kernel(p_ptr, w_ptr, dz_ptr, dp_ptr, dw_part_ptr, M, D1, D2, D3,
                         NEED_INPUT: tl.constexpr, NEED_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    """dP[n, ci, d] = sum_k w[ci, k] * dz[n, d - k + 1] (the transposed conv), and this
    program's row of dw[ci, k] = sum_d P[n, ci, d + k - 1] * dz[n, d]."""
    pid = tl.program_id(0)
    i, mask, n, rel, d1, d2, d3, volume = _gate_block(M, D1, D2, D3, BLOCK)
    dz = tl.load(dz_ptr + i, mask=mask, other=0.0)
    dp0 = tl.zeros([BLOCK], ACC)
    dp1 = tl.zeros([BLOCK], ACC)
    for k1 in tl.static_range(3):
        fw1 = mask & _inside(d1, k1, 1, D1)
        bw1 = mask & _inside(d1, k1, -1, D1)
        for k2 in tl.static_range(3):
            fw12 = fw1 & _inside(d2, k2, 1, D2)
            bw12 = bw1 & _inside(d2, k2, -1, D2)
            for k3 in tl.static_range(3):
                shift = ((k1 - 1) * D2 + (k2 - 1)) * D3 + (k3 - 1)
                k = k1 * 9 + k2 * 3 + k3
                if NEED_WEIGHT:
                    fw = fw12 & _inside(d3, k3, 1, D3)
                    for ci in tl.static_range(2):
                        x = tl.load(p_ptr + (2 * n + ci) * volume + rel + shift, mask=fw, other=0.0)
                        tl.store(dw_part_ptr + pid * 54 + ci * 27 + k, tl.sum(x * dz, axis=0))
                if NEED_INPUT:
                    bw = bw12 & _inside(d3, k3, -1, D3)
                    dzk = tl.load(dz_ptr + i - shift, mask=bw, other=0.0)
                    dp0 += tl.load(w_ptr + k).to(ACC) * dzk
                    dp1 += tl.load(w_ptr + 27 + k).to(ACC) * dzk
    if NEED_INPUT:
        tl.store(dp_ptr + 2 * n * volume + rel, dp0, mask=mask)
        tl.store(dp_ptr + (2 * n + 1) * volume + rel, dp1, mask=mask)
