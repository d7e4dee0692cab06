"""HTTP surface against the live server, through the official `openai` client."""

import json
import math
import urllib.error
import urllib.request

import openai
import pytest

from rlvrx.kernels import reference as ref
from tests.conftest import next_logits, ref_settings as settings

PROMPT_IDS = [312, 345, 14, 273, 287, 344, 3, 223]


@pytest.fixture(scope="module")
def client(live_server):
    url, _, _ = live_server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete_ids(client, model="toy", max_tokens=10, **extra):
    """A completion from token ids; returns (token ids, response)."""
    response = client.completions.create(
        model=model, prompt=PROMPT_IDS, max_tokens=max_tokens, temperature=extra.pop("temperature", 0.0),
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
    )
    return response.choices[0].token_ids, response


def reference_greedy(hf_models, s, max_tokens=10):
    ids, out, flagged = list(PROMPT_IDS), [], 0
    for _ in range(max_tokens):
        a, b = next_logits(hf_models["qwen2"], ids)
        flagged += ref.extrapolation_probability(a, b, s)
        y = ref.greedy_token(a, b, s)
        out.append(y)
        ids.append(y)
    return out, flagged


def test_models_lists_the_three_presets(client):
    names = {m.id for m in client.models.list().data}
    assert {"toy", "toy:rl", "toy:base"} <= names


@pytest.mark.parametrize("fields", [
    {"gamma": 0.5, "tau": -0.3, "generator": "base", "candidates": 20},
    {"extrapolation": {"gamma": 1.0, "tau": None, "generator": "rl", "candidates": 0}},
    {"gamma": 0.0, "extrapolation": {"tau": 0.1}},
    {"gamma": 0.5, "tau": 3.7, "selection": "entropy"},
])
def test_greedy_completion_matches_reference_and_counts_extrapolation(client, hf_models, live_server, fields):
    merged = {**fields.get("extrapolation", {}), **{k: v for k, v in fields.items() if k != "extrapolation"}}
    defaults = ref.Settings(0.05, -0.3, "base", 50, 0.0, 1.0)
    s = settings(merged.get("gamma", defaults.gamma), merged.get("tau", defaults.tau),
                 merged.get("generator", defaults.generator), merged.get("candidates", defaults.candidates),
                 selection=merged.get("selection", defaults.selection))
    tokens, response = complete_ids(client, **fields)
    expected, flagged = reference_greedy(hf_models, s)
    assert tokens == expected
    usage = response.model_extra.get("usage") or response.usage.model_dump()
    assert usage["extrapolated_tokens"] == flagged
    assert usage["extrapolation_rate"] == pytest.approx(flagged / 10)
    assert response.model == "toy"


def test_presets_and_extrapolation_off(client, hf_models):
    rl_tokens, rl_response = complete_ids(client, model="toy:rl")
    off_tokens, _ = complete_ids(client, gamma=0.0, tau="-inf", generator="rl")
    base_tokens, _ = complete_ids(client, model="toy:base", gamma=3.0)  # fields are ignored by presets
    assert rl_response.model == "toy:rl"
    assert rl_response.usage.model_extra["extrapolated_tokens"] == 0
    assert rl_tokens == off_tokens == reference_greedy(hf_models, settings(0, -math.inf, "rl", 0))[0]
    assert base_tokens == reference_greedy(hf_models, settings(0, -math.inf, "base", 0))[0]
    assert rl_tokens != base_tokens


def test_sampled_logprobs_describe_the_extrapolated_distribution(client, hf_models):
    s = settings(0.5, -0.3, "base", 30, temperature=0.9, top_p=0.8)
    response = client.completions.create(
        model="toy", prompt=PROMPT_IDS, max_tokens=12, temperature=0.9, top_p=0.8, seed=3, logprobs=3,
        extra_body={"gamma": 0.5, "tau": -0.3, "generator": "base", "candidates": 30,
                    "ignore_eos": True, "return_token_ids": True},
    )
    choice = response.choices[0]
    ids, expected_m = list(PROMPT_IDS), 0.0
    for token, logprob in zip(choice.token_ids, choice.logprobs.token_logprobs):
        a, b = next_logits(hf_models["qwen2"], ids)
        q = ref.two_stage_distribution(a, b, s)
        expected_m += ref.extrapolation_probability(a, b, s)
        assert logprob == pytest.approx(math.log(q[token]), abs=2e-3)
        ids.append(token)
    assert response.usage.model_extra["extrapolated_tokens"] == pytest.approx(expected_m, abs=1e-3)
    again = client.completions.create(
        model="toy", prompt=PROMPT_IDS, max_tokens=12, temperature=0.9, top_p=0.8, seed=3,
        extra_body={"gamma": 0.5, "tau": -0.3, "generator": "base", "candidates": 30, "ignore_eos": True,
                    "return_token_ids": True},
    )
    assert again.choices[0].token_ids == choice.token_ids


