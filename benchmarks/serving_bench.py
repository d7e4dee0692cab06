"""Serving benchmark: this server against vLLM serving the RL model alone and the paper's way.

    python benchmarks/serving_bench.py --rl demo/pair/rl --base demo/pair/base \
        --concurrency 1,4,16,64 --requests 64 --max-tokens 32 --out benchmarks/out/serving.json

Starts each system itself on loopback, one at a time, and drives it with the same seeded
request mix (fixed prompts, `max_tokens` with `ignore_eos`, so every request produces
exactly that many tokens; T = 1, top-p 0.7 for every system) at each concurrency level:

* `rlvrx` — the extrapolated preset of `rlvrx serve` (paper setting: generator base, k = 50,
  τ = −0.3, γ = 0.05);
* `rlvrx:rl` — the `:rl` preset of the same server (one model's sampling, both models run);
* `vllm-rl` — a plain vLLM OpenAI server of the RL model alone: the reference ceiling;
* `paper-2engines` — two vLLM engines stepped one token per `generate` call with top-50
  log-probs, the rule applied on the host (benchmarks/baselines/paper_two_engines.py);
* `hf-generate` — transformers `generate` on the RL model with a logits processor that runs
  the base model and `kernels.combine` each step (benchmarks/baselines/transformers_generate.py).

For a LoRA child (`--rl` an adapter directory: `rlvrx serve` holds one stacked backbone), pass
the merged model as `--rl-model`: the systems that serve the RL model alone take it, and two
more systems run: `vllm-lora` — vLLM `--enable-lora` serving base + adapter alone (a second
single-model anchor), and `rlvrx-2b` — the extrapolated preset of `rlvrx serve` with the
merged model as a full child (the two-backbone path on the same pair).

With `--speculative-config JSON` (vLLM's, e.g. `{"method": "ngram", "num_speculative_tokens": 3,
"prompt_lookup_max": 3}`), three more systems run with that speculation: `rlvrx+spec` and
`rlvrx:rl+spec` (the same presets of `rlvrx serve --speculative-config ...`) and `vllm-rl+spec` (vLLM
alone with the same speculation), and with `--disable-by-batch-size N` `rlvrx+spec-gated` (the extrapolated
preset of a server whose config adds `"disable_by_batch_size": N`: no drafts in steps of N requests or
more, server/engine/draft_gate.py); their rows add the acceptance rate (accepted / drafted tokens, from
vLLM's counters on /metrics) and the mean accepted length (tokens per verification step: 1 + accepted /
drafts), and their ratio is also taken to `vllm-rl+spec`. `--prompt-style quote` sends rewriting and
editing requests that quote their input (fix this function, reformat this JSON), in the RL model's
chat template as a chat client would send them, where prompt lookup finds its drafts.

`--systems` picks a subset. The two baselines take the requests in batches of the
concurrency (a batch starts when the previous one has finished), as a user of them would.
Prompts are 3-digit reversed additions for the demo pair (its character tokenizer knows
nothing else) and short plain-text requests for any other pair (`--prompt-style`; `auto`
tells the demo pair by its chat template); `--prompt-style task` sends the held-out word problems
of the real RLVR pair's task (benchmarks/real_rlvr_task.py) in the RL model's chat template.

Prints one table (TTFT, inter-token latency, end-to-end latency p50/p99, output tokens/s,
tokens/s as a ratio to `vllm-rl` at the same concurrency, and this server's extrapolation rate:
extrapolated / generated tokens, from its usage) and writes it as JSON.
Our own client measures every system (the two-engine baseline has no HTTP server, and the
`vllm bench serve` entry point does not run from the CPU build of vLLM).
"""

import argparse
import json
import os
import signal
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
from rlvrx.server.engine.adapter import is_adapter_dir  # noqa: E402

PAPER = {"gamma": 0.05, "tau": -0.3, "generator": "base", "candidates": 50}
SAMPLING = {"temperature": 1.0, "top_p": 0.7}  # every system, every request
SYSTEMS = ("rlvrx", "rlvrx:rl", "rlvrx-2b", "vllm-rl", "vllm-lora", "paper-2engines", "hf-generate",
           "rlvrx+spec", "rlvrx+spec-gated", "rlvrx:rl+spec", "vllm-rl+spec")
