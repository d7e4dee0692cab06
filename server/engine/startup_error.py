"""Why vLLM failed to start, for the one-line error of `rlvrx serve`.

A failure inside vLLM's engine or worker processes (too little memory for the KV cache, a
model that does not load, ...) reaches the API server only as "Engine core initialization
failed. See root cause above."; the cause itself is logged, with its traceback, by the
process it happened in. `rlvrx serve` names a file in `RLVRX_ENGINE_ERROR_FILE`, and every
vLLM process of the server (through the general plugin) appends to it the first line of the
first exception that it logs as an error. The first line of the file is then the root cause.
"""

import logging
import os

ENV = "RLVRX_ENGINE_ERROR_FILE"


def first_message(exc: BaseException) -> str:
    """One line from an exception: pydantic's first error message, else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return str(errors()[0]["msg"]).removeprefix("Value error, ").splitlines()[0]
        except (IndexError, KeyError, TypeError):
            pass
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class FirstError(logging.Handler):
    """Appends the first logged exception of this process to `path`, then stops."""

    def __init__(self, path: str):
        super().__init__(logging.ERROR)
        self.path = path
        self.done = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.done or not record.exc_info or record.exc_info[1] is None:
            return
        self.done = True
        with open(self.path, "a") as f:
            f.write(first_message(record.exc_info[1]) + "\n")


def record_in_this_process() -> None:
    """Called in every vLLM process: when `rlvrx serve` asked for it, record vLLM's first error."""
    path = os.environ.get(ENV)
    logger = logging.getLogger("vllm")
    if path and not any(isinstance(h, FirstError) for h in logger.handlers):
        logger.addHandler(FirstError(path))


def read(path: str) -> str | None:
    """The first recorded error, if any."""
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except FileNotFoundError:
        return None
