"""The Triton source of :mod:`core.w2_kernel` (imported only when the kernel is first launched, so that importing
``core`` does not import triton, and ``TRITON_INTERPRET`` can still be set before). Documented there."""

import triton
import triton.language as tl


# Sizes and strides vary between calls (contiguous sets, the decoder's strided output): not specialised on, so
# they do not recompile the kernel.
@triton.jit(do_not_specialize=["n", "sp_n", "sp_k", "sp_d", "st_n", "st_k", "st_d", "sv_n", "sv_k", "sc_n", "sc_i",
                               "sc_j"])
def w2_assignment_kernel(
    pred_ptr, target_ptr, valid_ptr, cost_ptr, perm_ptr, n,
    sp_n, sp_k, sp_d, st_n, st_k, st_d, sv_n, sv_k, sc_n, sc_i, sc_j,
    K: tl.constexpr, D: tl.constexpr, FROM_COST: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr,
):
    M: tl.constexpr = 1 << K
    sets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (B,)
    live = sets < n
    masks = tl.arange(0, M)  # (M,)
    bits = tl.zeros((M,), dtype=tl.int32)
    for j in tl.static_range(K):
        bits += (masks >> j) & 1
    dp = tl.where(masks == 0, 0.0, float("inf"))[None, :] + tl.zeros((BLOCK, M), dtype=tl.float32)
    choice = tl.zeros((BLOCK, M), dtype=tl.int8)
    for p in tl.static_range(1, K + 1):
        # Candidates dp[m ^ 2^j] + C[p-1, j], scanned in increasing j: first minimum, NaN first as torch.min.
        best = tl.full((BLOCK, M), float("inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK, M), dtype=tl.int8)
        seen = tl.zeros((BLOCK, M), dtype=tl.int1)
        for j in tl.static_range(K):
            if FROM_COST:
                c = tl.load(cost_ptr + sets * sc_n + (p - 1) * sc_i + j * sc_j, mask=live, other=0.0).to(tl.float32)
            else:
                c = tl.zeros((BLOCK,), dtype=tl.float32)
                for d in tl.static_range(D):
                    a = tl.load(pred_ptr + sets * sp_n + (p - 1) * sp_k + d * sp_d, mask=live, other=0.0)
                    b = tl.load(target_ptr + sets * st_n + j * st_k + d * st_d, mask=live, other=0.0)
                    diff = a.to(tl.float32) - b.to(tl.float32)
                    c += diff * diff
                if HAS_VALID:
                    vi = tl.load(valid_ptr + sets * sv_n + (p - 1) * sv_k, mask=live, other=1) != 0
                    vj = tl.load(valid_ptr + sets * sv_n + j * sv_k, mask=live, other=1) != 0
                    c = tl.where(vi & vj, c, tl.where(vi != vj, float("inf"), 0.0))
            prev = tl.gather(dp, (masks ^ (1 << j))[None, :] + tl.zeros((BLOCK, M), dtype=tl.int32), axis=1)
            cand = prev + c[:, None]
            has = (((masks >> j) & 1) == 1)[None, :]
            take = has & ((~seen) | (cand < best) | ((cand != cand) & (best == best)))
            best = tl.where(take, cand, best)
            arg = tl.where(take, j, arg).to(tl.int8)
            seen = seen | has
        layer = (bits == p)[None, :]
        dp = tl.where(layer, best, dp)
        choice = tl.where(layer, arg, choice)
    # Walk back from the full set: row K-1 took choice[full], and so on.
    cur = tl.full((BLOCK,), M - 1, dtype=tl.int32)
    for r in tl.static_range(K):
        row = K - 1 - r
        col = tl.sum(tl.where(masks[None, :] == cur[:, None], choice.to(tl.int32), 0), axis=1)
        tl.store(perm_ptr + sets * K + row, col.to(tl.int64), mask=live)
        cur = cur ^ (1 << col)
