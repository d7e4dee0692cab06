"""Held-out accuracy of the real RLVR pair (benchmarks/real_rlvr.py) through the server.

    .venv/bin/rlvrx serve --base models/smollm2/base --rl demo/real-lora --served-model-name smollm2-arith \\
        --dtype float32 &
    .venv/bin/python benchmarks/real_rlvr_eval.py --model smollm2-arith --out benchmarks/out/real-lora

Samples n answers (default 4) to each of the held-out problems (default 500; never trained on)
at the task's decoding (T = 1, top-p 0.7, at most 40 new tokens, the chat template of the
pair) and scores the last integer of each answer. Runs, each selectable with --runs:

- `presets`: the base and the RL model alone;
- `rl_T0.7`, `rl_T0.5`: the RL model at lower temperatures (is extrapolation more than sharpening?);
- `paper`: the paper's rule (generator base, k 50, τ −0.3, γ 0.1); `paper_more`: the same at γ 0
  (selective replace) and 0.05;
- `grid`: a small τ × γ grid around it (τ −0.1 / −0.3 / −0.6, γ 0.25 / 0.5);
- `delta`: the base model generating with extrapolation never taken (γ 0, τ −1000), so that the
  server's `rlvrx:delta_logp` histogram, read from /metrics before and after, is the distribution
  of Δlog p = log π_RL − log π_Base over the base's own tokens on real answers; its share at or
  below τ = −0.3 is the fraction the paper's rule flags. Written to <out>/delta_logp.json.

Prints one table (avg@n ± 95% CI over problems, pass@n, extrapolated fraction) and writes the
results JSONL (reruns resume), a summary and a plot per run under --out.
"""

import argparse
import json
import math
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import real_rlvr_task as task  # noqa: E402
from benchmarks.demo_accuracy import run_all  # noqa: E402
from rlvrx.server import evaluation  # noqa: E402

RUNS = {  # name: (settings, temperature, top_p)
    "presets": (evaluation.grid([], [], "base", 50, ["base", "rl"]), 1.0, 0.7),
    "rl_T0.7": (evaluation.grid([], [], "base", 50, ["rl"]), 0.7, 0.7),
    "rl_T0.5": (evaluation.grid([], [], "base", 50, ["rl"]), 0.5, 0.7),
    "paper": (evaluation.grid([0.1], [-0.3], "base", 50, []), 1.0, 0.7),
    "paper_more": (evaluation.grid([0.0, 0.05], [-0.3], "base", 50, []), 1.0, 0.7),
    "grid": (evaluation.grid([0.25, 0.5], [-0.1, -0.3, -0.6], "base", 50, []), 1.0, 0.7),
    # τ = −1000, not −inf: the server serves τ = −inf with the base generator as the base model alone,
    # which records no Δlog p; no token's Δ is that low, so nothing is replaced either way.
    "delta": (evaluation.grid([0.0], [-1000.0], "base", 50, []), 1.0, 0.7),
}


def delta_buckets(url: str) -> dict[float, float]:
    """Cumulative counts of the server's rlvrx:delta_logp histogram by upper bound, over all labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60).read().decode()
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "rlvrx:delta_logp":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def delta_histogram(before: dict[float, float], after: dict[float, float], out: Path) -> None:
    """Print and write the Δlog p histogram of the tokens sampled between two reads of /metrics."""
    cumulative = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = cumulative[math.inf]
    if not total:
        print(f"Δlog p: nothing was sampled (a resumed run); remove {out / 'delta'} to measure it again")
        return
    rows, previous = [], 0.0
    for bound, count in cumulative.items():
        rows.append({"le": bound, "count": count - previous, "fraction": (count - previous) / total})
        previous = count
    flagged = cumulative[-0.3] / total
    print(f"Δlog p over {total:.0f} base tokens: fraction ≤ −0.3 (flagged) {flagged:.4f}")
    for row in rows:
        print(f"  ≤ {row['le']:>6g}: {row['fraction']:.4f}")
    (out / "delta_logp.json").write_text(json.dumps({"tokens": total, "flagged_at_tau_-0.3": flagged,
                                                      "buckets": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-arith")
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", default="benchmarks/out/real-lora")
    args = parser.parse_args()
    out = Path(args.out)
    problems = evaluation.load_problems(str(task.write_jsonl(task.problems("heldout", args.problems, seed=1),
                                                             out / "problems.jsonl")))
    table = []
    for name in args.runs:
        before = delta_buckets(args.url) if name == "delta" else None
        table += run_all(args.url, args.model, problems, {name: RUNS[name]}, args.n, out / name, max_tokens=40,
                scoring="number", concurrency=args.concurrency)
        if before is not None:
            delta_histogram(before, delta_buckets(args.url), out)
    (out / "summary.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
