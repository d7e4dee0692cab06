"""The rule of kernels/rule.py as one fused Triton kernel: one program per row.

Same inputs and outputs as `kernels.rule.combine` (log q for sampled rows, the greedy row
for greedy rows, the extrapolation probability M, optionally Δ). No sort of the
vocabulary: the top-k threshold of the generator and the top-p thresholds of p_g and
p_x are found by a k-ary search on the float32 values (mapped to order-preserving
integers): each search pass reads the row once and counts, for NB candidate thresholds
at once, how many tokens (top-k) or how much probability (top-p) lies at or above each;
7 passes pin the threshold to one float32 value, so the kept sets are exactly those of
the definition (ties included).

Passes over the two logit rows, per row:
  1      log-sum-exp of a, b and g/T (online), argmax of g;
  0 | 7  top-k threshold of g (only when 0 < k < V);
  1      log-sum-exp of e/T over S (and over all tokens, for the widening rule);
  0 | 7  top-p threshold of p_g (sampled rows with top_p < 1);
  0 | 7  top-p threshold of p_x (sampled rows with top_p < 1);
  1      kept masses of p_g and p_x, and M;
  1      write the output row (and Δ).
Every pass reads both rows (4 bytes per token each for fp32, 2 for bf16); the output
pass writes 4 bytes per token (8 with Δ). Per-row parameters are tensors: one compiled
kernel serves every request mix, and nothing waits on the host.

A row without a distribution (a NaN or +inf logit in either row, or a row all −inf) comes
out as in kernels/rule.py: NaN output and Δ, M = 0.
"""

import torch
import triton
import triton.language as tl

from kernels.rule import GREEDY_EPS, Combined, RowSettings

NB = 32  # candidate thresholds per search pass
SEARCH_PASSES = 7  # (NB + 1)^7 > 2^33: enough to pin a 32-bit key
KEY_LO = -(2**31) - 1  # below every key
KEY_HI = 2**31  # above every key


