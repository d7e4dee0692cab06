"""The requests of the vLLM-path tests and the checks of their results against the float64
transformers reference of ALGORITHM.md and against vLLM serving each model alone. Shared by
tests/test_engine.py (two backbones) and tests/test_lora.py (one stacked backbone + LoRA);
the prompt-scoring batch and its checks also by tests/test_prompt_scoring.py and
tests/test_compile.py.

A pair run is `run_engine({"pair": ..., "batches": pair_batches()})`: one result list per
batch, in the order of `pair_batches`; `models` is the (rl, base) float64 reference pair.
"""

import math

import numpy as np
import pytest
import torch

from rlvrx.kernels import reference as ref
from tests.conftest import next_logits, ref_settings as settings

MAX_TOKENS = 10
rng = np.random.default_rng(2026)
PROMPTS = [rng.integers(3, 380, size=n).tolist() for n in (5, 11, 23)]

# (gamma, tau, generator, candidates): full, selective, selective replace, and more.
GREEDY_SETTINGS = [
    (0.5, None, "rl", 0),
    (0.1, -0.3, "base", 50),
    (0.0, -0.3, "base", 0),
    (1.0, 0.2, "rl", 5),
    (2.0, -0.5, "base", 1),
]
SAMPLED = [  # (gamma, tau, generator, candidates, temperature, top_p, seed)
    (0.3, -0.3, "base", 20, 0.9, 0.8, 5),
    (0.5, None, "rl", 0, 1.0, 1.0, 6),
    (1.0, 0.1, "base", 0, 0.6, 0.95, 7),
]


def xargs(gamma, tau, generator, candidates):
    return {"gamma": gamma, "tau": tau, "generator": generator, "candidates": candidates}


def greedy(extra=None, **kw):
    return {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True, "extra_args": extra, **kw}


def sampled(temperature, top_p, seed, extra=None, **kw):
    return {"temperature": temperature, "top_p": top_p, "seed": seed, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "logprobs": 1, "extra_args": extra, **kw}


# The replacement-curve criteria: (gamma, tau, generator, candidates, selection); the toy
# models' entropies lie around 3–4.4 nats, so τ = 3.7 flags some positions and not others.
ENTROPY = (0.5, 3.7, "base", 0, "entropy")
RANDOM = (0.0, 0.5, "base", 10, "random")


def criteria_batch():
    def extra(gamma, tau, generator, candidates, selection):
        return {**xargs(gamma, tau, generator, candidates), "selection": selection}

    return ([{"prompt_ids": p, "params": greedy(extra(*ENTROPY))} for p in PROMPTS]
            + [{"prompt_ids": p, "params": sampled(1.0, 0.9, 40 + i, extra(*s))}
               for s in (ENTROPY, RANDOM) for i, p in enumerate(PROMPTS)])


ALLOWED = list(range(40, 90))
BIAS = {77: 6.0, 123: 4.0}


def pair_batches():
    mixed_greedy = [{"prompt_ids": p, "params": greedy(xargs(*s))} for s in GREEDY_SETTINGS for p in PROMPTS]
    mixed_sampled = [
        {"prompt_ids": PROMPTS[i % 3], "params": sampled(t, tp, seed, xargs(g, tau, gen, k))}
        for i, (g, tau, gen, k, t, tp, seed) in enumerate(SAMPLED)
    ]
    alone_sampled = [[r] for r in mixed_sampled]
    masked = [
        {"prompt_ids": PROMPTS[1], "params": greedy(xargs(0.5, -0.3, "base", 0), allowed_token_ids=ALLOWED)},
        {"prompt_ids": PROMPTS[2], "params": greedy(xargs(0.5, None, "rl", 0), logit_bias=BIAS)},
    ]
    return [mixed_greedy, mixed_sampled, *alone_sampled, masked, criteria_batch(), passthrough_batch("pair")]


def passthrough_batch(engine):
    """Requests with extrapolation off; for the pair engine they carry the preset."""
    off = {"gamma": 0.0, "tau": "-inf", "generator": "rl"}
    cases = [  # (extra_args on the pair, which single model serves the same)
        ({"preset": "rl"}, "rl"), (off, "rl"), ({"preset": "base"}, "base"),
        ({"gamma": 0.7, "tau": "-inf", "generator": "base"}, "base"),
    ]
    batch = []
    for extra, model in cases:
        if engine != "pair" and engine != model:
            continue
        for i, p in enumerate(PROMPTS):
            batch.append({"prompt_ids": p, "params": sampled(0.8, 0.9, 100 + i, extra if engine == "pair" else None)})
            batch.append({"prompt_ids": p, "params": greedy(extra if engine == "pair" else None)})
    return batch


