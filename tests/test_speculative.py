"""Speculative decoding verified against q (server/engine/speculative.py), both engine paths.

With vLLM's n-gram drafter on, the two-backbone pair (eager) and a stacked LoRA pair (compiled), and
with a draft model (the base model drafting for the two-backbone pair), run the requests of the
non-speculative checks (tests/engine_checks.py): greedy generations equal the float64
reference of the rule token for token (so they equal the non-speculative engine's), sampled tokens have
the reference's log q as their logprobs, allowed-token masks reach both streams, and the joint
distribution of the first three tokens, on a prompt where the drafter proposes the model's own likely
continuation, matches the reference (chi-square), and prompts are scored per name. `:rl` / `:base` equal vLLM serving each model alone
with the same speculation (the same tokens and logprob floats). Drafts were proposed, accepted and
rejected in every run (vLLM's counters). Tensor parallelism (TP 2) serves the rule with speculation too.

`rlvrx serve --speculative-config` serves the same through the API: a greedy completion equals the
reference with usage counting the extrapolated positions of kept tokens only, streamed or not, and a
sampled one reports log q and the sum of M over its kept positions; chat
works; /metrics counts draft and accepted tokens per preset, by exactly what the engine kept; vLLM's
refusal of logit_bias under speculation is a 400 naming it. `disable_by_batch_size` (vLLM V0's key)
leaves batches of that many requests without drafts and the others drafting, and is refused with any
method but ngram.
"""

import json
import math

import openai
import pytest
import numpy as np
import torch

from rlvrx.kernels import reference as ref
from tests import engine_checks as checks
from rlvrx.server.toy_pair import build_lora_child
from tests.conftest import next_logits, ref_settings as settings, run_engine, start_server, stop_server
from tests.test_metrics import moved, scrape

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
JOINT_SAMPLES = 1200
JOINT_TOKENS = 3
JOINT = (0.5, -0.2, "base", 20, 0.7, 0.9)  # (gamma, tau, generator, candidates, temperature, top_p)


def allowed_batch():
    return [{"prompt_ids": checks.PROMPTS[1], "params": checks.greedy(checks.xargs(0.5, -0.3, "base", 0),
                                                                     allowed_token_ids=checks.ALLOWED)}]


def joint_prompt(models) -> list[int]:
    """A prompt on which the rule repeats one token: a run of a token t, then three of the token r the
    rule's greedy choice continues it with, r taking at least half of q at JOINT's sampling settings — so
    after the first generated token the drafter proposes r again, and drafts are accepted and rejected."""
    greedy = settings(*JOINT[:4])
    for t in range(384):
        ids = [t] * 12
        run = [ref.greedy_token(*next_logits(models, ids), greedy)]
        while len(run) < 3 and ref.greedy_token(*next_logits(models, ids + run), greedy) == run[0]:
            run.append(run[0])
        if len(run) == 3 and ref.two_stage_distribution(*next_logits(models, ids + run), settings(*JOINT))[run[0]] > 0.5:
            return ids + run
    raise AssertionError("no prompt of the toy pair repeats a token")


def joint_batch(prompt):
    g, tau, gen, k, t, top_p = JOINT
    return [{"prompt_ids": prompt, "params": {"temperature": t, "top_p": top_p, "seed": seed, "max_tokens": JOINT_TOKENS,
                                              "ignore_eos": True, "extra_args": checks.xargs(g, tau, gen, k)}}
            for seed in range(JOINT_SAMPLES)]


def spec_batches(prompt):
    """greedy settings, sampled settings, allowed tokens, joint distribution (and the rule's greedy
    continuation of its prompt), prompt scoring per name beside generating requests, presets (last)"""
    batches = checks.pair_batches()
    repeat = {"prompt_ids": prompt, "params": checks.greedy(checks.xargs(*JOINT[:4]))}
    return [batches[0], batches[1], allowed_batch(), joint_batch(prompt) + [repeat], checks.scoring_batch(),
            checks.passthrough_batch("pair")]


@pytest.fixture(scope="module")
def references(hf_models, tmp_path_factory, toy_pairs):
    """{run: ((rl, base) float64 models, engine "pair" argument)}: the two-backbone pair (drafted by n-gram
    and by a draft model) and a LoRA child of its base (the stacked path), whose RL model is PEFT's merge."""
    from transformers import AutoModelForCausalLM

    base, rl = toy_pairs["qwen2"]
    adapter, merged = build_lora_child(base, tmp_path_factory.mktemp("lora") / "child", seed=5)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float64).eval()
    return {"two-backbone": (hf_models["qwen2"], [str(rl), str(base)]),
            "stacked": ((merged_model, hf_models["qwen2"][1]), [str(adapter), str(base)]),
            "draft-model": (hf_models["qwen2"], [str(rl), str(base)])}


