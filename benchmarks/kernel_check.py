"""The fused kernel on a GPU: correctness, cost against a copy, and launch cost with CUDA graphs.

    python benchmarks/kernel_check.py --sections correctness,cost --out DIR     # on CUDA
    TRITON_INTERPRET=1 python benchmarks/kernel_check.py --small --out DIR      # CPU smoke run

Sections (each writes DIR/kernel_<section>.json after every record):

* correctness — for V = 32,000 and 151,936, fp32 and bf16 logits, batch 1 / 16 / 64 / 256, the
  paper setting (γ 0.05, τ −0.3, generator base, T 1, top-p 0.7) with k = 50 and with k = 0,
  every fourth row greedy: the kernel (output poisoned with NaN first) against the PyTorch
  path on every row (q of sampled rows, M, Δ, greedy picks), and against the float64 reference
  on rows 0 (sampled) and 1 (greedy). The reference's top-p is O(V²) in Python (about 15 s a
  call at V = 32,000 on one core, some 20 times that at 151,936), so sampled rows are checked
  against it at the smaller vocabulary only, on a pool of CPU workers while the GPU goes on;
  greedy rows at both. Exits 1 on a mismatch, after writing what it measured.
* cost — the same shapes, every row sampled at the paper setting, Δ written (as the engine
  asks): the kernel's median time (L2 flushed before each call), the PyTorch path's, and a
  device-to-device copy of the same number of bytes. Bytes = what the kernel must move at the
  least: both logit rows read once, the output and Δ written once (fp32); the copy reads half
  of that and writes the other half. `kernel_over_copy` is the kernel's bandwidth as a
  fraction of the copy's.
* graphs — fp32, paper setting, each vocabulary and batch: time per call of back-to-back
  calls, launched one by one and as the replay of a CUDA graph captured once (inputs warm in
  L2: what is left is launch overhead against kernel time).

`--small`: tiny shapes on the CPU, the kernel under TRITON_INTERPRET=1 (a smoke run; its
times mean nothing).
"""

import argparse
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.combine_bench import random_rows  # noqa: E402
from benchmarks.timing import Budget, cuda_graph, loop_seconds, machine, median_seconds, write_json  # noqa: E402
from rlvrx.kernels import RowSettings, reference, rule, triton_combine  # noqa: E402

PAPER = dict(gamma=0.05, tau=-0.3, generator="base", top_p=0.7)
SETTINGS = {"paper": 50, "k=0": 0}  # the candidate count k of each setting
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = 1e-4  # on q, M and Δ: fp32 arithmetic over 152k tokens lands near 1e-6
REFERENCE_ROWS = (0, 1)  # row 0 is sampled, row 1 greedy (every fourth row from 1 is)


@dataclass(frozen=True)
class Grid:
    vocabs: tuple[int, ...]
    batches: tuple[int, ...]
    reference_sampled_max_vocab: int  # sampled rows are checked against float64 up to this V
    repeats: int  # timed calls per shape
    graph_calls: int  # back-to-back calls per shape in the graphs section


FULL = Grid(vocabs=(32000, 151936), batches=(1, 16, 64, 256), reference_sampled_max_vocab=32000, repeats=20,
            graph_calls=100)
SMALL = Grid(vocabs=(100, 200), batches=(2,), reference_sampled_max_vocab=100, repeats=1, graph_calls=1)


def case_settings(rows: int, candidates: int, device: str, mixed: bool) -> tuple[RowSettings, list[reference.Settings]]:
    """The paper setting with k = `candidates` on every row, every fourth row from row 1 greedy
    when `mixed`; the same as the float64 reference's settings, one per row."""
    temperature = [0.0 if mixed and i % 4 == 1 else 1.0 for i in range(rows)]
    settings = RowSettings.uniform(rows, candidates=candidates, temperature=1.0, device=device, **PAPER)
    settings = replace(settings, temperature=torch.tensor(temperature, device=device))
    return settings, [reference.Settings(candidates=candidates, temperature=t, **PAPER) for t in temperature]


