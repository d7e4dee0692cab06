"""Top-p cuts of batched log-probability rows without sorting the vocabulary.

top_p(p, P) keeps a token when the total probability of the tokens strictly more probable
than it is below P (ALGORITHM.md), so it keeps exactly the tokens whose log-probability is at
least the cut: the value of the last token kept in descending order, every token tied with it
kept too. A row's cut is read off a partial sort (`topk`) of the row once the sorted head reaches
past it; the head grows through PARTIAL_WIDTHS while the head's mass says the next width can
still hold the kept set. A row whose kept set is wider (a flat row: high temperature, a weak
model) is searched instead of sorted (`cut_by_search`): one histogram of its probability mass
over value buckets finds the bucket that holds the cut, and only that bucket's tokens are sorted.
"""

import math

import torch

PARTIAL_WIDTHS = (64, 512, 4096)  # partial sorts tried before a search: an LM row's top-p head fits the first
SEARCH_BUCKETS = 1024  # value buckets of the search's histogram


def top_p_threshold(logp: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where top-p cuts each row: it keeps exactly the tokens with logp ≥ threshold, whose total
    probability is exp(log_mass). `logp` [N, W] normalised log-probabilities, `top_p` [N];
    both outputs [N, 1] (threshold −inf and log_mass 0 where top_p ≥ 1).

    The partial sorts grow through PARTIAL_WIDTHS (on a row no wider than the largest, the last
    one is the whole row); a row whose cut is past them, or that `may_hold` says cannot fit the
    next one, is searched.
    """
    rows, width = logp.shape
    threshold = logp.new_full((rows, 1), float("-inf"))
    log_mass = logp.new_zeros((rows, 1))
    widths = [w for w in PARTIAL_WIDTHS if w < width] + ([width] if width <= PARTIAL_WIDTHS[-1] else [])
    pending = (top_p < 1.0).nonzero().squeeze(1)
    searched = []
    for m, wider in zip(widths, [*widths[1:], None]):
        if pending.numel() == 0:
            break
        head = logp[pending].topk(m, dim=-1).values
        p = head.exp()
        mass_before = p.cumsum(dim=-1) - p
        num_kept = (mass_before < top_p[pending].unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(min=1)
        cut = head.gather(1, num_kept - 1)
        # Past the cut when the head's last value is below it: no token outside the head is kept.
        done = (head[:, -1:] < cut).squeeze(1) | (m == width)
        threshold[pending[done]] = cut[done]
        log_mass[pending[done]] = p.masked_fill(head < cut, 0.0).sum(dim=-1, keepdim=True)[done].log()
        pending = pending[~done]
        if pending.numel() == 0:
            break
        if wider is None:
            searched.append(pending)
            break
        if wider < width:  # the whole row holds any cut; a partial sort only where the head says it may
            grow = may_hold(head[~done], wider, top_p[pending])
            searched.append(pending[~grow])
            pending = pending[grow]
    searched = torch.cat(searched) if searched else pending
    if searched.numel():
        threshold[searched], log_mass[searched] = cut_by_search(logp[searched], top_p[searched])
    return threshold, log_mass


def may_hold(head: torch.Tensor, width: int, top_p: torch.Tensor) -> torch.Tensor:
    """Whether the top `width` tokens of rows can hold their top-p kept set, from a sorted head
    `head` [n, m] of their normalised log-probabilities (m < width): the top `width` tokens have at
    most the head's mass plus (width − m) times its last probability. False only where that is
    below `top_p` [n]: then a partial sort that wide would miss the cut."""
    p = head.exp()
    return p.sum(dim=-1) + (width - head.shape[1]) * p[:, -1] >= top_p


def cut_by_search(logp: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_p_threshold` of rows with top_p < 1, found without sorting the rows.

    The tokens of a row fall into SEARCH_BUCKETS buckets of equal width in value between the
    row's largest log-prob and log((1 − P)/W), below which no token is kept (a kept token's
    probability times W is at least the mass from it down, more than 1 − P); lower ones join the
    last bucket. Bucket indices fall as values rise (floating-point rounding is monotone), so equal
    values share a bucket and every token of an earlier bucket is more probable than every token
    of a later one. One histogram of the mass per bucket gives the mass above each bucket; the
    cut is in the last bucket whose mass above is below P, and a partial sort of that bucket's
    tokens alone finds it.
    """
    rows, width = logp.shape
    top = logp.max(dim=-1, keepdim=True).values
    bottom = torch.log1p(-top_p.to(logp.dtype)).unsqueeze(1) - math.log(width)
    scale = SEARCH_BUCKETS / (top - bottom).clamp(min=torch.finfo(logp.dtype).tiny)
    # −inf logp goes to the last bucket; so does NaN (a row without a distribution: its cut is NaN).
    bucket = ((top - logp) * scale).nan_to_num_(nan=SEARCH_BUCKETS - 1).clamp_(max=SEARCH_BUCKETS - 1).long()
    p = logp.exp()
    mass = p.new_zeros((rows, SEARCH_BUCKETS)).scatter_add_(1, bucket, p)
    above = mass.cumsum(dim=-1) - mass  # mass of the tokens in earlier buckets
    target = top_p.to(logp.dtype).unsqueeze(1)
    at = ((above < target).sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # above[0] = 0 < P
    in_bucket = bucket == at
    size = in_bucket.sum(dim=-1, keepdim=True)
    members = logp.masked_fill(~in_bucket, float("-inf")).topk(max(int(size.max()), 1), dim=-1).values
    member_p = members.exp()
    mass_before = above.gather(1, at) + member_p.cumsum(dim=-1) - member_p
    # At most the bucket's own tokens: the −inf padding of smaller buckets is never the cut.
    num_kept = (mass_before < target).sum(dim=-1, keepdim=True).clamp(min=1).minimum(size.clamp(min=1))
    cut = members.gather(1, num_kept - 1)
    kept_mass = above.gather(1, at) + member_p.masked_fill(members < cut, 0.0).sum(dim=-1, keepdim=True)
    return cut, kept_mass.log()


def top_p_log(logp: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p truncation of log-probability rows, renormalised (−inf where cut).

    `logp` [N, W] normalised, `top_p` [N]; see `top_p_threshold` for which tokens are kept.
    """
    threshold, log_mass = top_p_threshold(logp, top_p)
    return (logp - log_mass).masked_fill(logp < threshold, float("-inf"))
