"""Sampling defaults per served name: `<name>` and `<name>:rl` get the RL model's
generation_config.json, `<name>:base` the base model's, a field the request sets wins — on both
engine paths (two backbones; the stacked model with the adapter that `rlvrx lora-extract` writes,
which carries the RL checkpoint's file) and on every generation route (chat, streamed chat,
completions, responses, messages, the chat batch route). Also: an adapter without the file gives
both models the base's defaults (as PEFT's generate does), and `--generation-config vllm` none."""

import json
import shutil

import httpx
import pytest

from rlvrx.server.engine.pair import engine_kwargs
from rlvrx.tools.lora_extract import extract

# Every field vLLM reads from a generation config, each different between the two models (a
# field one model leaves out is vLLM's neutral value for it), each changing what the toy samples
# (the negative penalties draw already generated tokens back into the top-k).
RL_CONFIG = {"temperature": 0.8, "top_p": 0.9, "top_k": 6, "min_p": 0.1, "repetition_penalty": 1.5,
             "max_new_tokens": 6}
BASE_CONFIG = {"temperature": 1.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "presence_penalty": -2.0,
               "frequency_penalty": -1.0, "max_new_tokens": 8}
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}
HI = [{"role": "user", "content": "hi there"}]


def sampling(generation_config: dict) -> dict:
    """The request fields that carry a generation config's defaults (chat's names)."""
    fields = {**NEUTRAL, **{k: v for k, v in generation_config.items() if k != "max_new_tokens"}}
    return {**fields, "max_tokens": generation_config["max_new_tokens"]}


OWN = {"toy": sampling(RL_CONFIG), "toy:rl": sampling(RL_CONFIG), "toy:base": sampling(BASE_CONFIG)}
OTHER = {"toy": sampling(BASE_CONFIG), "toy:rl": sampling(BASE_CONFIG), "toy:base": sampling(RL_CONFIG)}


@pytest.fixture(scope="module")
def generation_pair(toy_pairs, tmp_path_factory):
    """(base, full RL, extracted adapter): the Qwen2 toy pair with a generation config on each model;
    the adapter is `rlvrx lora-extract`'s rank-4 copy of the RL model."""
    root = tmp_path_factory.mktemp("generation")
    for name, source, generation_config in (("base", toy_pairs["qwen2"][0], BASE_CONFIG),
                                            ("rl", toy_pairs["qwen2"][1], RL_CONFIG)):
        shutil.copytree(source, root / name)
        (root / name / "generation_config.json").write_text(json.dumps(generation_config))
    extract(root / "base", root / "rl", 4, root / "adapter")
    return root / "base", root / "rl", root / "adapter"


