"""Per-request extrapolation counts shared between the engine and the API server.

A float64 table in a memory-mapped file (under /dev/shm where it exists), one row per slot.
`rlvrx serve` creates it and names it to the engine processes through `RLVRX_STATS_FILE`
(the engine writes to no other file). The API server gives each admitted request one slot
(all its choices share it), carried in `extra_args` with the admission token (`admit`), and
reads the slot when the response is complete; the logits processor of the sampling rank writes each step's
extrapolation probability M for the row's output position before the token is sampled, so
the figure is final by the time the last token reaches the API server. (On a GPU the values
reach the host without blocking the engine, a moment later: the table counts the engine's
submitted and finished writes, and the API server waits, when a response ends, until what was
submitted by then is written — `server.engine.host_reads`.)

Only kept tokens count: a row is sampled several times for one position when a long prompt
is prefilled in chunks (every chunk but the last is thrown away) or when a preempted
request is recomputed; the processor then writes the difference to what it wrote for that
position before. Steps the engine runs after the API server has decided to stop (a stop
string, async scheduling's extra step) write positions at or past the response's length: each
row keeps its last RING positions, which the reader subtracts.
"""

import collections
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

SLOT_KEY = "_rlvrx_stats_slot"
ADMISSION_KEY = "_rlvrx_admission"
PRIVATE_PREFIX = "_rlvrx"
ENV = "RLVRX_STATS_FILE"
SLOTS = 1 << 14  # requests in flight at once
RING = 32  # positions of each slot kept past the response's end: the steps a stop may take to reach the engine
TOTAL, LAST = 0, 1  # columns: the sum over positions, the highest position written (-1: none)
WIDTH = 2 + RING
SUBMITTED, DONE = 0, 1  # columns of the header row (after the slots): the engine's deferred writes

# Proof that extra_args came from this API server's admission: the engine process's
# validate_params checks it (same process) before the request leaves for the engine.
ADMISSION_TOKEN = secrets.token_hex(16)


class StatsTable:
    def __init__(self, path: str, create: bool = False):
        self.path = path
        mode = "w+" if create else "r+"
        self.table = np.memmap(path, dtype=np.float64, mode=mode, shape=(SLOTS + 1, WIDTH))
        self.header = self.table[SLOTS]
        if create:
            self.table[:SLOTS, LAST] = -1.0
        self.free: collections.deque[int] = collections.deque(range(SLOTS))

    @classmethod
    def create(cls) -> "StatsTable":
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="rlvrx-stats-", suffix=".f64", dir=folder)
        os.close(fd)
        return cls(path, create=True)

    # --- API server: allocation and reading -------------------------------------------------

    def allocate(self) -> int | None:
        """A zeroed slot, or None when too many requests are in flight. Freed slots queue
        at the back, so a late write from an aborted request lands in a slot that stays
        unused the longest."""
        if not self.free:
            return None
        slot = self.free.popleft()
        self.table[slot, :] = 0.0
        self.table[slot, LAST] = -1.0
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def kept(self, slot: int, tokens: int, choices: int = 1) -> float:
        """Extrapolated positions of a response of `tokens` generated tokens. With one choice,
        positions at or past `tokens` (steps the engine ran after the stop) are left out; the
        lengths of several choices are not known apart, so there every written position counts."""
        row = self.table[slot]
        last = int(row[LAST])
        if choices != 1 or last < tokens or last - tokens >= RING:
            return float(row[TOTAL])
        return float(row[TOTAL] - sum(row[2 + p % RING] for p in range(tokens, last + 1)))

    def submitted(self) -> float:
        return float(self.header[SUBMITTED])

    def written_since(self, submitted: float) -> bool:
        """The engine has written everything it had submitted when `submitted()` was read."""
        return self.header[DONE] >= submitted

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)

    # --- engine: writing --------------------------------------------------------------------

    def mark_submitted(self) -> None:
        self.header[SUBMITTED] += 1

    def mark_done(self) -> None:
        self.header[DONE] += 1

    def add(self, slot: int, position: int, value: float) -> None:
        """Add `value` to the slot's output position `position` (a difference when the
        position was written before)."""
        row = self.table[slot]
        last = int(row[LAST])
        if position > last:
            for p in range(max(last + 1, position - RING + 1), position + 1):
                row[2 + p % RING] = 0.0
            row[LAST] = position
            last = position
        if last - position < RING:
            row[2 + position % RING] += value
        row[TOTAL] += value


def admit(slot: int) -> dict[str, object]:
    """The extra_args entries that give a request its slot."""
    return {SLOT_KEY: slot, ADMISSION_KEY: ADMISSION_TOKEN}
