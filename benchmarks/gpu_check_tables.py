"""The GPU check's JSON (benchmarks/gpu_check.sh) as the markdown tables of benchmarks/RESULTS.md.

    python benchmarks/gpu_check_tables.py DIR        # the tables of DIR/*.json
    python benchmarks/gpu_check_tables.py --empty    # the same tables, not yet measured
"""

import argparse
import json
import textwrap
from pathlib import Path


def num(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def reference_rows(r: dict) -> str:
    ref = r["vs_reference"]
    unfinished = f", {ref['unfinished']} unfinished" if ref["unfinished"] else ""
    return f"{ref['greedy_rows']} / {ref['sampled_rows']}{unfinished}"


def reference_error(r: dict, key: str) -> str:
    ref = r["vs_reference"]
    return num(ref[key], ".1e") if ref["greedy_rows"] + ref["sampled_rows"] else "–"


# (title, file, note, columns: (header, value of a record))
TABLES = [
    ("Kernel correctness on CUDA", "kernel_correctness.json",
     "q, M and Δ: largest absolute difference over the batch's rows (sampled rows for q); greedy picks: the "
     "other path's pick holds the kernel row's maximum; float64 reference rows: greedy / sampled checked "
     "(sampled ones at V = 32,000 only: the reference's top-p is O(V²)). Tolerance 1e-4.",
     [("V", lambda r: f"{r['vocab']:,}"), ("logits", lambda r: r["dtype"]), ("batch", lambda r: r["batch"]),
      ("setting", lambda r: r["setting"]), ("greedy rows", lambda r: r["greedy_rows"]),
      ("q vs PyTorch", lambda r: num(r["vs_torch"]["max_q_error"], ".1e")),
      ("M vs PyTorch", lambda r: num(r["vs_torch"]["max_M_error"], ".1e")),
      ("Δ vs PyTorch", lambda r: num(r["vs_torch"]["max_delta_error"], ".1e")),
      ("greedy picks", lambda r: "agree" if r["vs_torch"]["greedy_agree"] and r["vs_reference"]["greedy_agree"]
       else "DIFFER"),
      ("float64 rows", reference_rows), ("q vs float64", lambda r: reference_error(r, "max_q_error")),
      ("M vs float64", lambda r: reference_error(r, "max_M_error")),
      ("all written", lambda r: "yes" if r["all_written"] else "NO"), ("ok", lambda r: "ok" if r["ok"] else "FAIL")]),
    ("Kernel cost against a copy", "kernel_cost.json",
     "Every row sampled, Δ written, L2 flushed before each call; median of 20 calls. MB: what the kernel must "
     "move at the least (both rows read, output and Δ written once); the copy moves as many bytes (half read, "
     "half written); kernel / copy: the kernel's bandwidth as a fraction of the copy's.",
     [("V", lambda r: f"{r['vocab']:,}"), ("logits", lambda r: r["dtype"]), ("batch", lambda r: r["batch"]),
      ("setting", lambda r: r["setting"]), ("kernel ms", lambda r: num(r["kernel_ms"], ".4f")),
      ("PyTorch ms", lambda r: num(r["torch_ms"], ".3f")), ("copy ms", lambda r: num(r["copy_ms"], ".4f")),
      ("MB", lambda r: num(r["MB"], ".1f")), ("kernel GB/s", lambda r: num(r["kernel_GBps"], ".0f")),
      ("copy GB/s", lambda r: num(r["copy_GBps"], ".0f")), ("kernel / copy", lambda r: num(r["kernel_over_copy"], ".2f"))]),
    ("A 7B-shaped decode step and the combine's share", "decode_step.json",
     "Qwen2.5-7B shape, random bf16 weights, 2,048 tokens of KV cache per row; step: CUDA-graph replay (eager "
     "beside it); combine: the fused kernel on [batch, 152,064] fp32 rows, paper setting, Δ written; share: of "
     "an extrapolated step (the pair's step plus the combine).",
     [("batch", lambda r: r["batch"]), ("step ms", lambda r: num(r["single"]["graph_ms"], ".2f")),
      ("step ms, eager", lambda r: num(r["single"]["eager_ms"], ".2f")),
      ("combine ms", lambda r: num(r["combine_ms"], ".3f")),
      ("combine / step", lambda r: num(r["combine_over_single_step"], ".3f")),
      ("share, two backbones", lambda r: num(r["combine_share"]["two_backbones"], ".3f")),
      ("share, stacked", lambda r: num(r["combine_share"]["stacked"], ".3f"))]),
    ("Stacked LoRA step against two backbones, beside issue 10's roofline", "decode_step.json",
     "ms: CUDA-graph replays. Stacked: 2·batch rows through one set of weights, a rank-32 delta on half of them "
     "(all 7 projections). Roofline: bytes read per step at the least — single W + B·L·kv, two backbones "
     "2W + 2·B·L·kv, stacked W + A + 2·B·L·kv — and their time at the copy bandwidth measured in the same run.",
     [("batch", lambda r: r["batch"]), ("single ms", lambda r: num(r["single"]["ms"], ".2f")),
      ("two backbones ms", lambda r: num(r["two_backbones"]["ms"], ".2f")),
      ("stacked ms", lambda r: num(r["stacked"]["ms"], ".2f")),
      ("stacked, no LoRA ms", lambda r: num(r["stacked_no_lora"]["ms"], ".2f")),
      ("stacked / two, measured", lambda r: num(r["measured_stacked_over_two_backbones"], ".2f")),
      ("stacked / two, roofline", lambda r: num(r["roofline"]["stacked_over_two_backbones"], ".2f")),
      ("stacked / single, measured", lambda r: num(r["measured_stacked_over_single"], ".2f")),
      ("stacked / single, roofline", lambda r: num(r["roofline"]["stacked_over_single"], ".2f")),
      ("GB read: single / two / stacked", lambda r: " / ".join(num(v, ".1f") for v in r["roofline"]["GB"].values())),
      ("floor ms: single / two / stacked",
       lambda r: " / ".join(num(v, ".2f") for v in r["roofline"]["floor_ms"].values()))]),
    ("The kernel under CUDA graphs", "kernel_graphs.json",
     "fp32, paper setting, Δ written; time per call of 100 back-to-back calls (inputs warm in L2), launched one "
     "by one and as replays of a graph captured once.",
     [("V", lambda r: f"{r['vocab']:,}"), ("batch", lambda r: r["batch"]),
      ("eager µs / call", lambda r: num(r["eager_us"], ".1f")), ("graph µs / call", lambda r: num(r["graph_us"], ".1f")),
      ("graph / eager", lambda r: num(r["graph_over_eager"], ".2f"))]),
]


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(directory: Path | None) -> str:
    """Every table of TABLES; from the JSON in `directory`, or marked not yet measured (None)."""
    parts = []
    for title, file, note, columns in TABLES:
        path = directory / file if directory else None
        rows = [["–"] * len(columns)]
        if path is None:
            where = "not yet measured"
        elif not path.exists():
            where = f"no {file}: this part did not run"
        else:
            results = json.loads(path.read_text())
            stopped = " — stopped early by the time budget" if results["stopped_early"] else ""
            where = f"{results['device']}, torch {results['torch']}, Triton {results['triton']}, {results['date']}{stopped}"
            rows = [[value(r) for _, value in columns] for r in results["records"]]
        table = markdown([header for header, _ in columns], rows)
        parts.append(f"#### {title}\n\n{textwrap.fill(note, 100)}\n\n_{where}_\n\n{table}")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, help="the GPU check's output directory")
    parser.add_argument("--empty", action="store_true", help="the tables with no figures")
    args = parser.parse_args()
    if not args.empty and args.directory is None:
        parser.error("give the output directory, or --empty")
    print(render(None if args.empty else args.directory))


if __name__ == "__main__":
    main()
