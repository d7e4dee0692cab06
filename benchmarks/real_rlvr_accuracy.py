"""Held-out accuracy of the real RLVR pair at scale, offline: ≥ 500 problems × 4 answers per setting.

    .venv/bin/python benchmarks/real_rlvr_accuracy.py --rl demo/real-lora --out benchmarks/out/real-lora-500
    .venv/bin/python benchmarks/real_rlvr_accuracy.py --rl models/real-rlvr/full/final \
        --out benchmarks/out/real-full-500

The server samples ~45 tokens/s on this 2-core CPU (both streams of the stacked 135M model, torch
on one thread), so 500 problems × 4 answers is ~40 minutes per setting through it
(`real_rlvr_eval.py`). This script samples the same distribution without the server, in batches
of 128 rows with each model's KV cache (benchmarks/pair_sampling.py: float32 models as served,
their logits into `kernels.combine`, the server's own rule). `--rl` is the full child's checkpoint
or a LoRA adapter directory (merged by PEFT: the model the stacked engine serves for it).

Problems: the held-out split of benchmarks/real_rlvr_task.py (`problems("heldout", n, seed=1)`,
the first 125 are those of `real_rlvr_eval.py`), in the pair's chat template, T = 1 and top-p 0.7
unless the run says otherwise, at most 40 new tokens, scored by the last integer of the answer.
Runs (each selectable with --runs): base and RL alone; RL at T 0.7 and 0.5 (is extrapolation more
than sharpening?); selective replace (γ 0) and the paper's rule (γ 0.05, 0.1) at generator base,
k 50, τ −0.3; a τ × γ grid (τ −0.3 / −0.6, γ 0.25 / 0.5); and, with `--runs curve`, the paper's
replacement curve (the base generating, the tokens each criterion of benchmarks/replacement_curve.py
flags redrawn from RL; its thresholds but the ends, which are base and RL alone). Prints avg@n ± the
95% CI over problems, pass@n, the expected extrapolated fraction of tokens (Σ of the rule's M over
positions), and each setting's paired difference to RL alone; writes the records
(`evaluation.summarize`'s format) and summary.json under --out. A run whose records are complete is not sampled again.
"""

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lowrank_fidelity import PAPER, real_problems  # noqa: E402
from benchmarks.pair_sampling import sample  # noqa: E402
from benchmarks.replacement_curve import THRESHOLDS  # noqa: E402
from rlvrx.kernels.reference import Settings  # noqa: E402
from rlvrx.server import evaluation  # noqa: E402

ALONE = Settings(gamma=0.0, tau=-math.inf, generator="rl", candidates=0, temperature=1.0, top_p=0.7)
RUNS = {  # name: settings; "base" and the rl_* runs sample one model alone
    "base": replace(ALONE, generator="base"),
    "rl": ALONE,
    "rl_T0.7": replace(ALONE, temperature=0.7),
    "rl_T0.5": replace(ALONE, temperature=0.5),
    "replace": replace(PAPER, gamma=0.0),
    "paper_g0.05": PAPER,
    "paper_g0.1": replace(PAPER, gamma=0.1),
    **{f"grid_t{tau}_g{gamma}": replace(PAPER, tau=tau, gamma=gamma) for tau in (-0.3, -0.6) for gamma in (0.25, 0.5)},
}
# The paper's replacement curve (benchmarks/replacement_curve.py's thresholds): the base generates
# over the whole vocabulary, and the positions each criterion flags are redrawn from RL (γ 0).
CURVE = {f"curve_{selection}_{tau}": replace(ALONE, generator="base", gamma=0.0, tau=tau, selection=selection)
         for selection, taus in THRESHOLDS.items() for tau in taus[1:-1]}  # the ends are base and RL alone
GROUPS = {"default": list(RUNS), "curve": list(CURVE)}
RUNS |= CURVE


def load_models(base_path: str, rl_path: str):
    from transformers import AutoModelForCausalLM

    from rlvrx.tools.lora_extract import served_rl_model

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if (Path(rl_path) / "adapter_config.json").is_file():
        return base, served_rl_model(base_path, rl_path, torch.float32)
    return base, AutoModelForCausalLM.from_pretrained(rl_path, dtype=torch.float32).eval()


def run(name: str, s: Settings, models, problems, n: int, results: Path) -> None:
    """Sample n answers to every problem under s and write one record per problem."""
    base, rl = models
    pair = (base, base) if s.generator == "base" and s.tau == -math.inf else \
        (rl, rl) if s.tau == -math.inf else (rl, base)
    count = len(problems.prompts)
    sampled = sample(*pair, problems.prompts * n, s, problems.eos, seed=11, max_new=problems.max_new, progress=name)
    with results.open("w") as out:
        for i in range(count):
            rows = range(i, count * n, count)
            out.write(json.dumps({
                "setting": name, "setting_fields": asdict(s), "problem_id": i,
                "correct": [problems.correct(i, sampled.answers[r]) for r in rows],
                "completion_tokens": sum(len(sampled.answers[r]) for r in rows),
                "extrapolated_tokens": sum(sampled.extrapolated[r] for r in rows),
            }) + "\n")


def per_problem(results: Path) -> list[float]:
    return [sum(r["correct"]) / len(r["correct"]) for r in map(json.loads, results.read_text().splitlines())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/smollm2/base")
    parser.add_argument("--rl", default="demo/real-lora", help="the full child's checkpoint or a LoRA adapter")
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, *GROUPS], default=["default"],
                        help="runs or groups of runs: default (all but the curve), curve")
    parser.add_argument("--out", default="benchmarks/out/real-lora-500")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    models = load_models(args.base, args.rl)
    problems = real_problems(args.base, args.problems)
    names = [run for name in args.runs for run in GROUPS.get(name, [name])]
    for name in names:
        results = out / f"{name}.jsonl"
        if not results.exists() or len(results.read_text().splitlines()) != args.problems:
            run(name, RUNS[name], models, problems, args.n, results)
            print(json.dumps(evaluation.summarize(results, [args.n])[0]), file=sys.stderr, flush=True)
    table = []
    for name in names:
        results = out / f"{name}.jsonl"
        row = evaluation.summarize(results, [args.n])[0]
        if name != "rl" and (out / "rl.jsonl").exists():
            diffs = [a - b for a, b in zip(per_problem(results), per_problem(out / "rl.jsonl"))]
            row["minus_rl"] = statistics.fmean(diffs)
            row["minus_rl_ci95"] = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        table.append(row)
    print(f"| run | avg@{args.n} ± 95% CI | pass@{args.n} | extrapolated | − RL (paired) |")
    print("|---|---:|---:|---:|---:|")
    for row in table:
        paired = f"{row['minus_rl']:+.3f} ± {row['minus_rl_ci95']:.3f}" if "minus_rl" in row else "—"
        print(f"| {row['setting']} | {row['avg@n']:.3f} ± {row['ci95']:.3f} | {row[f'pass@{args.n}']:.3f} | "
              f"{row['extrapolation_rate']:.1%} | {paired} |")
    (out / "summary.json").write_text(json.dumps({"base": args.base, "rl": args.rl, "problems": args.problems,
                                                  "n": args.n, "runs": table}, indent=2))


if __name__ == "__main__":
    main()
