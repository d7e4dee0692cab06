"""Shutdown: SIGTERM to the server's process or to its whole process group (systemd's
KillMode=control-group, `kill -- -PGID`), idle or with a stream in flight; an engine that dies
while the server drains. vLLM's own signal handlers in the engine core and the workers, as
server.engine.signals changes them."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import psutil
import pytest

from benchmarks.overload import stream_completion
from rlvrx.server.engine import signals
from tests.conftest import start_server

STREAM = {"model": "toy", "prompt": "hi", "max_tokens": 450, "ignore_eos": True}
# From the last request's end to the server's exit: the engine core's ENGINE_EXIT_S grace
# (server.api.drain), the API server's own teardown, and room for a busy machine. Before the fix,
# exits took 7-27 s, and now and then the whole 120 s drain timeout.
EXIT_S = 15
GROUP_GONE_S = 30  # the engine core and its workers, after the API server has exited


def vllm_handler(function, name: str, cells: dict) -> types.FunctionType:
    """vLLM's own signal handler, the closure `name` defined in `function`, built from vLLM's code
    with the given values for the variables it reads from `function`."""
    code = next(c for c in function.__code__.co_consts if isinstance(c, types.CodeType) and c.co_qualname == name)
    closure = tuple(types.CellType(cells[var]) for var in code.co_freevars)
    return types.FunctionType(code, function.__globals__, code.co_name, None, closure)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_inside_the_engine_cores_handler_does_not_run_it_again(restore_signals, second):
    """vLLM's engine-core handler ends by setting a threading.Event (its SignalCallback). When the
    API server's SIGTERM landed while that held the Event's lock, the handler ran again, nested,
    and waited for the lock forever: here the lock is held, and a second signal raised inside it
    (a SIGINT after a SIGTERM too: Ctrl-C)."""
    from vllm.v1.engine.core import EngineCoreProc

    lock, triggers, stuck = threading.Lock(), [], []

    class Callback:  # SignalCallback.trigger: Event.set() holds a Lock the whole call
        def trigger(self):
            if not lock.acquire(timeout=2):
                stuck.append(True)
                return
            try:
                triggers.append(True)
                if len(triggers) == 1:
                    signal.raise_signal(second)  # the API server's SIGTERM lands now (and is handled)
            finally:
                lock.release()

    handler = vllm_handler(EngineCoreProc.run_engine_core, signals.ENGINE_CORE_HANDLER,
                           {"shutdown_requested": False, "engine_core": None, "signal_callback": Callback()})
    for sig in signals.SIGNALS:  # as vLLM installs it
        signal.signal(sig, handler)
    signals.install()
    assert all(signal.getsignal(sig).__wrapped__ is handler for sig in signals.SIGNALS)
    signal.raise_signal(signal.SIGTERM)  # the group's
    assert triggers == [True] and not stuck


def test_workers_leave_a_signal_to_their_engine_core(restore_signals):
    from vllm.v1.executor.multiproc_executor import WorkerProc

    handler = vllm_handler(WorkerProc.worker_main, signals.WORKER_HANDLER, {"shutdown_requested": threading.Event()})
    for sig in signals.SIGNALS:
        signal.signal(sig, handler)
    signals.install()
    for sig in signals.SIGNALS:
        try:
            signal.raise_signal(sig)
        except SystemExit:  # what vLLM's handler does: the worker dies under the requests in flight
            pytest.fail(f"a worker still exits on {signal.Signals(sig).name}")
        assert signal.getsignal(sig) is not signal.SIG_IGN  # which the worker's children would inherit


# An engine core whose start-up failed exits through multiprocessing's exit, which terminates its
# daemonic children and joins them: a worker that leaves SIGTERM to its engine core must be killed.
FAILED_ENGINE_CORE = """
import multiprocessing, signal, sys, time
from multiprocessing import util
from rlvrx.server.engine import signals

def worker(ready):
    signal.signal(signal.SIGTERM, signals.ignore)
    ready.set()
    time.sleep(600)

def engine_core_handler(signum, frame):
    pass

