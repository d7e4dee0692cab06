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

Nothing sorts the whole vocabulary. Where 0 < k < V and the row is greedy or has top-p < 1,
its support — the candidate set S, on which p_x lives, and the kept set of p_g — is a short head
of the generator's logits on an LM row: the rule runs on the head's tokens only (a partial sort,
`topk`, of width max(64, k + 1)), and for the rows whose support reaches past it the head grows
(512, then 4096 tokens) while the head's mass says the wider one can hold the kept set of p_g.
The other rows (top-p 1, S = every token, or a support past the heads: a flat row) are computed
on every token, their top-p cuts found by the same growing partial sorts or, on a flat row, by a
search over value buckets (kernels/top_p.py). Kept sets, ties included, are exactly those of a
full sort.

A row without a distribution — a NaN or +inf logit in either model (an fp16 overflow), or
every logit −inf — has no rule: its output row and Δ are NaN (what vLLM's sampler would get
from the model's own logits; it still draws an in-range token id), and M = 0 (nothing is
counted as extrapolated). The fused kernel does the same.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlvrx.kernels.top_p import PARTIAL_WIDTHS, may_hold, top_p_log

GREEDY_EPS = 1e-5  # vLLM's threshold: temperature below this samples greedily
VOCAB_ROWS = 4  # rows computed on every token at a time: their temporaries stay in the CPU's cache


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


def log_ratio(rl: torch.Tensor, base: torch.Tensor, lse_rl: torch.Tensor, lse_base: torch.Tensor) -> torch.Tensor:
    """Δ = a − b, a = rl − lse_rl and b = base − lse_base the two models' log-probs; −inf where
    the RL logit is −inf (a masked token)."""
    return (rl - base).sub_(lse_rl - lse_base).masked_fill_(rl == float("-inf"), float("-inf"))


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
    rows, vocab = rl.shape
    lse_rl = rl.logsumexp(dim=-1, keepdim=True)
    lse_base = base.logsumexp(dim=-1, keepdim=True)
    broken = ~(lse_rl.isfinite() & lse_base.isfinite()).squeeze(1)  # exactly the rows without a distribution
    greedy = settings.temperature < GREEDY_EPS
    temp = torch.where(greedy, 1.0, settings.temperature).unsqueeze(1)
    gen = torch.where(settings.use_base.unsqueeze(1), base, rl)

    # The generator's head (top-m by raw logit) holds the candidate set S when k > 0 (S is
    # every token with a logit ≥ the k-th largest; k ≥ V is every token, as k = 0).
    k = settings.candidates.clamp(min=0, max=vocab)
    k = k.masked_fill(k == vocab, 0)
    width = min(vocab, max(PARTIAL_WIDTHS[0], int(k.max()) + 1 if rows else 0))
    head_logits, head = gen.topk(width, dim=-1)
    kth = head_logits.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).masked_fill((k == 0).unsqueeze(1), float("-inf"))

    greedy_flag = torch.zeros_like(greedy)
    if greedy.any():
        y0 = gen.argmax(dim=-1, keepdim=True)
        greedy_flag = log_ratio(rl.gather(1, y0), base.gather(1, y0), lse_rl, lse_base).squeeze(1) <= settings.tau
    flag_prob = None
    if settings.selection is not None:
        flag_prob, greedy_flag = position_flags(gen, settings, greedy_flag)
    lse_gen = torch.where(settings.use_base.unsqueeze(1), lse_base, lse_rl)
    scaled = (temp != 1.0).squeeze(1).nonzero().squeeze(1)  # rows at T = 1 have it already
    if scaled.numel():
        lse_gen[scaled] = (gen[scaled] / temp[scaled]).logsumexp(dim=-1, keepdim=True)
    batch = _Batch(rl, base, gen, lse_rl, lse_base, lse_gen, temp, kth, settings, flag_prob)

    # A greedy row that keeps its proposal is the generator's row. The others are computed on
    # the generator's head while their support (S and the kept set of p_g) fits in it, the head
    # growing (through PARTIAL_WIDTHS) for the rows it does not hold yet while the head's mass
    # says the wider one can hold the kept set of p_g; the rest, and a sampled row with top-p 1 or
    # S = every token (k = 0, or fewer finite generator logits than k), are computed on every token.
    out = torch.full_like(rl, float("-inf"))
    prob = torch.zeros_like(settings.tau)
    todo = ~broken & ~(greedy & ~greedy_flag)
    head_may_fit = (kth.squeeze(1) > float("-inf")) & (greedy | (settings.top_p < 1.0)) | (width == vocab)
    on_head = (todo & head_may_fit).nonzero().squeeze(1)
    head_logits, cols = head_logits[on_head], head[on_head]
    while on_head.numel():
        values, row_prob, fits = batch.rule_at(on_head, cols)
        done = on_head[fits]
        out[done.unsqueeze(1), cols[fits]] = values[fits]
        prob[done] = row_prob[fits]
        todo[done] = False
        on_head, width = on_head[~fits], next((w for w in PARTIAL_WIDTHS if w > width), None)
        if width is None or on_head.numel() == 0:
            break
        width = min(width, vocab)  # the whole row: a full sort of a short one, which holds any support
        if width < vocab:
            head_logp = head_logits[~fits] / temp[on_head] - lse_gen[on_head]
            on_head = on_head[greedy[on_head] | may_hold(head_logp, width, settings.top_p[on_head])]
        head_logits, cols = gen[on_head].topk(width, dim=-1)
    on_vocab = todo.nonzero().squeeze(1)
    for rows in on_vocab.split(VOCAB_ROWS) if on_vocab.numel() else ():
        out[rows], prob[rows], _ = batch.rule_at(rows, None)
    proposal_kept = (greedy & ~greedy_flag & ~broken).nonzero().squeeze(1)
    out[proposal_kept] = gen[proposal_kept]

    delta = log_ratio(rl, base, lse_rl, lse_base) if want_delta else None
    if broken.any():
        out.masked_fill_(broken.unsqueeze(1), math.nan)
        prob.masked_fill_(broken, 0.0)
        if want_delta:
            delta.masked_fill_(broken.unsqueeze(1), math.nan)
    return Combined(out, prob, delta)


