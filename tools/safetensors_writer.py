"""A safetensors file written one tensor at a time, without holding the tensors in memory.

safetensors' writer takes every tensor at once (its header, which comes first, lists them all).
Here each tensor's bytes go to a spool file beside the target as soon as it is added; `close`
memory-maps the spool and hands safetensors' own `serialize_file` pointers into it, so the file
is laid out and checked by safetensors while RAM holds none of it (the spool's pages are the page
cache's). The spool costs the file's size on disk until `close` removes it.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors import TensorSpec, serialize_file


class SafetensorsWriter:
    """`add` tensors, then `close` to write `path` (nothing is written when none was added);
    as a context manager, an exception discards the spool and writes nothing."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path, self.metadata = Path(path), metadata
        self.spool_path = self.path.with_name(f".{self.path.name}.spool")
        self.spool = self.spool_path.open("wb")
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name → dtype, shape, offset, bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.entries[name] = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), self.spool.tell(),
                              data.nbytes)
        data.tofile(self.spool)

    def close(self) -> None:
        self.spool.close()
        try:
            if self.entries:
                spooled = np.memmap(self.spool_path, dtype=np.uint8, mode="r")
                start = spooled.ctypes.data
                specs = {name: TensorSpec(dtype=dtype, shape=shape, data_ptr=start + offset, data_len=size)
                         for name, (dtype, shape, offset, size) in self.entries.items()}
                serialize_file(specs, str(self.path), metadata=self.metadata)
                del spooled
        finally:
            self.spool_path.unlink(missing_ok=True)

    def discard(self) -> None:
        self.spool.close()
        self.spool_path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
