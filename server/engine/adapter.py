"""A PEFT LoRA adapter of the base model, read and checked for the stacked model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, which PEFT writes with safe_serialization=False). The stacked model serves
what PEFT loads and `merge_and_unload` merges, read from the tensors (what a config names but the
file lacks keeps PEFT's zero B):
- LoRA on the seven projections of a decoder layer (q/k/v/o, gate/up/down): W + s·B·A (A: [r, in],
  B: [out, r]) with s = α/r, or α/√r under rsLoRA, r and α overridden per module by `rank_pattern`
  and `alpha_pattern` (matched as PEFT matches them). `fan_in_fan_out` is ignored, as PEFT ignores it
  on these (nn.Linear) layers.
- The RL model's own embeddings, lm_head, norms and q/k/v biases (server/engine/rl_stream.py): whole
  copies (modules_to_save, `bias` = "all"/"lora_only", the embedding layers PEFT saves beside a LoRA on
  them, `rlvrx lora-extract`'s RL_TENSORS_FILE) and edits (LoRA on embed_tokens or lm_head, trainable
  tokens, `lora_bias` on q/k/v).
Everything else is refused with `AdapterError`, one line saying what to do: initialisations that PEFT
trains on a changed base and that were saved unconverted (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), DoRA
and the other variants, layer replication, full copies of projections, LoRA on other modules, an
adapter that changes the embeddings of a base whose lm_head is tied to them.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlvrx.server.engine.pair import PairError
from rlvrx.server.engine.rl_stream import LowRank, RLTensors, Rows, Shift

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False)
RL_TENSORS_FILE = "rlvrx_rl_tensors.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names
# Base architectures the stacked model implements, by decoder family.
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EMBEDDING, HEAD = "model.embed_tokens", "lm_head"
# Config fields whose truthy value makes the adapter more than the tensors say.
REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# Initialisations that move the base to W − s·B₀·A₀ before training. PEFT redoes that move when it
# loads a PiSSA, OLoRA or CorDA adapter (LoRA-GA cannot, having no gradients then, and loads a model that
# was never trained); saved converted (path_initial_model_for_weight_conversion), each is plain LoRA.
MOVED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga")
# Tensor names under PREFIX: LoRA factors (and LoRA B's bias) of a module, trainable tokens of a module.
LORA_TENSOR = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                         r"|lora_embedding_A|lora_embedding_B)")
TOKENS_TENSOR = re.compile(r"(?P<module>.+)\.token_adapter\.trainable_tokens_delta")
PROJECTION = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
# The tensors the stacked model can hold per stream (checkpoint names).
STREAM_TENSOR = re.compile(
    r"(model\.embed_tokens|lm_head|model\.norm)\.weight"
    r"|model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.q_norm|self_attn\.k_norm)\.weight"
    r"|model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.bias")


class AdapterError(PairError):
    """The adapter cannot be served on this base; the message says why in one line."""


def weight_name(key: str, half: str) -> str:
    """PEFT's name of lora_A or lora_B ("A", "B") of the projection `key` (model.layers.i.….q_proj)."""
    return f"{PREFIX}{key}.lora_{half}.weight"


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
    rl: RLTensors  # the RL stream's own embeddings, lm_head, norms, q/k/v biases

    @property
    def own_embeddings(self) -> bool:
        """Whether the RL model embeds token ids differently from the base."""
        return f"{EMBEDDING}.weight" in self.rl.names

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


def check_prompt_embeds(adapter: Adapter, path: str | Path) -> None:
    """AdapterError when embeddings given by the caller (which stand for both streams) are not the RL model's."""
    if adapter.own_embeddings:
        raise AdapterError(f"--enable-prompt-embeds: the adapter in {str(path)!r} gives the RL model its own "
                           "embeddings, so embeddings given by the caller cannot stand for both models; serve "
                           "without it")


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


