"""Device values the processor's bookkeeping needs on the host (M for the stats table, Δlog p
for the histogram), read without making the engine wait for its device.

On a GPU, `submit` starts non-blocking copies into pinned memory behind the step's kernels on
the current stream, records an event, and hands the work to one worker thread, which waits for
the event and then runs it: the engine's own thread never synchronizes with the device for
them, so the sampler's launch is not held up. On the CPU the values are on the host already and
the work runs at once. `on_submit`/`on_done` let the stats table count deferred work, so that
the API server can wait, when a response ends, for what the engine had submitted by then.
"""

import logging
import queue
import threading
from collections.abc import Callable

import torch

Work = Callable[[list[list]], None]  # receives each submitted tensor as (nested) Python lists
logger = logging.getLogger(__name__)


def start_copies(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
    """Non-blocking device-to-host copies of `tensors`, and the event that marks them done."""
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without a blocking copy on a GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


class HostReads:
    def __init__(self, deferred: bool, on_submit: Callable[[], None] = lambda: None,
                 on_done: Callable[[], None] = lambda: None):
        self.deferred = deferred  # device tensors: copy without blocking and work in the thread
        self.on_submit, self.on_done = on_submit, on_done
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def submit(self, tensors: list[torch.Tensor], work: Work) -> None:
        if not self.deferred:
            work([t.tolist() for t in tensors])
            return
        self.on_submit()
        host, ready = start_copies(tensors)
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="rlvrx-host-reads", daemon=True)
            self.thread.start()
        self.queue.put((ready, host, work))

    def run(self) -> None:
        while True:
            ready, host, work = self.queue.get()
            try:
                ready.synchronize()
                work([t.tolist() for t in host])
            except Exception:  # noqa: BLE001 - bookkeeping must never stop the thread (or the engine)
                logger.exception("rlvrx: extrapolation bookkeeping failed")
            finally:
                self.on_done()
