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

Adapters beyond plain LoRA (PEFT_VARIANTS), each served as PEFT loads and merges it (greedy
generations and sampled logprobs against the float64 reference): a PiSSA adapter saved converted
(doubled rank) as adapter_model.bin, targeted by a regex that names lm_head only to exclude it, with
prompt embeddings on (a prompt given as its embeddings generates what its token ids do); LoRA on
embed_tokens and lm_head with modules_to_save norms and trained q/k/v biases, compiled; trainable
tokens of embed_tokens and lm_head with LoRA biases on q/k/v.
"""

import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from safetensors.torch import load_file

from rlvrx.server.toy_pair import PROJECTIONS, build_lora_child, build_pair
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


TOKENS = sorted({*checks.PROMPTS[0][:3], *checks.PROMPTS[1][:3], *checks.PROMPTS[2][:3]})  # rows the prompts use
PEFT_VARIANTS = {  # name: (LoRA options on the Qwen2 toy base, engine options)
    "pissa-converted": ({"init_lora_weights": "pissa", "convert": True, "safe_serialization": False,
                         "target_modules": r"^(?!.*(lm_head|embed_tokens)).*_proj$"}, {"prompt_embeds": True}),
    "embeddings": ({"target_modules": [*PROJECTIONS, "embed_tokens", "lm_head"], "modules_to_save": ["norm"],
                    "bias": "all"}, {"eager": False}),
    "tokens": ({"trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": TOKENS[::2]}, "lora_bias": True,
                "target_modules": ["q_proj", "k_proj", "v_proj"]}, {}),
}
EMBEDDED = checks.GREEDY_SETTINGS[:2]  # greedy settings also sent as prompt embeddings


@pytest.fixture(scope="module")
def peft_pairs(toy_pairs, tmp_path_factory) -> dict:
    """{variant: (base, adapter, merged)}: merged is PEFT's load of the adapter, merge_and_unload'ed."""
    root, base = tmp_path_factory.mktemp("peft"), toy_pairs["qwen2"][0]
    return {name: (base, *build_lora_child(base, root / name, seed=10 + i, **options))
            for i, (name, (options, _)) in enumerate(PEFT_VARIANTS.items())}


@pytest.fixture(scope="module")
def peft_runs(peft_pairs, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("peft-engine")
    embeddings = load_file(str(peft_pairs["pissa-converted"][0] / "model.safetensors"))["model.embed_tokens.weight"]
    embeds_files = []
    for i, prompt in enumerate(checks.PROMPTS):
        embeds_files.append(tmp / f"embeds-{i}.pt")
        torch.save(embeddings[prompt].clone(), embeds_files[-1])
    runs = {}
    for name, (base, adapter, _) in peft_pairs.items():
        batches = checks.pair_batches()[:2]  # greedy settings, sampled settings
        if PEFT_VARIANTS[name][1].get("prompt_embeds"):
            batches.append([{"prompt_embeds_file": str(f), "params": checks.greedy(checks.xargs(*s))}
                            for s in EMBEDDED for f in embeds_files])
        runs[name] = run_engine({"pair": [str(adapter), str(base)], "batches": batches, **PEFT_VARIANTS[name][1]}, tmp)
    return runs


@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_peft_adapters_serve_what_peft_loads_and_merges(peft_pairs, peft_runs, variant):
    base, _, merged = peft_pairs[variant]
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    models = load(merged), load(base)
    checks.check_greedy(peft_runs[variant], models)
    checks.check_sampled(peft_runs[variant], models)
    if PEFT_VARIANTS[variant][1].get("prompt_embeds"):
        results = iter(peft_runs[variant][2])
        for s in EMBEDDED:
            for prompt in checks.PROMPTS:
                assert next(results)[0]["token_ids"] == checks.reference_greedy(models, prompt, ref_settings(*s))
