"""SIGTERM and SIGINT in vLLM's engine-core and worker processes.

A signal sent to the server's whole process group (systemd's default KillMode=control-group,
`kill -- -PGID`, Ctrl-C in a terminal) reaches the API server, the engine core and every
worker at once. vLLM 0.32 installs its own handlers in the engine core
(`EngineCoreProc.run_engine_core`) and in the workers (`WorkerProc.worker_main`); the general
plugin calls `install` in each vLLM process after they are in place, and this module changes
them, because:

- The engine core's handler logs, then sets a `threading.Event`. The API server sends the
  engine core a SIGTERM of its own moments after the group's (`CoreEngineProcManager.shutdown`);
  when that one lands while the first handler holds the Event's lock, Python runs the handler
  again, nested, on the same thread, and it waits for that lock forever. The engine core then
  neither drains nor exits, and the API server waits out the whole `--shutdown-timeout` before
  it kills it (seen on a busy machine: one group signal in three to eight). Here only the first
  signal runs vLLM's handler (which does nothing more for later ones anyway).
- A worker's handler raises SystemExit, so a group signal kills the workers under the requests
  in flight, which then fail although the API server and the engine core would drain them. Here
  the workers ignore both signals: the engine core stops its workers itself once it has drained
  (it closes their death pipes, and kills what is left after a grace period), and a worker whose
  engine core is gone exits through the same pipe. An engine core that exits without stopping its
  workers (its start-up failed) would then wait for them forever: multiprocessing's exit
  terminates daemonic children, which a worker no longer obeys, then joins them. So the engine
  core kills what is left of its workers as its exit begins (`kill_workers`).
"""

import multiprocessing
import signal
from collections.abc import Callable
from multiprocessing import util

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ENGINE_CORE_HANDLER = "EngineCoreProc.run_engine_core.<locals>.signal_handler"
WORKER_HANDLER = "WorkerProc.worker_main.<locals>.signal_handler"


def first_only(handler: Callable) -> Callable:
    """`handler`, run for the first signal only: a later one, nested in it or not, returns at once."""
    fired = False

    def once(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            handler(signum, frame)

    once.__wrapped__ = handler
    return once


def ignore(signum, frame) -> None:
    """A worker's SIGTERM or SIGINT: nothing. (A handler rather than SIG_IGN, which the processes
    a worker starts, compilers among them, would inherit.)"""


def kill_workers() -> None:
    """Kill this process's daemonic children still alive (its workers, which leave SIGTERM to it)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def install() -> None:
    """Adjust vLLM's handlers where this process has them (called in every vLLM process, on the
    thread that loads the plugins: the main thread in the engine core and in the workers). vLLM
    installs one handler for both signals; one wrapper stands for it, so that a SIGINT inside a
    SIGTERM is dropped too."""
    handler = signal.getsignal(signal.SIGTERM)
    name = getattr(handler, "__qualname__", None)
    if name == ENGINE_CORE_HANDLER:
        replacement = first_only(handler)
        # Run by multiprocessing's exit before it terminates and joins the children (a spawned
        # process exits through it, not through atexit).
        util.Finalize(None, kill_workers, exitpriority=0)
    elif name == WORKER_HANDLER:
        replacement = ignore
    else:
        return
    for sig in SIGNALS:
        if signal.getsignal(sig) is handler:
            signal.signal(sig, replacement)