@dataclass(frozen=True)
class _Batch:
    """What the rule needs of every row of a batch: [N, V] logits, [N, 1] per-row values."""

    rl: torch.Tensor
    base: torch.Tensor
    gen: torch.Tensor  # the generator's raw logits
    lse_rl: torch.Tensor  # logsumexp of rl
    lse_base: torch.Tensor
    lse_gen: torch.Tensor  # logsumexp of gen / temp
    temp: torch.Tensor  # temperature, 1 on greedy rows
    kth: torch.Tensor  # S = tokens with gen ≥ kth (−inf: every token)
    settings: RowSettings
    flag_prob: torch.Tensor | None  # [N] position-level flag probability (position_flags), if any row uses one

    def rule_at(self, rows: torch.Tensor, cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rule on `rows` [n] (no broken row, no greedy row that keeps its proposal) at the
        token ids `cols` [n, W] of each (None: every token).

        Partial columns must be the generator's head in descending order. Returns the output row
        at the columns [n, W] (log q, or e on S for greedy rows), M [n] (1 on greedy rows) and
        whether the columns hold the row's support [n] (always true for every token): then every
        other token is −inf.
        """
        s = self.settings.select(rows)
        take = (lambda x: x[rows]) if cols is None else (lambda x: x[rows.unsqueeze(1), cols])
        rl, base, gen = take(self.rl), take(self.base), take(self.gen)
        gamma, tau, temp = s.gamma.unsqueeze(1), s.tau.unsqueeze(1), self.temp[rows]
        lse_rl, lse_base = self.lse_rl[rows], self.lse_base[rows]
        delta = log_ratio(rl, base, lse_rl, lse_base)
        e = ((1 + gamma) * (rl - lse_rl) - gamma * (base - lse_base)).masked_fill(rl == float("-inf"), float("-inf"))
        in_s = gen >= self.kth[rows]
        has_finite = (in_s & (e > float("-inf"))).any(dim=-1, keepdim=True)  # else S widens to every token
        e = e.masked_fill(~(in_s | ~has_finite), float("-inf"))

        # Sampled rows: q = p_g·1[Δ > τ] + M·p_x, in log space (no top-p cut for greedy rows).
        greedy = (s.temperature < GREEDY_EPS).unsqueeze(1)
        top_p = s.top_p.masked_fill(greedy.squeeze(1), 1.0)
        log_pg = top_p_log(gen / temp - self.lse_gen[rows], top_p)
        log_px = top_p_log((e / temp).log_softmax(dim=-1), top_p)
        if self.flag_prob is None:
            flagged = delta <= tau
            prob = log_pg.exp().masked_fill(~flagged, 0.0).sum(dim=-1).clamp(max=1.0)
            log_kept = log_pg.masked_fill(flagged, float("-inf"))
        else:
            by_delta = (s.selection == SELECTION["delta_logp"]).unsqueeze(1)
            keep_weight = torch.where(by_delta, (delta > tau).float(), 1.0 - self.flag_prob[rows].unsqueeze(1))
            prob = (log_pg.exp() * (1.0 - keep_weight)).sum(dim=-1).clamp(max=1.0)
            log_kept = log_pg + keep_weight.log()
        log_q = torch.logaddexp(log_kept, prob.log().unsqueeze(1) + log_px)
        values = torch.where(greedy, e, log_q)
        prob = prob.masked_fill(greedy.squeeze(1), 1.0)  # a greedy row here is flagged

        # The columns hold the support when neither S nor the kept set of p_g reaches the last one.
        whole = cols is None or cols.shape[1] == self.rl.shape[1]
        fits = has_finite & ~in_s[:, -1:] & (greedy | (log_pg[:, -1:] == float("-inf")))
        return values, prob, fits.squeeze(1) | whole


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