def test_chat_streaming_n_stop_and_top_logprobs(client):
    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    body = {"gamma": 0.3, "tau": -0.2}
    full = client.chat.completions.create(model="toy", messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body=body)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens > 0 and "extrapolated_tokens" in full.usage.model_extra
    assert len(full.choices[0].logprobs.content[0].top_logprobs) == 3

    chunks = list(client.chat.completions.create(
        model="toy", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=body))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].model_extra["extrapolated_tokens"] == full.usage.model_extra["extrapolated_tokens"]

    many = client.chat.completions.create(model="toy", messages=messages, max_tokens=8, temperature=1.0, n=3,
                                          seed=11, extra_body=body)
    assert len(many.choices) == 3 and many.usage.completion_tokens == 24
    assert 0 <= many.usage.model_extra["extrapolated_tokens"] <= 24

    if len(text) > 3:
        stop = text[2:4]
        stopped = client.chat.completions.create(model="toy", messages=messages, max_tokens=12, temperature=0,
                                                 stop=[stop], extra_body=body)
        assert stopped.choices[0].message.content == text[: text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ({"gamma": "x"}, "gamma"),
    ({"gamma": float("nan")}, "gamma"),
    ({"gamma": 1e9}, "gamma"),
    ({"tau": "abc"}, "tau"),
    ({"tau": float("nan")}, "tau"),
    ({"generator": "teacher"}, "generator"),
    ({"candidates": -1}, "candidates"),
    ({"candidates": 10**9}, "candidates"),
    ({"candidates": 2.5}, "candidates"),
    ({"extrapolation": 3}, "extrapolation"),
    ({"extrapolation": {"gama": 0.1}}, "extrapolation.gama"),
    ({"gamma": 0.1, "extrapolation": {"gamma": 0.2}}, "gamma"),
    ({"vllm_xargs": {"gamma": "strong"}}, "gamma"),
    ({"selection": "kl"}, "selection"),
    ({"selection": "random", "tau": 2}, "tau"),
]


@pytest.mark.parametrize("body,field", BAD_REQUESTS)
def test_bad_fields_get_a_400_naming_the_field(live_server, client, body, field):
    url, _, _ = live_server
    payload = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert field in error["message"] and error["param"] == field
    assert error["type"] == "BadRequestError"
    # The server keeps serving.
    ok = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="toy", prompt="hi", max_tokens=2, extra_body={"generator": "both"})
    assert "generator" in str(info.value)


