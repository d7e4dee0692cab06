"""Many adapters over one base: tokens/s with 1, 4 and 16 adapters served by one stacked engine.

    python benchmarks/multi_adapter_bench.py --base models/smollm2/base \
        --adapter models/smollm2/lora/adapter --adapters 1,4,16 --concurrency 16 --requests 64 \
        --out benchmarks/out/multi_adapter.json

Makes N distinct rank-R adapters from one (`--adapter`, e.g. the rank-32 LoRA of SmolLM2 that
benchmarks/real_weights.py --lora 32 writes): adapter i is its A and B with every B multiplied by a
seeded factor 1 + 0.1·noise, so no two are equal. For each N it starts

* `rlvrx-N` — `rlvrx serve --base B --lora-modules a0=… a{N-1}=…`, the extrapolated preset at the
  paper's settings, request i to adapter i mod N (rows of different adapters share each step);
* `vllm-lora-N` — vLLM `--enable-lora --max-loras N` with the same adapters, serving the RL models
  alone (one stream), request i to adapter i mod N,

and drives it with serving_bench's client and prompts (plain text, T = 1, top-p 0.7, `max_tokens`
with `ignore_eos`). Prints tokens/s, latencies and the ratio to the same system with one adapter, and
the memory an added adapter takes (its tensors at the serving dtype, ranks as stored), and writes JSON.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving_bench import PAPER, drive_http, prompts, start, stop  # noqa: E402

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def make_adapters(source: Path, count: int, out: Path) -> dict[str, Path]:
    """`count` distinct copies of the adapter in `source` (adapter 0 is the source itself)."""
    tensors = load_file(source / "adapter_model.safetensors")
    made = {}
    for i in range(count):
        target = out / f"a{i}"
        if not (target / "adapter_model.safetensors").is_file():
            shutil.copytree(source, target, dirs_exist_ok=True)
            g = torch.Generator().manual_seed(i)
            factor = lambda t: 1 + 0.1 * torch.randn(t.shape, generator=g) if i else 1.0  # noqa: E731
            save_file({k: (v * factor(v)).contiguous() if "lora_B" in k else v for k, v in tensors.items()},
                      target / "adapter_model.safetensors")
        made[f"a{i}"] = target
    return made


def adapter_bytes(adapter: Path, dtype: str) -> int:
    return sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values()) * DTYPE_BYTES[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/smollm2/base")
    parser.add_argument("--adapter", default="models/smollm2/lora/adapter")
    parser.add_argument("--adapters", default="1,4,16", help="comma-separated numbers of adapters")
    parser.add_argument("--systems", default="rlvrx,vllm-lora")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/out/multi_adapter.json")
    args = parser.parse_args()
    counts = [int(n) for n in args.adapters.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(Path(args.adapter), max(counts), out.parent / "adapters")
    config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    texts = prompts(args.requests, "text")
    url = f"http://127.0.0.1:{args.port}"
    common = ["--port", str(args.port), "--host", "127.0.0.1", "--dtype", args.dtype, "--seed", "0",
              "--max-num-seqs", str(max(args.concurrency, 16))]
    rows = []
    for system in args.systems.split(","):
        for n in counts:
            names = list(adapters)[:n]
            modules = [f"{name}={adapters[name]}" for name in names]
            if system == "rlvrx":
                command = [sys.executable, "-m", "rlvrx.server.cli", "serve", "--base", args.base,
                           "--lora-modules", *modules, *common]
                fields = PAPER
            else:
                command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.base,
                           "--enable-lora", "--max-loras", str(n), "--max-lora-rank", str(rank),
                           "--lora-modules", *modules, "--logprobs-mode", "processed_logprobs", *common]
                fields = {}
            proc = start(command, args.port, out.parent / f"{system}-{n}.log")
            try:
                drive_http(url, names, fields, texts[:4], 4, args.max_tokens)  # warm-up, not recorded
                row = drive_http(url, names, fields, texts, args.concurrency, args.max_tokens)
            finally:
                stop(proc)
            rows.append({"system": f"{system}-{n}", "adapters": n, "concurrency": args.concurrency, **row})
            print(json.dumps(rows[-1]), flush=True)
    one = {r["system"].rsplit("-", 1)[0]: r["output_tok_s"] for r in rows if r["adapters"] == 1}
    for r in rows:
        base_system = r["system"].rsplit("-", 1)[0]
        r["vs_one_adapter"] = r["output_tok_s"] / one[base_system] if base_system in one else None
    per_adapter = adapter_bytes(adapters["a0"], args.dtype)
    print(f"\n{'system':<16}{'adapters':>9}{'tok/s':>9}{'vs 1':>7}{'TTFT p50':>10}{'ITL p50':>9}{'E2E p50':>9}")
    for r in rows:
        ratio = f"{r['vs_one_adapter']:.2f}" if r["vs_one_adapter"] is not None else "-"
        print(f"{r['system']:<16}{r['adapters']:>9}{r['output_tok_s']:>9.1f}{ratio:>7}{r['ttft_p50_ms']:>10.0f}"
              f"{r['itl_p50_ms']:>9.1f}{r['e2e_p50_ms']:>9.0f}")
    print(f"memory per added adapter (rank {rank}, {args.dtype}): {per_adapter / 2**20:.1f} MiB")
    out.write_text(json.dumps({"rows": rows, "adapter_bytes": per_adapter, "rank": rank,
                               "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
