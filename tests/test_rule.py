"""rlvrx.kernels.combine against the float64 two-stage reference (kernels.reference)."""

import math

import numpy as np
import pytest
import torch

from rlvrx.kernels import SELECTION, RowSettings, combine
from rlvrx.kernels import reference as ref
from rlvrx.kernels import top_p as top_p_module
from rlvrx.kernels.top_p import PARTIAL_WIDTHS, cut_by_search, top_p_log, top_p_threshold

VOCAB = 97  # not a power of two on purpose


def random_pair(rng, rows, vocab=VOCAB, spread=1.0):
    """Base logits and an RL child close to them, so Δ has a small signed spread."""
    base = rng.normal(0, 2.0, size=(rows, vocab))
    rl = base + rng.normal(0, spread, size=(rows, vocab))
    return rl, base


# τ values per selection criterion: Δlog p thresholds, entropies in nats (log 97 ≈ 4.57), coins.
TAUS = {"delta_logp": [-math.inf, -1.0, -0.3, 0.0, 0.4, math.inf],
        "entropy": [0.0, 1.5, 2.5, 3.5, 4.6, math.inf],
        "random": [0.0, 0.3, 0.5, 1.0]}


def random_settings(rng, rows, greedy_share=0.0, selections=("delta_logp",)):
    out = []
    for _ in range(rows):
        selection = str(rng.choice(selections))
        greedy = rng.random() < greedy_share and selection != "random"
        out.append(
            ref.Settings(
                gamma=float(rng.choice([0.0, 0.05, 0.1, 0.5, 2.0, -0.5])),
                tau=float(rng.choice(TAUS[selection])),
                generator=str(rng.choice(["base", "rl"])),
                candidates=int(rng.choice([0, 1, 5, 50, VOCAB, 500])),
                temperature=0.0 if greedy else float(rng.choice([0.3, 0.7, 1.0, 1.5])),
                top_p=float(rng.choice([0.05, 0.7, 0.95, 1.0])),
                selection=selection,
            )
        )
    return out


def to_row_settings(settings):
    """RowSettings of reference settings; `selection` stays None (the Δlog p fast path)
    unless a row uses another criterion."""
    codes = [SELECTION[s.selection] for s in settings]
    return RowSettings(
        gamma=torch.tensor([s.gamma for s in settings], dtype=torch.float32),
        tau=torch.tensor([s.tau for s in settings], dtype=torch.float32),
        use_base=torch.tensor([s.generator == "base" for s in settings]),
        candidates=torch.tensor([s.candidates for s in settings], dtype=torch.int64),
        temperature=torch.tensor([s.temperature for s in settings], dtype=torch.float32),
        top_p=torch.tensor([s.top_p for s in settings], dtype=torch.float32),
        selection=torch.tensor(codes, dtype=torch.int64) if any(codes) else None,
    )


def run_combine(rl, base, settings):
    out, prob, _ = combine(
        torch.tensor(rl, dtype=torch.float32), torch.tensor(base, dtype=torch.float32), to_row_settings(settings)
    )
    return out.double().numpy(), prob.double().numpy()


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_equals_two_stage_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    rows = 64
    rl, base = random_pair(rng, rows)
    settings = random_settings(rng, rows)
    out, prob = run_combine(rl, base, settings)
    for i, s in enumerate(settings):
        expected = ref.two_stage_distribution(rl[i], base[i], s)
        got = np.exp(out[i])
        assert abs(got.sum() - 1) < 1e-5
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4, err_msg=str(s))
        assert prob[i] == pytest.approx(ref.extrapolation_probability(rl[i], base[i], s), abs=2e-5)


