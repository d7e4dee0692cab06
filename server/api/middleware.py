"""ASGI middleware that adds the extrapolation surface to vLLM's OpenAI server.

On every POST it removes the processor's private keys (`_rlvrx…`) from the body, wherever
they are (`vllm_xargs` of every route that takes one, `sampling_params.extra_args`, …): only
the middleware sets them, so no client value reaches the engine under them.

On SageMaker's /invocations (a chat or a completions body) it does all that follows; on
/v1/responses and /v1/messages it reads the extrapolation fields and the preset and hands them
to the engine; on /v1/chat/completions/batch, which passes no `vllm_xargs`, it refuses any
setting but the server's defaults, so that no route silently serves another distribution than
the one asked for.

On every route that takes a preset it gives `<name>:base` requests the base model's
generation-config defaults for the sampling fields they leave unset (`server.api.generation`;
vLLM would apply the RL model's), and requests of a stacked engine's other adapters (`rlvrx
serve --lora-modules`) their adapter's. The served name before the preset suffix names the
adapter of such an engine; `GET /v1/models` lists each name with its adapter as root and the
base as parent.

On /v1/chat/completions and /v1/completions it also:

* refuses unknown fields (those of OpenAI's documented request are known) and chat roles
  OpenAI does not have (unless `--allow-custom-roles`);
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

Its configuration is `args.rlvrx` on the app state, set by `rlvrx serve`. Paths are matched
as Starlette's router matches them, under `--root-path` too.
"""

import asyncio
import functools
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from starlette._utils import get_route_path
from starlette.datastructures import Headers
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from rlvrx.server.api import adapters, generation, metrics, openapi
from rlvrx.server.api.errors import error_body, send_json
from rlvrx.server.engine import settings as settings_mod
from rlvrx.server.engine import metrics as engine_metrics
from rlvrx.server.engine import stats as stats_mod

ROUTES = ("/v1/chat/completions", "/v1/completions")
INVOCATIONS = "/invocations"  # SageMaker's: a chat or a completions body, told apart by its fields
# Generation routes of other formats: their requests take the settings (fields, preset) through
# vllm_xargs but carry no usage figures (the engine counts their tokens for the metrics) ...
SETTINGS_ROUTES = ("/v1/responses", "/v1/messages")
# ... or take no vllm_xargs at all: only the server's default settings can apply there (vLLM's
# generative scoring builds its own sampling parameters; Cohere's chat, with VLLM_ENABLE_COHERE_API).
DEFAULTS_ONLY_ROUTES = ("/v1/chat/completions/batch", "/generative_scoring", "/cohere/v2/chat")
EXTRAPOLATION_FIELDS = {*settings_mod.FIELDS, "extrapolation"}
PRESET_SUFFIXES = {":rl": "rl", ":base": "base"}
PRIVATE_PREFIX = stats_mod.PRIVATE_PREFIX
# The roles of OpenAI's chat message types (openai.types.chat.ChatCompletionMessageParam).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class ApiConfig:
    """What the HTTP layer needs to know; built by the CLI, stored on the app state."""

    defaults: settings_mod.Extrapolation
    vocab_size: int
    stats_path: str
    served_name: str
    protect_metrics: bool = False  # /metrics needs the API key too
    max_n: int = 256  # most choices (`n`) one request may ask for
    allow_custom_roles: bool = False  # chat roles beyond CHAT_ROLES go to the chat template
    adapters: dict[str, str] = field(default_factory=dict)  # a stacked engine's {served name: adapter directory}
    max_loras: int = 0  # with runtime loading: the adapters it can hold, and their largest rank
    max_lora_rank: int = 0


@functools.cache
def openai_fields(path: str) -> frozenset[str]:
    """The fields of OpenAI's documented request on `path` (chat or legacy completions), as the
    `openai` SDK that vLLM depends on types them. vLLM ignores those its request model lacks."""
    if path == "/v1/chat/completions":
        from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming as params
    else:
        from openai.types.completion_create_params import CompletionCreateParamsStreaming as params
    return params.__required_keys__ | params.__optional_keys__


