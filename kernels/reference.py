"""Float64 reference of the two-stage rule of ALGORITHM.md, one row at a time.

Written straight from the page in NumPy (a sort per row, O(V log V), so it also runs at real
vocabularies such as SmolLM2's 49,152 tokens): tests compare `kernels.combine` and the engine
against it. Not used by the server.
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
    ascending = np.sort(p)
    # Tokens strictly more probable than v are the last (V − #{u : p(u) ≤ p(v)}) of `ascending`;
    # their mass is a prefix sum of the descending order, so ties are never split.
    strictly_more = len(p) - np.searchsorted(ascending, p, side="right")
    mass_before = np.concatenate(([0.0], np.cumsum(ascending[::-1])))
    kept = np.where(mass_before[strictly_more] < cutoff, p, 0.0)
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


def flag_probabilities(delta: np.ndarray, gen: np.ndarray, s: Settings) -> np.ndarray:
    """Per proposal y0: the probability that its position is extrapolated, under s.selection."""
    if s.selection == "delta_logp":
        return (delta <= s.tau).astype(np.float64)
    if s.selection == "entropy":
        p = softmax(gen)
        entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
        return np.full(len(gen), float(entropy >= s.tau))
    return np.full(len(gen), min(max(s.tau, 0.0), 1.0))  # random: a coin of probability τ


def two_stage_distribution(rl_logits, base_logits, s: Settings) -> np.ndarray:
    """The distribution of the emitted token under the two-stage rule (sampled rows),
    obtained by summing over the proposal y0 — not from the closed form: y0 is kept with
    probability p_g(y0)·(1 − flag(y0)) and redrawn from p_x with p_g(y0)·flag(y0)."""
    delta, gen, e = parts(rl_logits, base_logits, s)
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    p_x = top_p(softmax(e / s.temperature), s.top_p)
    flag = flag_probabilities(delta, gen, s)
    return p_g * (1 - flag) + np.sum(p_g * flag) * p_x


def extrapolation_probability(rl_logits, base_logits, s: Settings) -> float:
    """Probability that the proposal is rejected (the position is extrapolated)."""
    delta, gen, _ = parts(rl_logits, base_logits, s)
    if s.temperature == 0:
        return flag_probabilities(delta, gen, s)[int(np.argmax(gen))]
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    return float(np.sum(p_g * flag_probabilities(delta, gen, s)))


def greedy_token(rl_logits, base_logits, s: Settings) -> int:
    """Greedy rule: argmax of the generator; if that position is flagged, argmax of e over S.
    (Not for selection "random", whose flag is a coin.)"""
    delta, gen, e = parts(rl_logits, base_logits, s)
    y0 = int(np.argmax(gen))
    return int(np.argmax(e)) if flag_probabilities(delta, gen, s)[y0] == 1.0 else y0


def sample_two_stage(rl_logits, base_logits, s: Settings, rng: np.random.Generator):
    """One draw of the two-stage sampler: (token, extrapolated?)."""
    delta, gen, e = parts(rl_logits, base_logits, s)
    p_g = top_p(softmax(gen / s.temperature), s.top_p)
    y0 = int(rng.choice(len(p_g), p=p_g))
    if rng.random() >= flag_probabilities(delta, gen, s)[y0]:
        return y0, False
    p_x = top_p(softmax(e / s.temperature), s.top_p)
    return int(rng.choice(len(p_x), p=p_x)), True
