"""Per-request extrapolation counters shared between the engine and the API server.

A small float64 table in a memory-mapped file (under /dev/shm where it exists). The
API server creates it, gives each request a slot (carried in `extra_args`), and reads
the slot when the response is complete; the logits processor adds each step's
extrapolation probability to the slot before the token is sampled, so the value is
final by the time the last token reaches the API server. Works whether the engine
runs in the API server's process or in its own.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

FILE_KEY = "_rlvrx_stats_file"
SLOT_KEY = "_rlvrx_stats_slot"


class StatsTable:
    def __init__(self, path: str, create_slots: int | None = None):
        self.path = path
        if create_slots is not None:
            self.table = np.memmap(path, dtype=np.float64, mode="w+", shape=(create_slots,))
        else:
            self.table = np.memmap(path, dtype=np.float64, mode="r+")
        self.next_slot = 0

    @classmethod
    def create(cls, slots: int = 1 << 16) -> "StatsTable":
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="rlvrx-stats-", suffix=".f64", dir=folder)
        os.close(fd)
        return cls(path, create_slots=slots)

    def allocate(self) -> int:
        """A fresh slot, zeroed. Slots are reused round-robin, so a late write from an
        aborted request lands in a slot that no live request holds."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.table)
        self.table[slot] = 0.0
        return slot

    def add(self, slots: list[int], values: list[float]) -> None:
        np.add.at(self.table, slots, values)

    def read(self, slot: int) -> float:
        return float(self.table[slot])

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)
