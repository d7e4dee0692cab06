"""Every generation route vLLM serves gives the distribution the request asked for: presets
and extrapolation fields reach the engine on SageMaker's /invocations, /v1/responses and
/v1/messages; /v1/chat/completions/batch and /generative_scoring, which cannot carry them, serve
the defaults and refuse them."""

import json
import math

import pytest

from tests.test_hardening import post

HI = [{"role": "user", "content": "hi there"}]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
EVERYWHERE = {"gamma": 0.5, "tau": None, "generator": "rl"}


def ok(url: str, path: str, body: dict) -> dict:
    status, response = post(url, path, json.dumps(body), timeout=120)
    assert status == 200, response
    return response


def chat_text(url: str, model: str, **fields) -> str:
    return ok(url, "/v1/chat/completions", {"model": model, "messages": HI, **GREEDY, **fields})["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model,fields", [("toy:rl", {}), ("toy:base", {}), ("toy", EVERYWHERE)])
def test_invocations_is_served_as_chat_and_completions(live_server, model, fields):
    url, _, _ = live_server
    prompt = {"model": model, "prompt": "hello", **GREEDY, **fields}
    direct = ok(url, "/v1/completions", prompt)
    routed = ok(url, "/invocations", prompt)
    assert routed["choices"][0]["text"] == direct["choices"][0]["text"]
    assert routed["usage"]["extrapolated_tokens"] == direct["usage"]["extrapolated_tokens"]
    chat = ok(url, "/invocations", {"model": model, "messages": HI, **GREEDY, **fields})
    assert chat["choices"][0]["message"]["content"] == chat_text(url, model, **fields)


def test_invocations_gets_the_same_checks(live_server):
    url, _, _ = live_server
    for body, field in (({"model": "toy", "prompt": "hi", "n": 100000}, "n"),
                        ({"model": "toy", "prompt": "hi", "tau": "low"}, "tau"),
                        ({"model": "toy", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role")):
        status, response = post(url, "/invocations", json.dumps(body))
        assert status == 400 and response["error"]["param"] == field


@pytest.mark.parametrize("model,fields", [("toy:rl", {}), ("toy:base", {}), ("toy", EVERYWHERE)])
def test_responses_and_messages_take_presets_and_fields(live_server, model, fields):
    url, _, _ = live_server
    expected = chat_text(url, model, **fields)
    response = ok(url, "/v1/responses", {"model": model, "input": HI, "temperature": 0, "max_output_tokens": 6,
                                         **fields})
    texts = [c["text"] for item in response["output"] if item.get("type") == "message" for c in item["content"]]
    assert "".join(texts) == expected
    message = ok(url, "/v1/messages", {"model": model, "messages": HI, "temperature": 0, "max_tokens": 6,
                                       "ignore_eos": True, **fields})
    assert "".join(c["text"] for c in message["content"] if c["type"] == "text") == expected


def test_responses_refuses_bad_fields(live_server):
    url, _, _ = live_server
    status, response = post(url, "/v1/responses", json.dumps({"model": "toy", "input": "hi", "tau": "low"}))
    assert status == 400 and response["error"]["param"] == "tau"


def test_chat_batch_serves_the_defaults_and_refuses_other_settings(live_server):
    url, _, _ = live_server
    batch = {"model": "toy", "messages": [HI, HI], **GREEDY}
    answer = ok(url, "/v1/chat/completions/batch", batch)
    assert [c["message"]["content"] for c in answer["choices"]] == [chat_text(url, "toy")] * 2
    for change, field in (({"model": "toy:rl"}, "model"), ({"gamma": 0.3}, "gamma"), ({"tau": None}, "tau")):
        status, response = post(url, "/v1/chat/completions/batch", json.dumps({**batch, **change}))
        assert status == 400 and response["error"]["param"] == field, response


def test_generative_scoring_serves_the_defaults_and_refuses_other_names(live_server):
    """vLLM's /generative_scoring builds its own sampling parameters (temperature 1, top-p 1, no
    vllm_xargs): it scores with the default `<name>`, as prompt scoring of that name at those settings
    does; another name or a field would be served the defaults, so it is refused."""
    url, _, _ = live_server
    query, items, labels = [5, 17, 42, 99, 7], [[11, 3], [250, 8, 64]], [9, 120, 33, 77]
    for item in items:
        for i, label in enumerate(labels):
            got = ok(url, "/generative_scoring", {"model": "toy", "query": query, "items": [item], "apply_softmax": False,
                                                  "label_token_ids": [label, *labels[:i], *labels[i + 1:]]})
            want = ok(url, "/v1/completions", {"model": "toy", "prompt": query + item + [label], "max_tokens": 1,
                                               "temperature": 1.0, "top_p": 1.0, "prompt_logprobs": 0})
            logprob = want["choices"][0]["prompt_logprobs"][-1][str(label)]["logprob"]
            assert got["data"][0]["score"] == pytest.approx(math.exp(logprob), rel=1e-3, abs=1e-6), (item, label)
    for change, field in (({"model": "toy:base"}, "model"), ({"model": "toy:rl"}, "model"), ({"gamma": 0.3}, "gamma")):
        body = {"model": "toy", "query": query, "items": items, "label_token_ids": labels, **change}
        status, response = post(url, "/generative_scoring", json.dumps(body))
        assert status == 400 and response["error"]["param"] == field, response