def check_unquantized(base_path: str | Path) -> None:
    """AdapterError for a quantized base (a GGUF file, a GPTQ/AWQ/bitsandbytes/... checkpoint): the
    stacked model's layers hold unquantized weights."""
    path = Path(base_path)
    config = path / "config.json"
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        quantization = "GGUF"
    elif any((path / name).is_file() for name in ("quantize_config.json", "quant_config.json")):
        quantization = "GPTQ/AWQ"
    else:
        settings = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
        quantization = settings and (settings.get("quant_method") or "quantization_config")
    if quantization:
        raise AdapterError(
            f"the base model in {str(path)!r} is quantized ({quantization}); a LoRA adapter is served only on an "
            "unquantized base: pass the unquantized base as --base, or merge the adapter into it (peft's "
            "merge_and_unload) and pass that as --rl")


def check_init(path: Path, init: Any) -> None:
    where = f"the adapter in {str(path)!r} was saved with init_lora_weights={init!r}"
    if init == "loftq":
        raise AdapterError(f"{where}: LoftQ trains it on a quantized residual of the base, not on the base; pass the "
                           "residual base that LoftQ saved as --base, with init_lora_weights set to true in "
                           f"{CONFIG_FILE} (as PEFT's LoftQ example saves them)")
    if isinstance(init, str) and init.lower().startswith(MOVED_BASE_INITS):
        raise AdapterError(f"{where}: it was trained on the base changed to W - s*B0*A0; save it converted to plain "
                           "LoRA (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter "
                           "saved before training>)) and serve that")


def read_config(path: Path) -> dict[str, Any]:
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"the adapter in {str(path)!r} is {config['peft_type']}, not LoRA")
    for field, what in REFUSED_FIELDS.items():
        if config.get(field):
            raise AdapterError(f"the adapter in {str(path)!r} uses {what}, which the stacked model does not serve")
    check_init(path, config.get("init_lora_weights", True))
    return config


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors if both formats are there (as PEFT reads them)."""
    from safetensors.torch import load_file

    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    if not (path / PICKLED_WEIGHTS_FILE).is_file():
        raise AdapterError(f"the adapter in {str(path)!r} has no {WEIGHTS_FILE} or {PICKLED_WEIGHTS_FILE}")
    try:
        return torch.load(path / PICKLED_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a start-up error here
        raise AdapterError(f"cannot read {PICKLED_WEIGHTS_FILE} in {str(path)!r} as tensors only: "
                           f"{str(exc).strip().splitlines()[0]}") from None


def read_adapter(path: str | Path, base_config: dict[str, Any]) -> Adapter:
    """Read and check the adapter at `path` against the base model's config.json contents."""
    path = Path(path)
    reader = Reader(path, read_config(path), BaseShapes.from_config(base_config), base_config)
    for name, tensor in load_tensors(path).items():
        reader.add(name, tensor)
    return reader.adapter()


