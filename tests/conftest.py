"""Shared fixtures: tiny model pairs built at test time, and an offline-engine runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{"qwen2": (base, rl), "llama": (base, rl)}: tiny random pairs, RL = base + noise."""
    from server.toy_pair import build_pair

    root = tmp_path_factory.mktemp("pairs")
    return {family: build_pair(root / family, family=family, seed=i) for i, family in enumerate(("qwen2", "llama"))}


def run_engine(spec: dict, tmp_path: Path) -> list:
    """Run tests/engine_runner.py on `spec` in a fresh process; return its results."""
    spec_file = tmp_path / f"spec-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    spec_file.write_text(json.dumps(spec, default=str))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_runner.py"), str(spec_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine runner failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
