"""The extrapolation rule of ALGORITHM.md as one batched PyTorch function.

`combine` turns the raw logit rows of the RL and the base model into the row the
engine's sampler draws from, for a batch whose rows each carry their own γ, τ,
generator, candidates (top-k), temperature and top-p:

* sampled rows (temperature > 0): log q, where
  q = p_g·1[Δ > τ] + M·p_x and M = Σ_{Δ(u) ≤ τ} p_g(u)
  (temperature and top-p are already applied; the sampler must not apply them again);
* greedy rows (temperature == 0): a row whose argmax is the greedy pick of the rule —
  the generator's raw logits when Δ(argmax ℓ_g) > τ, else e = (1+γ)·a − γ·b on the
  candidate set S, −inf elsewhere.

Rows may use another selection criterion than Δlog p (the baselines of the paper's
token-replacement curve), where the flag belongs to the position, not the proposal:
`entropy` flags it when the entropy (nats) of the generator's raw distribution softmax(ℓ_g)
is ≥ τ, `random` flags it with probability τ. Then q = (1 − M)·p_g + M·p_x with M the
flag's probability; a greedy `random` row flips its coin with torch's default generator.

It also returns, per row, the probability M that the position is extrapolated
(0 or 1 for greedy rows), and on request Δ = a − b for every token (for statistics of
the emitted tokens). The fused Triton kernel (kernels/triton_combine.py, when it
exists) computes the same two outputs; `kernels.combine` picks the implementation.

Conventions for masked tokens (−inf logits, e.g. from allowed-token or bad-words masks,
which the engine applies to both rows): a token whose RL log-prob is −inf gets Δ = −inf
and e = −inf, so it is never emitted. If no candidate has a finite e, the candidate set
widens to the whole vocabulary.

A row without a distribution — a NaN or +inf logit in either model (an fp16 overflow), or
every logit −inf — has no rule: its output row and Δ are NaN (what vLLM's sampler would get
from the model's own logits; it still draws an in-range token id), and M = 0 (nothing is
counted as extrapolated). The fused kernel does the same.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

GREEDY_EPS = 1e-5  # vLLM's threshold: temperature below this samples greedily


@dataclass(frozen=True)
class RowSettings:
    """Per-row extrapolation settings; every field has shape [num_rows]."""

    gamma: torch.Tensor  # float32, extrapolation strength γ
    tau: torch.Tensor  # float32, threshold τ on Δ of the proposal (+inf = always)
    use_base: torch.Tensor  # bool, True when the base model proposes tokens
    candidates: torch.Tensor  # int64, top-k of the generator's raw logits; 0 = all
    temperature: torch.Tensor  # float32, 0 = greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    selection: torch.Tensor | None = None  # int64 SELECTION codes; None = Δlog p on every row

    @classmethod
    def uniform(cls, rows: int, gamma: float, tau: float, generator: str, candidates: int, temperature: float,
                top_p: float, device: torch.device | str = "cpu") -> "RowSettings":
        """The same settings on every one of `rows` rows (Δlog p selection)."""
        def full(value, dtype):
            return torch.full((rows,), value, dtype=dtype, device=device)

        return cls(gamma=full(gamma, torch.float32), tau=full(tau, torch.float32),
                   use_base=full(generator == "base", torch.bool), candidates=full(candidates, torch.int64),
                   temperature=full(temperature, torch.float32), top_p=full(top_p, torch.float32))

    def select(self, rows: torch.Tensor) -> "RowSettings":
        """The settings of a subset of rows (an index tensor)."""
        picked = {f: getattr(self, f).index_select(0, rows) for f in _FIELDS}
        return RowSettings(**picked, selection=None if self.selection is None else self.selection.index_select(0, rows))


_FIELDS = ("gamma", "tau", "use_base", "candidates", "temperature", "top_p")
SELECTION = {"delta_logp": 0, "entropy": 1, "random": 2}  # codes of RowSettings.selection


def top_p_log(logp: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p truncation of log-probability rows, renormalised.

    A token is kept when the mass of the tokens strictly more probable than it is below
    top_p; ties at the boundary are all kept. `logp` [N, V] (normalised), `top_p` [N].
    """
    sorted_logp, _ = logp.sort(dim=-1, descending=True)
    sorted_p = sorted_logp.exp()
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = sorted_logp.gather(1, num_kept - 1)
    keep = (logp >= threshold) | (top_p >= 1.0).unsqueeze(1)
    kept = logp.masked_fill(~keep, float("-inf"))
    return kept - kept.logsumexp(dim=-1, keepdim=True)


