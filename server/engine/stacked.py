"""The stacked architecture: one backbone serves a base model and its LoRA child.

Both streams go through the same weights. For the T tokens of a step, every decoder layer
runs its linear layers once on 2T rows [h_rl; h_base], adds the LoRA delta s·(x·Aᵀ)·Bᵀ to
the rows that carry one (server.engine.adapter_rows: each row its own adapter and scale, the base
rows none or an adapter of their own), and runs ONE vLLM `Attention` with 2H query heads and 2·Hkv KV heads laid
side by side ([rl heads | base heads], which keeps GQA's grouping: head i reads KV head
i // (H/Hkv)) under the scheduler's ordinary block table, so the KV cache holds twice a single
model's bytes per token. Norms, RoPE and the MLP act per row or per head.

Module names are the checkpoint's (Llama, Mistral, Qwen2, Qwen3), so vLLM's weight loading,
q/k/v → qkv_proj and gate/up → gate_up_proj included, reads the base checkpoint at the model
path; the adapters come from `rlvrx_adapters` in the config (set through `hf_overrides`), the first
being the default.
`forward` returns [T, 2·hidden] (RL | base) and `compute_logits` publishes the base logits in
`server.engine.step.STEP`, as the two-backbone model (server.engine.model) does.

Tensors that cannot be LoRA deltas (only when one adapter is served) (embeddings, lm_head, norms, q/k/v biases) are per stream
when the adapter changes them (server/engine/rl_stream.py: PEFT's modules_to_save, LoRA on
embed_tokens or lm_head, trainable tokens, `rlvrx lora-extract`'s copies): the copy of module `X`
is `X_rl`, applied to the RL rows only, and the q/k/v biases are added per stream. A copy that edits
the base's tensor is made as vLLM loads that tensor.

Tensor parallelism shards the adapter as vLLM's LoRA layers do: column-parallel layers (qkv,
gate_up) keep A whole and take their own output rows of B; row-parallel layers (o, down) take
their own input columns of A, and the delta joins the layer's output before the all-reduce.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta

from rlvrx.server.engine.adapter import Adapter, check_architecture, check_prompt_embeds, read_adapter
from rlvrx.server.engine.adapter_rows import ROWS, lora_delta
from rlvrx.server.engine.step import STEP


def adapter_paths(config) -> dict[str, str]:
    """{name: directory} of the engine's adapters, the first the default (server.engine.pair)."""
    return getattr(config, "rlvrx_adapters", None) or {"": config.rlvrx_adapter_path}


def read_adapters(config) -> list[Adapter]:
    base_config = config.to_dict()
    return [read_adapter(path, base_config) for path in adapter_paths(config).values()]


def read_config_adapters(vllm_config: VllmConfig) -> tuple[str, list[Adapter]]:
    """The base's decoder family and the adapters named in the engine's config (the first's own
    embeddings, norms, biases or head are the RL stream's: it is then the only one)."""
    config = vllm_config.model_config.hf_config
    family = check_architecture(config.rlvrx_inner_architecture)
    adapters = read_adapters(config)
    if vllm_config.model_config.enable_prompt_embeds:
        check_prompt_embeds(adapters[0], config.rlvrx_adapter_path)
    ROWS.slots = {name: slot for slot, name in enumerate(adapter_paths(config))}
    return family, adapters


def side_by_side(x: torch.Tensor) -> torch.Tensor:
    """[2T, n] rows [rl; base] → [T, 2n] columns [rl | base]."""
    return torch.cat(x.chunk(2), dim=-1)


def stacked_rows(x: torch.Tensor) -> torch.Tensor:
    """[T, 2n] columns [rl | base] → [2T, n] rows [rl; base]."""
    return torch.cat(x.chunk(2, dim=-1))


def per_stream(shared: nn.Module, rl: nn.Module | None, *rows: torch.Tensor):
    """`shared` on all rows, or `rl` on the RL stream's rows (the first half) and `shared` on the rest."""
    if rl is None:
        return shared(*rows)
    t = rows[0].shape[0] // 2
    outs = rl(*(x[:t] for x in rows)), shared(*(x[t:] for x in rows))
    if isinstance(outs[0], tuple):  # a norm with a fused residual: (out, residual)
        return tuple(torch.cat(pair) for pair in zip(*outs))
    return torch.cat(outs)


def rl_norm(adapter: Adapter, name: str, size: int, eps: float) -> RMSNorm | None:
    """The RL stream's own copy of the norm whose weight is `name`, if the adapter carries it."""
    return RMSNorm(size, eps=eps) if f"{name}.weight" in adapter.rl.names else None


