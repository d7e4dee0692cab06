"""`vllm bench serve` (benchmarks/vllm_bench_serve.py) drives the live server, per-request
extrapolation fields included."""

import json
import subprocess
import sys

from tests.conftest import ROOT, child_env
from tests.test_metrics import moved, scrape


def test_vllm_bench_serve_runs_against_the_server_with_gamma_and_tau(live_server, tmp_path):
    url, name, (_, rl) = live_server
    before = scrape(url)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vllm_bench_serve.py"), "--base-url", url, "--model", name,
         "--tokenizer", str(rl), "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4",
         "--num-prompts", "6", "--max-concurrency", "3", "--ignore-eos", "--temperature", "1", "--top-p", "0.7",
         "--extra-body", json.dumps({"gamma": 0.5, "tau": None}), "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", "bench.json"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    after = scrape(url)
    assert result["completed"] == 6 and result["total_output_tokens"] == 6 * 4
    label = {"model_name": name, "preset": "extrapolated"}
    assert moved(before, after, "rlvrx:request_gamma_count", **label) == 6
    assert moved(before, after, "rlvrx:request_gamma_sum", **label) == 3.0
    # τ = null: every position of every request is extrapolated.
    assert abs(moved(before, after, "rlvrx:extrapolated_tokens_total", **label) - 6 * 4) < 1e-4