@pytest.fixture(scope="module", params=["two backbones", "stacked"])
def generation_server(generation_pair, tmp_path_factory, request):
    from tests.conftest import start_server, stop_server

    base, rl, adapter = generation_pair
    child = rl if request.param == "two backbones" else adapter
    proc, url = start_server((base, child), tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop_server(proc)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def generate(url: str, route: str, model: str, fields: dict) -> list:
    """The sampled tokens with their logprobs (the final distribution's), seed fixed."""
    common = {"model": model, "seed": 3, "ignore_eos": True}
    if route == "completions":
        fields = {k: v for k, v in fields.items() if k != "max_tokens"}  # vLLM's request default (16) stands
        response = post(url, "/v1/completions", {**common, "prompt": "hello", "logprobs": 0, **fields})
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        return list(zip(logprobs["tokens"], logprobs["token_logprobs"]))
    if route == "responses":
        fields = {("max_output_tokens" if k == "max_tokens" else k): v for k, v in fields.items()}
        response = post(url, "/v1/responses", {**common, "input": HI, "include": ["message.output_text.logprobs"],
                                               **fields})
        assert response.status_code == 200, response.text
        return [(t["token"], t["logprob"]) for item in response.json()["output"] if item["type"] == "message"
                for content in item["content"] for t in content["logprobs"]]
    body = {**common, "messages": HI, "logprobs": True, **fields}
    if route == "chat":
        response = post(url, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        return [(t["token"], t["logprob"]) for t in response.json()["choices"][0]["logprobs"]["content"]]
    tokens = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    tokens += [(t["token"], t["logprob"]) for t in (choice.get("logprobs") or {}).get("content") or []]
    return tokens


@pytest.mark.parametrize("route", ["chat", "chat stream", "completions", "responses"])
@pytest.mark.parametrize("model", list(OWN))
def test_each_name_gets_its_own_models_defaults_on_every_route(generation_server, route, model):
    """A request that leaves every sampling field to the model samples exactly what one that sets
    its own model's values does, and not what one with the other model's does."""
    url = generation_server
    defaults = generate(url, route, model, {})
    assert defaults == generate(url, route, model, OWN[model])
    assert defaults != generate(url, route, model, OTHER[model])
    if route != "completions":
        assert len(defaults) == OWN[model]["max_tokens"]


@pytest.mark.parametrize("model", list(OWN))
def test_each_default_is_applied_and_an_explicit_value_wins(generation_server, model):
    """Each of the model's defaults, set back to vLLM's neutral value alone, changes what is sampled
    (so the tests above see each one); a value the request sets wins over the default."""
    url = generation_server
    defaults = generate(url, "chat", model, {})
    for field, value in OWN[model].items():
        if value != NEUTRAL.get(field):
            changed = NEUTRAL.get(field, OTHER[model][field])
            assert generate(url, "chat", model, {**OWN[model], field: changed}) != defaults, field
    for explicit in ({"temperature": 1.0}, {"top_k": 0, "max_tokens": 2}, {"repetition_penalty": 1.0}):
        assert generate(url, "chat", model, explicit) == generate(url, "chat", model, {**OWN[model], **explicit})


def test_messages_and_chat_batch_routes(generation_server):
    """/v1/messages carries temperature, top_p and top_k but no penalties: `:base` there is refused
    with a 400 naming `model` (vLLM would apply the RL model's repetition penalty), `<name>` and `:rl`
    are served (vLLM's own defaults: the RL model's). The chat batch route serves `<name>` with the
    RL model's defaults."""
    url = generation_server
    for model in ("toy", "toy:rl"):
        assert post(url, "/v1/messages", {"model": model, "messages": HI, "max_tokens": 4}).status_code == 200
    refused = post(url, "/v1/messages", {"model": "toy:base", "messages": HI, "max_tokens": 4})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
    assert "frequency_penalty=-1.0" in refused.json()["error"]["message"]

    batch = post(url, "/v1/chat/completions/batch", {"model": "toy", "messages": [HI], "seed": 3, "ignore_eos": True,
                                                      "logprobs": True})
    assert batch.status_code == 200, batch.text
    served = [(t["token"], t["logprob"]) for t in batch.json()["choices"][0]["logprobs"]["content"]]
    assert served == generate(url, "chat", "toy", OWN["toy"])


def model_config(adapter, base, **flags):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**engine_kwargs(str(adapter), str(base)), **flags).create_model_config()


def test_adapter_without_a_generation_config_and_the_vllm_flag(generation_pair, tmp_path):
    """Without generation_config.json in the adapter directory (PEFT writes none) the RL model's
    defaults are the base's; `--generation-config vllm` turns them off for every name, and
    `--generation-config DIR` applies DIR's to every name."""
    from rlvrx.server.api.generation import base_defaults

    base, _, adapter = generation_pair
    rl_defaults = {**{k: v for k, v in RL_CONFIG.items() if k != "max_new_tokens"}, "max_tokens": 6}
    config = model_config(adapter, base)
    assert config.get_diff_sampling_param() == rl_defaults
    assert base_defaults(config) == {k: v for k, v in OWN["toy:base"].items() if v != OWN["toy"][k]}

    bare = tmp_path / "adapter"
    shutil.copytree(adapter, bare, ignore=shutil.ignore_patterns("generation_config.json"))
    config = model_config(bare, base)
    assert config.get_diff_sampling_param() == {**{k: v for k, v in BASE_CONFIG.items() if k != "max_new_tokens"},
                                                "max_tokens": 8}
    assert base_defaults(config) == {}

    for flags, expected in (({"generation_config": "vllm"}, {}), ({"generation_config": str(adapter)}, rl_defaults)):
        config = model_config(adapter, base, **flags)
        assert config.get_diff_sampling_param() == expected and base_defaults(config) == {}


def test_base_defaults_fill_only_what_a_request_leaves_to_the_model():
    from rlvrx.server.api.generation import fill_unset
    from rlvrx.server.engine.settings import SettingsError

    defaults = {"temperature": 1.0, "top_k": 0, "max_tokens": 512}
    body = {"temperature": None, "top_k": 3}
    fill_unset(body, "/v1/chat/completions", defaults)
    assert body == {"temperature": 1.0, "top_k": 3, "max_tokens": 512}
    body = {"max_completion_tokens": 4}
    fill_unset(body, "/v1/chat/completions", defaults)
    assert body == {"max_completion_tokens": 4, "temperature": 1.0, "top_k": 0}
    body = {}
    fill_unset(body, "/v1/completions", defaults)  # vLLM's completion request defaults max_tokens to 16
    assert body == {"temperature": 1.0, "top_k": 0}
    body = {}
    fill_unset(body, "/v1/responses", defaults)
    assert body == {"temperature": 1.0, "top_k": 0, "max_output_tokens": 512}
    body = {"max_tokens": 4}
    fill_unset(body, "/v1/messages", defaults)  # max_tokens is required there
    assert body == {"max_tokens": 4, "temperature": 1.0, "top_k": 0}
    with pytest.raises(SettingsError, match="no field for the base model's default repetition_penalty=1.1"):
        fill_unset({}, "/v1/messages", {"repetition_penalty": 1.1})


# A second adapter's own generation config (the same weights as the first: only the config differs).
SECOND_CONFIG = {"temperature": 0.6, "top_p": 0.95, "top_k": 4, "repetition_penalty": 1.2, "max_new_tokens": 5}


def test_each_served_adapter_and_base_adapter_gets_its_own_defaults(toy_pairs, generation_pair, tmp_path):
    """With --lora-modules each name gets its adapter's generation config (else the base's), and
    `<name>:base` with a `base_adapter` serves that adapter, so it gets that adapter's config."""
    from tests.conftest import start_server, stop_server

    from rlvrx.server.toy_pair import build_lora_child

    base = generation_pair[0]
    # LoRA on the projections only (base_adapter can take it), of the same base weights
    adapter, _ = build_lora_child(toy_pairs["qwen2"][0], tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(adapter, second)
    for directory, config in ((adapter, RL_CONFIG), (second, SECOND_CONFIG)):
        (directory / "generation_config.json").write_text(json.dumps(config))
    proc, url = start_server(None, tmp_path / "server.log",
                             extra_args=("--base", str(base), "--lora-modules", f"first={adapter}", f"second={second}"))
    try:
        own = {"first": sampling(RL_CONFIG), "second": sampling(SECOND_CONFIG), "base": sampling(BASE_CONFIG)}
        cases = [("first", {}, "first"), ("second", {}, "second"), ("second:rl", {}, "second"),
                 ("first:base", {}, "base"), ("first:base", {"base_adapter": "second"}, "second"),
                 ("second:base", {"base_adapter": "first"}, "first")]
        for model, fields, config in cases:
            defaults = generate(url, "chat", model, fields)
            assert len(defaults) == own[config]["max_tokens"], (model, fields)
            assert defaults == generate(url, "chat", model, {**fields, **own[config]}), (model, fields)
            for other in set(own) - {config}:
                assert defaults != generate(url, "chat", model, {**fields, **own[other]}), (model, fields, other)
    finally:
        stop_server(proc)
