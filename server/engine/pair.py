"""The model pair: start-up checks and the vLLM engine arguments that load it.

Both the command line and the tests build engines through `engine_kwargs`, so the
wrapper architecture, the logits processor and the logprobs mode are set in one place.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlvrx.server.engine import settings

ARCHITECTURE = "RLVRExtrapolationForCausalLM"
STACKED_ARCHITECTURE = "RLVRStackedLoraForCausalLM"  # base + LoRA adapter on one backbone
PROCESSOR = "rlvrx.server.engine.processor:ExtrapolationLogitsProcessor"
# The only config fields in which the two checkpoints may differ. The base backbone is built
# from the RL model's config (server/engine/model.py), so any other difference (a tied output
# head, RoPE, a norm's epsilon, a sliding window, quantization, ...) would run the base as a
# model it is not. The forward passes of the decoders such pairs use (Llama, Qwen, Mistral,
# Gemma, …) read none of these.
IGNORED_CONFIG_FIELDS = frozenset({
    "_name_or_path", "transformers_version",  # where and by what the checkpoint was written
    "dtype", "torch_dtype",  # storage dtype: both backbones run at the engine's --dtype
    "bos_token_id", "eos_token_id", "pad_token_id",  # generation: stopping follows the RL tokenizer
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",  # transformers' switches
    "initializer_range",  # initialisation only: the weights are loaded
})


class PairError(ValueError):
    """The two checkpoints cannot be served together; the message says why in one line."""


def read_config(path: str, role: str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PairError(f"the {role} model path {path!r} has no config.json (is it a Hugging Face checkpoint directory?)")
    return json.loads(config_file.read_text())


def loaded_config(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The config as transformers reads it — absent fields at their defaults, older spellings
    (`rope_theta`, `rope_scaling`) in today's form — so that two writings of one model compare
    equal; the raw config.json for a model type transformers does not know."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except (ValueError, KeyError, OSError):
        return raw


def tokenizer_vocab(path: str, role: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a start-up error here
        raise PairError(f"cannot load the {role} model's tokenizer from {path!r}: {exc}") from None
    return tokenizer.get_vocab()


def check_pair(rl_path: str, base_path: str) -> str:
    """Raise PairError unless the pair can share one engine; return the inner architecture."""
    rl, base = read_config(rl_path, "RL"), read_config(base_path, "base")
    rl_arch, base_arch = rl.get("architectures") or [], base.get("architectures") or []
    if not rl_arch:
        raise PairError(f"the RL model's config.json in {rl_path!r} names no architecture")
    if rl_arch != base_arch:
        raise PairError(f"architectures differ: RL is {rl_arch}, base is {base_arch}")
    rl_config, base_config = loaded_config(rl_path, rl), loaded_config(base_path, base)
    fields = sorted(f for f in (rl_config.keys() | base_config.keys()) - IGNORED_CONFIG_FIELDS
                    if rl_config.get(f) != base_config.get(f))
    if fields:
        shown = ", ".join(f"{f} (RL {rl_config.get(f)!r}, base {base_config.get(f)!r})" for f in fields[:4])
        more = f" and {len(fields) - 4} more" if len(fields) > 4 else ""
        raise PairError(f"configs differ in {shown}{more}: the base would run with the RL model's config")
    rl_vocab, base_vocab = tokenizer_vocab(rl_path, "RL"), tokenizer_vocab(base_path, "base")
    if rl_vocab != base_vocab:
        differing = sorted(set(rl_vocab.items()) ^ set(base_vocab.items()))[:3]
        raise PairError(f"tokenizers differ ({len(rl_vocab)} vs {len(base_vocab)} tokens; e.g. {differing})")
    return rl_arch[0]


def check_supported(architecture: str) -> None:
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        raise PairError(f"architecture {architecture} is not supported by this vLLM build")


def check_adapter_pair(adapter_path: str, base_path: str) -> str:
    """Raise PairError unless the LoRA adapter can be served on the base; return the base's architecture."""
    from rlvrx.server.engine.adapter import check_architecture, check_unquantized, has_tokenizer, read_adapter

    check_unquantized(base_path)
    base = read_config(base_path, "base")
    architecture = (base.get("architectures") or ["(none named)"])[0]
    check_architecture(architecture)
    read_adapter(adapter_path, base)
    if has_tokenizer(adapter_path) and tokenizer_vocab(adapter_path, "RL") != tokenizer_vocab(base_path, "base"):
        raise PairError(f"the adapter's tokenizer in {adapter_path!r} differs from the base model's")
    return architecture