@functools.cache
def request_fields(path: str) -> tuple[frozenset[str], frozenset[str]]:
    """The request fields accepted on `path` (vLLM's and OpenAI's), and those of vLLM's that take
    only an object (or null)."""
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
    objects = frozenset(name for name, node in fields.items() if types(node) <= {"object", "null"})
    return frozenset(fields) | openai_fields(path), objects


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
    if path == "/v1/chat/completions" and not config.allow_custom_roles:
        check_roles(payload.get("messages"))


def check_beam_search(payload: dict[str, Any]) -> None:
    """vLLM's beam search runs each step as a request of its own built from the temperature alone:
    the name's model, adapter and extrapolation settings would be lost, and the server's default
    distribution searched whatever the request names."""
    if payload.get("use_beam_search"):
        raise settings_mod.SettingsError(
            "use_beam_search", "'use_beam_search' is not supported: vLLM's beam search drops the request's model "
                               "and extrapolation settings, so it would search the server's default distribution")


def check_roles(messages: Any) -> None:
    """Refuse a chat role OpenAI does not have (a template would render it as it pleases)."""
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role not in CHAT_ROLES:
            field = f"messages[{i}].role"
            raise settings_mod.SettingsError(field, f"'{field}' must be one of {list(CHAT_ROLES)}, got {role!r}")


def strip_private(payload: Any) -> bool:
    """Remove every key with the private prefix from a parsed JSON body, at any depth; True if
    there was one. (Iterative: json.loads takes bodies nested as deep as the recursion limit.)"""
    stack, found = [payload], False
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in [k for k in node if isinstance(k, str) and k.startswith(PRIVATE_PREFIX)]:
                del node[key]
                found = True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def parse_json(body: bytes) -> Any:
    """The body parsed as Starlette's `Request.json()` parses it (ValueError when it is not JSON)."""
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


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
                model = model[:-len(suffix)]
        if model in config.adapters:
            values["adapter"] = model
    found = settings_mod.parse(values, config.defaults, vocab_size=config.vocab_size)
    return settings_mod.check_adapters(found, settings_mod.served_adapters())