def candidate_mask(gen_logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Bool [N, V]: the generator's top-k tokens by raw logit (ties at the k-th value
    included); every token where k == 0."""
    vocab = gen_logits.shape[-1]
    k = candidates.clamp(min=0, max=vocab)
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return torch.ones_like(gen_logits, dtype=torch.bool)
    top_vals = gen_logits.topk(kmax, dim=-1).values
    kth = top_vals.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    return (gen_logits >= kth) | (k == 0).unsqueeze(1)


class Combined(NamedTuple):
    out: torch.Tensor  # [N, V] float32: log q (sampled rows) or the greedy row
    prob: torch.Tensor  # [N] float32: probability that the position is extrapolated
    delta: torch.Tensor | None  # [N, V] float32 Δlog p, when asked for


def combine(
    rl_logits: torch.Tensor, base_logits: torch.Tensor, settings: RowSettings, want_delta: bool = False
) -> Combined:
    """Apply the rule to a batch of rows.

    rl_logits, base_logits: [N, V] raw logits (any float dtype) of the same positions.
    Returns the outputs described in the module docstring.
    """
    rl = rl_logits.float()
    base = base_logits.float()
    a = rl.log_softmax(dim=-1)
    b = base.log_softmax(dim=-1)
    broken = (a.isnan() | b.isnan()).any(dim=-1)  # exactly the rows without a distribution
    rl_banned = a == float("-inf")
    delta = torch.where(rl_banned, float("-inf"), a - b)

    gen = torch.where(settings.use_base.unsqueeze(1), base, rl)
    gamma = settings.gamma.unsqueeze(1)
    e = torch.where(rl_banned, float("-inf"), (1 + gamma) * a - gamma * b)
    in_s = candidate_mask(gen, settings.candidates)
    has_finite = (in_s & (e > float("-inf"))).any(dim=-1, keepdim=True)
    e = e.masked_fill(~(in_s | ~has_finite), float("-inf"))

    tau = settings.tau.unsqueeze(1)
    greedy = settings.temperature < GREEDY_EPS
    temp = torch.where(greedy, 1.0, settings.temperature).unsqueeze(1)

    # Sampled rows: q = p_g·1[Δ > τ] + M·p_x, in log space.
    log_pg = top_p_log((gen / temp).log_softmax(dim=-1), settings.top_p)
    log_px = top_p_log((e / temp).log_softmax(dim=-1), settings.top_p)
    y0 = gen.argmax(dim=-1, keepdim=True)
    greedy_flag = delta.gather(1, y0).squeeze(1) <= settings.tau
    if settings.selection is None:
        flagged = delta <= tau
        prob_ext = log_pg.exp().masked_fill(~flagged, 0.0).sum(dim=-1).clamp(max=1.0)
        log_kept = log_pg.masked_fill(flagged, float("-inf"))
    else:
        flag_prob, greedy_flag = position_flags(gen, settings, greedy_flag)
        by_delta = (settings.selection == SELECTION["delta_logp"]).unsqueeze(1)
        keep_weight = torch.where(by_delta, (delta > tau).float(), 1.0 - flag_prob.unsqueeze(1))
        prob_ext = (log_pg.exp() * (1.0 - keep_weight)).sum(dim=-1).clamp(max=1.0)
        log_kept = log_pg + keep_weight.log()
    log_q = torch.logaddexp(log_kept, prob_ext.log().unsqueeze(1) + log_px)

    # Greedy rows: extrapolate when the argmax proposal is flagged.
    greedy_row = torch.where(greedy_flag.unsqueeze(1), e, gen)

    out = torch.where(greedy.unsqueeze(1), greedy_row, log_q).masked_fill(broken.unsqueeze(1), math.nan)
    prob = torch.where(greedy, greedy_flag.float(), prob_ext).masked_fill(broken, 0.0)
    return Combined(out, prob, delta.masked_fill(broken.unsqueeze(1), math.nan) if want_delta else None)


def position_flags(gen: torch.Tensor, settings: RowSettings, delta_flag: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the position-level criteria: the probability [N] that each position is flagged
    (0/1 for entropy, τ for random; unused on Δlog p rows) and the greedy flag [N]
    (`delta_flag` on Δlog p rows)."""
    entropy = torch.special.entr(gen.softmax(dim=-1)).sum(dim=-1)
    by_entropy = (entropy >= settings.tau).float()
    coin = settings.tau.clamp(0.0, 1.0)
    code = settings.selection
    flag_prob = torch.where(code == SELECTION["entropy"], by_entropy, coin)
    greedy_flag = torch.where(code == SELECTION["delta_logp"], delta_flag,
                              torch.where(code == SELECTION["entropy"], by_entropy > 0,
                                          torch.rand_like(coin) < coin))
    return flag_prob, greedy_flag