class Reader:
    """Sorts an adapter's tensors into projection LoRA and RL-stream copies and edits, checking each."""

    def __init__(self, path: Path, config: dict[str, Any], shapes: BaseShapes, base_config: dict[str, Any]):
        self.path, self.config, self.shapes, self.base_config = path, config, shapes, base_config
        self.factors: dict[str, dict[str, torch.Tensor]] = {}  # module → {part: tensor}
        self.copies: dict[str, torch.Tensor] = {}
        self.edits: dict[str, LowRank | Rows | Shift] = {}
        self.modules: dict[tuple[int, str], LoraWeights] = {}

    def fail(self, what: str) -> AdapterError:
        return AdapterError(f"the adapter in {str(self.path)!r} {what}")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        key = name.removeprefix(PREFIX)
        if (lora := LORA_TENSOR.fullmatch(key)) is not None:
            self.factors.setdefault(lora["module"], {})[lora["part"]] = tensor.float()
        elif (tokens := TOKENS_TENSOR.fullmatch(key)) is not None:
            self.edit(f"{tokens['module']}.weight", self.trainable_tokens(tokens["module"], tensor.float()))
        else:  # a whole copy: the RL model's own tensor (the base layer's, if it is wrapped)
            self.copies[key.replace(".base_layer.", ".")] = tensor

    def edit(self, name: str, edit: LowRank | Rows | Shift) -> None:
        if name in self.edits:
            raise self.fail(f"changes {name} in two ways (LoRA and trainable tokens), which PEFT does not load")
        self.edits[name] = edit

    def trainable_tokens(self, module: str, delta: torch.Tensor) -> Rows:
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):  # module name (or its end) → indices, as PEFT matches them
            indices = next((v for k, v in spec.items() if module.endswith(k)), None)
        else:
            indices = spec if module == EMBEDDING else None
        if indices is None or len(indices) != delta.shape[0] or delta.ndim != 2:
            raise self.fail(f"holds trainable tokens of {module} of shape {tuple(delta.shape)} that "
                            f"trainable_token_indices in {CONFIG_FILE} does not index")
        if module not in (EMBEDDING, HEAD) or not all(0 <= i < self.shapes.vocab for i in indices):
            raise self.fail(f"holds trainable tokens of {module} that this base model does not have")
        return Rows(torch.tensor(indices, dtype=torch.long), delta)

    def scale(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def lora(self, module: str, parts: dict[str, torch.Tensor]) -> None:
        projection = PROJECTION.fullmatch(module)
        if (projection and projection[3] in (ATTENTION if projection[2] == "self_attn" else MLP)
                and parts.keys() <= {"lora_A.weight", "lora_B.weight", "lora_B.bias"}):
            if int(projection[1]) >= self.shapes.layers:
                raise self.fail(f"holds LoRA of {module}, which is not a projection of this base model")
            self.projection(module, int(projection[1]), projection[3], parts)
        elif module == HEAD and parts.keys() <= {"lora_A.weight", "lora_B.weight"}:
            a, b = self.factors_of(module, parts, "lora_A.weight", "lora_B.weight", (self.shapes.vocab, self.shapes.hidden))
            self.edit(f"{HEAD}.weight", LowRank(b * self.scale(module, a.shape[0]), a))
        elif module == EMBEDDING and parts.keys() <= {"lora_embedding_A", "lora_embedding_B"}:
            # PEFT's embedding LoRA: A [r, vocab], B [hidden, r], delta (B·A)ᵀ·s
            a, b = self.factors_of(module, parts, "lora_embedding_A", "lora_embedding_B",
                                   (self.shapes.hidden, self.shapes.vocab))
            self.edit(f"{EMBEDDING}.weight", LowRank(a.T * self.scale(module, a.shape[0]), b.T))
        else:
            raise self.fail(f"holds {', '.join(sorted(parts))} of {module}: {unexpected_lora(module, parts)}")

    def factors_of(self, module: str, parts: dict[str, torch.Tensor], a_name: str, b_name: str,
                   out_in: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a module whose delta is [out, in] = B·A, checked against the rank PEFT would build."""
        if not {a_name, b_name} <= parts.keys():
            raise self.fail(f"has {a_name.split('.')[0]} or {b_name.split('.')[0]} of {module} but not both")
        rank = pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        (out_size, in_size), a, b = out_in, parts[a_name], parts[b_name]
        if a.shape != (rank, in_size) or b.shape != (out_size, rank):
            raise AdapterError(
                f"the adapter's {module} has {a_name.split('.')[0]} {tuple(a.shape)} and {b_name.split('.')[0]} "
                f"{tuple(b.shape)}; this base model and rank {rank} need ({rank}, {in_size}) and ({out_size}, {rank})")
        return a, b

    def projection(self, module: str, layer: int, name: str, parts: dict[str, torch.Tensor]) -> None:
        a, b = self.factors_of(module, parts, "lora_A.weight", "lora_B.weight", self.shapes.shape(name))
        scale = self.scale(module, a.shape[0])
        self.modules[layer, name] = LoraWeights(a=a, b=b * scale)
        if "lora_B.bias" in parts:  # lora_bias: merged into the layer's bias (PEFT merges nothing else)
            if not STREAM_TENSOR.fullmatch(f"{module}.bias") or self.absent(f"{module}.bias"):
                raise self.fail(f"has a LoRA bias (lora_bias) on {module}, which has no bias in this base model "
                                "(PEFT cannot merge it either)")
            self.edit(f"{module}.bias", Shift(parts["lora_B.bias"] * scale))

    def absent(self, name: str) -> bool:
        """Whether a STREAM_TENSOR name is not a tensor of this base model."""
        match = STREAM_TENSOR.fullmatch(name)
        layer = match[2] or match[4]
        model_type = self.base_config.get("model_type")  # the engine's config names the stacked architecture
        missing = {"q_norm": model_type != "qwen3", "k_norm": model_type != "qwen3",
                   "bias": model_type != "qwen2" and not self.base_config.get("attention_bias")}
        return bool(layer and int(layer) >= self.shapes.layers) or any(missing.get(p) for p in name.split(".")[-2:])

    def check_stream_tensor(self, name: str, tensor: torch.Tensor | None, source: str) -> None:
        if not STREAM_TENSOR.fullmatch(name) or self.absent(name):
            raise AdapterError(f"{source} holds {name!r}, which the stacked model does not hold per stream on this base"
                               f"{unexpected_copy(name)}")
        if tensor is not None and tuple(tensor.shape) != self.shapes.stream_shape(name):
            raise AdapterError(f"{source} holds {name!r} of shape {tuple(tensor.shape)}; "
                               f"this base model's is {self.shapes.stream_shape(name)}")

    def adapter(self) -> Adapter:
        for module, parts in sorted(self.factors.items()):
            self.lora(module, parts)
        changed = sorted({f"{EMBEDDING}.weight", f"{HEAD}.weight"} & (self.copies.keys() | self.edits.keys()))
        if changed and self.base_config.get("tie_word_embeddings", False):
            raise self.fail(f"changes {changed[0]} of a base whose lm_head is tied to its embeddings, where PEFT's "
                            "model and its merge differ; merge it (peft's merge_and_unload) and pass that as --rl")
        source = f"the adapter in {str(self.path)!r}"
        for name, tensor in self.copies.items():
            self.check_stream_tensor(name, tensor, source)
        for name in self.edits:
            self.check_stream_tensor(name, None, source)
        if not self.modules and not self.copies and not self.edits:
            raise self.fail("holds no LoRA weights")
        copies = {**self.copies, **self.rl_tensors_file()}
        return Adapter(shapes=self.shapes, modules=self.modules, rl=RLTensors(copies=copies, edits=self.edits))

    def rl_tensors_file(self) -> dict[str, torch.Tensor]:
        """The RL model's own tensors in RL_TENSORS_FILE (none without the file), checked against the base."""
        from safetensors.torch import load_file

        if not (self.path / RL_TENSORS_FILE).is_file():
            return {}
        tensors = load_file(str(self.path / RL_TENSORS_FILE))
        for name, tensor in tensors.items():
            self.check_stream_tensor(name, tensor, f"{RL_TENSORS_FILE} in {str(self.path)!r}")
            if name in self.copies or name in self.edits:
                raise AdapterError(f"{RL_TENSORS_FILE} in {str(self.path)!r} holds {name!r}, which the adapter's "
                                   "own tensors change too")
        return tensors


def unexpected_lora(module: str, parts: dict[str, torch.Tensor]) -> str:
    if module in (EMBEDDING, HEAD) or PROJECTION.fullmatch(module):
        return "not the factors PEFT writes for it"
    return "LoRA is served on q/k/v/o and gate/up/down projections, embed_tokens and lm_head only"


def unexpected_copy(name: str) -> str:
    if "lora_magnitude_vector" in name:
        return " (DoRA is not served)"
    if PROJECTION.fullmatch(name.rsplit(".", 1)[0]):
        return (" (a whole projection, as modules_to_save copies it: the streams share the projections; "
                "merge the adapter with peft's merge_and_unload and pass that as --rl)")
    return ""