def reference_greedy(models, prompt, s, edit=0.0) -> list[int]:
    """The float64 reference's greedy tokens under settings s, with `edit` added to both rows."""
    ids, tokens = list(prompt), []
    for _ in range(MAX_TOKENS):
        a, b = next_logits(models, ids)
        tokens.append(ref.greedy_token(a + edit, b + edit, s))
        ids.append(tokens[-1])
    return tokens


def check_greedy(run, models):
    results = iter(run[0])
    for s in GREEDY_SETTINGS:
        for prompt in PROMPTS:
            assert next(results)[0]["token_ids"] == reference_greedy(models, prompt, settings(*s)), (s, prompt)


def check_sampled(run, models):
    """Every sampled token has positive probability under the float64 q, and the logprob the
    engine reports is log q(token) of that reference."""
    for i, (g, tau, gen, k, t, tp, _seed) in enumerate(SAMPLED):
        choice = run[1][i][0]
        ids = list(PROMPTS[i % 3])
        for token, lps in zip(choice["token_ids"], choice["logprobs"]):
            a, b = next_logits(models, ids)
            q = ref.two_stage_distribution(a, b, settings(g, tau, gen, k, t, tp))
            assert q[token] > 0
            assert lps[str(token)] == pytest.approx(math.log(q[token]), abs=2e-3)
            ids.append(token)


def check_mixed_batch(run):
    """A mixed batch gives each request what it gets alone."""
    alone = run[2 : 2 + len(SAMPLED)]
    for i in range(len(SAMPLED)):
        assert run[1][i][0]["token_ids"] == alone[i][0][0]["token_ids"]


def check_masks_and_bias(run, models, vocab_size):
    results = run[2 + len(SAMPLED)]
    allowed = np.full(vocab_size, -np.inf)
    allowed[ALLOWED] = 0.0
    bias = np.zeros(vocab_size)
    for token, value in BIAS.items():
        bias[token] = value
    cases = [(PROMPTS[1], settings(0.5, -0.3, "base", 0), allowed), (PROMPTS[2], settings(0.5, None, "rl", 0), bias)]
    for (prompt, s, edit), result in zip(cases, results):
        assert result[0]["token_ids"] == reference_greedy(models, prompt, s, edit)
    assert set(results[0][0]["token_ids"]) <= set(ALLOWED)


