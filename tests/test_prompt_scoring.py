"""Prompt logprobs per served name (server/engine/prompt_scoring.py) against the float64 reference:
`:rl` scores with the RL model's log-softmax, `:base` with the base model's, `<name>` with log q at
the request's settings (−inf where q is 0; the greedy row's log-softmax at temperature 0), as the
generation path reports a token.

In the engine (two backbones and the stacked LoRA model, eager; the same batch runs compiled in
tests/test_compile.py and tests/test_lora.py), with prompts prefilled in chunks and batched with
generating requests of other names; through every HTTP route to them
(echo with logprobs, streamed too, `prompt_logprobs` on completions and chat, settings as fields or
`vllm_xargs`); and through lm-evaluation-harness's `local-completions` model on a small multiple-choice
task (tests/lm_eval_task/), which scores differently, and as the reference does, through each name.
"""

import json
import math
import urllib.request

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlvrx.server.toy_pair import build_lora_child
from tests import engine_checks as checks
from tests.conftest import ROOT, ref_settings, run_engine
from tests.engine_checks import NEG, SCORED, SCORED_PROMPT as PROMPT, SCORED_TOP as TOP, check_scores
from tests.test_hardening import post, serves_normally

# --- the engine ---------------------------------------------------------------------------------

CHUNK = 32  # --max-num-batched-tokens: the scored prompt is prefilled over three steps


@pytest.fixture(scope="module")
def pairs(toy_pairs, tmp_path_factory) -> dict:
    """{path: ((rl, base) paths for the engine, (rl, base) float64 reference models)}."""
    base, rl = toy_pairs["qwen2"]
    adapter, merged = build_lora_child(base, tmp_path_factory.mktemp("lora") / "child", seed=5)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    return {"two-backbone": ((rl, base), (load(rl), load(base))),
            "stacked": ((adapter, base), (load(merged), load(base)))}


@pytest.mark.parametrize("path", ["two-backbone", "stacked"])
def test_engine_scores_prompts_as_each_name(pairs, tmp_path, path):
    """Eager, prefilled in chunks, beside generating requests (compiled: tests/test_compile.py,
    tests/test_lora.py; TP 2: tests/test_lora.py, tests/test_parallel.py)."""
    paths, models = pairs[path]
    spec = {"pair": [str(p) for p in paths], "max_num_batched_tokens": CHUNK, "batches": [checks.scoring_batch()]}
    checks.check_scoring(run_engine(spec, tmp_path)[0], models)


def test_the_checks_see_both_kinds_of_position(pairs):
    """The greedy setting flags some positions and not others; the sampled one has q = 0 at some
    prompt tokens and not at others."""
    models = pairs["two-backbone"][1]
    rows = {kind: checks.reference_scores(models, PROMPT, *checks.scored(kind)) for kind in ("greedy", "sampled", "rl")}
    flagged = [not np.allclose(g, r) for g, r in zip(rows["greedy"], rows["rl"])]
    assert 0 < sum(flagged) < len(flagged)
    assert 0 < sum(row[token] == -math.inf for row, token in zip(rows["sampled"], PROMPT[1:])) < len(PROMPT) - 1


# --- the HTTP routes ----------------------------------------------------------------------------

def request(kind: str, xargs: bool = False) -> dict:
    """The model name and sampling fields of a SCORED kind, settings as fields or as vllm_xargs."""
    extra, temperature, top_p, _ = SCORED[kind]
    preset = extra.get("preset")
    body = {"model": f"toy:{preset}" if preset else "toy", "temperature": temperature, "top_p": top_p}
    if not preset:
        body.update({"vllm_xargs": extra} if xargs else extra)
    return body


def completion(url: str, **body) -> dict:
    status, response = post(url, "/v1/completions", json.dumps(body), timeout=120)
    assert status == 200, response
    return response


def echoed(choice: dict) -> list[dict]:
    """Per position after the first, {token id: logprob} of an echoed prompt (return_tokens_as_token_ids)."""
    logprobs = choice["logprobs"]
    return [{token.removeprefix("token_id:"): value for token, value in top.items()}
            for top in logprobs["top_logprobs"][1:]]


