"""Adapters loaded into and unloaded from a running stacked engine, on every worker.

With `VLLM_ALLOW_RUNTIME_LORA_UPDATING` the stacked model holds `--max-loras` adapter slots of rank
`--max-lora-rank` on every projection (server.engine.stacked.Capacity). The API server
(server.api.adapters) checks an adapter, picks its slot and calls these worker methods through vLLM's
`collective_rpc`, which the engine core runs between two steps, on every tensor-parallel rank.
"""

from rlvrx.server.engine.adapter import read_adapter
from rlvrx.server.engine.adapter_rows import ROWS

LOAD, UNLOAD = "rlvrx_load_adapter", "rlvrx_unload_adapter"


def lora_layers(worker) -> list:
    from rlvrx.server.engine.stacked import LoraDelta

    return [m for m in worker.get_model().modules() if isinstance(m, LoraDelta)]


def load_adapter(worker, name: str, path: str, slot: int) -> None:
    """Put the adapter in `path` in `slot` of every LoRA layer and route `name`'s rows to it."""
    adapter = read_adapter(path, worker.get_model().config.to_dict())
    for layer in lora_layers(worker):
        layer.load(slot, adapter)
    ROWS.slots[name] = slot


def unload_adapter(worker, name: str, slot: int) -> None:
    ROWS.slots.pop(name, None)
    for layer in lora_layers(worker):
        layer.load(slot, None)


def install() -> None:
    """Make the two methods callable by name on every vLLM worker."""
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, LOAD, load_adapter)
    setattr(WorkerBase, UNLOAD, unload_adapter)
