"""ASGI middleware that adds the extrapolation surface to vLLM's OpenAI server.

On /v1/chat/completions and /v1/completions it:

* reads the first-class request fields `gamma`, `tau`, `generator`, `candidates`
  (top level, or grouped under `extrapolation`) and the preset in the model name
  (`<name>:rl`, `<name>:base`), validates them, merges them over the server's defaults
  and hands them to the engine as `vllm_xargs` — bad values get an OpenAI-format 400
  naming the field, before the engine sees anything;
* gives the request a slot in the shared statistics table and, when the response
  carries `usage`, adds `extrapolated_tokens` and `extrapolation_rate` to it
  (JSON responses, and the usage chunk of streams with `include_usage`);
* echoes the model name as requested (`<name>:rl` stays `<name>:rl`; vLLM would
  answer with the first served name);
* at start-up, adds the fields to the app's OpenAPI schema (`server.api.openapi`).

Its configuration is `args.rlvrx` on the app state, set by `rlvrx serve`.
"""

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from server.api import metrics, openapi
from server.api.errors import error_body, send_json
from server.engine import settings as settings_mod
from server.engine.stats import FILE_KEY, SLOT_KEY, StatsTable

ROUTES = ("/v1/chat/completions", "/v1/completions")
EXTRAPOLATION_FIELDS = {*settings_mod.FIELDS, "extrapolation"}
PRESET_SUFFIXES = {":rl": "rl", ":base": "base"}
PRIVATE_PREFIX = "_rlvrx"


@dataclass
class ApiConfig:
    """What the HTTP layer needs to know; built by the CLI, stored on the app state."""

    defaults: settings_mod.Extrapolation
    vocab_size: int
    stats_path: str
    served_name: str
    protect_metrics: bool = False  # /metrics needs the API key too
    max_n: int = 256  # most choices (`n`) one request may ask for