SPEC_SYSTEMS = ("rlvrx+spec", "rlvrx+spec-gated", "rlvrx:rl+spec", "vllm-rl+spec")
TEXT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "List five ideas for a weekend trip and say what each would cost.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle step by step.",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective novel you would like to read.",
    "How do vaccines train the immune system?",
]
QUOTE_PROMPTS = [  # rewriting and editing requests that quote their input
    "Fix the bug in this function and write out the corrected function:\n\ndef average(values):\n"
    "    total = 0\n    for value in values:\n        total += value\n    return total / len(value)\n\n",
    'Reformat this JSON with one key per line:\n\n{"name": "lighthouse", "keeper": {"name": "Ada", "years": 12}, '
    '"lamps": [1, 2, 3], "active": true, "location": {"lat": 48.1, "lon": -4.2}}\n\n',
    "Add type hints to this Python function and write it out again:\n\ndef greet(name, times):\n"
    "    for i in range(times):\n        print('Hello, ' + name)\n    return times\n\n",
    "Correct the spelling in this paragraph and repeat it: The keeper climed the stairs every evning and "
    "lit the lamp befor the ships came in from the see.\n\n",
    "Rename the variable x to count in this code and write the code again:\n\nx = 0\nfor line in open('log.txt'):\n"
    "    if 'error' in line:\n        x += 1\nprint('errors:', x)\n\n",
    "Rewrite this SQL query with explicit JOIN syntax:\n\nSELECT orders.id, customers.name FROM orders, customers "
    "WHERE orders.customer_id = customers.id AND orders.total > 100;\n\n",
    "Convert this list to a Markdown table with columns name and price:\n\napple 1.20\nbread 2.50\nmilk 0.99\n"
    "cheese 4.75\n\n",
    "Make this function return early when the list is empty, and write out the whole function:\n\n"
    "def largest(items):\n    best = items[0]\n    for item in items:\n        if item > best:\n"
    "            best = item\n    return best\n\n",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start(command: list[str], port: int, log: Path, timeout: int = 900) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    # Its own process group, for `stop`, but not its own session: with the kernel's scheduler
    # autogroups a new session would get half of the CPU against the client's, not its threads' share.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            process_group=0)
    deadline = time.monotonic() + timeout  # compiling a model on this CPU takes minutes
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server failed to start, see {log}")
            time.sleep(1)
    stop(proc)  # or it keeps the port from the next system
    raise SystemExit(f"server did not start in {timeout} s, see {log}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started by `start` and wait until its whole process group (vLLM's engine
    processes outlive the API server for a few seconds) has exited, so that the next system
    is measured on idle cores."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for _ in range(60):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)


def prompts(count: int, style: str, tokenizer=None) -> list[str]:
    """`count` fixed prompts: reversed 3-digit additions (`arith`), plain-text requests (`text`),
    requests that quote their input (`quote`) or held-out word problems of the real RLVR pair's task
    (`task`, benchmarks/real_rlvr_task.py, as real_rlvr_eval.py asks them)."""
    from rlvrx.server.arith_pair import question

    if style == "arith":
        return [question((37 * i) % 1000, (91 * i + 5) % 1000) + "=" for i in range(count)]
    if style == "task":
        from benchmarks import real_rlvr_task

        return [tokenizer.apply_chat_template([{"role": "user", "content": problem["problem"]}], tokenize=False,
                                              add_generation_prompt=True)
                for problem in real_rlvr_task.problems("heldout", count, seed=1)]
    if style == "quote":
        return [tokenizer.apply_chat_template([{"role": "user", "content": f"Request {i}: {QUOTE_PROMPTS[i % len(QUOTE_PROMPTS)]}"}],
                                              tokenize=False, add_generation_prompt=True) for i in range(count)]
    return [f"Request {i}: {TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}" for i in range(count)]


def prompt_style(tokenizer) -> str:
    """`arith` for the demo pair (recognised by its chat template), else `text`."""
    from rlvrx.server.arith_pair import CHAT_TEMPLATE

    return "arith" if tokenizer.chat_template == CHAT_TEMPLATE else "text"


def drive_http(url: str, model: str | list[str], fields: dict, texts: list[str], concurrency: int,
               max_tokens: int) -> dict:
    """Send the requests (request i to model i mod the number of models) `concurrency` at a time."""
    models = [model] if isinstance(model, str) else model

    def one(i: int) -> dict:
        body = {"model": models[i % len(models)], "prompt": texts[i], "max_tokens": max_tokens, "ignore_eos": True,
                "seed": i, **SAMPLING, **fields}
        return stream_completion(url, body)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(texts))))
    wall = time.perf_counter() - started
    bad = [r for r in results if r["tokens"] != max_tokens]
    if bad:
        raise SystemExit(f"{model}: incomplete responses: {bad[:2]}")
    summary = summarize([{"ttft_s": r["times"][0], "e2e_s": r["times"][-1],
                          "itl_s": [b - a for a, b in zip(r["times"], r["times"][1:])]} for r in results],
                        wall, len(texts) * max_tokens)
    if all(r["extrapolated"] is not None for r in results):  # this server's extrapolated preset
        summary["extrapolation_rate"] = sum(r["extrapolated"] for r in results) / (len(texts) * max_tokens)
    return summary


