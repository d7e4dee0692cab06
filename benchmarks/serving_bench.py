"""Serving benchmark: this server against vLLM serving the RL model alone and the paper's way.

    python benchmarks/serving_bench.py --rl demo/pair/rl --base demo/pair/base \
        --concurrency 1,4,16 --requests 32 --max-tokens 32 --out benchmarks/out/serving.json

Starts each system itself on loopback, one at a time, and drives it with the same seeded
request mix (fixed prompts, `max_tokens` with `ignore_eos`, so every request produces
exactly that many tokens) at each concurrency level:

* `rlvrx` — the extrapolated preset of `rlvrx serve` (paper setting: generator base, k = 50,
  τ = −0.3, γ = 0.05, T = 1);
* `rlvrx:rl` — the `:rl` preset of the same server (one model's sampling, both models run);
* `vllm-rl` — a plain vLLM OpenAI server of the RL model alone: the reference ceiling;
* `paper-2engines` — two vLLM engines stepped one token per `generate` call with top-50
  log-probs, the rule applied on the host (benchmarks/baselines/paper_two_engines.py).

Prints one table (TTFT, inter-token latency, end-to-end latency p50/p99, output tokens/s,
and tokens/s as a ratio to `vllm-rl` at the same concurrency) and writes it as JSON.
Our own client measures every system (the two-engine baseline has no HTTP server, and the
`vllm bench serve` entry point does not run from the CPU build of vLLM).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overload import stream_completion  # noqa: E402

PAPER = {"gamma": 0.05, "tau": -0.3, "generator": "base", "candidates": 50}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server failed to start, see {log}")
            time.sleep(1)
    raise SystemExit(f"server did not start, see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def prompts(count: int) -> list[str]:
    from server.arith_pair import question

    return [question((37 * i) % 1000, (91 * i + 5) % 1000) + "=" for i in range(count)]


def drive_http(url: str, model: str, fields: dict, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    def one(i: int) -> dict:
        body = {"model": model, "prompt": texts[i], "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 1.0, "seed": i, **fields}
        return stream_completion(url, body)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(texts))))
    wall = time.perf_counter() - started
    bad = [r for r in results if r["tokens"] != max_tokens]
    if bad:
        raise SystemExit(f"{model}: incomplete responses: {bad[:2]}")
    return summarize([{"ttft_s": r["times"][0], "e2e_s": r["times"][-1],
                       "itl_s": [b - a for a, b in zip(r["times"], r["times"][1:])]} for r in results],
                     wall, len(texts) * max_tokens)


def drive_two_engines(baseline, tokenizer, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    records = []
    started = time.perf_counter()
    for first in range(0, len(texts), concurrency):
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts[first : first + concurrency]]
        records += baseline.run(ids, max_tokens, PAPER["gamma"], PAPER["tau"], temperature=1.0, seed=first)
    wall = time.perf_counter() - started
    return summarize(records, wall, len(texts) * max_tokens)


def summarize(records: list[dict], wall: float, tokens: int) -> dict:
    itl = [x for r in records for x in r["itl_s"]]
    return {
        "ttft_p50_ms": 1e3 * statistics.median(r["ttft_s"] for r in records),
        "ttft_p99_ms": 1e3 * percentile([r["ttft_s"] for r in records], 0.99),
        "itl_p50_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
        "itl_p99_ms": 1e3 * percentile(itl, 0.99),
        "e2e_p50_ms": 1e3 * statistics.median(r["e2e_s"] for r in records),
        "e2e_p99_ms": 1e3 * percentile([r["e2e_s"] for r in records], 0.99),
        "output_tok_s": tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rl", default="demo/pair/rl")
    parser.add_argument("--base", default="demo/pair/base")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/out/serving.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(args.requests)
    url = f"http://127.0.0.1:{args.port}"
    logs = Path(args.out).parent
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--port", str(args.port), "--host", "127.0.0.1", "--dtype", args.dtype,
              "--served-model-name", "m", "--seed", "0"]
    rows = []

    proc = start([sys.executable, "-m", "server.cli", "serve", "--rl", args.rl, "--base", args.base, *common],
                 args.port, logs / "rlvrx.log")
    try:
        drive_http(url, "m", PAPER, texts[:4], 4, args.max_tokens)  # warm-up, not recorded
        for c in levels:
            rows.append({"system": "rlvrx", "concurrency": c, **drive_http(url, "m", PAPER, texts, c, args.max_tokens)})
            rows.append({"system": "rlvrx:rl", "concurrency": c,
                         **drive_http(url, "m:rl", {}, texts, c, args.max_tokens)})
    finally:
        stop(proc)
    proc = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.rl,
                  "--logprobs-mode", "processed_logprobs", *common], args.port, logs / "vllm.log")
    try:
        drive_http(url, "m", {}, texts[:4], 4, args.max_tokens)  # warm-up, not recorded
        for c in levels:
            rows.append({"system": "vllm-rl", "concurrency": c, **drive_http(url, "m", {}, texts, c, args.max_tokens)})
    finally:
        stop(proc)

    from transformers import AutoTokenizer

    from benchmarks.baselines.paper_two_engines import TwoEngineBaseline

    baseline = TwoEngineBaseline(args.rl, args.base, dtype=args.dtype, seed=0, gpu_memory_utilization=0.3,
                                 enable_prefix_caching=True)
    tokenizer = AutoTokenizer.from_pretrained(args.rl)
    drive_two_engines(baseline, tokenizer, texts[:4], 4, 4)  # warm-up, not recorded
    for c in levels:
        rows.append({"system": "paper-2engines", "concurrency": c,
                     **drive_two_engines(baseline, tokenizer, texts, c, args.max_tokens)})

    ceiling = {r["concurrency"]: r["output_tok_s"] for r in rows if r["system"] == "vllm-rl"}
    print(f"{'system':<15} {'conc':>4} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>15} {'E2E p50/p99 ms':>17} "
          f"{'tok/s':>8} {'vs vllm-rl':>10}")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["system"])):
        r["ratio_to_vllm_rl"] = r["output_tok_s"] / ceiling[r["concurrency"]]
        print(f"{r['system']:<15} {r['concurrency']:>4} {r['ttft_p50_ms']:>8.1f}/{r['ttft_p99_ms']:<8.1f} "
              f"{r['itl_p50_ms']:>7.1f}/{r['itl_p99_ms']:<7.1f} {r['e2e_p50_ms']:>8.1f}/{r['e2e_p99_ms']:<8.1f} "
              f"{r['output_tok_s']:>8.1f} {r['ratio_to_vllm_rl']:>10.3f}")
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