@pytest.mark.parametrize("seed", range(4))
def test_entropy_and_random_selection_match_the_two_stage_reference(seed):
    """The replacement-curve criteria, mixed in one batch with Δlog p rows."""
    rng = np.random.default_rng(1500 + seed)
    rows = 64
    rl, base = random_pair(rng, rows, spread=rng.choice([0.5, 2.0]))
    settings = random_settings(rng, rows, selections=("delta_logp", "entropy", "random"))
    out, prob = run_combine(rl, base, settings)
    for i, s in enumerate(settings):
        np.testing.assert_allclose(np.exp(out[i]), ref.two_stage_distribution(rl[i], base[i], s),
                                   atol=2e-5, rtol=1e-4, err_msg=str(s))
        assert prob[i] == pytest.approx(ref.extrapolation_probability(rl[i], base[i], s), abs=2e-5)


def test_delta_rows_are_the_same_with_and_without_other_criteria_in_the_batch():
    rng = np.random.default_rng(1600)
    rl, base = random_pair(rng, 32)
    settings = random_settings(rng, 32, greedy_share=0.3)
    others = random_settings(rng, 8, selections=("entropy", "random"))
    out, prob = run_combine(rl, base, settings)
    mixed_out, mixed_prob = run_combine(np.concatenate([rl, rl[:8]]), np.concatenate([base, base[:8]]), settings + others)
    np.testing.assert_allclose(mixed_out[:32], out, atol=1e-6)
    np.testing.assert_allclose(mixed_prob[:32], prob, atol=1e-7)


def test_random_selection_with_probability_tau_replaces_that_share():
    """Greedy rows of the random criterion flip a coin of probability τ per position."""
    rng = np.random.default_rng(1700)
    rows = 2000
    rl, base = random_pair(rng, rows, spread=3.0)
    for tau in (0.0, 0.25, 1.0):
        s = ref.Settings(gamma=0.0, tau=tau, generator="base", candidates=0, temperature=0.0, top_p=1.0,
                         selection="random")
        out, prob = run_combine(rl, base, [s] * rows)
        picked = out.argmax(1)
        flagged = prob == 1.0
        assert set(np.unique(prob)) <= {0.0, 1.0}
        assert np.all(picked[flagged] == rl[flagged].argmax(1)) and np.all(picked[~flagged] == base[~flagged].argmax(1))
        assert abs(flagged.mean() - tau) <= 5 * math.sqrt(tau * (1 - tau) / rows)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rows_pick_the_reference_token(seed):
    rng = np.random.default_rng(2000 + seed)
    rows = 128
    rl, base = random_pair(rng, rows)
    settings = random_settings(rng, rows, greedy_share=0.5, selections=("delta_logp", "entropy"))
    out, prob = run_combine(rl, base, settings)
    for i, s in enumerate(settings):
        if s.temperature == 0:
            assert int(np.argmax(out[i])) == ref.greedy_token(rl[i], base[i], s), str(s)
            assert prob[i] == ref.extrapolation_probability(rl[i], base[i], s)
        else:
            np.testing.assert_allclose(np.exp(out[i]), ref.two_stage_distribution(rl[i], base[i], s), atol=2e-5)


def test_monte_carlo_two_stage_sampler_matches_closed_form():
    """Draws of the two-stage sampler follow q: chi-square-style bound per token."""
    rng = np.random.default_rng(7)
    rl, base = random_pair(rng, 1, vocab=20, spread=1.5)
    s = ref.Settings(gamma=0.5, tau=-0.3, generator="base", candidates=8, temperature=1.0, top_p=0.9)
    q = np.exp(run_combine(rl, base, [s])[0][0])
    draws = 40_000
    counts = np.zeros(20)
    extrapolated = 0
    for _ in range(draws):
        y, ext = ref.sample_two_stage(rl[0], base[0], s, rng)
        counts[y] += 1
        extrapolated += ext
    freq = counts / draws
    # 5 standard errors per token: fails with probability well below 1e-4 over 20 tokens.
    tol = 5 * np.sqrt(q * (1 - q) / draws) + 1e-9
    assert np.all(np.abs(freq - q) <= tol), (freq, q)
    m = run_combine(rl, base, [s])[1][0]
    assert abs(extrapolated / draws - m) <= 5 * np.sqrt(m * (1 - m) / draws)