def check_selection_criteria(run, models):
    results = run[3 + len(SAMPLED)]
    greedy_flags = []
    for prompt, result in zip(PROMPTS, results[:3]):
        s = settings(*ENTROPY[:4], selection="entropy")
        ids = list(prompt)
        for token in result[0]["token_ids"]:
            a, b = next_logits(models, ids)
            assert token == ref.greedy_token(a, b, s)
            greedy_flags.append(ref.extrapolation_probability(a, b, s))
            ids.append(token)
    assert 0 < sum(greedy_flags) < len(greedy_flags)  # both kinds of positions were exercised
    for i, result in enumerate(results[3:]):
        gamma, tau, generator, k, selection = (ENTROPY, RANDOM)[i // 3]
        s = settings(gamma, tau, generator, k, 1.0, 0.9, selection)
        ids = list(PROMPTS[i % 3])
        for token, lps in zip(result[0]["token_ids"], result[0]["logprobs"]):
            a, b = next_logits(models, ids)
            q = ref.two_stage_distribution(a, b, s)
            assert lps[str(token)] == pytest.approx(math.log(q[token]), abs=2e-3)
            ids.append(token)


def check_passthrough(run, rl_alone, base_alone, logprob_tol=0.0):
    """Extrapolation off and the presets equal vLLM serving each model alone: the same tokens,
    and logprobs within `logprob_tol` (0: the same floats)."""
    pair = run[-1]
    singles = iter(rl_alone), iter(base_alone)
    batch = passthrough_batch("pair")
    assert len(pair) == len(batch) == len(rl_alone) * 2
    for request, result in zip(batch, pair):
        extra = request["params"]["extra_args"]
        model = extra.get("preset") or extra["generator"]
        expected = next(singles[0] if model == "rl" else singles[1])
        check_same_choice(result[0], expected[0], logprob_tol)


def check_same_choice(got, want, logprob_tol=0.0):
    """The same tokens, and logprobs within `logprob_tol` (0: the same floats)."""
    assert got["token_ids"] == want["token_ids"]
    assert len(got["logprobs"]) == len(want["logprobs"])
    for got_position, want_position in zip(got["logprobs"], want["logprobs"]):
        assert got_position.keys() == want_position.keys()
        assert all(abs(got_position[t] - want_position[t]) <= logprob_tol for t in got_position)


# Prompt scoring (server/engine/prompt_scoring.py): a long prompt (prefilled in chunks where a
# test asks for it) scored with prompt logprobs under each name, batched with generating requests.
SCORED_PROMPT = np.random.default_rng(17).integers(3, 380, size=70).tolist()
SCORED_TOP = 3  # prompt_logprobs: the top tokens reported beside the prompt's own
NEG = -9999.0  # what vLLM's server writes for a logprob of −inf
SCORED = {  # kind: (extra_args, temperature, top_p, reference settings; None for a preset)
    "rl": ({"preset": "rl"}, 0.8, 0.9, None),
    "base": ({"preset": "base"}, 0.0, 1.0, None),
    "sampled": (xargs(0.3, -0.3, "base", 20), 0.9, 0.8, settings(0.3, -0.3, "base", 20, 0.9, 0.8)),
    "everywhere": (xargs(0.5, None, "rl", 0), 1.0, 0.95, settings(0.5, None, "rl", 0, 1.0, 0.95)),
    "greedy": (xargs(1.0, 0.2, "rl", 5), 0.0, 1.0, settings(1.0, 0.2, "rl", 5)),
}
# Generating requests of other names in the same batch: the step's own sampling must be untouched.
GENERATING = [({"preset": "base"}, settings(0.0, -math.inf, "base", 0)),
              (xargs(0.1, -0.3, "base", 50), settings(0.1, -0.3, "base", 50))]


def scored(kind: str) -> tuple[str, ref.Settings | None]:
    """The preset and reference settings of a SCORED kind."""
    extra, _, _, s = SCORED[kind]
    return extra.get("preset", "extrapolate"), s


def scoring_batch() -> list[dict]:
    generating = [{"prompt_ids": PROMPTS[2], "params": greedy(extra)} for extra, _ in GENERATING]
    return generating + [{"prompt_ids": SCORED_PROMPT, "params": {
        "temperature": t, "top_p": p, "max_tokens": 1, "prompt_logprobs": SCORED_TOP, "extra_args": extra}}
        for extra, t, p, _ in SCORED.values()]


def expected_row(a: np.ndarray, b: np.ndarray, preset: str, s: ref.Settings | None) -> np.ndarray:
    """What the generation path reports for each token at a position of raw logits a (RL), b (base)."""
    if preset == "rl":
        return ref.log_softmax(a)
    if preset == "base":
        return ref.log_softmax(b)
    if s.temperature == 0:  # the greedy row: the generator's logits, or e on S where the proposal is flagged
        delta, gen, e = ref.parts(a, b, s)
        return ref.log_softmax(e if ref.flag_probabilities(delta, gen, s)[int(np.argmax(gen))] == 1.0 else gen)
    with np.errstate(divide="ignore"):
        return np.log(ref.two_stage_distribution(a, b, s))


def reference_scores(models, ids: list[int], preset: str, s: ref.Settings | None) -> list[np.ndarray]:
    """The expected row of every position but the last: row i scores token ids[i + 1]."""
    with torch.no_grad():
        rl, base = (m(torch.tensor([ids])).logits[0, :-1].numpy() for m in models)
    return [expected_row(a, b, preset, s) for a, b in zip(rl, base)]


def check_scores(got: list[dict], want: list[np.ndarray], tol: float = 2e-3) -> None:
    """`got`: {token id: logprob} of each position (−inf or −9999.0 where the reference has −inf);
    every reported value equals the reference, and the best of them is the reference's best."""
    assert len(got) == len(want)
    for position, row in zip(got, want):
        for token, value in position.items():
            if row[int(token)] == -math.inf:
                assert value <= NEG, (token, value)
            else:
                assert value == pytest.approx(row[int(token)], abs=tol), token
        assert max(position.values()) == pytest.approx(row.max(), abs=tol)


def check_scoring(results, models) -> None:
    """A run of `scoring_batch`: the generating requests follow the reference, and each scored
    prompt has the prompt logprobs of its name."""
    for (extra, s), result in zip(GENERATING, results):
        assert result[0]["token_ids"] == reference_greedy(models, PROMPTS[2], s), extra
        assert "prompt_logprobs" not in result[0]
    for kind, result in zip(SCORED, results[len(GENERATING):], strict=True):
        check_scores(result[0]["prompt_logprobs"], reference_scores(models, SCORED_PROMPT, *scored(kind)))