# A plausible value for each field of OpenAI's documented requests (the parameters of the `openai`
# SDK's chat.completions.create and completions.create), with the companions some of them need.
TOOL = {"name": "add", "description": "adds two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}
OPENAI_FIELDS = {
    "/v1/chat/completions": {
        "audio": {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]},
        "frequency_penalty": {"frequency_penalty": 0.1},
        "function_call": {"function_call": "none", "functions": [TOOL]},
        "functions": {"functions": [TOOL]},
        "logit_bias": {"logit_bias": {"5": 1}},
        "logprobs": {"logprobs": True},
        "max_completion_tokens": {"max_completion_tokens": 2},
        "max_tokens": {"max_tokens": 2},
        "metadata": {"metadata": {"session": "s-1"}},
        "modalities": {"modalities": ["text"]},
        "moderation": {"moderation": {"model": "omni-moderation-latest"}},
        "n": {"n": 2},
        "parallel_tool_calls": {"parallel_tool_calls": False},
        "prediction": {"prediction": {"type": "content", "content": "12"}},
        "presence_penalty": {"presence_penalty": 0.1},
        "prompt_cache_key": {"prompt_cache_key": "user-1"},
        "prompt_cache_options": {"prompt_cache_options": {"mode": "implicit"}},
        "prompt_cache_retention": {"prompt_cache_retention": "24h"},
        "reasoning_effort": {"reasoning_effort": "low"},
        "response_format": {"response_format": {"type": "text"}},
        "safety_identifier": {"safety_identifier": "hash-1"},
        "seed": {"seed": 7},
        "service_tier": {"service_tier": "auto"},
        "stop": {"stop": ["\n\n"]},
        "store": {"store": False},
        "stream": {"stream": True},
        "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
        "temperature": {"temperature": 0.7},
        "tool_choice": {"tool_choice": "none", "tools": [{"type": "function", "function": TOOL}]},
        "tools": {"tools": [{"type": "function", "function": TOOL}], "tool_choice": "none"},
        "top_logprobs": {"logprobs": True, "top_logprobs": 2},
        "top_p": {"top_p": 0.9},
        "user": {"user": "user-1"},
        "verbosity": {"verbosity": "low"},
        "web_search_options": {"web_search_options": {"search_context_size": "low"}},
    },
    "/v1/completions": {
        "best_of": {"best_of": 1},
        "echo": {"echo": True},
        "frequency_penalty": {"frequency_penalty": 0.1},
        "logit_bias": {"logit_bias": {"5": 1}},
        "logprobs": {"logprobs": 2},
        "max_tokens": {"max_tokens": 2},
        "n": {"n": 2},
        "presence_penalty": {"presence_penalty": 0.1},
        "seed": {"seed": 7},
        "stop": {"stop": ["\n\n"]},
        "stream": {"stream": True},
        "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
        "suffix": {"suffix": None},
        "temperature": {"temperature": 0.7},
        "top_p": {"top_p": 0.9},
        "user": {"user": "user-1"},
    },
}
REQUIRED = {"/v1/chat/completions": {"model": "toy", "messages": [{"role": "user", "content": "hi"}]},
            "/v1/completions": {"model": "toy", "prompt": "hi"}}


def test_every_documented_openai_field_has_a_case():
    from rlvrx.server.api.middleware import openai_fields

    for path, cases in OPENAI_FIELDS.items():
        assert set(cases) == openai_fields(path) - set(REQUIRED[path])


@pytest.mark.parametrize("path,field", [(path, field) for path, cases in OPENAI_FIELDS.items() for field in cases])
def test_documented_openai_fields_are_accepted(live_server, path, field):
    """SDKs and agent frameworks send these; vLLM ignores those it has no use for."""
    url, _, _ = live_server
    body = {**REQUIRED[path], "max_tokens": 2, **OPENAI_FIELDS[path][field]}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    assert status == 200, text
    assert "extrapolated_tokens" in text or body.get("stream")  # the middleware handled it


@pytest.fixture(scope="module")
def prefixed_server(toy_pairs, tmp_path_factory):
    """`rlvrx serve --root-path /api --allow-custom-roles`: behind a proxy that routes /api/… here,
    for a chat template with roles of its own."""
    from tests.conftest import start_server, stop_server

    proc, url = start_server(toy_pairs["qwen2"], tmp_path_factory.mktemp("prefixed") / "server.log",
                             extra_args=("--root-path", "/api", "--allow-custom-roles"))
    yield url
    stop_server(proc)


@pytest.mark.parametrize("path", ["/api/v1/completions", "/v1/completions"])
def test_requests_under_the_root_path_get_the_extrapolation_surface(prefixed_server, path):
    """vLLM routes both (the second is what a proxy that strips the prefix sends)."""
    from tests.test_hardening import post

    status, body = post(prefixed_server, path, json.dumps({"model": "toy", "prompt": "hi", "max_tokens": 2,
                                                           "gamma": 0.5, "tau": None}))
    assert status == 200 and body["usage"]["extrapolated_tokens"] > 0
    status, body = post(prefixed_server, path, json.dumps({"model": "toy", "prompt": "hi", "temprature": 0.5}))
    assert status == 400 and body["error"]["param"] == "temprature"


def test_allow_custom_roles_keeps_vllms_behaviour(prefixed_server):
    from tests.test_hardening import post

    messages = [{"role": "wizard", "content": "hi"}, {"role": "user", "content": "hi"}]
    status, body = post(prefixed_server, "/api/v1/chat/completions",
                        json.dumps({"model": "toy", "messages": messages, "max_tokens": 2}))
    assert status == 200, body
