"""A stacked engine's adapters at run time: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

vLLM's own two routes (there under `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, as here) load an adapter into
vLLM's LoRA manager, which a stacked engine does not use; the middleware answers them here instead,
with vLLM's request bodies (`{"lora_name", "lora_path"}`, `{"lora_name"}`) and answers.

Load: the start-up checks (server.engine.pair.check_adapters, with the adapters served now), a rank
within `--max-lora-rank` and a free one of `--max-loras` slots, else a 400 in one line naming the
field; then every worker loads it between two steps (server.engine.adapter_loading) and its three
names are served. Unload: the names stop being served at once (new requests get vLLM's 404), the
requests in flight that use the adapter (as either stream) finish first, then the slot is emptied.
The first adapter is the default of the routes that take no settings and stays.
"""

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from vllm.entrypoints.openai.models.protocol import BaseModelPath

from rlvrx.server.api.errors import error_body, send_json
from rlvrx.server.engine import settings as settings_mod
from rlvrx.server.engine.adapter_loading import LOAD, UNLOAD
from rlvrx.server.engine.pair import PairError, check_adapters

ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
SUFFIXES = ("", ":rl", ":base")
GENERATIONS = itertools.count(1)  # start-up adapters are generation 0 (their key is their name)


class AdapterRequestError(ValueError):
    def __init__(self, message: str, param: str | None, code: int = 400):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class AdapterTable:
    """The adapters served now ({name: directory}, the ApiConfig's own dict), their slots, and the
    requests in flight per adapter."""

    paths: dict[str, str]
    max_loras: int
    max_rank: int
    slots: dict[str, int] = field(default_factory=dict)
    in_flight: Counter = field(default_factory=Counter)
    busy: set[str] = field(default_factory=set)  # names being loaded or unloaded

    def __post_init__(self):
        self.slots = {name: slot for slot, name in enumerate(self.paths)}

    def free_slot(self) -> int | None:
        return next((s for s in range(self.max_loras) if s not in self.slots.values()), None)


def read_body(payload: Any, fields: tuple[str, ...]) -> list[str]:
    if not isinstance(payload, dict):
        raise AdapterRequestError("the request body must be a JSON object", None)
    values = []
    for name in fields:
        value = payload.get(name)
        if not isinstance(value, str) or not value:
            raise AdapterRequestError(f"'{name}' must be a non-empty string", name)
        values.append(value)
    return values


def publish(table: AdapterTable, served_models, base_path: str) -> None:
    """Admission (settings) and vLLM's served names follow the table."""
    served = settings_mod.served_adapters()
    keys = {name: served.keys.get(name, name) for name in table.paths}
    settings_mod.set_served_adapters(replace(served, names=tuple(table.paths), keys=keys))
    others = [m for m in served_models.base_model_paths if m.name.removesuffix(":rl").removesuffix(":base")
              not in served.names]
    served_models.base_model_paths[:] = others + [BaseModelPath(name + suffix, base_path)
                                                  for name in table.paths for suffix in SUFFIXES]


async def load(table: AdapterTable, payload: Any, app) -> str:
    name, path = read_body(payload, ("lora_name", "lora_path"))
    if ":" in name:
        raise AdapterRequestError("'lora_name' must not contain ':' (the presets' separator)", "lora_name")
    if name in table.paths or name in table.busy:
        raise AdapterRequestError(f"an adapter named {name!r} is already served; unload it first", "lora_name")
    base_path = app.state.args.model
    try:
        _, _, rank = await asyncio.to_thread(check_adapters, {**table.paths, name: path}, base_path)
    except (PairError, OSError) as exc:
        raise AdapterRequestError(str(exc), "lora_path") from None
    if rank > table.max_rank:
        raise AdapterRequestError(f"the adapter's rank {rank} is above --max-lora-rank {table.max_rank}", "lora_path")
    slot = table.free_slot()
    if slot is None:
        raise AdapterRequestError(f"all {table.max_loras} adapter slots are in use (--max-loras): unload one first",
                                  "lora_name")
    table.busy.add(name)
    try:
        await app.state.engine_client.collective_rpc(LOAD, args=(name, path, slot))
        table.paths[name], table.slots[name] = path, slot
        served = settings_mod.served_adapters()
        settings_mod.set_served_adapters(replace(served, keys={**served.keys, name: f"{name}#{next(GENERATIONS)}"}))
        publish(table, app.state.openai_serving_models, base_path)
    finally:
        table.busy.discard(name)
    return f"Success: LoRA adapter '{name}' added successfully."


async def unload(table: AdapterTable, payload: Any, app) -> str:
    name, = read_body(payload, ("lora_name",))
    if name not in table.paths or name in table.busy:
        raise AdapterRequestError(f"no adapter named {name!r} is served", "lora_name", 404)
    if name == next(iter(table.paths)):
        raise AdapterRequestError(f"{name!r} is the default adapter (the first served) and stays", "lora_name")
    table.busy.add(name)
    try:
        del table.paths[name]
        publish(table, app.state.openai_serving_models, app.state.args.model)
        while table.in_flight[name]:  # requests admitted before now finish with the adapter
            await asyncio.sleep(0.05)
        await app.state.engine_client.collective_rpc(UNLOAD, args=(name, table.slots.pop(name)))
    finally:
        table.busy.discard(name)
    return f"Success: LoRA adapter '{name}' removed successfully."


async def answer(table: AdapterTable, path: str, payload: Any, app, send) -> None:
    try:
        text = await (load if path == ROUTES[0] else unload)(table, payload, app)
    except AdapterRequestError as exc:
        kind = "NotFoundError" if exc.code == 404 else "BadRequestError"
        return await send_json(send, exc.code, error_body(str(exc), exc.param, exc.code, kind))
    body = text.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
