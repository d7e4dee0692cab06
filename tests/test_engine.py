"""The vLLM path end to end: the real engine with the wrapper model and the processor,
against a float64 transformers reference of ALGORITHM.md and against vLLM serving
each model alone (requests and checks: tests/engine_checks.py); tied pairs whose checkpoints
store their own heads."""

import pytest

from tests import engine_checks as checks
from tests.conftest import run_engine


@pytest.fixture(scope="module")
def runs(toy_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    out = {}
    for family, (base, rl) in toy_pairs.items():
        out[family] = run_engine({"pair": [str(rl), str(base)], "batches": checks.pair_batches()}, tmp)
    base, rl = toy_pairs["qwen2"]
    out["rl_alone"] = run_engine({"model": str(rl), "batches": [checks.passthrough_batch("rl")]}, tmp)[0]
    out["base_alone"] = run_engine({"model": str(base), "batches": [checks.passthrough_batch("base")]}, tmp)[0]
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_matches_float64_reference(runs, hf_models, family):
    checks.check_greedy(runs[family], hf_models[family])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_sampled_logprobs_are_the_reference_q(runs, hf_models, family):
    checks.check_sampled(runs[family], hf_models[family])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_mixed_batch_gives_each_request_what_it_gets_alone(runs, family):
    checks.check_mixed_batch(runs[family])


def test_masks_and_logit_bias_apply_to_both_models(runs, hf_models):
    checks.check_masks_and_bias(runs["qwen2"], hf_models["qwen2"], vocab_size=384)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_entropy_and_random_selection_follow_the_reference(runs, hf_models, family):
    checks.check_selection_criteria(runs[family], hf_models[family])


def test_extrapolation_off_equals_each_model_alone(runs):
    checks.check_passthrough(runs["qwen2"], runs["rl_alone"], runs["base_alone"])


@pytest.mark.parametrize("heads,eager", [({"rl": "own"}, True), ({"base": "own", "rl": "copy"}, False)],
                         ids=["rl-own-eager", "base-own-compiled"])
def test_tied_pair_whose_checkpoints_store_lm_head(tmp_path, heads, eager):
    """Under a tied config each backbone's head is what transformers loads from its own checkpoint:
    a stored head that differs from the embedding, else the embedding (vLLM decides the engine's
    tie from the RL checkpoint alone; before, the base backbone then had an unloaded head, 4.5 nat
    off, or its embedding for its own head, 1.5 nat off)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlvrx.server.toy_pair import build_tied_pair

    base, rl = build_tied_pair(tmp_path, heads)
    models = tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (rl, base))
    run = run_engine({"pair": [str(rl), str(base)], "batches": checks.pair_batches()[:2], "eager": eager}, tmp_path)
    checks.check_greedy(run, models)
    checks.check_sampled(run, models)
