"""A PEFT LoRA adapter of the base model, read and checked for the stacked model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. The RL
model it describes is W + s·B·A on each targeted projection (A: [r, in], B: [out, r]), with
s = α/r, or α/√r under rsLoRA, and r, α overridden per module by `rank_pattern` and
`alpha_pattern` (matched as PEFT matches them). The tensors in the file are the truth for
what is targeted; everything that is not plain LoRA on the seven projections of a decoder
layer (q/k/v/o, gate/up/down) is refused with `AdapterError`, one line.

Beside the adapter, `rlvrx lora-extract` may write `rlvrx_rl_tensors.safetensors`: the RL model's
own copies of the tensors that cannot be LoRA deltas (embeddings, lm_head, norms, q/k/v biases),
under their checkpoint names, which the stacked model gives to the RL stream. PEFT's own ways of
carrying full tensors (`modules_to_save`, trainable tokens) stay refused.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlvrx.server.engine.pair import PairError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RL_TENSORS_FILE = "rlvrx_rl_tensors.safetensors"
# Base architectures the stacked model implements, by decoder family.
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Config fields whose truthy value makes the adapter more than W + s·B·A on those projections.
REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
WEIGHT_NAME = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")
# The tensors the stacked model can hold per stream (checkpoint names).
STREAM_TENSOR = re.compile(
    r"(model\.embed_tokens|lm_head|model\.norm)\.weight"
    r"|model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.q_norm|self_attn\.k_norm)\.weight"
    r"|model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.bias")


class AdapterError(PairError):
    """The adapter cannot be served on this base; the message says why in one line."""


def weight_name(key: str, half: str) -> str:
    """PEFT's name of lora_A or lora_B ("A", "B") of the projection `key` (model.layers.i.….q_proj)."""
    return f"base_model.model.{key}.lora_{half}.weight"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def has_tokenizer(path: str | Path) -> bool:
    """Whether the adapter directory ships a tokenizer (then it is served, as an RL checkpoint's is)."""
    return (Path(path) / "tokenizer_config.json").is_file()


