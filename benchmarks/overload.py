"""Bounded overload test: many more concurrent streaming requests than the batch holds.

    python benchmarks/overload.py --url http://127.0.0.1:8000 --model demo \
        --requests 400 --concurrency 128 --max-tokens 32 --out benchmarks/out/overload.json

Loopback only; it stops by itself after `--requests`. Requests mix the presets and τ/γ
settings. Each must stream to `[DONE]` with exactly `--max-tokens` tokens (`ignore_eos`).
Prints requests, concurrency, errors and end-to-end latency percentiles; exits 1 on any error.
"""

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIXES = [
    {"gamma": 0.05, "tau": -0.3, "generator": "base"},
    {"gamma": 0.5, "tau": None, "generator": "rl", "candidates": 0},
    {"gamma": 0.0, "tau": -0.3},
    {"preset": "rl"},
    {"preset": "base"},
]


def stream_completion(url: str, payload: dict, timeout: float = 600, started: threading.Event | None = None) -> dict:
    """A streamed completion; returns {"text", "tokens", "extrapolated", "finish_reason", "done", "times",
    "error"} (`extrapolated`: the usage's extrapolated_tokens, None where the server reports none), where
    `times` are the seconds from sending to each chunk that carried text and `error` is the message of an
    error event in the stream (or None). `started`, when given, is set at the first chunk with text."""
    request = urllib.request.Request(url + "/v1/completions", headers={"content-type": "application/json"},
                                     data=json.dumps({**payload, "stream": True,
                                                      "stream_options": {"include_usage": True}}).encode())
    text, finish, tokens, extrapolated, done, times, error = "", None, None, None, False, [], None
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: {"):
                event = json.loads(line[6:])
                error = (event.get("error") or {}).get("message", error)
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        times.append(time.perf_counter() - start)
                        if started is not None:
                            started.set()
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                    extrapolated = event["usage"].get("extrapolated_tokens")
    return {"text": text, "tokens": tokens, "extrapolated": extrapolated, "finish_reason": finish, "done": done,
            "times": times, "error": error}


def one_request(url: str, model: str, index: int, max_tokens: int) -> tuple[float, str | None]:
    """Stream one completion; returns (seconds, error or None)."""
    mix = dict(MIXES[index % len(MIXES)])
    suffix = f":{mix.pop('preset')}" if "preset" in mix else ""
    body = {"model": model + suffix, "prompt": f"Request {index}: please count", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "seed": index, **mix}
    start = time.perf_counter()
    try:
        result = stream_completion(url, body)
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        return time.perf_counter() - start, repr(exc)
    if not result["done"] or result["tokens"] != max_tokens:
        return time.perf_counter() - start, f"incomplete: {result}"
    return time.perf_counter() - start, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit("overload.py only targets loopback addresses")
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda i: one_request(args.url, args.model, i, args.max_tokens), range(args.requests)))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    errors = [error for _, error in results if error]
    summary = {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "errors": len(errors), "first_errors": errors[:5], "wall_s": wall,
        "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "output_tokens_per_s": (args.requests - len(errors)) * args.max_tokens / wall,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
