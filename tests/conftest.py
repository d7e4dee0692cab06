"""Shared fixtures: tiny model pairs built at test time, and an offline-engine runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton's interpreter is chosen when Triton is first imported (its own jit helpers, tl.zeros
# among them, are decorated then) and must stay chosen in this process: tests/test_triton.py
# runs the fused kernel on CPU tensors through it. Engines and servers started by the tests
# run without it (child_env).
os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"  # the in-process server's key; clients of both servers send it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def no_served_adapters_leak():
    """`pair.engine_kwargs` tells this process which adapters requests may name (a process-wide
    setting, as in the server); a test that calls it must not change what later tests admit."""
    from rlvrx.server.engine import settings

    served = settings.served_adapters()
    yield
    settings.set_served_adapters(served)


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{"qwen2": (base, rl), "llama": (base, rl)}: tiny random pairs, RL = base + noise."""
    from rlvrx.server.toy_pair import build_pair

    root = tmp_path_factory.mktemp("pairs")
    return {family: build_pair(root / family, family=family, seed=i) for i, family in enumerate(("qwen2", "llama"))}


@pytest.fixture(scope="session")
def hf_models(toy_pairs):
    """{family: (rl, base)} as float64 transformers models: the reference forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    return {
        family: tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (rl, base))
        for family, (base, rl) in toy_pairs.items()
    }


def ref_settings(gamma, tau, generator, candidates, temperature=0.0, top_p=1.0, selection="delta_logp"):
    """The float64 reference's settings for request values (τ = None means +inf)."""
    import math

    from rlvrx.kernels import reference

    return reference.Settings(gamma=gamma, tau=math.inf if tau is None else tau, generator=generator,
                              candidates=candidates, temperature=temperature, top_p=top_p, selection=selection)


def next_logits(models, ids):
    """Float64 next-token logits of (rl, base) after the token ids `ids`."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        return tuple(m(x).logits[0, -1].numpy() for m in models)


def run_engine(spec: dict, tmp_path: Path, log: list | None = None) -> list:
    """Run tests/engine_runner.py on `spec` in a fresh process; return its results (and append
    its output, vLLM's log included, to `log` when given)."""
    spec_file = tmp_path / f"spec-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    spec_file.write_text(json.dumps(spec, default=str))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_runner.py"), str(spec_file)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine runner failed:\n{proc.stderr[-6000:]}")
    if log is not None:
        log.append(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that runs vLLM: ours, less the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pair, log_path: Path, extra_env: dict | None = None, extra_args: tuple = (),
                 new_session: bool = False):
    """Start `rlvrx serve` on a toy pair (None: the models are in `extra_args`; in a process group of
    its own with `new_session`); return (process, base_url) once /health answers."""
    import time
    import urllib.request

    models = ["--rl", str(pair[1]), "--base", str(pair[0]), "--served-model-name", "toy"] if pair else []
    port = free_port()
    log = log_path.open("w")
    env = child_env(VLLM_CPU_KVCACHE_SPACE="1", **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlvrx.server.cli", "serve", *models, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "512", "--seed", "0", "--max-num-seqs", "32", *extra_args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError("server did not start:\n" + log_path.read_text()[-5000:])
            time.sleep(1)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def live_server(toy_pairs, tmp_path_factory):
    """`rlvrx serve` on the Qwen2 toy pair, engine in its own process (the default).

    Yields (base_url, served_name, (base_path, rl_path)).
    """
    proc, url = start_server(toy_pairs["qwen2"], tmp_path_factory.mktemp("server") / "server.log")
    yield url, "toy", toy_pairs["qwen2"]
    stop_server(proc)


@pytest.fixture(scope="session")
def live_server_inprocess(toy_pairs, tmp_path_factory):
    """The same, with the engine inside the API server's process, and an API key (API_KEY)."""
    proc, url = start_server(toy_pairs["qwen2"], tmp_path_factory.mktemp("server") / "server.log",
                             {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_API_KEY": API_KEY})
    yield url, "toy", toy_pairs["qwen2"]
    stop_server(proc)
