"""The stacked model (one backbone for a base and its LoRA adapter) in the real engine.

The RL model of the float64 reference is PEFT's merge of base and adapter (W + s·B·A). Each
adapter variant runs the two-backbone path's requests and checks (tests/engine_checks.py):
greedy generations and sampled logprobs for full, selective, replace and top-k settings with
both generators, a mixed batch against each request alone, masks and logit bias on both
streams, the selection criteria. `:rl` and extrapolation off equal vLLM serving the merged
model alone, `:base` equals vLLM serving the base alone (the same tokens; logprobs within
1e-4: the stacked model adds s·(x·Aᵀ)·Bᵀ where the merged model multiplies by W + s·B·A, so
the float32 roundings differ). Compiled and TP 2 runs give what the eager TP 1 run gives, and
score prompts per name as the reference does; `rlvrx serve` takes the adapter directory as `--rl`.
"""

import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlvrx.server.toy_pair import build_lora_child, build_pair
from tests import engine_checks as checks
from tests.conftest import ref_settings, run_engine, start_server, stop_server

VARIANTS = {  # name: (family of the base, LoRA options)
    "qwen2-patterns": ("qwen2", {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"down_proj": 4.0}}),
    "llama-selective": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]}),
    "qwen3-rslora": ("qwen3", {"use_rslora": True, "rank": 8}),
}
PASSTHROUGH_TOL = 1e-4
TP = {"tensor_parallel_size": 2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


@pytest.fixture(scope="module")
def lora_pairs(toy_pairs, tmp_path_factory) -> dict:
    """{variant: (base, adapter, merged)}."""
    root = tmp_path_factory.mktemp("lora")
    bases = {family: base for family, (base, _) in toy_pairs.items()}
    bases["qwen3"] = build_pair(root / "qwen3", family="qwen3", seed=2)[0]
    return {name: (bases[family], *build_lora_child(bases[family], root / name, seed=i, **options))
            for i, (name, (family, options)) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def references(lora_pairs) -> dict:
    """{variant: (merged, base)} as float64 transformers models."""
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    return {name: (load(merged), load(base)) for name, (base, _, merged) in lora_pairs.items()}


@pytest.fixture(scope="module")
def runs(lora_pairs, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("engine")
    out = {name: run_engine({"pair": [str(adapter), str(base)], "batches": checks.pair_batches()}, tmp)
           for name, (base, adapter, _) in lora_pairs.items()}
    base, adapter, merged = lora_pairs["qwen2-patterns"]
    out["rl_alone"] = run_engine({"model": str(merged), "batches": [checks.passthrough_batch("rl")]}, tmp)[0]
    out["base_alone"] = run_engine({"model": str(base), "batches": [checks.passthrough_batch("base")]}, tmp)[0]
    # greedy settings, sampled settings, prompt logprobs per name
    batches = [*checks.pair_batches()[:2], checks.scoring_batch()]
    out["compiled"] = run_engine({"pair": [str(adapter), str(base)], "batches": batches, "eager": False}, tmp)
    out["tp2"] = run_engine({"pair": [str(adapter), str(base)], "batches": batches, **TP}, tmp)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_float64_reference(runs, references, variant):
    checks.check_greedy(runs[variant], references[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampled_logprobs_are_the_reference_q(runs, references, variant):
    checks.check_sampled(runs[variant], references[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_batch_gives_each_request_what_it_gets_alone(runs, variant):
    checks.check_mixed_batch(runs[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_masks_and_logit_bias_reach_both_streams(runs, references, variant):
    checks.check_masks_and_bias(runs[variant], references[variant], vocab_size=384)


def test_selection_criteria_follow_the_reference(runs, references):
    checks.check_selection_criteria(runs["qwen2-patterns"], references["qwen2-patterns"])


def test_presets_equal_vllm_serving_the_merged_model_and_the_base_alone(runs):
    checks.check_passthrough(runs["qwen2-patterns"], runs["rl_alone"], runs["base_alone"], PASSTHROUGH_TOL)


@pytest.mark.parametrize("mode", ["compiled", "tp2"])
def test_compiled_and_tensor_parallel_serve_what_eager_tp1_serves(runs, references, mode):
    eager = runs["qwen2-patterns"]
    checks.check_greedy(runs[mode], references["qwen2-patterns"])
    checks.check_sampled(runs[mode], references["qwen2-patterns"])
    for batch in range(2):
        assert len(runs[mode][batch]) == len(eager[batch])
        for got, want in zip(runs[mode][batch], eager[batch]):
            checks.check_same_choice(got[0], want[0], PASSTHROUGH_TOL)
    checks.check_scoring(runs[mode][2], references["qwen2-patterns"])


@pytest.fixture(scope="module")
def lora_server(lora_pairs, tmp_path_factory):
    base, adapter, _ = lora_pairs["qwen2-patterns"]
    proc, url = start_server((base, adapter), tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop_server(proc)


def test_rlvrx_serve_takes_an_adapter_directory(lora_server, references):
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = checks.PROMPTS[1]
    full = {"gamma": 0.5, "tau": None, "generator": "rl", "candidates": 0}
    for model, fields, s in (("toy", full, ref_settings(0.5, None, "rl", 0)),
                             ("toy:base", {}, ref_settings(0.0, -math.inf, "base", 0))):
        response = client.completions.create(
            model=model, prompt=prompt, max_tokens=checks.MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True, **fields})
        assert response.choices[0].token_ids == checks.reference_greedy(references["qwen2-patterns"], prompt, s)
        extrapolated = response.usage.model_extra["extrapolated_tokens"]
        assert extrapolated == (checks.MAX_TOKENS if model == "toy" else 0)  # τ = null: every position
