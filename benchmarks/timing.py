"""Timers, CUDA-graph capture, the time budget and the JSON output shared by the GPU check's
scripts (benchmarks/gpu_check.sh: kernel_check.py, decode_step_bench.py).

On a GPU every time comes from CUDA events; on the CPU (the `--small` smoke runs) from the
wall clock. Each script writes its JSON after every record, so a run stopped by the budget, or
killed, still leaves what it measured.
"""

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 * 2**20  # several times the H200's 60 MB L2


def median_seconds(fn, device: str, repeats: int, flush_l2: bool = False) -> float:
    """Median seconds of one call of fn() over `repeats` calls, after one warm-up call.

    With `flush_l2` a 256 MB buffer is overwritten before each call, so inputs smaller than
    the GPU's L2 are read from memory, as they would be in a decode step, not from the cache."""
    fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 and device == "cuda" else None
    times = []
    for _ in range(repeats):
        if device == "cuda":
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def loop_seconds(fn, device: str, calls: int) -> float:
    """Seconds per call of `calls` back-to-back calls (launch gaps included), after one warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def cuda_graph(fn):
    """fn captured once in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Budget:
    """Wall-clock deadline of a run (seconds since the epoch; None: none)."""

    def __init__(self, until: float | None):
        self.until = until

    def spent(self) -> bool:
        return self.until is not None and time.time() >= self.until


def machine(device: str) -> dict:
    """What ran: the device, the library versions, the date."""
    import triton

    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_json(path: str | Path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)  # a reader (or a kill) never sees half a file
