"""One decode step of a 7B-shaped model in plain torch, the stacked LoRA step against two
backbones, and the combine's share of a step.

    python benchmarks/decode_step_bench.py --out DIR            # on CUDA: Qwen2.5-7B shape
    python benchmarks/decode_step_bench.py --small --out DIR    # CPU smoke run

The model is Qwen2.5-7B's shape (hidden 3,584, 28 layers, 28 query heads over 4 KV heads of
128, MLP 18,944, vocabulary 152,064, q/k/v biases, untied head) with random bf16 weights, and
every row attends over a KV cache of 2,048 tokens. `decode_step` is the whole step as one
function, gpt-fast style: embedding, per layer RMSNorm → qkv → RoPE → write k/v at the
position → attention over the cache as two batched matmuls per KV head group (each KV entry
read once) → o → RMSNorm → gate/up → SiLU → down, then the final norm and the head.

For each batch B (1 / 16 / 64 / 256) it times, as CUDA-graph replays (what vLLM runs) and as
eager calls:

* single — one model, B rows;
* two_backbones — two models of B rows each, one after the other (the two-backbone engine:
  every weight read twice; both use the one set of weights, which reads the same bytes);
* stacked — 2B rows through one set of weights, a rank-32 LoRA delta (x·Aᵀ)·Bᵀ on the first
  B rows for all 7 projections (q/k/v packed, gate/up packed, as server/engine/stacked.py);
* stacked_no_lora — the same 2B rows without the delta (what the delta costs);
* combine — the fused kernel (the PyTorch path on CPU) on [B, 152,064] fp32 rows at the paper
  setting, Δ written, L2 flushed (the rows of benchmarks/combine_bench.py: a random-weight
  model's logits are nearly flat, which no trained model's are): over the single step, and its
  share of an extrapolated step (each pair's step plus the combine).

Beside each it prints issue 10's roofline (benchmarks/RESULTS.md): bytes read per step at the
least, one model W + B·L·kv, two backbones 2W + 2·B·L·kv, stacked W + A + 2·B·L·kv (W the
weights a step reads: all but the embedding table, of which it gathers B rows; A the adapter;
kv the KV bytes per token of one model; L the context), the time those bytes take at the
bandwidth of a large device-to-device copy measured in the same run, and the ratio
stacked / two backbones that it predicts, beside the measured one.

Memory on the GPU: one set of weights (15.2 GB, of which a step reads 14.1), the adapter
(0.25 GB as the stacked engine holds it, packed with block-diagonal B; 0.16 GB unpacked) and one
KV cache of 2·max(B) rows (60.1 GB at B = 256), allocated once; about 78 GB at the peak.
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.combine_bench import random_rows  # noqa: E402
from benchmarks.kernel_check import case_settings  # noqa: E402
from benchmarks.timing import Budget, cuda_graph, machine, median_seconds, write_json  # noqa: E402
from rlvrx.kernels import combine  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int  # KV cache tokens per row, the new one included
    rope_theta: float = 1e6
    eps: float = 1e-6


QWEN25_7B = Shape(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
                  context=2048)
SMALL = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=200, context=32)
LORA_RANK = 32


@dataclass
class Layer:
    ln1: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(heads + 2·kv_heads)·head_dim, hidden]
    bqkv: torch.Tensor  # [(heads + 2·kv_heads)·head_dim]
    wo: torch.Tensor  # [hidden, heads·head_dim]
    ln2: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2·intermediate, hidden]
    w_down: torch.Tensor  # [hidden, intermediate]


@dataclass
class Weights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[Layer]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]

    def bytes_read(self) -> int:
        """Bytes a step reads of the weights: all of them but the embedding table."""
        tensors = [self.norm, self.lm_head] + [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LoraLayer:
    """One layer's adapter as (A [R, in], B [out, R]) per packed projection, the scaling folded into B."""

    qkv: tuple[torch.Tensor, torch.Tensor]
    o: tuple[torch.Tensor, torch.Tensor]
    gate_up: tuple[torch.Tensor, torch.Tensor]
    down: tuple[torch.Tensor, torch.Tensor]


NO_LORA = LoraLayer(None, None, None, None)