@pytest.fixture(scope="module")
def runs(references, toy_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speculative")
    base, rl = toy_pairs["qwen2"]
    draft_model = {"method": "draft_model", "model": str(base), "num_speculative_tokens": 3}
    out = {}
    for path, speculative_config in (("two-backbone", NGRAM), ("stacked", NGRAM), ("draft-model", draft_model)):
        models, pair = references[path]
        prompt = joint_prompt(models)
        out[path] = run_engine({"pair": pair, "batches": spec_batches(prompt), "speculative_config": speculative_config,
                                "eager": path != "stacked"}, tmp)
        out[path]["prompt"] = prompt
    for engine, model in (("rl", rl), ("base", base)):
        out[f"{engine}_alone"] = run_engine(
            {"model": str(model), "batches": [checks.passthrough_batch(engine)], "speculative_config": NGRAM}, tmp)
    return out


PATHS = ["two-backbone", "stacked", "draft-model"]


@pytest.mark.parametrize("path", PATHS)
def test_drafts_were_proposed_accepted_and_rejected(runs, path):
    counts = runs[path]["spec"]
    accepted = counts["vllm:spec_decode_num_accepted_tokens"] or 0
    assert 0 < accepted < counts["vllm:spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("path", PATHS)
def test_greedy_equals_the_rule_without_speculation(runs, references, path):
    checks.check_greedy(runs[path]["results"], references[path][0])


@pytest.mark.parametrize("path", PATHS)
def test_sampled_logprobs_are_the_reference_q(runs, references, path):
    checks.check_sampled(runs[path]["results"], references[path][0])


@pytest.mark.parametrize("path", PATHS)
def test_allowed_tokens_reach_both_streams(runs, references, path):
    allowed = np.full(384, -np.inf)
    allowed[checks.ALLOWED] = 0.0
    got = runs[path]["results"][2][0][0]["token_ids"]
    assert got == checks.reference_greedy(references[path][0], checks.PROMPTS[1], settings(0.5, -0.3, "base", 0), allowed)


def test_tensor_parallel(references, tmp_path):
    """TP 2 (two CPU workers, each combining and verifying the same rows): what TP 1 serves."""
    models, pair = references["two-backbone"]
    run = run_engine({"pair": pair, "batches": checks.pair_batches()[:2], "speculative_config": NGRAM,
                      "tensor_parallel_size": 2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}, tmp_path)
    assert run["spec"]["vllm:spec_decode_num_draft_tokens"] > 0
    checks.check_greedy(run["results"], models)
    checks.check_sampled(run["results"], models)


def test_disable_by_batch_size_leaves_full_batches_without_drafts(runs, references, tmp_path):
    """disable_by_batch_size 2 (server.engine.draft_gate): four requests in one batch run without a single
    draft, one request alone drafts as usual; every one emits the rule's greedy tokens."""
    models, pair = references["two-backbone"]
    prompt = runs["two-backbone"]["prompt"]
    request = {"prompt_ids": prompt, "params": checks.greedy(checks.xargs(*JOINT[:4]))}
    gated = {**NGRAM, "disable_by_batch_size": 2}
    full = run_engine({"pair": pair, "batches": [[request] * 4], "speculative_config": gated}, tmp_path)
    alone = run_engine({"pair": pair, "batches": [[request]], "speculative_config": gated}, tmp_path)
    assert not full["spec"]["vllm:spec_decode_num_draft_tokens"]
    assert alone["spec"]["vllm:spec_decode_num_draft_tokens"] > 0
    expected = checks.reference_greedy(models, prompt, settings(*JOINT[:4]))
    assert [r[0]["token_ids"] for r in full["results"][0] + alone["results"][0]] == [expected] * 5


@pytest.mark.parametrize("config, message", [
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 3, "disable_by_batch_size": 4}, "ngram method"),
    ({**NGRAM, "disable_by_batch_size": 0}, "whole number"),
    ({**NGRAM, "disable_by_batch_size": "4"}, "whole number"),
    ({**NGRAM, "disable_by_batch_size": True}, "whole number"),
])
def test_disable_by_batch_size_is_refused_where_it_cannot_apply(config, message):
    from rlvrx.server.engine import draft_gate

    overrides = {}
    with pytest.raises(draft_gate.DraftGateError, match=message):
        draft_gate.apply(config, overrides)
    assert overrides == {}
    assert draft_gate.apply(NGRAM, overrides) is NGRAM and draft_gate.apply(None, overrides) is None
    assert draft_gate.apply({**NGRAM, "disable_by_batch_size": 4}, overrides) == NGRAM and overrides == {
        draft_gate.OVERRIDE: 4}


@pytest.mark.parametrize("path", PATHS)
def test_prompt_scoring_per_name(runs, references, path):
    checks.check_scoring(runs[path]["results"][4], references[path][0])


