"""The model defaults of sampling parameters, per served name.

vLLM fills the sampling fields a request leaves unset (temperature, top_p, top_k, min_p, the
penalties, max_tokens) from the RL model's generation_config.json (`--generation-config auto`,
its default): the engine's model on the two-backbone path, the adapter's file on the stacked path
(server.engine.adapter_generation_config). That is what `<name>` and `<name>:rl` should get:
what vLLM serving the RL model would do. `<name>:base` gets the base model's instead, and the names
of a stacked engine's other adapters (`--lora-modules`) their own:
`fill_unset` writes those that differ into its requests before vLLM reads them, with vLLM's
neutral value for a field only the RL model has a default for. `--generation-config` and
`--override-generation-config` apply to both models alike.
"""

import copy
import functools
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.config import ModelConfig

from rlvrx.server.engine.settings import SettingsError

# A route's request field for a default, where it is not the default's own name.
RENAMED = {"/v1/responses": {"max_tokens": "max_output_tokens"}}


def base_defaults(model_config: ModelConfig) -> dict[str, Any]:
    """The sampling defaults of `:base` requests that differ from those vLLM applies (the RL
    model's): the base model's generation config."""
    return defaults_of(model_config, getattr(model_config.hf_config, "rlvrx_base_path", model_config.model))


def adapter_defaults(model_config: ModelConfig, adapter_dir: str) -> dict[str, Any]:
    """Those of a stacked engine's adapter other than the first (whose file vLLM reads): its own
    generation_config.json, else the base's, as for the first (server.engine.adapter_generation_config)."""
    own = Path(adapter_dir) / "generation_config.json"
    return defaults_of(model_config, adapter_dir if own.is_file() else model_config.model)


def defaults_of(model_config: ModelConfig, directory: str) -> dict[str, Any]:
    """The sampling defaults that differ from those vLLM applies: vLLM's own reading
    (`ModelConfig.get_diff_sampling_param`) of the generation config in `directory` under the
    engine's flags, over vLLM's neutral values."""
    other = copy.copy(model_config)
    if other.generation_config == "auto":  # that model's own file, where vLLM reads the default RL model's
        other.generation_config = directory
    own, applied = other.get_diff_sampling_param(), model_config.get_diff_sampling_param()
    # max_tokens = the whole window is what vLLM does without a default (it caps it at what is left).
    neutral = SamplingParams(max_tokens=model_config.max_model_len)
    values = {k: own.get(k, getattr(neutral, k)) for k in sorted(own.keys() | applied.keys())}
    return {k: v for k, v in values.items() if v != applied.get(k, getattr(neutral, k))}


@functools.cache
def field_defaults(path: str) -> dict[str, Any]:
    """The values vLLM's request model on `path` gives the fields a request omits."""
    if path == "/v1/chat/completions":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as request_cls
    elif path == "/v1/completions":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as request_cls
    elif path == "/v1/responses":
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as request_cls
    else:
        from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest as request_cls
    return {name: field.default for name, field in request_cls.model_fields.items()}


def fill_unset(payload: dict[str, Any], path: str, defaults: dict[str, Any]) -> None:
    """Set each field of `defaults` that the request body leaves to the model's default (absent
    or null, where vLLM's request model has no default of its own: a completion's max_tokens is
    16). SettingsError (on `model`) when the route has no field for one (Anthropic's messages
    take no penalties or min_p): vLLM would apply the RL model's value."""
    omitted = field_defaults(path)
    for name, value in defaults.items():
        field = RENAMED.get(path, {}).get(name, name)
        if field not in omitted:
            raise SettingsError("model", f"{path} has no field for the base model's default {name}={value!r}, "
                                         "which differs from the RL model's: send this request to "
                                         "/v1/chat/completions, or serve with --generation-config vllm")
        if payload.get(field, omitted[field]) is None and value is not None:
            if name == "max_tokens" and payload.get("max_completion_tokens") is not None:
                continue
            payload[field] = value