def test_special_case_full_extrapolation_is_p_x():
    rng = np.random.default_rng(11)
    rl, base = random_pair(rng, 8)
    for gamma in (0.1, 1.0):
        s = ref.Settings(gamma=gamma, tau=math.inf, generator="rl", candidates=0, temperature=1.0, top_p=1.0)
        out, prob = run_combine(rl, base, [s] * 8)
        a = rl - np.log(np.exp(rl).sum(1, keepdims=True))
        b = base - np.log(np.exp(base).sum(1, keepdims=True))
        e = (1 + gamma) * a - gamma * b
        p_x = np.exp(e) / np.exp(e).sum(1, keepdims=True)
        np.testing.assert_allclose(np.exp(out), p_x, atol=1e-5)
        np.testing.assert_allclose(prob, 1.0, atol=1e-6)


def test_special_case_selective_replace_redraws_from_rl():
    """γ = 0, generator base: flagged proposals are redrawn from π_RL (top-k, T, P applied)."""
    rng = np.random.default_rng(12)
    rl, base = random_pair(rng, 8)
    s = ref.Settings(gamma=0.0, tau=-0.3, generator="base", candidates=0, temperature=1.0, top_p=1.0)
    out, _ = run_combine(rl, base, [s] * 8)
    for i in range(8):
        p_base, p_rl = ref.softmax(base[i]), ref.softmax(rl[i])
        delta = np.log(p_rl) - np.log(p_base)
        m = p_base[delta <= -0.3].sum()
        expected = np.where(delta > -0.3, p_base, 0) + m * p_rl
        np.testing.assert_allclose(np.exp(out[i]), expected, atol=1e-5)