def test_presets_verify_against_their_own_model(runs):
    results = runs["two-backbone"]["results"]
    checks.check_passthrough(results, runs["rl_alone"]["results"][0], runs["base_alone"]["results"][0])


@pytest.mark.parametrize("path", PATHS)
def test_joint_distribution_of_the_first_tokens_is_the_rule(runs, references, path):
    """Chi-square of the first JOINT_TOKENS tokens of JOINT_SAMPLES seeded requests against the float64
    reference's joint probabilities (categories expected ≥ 5 times; the rest pooled)."""
    s = settings(*JOINT)
    models = references[path][0]
    cache: dict[tuple, np.ndarray] = {}

    def q(prefix: tuple) -> np.ndarray:
        if prefix not in cache:
            cache[prefix] = ref.two_stage_distribution(*next_logits(models, list(runs[path]["prompt"]) + list(prefix)), s)
        return cache[prefix]

    *sampled, repeat = runs[path]["results"][3]
    greedy: list[int] = []
    ids = list(runs[path]["prompt"])
    for _ in range(checks.MAX_TOKENS):
        greedy.append(ref.greedy_token(*next_logits(models, ids + greedy), settings(*JOINT[:4])))
    assert repeat[0]["token_ids"] == greedy
    counts: dict[tuple, int] = {}
    for result in sampled:
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




@pytest.fixture(scope="module")
def spec_server(toy_pairs, tmp_path_factory):
    # disable_by_batch_size (server.engine.draft_gate), which vLLM itself would refuse, at a batch the
    # tests below never reach: the server takes it, and one request at a time still drafts.
    proc, url = start_server(toy_pairs["qwen2"], tmp_path_factory.mktemp("spec-server") / "server.log",
                             extra_args=("--speculative-config", json.dumps({**NGRAM, "disable_by_batch_size": 8})))
    yield url
    stop_server(proc)


def test_served_with_speculation(spec_server, runs, references):
    models, _ = references["two-backbone"]
    prompt = runs["two-backbone"]["prompt"]
    client = openai.OpenAI(base_url=spec_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    s = settings(0.5, -0.2, "base", 20)
    expected, flagged, ids = [], 0.0, list(prompt)
    for _ in range(16):
        a, b = next_logits(models, ids)
        flagged += ref.extrapolation_probability(a, b, s)
        expected.append(ref.greedy_token(a, b, s))
        ids.append(expected[-1])
    body = {"gamma": 0.5, "tau": -0.2, "generator": "base", "candidates": 20, "ignore_eos": True, "return_token_ids": True}
    before = scrape(spec_server)
    response = client.completions.create(model="toy", prompt=prompt, max_tokens=16, temperature=0, extra_body=body)
    assert response.choices[0].token_ids == expected
    assert response.usage.model_extra["extrapolated_tokens"] == flagged
    chunks = list(client.completions.create(model="toy", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=body))
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == expected
    assert [c.usage for c in chunks if c.usage][-1].model_extra["extrapolated_tokens"] == flagged
    sampled = client.completions.create(model="toy", prompt=prompt, max_tokens=16, temperature=0.7, top_p=0.9, seed=4,
                                        logprobs=1, extra_body=body)
    s_sampled, expected_m, ids = settings(0.5, -0.2, "base", 20, 0.7, 0.9), 0.0, list(prompt)
    for token, logprob in zip(sampled.choices[0].token_ids, sampled.choices[0].logprobs.token_logprobs):
        a, b = next_logits(models, ids)
        expected_m += ref.extrapolation_probability(a, b, s_sampled)
        assert logprob == pytest.approx(math.log(ref.two_stage_distribution(a, b, s_sampled)[token]), abs=2e-3)
        ids.append(token)
    assert sampled.usage.model_extra["extrapolated_tokens"] == pytest.approx(expected_m, abs=1e-3)
    rl = client.completions.create(model="toy:rl", prompt=prompt, max_tokens=16, temperature=0, extra_body=body)
    after = scrape(spec_server)
    for preset in ("extrapolated", "rl"):
        drafts = moved(before, after, "rlvrx:spec_draft_tokens_total", model_name="toy", preset=preset)
        accepted = moved(before, after, "rlvrx:spec_accepted_tokens_total", model_name="toy", preset=preset)
        assert 0 < accepted <= drafts, preset
    # Every generated token is a kept draft or one sampled token per step.
    assert moved(before, after, "rlvrx:generated_tokens_total", model_name="toy", preset="rl") == rl.usage.completion_tokens

    chat = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi hi hi"}],
                                          max_tokens=8, temperature=0.8, seed=2)
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="toy", prompt=prompt, max_tokens=4, logit_bias={"5": 1.0})