class ExtrapolationMiddleware:
    def __init__(self, app):
        self.app = app
        self.stats: stats_mod.StatsTable | None = None
        self.auth: AuthenticationMiddleware | None = None
        self.base_sampling: dict[str, Any] | None = None  # `:base` requests' generation defaults
        self.adapter_sampling: dict[str, dict[str, Any]] = {}  # those of adapters but the first, by directory
        self.table: adapters.AdapterTable | None = None  # a stacked engine's adapters at run time

    def authorized(self, scope, config: ApiConfig) -> bool:
        """The API-key check (vLLM's, reused) on every route but /health and /metrics (unless
        --protect-metrics): a refused request gets an OpenAI-format 401 before anything else."""
        if scope.get("method") == "OPTIONS":
            return True
        path = get_route_path(scope)
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
            openapi.extend(scope["app"], {route: openai_fields(route) for route in ROUTES}, config.defaults,
                           config.vocab_size)
        if config is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.authorized(scope, config):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            return await send_json(send, 401, error_body(message, None, 401, "AuthenticationError"))
        if scope["method"] == "GET" and config.adapters and get_route_path(scope) == "/v1/models":
            args = scope["app"].state.args
            return await self.app(scope, receive, JsonBodyEditor(send, lambda data: adapter_cards(data, config, args)))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        # The path Starlette's router matches: without --root-path's prefix
        path = get_route_path(scope)
        body = await read_body(receive)
        if self.table is None and config.adapters:
            self.table = adapters.AdapterTable(config.adapters, config.max_loras, config.max_lora_rank)
        if path in adapters.ROUTES and config.max_loras and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
            try:
                payload = parse_json(body)
            except ValueError as exc:
                return await send_json(send, 400, error_body(f"the request body is not valid JSON: {exc}", None))
            return await adapters.answer(self.table, path, payload, scope["app"], send)
        if path not in (*ROUTES, INVOCATIONS, *SETTINGS_ROUTES, *DEFAULTS_ONLY_ROUTES):
            return await self.app(scope, replay(without_private_keys(body), receive), send)
        try:
            payload = parse_json(body)
        except ValueError as exc:  # vLLM answers some of these (bytes that are not text) outside OpenAI's format
            return await send_json(send, 400, error_body(f"the request body is not valid JSON: {exc}", None))
        if not isinstance(payload, dict):  # let vLLM answer other malformed bodies its own way
            return await self.app(scope, replay(body, receive), send)
        strip_private(payload)
        if path == INVOCATIONS:
            path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
        try:
            if path in ROUTES:
                check_request(payload, path, config)
            if path in ROUTES or path in DEFAULTS_ONLY_ROUTES:
                check_beam_search(payload)
            found = request_settings(payload, config)
            first = next(iter(config.adapters), "")
            if path in DEFAULTS_ONLY_ROUTES and replace(found, adapter=found.adapter or first) != replace(
                    config.defaults, adapter=first):
                field = next((f for f in settings_mod.FIELDS if getattr(found, f) != getattr(config.defaults, f)), "model")
                raise settings_mod.SettingsError(field, f"'{field}': {path} passes no extrapolation settings to the "
                                                        "engine (only the server's defaults and the first served name)")
            # vLLM applies the default RL model's generation config: other models get their own
            # (`:base` with a base_adapter serves that adapter)
            sampled = found.base_adapter if found.passthrough == "base" else found.adapter
            if found.passthrough == "base" and not sampled:
                if self.base_sampling is None:
                    self.base_sampling = generation.base_defaults(scope["app"].state.vllm_config.model_config)
                generation.fill_unset(payload, path, self.base_sampling)
            elif sampled and sampled != first:
                directory = config.adapters[sampled]  # a name unloaded and loaded again may name another
                if directory not in self.adapter_sampling:
                    self.adapter_sampling[directory] = generation.adapter_defaults(
                        scope["app"].state.vllm_config.model_config, directory)
                generation.fill_unset(payload, path, self.adapter_sampling[directory])
        except settings_mod.SettingsError as exc:
            return await send_json(send, 400, error_body(str(exc), exc.field))
        # Counted in flight from here on (no await in between): an adapter being unloaded waits for them.
        used = [name for name in (found.adapter, found.base_adapter) if name]
        if self.table is not None:
            self.table.in_flight.update(used)
        try:
            await self.admitted(scope, receive, send, path, payload, found, config)
        finally:
            if self.table is not None:
                self.table.in_flight.subtract(used)

    async def admitted(self, scope, receive, send, path: str, payload: dict[str, Any],
                       found: settings_mod.Extrapolation, config: ApiConfig) -> None:
        labels = (found.adapter or config.served_name, found.label)
        if path not in ROUTES:
            metrics.observe_request(*labels, found)
            if path in SETTINGS_ROUTES:
                payload["vllm_xargs"] = {**(payload.get("vllm_xargs") or {}), **found.as_xargs()}
            return await self.app(scope, replay(json.dumps(payload).encode(), receive), send)
        metrics.observe_request(*labels, found)
        if self.stats is None:
            self.stats = stats_mod.StatsTable(config.stats_path)
        slot = self.stats.allocate()
        if slot is None:
            return await send_json(send, 503, error_body("too many requests in flight; retry later", None, 503,
                                                         "ServiceUnavailableError"))
        payload["vllm_xargs"] = {**(payload.get("vllm_xargs") or {}), **found.as_xargs(), **stats_mod.admit(slot)}
        rewriter = ResponseRewriter(send, self.stats, slot, payload, labels)
        try:
            await self.app(scope, replay(json.dumps(payload).encode(), receive), rewriter)
        finally:
            self.stats.release(slot)


