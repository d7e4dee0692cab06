"""The rule of kernels/rule.py as one fused Triton kernel: one program per row.

Same inputs and outputs as `kernels.rule.combine` (log q for sampled rows, the greedy row
for greedy rows, the extrapolation probability M, optionally Δ). No sort of the
vocabulary: the top-k threshold of the generator and the top-p thresholds of p_g and
p_x are found by a k-ary search on the float32 values (mapped to order-preserving
integers): each search pass counts, for NB candidate thresholds at once, how many tokens
(top-k) or how much probability (top-p) lies at or above each; 7 passes pin the threshold
to one float32 value, so the kept sets are exactly those of the definition (ties included).
The top-k and p_g searches need only the generator's row and share its passes; p_x lives
on the candidate set S, whose finite values are compacted once into a scratch row, so its
search reads those (k at the paper setting) values, not the vocabulary.

Passes over the logit rows, per row:
  1      both rows: log-sum-exp of a, b and g/T (online), argmax of g;
  0 | 7  the generator's row only: top-k threshold of g (when 0 < k < V) and top-p
         threshold of p_g (sampled rows with top_p < 1), searched together;
  1      both rows: log-sum-exp of e/T over S (and over all tokens, for the widening
         rule), kept mass of p_g and M, S compacted (up to S_CAP values);
  0 | 7  both rows: top-p threshold of p_x, only when S does not fit the scratch row
         (k = 0, more than S_CAP candidates, or S widened to every token) — else 7
         passes over the compacted values;
  1      both rows: write the output row (and Δ).
So 10 passes at the paper setting (k = 50, top-p 0.7), 7 of them over one row. Reading a
row costs 4 bytes per token for fp32, 2 for bf16/fp16; the output pass writes 4 bytes per
token (8 with Δ). Per-row parameters are tensors: one compiled kernel serves every request
mix, and nothing waits on the host.

A row without a distribution (a NaN or +inf logit in either row, or a row all −inf) comes
out as in kernels/rule.py: NaN output and Δ, M = 0.
"""

import torch
import triton
import triton.language as tl

from rlvrx.kernels.rule import GREEDY_EPS, Combined, RowSettings

NB = 32  # candidate thresholds per search pass
SEARCH_PASSES = 7  # (NB + 1)^7 > 2^33: enough to pin a 32-bit key
KEY_LO = -(2**31)  # the smallest key: "every token"
KEY_HI = 2**31  # above every key
S_CAP = 1024  # finite candidate values compacted per row; a larger S is searched on the full rows
BLOCK = 256  # tokens per step of a pass
NUM_WARPS = 8
# Left to choose, ptxas capped the registers at an occupancy target of its own and spilled
# (sm_80, 4 warps: 64 registers, 4 words); given this cap it takes what the kernel needs
# (about 110). tests/test_kernel_compile.py checks every variant for spills.
MAX_REGISTERS = 128


