"""Accuracy of the demo pair (3-digit reversed addition) under extrapolation, via `rlvrx eval`.

    make serve &     # or: rlvrx serve --rl demo/pair/rl --base demo/pair/base --served-model-name demo --dtype float32
    python benchmarks/demo_accuracy.py --url http://127.0.0.1:8000/v1 --out benchmarks/out/demo

Writes a seeded test set of 3-digit additions, then samples it with the server under: the
base and RL models alone at several temperatures (temperature-matched baselines: extrapolation
sharpens the distribution), and extrapolation over a γ × τ grid for each generator at T = 1.
Prints one table (avg@n, pass@n, extrapolation rate) and writes the JSONL results, a summary
JSON and a plot per run under --out.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlvrx.server import evaluation  # noqa: E402
from rlvrx.server.arith_pair import answer, question  # noqa: E402


def write_problems(out: Path, count: int) -> list[dict]:
    """A seeded set of `count` 3-digit additions as eval JSONL under `out`; returns it loaded."""
    rng = random.Random(12345)
    data = out / "problems.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "problem": question(a, b), "answer": answer(a + b)})
                              for i, (a, b) in enumerate((rng.randrange(1000), rng.randrange(1000))
                                                         for _ in range(count))))
    return evaluation.load_problems(str(data))


def run_all(url: str, model: str, problems: list[dict], runs: dict, n: int, out: Path, max_tokens: int = 8,
            scoring: str = "exact", concurrency: int = 32) -> list[dict]:
    """Each run {name: (settings, temperature, top_p)} through `evaluation.run`; prints and
    writes (summary.json) one table of every setting of every run."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=3, timeout=600)
    table = []
    for name, (settings, temperature, top_p) in runs.items():
        results = out / f"{name}.jsonl"
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": 7}
        evaluation.run(client, model, problems, settings, n, sampling, results, concurrency=concurrency,
                       suffix="", scoring=scoring, progress=False)
        rows = evaluation.summarize(results, [n])
        evaluation.plot(rows, results.with_suffix(".png"))
        results.with_suffix(".summary.json").write_text(json.dumps(rows, indent=2))
        for row in rows:
            table.append({"run": name, "T": temperature, "top_p": top_p, **row})
    print(f"{'run':<22} {'setting':<72} {'avg@n':>6} {'±ci95':>6} {'pass@n':>6} {'extrap':>6}")
    for row in table:
        print(f"{row['run']:<22} {row['setting']:<72} {row['avg@n']:>6.3f} {row['ci95']:>6.3f} "
              f"{row[f'pass@{n}']:>6.3f} {row['extrapolation_rate']:>6.3f}")
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    return table


def arguments(description: str, out: str, n: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--problems", type=int, default=250)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--out", default=out)
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "benchmarks/out/demo", 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = write_problems(out, args.problems)
    runs = {  # name: (settings, temperature, top_p)
        "presets_T1.0": (evaluation.grid([], [], "base", 0, ["rl", "base"]), 1.0, 1.0),
        "presets_T0.7": (evaluation.grid([], [], "base", 0, ["rl", "base"]), 0.7, 1.0),
        "presets_T0.5": (evaluation.grid([], [], "base", 0, ["rl", "base"]), 0.5, 1.0),
        "base_generator_T1.0": (evaluation.grid([0.0, 0.1, 0.25, 0.5, 1.0], [-0.5, -0.2, None], "base", 0, []), 1.0, 1.0),
        "rl_generator_T1.0": (evaluation.grid([0.1, 0.25, 0.5, 1.0], [-0.2, None], "rl", 0, []), 1.0, 1.0),
        "paper_T1.0_P0.7": (evaluation.grid([0.05, 0.1], [-0.3], "base", 50, ["rl", "base"]), 1.0, 0.7),
    }
    run_all(args.url, args.model, problems, runs, args.n, out)


if __name__ == "__main__":
    main()