@pytest.mark.parametrize("kind", ["base", "rl", "greedy"])
def test_echo_with_logprobs_scores_the_prompt_as_the_name(live_server, hf_models, kind):
    """What lm-evaluation-harness sends for loglikelihood: echo, logprobs 1, max_tokens 1, temperature 0."""
    url, _, _ = live_server
    want = checks.reference_scores(hf_models["qwen2"], PROMPT, *checks.scored(kind))
    body = {**request(kind), "temperature": 0.0, "prompt": PROMPT, "echo": True, "logprobs": TOP,
            "return_tokens_as_token_ids": True}
    one = completion(url, **body, max_tokens=1)["choices"][0]
    assert one["logprobs"]["token_logprobs"][0] is None
    check_scores(echoed(one)[:-1], want)
    for own, token, row in zip(one["logprobs"]["token_logprobs"][1:], PROMPT[1:], want):
        assert own <= NEG if row[token] == -math.inf else own == pytest.approx(row[token], abs=2e-3)
    none = completion(url, **body, max_tokens=0)["choices"][0]
    assert none["logprobs"]["top_logprobs"] == one["logprobs"]["top_logprobs"][:-1]
    streamed = stream(url, **body, max_tokens=1)
    assert streamed == one["logprobs"]["token_logprobs"]


def stream(url: str, **body) -> list:
    """The token logprobs of a streamed completion, in order."""
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"content-type": "application/json"})
    out = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[len(b"data: "):])["choices"]:
                    out += (choice.get("logprobs") or {}).get("token_logprobs") or []
    return out


@pytest.mark.parametrize("xargs", [False, True], ids=["fields", "vllm_xargs"])
def test_prompt_logprobs_on_completions_and_chat(live_server, hf_models, xargs):
    url, _, _ = live_server
    want = checks.reference_scores(hf_models["qwen2"], PROMPT, *checks.scored("sampled"))
    body = {**request("sampled", xargs), "max_tokens": 1, "prompt_logprobs": TOP}
    got = completion(url, **body, prompt=PROMPT)["choices"][0]["prompt_logprobs"]
    assert got[0] is None
    check_scores([{t: v["logprob"] for t, v in position.items()} for position in got[1:]], want)

    status, chat = post(url, "/v1/chat/completions", json.dumps(
        {**body, "messages": [{"role": "user", "content": "What is 7 + 5?"}], "return_token_ids": True}), timeout=120)
    assert status == 200, chat
    ids = chat["prompt_token_ids"]
    want = checks.reference_scores(hf_models["qwen2"], ids, *checks.scored("sampled"))
    check_scores([{t: v["logprob"] for t, v in position.items()} for position in chat["prompt_logprobs"][1:]], want)


@pytest.mark.parametrize("body, field", [
    ({"prompt_logprobs": -2}, "prompt_logprobs"),
    ({"prompt_logprobs": "3"}, "prompt_logprobs"),
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 10_000}, "prompt_logprobs"),  # beyond --max-logprobs
    ({"echo": True, "logprobs": -5}, "logprobs"),
])
def test_bad_prompt_logprobs_are_400s(live_server, body, field):
    url, _, _ = live_server
    status, response = post(url, "/v1/completions", json.dumps({"model": "toy", "prompt": PROMPT, "max_tokens": 1,
                                                                **body}))
    assert status == 400, response
    assert response["error"]["param"] == field
    assert serves_normally(url)


# --- lm-evaluation-harness ----------------------------------------------------------------------

TASK_DIR = ROOT / "tests" / "lm_eval_task"


def test_lm_eval_loglikelihood_task_through_each_name(live_server, hf_models, monkeypatch):
    """A multiple-choice task run by lm-evaluation-harness's `local-completions` model: each name's
    per-choice loglikelihoods are the reference's (Σ of the continuation's scores, at the server's
    default settings for `<name>`, at temperature 0 as lm-eval asks), and the three answer differently."""
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    url, _, (_, rl) = live_server
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository
    defaults = ref_settings(0.05, -0.3, "base", 50)  # the live server's defaults
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    scores = {}
    for model, preset in (("toy:base", "base"), ("toy:rl", "rl"), ("toy", "extrapolate")):
        lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model=model, tokenizer=str(rl),
                                 tokenizer_backend="huggingface", tokenized_requests=True, max_retries=1)
        out = simple_evaluate(model=lm, tasks=["rlvrx_toy_choice"], task_manager=tasks,
                              log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        samples = out["samples"]["rlvrx_toy_choice"]
        got, want = [], []
        for sample in samples:
            for (context, continuation), (loglikelihood, _) in zip(sample["arguments"], sample["filtered_resps"]):
                context_ids, continuation_ids = lm._encode_pair(context, continuation)
                ids = context_ids + continuation_ids
                rows = checks.reference_scores(hf_models["qwen2"], ids, preset, defaults)[len(context_ids) - 1:]
                expected = sum(max(row[t], NEG) for row, t in zip(rows, continuation_ids))
                got.append(loglikelihood)
                want.append(expected)
        assert got == pytest.approx(want, abs=0.02)
        scores[model] = got
    answers = {model: np.argmax(np.reshape(got, (len(samples), -1)), axis=1).tolist() for model, got in scores.items()}
    assert len(set(map(tuple, answers.values()))) == 3, answers  # three different sets of answers
