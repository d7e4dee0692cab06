"""On paper: bytes read from GPU memory per accepted token, with and without speculative decoding.

    python benchmarks/spec_bytes_estimate.py --context 4096 --out benchmarks/out/spec_bytes.json

A low-batch decode step on a GPU is bound by reading memory: every weight once per step, and each
row's KV cache once per step. Speculation verifies k drafts in the same step (k + 1 query positions
per row; the weights and each row's KV are still read once), so it divides the bytes per token by the
mean accepted length a (tokens kept per row per step) as long as the step stays memory-bound, which
the table checks against the chip's compute (2 FLOPs per parameter per position).

Systems, for the paper's Qwen2.5-32B pair (bf16; 64 layers, 8 KV heads of 128): vLLM serving one
model; this server with two backbones (full RL checkpoint: both models' weights, both KV caches);
this server stacked (a LoRA child: one backbone's weights, both KV caches). Every row of a batch has
`--context` tokens of context. Prints the table and writes it as JSON.
"""

import argparse
import json
from pathlib import Path

PARAMS = 32.8e9  # Qwen2.5-32B, embeddings and head included
LAYERS, KV_HEADS, HEAD_DIM = 64, 8, 128
BYTES = 2  # bf16
KV_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * BYTES  # K and V, one model
H200_BYTES_S, H200_FLOPS = 4.8e12, 989e12  # HBM3e bandwidth; dense bf16 tensor-core peak

SYSTEMS = {  # name: (weight copies read per step, streams: KV caches and rows per token)
    "vllm, one model": (1, 1),
    "rlvrx, two backbones": (2, 2),
    "rlvrx, stacked LoRA": (1, 2),
}


def step(system: str, batch: int, context: int, positions: int) -> dict:
    weights, streams = SYSTEMS[system]
    read = weights * PARAMS * BYTES + batch * context * KV_PER_TOKEN * streams
    flops = 2 * PARAMS * batch * positions * streams  # each stream's rows go through a whole model
    return {"bytes": read, "memory_s": read / H200_BYTES_S, "compute_s": flops / H200_FLOPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--drafts", type=int, default=3, help="k: draft tokens per row per step")
    parser.add_argument("--out", default="benchmarks/out/spec_bytes.json")
    args = parser.parse_args()
    rows = []
    print(f"{'system':<22} {'batch':>5} {'accepted length':>15} {'GB read / token':>16} {'vs one model, no spec':>22} "
          f"{'memory-bound':>12}")
    for batch in (1, 8, 32):
        alone = step("vllm, one model", batch, args.context, 1)["bytes"] / batch
        for system in SYSTEMS:
            for length in (1, 2, 3):  # 1: no speculation
                s = step(system, batch, args.context, 1 if length == 1 else args.drafts + 1)
                per_token = s["bytes"] / (batch * length)
                row = {"system": system, "batch": batch, "accepted_length": length, "gb_per_token": per_token / 1e9,
                       "ratio_to_one_model_no_spec": alone / per_token, "memory_bound": s["memory_s"] >= s["compute_s"]}
                rows.append(row)
                print(f"{system:<22} {batch:>5} {'none' if length == 1 else length:>15} {row['gb_per_token']:>16.2f} "
                      f"{row['ratio_to_one_model_no_spec']:>22.2f} {str(row['memory_bound']):>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"context": args.context, "drafts": args.drafts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