def greedy_agrees(out: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether the greedy picks `tokens` [n] hold the maximum of the kernel's rows `out` [n, V].
    Not argmax equality: at an exact or near tie of e, fp32 and float64 (or two fp32 orders of
    summation) may pick different tokens of the same value."""
    top = out.max(dim=-1).values
    return bool((out.gather(1, tokens[:, None]).squeeze(1) >= top - 1e-5 * top.abs().clamp(min=1)).all())


def reference_row(rl: np.ndarray, base: np.ndarray, s: reference.Settings) -> dict:
    """The float64 reference of one row (runs in a worker process): M, and the greedy token or q."""
    m = reference.extrapolation_probability(rl, base, s)
    if s.temperature == 0:
        return {"M": m, "token": reference.greedy_token(rl, base, s)}
    return {"M": m, "q": reference.two_stage_distribution(rl, base, s)}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


class ReferenceJobs:
    """Rows sent to the float64 reference on a pool of CPU processes, judged when collected."""

    def __init__(self, workers: int):
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        self.jobs = []  # (record, kernel's output row, kernel's M, pending result)

    def submit(self, record: dict, rl: torch.Tensor, base: torch.Tensor, got, s: reference.Settings, row: int):
        rows = [x[row].float().cpu().double().numpy() for x in (rl, base)]
        pending = self.pool.apply_async(reference_row, (*rows, s))
        self.jobs.append((record, got.out[row].cpu(), float(got.prob[row]), pending))

    def collect(self, budget: Budget) -> None:
        for record, out, prob, pending in self.jobs:
            summary = record["vs_reference"]
            try:
                expected = pending.get(timeout=max(1.0, budget.until - time.time()) if budget.until else None)
            except multiprocessing.TimeoutError:
                summary["unfinished"] += 1
                continue
            summary["max_M_error"] = max(summary["max_M_error"], abs(prob - expected["M"]))
            if "token" in expected:
                summary["greedy_rows"] += 1
                summary["greedy_agree"] &= greedy_agrees(out[None], torch.tensor([expected["token"]]))
            else:
                summary["sampled_rows"] += 1
                summary["max_q_error"] = max(summary["max_q_error"], float(np.abs(out.double().exp().numpy()
                                                                                  - expected["q"]).max()))
            record["ok"] = record["ok"] and passes(summary)
        self.pool.terminate()


def passes(summary: dict) -> bool:
    return summary["greedy_agree"] and max(summary["max_q_error"], summary["max_M_error"],
                                           summary.get("max_delta_error", 0.0)) <= TOLERANCE


def check_case(vocab: int, dtype: str, batch: int, setting: str, device: str, grid: Grid, jobs: ReferenceJobs) -> dict:
    rl, base = random_rows(batch, vocab, device, DTYPES[dtype], seed=vocab + batch)
    settings, ref_settings = case_settings(batch, SETTINGS[setting], device, mixed=True)
    out = torch.full((batch, vocab), math.nan, device=device)
    got = triton_combine.combine(rl, base, settings, want_delta=True, out=out)
    expected = rule.combine(rl, base, settings, want_delta=True)
    greedy = settings.temperature == 0
    vs_torch = {"max_q_error": max_error(got.out[~greedy].exp(), expected.out[~greedy].exp()),
                "max_M_error": max_error(got.prob, expected.prob),
                "max_delta_error": max_error(got.delta, expected.delta),
                "greedy_agree": greedy_agrees(got.out[greedy], expected.out[greedy].argmax(-1))}
    all_written = not bool(got.out.isnan().any())
    record = {"vocab": vocab, "dtype": dtype, "batch": batch, "setting": setting, "greedy_rows": int(greedy.sum()),
              "all_written": all_written, "vs_torch": vs_torch,
              "vs_reference": {"greedy_rows": 0, "sampled_rows": 0, "max_q_error": 0.0, "max_M_error": 0.0,
                               "greedy_agree": True, "unfinished": 0},
              "ok": all_written and passes(vs_torch)}
    for row in REFERENCE_ROWS[:batch]:
        if ref_settings[row].temperature == 0 or vocab <= grid.reference_sampled_max_vocab:
            jobs.submit(record, rl, base, got, ref_settings[row], row)
    return record


def cost_case(vocab: int, dtype: str, batch: int, setting: str, device: str, repeats: int) -> dict:
    rl, base = random_rows(batch, vocab, device, DTYPES[dtype], seed=vocab + batch)
    settings, _ = case_settings(batch, SETTINGS[setting], device, mixed=False)
    out = torch.empty((batch, vocab), device=device)
    kernel_s = median_seconds(lambda: triton_combine.combine(rl, base, settings, want_delta=True, out=out), device,
                              repeats, flush_l2=True)
    torch_s = median_seconds(lambda: rule.combine(rl, base, settings, want_delta=True), device, max(1, repeats // 4),
                             flush_l2=True)
    moved = batch * vocab * (2 * rl.element_size() + 4 + 4)
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), device, repeats, flush_l2=True)
    return {"vocab": vocab, "dtype": dtype, "batch": batch, "setting": setting, "kernel_ms": kernel_s * 1e3,
            "torch_ms": torch_s * 1e3, "copy_ms": copy_s * 1e3, "MB": moved / 1e6, "kernel_GBps": moved / kernel_s / 1e9,
            "copy_GBps": moved / copy_s / 1e9, "kernel_over_copy": copy_s / kernel_s}


def graphs_case(vocab: int, batch: int, device: str, calls: int) -> dict:
    rl, base = random_rows(batch, vocab, device, torch.float32, seed=vocab + batch)
    settings, _ = case_settings(batch, SETTINGS["paper"], device, mixed=False)
    out = torch.empty((batch, vocab), device=device)

    def call():
        triton_combine.combine(rl, base, settings, want_delta=True, out=out)

    eager_s = loop_seconds(call, device, calls)
    graph_s = loop_seconds(cuda_graph(call), device, calls) if device == "cuda" else None
    return {"vocab": vocab, "batch": batch, "eager_us": eager_s * 1e6,
            "graph_us": graph_s * 1e6 if graph_s is not None else None,
            "graph_over_eager": graph_s / eager_s if graph_s is not None else None}


def run_section(section: str, grid: Grid, device: str, budget: Budget, out_dir: Path,
                jobs: ReferenceJobs | None = None) -> tuple[Path, dict]:
    """Runs one section, writing its JSON after each record; returns the path and the results.
    The correctness section sends its float64 rows to `jobs`, to be collected later."""
    results = {**machine(device), "section": section, "stopped_early": False, "records": []}
    path = out_dir / f"kernel_{section}.json"
    write_json(path, results)
    shapes = [(v, d, b, s) for v in grid.vocabs for d in DTYPES for b in grid.batches for s in SETTINGS]
    if section == "graphs":
        shapes = [(v, "float32", b, "paper") for v in grid.vocabs for b in grid.batches]
    for vocab, dtype, batch, setting in shapes:
        if budget.spent():
            results["stopped_early"] = True
            break
        if section == "correctness":
            record = check_case(vocab, dtype, batch, setting, device, grid, jobs)
        elif section == "cost":
            record = cost_case(vocab, dtype, batch, setting, device, grid.repeats)
        else:
            record = graphs_case(vocab, batch, device, grid.graph_calls)
        results["records"].append(record)
        print(section, record, flush=True)
        write_json(path, results)
    return path, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for kernel_<section>.json")
    parser.add_argument("--sections", default="correctness,cost,graphs")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--until", type=float, help="deadline, seconds since the epoch: stop cleanly after it")
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    grid = SMALL if args.small else FULL
    budget = Budget(args.until)
    sections = args.sections.split(",")
    # The float64 rows are computed on CPU workers while the GPU goes on (the cost section too).
    jobs = ReferenceJobs(max(1, multiprocessing.cpu_count() - 4)) if "correctness" in sections else None
    written = [run_section(section, grid, device, budget, Path(args.out), jobs) for section in sections]
    if jobs is not None:
        jobs.collect(budget)
        write_json(*written[sections.index("correctness")])
    if not all(r.get("ok", True) for _, results in written for r in results["records"]):
        print("kernel mismatch: see kernel_correctness.json", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