engine_core_handler.__qualname__ = signals.ENGINE_CORE_HANDLER
context = multiprocessing.get_context("fork")
ready = context.Event()
context.Process(target=worker, args=(ready,), daemon=True).start()
ready.wait()
signal.signal(signal.SIGTERM, engine_core_handler)
signals.install()
util._exit_function()
print("exited")
"""


def test_an_engine_core_that_exits_without_stopping_its_workers_does_not_wait_for_them():
    proc = subprocess.run([sys.executable, "-c", FAILED_ENGINE_CORE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "exited", proc.stderr


def test_other_handlers_are_left_alone(restore_signals):
    def handler(signum, frame):
        pass

    signal.signal(signal.SIGTERM, handler)
    signals.install()
    assert signal.getsignal(signal.SIGTERM) is handler


def group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the process group `pgid` has exited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stream_in_background(url: str) -> tuple[threading.Thread, dict]:
    """Start STREAM in a thread; return once its first token has arrived."""
    result, started = {}, threading.Event()
    thread = threading.Thread(target=lambda: result.update(stream_completion(url, STREAM, started=started)))
    thread.start()
    assert started.wait(timeout=120)
    return thread, result


def health_status(url: str) -> int:
    try:
        return urllib.request.urlopen(url + "/health", timeout=5).status
    except urllib.error.HTTPError as error:
        return error.code


def check_refuses_while_draining(url: str) -> None:
    """New requests and /health get an OpenAI-format 503 with Retry-After."""
    deadline = time.monotonic() + 30
    while health_status(url) == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health_status(url) == 503
    refused = urllib.request.Request(url + "/v1/completions", headers={"content-type": "application/json"},
                                     data=json.dumps({"model": "toy", "prompt": "hi", "max_tokens": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(refused, timeout=30)
    assert error.value.code == 503 and int(error.value.headers["retry-after"]) > 0
    body = json.loads(error.value.read())["error"]
    assert body["message"] and body["type"] == "ServiceUnavailableError"
    assert body["param"] is None and body["code"] == 503


@pytest.mark.parametrize("in_flight", [True, False], ids=["stream", "idle"])
@pytest.mark.parametrize("to_group", [True, False], ids=["group", "process"])
def test_sigterm_drains_then_exits_within_seconds(toy_pairs, tmp_path, to_group, in_flight):
    """Whichever processes get the signal: while the server drains, new requests and /health get a
    503; a stream in flight completes; the server exits 0 within seconds of the last request and
    stops listening, and the engine core and its workers are gone soon after."""
    proc, url = start_server(toy_pairs["qwen2"], tmp_path / "server.log", new_session=True)
    try:
        if in_flight:
            thread, result = stream_in_background(url)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        last = time.monotonic()
        if in_flight:
            check_refuses_while_draining(url)
            assert thread.is_alive()  # the drain is still under way
            thread.join(timeout=180)
            assert result["done"] and result["tokens"] == 450 and result["finish_reason"] == "length"
            assert result["error"] is None
            last = time.monotonic()
        assert proc.wait(timeout=180) == 0
        assert time.monotonic() - last < EXIT_S, (tmp_path / "server.log").read_text()[-3000:]
        with pytest.raises(OSError):  # no longer accepting
            urllib.request.urlopen(url + "/health", timeout=5)
        assert group_gone(proc.pid, GROUP_GONE_S)
    finally:
        kill_group(proc.pid)


def test_an_engine_that_dies_while_the_server_drains_fails_the_stream_and_the_server_exits(toy_pairs, tmp_path):
    proc, url = start_server(toy_pairs["qwen2"], tmp_path / "server.log", new_session=True)
    try:
        thread, result = stream_in_background(url)
        proc.send_signal(signal.SIGTERM)
        engine = next(p for p in psutil.Process(proc.pid).children() if "EngineCor" in p.name())
        engine.kill()
        killed = time.monotonic()
        thread.join(timeout=60)
        assert not thread.is_alive() and time.monotonic() - killed < EXIT_S
        assert result["error"] and result["finish_reason"] != "length"
        proc.wait(timeout=60)
        assert time.monotonic() - killed < EXIT_S
        assert group_gone(proc.pid, GROUP_GONE_S)
    finally:
        kill_group(proc.pid)
