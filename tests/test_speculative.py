"""Speculative decoding verified against q (server/engine/speculative.py), both engine paths.

With vLLM's n-gram drafter on, each path runs the requests of the non-speculative checks
(tests/engine_checks.py): greedy generations equal the float64 reference of the rule token for token
(so they equal the non-speculative engine's), sampled tokens have the reference's log q as their
logprobs, allowed-token masks reach both streams, and `:rl` / `:base` equal vLLM serving each model
alone with the same speculation (the same tokens and logprob floats). Drafts were proposed, accepted and
rejected in these runs (vLLM's counters). The joint distribution of the first three tokens on a prompt
where the drafter proposes the model's own likely continuation matches the reference (chi-square).
"""

import math

import numpy as np
import pytest
import torch

from rlvrx.kernels import reference as ref
from tests import engine_checks as checks
from tests.conftest import next_logits, ref_settings as settings, run_engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
JOINT_SAMPLES = 1200
JOINT_TOKENS = 3
JOINT = (0.5, -0.2, "base", 20, 0.8, 0.9)  # (gamma, tau, generator, candidates, temperature, top_p)


def allowed_batch():
    return [{"prompt_ids": checks.PROMPTS[1], "params": checks.greedy(checks.xargs(0.5, -0.3, "base", 0),
                                                                     allowed_token_ids=checks.ALLOWED)}]


def joint_prompt(models) -> list[int]:
    """A prompt that ends as it began, with the RL model's greedy continuation in between: after the
    first generated token the drafter proposes that continuation again."""
    start = list(checks.PROMPTS[1][:6])
    ids = list(start)
    for _ in range(8):
        ids.append(int(np.argmax(next_logits(models, ids)[0])))
    return ids + start


def joint_batch(prompt):
    g, tau, gen, k, t, top_p = JOINT
    return [{"prompt_ids": prompt, "params": {"temperature": t, "top_p": top_p, "seed": seed, "max_tokens": JOINT_TOKENS,
                                              "ignore_eos": True, "extra_args": checks.xargs(g, tau, gen, k)}}
            for seed in range(JOINT_SAMPLES)]


def spec_batches(prompt):
    batches = checks.pair_batches()
    return [batches[0], batches[1], allowed_batch(), checks.passthrough_batch("pair"), joint_batch(prompt)]


@pytest.fixture(scope="module")
def runs(toy_pairs, hf_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speculative")
    base, rl = toy_pairs["qwen2"]
    prompt = joint_prompt(hf_models["qwen2"])
    single = lambda path, engine: run_engine(  # noqa: E731
        {"model": str(path), "batches": [checks.passthrough_batch(engine)], "speculative_config": NGRAM}, tmp)
    return {
        "pair": run_engine({"pair": [str(rl), str(base)], "batches": spec_batches(prompt),
                            "speculative_config": NGRAM}, tmp),
        "rl_alone": single(rl, "rl"),
        "base_alone": single(base, "base"),
        "prompt": prompt,
    }


def test_drafts_were_proposed_accepted_and_rejected(runs):
    counts = runs["pair"]["spec"]
    accepted = counts["vllm:spec_decode_num_accepted_tokens"] or 0
    assert 0 < accepted < counts["vllm:spec_decode_num_draft_tokens"]


def test_greedy_equals_the_rule_without_speculation(runs, hf_models):
    checks.check_greedy(runs["pair"]["results"], hf_models["qwen2"])


def test_sampled_logprobs_are_the_reference_q(runs, hf_models):
    checks.check_sampled(runs["pair"]["results"], hf_models["qwen2"])


def test_allowed_tokens_reach_both_streams(runs, hf_models):
    allowed = np.full(384, -np.inf)
    allowed[checks.ALLOWED] = 0.0
    got = runs["pair"]["results"][2][0][0]["token_ids"]
    assert got == checks.reference_greedy(hf_models["qwen2"], checks.PROMPTS[1], settings(0.5, -0.3, "base", 0), allowed)


def test_presets_verify_against_their_own_model(runs):
    results = runs["pair"]["results"]
    checks.check_passthrough(results[:4], runs["rl_alone"]["results"][0], runs["base_alone"]["results"][0])


def test_joint_distribution_of_the_first_tokens_is_the_rule(runs, hf_models):
    """Chi-square of the first JOINT_TOKENS tokens of JOINT_SAMPLES seeded requests against the float64
    reference's joint probabilities (categories expected ≥ 5 times; the rest pooled)."""
    s = settings(*JOINT)
    models = hf_models["qwen2"]
    cache: dict[tuple, np.ndarray] = {}

    def q(prefix: tuple) -> np.ndarray:
        if prefix not in cache:
            cache[prefix] = ref.two_stage_distribution(*next_logits(models, list(runs["prompt"]) + list(prefix)), s)
        return cache[prefix]

    counts: dict[tuple, int] = {}
    for result in runs["pair"]["results"][4]:
        seq = tuple(result[0]["token_ids"])
        counts[seq] = counts.get(seq, 0) + 1
    probability = {seq: math.prod(q(seq[:i])[seq[i]] for i in range(JOINT_TOKENS)) for seq in counts}
    assert all(p > 0 for p in probability.values())
    kept = [seq for seq, p in probability.items() if p * JOINT_SAMPLES >= 5]
    observed = np.array([counts[seq] for seq in kept] + [JOINT_SAMPLES - sum(counts[seq] for seq in kept)], float)
    expected = np.array([probability[seq] * JOINT_SAMPLES for seq in kept], float)
    expected = np.append(expected, JOINT_SAMPLES - expected.sum())
    assert len(kept) >= 5 and expected[-1] >= 5
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (chi2, len(expected), p_value)
