"""The model defaults of sampling parameters, per served name.

vLLM fills the sampling fields a request leaves unset (temperature, top_p, top_k, min_p, the
penalties, max_tokens) from the served model's generation_config.json (`--generation-config
auto`, its default) — here the RL model's, since it is the engine's model. That is what
`<name>` and `<name>:rl` should get: what vLLM serving the RL model would do. `<name>:base`
gets the base model's instead: `fill_unset` writes them into its requests before vLLM reads
them, with vLLM's neutral value for a field only the RL model has a default for.
`--generation-config` and `--override-generation-config` apply to both models alike.
"""

import copy
import functools
from typing import Any

from vllm import SamplingParams
from vllm.config import ModelConfig


def base_defaults(model_config: ModelConfig) -> dict[str, Any]:
    """The sampling defaults of `:base` requests: vLLM's own reading
    (`ModelConfig.get_diff_sampling_param`) of the base model's generation config, under the
    engine's flags, over vLLM's neutral values for the fields the engine's model has defaults for."""
    base = copy.copy(model_config)
    base.model = getattr(model_config.hf_config, "rlvrx_base_path", model_config.model)
    base.hf_config_path = None
    own = base.get_diff_sampling_param()
    # max_tokens = the whole window is what vLLM does without a default (it caps it at what is left).
    neutral = SamplingParams(max_tokens=model_config.max_model_len)
    return {k: own[k] if k in own else getattr(neutral, k)
            for k in own.keys() | model_config.get_diff_sampling_param().keys()}


@functools.cache
def field_defaults(path: str) -> dict[str, Any]:
    """The values vLLM's request model on `path` gives the fields a request omits."""
    if path == "/v1/chat/completions":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as request_cls
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as request_cls
    return {name: field.default for name, field in request_cls.model_fields.items()}


def fill_unset(payload: dict[str, Any], path: str, defaults: dict[str, Any]) -> None:
    """Set each field of `defaults` that the request body leaves to the model's default (absent
    or null, where vLLM's request model has no default of its own: a completion's max_tokens is 16)."""
    omitted = field_defaults(path)
    for name, value in defaults.items():
        if payload.get(name, omitted.get(name)) is None and value is not None:
            if name == "max_tokens" and payload.get("max_completion_tokens") is not None:
                continue
            payload[name] = value