def check_serving_flags(rl_path: str | None, base_path: str, adapters: Mapping[str, str] | None = None, *,
                        prompt_embeds: bool, quantization: str | None) -> None:
    """Raise PairError for vLLM flags under which the engine would serve the pair as models it is not:
    embeddings given by the caller where the two models embed differently (with prompt embeddings on,
    vLLM embeds every prompt with the base's embedding layer), and quantizing the stacked model, whose
    layers stay unquantized. `adapters`: the stacked engine's, when not just `rl_path`."""
    from rlvrx.server.engine.adapter import check_prompt_embeds, is_adapter_dir, read_adapter

    adapters = adapters or ({"": rl_path} if is_adapter_dir(rl_path) else None)
    if not adapters:
        if prompt_embeds:
            raise PairError("--enable-prompt-embeds: the two models embed token ids differently, so embeddings "
                            "given by the caller cannot stand for both; serve without it")
        return
    if quantization:
        raise PairError(f"--quantization {quantization}: the stacked LoRA model is served unquantized; serve "
                        "without it, or merge the adapter (peft's merge_and_unload) and pass that as --rl")
    if prompt_embeds:
        for path in adapters.values():
            check_prompt_embeds(read_adapter(path, read_config(base_path, "base")), path)


def check_adapters(adapters: Mapping[str, str], base_path: str) -> tuple[str, bool, int]:
    """Raise PairError unless every adapter can be served on the base, and several adapters together;
    return the base's architecture, whether every adapter is LoRA on the projections only, and the
    largest rank of any projection."""
    from rlvrx.server.engine.adapter import is_adapter_dir, read_adapter

    for name, path in adapters.items():
        if not is_adapter_dir(path):
            raise PairError(f"adapter {name!r}: {str(path)!r} is not a LoRA adapter directory (no "
                            "adapter_config.json there); serve a full RL checkpoint with --rl")
    architectures = {check_adapter_pair(path, base_path) for path in adapters.values()}
    base = read_config(base_path, "base")
    read = {name: read_adapter(path, base) for name, path in adapters.items()}
    own_tensors = [name for name, adapter in read.items() if adapter.rl.names]
    if len(adapters) > 1 and own_tensors:
        raise PairError(f"adapter {own_tensors[0]!r} also changes embeddings, norms, biases or the output head, "
                        "which several adapters cannot share one engine with: serve it alone, or merge it "
                        "(peft's merge_and_unload) and serve the merged model as --rl")
    rank = max((w.a.shape[0] for adapter in read.values() for w in adapter.modules.values()), default=0)
    return architectures.pop(), not own_tensors, rank


def engine_kwargs(rl_path: str | None, base_path: str, adapters: Mapping[str, str] | None = None, *,
                  runtime_loading: bool = False, max_loras: int = 0, max_lora_rank: int = 0) -> dict[str, Any]:
    """vLLM engine arguments (as `LLM(**kw)` / `AsyncEngineArgs(**kw)`) for the pair: the stacked
    model when `rl_path` is a LoRA adapter directory of the base, or `adapters` ({name: adapter
    directory}, the first the default) are given; else the two-backbone model. Also tells admission
    (settings.set_served_adapters, in this process) which adapters requests may name. With
    `runtime_loading` the stacked model holds `max_loras` adapters (at least those given) of rank
    `max_lora_rank` (default: the largest given, at least 16) on every projection."""
    from rlvrx.server.engine.adapter import has_tokenizer, is_adapter_dir

    processing = {"logits_processors": [PROCESSOR], "logprobs_mode": "processed_logprobs"}
    if adapters is None and is_adapter_dir(rl_path):
        adapters = {Path(rl_path).resolve().name: rl_path}
    if adapters:
        adapters = {name: str(Path(path).resolve()) for name, path in adapters.items()}
        architecture, scalable, rank = check_adapters(adapters, base_path)
        slots = max(max_loras if runtime_loading else 0, len(adapters))
        settings.set_served_adapters(settings.ServedAdapters(tuple(adapters), scalable, base_streams=slots > 1))
        capacity = {"rlvrx_runtime_loading": True, "rlvrx_max_loras": slots,
                    "rlvrx_max_lora_rank": max(max_lora_rank or 16, rank)} if runtime_loading else {}
        first = next(iter(adapters.values()))
        return {
            "model": base_path,
            "tokenizer": first if has_tokenizer(first) else base_path,
            "hf_overrides": {
                "architectures": [STACKED_ARCHITECTURE],
                "rlvrx_inner_architecture": architecture,
                "rlvrx_adapter_path": first,
                "rlvrx_adapters": adapters,
                **capacity,
            },
            **processing,
        }
    settings.set_served_adapters(settings.ServedAdapters())
    inner = check_pair(rl_path, base_path)
    check_supported(inner)
    return {
        "model": rl_path,
        "hf_overrides": {
            "architectures": [ARCHITECTURE],
            "rlvrx_inner_architecture": inner,
            "rlvrx_base_path": str(Path(base_path).resolve()),
        },
        **processing,
    }