@triton.jit
def _key(x):
    """float32 → int64, order-preserving (−inf smallest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _block(rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr):
    """Per-token quantities of one block: (valid, banned, Δ, g/T, key(g), e/T over S, e/T over all)."""
    valid = offs < V
    x_rl = tl.load(rl_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x_b = tl.load(base_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    a = x_rl - lse_a
    b = x_b - lse_b
    banned = x_rl == float("-inf")
    delta = tl.where(banned, float("-inf"), a - b)
    g = tl.where(use_base, x_b, x_rl)
    g_key = _key(g)
    e_all = tl.where(banned | ~valid, float("-inf"), ((1.0 + gamma) * a - gamma * b) * inv_t)
    e_s = tl.where(g_key >= k_thr, e_all, float("-inf"))
    return valid, banned, delta, g * inv_t, g_key, e_s, e_all


@triton.jit
def _lse_merge(m, s, x):
    """Online log-sum-exp per lane: fold x into (max m, scaled sum s)."""
    m_new = tl.maximum(m, x)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
    add = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
    return m_new, s * scale + add


@triton.jit
def _lse_final(m, s):
    mx = tl.max(m, axis=0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), axis=0)
    return mx + tl.log(total)


@triton.jit
def _search_step(lo, hi, acc, target, thr):
    """Narrow [lo, hi) to the thresholds bracketing 'mass at or above < target'."""
    ok = acc >= target
    lo = tl.maximum(lo, tl.max(tl.where(ok, thr, lo), axis=0))
    hi = tl.minimum(hi, tl.min(tl.where(ok, hi, thr), axis=0))
    return lo, hi


@triton.jit
def _threshold(rl_ptr, base_ptr, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr, lse, target,
               MODE: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, PASSES: tl.constexpr,
               KEY_LO: tl.constexpr, KEY_HI: tl.constexpr):
    """k-ary search for the smallest kept key: MODE 0 counts tokens of g (top-k, target k),
    1 sums p_g = softmax(g/T), 2 sums p_x = softmax(e/T over S) (top-p, target top_p).
    Returns t such that the kept set is {key >= t}."""
    lanes = tl.arange(0, BLOCK)
    j = (tl.arange(0, NB) + 1).to(tl.int64)
    lo = tl.full([], KEY_LO, tl.int64)
    hi = tl.full([], KEY_HI, tl.int64)
    for _ in tl.static_range(PASSES):
        thr = lo + ((hi - lo) * j) // (NB + 1)
        acc = tl.zeros([NB], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            valid, banned, delta, gs, g_key, e_s, e_all = _block(
                rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
            if MODE == 0:
                key = g_key
                weight = valid.to(tl.float32)
            elif MODE == 1:
                key = _key(gs)
                weight = tl.where(valid, tl.exp(gs - lse), 0.0)
            else:
                key = _key(e_s)
                weight = tl.exp(e_s - lse)
            acc += tl.sum(tl.where(key[:, None] >= thr[None, :], weight[:, None], 0.0), axis=0)
        lo, hi = _search_step(lo, hi, acc, target, thr)
    return hi - 1


@triton.jit
def _combine_kernel(
    rl_ptr, base_ptr, out_ptr, delta_ptr, prob_ptr,
    gamma_ptr, tau_ptr, use_base_ptr, cand_ptr, temp_ptr, top_p_ptr,
    V, stride_rl, stride_base, stride_out,
    WRITE_DELTA: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, PASSES: tl.constexpr,
    KEY_LO: tl.constexpr, KEY_HI: tl.constexpr, GREEDY_EPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    rl_ptr += row * stride_rl
    base_ptr += row * stride_base
    out_ptr += row * stride_out
    gamma = tl.load(gamma_ptr + row)
    tau = tl.load(tau_ptr + row)
    use_base = tl.load(use_base_ptr + row) != 0
    k = tl.load(cand_ptr + row)
    temp = tl.load(temp_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    greedy = temp < GREEDY_EPS
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    lanes = tl.arange(0, BLOCK)

    # Pass 1: log-sum-exp of both rows and of g/T; argmax of g (first index on ties).
    m_a = tl.full([BLOCK], float("-inf"), tl.float32)
    s_a = tl.zeros([BLOCK], tl.float32)
    m_b = tl.full([BLOCK], float("-inf"), tl.float32)
    s_b = tl.zeros([BLOCK], tl.float32)
    m_g = tl.full([BLOCK], float("-inf"), tl.float32)
    s_g = tl.zeros([BLOCK], tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2**62, tl.int64)
    not_finite = tl.zeros([BLOCK], tl.int32)  # lanes that saw a NaN or +inf
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid = offs < V
        x_rl = tl.load(rl_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        x_b = tl.load(base_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        not_finite |= (valid & ~((x_rl < float("inf")) & (x_b < float("inf")))).to(tl.int32)
        g = tl.where(use_base, x_b, x_rl)
        m_a, s_a = _lse_merge(m_a, s_a, x_rl)
        m_b, s_b = _lse_merge(m_b, s_b, x_b)
        m_g, s_g = _lse_merge(m_g, s_g, g * inv_t)
        better = valid & ((g > best) | ((best_i == 2**62) & (g == best)))
        best = tl.where(better, g, best)
        best_i = tl.where(better, offs.to(tl.int64), best_i)
    lse_a = _lse_final(m_a, s_a)
    lse_b = _lse_final(m_b, s_b)
    lse_g = _lse_final(m_g, s_g)
    g_max = tl.max(best, axis=0)
    # An all-NaN g never beats −inf and leaves the index unset: clamp it, the loads of y0
    # below are unmasked (the row is NaN in the end anyway).
    y0 = tl.minimum(tl.min(tl.where(best == g_max, best_i, 2**62), axis=0), V - 1)
    broken = (tl.max(not_finite, axis=0) > 0) | (tl.max(m_a, axis=0) == float("-inf")) | (
        tl.max(m_b, axis=0) == float("-inf"))

    # Top-k threshold of g: kept = key(g) >= k_thr (all tokens when k is 0 or >= V).
    k_thr = tl.full([], KEY_LO, tl.int64)
    if (k > 0) & (k < V):
        k_thr = _threshold(rl_ptr, base_ptr, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr, 0.0,
                           k.to(tl.float32), 0, BLOCK, NB, PASSES, KEY_LO, KEY_HI)

    # Pass: log-sum-exp of e/T over S and over all tokens; whether S has a finite e.
    m_s = tl.full([BLOCK], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK], tl.float32)
    m_all = tl.full([BLOCK], float("-inf"), tl.float32)
    s_all = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid, banned, delta, gs, g_key, e_s, e_all = _block(
            rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
        m_s, s_s = _lse_merge(m_s, s_s, e_s)
        m_all, s_all = _lse_merge(m_all, s_all, e_all)
    if tl.max(m_s, axis=0) == float("-inf"):  # no candidate survives: widen S to all tokens
        k_thr = tl.full([], KEY_LO, tl.int64)
        lse_e = _lse_final(m_all, s_all)
    else:
        lse_e = _lse_final(m_s, s_s)

    # Top-p thresholds of p_g = softmax(g/T) and p_x = softmax(e/T over S).
    g_thr = tl.full([], KEY_LO, tl.int64)
    x_thr = tl.full([], KEY_LO, tl.int64)
    if (temp >= GREEDY_EPS) & (top_p < 1.0):
        g_thr = _threshold(rl_ptr, base_ptr, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr, lse_g, top_p,
                           1, BLOCK, NB, PASSES, KEY_LO, KEY_HI)
        x_thr = _threshold(rl_ptr, base_ptr, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr, lse_e, top_p,
                           2, BLOCK, NB, PASSES, KEY_LO, KEY_HI)

    # Pass: kept masses of p_g and p_x, and M (the mass of p_g on Δ <= τ).
    z_g = tl.zeros([BLOCK], tl.float32)
    m_flag = tl.zeros([BLOCK], tl.float32)
    z_x = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid, banned, delta, gs, g_key, e_s, e_all = _block(
            rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
        p_g = tl.where(valid & (_key(gs) >= g_thr), tl.exp(gs - lse_g), 0.0)
        z_g += p_g
        m_flag += tl.where(delta <= tau, p_g, 0.0)
        z_x += tl.where(_key(e_s) >= x_thr, tl.exp(e_s - lse_e), 0.0)
    log_z_g = tl.log(tl.sum(z_g, axis=0))
    log_z_x = tl.log(tl.sum(z_x, axis=0))
    prob = tl.minimum(tl.sum(m_flag, axis=0) / tl.sum(z_g, axis=0), 1.0)

    # Greedy rows: extrapolate when Δ(argmax g) <= τ.
    a_y0 = tl.load(rl_ptr + y0).to(tl.float32) - lse_a
    b_y0 = tl.load(base_ptr + y0).to(tl.float32) - lse_b
    delta_y0 = tl.where(a_y0 == float("-inf"), float("-inf"), a_y0 - b_y0)
    greedy_flag = delta_y0 <= tau
    log_m = tl.log(prob)

    # Output pass.
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid, banned, delta, gs, g_key, e_s, e_all = _block(
            rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
        log_pg = tl.where(_key(gs) >= g_thr, gs - lse_g - log_z_g, float("-inf"))
        log_px = tl.where(_key(e_s) >= x_thr, e_s - lse_e - log_z_x, float("-inf"))
        kept = tl.where(delta > tau, log_pg, float("-inf"))
        redrawn = log_m + log_px
        hi_v = tl.maximum(kept, redrawn)
        lo_v = tl.minimum(kept, redrawn)
        log_q = tl.where(hi_v == float("-inf"), float("-inf"), hi_v + tl.log(1.0 + tl.exp(lo_v - hi_v)))
        out = tl.where(greedy, tl.where(greedy_flag, e_s, gs), log_q)
        tl.store(out_ptr + offs, tl.where(broken, float("nan"), out), mask=valid)
        if WRITE_DELTA:
            tl.store(delta_ptr + row * stride_out + offs, tl.where(broken, float("nan"), delta), mask=valid)
    tl.store(prob_ptr + row, tl.where(broken, 0.0, tl.where(greedy, greedy_flag.to(tl.float32), prob)))


def combine(
    rl_logits: torch.Tensor, base_logits: torch.Tensor, settings: RowSettings, want_delta: bool = False,
    out: torch.Tensor | None = None, block: int = 256,
) -> Combined:
    """`kernels.rule.combine`, fused.

    `out` (float32 [N, V], unit stride in V) receives the output rows; it may be
    `rl_logits` itself: each program reads its row for the last time in the pass that
    writes it, block by block, so writing in place is safe.
    """
    rows, vocab = rl_logits.shape
    rl_logits = rl_logits if rl_logits.stride(1) == 1 else rl_logits.contiguous()
    base_logits = base_logits if base_logits.stride(1) == 1 else base_logits.contiguous()
    if out is None:
        out = torch.empty((rows, vocab), dtype=torch.float32, device=rl_logits.device)
    assert out.dtype == torch.float32 and out.shape == (rows, vocab) and out.stride(1) == 1
    delta = torch.empty_like(out) if want_delta else out
    prob = torch.empty(rows, dtype=torch.float32, device=rl_logits.device)
    if rows:
        _combine_kernel[(rows,)](
            rl_logits, base_logits, out, delta, prob,
            settings.gamma, settings.tau, settings.use_base.to(torch.int8), settings.candidates,
            settings.temperature, settings.top_p,
            vocab, rl_logits.stride(0), base_logits.stride(0), out.stride(0),
            WRITE_DELTA=want_delta, BLOCK=block, NB=NB, PASSES=SEARCH_PASSES,
            KEY_LO=KEY_LO, KEY_HI=KEY_HI, GREEDY_EPS=GREEDY_EPS,
        )
    return Combined(out, prob, delta if want_delta else None)