@functools.cache
def request_fields(path: str) -> tuple[frozenset[str], frozenset[str]]:
    """The request fields vLLM's OpenAI server understands on `path`, and those of them that
    take only an object (or null)."""
    if path == "/v1/chat/completions":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as request_cls
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as request_cls
    schema = request_cls.model_json_schema()

    def types(node: dict) -> set[str]:  # the JSON types a schema node admits
        if "$ref" in node:
            return types(schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
        if alternatives := node.get("anyOf") or node.get("oneOf"):
            return set().union(*map(types, alternatives))
        kind = node.get("type", "any")
        return set(kind) if isinstance(kind, list) else {kind}

    fields = schema["properties"]
    return frozenset(fields), frozenset(name for name, node in fields.items() if types(node) <= {"object", "null"})


def check_request(payload: dict[str, Any], path: str, config: ApiConfig) -> None:
    """Refuse what vLLM would silently ignore, accept too generously, or answer with a 500
    (SettingsError → 400)."""
    fields, objects = request_fields(path)
    unknown = sorted(set(payload) - fields - EXTRAPOLATION_FIELDS)
    if unknown:
        raise settings_mod.SettingsError(unknown[0], f"unknown field '{unknown[0]}'")
    # vLLM's request models read some of these (vllm_xargs, structured_outputs) as mappings
    # before checking their type: a 500 for a string or a number.
    for field in sorted(objects & set(payload)):
        if payload[field] is not None and not isinstance(payload[field], dict):
            raise settings_mod.SettingsError(field, f"'{field}' must be an object")
    n = payload.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > config.max_n:
        raise settings_mod.SettingsError("n", f"'n' must be at most {config.max_n}, got {n}")
    if path == "/v1/chat/completions" and payload.get("messages") == []:
        raise settings_mod.SettingsError("messages", "'messages' must contain at least one message")


def request_settings(payload: dict[str, Any], config: ApiConfig) -> settings_mod.Extrapolation:
    """Settings for one request body; removes the first-class fields from it."""
    grouped = payload.pop("extrapolation", None)
    if grouped is None:
        grouped = {}
    if not isinstance(grouped, dict):
        raise settings_mod.SettingsError("extrapolation", "'extrapolation' must be an object")
    unknown = sorted(set(grouped) - set(settings_mod.FIELDS))
    if unknown:
        raise settings_mod.SettingsError(
            f"extrapolation.{unknown[0]}", f"unknown field 'extrapolation.{unknown[0]}'; known: {list(settings_mod.FIELDS)}"
        )
    xargs = payload.get("vllm_xargs") or {}
    values = {k: xargs[k] for k in (*settings_mod.FIELDS, "preset") if k in xargs}
    for field in settings_mod.FIELDS:
        if field in payload:
            if field in grouped:
                raise settings_mod.SettingsError(field, f"'{field}' is given both at the top level and in 'extrapolation'")
            values[field] = payload.pop(field)
        elif field in grouped:
            values[field] = grouped[field]
    model = payload.get("model")
    if isinstance(model, str):
        for suffix, preset in PRESET_SUFFIXES.items():
            if model.endswith(suffix):
                values["preset"] = preset
    return settings_mod.parse(values, config.defaults, vocab_size=config.vocab_size)


class ExtrapolationMiddleware:
    def __init__(self, app):
        self.app = app
        self.stats: StatsTable | None = None
        self.auth: AuthenticationMiddleware | None = None

    def authorized(self, scope, config: ApiConfig) -> bool:
        """The API-key check (vLLM's, reused) on every route but /health and /metrics (unless
        --protect-metrics): a refused request gets an OpenAI-format 401 before anything else."""
        if scope.get("method") == "OPTIONS":
            return True
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == "/health" or (path.startswith("/metrics") and not config.protect_metrics):
            return True
        args = scope["app"].state.args
        tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
        if not tokens:
            return True
        if self.auth is None:
            self.auth = AuthenticationMiddleware(self.app, tokens=tokens)
        return self.auth.verify_token(Headers(scope=scope))

    async def __call__(self, scope, receive, send):
        config: ApiConfig | None = getattr(scope["app"].state.args, "rlvrx", None)
        if config is not None and scope["type"] == "lifespan":
            openapi.extend(scope["app"], ROUTES, config.defaults, config.vocab_size)
        if config is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.authorized(scope, config):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            return await send_json(send, 401, error_body(message, None, 401, "AuthenticationError"))
        if scope["method"] != "POST" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError as exc:  # vLLM answers some of these (bytes that are not text) outside OpenAI's format
            return await send_json(send, 400, error_body(f"the request body is not valid JSON: {exc}", None))
        if not isinstance(payload, dict):  # let vLLM answer other malformed bodies its own way
            return await self.app(scope, replay(body, receive), send)
        try:
            check_request(payload, scope["path"], config)
            found = request_settings(payload, config)
        except settings_mod.SettingsError as exc:
            return await send_json(send, 400, error_body(str(exc), exc.field))
        labels = (config.served_name, found.label)
        metrics.observe_request(*labels, found)
        if self.stats is None:
            self.stats = StatsTable(config.stats_path)
        slot = self.stats.allocate()
        xargs = {k: v for k, v in (payload.get("vllm_xargs") or {}).items() if not k.startswith(PRIVATE_PREFIX)}
        payload["vllm_xargs"] = {**xargs, **found.as_xargs(), FILE_KEY: config.stats_path, SLOT_KEY: slot}
        await self.app(scope, replay(json.dumps(payload).encode(), receive), ResponseRewriter(send, self.stats, slot, payload.get("model"), labels))


def has_content(data: dict) -> bool:
    """A stream chunk that carries generated text (chat delta content, or completion text)."""
    choices = data.get("choices") or []
    return any(isinstance(c, dict) and ((c.get("delta") or {}).get("content") or c.get("text")) for c in choices)


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that yields `body` once, then waits on the client as usual (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ResponseRewriter:
    """Wraps `send`: adds the extrapolation counts to every `usage` object in the
    response, sets `model` to the name the client asked for, and times the response
    for the per-preset latency metrics."""

    def __init__(self, send, stats: StatsTable, slot: int, model: str | None, labels: tuple[str, str]):
        self.send = send
        self.stats = stats
        self.slot = slot
        self.model = model if isinstance(model, str) else None
        self.labels = labels
        self.started = self.last_content = time.perf_counter()
        self.seen_content = False
        self.streaming = False
        self.start: dict | None = None
        self.buffer = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self.streaming:
                return await self.send(message)
            self.start = message  # held until the body is complete: its length changes
            return None
        if message["type"] != "http.response.body":
            return await self.send(message)
        if self.streaming:
            return await self.stream_body(message)
        self.buffer += message.get("body", b"")
        if message.get("more_body"):
            return None
        body = self.rewrite_json(self.buffer)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        self.observe_end()

    def observe_end(self) -> None:
        metrics.E2E_LATENCY.labels(*self.labels).observe(time.perf_counter() - self.started)

    def observe_content(self) -> None:
        now = time.perf_counter()
        if self.seen_content:
            metrics.INTER_TOKEN_LATENCY.labels(*self.labels).observe(now - self.last_content)
        else:
            metrics.TIME_TO_FIRST_TOKEN.labels(*self.labels).observe(now - self.started)
            self.seen_content = True
        self.last_content = now

    async def stream_body(self, message):
        self.buffer += message.get("body", b"")
        events, _, self.buffer = self.buffer.rpartition(b"\n\n")
        out = b""
        if events:
            for event in (events + b"\n\n").split(b"\n\n")[:-1]:
                out += self.rewrite_event(event) + b"\n\n"
        if not message.get("more_body"):
            out += self.buffer
            self.buffer = b""
        if out or not message.get("more_body"):
            await self.send({"type": "http.response.body", "body": out, "more_body": message.get("more_body", False)})
        if not message.get("more_body"):
            self.observe_end()

    def rewrite_event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        return b"data: " + self.rewrite_json(event[len(b"data: "):], streamed=True)

    def rewrite_json(self, raw: bytes, streamed: bool = False) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(data, dict) or "error" in data:
            return raw
        if streamed and has_content(data):
            self.observe_content()
        if self.model is not None and "model" in data:
            data["model"] = self.model
        usage = data.get("usage")
        if isinstance(usage, dict):
            extrapolated = self.stats.read(self.slot)
            generated = usage.get("completion_tokens") or 0
            usage["extrapolated_tokens"] = round(extrapolated, 4)
            usage["extrapolation_rate"] = round(extrapolated / generated, 6) if generated else 0.0
        return json.dumps(data, separators=(",", ":")).encode()
