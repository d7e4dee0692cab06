"""The model pair: start-up checks and the vLLM engine arguments that load it.

Both the command line and the tests build engines through `engine_kwargs`, so the
wrapper architecture, the logits processor and the logprobs mode are set in one place.
"""

import json
from pathlib import Path
from typing import Any

ARCHITECTURE = "RLVRExtrapolationForCausalLM"
PROCESSOR = "server.engine.processor:ExtrapolationLogitsProcessor"
# Config fields that must agree for the two checkpoints to share one engine.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")


class PairError(ValueError):
    """The two checkpoints cannot be served together; the message says why in one line."""


def read_config(path: str, role: str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PairError(f"the {role} model path {path!r} has no config.json (is it a Hugging Face checkpoint directory?)")
    return json.loads(config_file.read_text())


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
    for field in SHAPE_FIELDS:
        if rl.get(field) != base.get(field):
            raise PairError(f"configs differ in {field}: RL has {rl.get(field)!r}, base has {base.get(field)!r}")
    rl_vocab, base_vocab = tokenizer_vocab(rl_path, "RL"), tokenizer_vocab(base_path, "base")
    if rl_vocab != base_vocab:
        differing = sorted(set(rl_vocab.items()) ^ set(base_vocab.items()))[:3]
        raise PairError(f"tokenizers differ ({len(rl_vocab)} vs {len(base_vocab)} tokens; e.g. {differing})")
    return rl_arch[0]


def check_supported(architecture: str) -> None:
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        raise PairError(f"architecture {architecture} is not supported by this vLLM build")


def engine_kwargs(rl_path: str, base_path: str) -> dict[str, Any]:
    """vLLM engine arguments (as `LLM(**kw)` / `AsyncEngineArgs(**kw)`) for the pair."""
    inner = check_pair(rl_path, base_path)
    check_supported(inner)
    return {
        "model": rl_path,
        "hf_overrides": {
            "architectures": [ARCHITECTURE],
            "rlvrx_inner_architecture": inner,
            "rlvrx_base_path": str(Path(base_path).resolve()),
        },
        "logits_processors": [PROCESSOR],
        "logprobs_mode": "processed_logprobs",
    }
