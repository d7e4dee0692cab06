"""Extrapolation metrics on /metrics move by exactly what the responses report,
with the engine in its own process and inside the API server's process."""

import json
import urllib.error
import urllib.request
from collections import defaultdict

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY

PROMPT_IDS = [312, 345, 14, 273, 287]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items without pid): value}, summed over processes."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    values: dict = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            values[(sample.name, labels)] += sample.value
    return values


def moved(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(params=["engine_process", "in_process"])
def server(request):
    return request.getfixturevalue("live_server" if request.param == "engine_process" else "live_server_inprocess")


def test_metrics_move_by_what_responses_report(server):
    url, name, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def complete(model, max_tokens, temperature=0.0, **extra):
        r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=max_tokens, temperature=temperature,
                                      seed=1, extra_body={"ignore_eos": True, **extra})
        return r.usage

    before = scrape(url)
    extrapolated = [
        complete(name, 6, gamma=0.5, tau=-0.3),
        complete(name, 6, gamma=1.0, tau=None, generator="rl"),
        complete(name, 6, temperature=1.0, gamma=0.2, tau=0.0),
    ]
    rl = [complete(f"{name}:rl", 5), complete(f"{name}:rl", 5, gamma=0.4)]
    base = [complete(f"{name}:base", 4)]
    rl.append(complete(f"{name}:rl", 3))  # one more engine step after the last extrapolated token
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    extrapolated.append(chunks[-1].usage)
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    after = scrape(url)

    label = {"model_name": name}
    assert moved(before, after, "rlvrx:generated_tokens_total", **label, preset="extrapolated") == 22
    assert moved(before, after, "rlvrx:generated_tokens_total", **label, preset="rl") == 13
    assert moved(before, after, "rlvrx:generated_tokens_total", **label, preset="base") == 4
    reported = sum(u.model_extra["extrapolated_tokens"] for u in extrapolated)
    assert reported > 0
    assert moved(before, after, "rlvrx:extrapolated_tokens_total", **label, preset="extrapolated") == pytest.approx(
        reported, abs=1e-3)
    assert moved(before, after, "rlvrx:extrapolated_tokens_total", **label, preset="rl") == 0
    assert all(u.model_extra["extrapolated_tokens"] == 0 for u in rl + base)
    assert moved(before, after, "rlvrx:delta_logp_count", **label, preset="extrapolated") >= 18
    assert moved(before, after, "rlvrx:e2e_latency_seconds_count", **label, preset="extrapolated") == 4
    assert moved(before, after, "rlvrx:e2e_latency_seconds_count", **label, preset="rl") == 3
    assert moved(before, after, "rlvrx:time_to_first_token_seconds_count", **label, preset="extrapolated") == 1
    assert moved(before, after, "rlvrx:inter_token_latency_seconds_count", **label, preset="extrapolated") == (
        content_chunks - 1)
    for preset, count in (("extrapolated", 4), ("rl", 3), ("base", 1)):
        assert moved(before, after, "rlvrx:request_gamma_count", **label, preset=preset) == count
        assert moved(before, after, "rlvrx:request_tau_count", **label, preset=preset) == count
    assert moved(before, after, "rlvrx:combine_seconds_count", **label) > 0
    assert moved(before, after, "rlvrx:request_gamma_sum", **label, preset="extrapolated") == pytest.approx(1.75)
    # vLLM's own serving metrics are still there.
    names = {key[0] for key in after}
    for vllm_metric in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                        "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert vllm_metric in names, vllm_metric


def test_requests_without_the_key_get_401_and_are_not_counted(live_server_inprocess):
    url, name, _ = live_server_inprocess
    before = scrape(url)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEY}"}):
            body = json.dumps({"model": name, "prompt": "hi", "max_tokens": 2, "gamma": "not a number"}).encode()
            request = urllib.request.Request(url + path, data=body if path != "/v1/models" else None,
                                             headers={"content-type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=30)
            assert info.value.code == 401, path
            error = json.loads(info.value.read())["error"]
            assert error["type"] == "AuthenticationError" and "API key" in error["message"]
    for path in ("/health", "/metrics"):  # open unless --protect-metrics
        assert urllib.request.urlopen(url + path, timeout=30).status == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    after = scrape(url)
    assert moved(before, after, "rlvrx:request_gamma_count", model_name=name, preset="extrapolated") == 0