def adapter_cards(data: Any, config: ApiConfig, args) -> None:
    """/v1/models of a stacked engine: each name's root is its adapter's directory and its parent the
    base (vLLM's convention for LoRA adapters; vLLM would give every name the base as its root)."""
    for card in data.get("data", []) if isinstance(data, dict) else ():
        name = card.get("id", "")
        for suffix in PRESET_SUFFIXES:
            name = name.removesuffix(suffix)
        if name in config.adapters:
            card["root"], card["parent"] = config.adapters[name], args.model


class JsonBodyEditor:
    """Wraps `send`: holds a JSON response until its body is complete and lets `edit` change it."""

    def __init__(self, send, edit):
        self.send, self.edit = send, edit
        self.start: dict | None = None
        self.buffer = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return None
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.buffer += message.get("body", b"")
        if message.get("more_body"):
            return None
        body = self.buffer
        try:
            data = json.loads(body)
            self.edit(data)
            body = json.dumps(data).encode()
        except ValueError:
            pass
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})


def without_private_keys(body: bytes) -> bytes:
    """`body` with the private keys removed, when it is JSON; unchanged otherwise (the route
    refuses it or reads it as something else)."""
    try:
        payload = parse_json(body)
    except ValueError:
        return body
    return json.dumps(payload).encode() if strip_private(payload) else body


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
    response, sets `model` to the name the client asked for, times the response for the
    per-preset latency metrics, and counts its tokens in the token metrics once its final
    usage is known (streams always ask vLLM for it; the client sees it only if it asked)."""

    def __init__(self, send, stats: stats_mod.StatsTable, slot: int, payload: dict[str, Any], labels: tuple[str, str]):
        self.send = send
        self.stats = stats
        self.slot = slot
        self.model = payload.get("model") if isinstance(payload.get("model"), str) else None
        self.choices = max(n if isinstance(n, int) else 1 for n in (payload.get("n"), payload.get("best_of")))
        self.labels = labels
        options = payload.get("stream_options") or {}
        self.hide_usage = payload.get("stream") is True and not options.get("include_usage")
        if self.hide_usage:
            payload["stream_options"] = {**options, "include_usage": True}
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
        await self.settled()
        body = self.rewrite_json(self.buffer)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        self.observe_end()

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait until the engine has written the counts it had submitted by now (at once on the
        CPU; on a GPU they arrive a moment after the step, see server.engine.host_reads)."""
        submitted, deadline = self.stats.submitted(), time.monotonic() + timeout
        while not self.stats.written_since(submitted) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

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
        if b'"usage":{' in events:
            await self.settled()
        out = b""
        if events:
            for event in (events + b"\n\n").split(b"\n\n")[:-1]:
                if (rewritten := self.rewrite_event(event)) is not None:
                    out += rewritten + b"\n\n"
        if not message.get("more_body"):
            out += self.buffer
            self.buffer = b""
        if out or not message.get("more_body"):
            await self.send({"type": "http.response.body", "body": out, "more_body": message.get("more_body", False)})
        if not message.get("more_body"):
            self.observe_end()

    def rewrite_event(self, event: bytes) -> bytes | None:
        """The event as the client gets it; None to leave it out (the usage chunk it did not ask for)."""
        if not event.startswith(b"data: {"):
            return event
        raw = self.rewrite_json(event[len(b"data: "):], streamed=True)
        return None if raw is None else b"data: " + raw

    def rewrite_json(self, raw: bytes, streamed: bool = False) -> bytes | None:
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
            generated = usage.get("completion_tokens") or 0
            extrapolated = self.stats.kept(self.slot, generated, self.choices)
            usage["extrapolated_tokens"] = round(extrapolated, 4)
            usage["extrapolation_rate"] = round(extrapolated / generated, 6) if generated else 0.0
            final = not streamed or data.get("choices") == []
            if final:
                engine_metrics.GENERATED_TOKENS.labels(*self.labels).inc(generated)
                engine_metrics.EXTRAPOLATED_TOKENS.labels(*self.labels).inc(extrapolated)
            if self.hide_usage:
                if final:
                    return None
                del data["usage"]
        return json.dumps(data, separators=(",", ":")).encode()