def drive_batches(baseline, tokenizer, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Run a baseline (`.run` as in benchmarks/baselines) on batches of `concurrency` requests,
    tokenized as vLLM's completions endpoint does."""
    records = []
    started = time.perf_counter()
    for first in range(0, len(texts), concurrency):
        ids = [tokenizer(t).input_ids for t in texts[first : first + concurrency]]
        records += baseline.run(ids, max_tokens, gamma=PAPER["gamma"], tau=PAPER["tau"], seed=first, **SAMPLING)
    wall = time.perf_counter() - started
    bad = [r["tokens"] for r in records if r["tokens"] != max_tokens]
    if bad:
        raise SystemExit(f"{type(baseline).__name__}: incomplete responses: {bad[:2]}")
    return summarize(records, wall, len(texts) * max_tokens)


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")


def spec_counters(url: str) -> list[float]:
    """vLLM's speculative-decoding counters on /metrics: drafts, draft tokens, accepted tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    totals = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return [totals[name] for name in SPEC_COUNTERS]


def acceptance(before: list[float], after: list[float]) -> dict:
    drafts, drafted, accepted = (b - a for a, b in zip(before, after))
    return {"acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}


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


def run_servers(args, systems: list[str], levels: list[int], texts: list[str]) -> list[dict]:
    """Rows for the HTTP systems: `rlvrx serve` (extrapolated and `:rl`), then plain vLLM."""
    url = f"http://127.0.0.1:{args.port}"
    logs = Path(args.out).parent
    common = ["--port", str(args.port), "--host", "127.0.0.1", "--dtype", args.dtype,
              "--served-model-name", "m", "--seed", "0"]
    servers = [
        ([sys.executable, "-m", "rlvrx.server.cli", "serve", "--rl", args.rl, "--base", args.base, *common], "rlvrx.log",
         [("rlvrx", "m", PAPER), ("rlvrx:rl", "m:rl", {})]),
        ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.rl_model,
          "--logprobs-mode", "processed_logprobs", *common], "vllm.log", [("vllm-rl", "m", {})]),
    ]
    if args.speculative_config:
        spec = ["--speculative-config", args.speculative_config]
        servers += [
            ([*servers[0][0], *spec], "rlvrx-spec.log", [("rlvrx+spec", "m", PAPER), ("rlvrx:rl+spec", "m:rl", {})]),
            ([*servers[1][0], *spec], "vllm-spec.log", [("vllm-rl+spec", "m", {})]),
        ]
        if args.disable_by_batch_size:
            gated = json.dumps({**json.loads(args.speculative_config), "disable_by_batch_size": args.disable_by_batch_size})
            servers.append(([*servers[0][0], "--speculative-config", gated], "rlvrx-spec-gated.log",
                            [("rlvrx+spec-gated", "m", PAPER)]))
    if is_adapter_dir(args.rl):
        config = json.loads((Path(args.rl) / "adapter_config.json").read_text())
        rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
        servers += [
            ([sys.executable, "-m", "rlvrx.server.cli", "serve", "--rl", args.rl_model, "--base", args.base, *common],
             "rlvrx-2b.log", [("rlvrx-2b", "m", PAPER)]),
            ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.base, "--enable-lora",
              "--lora-modules", f"lora={args.rl}", "--max-lora-rank", str(rank),
              "--logprobs-mode", "processed_logprobs", *common], "vllm-lora.log", [("vllm-lora", "lora", {})]),
        ]
    rows = []
    for command, log, served in servers:
        served = [s for s in served if s[0] in systems]
        if not served:
            continue
        proc = start(command, args.port, logs / log)
        try:
            drive_http(url, served[0][1], served[0][2], texts[:4], 4, args.max_tokens)  # warm-up, not recorded
            for c in levels:
                for system, model, fields in served:
                    spec = system in SPEC_SYSTEMS
                    before = spec_counters(url) if spec else None
                    row = {"system": system, "concurrency": c, **drive_http(url, model, fields, texts, c, args.max_tokens)}
                    rows.append({**row, **(acceptance(before, spec_counters(url)) if spec else {})})
        finally:
            stop(proc)
    return rows


def run_baselines(args, systems: list[str], levels: list[int], texts: list[str], tokenizer) -> list[dict]:
    """Rows for the in-process baselines: transformers `generate`, then the paper's two engines
    (last: their engine processes stay up until this process ends)."""
    rows = []
    for system in ("hf-generate", "paper-2engines"):
        if system not in systems:
            continue
        if system == "hf-generate":
            from benchmarks.baselines.transformers_generate import TransformersGenerateBaseline

            baseline = TransformersGenerateBaseline(args.rl_model, args.base, dtype=args.dtype)
        else:
            from benchmarks.baselines.paper_two_engines import TwoEngineBaseline

            baseline = TwoEngineBaseline(args.rl_model, args.base, dtype=args.dtype, seed=0, gpu_memory_utilization=0.3,
                                         enable_prefix_caching=True)
        drive_batches(baseline, tokenizer, texts[:4], 4, 4)  # warm-up, not recorded
        for c in levels:
            rows.append({"system": system, "concurrency": c,
                         **drive_batches(baseline, tokenizer, texts, c, args.max_tokens)})
    return rows


def report(rows: list[dict]) -> None:
    """Print the table; add each row's throughput as a ratio to `vllm-rl` at its concurrency (None
    when `vllm-rl` did not run), and, for the rows with speculation, to `vllm-rl+spec` and to the same
    system without speculation."""
    def tok_s(system: str) -> dict:
        return {r["concurrency"]: r["output_tok_s"] for r in rows if r["system"] == system}

    def ratio(r: dict, system: str) -> float | None:
        anchor = tok_s(system).get(r["concurrency"])
        return r["output_tok_s"] / anchor if anchor else None

    show = lambda x, fmt: "—" if x is None else format(x, fmt)  # noqa: E731
    print(f"{'system':<15} {'conc':>4} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>15} {'E2E p50/p99 ms':>17} "
          f"{'tok/s':>8} {'vs vllm-rl':>10} {'vs +spec':>8} {'vs no spec':>10} {'accept':>6} {'length':>6} "
          f"{'extrap.':>7}")
    for r in sorted(rows, key=lambda r: (r["concurrency"], SYSTEMS.index(r["system"]))):
        r["ratio_to_vllm_rl"] = ratio(r, "vllm-rl")
        if r["system"] in SPEC_SYSTEMS:
            r["ratio_to_vllm_rl_spec"] = ratio(r, "vllm-rl+spec")
            r["ratio_to_no_spec"] = ratio(r, r["system"].split("+")[0])
        print(f"{r['system']:<15} {r['concurrency']:>4} {r['ttft_p50_ms']:>8.1f}/{r['ttft_p99_ms']:<8.1f} "
              f"{r['itl_p50_ms']:>7.1f}/{r['itl_p99_ms']:<7.1f} {r['e2e_p50_ms']:>8.1f}/{r['e2e_p99_ms']:<8.1f} "
              f"{r['output_tok_s']:>8.1f} {show(r['ratio_to_vllm_rl'], '.3f'):>10} "
              f"{show(r.get('ratio_to_vllm_rl_spec'), '.3f'):>8} {show(r.get('ratio_to_no_spec'), '.3f'):>10} "
              f"{show(r.get('acceptance_rate'), '.2f'):>6} {show(r.get('mean_accepted_length'), '.2f'):>6} "
              f"{show(r.get('extrapolation_rate'), '.1%'):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rl", default="demo/pair/rl")
    parser.add_argument("--base", default="demo/pair/base")
    parser.add_argument("--rl-model", default=None,
                        help="the RL model as a full checkpoint, when --rl is a LoRA adapter (its merge)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-style", choices=("auto", "arith", "text", "quote", "task"), default="auto")
    parser.add_argument("--speculative-config", default=None,
                        help="vLLM's speculative config (JSON): adds the +spec systems")
    parser.add_argument("--disable-by-batch-size", type=int, default=None,
                        help="with --speculative-config: adds rlvrx+spec-gated, the extrapolated preset of a server "
                             "whose config also has this disable_by_batch_size")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/out/serving.json")
    args = parser.parse_args()
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if set(systems) & set(SPEC_SYSTEMS) and not args.speculative_config:
        systems = [s for s in systems if s not in SPEC_SYSTEMS]
    if is_adapter_dir(args.rl) and args.rl_model is None:
        parser.error("--rl is a LoRA adapter: give its merged model as --rl-model")
    args.rl_model = args.rl_model or args.rl
    levels = [int(c) for c in args.concurrency.split(",")]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.rl_model)
    texts = prompts(args.requests, prompt_style(tokenizer) if args.prompt_style == "auto" else args.prompt_style,
                    tokenizer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = run_servers(args, systems, levels, texts) + run_baselines(args, systems, levels, texts, tokenizer)
    report(rows)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
