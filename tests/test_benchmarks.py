"""The benchmark scripts run end to end (shrunk): the GPU check under the Triton interpreter."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_combine_bench_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/combine_bench.py", "--device", "cpu", "--small", "--kernel", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["check"] and all(c["greedy_argmax_equal"] for c in results["check"])
    assert len(results["rows"]) == 2
    for row in results["rows"]:
        assert row["torch_ms"] > 0 and row["kernel_ms"] > 0 and row["decode_ms"] > 0