def output_shards(linear: QKVParallelLinear | MergedColumnParallelLinear) -> list[slice]:
    """This rank's rows of each packed projection's full output, in the layer's local order."""
    rank = linear.tp_rank
    if isinstance(linear, QKVParallelLinear):
        q, kv = linear.num_heads * linear.head_size, linear.num_kv_heads * linear.head_size
        kv_rank = rank // linear.num_kv_head_replicas  # KV heads are replicated when Hkv < TP
        return [slice(rank * q, (rank + 1) * q)] + [slice(kv_rank * kv, (kv_rank + 1) * kv)] * 2
    return [slice(rank * (s // linear.tp_size), (rank + 1) * (s // linear.tp_size)) for s in linear.output_sizes]


@dataclass(frozen=True)
class Capacity:
    """What the LoRA layers hold: `slots` adapters (those of the start-up, or `--max-loras`), each up to
    rank `rank` per projection at least (0: as the start-up adapters need), and with runtime loading a
    LoRA on every projection (an adapter loaded later may target any)."""

    slots: int
    rank: int = 0
    every_projection: bool = False

    @property
    def grouped(self) -> bool:
        """Rows may use different adapters: the layers call the grouped product (adapter_rows.lora_delta);
        with one adapter they add it to every RL row inside the compiled graph, at each row's scale."""
        return self.slots > 1

    @classmethod
    def of(cls, config, adapters: list[Adapter]) -> "Capacity":
        runtime = getattr(config, "rlvrx_runtime_loading", False)
        return cls(max(len(adapters), getattr(config, "rlvrx_max_loras", 0)),
                   getattr(config, "rlvrx_max_lora_rank", 0) if runtime else 0, runtime)


class LoraDelta(nn.Module):
    """This rank's shard of every adapter's LoRA of one (packed) linear layer: A [slots, R, in] and
    B [slots, out, R], ranks padded with zeros to the largest (an adapter that leaves the layer alone,
    or an empty slot, is all zero); each row adds its own adapter's delta (server.engine.adapter_rows)."""

    def __init__(self, adapters: list[Adapter], capacity: Capacity, layer: int, names: tuple[str, ...],
                 linear: nn.Module):
        super().__init__()
        self.layer, self.names = layer, names
        if isinstance(linear, RowParallelLinear):
            width, height = linear.input_size_per_partition, linear.output_size
            self.in_shard, self.out_shards = slice(linear.tp_rank * width, (linear.tp_rank + 1) * width), [slice(None)]
        else:
            width, height = linear.input_size, linear.output_size_per_partition
            self.in_shard, self.out_shards = slice(None), output_shards(linear)
        # a packed layer's A stacks its projections' ranks
        rank = max([capacity.rank * len(names), *(a.shape[0] for a, _ in filter(None, map(self.shard, adapters)))])
        self.a = nn.Parameter(torch.zeros(capacity.slots, rank, width), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(capacity.slots, height, rank), requires_grad=False)
        self.grouped = capacity.grouped
        if not self.grouped:  # each token's scale of its RL row's delta, written before each step
            self.register_buffer("scales", ROWS.token_scales, persistent=False)

    def shard(self, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's A [r, in] and B [out, r] of the adapter (s folded into B), or None."""
        packed = adapter.packed(self.layer, self.names)
        if packed is None:
            return None
        a, bs = packed
        return a[:, self.in_shard], torch.cat([b[s] for b, s in zip(bs, self.out_shards)])

    @torch.no_grad()
    def load(self, slot: int, adapter: Adapter | None) -> None:
        """Put the adapter in the slot (None: empty it)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if adapter is not None and (shard := self.shard(adapter)) is not None:
            a, b = shard
            if a.shape[0] > self.a.shape[1]:
                raise ValueError(f"rank {a.shape[0]} is above the {self.a.shape[1]} these layers hold")
            self.a[slot, :a.shape[0]] = a
            self.b[slot, :, :a.shape[0]] = b

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out plus each row's delta (the RL rows' adapter; the base rows' when they have one)."""
        if self.grouped:
            return out + lora_delta(x, self.a, self.b)
        t = x.shape[0] // 2  # the RL stream's rows
        out[:t] += F.linear(F.linear(x[:t], self.a[0]) * self.scales[:t, None], self.b[0])
        return out


def layer_lora(adapters: list[Adapter], capacity: Capacity, layer: int, names: tuple[str, ...],
               linear: nn.Module) -> LoraDelta | None:
    """The layer's LoRA, or None when no adapter targets it (and none can be loaded later)."""
    if not capacity.every_projection and all(adapter.packed(layer, names) is None for adapter in adapters):
        return None
    return LoraDelta(adapters, capacity, layer, names, linear)


def reduced(linear: RowParallelLinear, lora: LoraDelta | None, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel layer (built with reduce_results=False, skip_bias_add=True) with the
    RL rows' delta added before the all-reduce."""
    out, bias = linear(x)
    if lora is not None:
        out = lora.add_to(out, x)
    if linear.tp_size > 1:
        out = tensor_model_parallel_all_reduce(out)
    return out if bias is None else out + bias


class StackedAttention(nn.Module):
    def __init__(self, vllm_config: VllmConfig, family: str, adapters: list[Adapter], capacity: Capacity, layer: int,
                 prefix: str):
        super().__init__()
        config, adapter = vllm_config.model_config.hf_config, adapters[0]
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = adapter.shapes.head_dim
        qkv_bias = family == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = family == "llama" and getattr(config, "attention_bias", False)
        self.rl_biases = {name: f"model.layers.{layer}.self_attn.{name}.bias" for name in ("q_proj", "k_proj", "v_proj")}
        rl_bias = any(name in adapter.rl.names for name in self.rl_biases.values())
        # With an RL copy of a q/k/v bias the layer leaves the bias to us: each stream adds its own.
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=qkv_bias,
                                          skip_bias_add=rl_bias, prefix=f"{prefix}.qkv_proj")
        self.qkv_bias_rl = nn.Parameter(torch.empty_like(self.qkv_proj.bias), requires_grad=False) if rl_bias else None
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=o_bias, reduce_results=False,
                                        skip_bias_add=True, prefix=f"{prefix}.o_proj")
        self.qkv_lora = layer_lora(adapters, capacity, layer, ("q_proj", "k_proj", "v_proj"), self.qkv_proj)
        self.o_lora = layer_lora(adapters, capacity, layer, ("o_proj",), self.o_proj)
        self.head_dim = head_dim
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.qk_norm = family == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.q_norm_rl = rl_norm(adapter, f"model.layers.{layer}.self_attn.q_norm", head_dim, config.rms_norm_eps)
            self.k_norm_rl = rl_norm(adapter, f"model.layers.{layer}.self_attn.k_norm", head_dim, config.rms_norm_eps)
        self.rotary_emb = get_rope(head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = Attention(2 * self.qkv_proj.num_heads, head_dim, head_dim**-0.5,
                              num_kv_heads=2 * self.qkv_proj.num_kv_heads, cache_config=vllm_config.cache_config,
                              prefix=f"{prefix}.attn")

    def per_head_norm(self, norm: RMSNorm, rl: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2n] columns [rl | base] of heads."""
        if rl is not None:
            x_rl, x_base = x.chunk(2, dim=-1)
            return torch.cat([self.per_head_norm(rl, None, x_rl), self.per_head_norm(norm, None, x_base)], dim=-1)
        return norm(x.reshape(*x.shape[:-1], -1, self.head_dim)).reshape(x.shape)

    @torch.no_grad()
    def load_rl_biases(self, rl_tensors: dict[str, torch.Tensor]) -> None:
        """This rank's [q | k | v] bias of the RL stream: the RL copies where there are some, else the base's."""
        self.qkv_bias_rl.copy_(self.qkv_proj.bias)
        parts = self.qkv_bias_rl.split([self.q_size, self.kv_size, self.kv_size])
        for part, name, shard in zip(parts, self.rl_biases.values(), output_shards(self.qkv_proj)):
            if name in rl_tensors:
                part.copy_(rl_tensors[name][shard])

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, bias = self.qkv_proj(hidden)
        if self.qkv_lora is not None:
            qkv = self.qkv_lora.add_to(qkv, hidden)
        if self.qkv_bias_rl is not None:
            t = qkv.shape[0] // 2
            qkv = torch.cat([qkv[:t] + self.qkv_bias_rl, qkv[t:] + bias])
        q, k, v = (side_by_side(x) for x in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        if self.qk_norm:
            q = self.per_head_norm(self.q_norm, self.q_norm_rl, q)
            k = self.per_head_norm(self.k_norm, self.k_norm_rl, k)
        q, k = self.rotary_emb(positions, q, k)
        return reduced(self.o_proj, self.o_lora, stacked_rows(self.attn(q, k, v)))


class StackedMLP(nn.Module):
    def __init__(self, config, adapters: list[Adapter], capacity: Capacity, layer: int, prefix: str):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias,
                                           reduce_results=False, skip_bias_add=True, prefix=f"{prefix}.down_proj")
        self.gate_up_lora = layer_lora(adapters, capacity, layer, ("gate_proj", "up_proj"), self.gate_up_proj)
        self.down_lora = layer_lora(adapters, capacity, layer, ("down_proj",), self.down_proj)
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act}: the stacked model has silu only")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        if self.gate_up_lora is not None:
            gate_up = self.gate_up_lora.add_to(gate_up, x)
        return reduced(self.down_proj, self.down_lora, self.act_fn(gate_up))


class StackedDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, family: str, adapters: list[Adapter], capacity: Capacity, layer: int,
                 prefix: str):
        super().__init__()
        config, adapter = vllm_config.model_config.hf_config, adapters[0]
        self.self_attn = StackedAttention(vllm_config, family, adapters, capacity, layer, prefix=f"{prefix}.self_attn")
        self.mlp = StackedMLP(config, adapters, capacity, layer, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_rl, self.post_attention_layernorm_rl = (
            rl_norm(adapter, f"model.layers.{layer}.{name}", config.hidden_size, config.rms_norm_eps)
            for name in ("input_layernorm", "post_attention_layernorm"))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, per_stream(self.input_layernorm, self.input_layernorm_rl, hidden)
        else:
            hidden, residual = per_stream(self.input_layernorm, self.input_layernorm_rl, hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = per_stream(self.post_attention_layernorm, self.post_attention_layernorm_rl, hidden, residual)
        return self.mlp(hidden), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class StackedModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        family, adapters = read_config_adapters(vllm_config)
        adapter, capacity = adapters[0], Capacity.of(config, adapters)
        ROWS.token_scales = torch.ones(vllm_config.scheduler_config.max_num_batched_tokens)
        if family != "llama":
            set_default_rope_theta(config, default_theta=1000000)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.embed_tokens_rl = (VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       prefix=f"{prefix}.embed_tokens_rl")
                                if adapter.own_embeddings else None)
        self.lm_head_is_rl = "lm_head.weight" in adapter.rl.names
        self.layers = nn.ModuleList(
            StackedDecoderLayer(vllm_config, family, adapters, capacity, i, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_rl = rl_norm(adapter, "model.norm", config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is not None:  # embeddings given by the caller stand for both streams
            rl_embedded = embedded = inputs_embeds
        else:
            embedded = self.embed_tokens(input_ids)
            rl_embedded = embedded if self.embed_tokens_rl is None else self.embed_tokens_rl(input_ids)
        hidden, residual = torch.cat([rl_embedded, embedded]), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = per_stream(self.norm, self.norm_rl, hidden, residual)
        return side_by_side(hidden)


class StackedLoraForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = StackedModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        # The RL stream's head: its own; else, under a tied config.json, its own embedding (vLLM
        # unties the engine's config when the base checkpoint stores an lm_head: the RL model's tie
        # still holds); else the base's, as PEFT's merge keeps it.
        tied = config.tie_word_embeddings or vllm_config.model_config.word_embeddings_untied_by_checkpoint
        if self.model.lm_head_is_rl:
            self.lm_head_rl = ParallelLMHead(config.vocab_size, config.hidden_size,
                                             prefix=maybe_prefix(prefix, "lm_head_rl"))
        elif tied and self.model.embed_tokens_rl is not None:
            self.lm_head_rl = self.model.embed_tokens_rl
        else:
            self.lm_head_rl = None  # the base's head serves both streams
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.lm_head_rl is None:  # one lm_head pass over both streams' rows
            logits = self.logits_processor(self.lm_head, stacked_rows(hidden_states))
            rl_logits, base_logits = (None, None) if logits is None else logits.chunk(2)
        else:
            rl_hidden, base_hidden = hidden_states.chunk(2, dim=-1)
            rl_logits = self.logits_processor(self.lm_head_rl, rl_hidden)
            base_logits = self.logits_processor(self.lm_head, base_hidden)
        if rl_logits is None:  # not the rank that samples
            return None
        STEP.publish(rl_logits, base_logits)
        return rl_logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        adapters = read_adapters(self.config)
        adapter = adapters[0]
        edited, base_tensors = adapter.rl.from_base, {}  # the base's tensors the adapter edits for the RL stream

        def keeping(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name in edited:
                    base_tensors[name] = tensor
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(keeping(weights), mapper=LlamaForCausalLM.hf_to_vllm_mapper)
        rl_tensors = adapter.rl.materialize(base_tensors)
        for name, module in self.named_modules():
            if isinstance(module, LoraDelta):
                for slot, one in enumerate(adapters):
                    module.load(slot, one)
                loaded |= {f"{name}.a", f"{name}.b"}
            elif isinstance(module, StackedAttention) and module.qkv_bias_rl is not None:
                module.load_rl_biases(rl_tensors)
                loaded.add(f"{name}.qkv_bias_rl")
        params = dict(self.named_parameters())
        for name, tensor in rl_tensors.items():
            module, kind = name.rsplit(".", 1)
            if kind == "weight":  # the copy of module X is X_rl (q/k/v biases went above)
                param = params[f"{module}_rl.{kind}"]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(f"{module}_rl.{kind}")
        return loaded