@pytest.mark.parametrize("generator", ["rl", "base"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_special_case_tau_minus_inf_is_plain_generator_sampling(generator, temperature):
    rng = np.random.default_rng(13)
    rl, base = random_pair(rng, 8)
    s = ref.Settings(gamma=0.3, tau=-math.inf, generator=generator, candidates=5, temperature=temperature, top_p=0.8)
    out, prob = run_combine(rl, base, [s] * 8)
    gen = rl if generator == "rl" else base
    np.testing.assert_array_equal(prob, 0.0)
    for i in range(8):
        if temperature == 0:
            assert np.argmax(out[i]) == np.argmax(gen[i])
        else:
            expected = ref.top_p(ref.softmax(gen[i] / temperature), 0.8)
            np.testing.assert_allclose(np.exp(out[i]), expected, atol=1e-5)


def test_masked_tokens_are_never_emitted_and_rows_stay_finite():
    rng = np.random.default_rng(14)
    rl, base = random_pair(rng, 32)
    banned = rng.random((32, VOCAB)) < 0.3
    banned[:, 0] = False
    rl[banned] = -np.inf
    base[banned] = -np.inf
    settings = random_settings(rng, 32, greedy_share=0.3)
    out, prob = run_combine(rl, base, settings)
    assert not np.isnan(out).any() and not np.isnan(prob).any()
    for i, s in enumerate(settings):
        if s.temperature == 0:
            assert not banned[i, int(np.argmax(out[i]))]
            assert int(np.argmax(out[i])) == ref.greedy_token(rl[i], base[i], s)
        else:
            assert np.all(np.exp(out[i])[banned[i]] == 0)
            np.testing.assert_allclose(np.exp(out[i]), ref.two_stage_distribution(rl[i], base[i], s), atol=2e-5)


def test_top_p_keeps_ties_at_the_boundary():
    logp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    kept = torch.exp(top_p_log(logp, torch.tensor([0.5])))
    np.testing.assert_allclose(kept.numpy()[0], [0.4, 0.2, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(ref.top_p(np.array([0.4, 0.2, 0.2, 0.2]), 0.5), [0.4, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(ref.top_p(np.array([0.5, 0.3, 0.2]), 0.5), [1.0, 0, 0])


def test_rows_do_not_leak_into_each_other():
    rng = np.random.default_rng(15)
    rl, base = random_pair(rng, 16)
    settings = random_settings(rng, 16, greedy_share=0.3)
    out, prob = run_combine(rl, base, settings)
    for i in (0, 7, 15):
        alone, p_alone = run_combine(rl[i : i + 1], base[i : i + 1], [settings[i]])
        np.testing.assert_allclose(out[i], alone[0], atol=1e-6)
        assert prob[i] == pytest.approx(p_alone[0], abs=1e-7)


def test_delta_is_the_log_ratio_of_the_two_models():
    rng = np.random.default_rng(16)
    rl, base = random_pair(rng, 4)
    settings = random_settings(rng, 4)
    _, _, delta = combine(torch.tensor(rl, dtype=torch.float32), torch.tensor(base, dtype=torch.float32),
                          to_row_settings(settings), want_delta=True)
    for i in range(4):
        expected = ref.log_softmax(rl[i]) - ref.log_softmax(base[i])
        np.testing.assert_allclose(delta[i].double().numpy(), expected, atol=1e-5)


# The partial sorts behind top-p (kernels.top_p.top_p_threshold): kept sets that end inside the
# first head, past it (the head grows through PARTIAL_WIDTHS) and past the largest (the search over
# value buckets), ties across every boundary, −inf entries, top-p 1 and tiny.

def lm_like(rng, rows, vocab):
    """Logits falling with the log of a token's rank (Zipf-like), shuffled: the top-p head is short."""
    slope = rng.uniform(1.0, 2.2, size=(rows, 1))
    by_rank = -slope * np.log(np.arange(1, vocab + 1)) + rng.normal(0, 0.5, (rows, vocab))
    return np.take_along_axis(by_rank, rng.permuted(np.tile(np.arange(vocab), (rows, 1)), axis=1), axis=1)


def tied(rng, rows, vocab, levels):
    """Logits on a few levels: every top-p boundary falls inside a group of equal values."""
    return rng.integers(0, levels, size=(rows, vocab)).astype(np.float64) * rng.uniform(0.5, 3.0, size=(rows, 1))


def check_top_p(logits, top_p, cut=top_p_threshold):
    """The kept sets and renormalised probabilities that `cut` (threshold, log mass) gives, against
    the float64 reference's top_p of the same float32 log-probabilities."""
    logp = torch.tensor(logits, dtype=torch.float32).log_softmax(dim=-1)
    threshold, log_mass = cut(logp, torch.tensor(top_p, dtype=torch.float32))
    got = (logp - log_mass).masked_fill(logp < threshold, float("-inf")).exp().double().numpy()
    for i, cutoff in enumerate(top_p):
        expected = ref.top_p(np.exp(logp[i].double().numpy()), cutoff)
        np.testing.assert_array_equal(got[i] > 0, expected > 0, err_msg=f"row {i}, top_p {cutoff}")
        np.testing.assert_allclose(got[i], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed", range(2))
def test_top_p_kept_sets_inside_past_and_beyond_the_partial_sorts(seed):
    rng = np.random.default_rng(3000 + seed)
    vocab = 6000  # above the largest partial width: flat rows are searched
    rows = np.concatenate([
        lm_like(rng, 4, vocab),  # kept set inside the first head
        rng.normal(0, 1.0, (2, vocab)),  # a few hundred tokens: the second width
        rng.normal(0, 0.3, (2, vocab)),  # thousands: the third
        rng.normal(0, 0.01, (2, vocab)),  # nearly uniform: the search
    ])
    check_top_p(rows, [0.7, 0.9, 0.7, 0.95, 0.5, 0.8, 0.7, 0.95, 0.7, 0.99])


def test_top_p_keeps_every_token_tied_with_the_boundary_across_partial_widths():
    rng = np.random.default_rng(3100)
    vocab = 5000
    rows = tied(rng, 6, vocab, levels=4)
    # One token on top, then a group of equal logits that straddles each partial width.
    for row, group in zip(rows[:3], (40, 300, 4500)):
        row[:] = -30.0
        row[0] = 5.0
        row[1 : 1 + group] = 0.0
    check_top_p(rows, [0.3, 0.5, 0.7, 0.2, 0.9, 0.999])


def test_top_p_with_masked_tokens_and_extreme_cutoffs():
    rng = np.random.default_rng(3200)
    vocab = 3000
    rows = np.concatenate([lm_like(rng, 4, vocab), rng.normal(0, 1.0, (4, vocab))])
    rows[rng.random(rows.shape) < 0.5] = -np.inf
    rows[0, 10:] = -np.inf  # fewer finite tokens than the first head holds
    rows[1, 1:] = -np.inf  # a single token
    rows[1, 0] = 0.0
    check_top_p(rows, [0.999, 0.7, 1.0, 1e-6, 1.0, 1e-6, 0.999, 0.5])


def rows_keeping(vocab, kept_counts):
    """Rows of distinct logits and, per row, a top-p that keeps exactly the given number of tokens
    (midway between the masses of the top kept − 1 and the top kept tokens), the kept tokens
    scattered over the row. The finite logits span one nat, so the boundary token's mass (≥ 1e-4
    at 4096 kept) stays far above float32's error on a cumulative sum of thousands of terms."""
    rng = np.random.default_rng(3500)
    rows, cutoffs = [], []
    for kept in kept_counts:
        row = np.full(vocab, -20.0)
        row[: kept + 200] = -np.arange(kept + 200) / (kept + 200)
        row = rng.permutation(row)
        p = np.sort(np.exp(ref.log_softmax(row)))[::-1]
        mass = np.cumsum(p)
        rows.append(row)
        cutoffs.append((mass[kept - 2] + mass[kept - 1]) / 2)
    return np.stack(rows), cutoffs


def test_top_p_kept_sets_at_each_partial_width_boundary():
    """A kept set one short of, exactly at and one past each partial width: the head holds it,
    grows, or (past the largest) the row is searched."""
    kept = [w + d for w in PARTIAL_WIDTHS for d in (-1, 0, 1)]
    rows, cutoffs = rows_keeping(6000, kept)
    logp = torch.tensor(rows, dtype=torch.float32).log_softmax(dim=-1)
    threshold, _ = top_p_threshold(logp, torch.tensor(cutoffs, dtype=torch.float32))
    assert (logp >= threshold).sum(dim=-1).tolist() == kept
    check_top_p(rows, cutoffs)


def test_top_p_search_alone_matches_the_reference_on_every_kind_of_row():
    """cut_by_search on rows the partial sorts would take too: short and long kept sets, ties
    (groups of equal values share a bucket; the cut falls inside one), all tokens equal, −inf
    tokens, a single finite token, top-p tiny and near 1."""
    rng = np.random.default_rng(3600)
    vocab = 700
    rows = np.concatenate([
        lm_like(rng, 3, vocab), rng.normal(0, 1.0, (3, vocab)), rng.normal(0, 0.01, (2, vocab)),
        tied(rng, 3, vocab, levels=5), np.round(rng.normal(0, 1.0, (3, vocab)) * 8) / 8, np.zeros((2, vocab)),
        rng.normal(0, 1.0, (3, vocab)),
    ])
    rows[-3:][rng.random((3, vocab)) < 0.6] = -np.inf
    rows[-1, 1:] = -np.inf
    rows[-1, 0] = 1.0
    cutoffs = rng.choice([1e-6, 0.05, 0.3, 0.7, 0.95, 0.999], size=len(rows)).tolist()
    check_top_p(rows, cutoffs, cut=cut_by_search)


def test_flat_rows_are_searched_with_no_sort_and_keep_what_a_full_sort_keeps(monkeypatch):
    """Rows of 49,152 tokens, too wide for the two-stage reference: top-p on them against a full
    sort in float64 of the same log-probabilities. A flat row (Gaussian σ ≤ 1) gets one partial
    sort (the first head, 64) and one of its searched bucket, nothing wider, no full sort."""
    g = torch.Generator().manual_seed(3700)
    vocab = 49152
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[1.0], [1.0], [1.0], [0.3], [1.0], [2.5]])
    logits[4] = (logits[4] * 4).round() / 4  # ties: the cut falls inside a group of equal values
    cutoffs = torch.tensor([0.7, 0.3, 0.95, 0.7, 0.7, 0.7])
    logp = logits.log_softmax(dim=-1)
    real_topk = torch.Tensor.topk

    def no_sort(*args, **kwargs):
        raise AssertionError("a full sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    for row in range(5):  # the flat ones, one at a time
        widths = []
        monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, *a, **kw: widths.append(k) or real_topk(self, k, *a, **kw))
        top_p_log(logp[row : row + 1], cutoffs[row : row + 1])
        assert len(widths) == 2 and widths[0] == PARTIAL_WIDTHS[0] and widths[1] < vocab // 8, (row, widths)
    monkeypatch.undo()

    got = top_p_log(logp, cutoffs)
    expected = logp.double()
    values = expected.sort(dim=-1, descending=True).values
    p = values.exp()
    keep = (p.cumsum(dim=-1) - p) < cutoffs.double().unsqueeze(1)
    kept = expected >= values.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    torch.testing.assert_close(got > float("-inf"), kept, rtol=0, atol=0)
    mass = expected.exp().masked_fill(~kept, 0.0).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(got.exp().double(), (expected.exp() / mass).masked_fill(~kept, 0.0), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_flat_rows_through_combine_match_the_reference(seed):
    """Flat (Gaussian σ = 1) rows wider than every partial sort: the paper setting, k = 0, other
    temperatures and top-p, greedy rows, tied values and masked tokens, in one batch."""
    rng = np.random.default_rng(3800 + seed)
    vocab = 5000
    base = rng.normal(0, 1.0, (10, vocab))
    base[6:8] = np.round(base[6:8] * 10) / 10
    rl = base + rng.normal(0, 0.5, base.shape)
    banned = rng.random((2, vocab)) < 0.3
    rl[8:][banned] = base[8:][banned] = -np.inf
    settings = [ref.Settings(gamma=g, tau=-0.3, generator=gen, candidates=k, temperature=t, top_p=p)
                for g, gen, k, t, p in [(0.05, "base", 50, 1.0, 0.7), (0.05, "base", 0, 1.0, 0.7),
                                        (0.1, "rl", 50, 1.5, 0.95), (0.5, "base", 0, 0.7, 0.9),
                                        (0.05, "base", 50, 0.0, 0.7), (0.05, "rl", 0, 0.0, 0.7),
                                        (0.05, "base", 50, 1.0, 0.7), (2.0, "rl", 0, 1.0, 0.5),
                                        (0.05, "base", 50, 1.0, 0.7), (0.05, "base", 0, 1.3, 0.8)]]
    run_reference_batch(rl, base, settings, exact_support=True)


def test_combine_kept_sets_at_each_partial_width_boundary():
    """The generator's kept set one short of, at and one past each head width of combine's loop
    (the paper setting, k = 50): held by the head, by a wider one, or computed on every token."""
    kept = [w + d for w in PARTIAL_WIDTHS for d in (-1, 0, 1)]
    base, cutoffs = rows_keeping(6000, kept)
    rl = base + np.random.default_rng(3900).normal(0, 0.5, base.shape)
    settings = [ref.Settings(gamma=0.05, tau=0.0, generator="base", candidates=50, temperature=1.0, top_p=c)
                for c in cutoffs]
    run_reference_batch(rl, base, settings, exact_support=True)


def run_reference_batch(rl, base, settings, exact_support=False):
    """combine against the reference, row by row; `exact_support`: sampled rows also give
    probability 0 to exactly the tokens the reference does."""
    out, prob = run_combine(rl, base, settings)
    for i, s in enumerate(settings):
        if s.temperature == 0:
            assert int(np.argmax(out[i])) == ref.greedy_token(rl[i], base[i], s), str(s)
        else:
            expected = ref.two_stage_distribution(rl[i], base[i], s)
            np.testing.assert_allclose(np.exp(out[i]), expected, atol=2e-5, rtol=1e-4, err_msg=str(s))
            if exact_support:
                np.testing.assert_array_equal(out[i] > -np.inf, expected > 0, err_msg=str(s))
        assert prob[i] == pytest.approx(ref.extrapolation_probability(rl[i], base[i], s), abs=2e-5), str(s)


def stress_settings(rng, rows, vocab):
    return [ref.Settings(
        gamma=float(rng.choice([0.0, 0.05, 0.5, -0.5, 2.0])),
        tau=float(rng.choice([-math.inf, -0.3, 0.0, math.inf])),
        generator=str(rng.choice(["base", "rl"])),
        candidates=int(rng.choice([0, 1, 5, 50, 63, 64, 200, vocab, 10 * vocab])),
        temperature=0.0 if rng.random() < 0.2 else float(rng.choice([0.05, 0.3, 0.7, 1.0, 2.0])),
        top_p=float(rng.choice([1e-6, 0.3, 0.7, 0.95, 1.0])),
    ) for _ in range(rows)]


@pytest.mark.parametrize("seed", range(3))
def test_mixed_batches_of_lm_flat_and_tied_rows_match_the_reference(seed):
    """One batch mixes rows whose support fits the generator's first head, rows whose head must
    grow (kept set or S past it, a tie at the k-th logit across it) and rows on every token
    (top-p 1, k = 0 or k ≥ V), at temperatures 0.05–2, greedy rows among them."""
    rng = np.random.default_rng(3300 + seed)
    vocab = 1500
    base = np.concatenate([lm_like(rng, 8, vocab), rng.normal(0, 1.5, (4, vocab)), tied(rng, 4, vocab, levels=6)])
    rl = base + rng.normal(0, 0.5, base.shape)
    settings = stress_settings(rng, len(base), vocab)
    run_reference_batch(rl, base, settings)


def test_masked_tokens_in_rows_that_fit_the_head_and_rows_that_do_not():
    rng = np.random.default_rng(3400)
    vocab = 1000
    base = np.concatenate([lm_like(rng, 6, vocab), rng.normal(0, 1.5, (6, vocab))])
    rl = base + rng.normal(0, 0.5, base.shape)
    banned = rng.random(base.shape) < 0.3
    rl[banned] = base[banned] = -np.inf
    rl_only = rng.random(base.shape) < 0.05  # banned by the RL model alone: Δ = e = −inf there
    rl[rl_only] = -np.inf
    rl[0, np.argsort(base[0])[-50:]] = -np.inf  # every candidate of row 0 banned: S widens to all tokens
    disallowed = rng.permutation(vocab)[20:]  # row 1 allows 20 tokens, fewer than k: S is every token
    rl[1, disallowed] = base[1, disallowed] = -np.inf
    settings = [ref.Settings(gamma=0.5, tau=0.0, generator="base", candidates=50, temperature=t, top_p=p)
                for t, p in [(1.0, 0.7), (0.0, 0.7), (0.5, 0.95), (2.0, 0.3), (1.0, 1.0), (0.05, 0.7)] * 2]
    run_reference_batch(rl, base, settings)
