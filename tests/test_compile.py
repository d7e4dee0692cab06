"""The compiled engine (what `make serve` runs: no --enforce-eager) against the float64
reference (generations, and prompt logprobs per name), and a second start on the warm compile
cache against the first.

The wrapper model is compiled as one graph with one AOT artifact (server/engine/model.py).
vLLM 0.32 cannot load AOT artifacts on CPU (its CPU backend's artifact has no
`finalize_loading`), so here the warm start tries the artifact and compiles again; on CUDA it
loads it.
"""

import math
import re

import numpy as np
import pytest

from rlvrx.kernels import reference as ref
from tests import engine_checks as checks
from tests.conftest import next_logits, ref_settings, run_engine

MAX_TOKENS = 8
PROMPTS = [np.random.default_rng(7).integers(3, 380, size=n).tolist() for n in (6, 17)]
GREEDY = [(0.5, None, "rl", 0), (0.1, -0.3, "base", 50)]  # (gamma, tau, generator, candidates)
SAMPLED = [(0.3, -0.3, "base", 20, 0.9, 0.8, 5), (1.0, 0.1, "rl", 0, 0.6, 1.0, 6)]  # + (T, top-p, seed)
SAVED = re.compile(r"saved AOT compiled function to (\S+)")
TRIED = re.compile(r"(?:Directly load AOT compilation from path|due to a load failure from) (\S+?),?\s")


def xargs(gamma, tau, generator, candidates):
    return {"gamma": gamma, "tau": tau, "generator": generator, "candidates": candidates}


def requests():
    greedy = [{"prompt_ids": p, "params": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                           "extra_args": xargs(*s)}} for s in GREEDY for p in PROMPTS]
    sampled = [{"prompt_ids": PROMPTS[i], "params": {"temperature": t, "top_p": tp, "seed": seed, "logprobs": 1,
                                                     "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                                     "extra_args": xargs(g, tau, gen, k)}}
               for i, (g, tau, gen, k, t, tp, seed) in enumerate(SAMPLED)]
    return greedy + sampled


@pytest.fixture(scope="module")
def starts(toy_pairs, tmp_path_factory):
    """(results, log) of a cold start and of a warm start on the same compile cache."""
    tmp = tmp_path_factory.mktemp("compile")
    base, rl = toy_pairs["qwen2"]
    spec = {"pair": [str(rl), str(base)], "eager": False, "env": {"VLLM_CACHE_ROOT": str(tmp / "vllm-cache")},
            "batches": [requests(), checks.scoring_batch()]}
    out = []
    for _ in range(2):
        log = []
        out.append((run_engine(spec, tmp, log), log[0]))
    return out


def test_compiled_engine_matches_the_float64_reference(starts, hf_models):
    results = starts[0][0][0]
    models = hf_models["qwen2"]
    for i, s in enumerate(r for r in GREEDY for _ in PROMPTS):
        ids = list(PROMPTS[i % len(PROMPTS)])
        for token in results[i][0]["token_ids"]:
            a, b = next_logits(models, ids)
            assert token == ref.greedy_token(a, b, ref_settings(*s)), s
            ids.append(token)
    for i, (g, tau, gen, k, t, tp, _) in enumerate(SAMPLED):
        choice, ids = results[len(GREEDY) * len(PROMPTS) + i][0], list(PROMPTS[i])
        for token, logprobs in zip(choice["token_ids"], choice["logprobs"]):
            a, b = next_logits(models, ids)
            q = ref.two_stage_distribution(a, b, ref_settings(g, tau, gen, k, t, tp))
            assert logprobs[str(token)] == pytest.approx(math.log(q[token]), abs=2e-3)
            ids.append(token)


def test_compiled_engine_scores_prompts_per_name(starts, hf_models):
    checks.check_scoring(starts[0][0][1], hf_models["qwen2"])


def test_one_artifact_for_the_pair_and_a_warm_start_serves_the_same(starts):
    (cold, cold_log), (warm, warm_log) = starts
    saved = SAVED.findall(cold_log)
    assert len(saved) == 1, saved  # one graph for both backbones, compiled once
    assert TRIED.findall(warm_log) == saved  # the warm start went to that artifact
    assert warm == cold  # token ids and logprobs, exactly
