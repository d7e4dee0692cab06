"""Usage and metrics count each kept token once: under tensor parallelism (every rank runs
the processor), with prompts prefilled in chunks (every chunk but the last is sampled and
thrown away), with requests preempted and recomputed, with stop strings (the engine runs on
until the API server's abort arrives) and with several choices; a chunked prompt echoed with
its logprobs is scored as the reference scores it (every rank scores it); and TP 2 serves what
TP 1 serves."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import engine_checks as checks
from tests.conftest import ref_settings, start_server, stop_server
from tests.test_hardening import post
from tests.test_metrics import moved, scrape
from tests.test_prompt_scoring import echoed

CHUNK = 32  # --max-num-batched-tokens: the long prompt below takes several steps to prefill
BLOCKS = 5  # KV-cache blocks (of 128 tokens on CPU): the burst below cannot fit, so requests are preempted
LONG_PROMPT = list(range(5, 5 + 100))
# τ = null with greedy rows: every position is extrapolated with probability exactly 1.
EVERYWHERE = {"gamma": 0.5, "tau": None, "generator": "rl", "temperature": 0}


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def chunked_server(request, toy_pairs, tmp_path_factory):
    tp = request.param
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    proc, url = start_server(toy_pairs["qwen2"], tmp_path_factory.mktemp(f"tp{tp}") / "server.log", env,
                             ("--tensor-parallel-size", str(tp), "--max-num-batched-tokens", str(CHUNK),
                              "--num-gpu-blocks-override", str(BLOCKS)))
    yield tp, url
    stop_server(proc)


def complete(url: str, **body) -> dict:
    status, response = post(url, "/v1/completions", __import__("json").dumps({"model": "toy", **body}), timeout=300)
    assert status == 200, response
    return response


RESULTS: dict[int, dict] = {}  # per TP size: what the chunked server answered


def test_each_kept_token_counts_once(chunked_server, hf_models):
    tp, url = chunked_server
    before = scrape(url)
    answers = {}
    # A prompt of four chunks, logprobs of every position.
    answers["chunked"] = complete(url, prompt=LONG_PROMPT, max_tokens=8, ignore_eos=True, logprobs=3, **EVERYWHERE)
    # A stop string: the engine samples on until the API server's abort reaches it.
    free = complete(url, prompt=[7, 8, 9], max_tokens=24, ignore_eos=True, **EVERYWHERE)
    text = free["choices"][0]["text"]
    stop = text[len(text) // 2:][:2]
    answers["stopped"] = complete(url, prompt=[7, 8, 9], max_tokens=24, ignore_eos=True, stop=[stop], **EVERYWHERE)
    # Several choices share one request (sampled: with τ = null, M is 1 at every position all the
    # same). Seeded: vLLM 0.32 on CPU killed the engine rewinding the generator of a chunk's sample.
    answers["choices"] = complete(url, prompt=LONG_PROMPT[:40], max_tokens=5, ignore_eos=True, n=3, seed=3,
                                  **{**EVERYWHERE, "temperature": 1.0})
    answers["rl"] = complete(url, prompt=LONG_PROMPT, max_tokens=4, ignore_eos=True, temperature=0, model="toy:rl")
    # What lm-evaluation-harness sends to score a prompt (here one of four chunks).
    answers["echo"] = complete(url, prompt=LONG_PROMPT, max_tokens=1, echo=True, logprobs=2,
                               return_tokens_as_token_ids=True, **EVERYWHERE)
    want = checks.reference_scores(hf_models["qwen2"], LONG_PROMPT, "extrapolate", ref_settings(0.5, None, "rl", 50))
    checks.check_scores(echoed(answers["echo"]["choices"][0])[:-1], want)
    # More than the KV cache holds at once: vLLM preempts requests and recomputes them.
    with ThreadPoolExecutor(6) as pool:
        burst = list(pool.map(lambda i: complete(url, prompt=LONG_PROMPT[i:], max_tokens=60, ignore_eos=True,
                                                 **EVERYWHERE), range(6)))
    after = scrape(url)
    assert moved(before, after, "vllm:num_preemptions_total", engine="0", model_name="toy") > 0
    for answer in burst:
        assert answer["usage"]["extrapolated_tokens"] == answer["usage"]["completion_tokens"] == 60

    stopped = answers["stopped"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < 24
    for key in ("chunked", "stopped", "choices", "echo"):
        usage = answers[key]["usage"]
        assert usage["extrapolated_tokens"] == usage["completion_tokens"], key
        assert usage["extrapolation_rate"] == 1.0, key
    assert answers["rl"]["usage"]["extrapolated_tokens"] == 0
    extrapolated = sum(answers[k]["usage"]["completion_tokens"] for k in ("chunked", "stopped", "choices", "echo")
                       ) + 24 + 6 * 60
    label = {"model_name": "toy"}
    assert moved(before, after, "rlvrx:generated_tokens_total", **label, preset="extrapolated") == extrapolated
    assert moved(before, after, "rlvrx:extrapolated_tokens_total", **label, preset="extrapolated") == pytest.approx(
        extrapolated, abs=1e-4)
    assert moved(before, after, "rlvrx:generated_tokens_total", **label, preset="rl") == 4
    assert moved(before, after, "rlvrx:extrapolated_tokens_total", **label, preset="rl") == 0
    assert extrapolated <= moved(before, after, "rlvrx:delta_logp_count", **label, preset="extrapolated") <= extrapolated + 4
    RESULTS[tp] = answers


def test_tensor_parallel_serves_what_one_rank_serves(chunked_server):
    tp, _ = chunked_server
    if tp == 1 or 1 not in RESULTS or 2 not in RESULTS:
        pytest.skip("compares the TP 2 server with the TP 1 server, after both ran the test above")
    one, two = RESULTS[1], RESULTS[2]
    for key in one:
        assert [c["text"] for c in one[key]["choices"]] == [c["text"] for c in two[key]["choices"]], key
        assert one[key]["usage"] == two[key]["usage"], key
    for key in ("chunked", "echo"):
        top_one = one[key]["choices"][0]["logprobs"]["top_logprobs"]
        top_two = two[key]["choices"][0]["logprobs"]["top_logprobs"]
        for a, b in zip(top_one, top_two, strict=True):
            assert (a is None) == (b is None)
            assert (a or {}).keys() == (b or {}).keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a or {})