@dataclass(frozen=True)
class BaseShapes:
    """The base model's sizes that fix each projection's [out, in]."""

    layers: int
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BaseShapes":
        heads = config["num_attention_heads"]
        return cls(layers=config["num_hidden_layers"], vocab=config["vocab_size"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads)

    def shape(self, module: str) -> tuple[int, int]:
        """[out, in] of one projection's weight."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
                "o_proj": (self.hidden, q), "gate_proj": (self.intermediate, self.hidden),
                "up_proj": (self.intermediate, self.hidden), "down_proj": (self.hidden, self.intermediate)}[module]

    def stream_shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor that STREAM_TENSOR matches."""
        module, kind = name.split(".")[-2:]
        if kind == "bias":
            return (self.shape(module)[0],)
        if module in ("embed_tokens", "lm_head"):
            return (self.vocab, self.hidden)
        return (self.head_dim,) if module in ("q_norm", "k_norm") else (self.hidden,)


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [r, in], float32
    b: torch.Tensor  # [out, r], float32, already multiplied by the scaling s


@dataclass(frozen=True)
class Adapter:
    shapes: BaseShapes
    modules: dict[tuple[int, str], LoraWeights]  # (layer index, projection name) → weights
    rl_tensors: dict[str, torch.Tensor]  # checkpoint name → the RL stream's own copy (RL_TENSORS_FILE)

    def packed(self, layer: int, names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The LoRA of a packed layer (q/k/v → qkv_proj, gate/up → gate_up_proj) as one low-rank
        product: A [R, in] stacks the targeted projections' A along the rank, and each
        projection gets a B [out, R] that is its own B on its own rank columns, zero elsewhere
        (all zero for an untargeted one). None when no projection of the layer is targeted."""
        parts = [self.modules.get((layer, name)) for name in names]
        ranks = [0 if p is None else p.a.shape[0] for p in parts]
        if not any(ranks):
            return None
        a = torch.cat([p.a for p in parts if p is not None])
        bs, start = [], 0
        for name, part, rank in zip(names, parts, ranks):
            b = torch.zeros(self.shapes.shape(name)[0], a.shape[0])
            if part is not None:
                b[:, start:start + rank] = part.b
            bs.append(b)
            start += rank
        return a, bs


def pattern_value(patterns: dict[str, Any], module_key: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key that matches the end of the module's name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_key):
            return value
    return default


def check_architecture(architecture: str) -> str:
    """The decoder family of a base architecture, or AdapterError."""
    if architecture not in FAMILIES:
        raise AdapterError(
            f"a LoRA adapter is served only on a {', '.join(sorted(FAMILIES))} base, not {architecture}; "
            "merge it into a full checkpoint (peft's merge_and_unload) and pass that as --rl instead")
    return FAMILIES[architecture]


def read_config(path: Path) -> dict[str, Any]:
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"the adapter in {str(path)!r} is {config['peft_type']}, not LoRA")
    for field, what in REFUSED_FIELDS.items():
        if config.get(field):
            raise AdapterError(f"the adapter in {str(path)!r} uses {what}, which the stacked model does not serve")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"the adapter in {str(path)!r} trains biases (bias={config['bias']!r}); only bias='none' is served")
    targets = config.get("target_modules") or []
    named = [targets] if isinstance(targets, str) else targets
    for target in named:
        if any(word in target for word in ("embed_tokens", "lm_head")):
            raise AdapterError(f"the adapter in {str(path)!r} targets {target!r}: LoRA on embeddings or lm_head is not served")
    return config


def read_adapter(path: str | Path, base_config: dict[str, Any]) -> Adapter:
    """Read and check the adapter at `path` against the base model's config.json contents."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"the adapter in {str(path)!r} has no {WEIGHTS_FILE} (only the safetensors format is read)")
    shapes = BaseShapes.from_config(base_config)
    tensors = load_file(str(path / WEIGHTS_FILE))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[int, str], str] = {}
    for name, tensor in tensors.items():
        match = WEIGHT_NAME.fullmatch(name)
        if match is None:
            raise AdapterError(f"the adapter in {str(path)!r} holds {name!r}: {unexpected(name)}")
        key, layer, parent, module, half = match.groups()
        if module not in (ATTENTION if parent == "self_attn" else MLP) or int(layer) >= shapes.layers:
            raise AdapterError(f"the adapter in {str(path)!r} holds {name!r}, which is not a projection of this base model")
        halves.setdefault((int(layer), module), {})[half] = tensor.float()
        keys[int(layer), module] = key
    if not halves:
        raise AdapterError(f"the adapter in {str(path)!r} holds no LoRA weights")
    modules = {}
    for (layer, module), pair in sorted(halves.items()):
        key = keys[layer, module]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"the adapter in {str(path)!r} has lora_A or lora_B of {key} but not both")
        rank = pattern_value(config.get("rank_pattern") or {}, key, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
        out_size, in_size = shapes.shape(module)
        a, b = pair["A"], pair["B"]
        if a.shape != (rank, in_size) or b.shape != (out_size, rank):
            raise AdapterError(
                f"the adapter's {key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this base model "
                f"and rank {rank} need ({rank}, {in_size}) and ({out_size}, {rank})")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[layer, module] = LoraWeights(a=a, b=b * scale)
    return Adapter(shapes=shapes, modules=modules, rl_tensors=read_rl_tensors(path, shapes, base_config))


def read_rl_tensors(path: Path, shapes: BaseShapes, base_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The RL model's own tensors in RL_TENSORS_FILE (none without the file), checked against the base."""
    from safetensors.torch import load_file

    if not (path / RL_TENSORS_FILE).is_file():
        return {}
    model_type = base_config.get("model_type")  # the engine's config names the stacked architecture
    absent = {"q_norm": model_type != "qwen3", "k_norm": model_type != "qwen3",
              "bias": model_type != "qwen2" and not base_config.get("attention_bias")}
    tensors = load_file(str(path / RL_TENSORS_FILE))
    for name, tensor in tensors.items():
        match = STREAM_TENSOR.fullmatch(name)
        layer = match and (match[2] or match[4])
        parts = name.split(".")[-2:]
        if match is None or (layer and int(layer) >= shapes.layers) or any(absent.get(p) for p in parts):
            raise AdapterError(f"{RL_TENSORS_FILE} in {str(path)!r} holds {name!r}, which the stacked model "
                               "does not hold per stream on this base")
        if tuple(tensor.shape) != shapes.stream_shape(name):
            raise AdapterError(f"{RL_TENSORS_FILE} in {str(path)!r} holds {name!r} of shape {tuple(tensor.shape)}; "
                               f"this base model's is {shapes.stream_shape(name)}")
    return tensors


def unexpected(name: str) -> str:
    if "lora_magnitude_vector" in name:
        return "DoRA is not served"
    if "embed" in name or "lm_head" in name:
        return "LoRA on embeddings or lm_head is not served"
    if name.endswith(".bias"):
        return "LoRA biases are not served"
    return "only lora_A/lora_B of q/k/v/o and gate/up/down projections are served"
