"""Float64 reference of the two-stage rule of ALGORITHM.md, one row at a time.

Written straight from the page and deliberately naive (NumPy, O(V²) top-p): tests
compare `kernels.combine` and the engine against it. Not used by the server.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Settings:
    gamma: float
    tau: float  # +inf for "null" (extrapolate at every position)
    generator: str  # "base" or "rl"
    candidates: int  # 0 = whole vocabulary
    temperature: float  # 0 = greedy
    top_p: float
    selection: str = "delta_logp"  # or "entropy" (H(softmax(gen)) ≥ τ), "random" (probability τ)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def top_p(p: np.ndarray, cutoff: float) -> np.ndarray:
    """Keep v when the mass of tokens strictly more probable than v is below cutoff."""
    if cutoff >= 1.0:
        return p / p.sum()
    keep = np.array([p[p > pv].sum() < cutoff for pv in p])
    kept = np.where(keep, p, 0.0)
    return kept / kept.sum()


def parts(rl_logits, base_logits, s: Settings):
    """Δ, the generator's logits, the candidate set S and e over S (−inf outside)."""
    rl = np.asarray(rl_logits, dtype=np.float64)
    base = np.asarray(base_logits, dtype=np.float64)
    a, b = log_softmax(rl), log_softmax(base)
    with np.errstate(invalid="ignore"):
        delta = np.where(np.isneginf(a), -np.inf, a - b)
        e_all = np.where(np.isneginf(a), -np.inf, (1 + s.gamma) * a - s.gamma * b)
    gen = base if s.generator == "base" else rl
    k = min(s.candidates, len(gen))
    in_s = gen >= np.sort(gen)[::-1][k - 1] if k > 0 else np.ones(len(gen), bool)
    if not np.any(in_s & np.isfinite(e_all)):
        in_s = np.ones(len(gen), bool)
    e = np.where(in_s, e_all, -np.inf)
    return delta, gen, e


def flag_probability(delta: np.ndarray, gen: np.ndarray, y0: int, s: Settings) -> float:
    """Probability that the position of proposal y0 is extrapolated, under s.selection."""
    if s.selection == "delta_logp":
        return float(delta[y0] <= s.tau)
    if s.selection == "entropy":
        p = softmax(gen)
        entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
        return float(entropy >= s.tau)
    return min(max(s.tau, 0.0), 1.0)  # random: a coin of probability τ


def two_stage_distribution(rl_logits, base_logits, s: Settings) -> np.ndarray:
    """The distribution of the emitted token under the two-stage rule (sampled rows),
    obtained by summing over the proposal y0 — not from the closed form."""
    delta, gen, e = parts(rl_logits, base_logits, s)
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    p_x = top_p(softmax(e / s.temperature), s.top_p)
    out = np.zeros_like(p_g)
    for y0 in np.nonzero(p_g)[0]:
        flag = flag_probability(delta, gen, y0, s)
        out[y0] += p_g[y0] * (1 - flag)  # keep y0
        out += p_g[y0] * flag * p_x  # redraw from p_x
    return out


def extrapolation_probability(rl_logits, base_logits, s: Settings) -> float:
    """Probability that the proposal is rejected (the position is extrapolated)."""
    delta, gen, _ = parts(rl_logits, base_logits, s)
    if s.temperature == 0:
        return flag_probability(delta, gen, int(np.argmax(gen)), s)
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    return float(sum(p_g[y0] * flag_probability(delta, gen, y0, s) for y0 in np.nonzero(p_g)[0]))


def greedy_token(rl_logits, base_logits, s: Settings) -> int:
    """Greedy rule: argmax of the generator; if that position is flagged, argmax of e over S.
    (Not for selection "random", whose flag is a coin.)"""
    delta, gen, e = parts(rl_logits, base_logits, s)
    y0 = int(np.argmax(gen))
    return int(np.argmax(e)) if flag_probability(delta, gen, y0, s) == 1.0 else y0


def sample_two_stage(rl_logits, base_logits, s: Settings, rng: np.random.Generator):
    """One draw of the two-stage sampler: (token, extrapolated?)."""
    delta, gen, e = parts(rl_logits, base_logits, s)
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    y0 = int(rng.choice(len(p_g), p=p_g))
    if rng.random() >= flag_probability(delta, gen, y0, s):
        return y0, False
    p_x = top_p(softmax(e / s.temperature), s.top_p)
    return int(rng.choice(len(p_x), p=p_x)), True