@triton.jit
def _key(x):
    """float32 → int32, order-preserving (−inf below every number)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _block(rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr):
    """Per-token quantities of one block: (valid, Δ, g/T, e/T over S, e/T over all)."""
    valid = offs < V
    x_rl = tl.load(rl_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x_b = tl.load(base_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    a = x_rl - lse_a
    b = x_b - lse_b
    banned = x_rl == float("-inf")
    delta = tl.where(banned, float("-inf"), a - b)
    g = tl.where(use_base, x_b, x_rl)
    e_all = tl.where(banned | ~valid, float("-inf"), ((1.0 + gamma) * a - gamma * b) * inv_t)
    e_s = tl.where(_key(g) >= k_thr, e_all, float("-inf"))
    return valid, delta, g * inv_t, e_s, e_all


@triton.jit
def _load_g(rl_ptr, base_ptr, offs, valid, use_base):
    """The generator's raw logits at offs (float32); the other row is not read."""
    if use_base:
        g = tl.load(base_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    else:
        g = tl.load(rl_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    return g


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
def _cuts(lo, hi, NB: tl.constexpr):
    """NB thresholds splitting [lo, hi) evenly: int64 arithmetic (hi − lo reaches 2^32), int32
    results (lo <= cut < hi <= 2^31), so that the comparisons with the keys are 32-bit."""
    j = (tl.arange(0, NB) + 1).to(tl.int64)
    return (lo + ((hi - lo) * j) // (NB + 1)).to(tl.int32)


@triton.jit
def _mass_at_or_above(key, weight, cut):
    """For each cut, the weight of the lanes whose key is at or above it."""
    return tl.sum(tl.where(key[:, None] >= cut[None, :], weight[:, None], 0.0), axis=0)


@triton.jit
def _narrow(lo, hi, mass_lo, acc, target, cut):
    """One step of the k-ary search for the largest t with weight(key >= t) >= target — the
    smallest kept key, for top-k (weight 1, target k) and top-p (weight p, target top_p)
    alike: [lo, hi) shrinks to the cuts around t; mass_lo, the weight at or above lo, follows."""
    ok = acc >= target
    new_lo = tl.maximum(lo, tl.max(tl.where(ok, cut, lo), axis=0))
    mass_lo = tl.where(new_lo > lo, tl.min(tl.where(ok, acc, float("inf")), axis=0), mass_lo)
    hi = tl.minimum(hi, tl.min(tl.where(ok, hi, cut), axis=0))
    return new_lo, hi, mass_lo


@triton.jit
def _g_thresholds(rl_ptr, base_ptr, V, use_base, inv_t, lse_g, k, top_p, find_k, find_p,
                  BLOCK: tl.constexpr, NB: tl.constexpr, PASSES: tl.constexpr,
                  KEY_LO: tl.constexpr, KEY_HI: tl.constexpr):
    """Smallest kept keys of the top-k set of g (when find_k) and of the top-p set of
    p_g = softmax(g/T) (when find_p), searched in the same passes over the generator's row;
    KEY_LO (every token) for a search not asked for."""
    lanes = tl.arange(0, BLOCK)
    k_lo = tl.full([], KEY_LO, tl.int64)
    k_hi = tl.full([], KEY_HI, tl.int64)
    p_lo = tl.full([], KEY_LO, tl.int64)
    p_hi = tl.full([], KEY_HI, tl.int64)
    for _ in tl.static_range(PASSES):
        k_cut = _cuts(k_lo, k_hi, NB)
        p_cut = _cuts(p_lo, p_hi, NB)
        k_acc = tl.zeros([NB], tl.float32)
        p_acc = tl.zeros([NB], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            valid = offs < V
            g = _load_g(rl_ptr, base_ptr, offs, valid, use_base)
            if find_k:
                k_acc += _mass_at_or_above(_key(g), valid.to(tl.float32), k_cut)
            if find_p:
                gs = g * inv_t
                p_acc += _mass_at_or_above(_key(gs), tl.where(valid, tl.exp(gs - lse_g), 0.0), p_cut)
        k_lo, k_hi, _ = _narrow(k_lo, k_hi, 0.0, k_acc, k.to(tl.float32), k_cut)
        p_lo, p_hi, _ = _narrow(p_lo, p_hi, 0.0, p_acc, top_p, p_cut)
    return tl.where(find_k, k_lo, KEY_LO).to(tl.int32), tl.where(find_p, p_lo, KEY_LO).to(tl.int32)


@triton.jit
def _x_threshold(rl_ptr, base_ptr, s_ptr, n_s, compact, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr, lse_e,
                 top_p, BLOCK: tl.constexpr, NB: tl.constexpr, PASSES: tl.constexpr,
                 KEY_LO: tl.constexpr, KEY_HI: tl.constexpr):
    """Smallest kept key of the top-p set of p_x = softmax(e/T over S), and the kept mass:
    searched over the n_s compacted values of S when `compact`, else over the full rows."""
    lanes = tl.arange(0, BLOCK)
    n = tl.where(compact, n_s, V)
    lo = tl.full([], KEY_LO, tl.int64)
    hi = tl.full([], KEY_HI, tl.int64)
    mass = tl.full([], 1.0, tl.float32)
    for _ in tl.static_range(PASSES):
        cut = _cuts(lo, hi, NB)
        acc = tl.zeros([NB], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + lanes
            if compact:
                e_s = tl.load(s_ptr + offs, mask=offs < n, other=float("-inf"))
            else:
                valid, delta, gs, e_s, e_all = _block(
                    rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
            acc += _mass_at_or_above(_key(e_s), tl.exp(e_s - lse_e), cut)
        lo, hi, mass = _narrow(lo, hi, mass, acc, top_p, cut)
    return lo.to(tl.int32), mass


@triton.jit
def _combine_kernel(
    rl_ptr, base_ptr, out_ptr, delta_ptr, prob_ptr, s_ptr,
    gamma_ptr, tau_ptr, use_base_ptr, cand_ptr, temp_ptr, top_p_ptr,
    V, stride_rl, stride_base, stride_out,
    WRITE_DELTA: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, PASSES: tl.constexpr,
    KEY_LO: tl.constexpr, KEY_HI: tl.constexpr, GREEDY_EPS: tl.constexpr, S_CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    rl_ptr += row * stride_rl
    base_ptr += row * stride_base
    out_ptr += row * stride_out
    s_ptr += row * S_CAP
    gamma = tl.load(gamma_ptr + row)
    tau = tl.load(tau_ptr + row)
    use_base = tl.load(use_base_ptr + row) != 0
    k = tl.load(cand_ptr + row)
    temp = tl.load(temp_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    greedy = temp < GREEDY_EPS
    find_top_p = ~greedy & (top_p < 1.0)
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

    # Greedy rows: extrapolate when Δ(argmax g) <= τ.
    a_y0 = tl.load(rl_ptr + y0).to(tl.float32) - lse_a
    b_y0 = tl.load(base_ptr + y0).to(tl.float32) - lse_b
    delta_y0 = tl.where(a_y0 == float("-inf"), float("-inf"), a_y0 - b_y0)
    greedy_flag = delta_y0 <= tau

    # Top-k threshold of g (kept: key(g) >= k_thr; every token when k is 0 or >= V) and
    # top-p threshold of p_g, from the generator's row alone.
    k_thr = tl.full([], KEY_LO, tl.int32)
    g_thr = tl.full([], KEY_LO, tl.int32)
    find_k = (k > 0) & (k < V)
    if find_k | find_top_p:
        k_thr, g_thr = _g_thresholds(rl_ptr, base_ptr, V, use_base, inv_t, lse_g, k, top_p, find_k, find_top_p,
                                     BLOCK, NB, PASSES, KEY_LO, KEY_HI)

    # Pass: log-sum-exp of e/T over S and over all tokens; kept mass of p_g and M (its mass
    # on Δ <= τ); S's finite e/T values compacted into the scratch row, n_s counting them.
    m_s = tl.full([BLOCK], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK], tl.float32)
    m_all = tl.full([BLOCK], float("-inf"), tl.float32)
    s_all = tl.zeros([BLOCK], tl.float32)
    z_g = tl.zeros([BLOCK], tl.float32)
    m_flag = tl.zeros([BLOCK], tl.float32)
    n_s = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid, delta, gs, e_s, e_all = _block(rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
        m_s, s_s = _lse_merge(m_s, s_s, e_s)
        m_all, s_all = _lse_merge(m_all, s_all, e_all)
        p_g = tl.where(valid & (_key(gs) >= g_thr), tl.exp(gs - lse_g), 0.0)
        z_g += p_g
        m_flag += tl.where(delta <= tau, p_g, 0.0)
        finite = (e_s > float("-inf")).to(tl.int32)
        slot = n_s + tl.cumsum(finite, axis=0) - 1
        tl.store(s_ptr + slot, e_s, mask=(finite != 0) & (slot < S_CAP))
        n_s += tl.sum(finite, axis=0)
    tl.debug_barrier()  # the p_x search reads slots that other threads of the program wrote
    if n_s == 0:  # no candidate has a finite e: widen S to all tokens
        k_thr = tl.full([], KEY_LO, tl.int32)
        lse_e = _lse_final(m_all, s_all)
    else:
        lse_e = _lse_final(m_s, s_s)
    prob = tl.minimum(tl.sum(m_flag, axis=0) / tl.sum(z_g, axis=0), 1.0)

    # Top-p threshold of p_x and its kept mass (1 when everything is kept).
    x_thr = tl.full([], KEY_LO, tl.int32)
    z_x = tl.full([], 1.0, tl.float32)
    if find_top_p:
        x_thr, z_x = _x_threshold(rl_ptr, base_ptr, s_ptr, n_s, (n_s > 0) & (n_s <= S_CAP), V, lse_a, lse_b, gamma,
                                  use_base, inv_t, k_thr, lse_e, top_p, BLOCK, NB, PASSES, KEY_LO, KEY_HI)
    log_z_g = tl.log(tl.sum(z_g, axis=0))
    log_z_x = tl.log(z_x)
    log_m = tl.log(prob)

    # Output pass.
    for start in range(0, V, BLOCK):
        offs = start + lanes
        valid, delta, gs, e_s, e_all = _block(rl_ptr, base_ptr, offs, V, lse_a, lse_b, gamma, use_base, inv_t, k_thr)
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
    out: torch.Tensor | None = None, block: int = BLOCK, s_cap: int = S_CAP,
) -> Combined:
    """`kernels.rule.combine`, fused.

    `out` (float32 [N, V], unit stride in V) receives the output rows; it may be
    `rl_logits` itself: each program reads its row for the last time in the pass that
    writes it, block by block, so writing in place is safe. `block` (tokens per step of a
    pass) and `s_cap` (compacted candidates per row) change the speed, not the outputs.
    """
    rows, vocab = rl_logits.shape
    rl_logits = rl_logits if rl_logits.stride(1) == 1 else rl_logits.contiguous()
    base_logits = base_logits if base_logits.stride(1) == 1 else base_logits.contiguous()
    if out is None:
        out = torch.empty((rows, vocab), dtype=torch.float32, device=rl_logits.device)
    assert out.dtype == torch.float32 and out.shape == (rows, vocab) and out.stride(1) == 1
    delta = torch.empty_like(out) if want_delta else out
    prob = torch.empty(rows, dtype=torch.float32, device=rl_logits.device)
    scratch = torch.empty((rows, s_cap), dtype=torch.float32, device=rl_logits.device)
    if rows:
        _combine_kernel[(rows,)](
            rl_logits, base_logits, out, delta, prob, scratch,
            settings.gamma, settings.tau, settings.use_base.to(torch.int8), settings.candidates,
            settings.temperature, settings.top_p,
            vocab, rl_logits.stride(0), base_logits.stride(0), out.stride(0),
            WRITE_DELTA=want_delta, BLOCK=block, NB=NB, PASSES=SEARCH_PASSES, KEY_LO=KEY_LO, KEY_HI=KEY_HI,
            GREEDY_EPS=GREEDY_EPS, S_CAP=s_cap, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
        )
    return Combined(out, prob, delta if want_delta else None)
