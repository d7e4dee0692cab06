"""Our serving client and `vllm bench serve` against one running server, same requests.

    python benchmarks/client_compare.py --url http://127.0.0.1:8125 --model m --tokenizer demo/pair/rl \
        --concurrency 16 --requests 64 --max-tokens 32 --out benchmarks/out/client_compare.json

Both clients send requests of the same length to `/v1/completions` with `max_tokens` and
`ignore_eos`, T = 1 and top-p 0.7, and the paper's extrapolation fields (the `:rl` preset as
the second row): ours serving_bench's prompts, `vllm bench serve` its random dataset at their
median token length (its file datasets need pandas, which the CPU build lacks), the fields
through `--extra-body`. Prints one table
(output tokens/s, TTFT and inter-token latency medians) and writes it as JSON.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.serving_bench import PAPER, SAMPLING, drive_http, prompts
from benchmarks.vllm_bench_serve import run as vllm_bench_serve


def ours(args, model: str, fields: dict, texts: list[str]) -> dict:
    result = drive_http(args.url, model, fields, texts, args.concurrency, args.max_tokens)
    return {"tokens_per_s": result["output_tok_s"], "ttft_p50_ms": result["ttft_p50_ms"],
            "itl_p50_ms": result["itl_p50_ms"]}


def theirs(args, model: str, fields: dict, prompt_len: int, folder: Path) -> dict:
    vllm_bench_serve([
        "--base-url", args.url, "--model", model, "--tokenizer", args.tokenizer, "--backend", "openai",
        "--endpoint", "/v1/completions", "--dataset-name", "random", "--random-input-len", str(prompt_len),
        "--random-output-len", str(args.max_tokens), "--random-range-ratio", "0", "--seed", "0",
        "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency), "--ignore-eos",
        "--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
        "--extra-body", json.dumps(fields), "--save-result", "--result-dir", str(folder),
        "--result-filename", "result.json",
    ])
    result = json.loads((folder / "result.json").read_text())
    return {"tokens_per_s": result["output_throughput"], "ttft_p50_ms": result["median_ttft_ms"],
            "itl_p50_ms": result["median_itl_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True, help="the served name; `<model>:rl` is the second row")
    parser.add_argument("--tokenizer", required=True, help="the RL model's path (vllm bench serve counts tokens)")
    parser.add_argument("--prompt-style", choices=("arith", "text"), default="arith")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/out/client_compare.json")
    args = parser.parse_args()
    texts = prompts(args.requests, args.prompt_style)
    prompt_len = int(statistics.median(len(AutoTokenizer.from_pretrained(args.tokenizer)(t).input_ids) for t in texts))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        drive_http(args.url, args.model, PAPER, texts[:4], 4, args.max_tokens)  # warm-up, not recorded
        for preset, model, fields in (("extrapolated", args.model, PAPER), ("rl", f"{args.model}:rl", {})):
            for client, measure in (("ours", lambda: ours(args, model, fields, texts)),
                                    ("vllm bench serve", lambda: theirs(args, model, fields, prompt_len, Path(tmp)))):
                rows.append({"preset": preset, "client": client, **measure()})
    print(f"{'preset':<13} {'client':<17} {'tok/s':>8} {'TTFT p50 ms':>12} {'ITL p50 ms':>11}")
    for r in rows:
        print(f"{r['preset']:<13} {r['client']:<17} {r['tokens_per_s']:>8.1f} {r['ttft_p50_ms']:>12.1f} {r['itl_p50_ms']:>11.2f}")
    ratios = {c: statistics.fmean([r["tokens_per_s"] for r in rows if r["client"] == c and r["preset"] == "extrapolated"])
              / statistics.fmean([r["tokens_per_s"] for r in rows if r["client"] == c and r["preset"] == "rl"])
              for c in ("ours", "vllm bench serve")}
    print("extrapolated / :rl tokens/s:", ", ".join(f"{c} {v:.2f}" for c, v in ratios.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "ratio_to_rl": ratios}, indent=2))


if __name__ == "__main__":
    main()
