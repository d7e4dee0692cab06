"""Fuzzed requests against the live server: whatever the body, the answer is a well-formed
response or an OpenAI-format 4xx — never a 5xx or a hang — and the engine keeps serving.

Two generators: Hypothesis bodies over a fixed list of fields (JSON scalars, lists, objects,
NaN/±inf literals; `RLVRX_FUZZ_EXAMPLES` raises the bound), and schemathesis bodies from the
server's own /openapi.json, which publishes the extrapolation fields (`benchmarks/fuzz.py`
is the longer run of the latter)."""

import json
import os
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import fuzz
from rlvrx.server.api.middleware import openai_fields
from rlvrx.server.engine import settings as settings_mod
from tests.test_hardening import post, serves_normally

EXAMPLES = int(os.environ.get("RLVRX_FUZZ_EXAMPLES", "150"))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([0, 1, -1, 0.5, 1e9, -1e9, "inf", "-inf", "null", "base", "rl"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
FIELDS = ["gamma", "tau", "generator", "candidates", "extrapolation", "temperature", "top_p", "top_k", "min_p",
          "n", "seed", "max_tokens", "stop", "logprobs", "top_logprobs", "presence_penalty", "logit_bias",
          "stream", "vllm_xargs", "ignore_eos", "min_tokens", "model", "prompt", "messages"]
bodies = st.fixed_dictionaries(
    {}, optional={field: values for field in FIELDS}
).map(lambda extra: {"model": "toy", "max_tokens": 3, **extra})


def encode(body: dict) -> str:
    """JSON as a sloppy client sends it: NaN and Infinity literals allowed."""
    return json.dumps(body, allow_nan=True)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
def test_fuzzed_requests_never_get_a_5xx(live_server, body, chat):
    url, _, _ = live_server
    if chat:
        body.pop("prompt", None)
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        path = "/v1/chat/completions"
    else:
        body.pop("messages", None)
        body.setdefault("prompt", "hi")
        path = "/v1/completions"
    if body.get("stream") is True:
        body["stream"] = False  # the streaming path is covered elsewhere; keep one JSON answer here
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 4:
        body["n"] = 4
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 8:
        body["max_tokens"] = 8
    status, response = post(url, path, encode(body), timeout=120)
    assert status < 500, (status, response, body)
    if status >= 400:
        assert response["error"]["message"] and response["error"]["type"], response
    else:
        assert response["choices"], response


def test_openapi_schema_publishes_the_extrapolation_fields(live_server):
    schema = json.loads(urllib.request.urlopen(live_server[0] + "/openapi.json", timeout=30).read())
    for route in fuzz.ROUTES:
        ref = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        request = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        fields = request["properties"]
        assert request["additionalProperties"] is False
        assert openai_fields(route) <= set(fields)  # OpenAI's fields are accepted, those vLLM lacks too
        assert set(fields["extrapolation"]["anyOf"][0]["properties"]) == set(settings_mod.FIELDS)
        assert [fields["gamma"]["minimum"], fields["gamma"]["maximum"]] == list(settings_mod.GAMMA_RANGE)
        assert fields["generator"]["enum"] == list(settings_mod.GENERATORS)
        assert fields["selection"]["enum"] == list(settings_mod.SELECTIONS)
        assert fields["candidates"]["maximum"] > 0 and fields["tau"]["default"] == settings_mod.Extrapolation().tau


@pytest.mark.parametrize("mode,examples", [("positive", 300), ("negative", 200)])
def test_schema_generated_requests_never_get_a_5xx(live_server, mode, examples):
    """Schemathesis: bodies valid under the published schema, and bodies that break it."""
    statuses, _ = fuzz.fuzz(live_server[0], live_server[1], examples, mode)
    assert sum(statuses.values()) == examples
    assert mode == "negative" or statuses[200] > 0


def test_server_serves_after_the_fuzz(live_server):
    assert serves_normally(live_server[0])