def random_weights(shape: Shape, device: str, dtype: torch.dtype) -> Weights:
    def randn(*size):
        return torch.randn(size, device=device, dtype=dtype) * 0.02

    def ones(size):
        return torch.ones(size, device=device, dtype=dtype)

    qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    layers = [Layer(ln1=ones(shape.hidden), wqkv=randn(qkv_out, shape.hidden), bqkv=randn(qkv_out),
                    wo=randn(shape.hidden, shape.heads * shape.head_dim), ln2=ones(shape.hidden),
                    w_gate_up=randn(2 * shape.intermediate, shape.hidden), w_down=randn(shape.hidden, shape.intermediate))
              for _ in range(shape.layers)]
    return Weights(embed=randn(shape.vocab, shape.hidden), layers=layers, norm=ones(shape.hidden),
                   lm_head=randn(shape.vocab, shape.hidden))


def random_lora(shape: Shape, rank: int, device: str, dtype: torch.dtype) -> list[LoraLayer]:
    """Rank `rank` on q, k, v, o, gate, up and down: packed layers stack their A along the rank
    and give each projection its own B columns (block-diagonal), as server/engine/adapter.py does."""
    def pair(ins: int, outs: list[int]):
        a = torch.randn(rank * len(outs), ins, device=device, dtype=dtype) * 0.02
        b = torch.block_diag(*(torch.randn(out, rank, device=device, dtype=dtype) * 0.02 for out in outs))
        return a, b

    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return [LoraLayer(qkv=pair(shape.hidden, [q, kv, kv]), o=pair(q, [shape.hidden]),
                      gate_up=pair(shape.hidden, [shape.intermediate] * 2), down=pair(shape.intermediate, [shape.hidden]))
            for _ in range(shape.layers)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_angles(shape: Shape, position: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [head_dim / 2] of the rotary embedding at one position."""
    half = shape.head_dim // 2
    angle = position * shape.rope_theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    return angle.cos(), angle.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [rows, heads, head_dim]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None,
           lora_rows: int) -> torch.Tensor:
    """x·Wᵀ, plus (x·Aᵀ)·Bᵀ on the first `lora_rows` rows."""
    out = x @ weight.T
    if lora is not None:
        a, b = lora
        out[:lora_rows] += (x[:lora_rows] @ a.T) @ b.T
    return out


def decode_step(w: Weights, shape: Shape, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor,
                lora: list[LoraLayer] | None = None, lora_rows: int = 0) -> torch.Tensor:
    """One decode step of R rows at the last position of the cache.

    tokens [R] int64; k_cache, v_cache [layers, R, kv_heads, context, head_dim] (the new key
    and value are written at position context − 1); `lora` adds the adapter's delta to the
    first `lora_rows` rows. Returns the logits [R, vocab]."""
    rows, position = tokens.shape[0], shape.context - 1
    group = shape.heads // shape.kv_heads
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    cos, sin = rope_angles(shape, position, tokens.device)
    x = w.embed[tokens]  # [R, hidden]
    for i, layer in enumerate(w.layers):
        adapter = lora[i] if lora is not None else NO_LORA
        h = rms_norm(x, layer.ln1, shape.eps)
        q, k, v = (linear(h, layer.wqkv, adapter.qkv, lora_rows) + layer.bqkv).split([q_size, kv_size, kv_size], -1)
        q = rope(q.view(rows, shape.heads, shape.head_dim), cos, sin)
        k_cache[i, :, :, position] = rope(k.view(rows, shape.kv_heads, shape.head_dim), cos, sin)
        v_cache[i, :, :, position] = v.view(rows, shape.kv_heads, shape.head_dim)
        # The query heads of one KV head as the rows of one matmul: [R, kv_heads, group, head_dim].
        q = q.view(rows, shape.kv_heads, group, shape.head_dim)
        scores = (q @ k_cache[i].transpose(-1, -2)).float() / math.sqrt(shape.head_dim)  # [R, kv, group, ctx]
        attn = (scores.softmax(-1).to(q.dtype) @ v_cache[i]).reshape(rows, q_size)
        x = x + linear(attn, layer.wo, adapter.o, lora_rows)
        h = rms_norm(x, layer.ln2, shape.eps)
        gate, up = linear(h, layer.w_gate_up, adapter.gate_up, lora_rows).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, layer.w_down, adapter.down, lora_rows)
    return rms_norm(x, w.norm, shape.eps) @ w.lm_head.T


def timings(step, device: str, repeats: int) -> dict:
    """Median ms of `step` as graph replays (on CUDA) and as eager calls; `ms` is the first of
    them that ran. A capture that fails is recorded, not raised: the check has one call."""
    result = {"graph_ms": None}
    with torch.inference_mode():
        if device == "cuda":
            try:
                result["graph_ms"] = median_seconds(cuda_graph(step), device, repeats) * 1e3
            except RuntimeError as error:
                result["graph_error"] = str(error)[:500]
        result["eager_ms"] = median_seconds(step, device, repeats) * 1e3
    result["ms"] = result["graph_ms"] if result["graph_ms"] is not None else result["eager_ms"]
    return result


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return nbytes / median_seconds(lambda: dst.copy_(src), device, repeats)


def roofline(shape: Shape, weight_bytes: int, adapter_bytes: int, kv_item_bytes: int, batch: int,
             bandwidth: float) -> dict:
    """Issue 10's bytes read per step at the least, and the times they take at `bandwidth`."""
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_item_bytes  # K and V
    kv = batch * shape.context * kv_per_token
    read = {"single": weight_bytes + kv, "two_backbones": 2 * weight_bytes + 2 * kv,
            "stacked": weight_bytes + adapter_bytes + 2 * kv}
    return {"kv_bytes_per_token": kv_per_token, "GB": {k: v / 1e9 for k, v in read.items()},
            "floor_ms": {k: v / bandwidth * 1e3 for k, v in read.items()},
            "stacked_over_two_backbones": read["stacked"] / read["two_backbones"],
            "stacked_over_single": read["stacked"] / read["single"]}


def run(shape: Shape, batches: tuple[int, ...], device: str, repeats: int, budget: Budget, path: Path) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    weights = random_weights(shape, device, dtype)
    lora = random_lora(shape, LORA_RANK, device, dtype)
    adapter_bytes = sum(t.numel() * t.element_size() for layer in lora for pair in vars(layer).values() for t in pair)
    rows = 2 * max(batches)
    cache_shape = (shape.layers, rows, shape.kv_heads, shape.context, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    bandwidth = copy_bandwidth(device, 2**31 if device == "cuda" else 2**24, repeats)
    results = {**machine(device), "shape": vars(shape), "lora_rank": LORA_RANK, "weight_GB": weights.bytes_read() / 1e9,
               "adapter_GB": adapter_bytes / 1e9, "kv_cache_GB": 2 * k_cache.numel() * k_cache.element_size() / 1e9,
               "copy_GBps": bandwidth / 1e9, "stopped_early": False, "records": []}
    write_json(path, results)
    tokens = torch.randint(0, shape.vocab, (rows,), device=device)

    def step(first: int, count: int, **kw):
        return lambda: decode_step(weights, shape, k_cache[:, first:first + count], v_cache[:, first:first + count],
                                   tokens[first:first + count], **kw)

    for batch in batches:
        if budget.spent():
            results["stopped_early"] = True
            break
        single, second = step(0, batch), step(batch, batch)
        rl, base = random_rows(batch, shape.vocab, device, torch.float32, seed=batch)
        settings, _ = case_settings(batch, 50, device, mixed=False)
        record = {"batch": batch,
                  "single": timings(single, device, repeats),
                  "two_backbones": timings(lambda: (single(), second()), device, repeats),
                  "stacked": timings(step(0, 2 * batch, lora=lora, lora_rows=batch), device, repeats),
                  "stacked_no_lora": timings(step(0, 2 * batch), device, repeats),
                  "combine_ms": median_seconds(lambda: combine(rl, base, settings, want_delta=True), device, repeats,
                                               flush_l2=True) * 1e3,
                  "roofline": roofline(shape, weights.bytes_read(), adapter_bytes, k_cache.element_size(), batch,
                                       bandwidth)}
        record["measured_stacked_over_two_backbones"] = record["stacked"]["ms"] / record["two_backbones"]["ms"]
        record["measured_stacked_over_single"] = record["stacked"]["ms"] / record["single"]["ms"]
        record["combine_over_single_step"] = record["combine_ms"] / record["single"]["ms"]
        record["combine_share"] = {name: record["combine_ms"] / (record[name]["ms"] + record["combine_ms"])
                                   for name in ("two_backbones", "stacked")}  # of an extrapolated step
        results["records"].append(record)
        print("decode", record, flush=True)
        write_json(path, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for decode_step.json")
    parser.add_argument("--small", action="store_true", help="a tiny model on the CPU (smoke run)")
    parser.add_argument("--until", type=float, help="deadline, seconds since the epoch: stop cleanly after it")
    args = parser.parse_args()
    if args.small:
        run(SMALL, (1, 2), "cpu", 1, Budget(args.until), Path(args.out) / "decode_step.json")
    else:
        run(QWEN25_7B, (1, 16, 64, 256), "cuda", 10, Budget(args.until), Path(args.out) / "decode_step.json")


if __name__ == "__main__":
    main()
