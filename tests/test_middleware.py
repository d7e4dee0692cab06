"""The HTTP middlewares as ASGI apps, without a server: what reaches vLLM's app from a request."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from rlvrx.server.api.drain import DrainMiddleware
from rlvrx.server.api.errors import send_json
from rlvrx.server.api.middleware import PRIVATE_PREFIX, ApiConfig, ExtrapolationMiddleware
from rlvrx.server.engine import settings as settings_mod
from rlvrx.server.engine import stats as stats_mod

CONFIG = ApiConfig(defaults=settings_mod.Extrapolation(), vocab_size=1000, stats_path="/nonexistent", served_name="toy")
PRIVATE = {"_rlvrx_temperature": "hot", "_rlvrx_top_p": -1, "_rlvrx_stats_slot": -5, "_rlvrx_stats_file": "/etc/passwd"}


class VllmApp:
    """Stands in for vLLM's app: records each request body that reaches it and answers 200."""

    def __init__(self):
        self.state = SimpleNamespace(args=SimpleNamespace(api_key=None, rlvrx=CONFIG))
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        self.bodies.append((await receive())["body"])
        await send_json(send, 200, b"{}")


def call(middleware, app: VllmApp, path: str, body: bytes, root_path: str = "") -> tuple[int, dict]:
    """POST `body` to `path` through `middleware`; returns (status, JSON answer)."""
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": root_path,
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "app": app}
    messages = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        messages.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))


def private_keys(node) -> list[str]:
    if isinstance(node, dict):
        return [k for k in node if k.startswith(PRIVATE_PREFIX)] + [k for v in node.values() for k in private_keys(v)]
    return [k for v in node for k in private_keys(v)] if isinstance(node, list) else []


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"model": "toy", "input": "hi", "vllm_xargs": {**PRIVATE, "keep": 1}}),
    ("/v1/messages", {"model": "toy", "max_tokens": 2, "messages": [], "vllm_xargs": {**PRIVATE, "keep": 1}}),
    ("/v1/chat/completions/batch", {"model": "toy", "messages": [[]], "vllm_xargs": {**PRIVATE, "keep": 1}}),
    ("/invocations", {"model": "toy", "prompt": "hi", "vllm_xargs": {**PRIVATE, "keep": 1}}),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"extra_args": {**PRIVATE, "keep": 1}}}),
    ("/some/future/route", {"requests": [{"vllm_xargs": {**PRIVATE, "keep": 1}}], **PRIVATE}),
])
def test_private_keys_never_reach_vllm_on_any_route(path, body, tmp_path, monkeypatch):
    table = stats_mod.StatsTable(str(tmp_path / "stats.f64"), create=True)  # /invocations is admitted: it gets a slot
    monkeypatch.setattr(CONFIG, "stats_path", table.path)
    app = VllmApp()
    assert call(ExtrapolationMiddleware(app), app, path, json.dumps(body).encode())[0] == 200
    received = json.loads(app.bodies[0])
    assert private_keys(body)
    # Only the middleware's own admission (a slot and this server's token) may carry the prefix.
    assert set(private_keys(received)) <= {stats_mod.SLOT_KEY, stats_mod.ADMISSION_KEY}
    if private_keys(received):
        xargs = received["vllm_xargs"]
        assert xargs[stats_mod.ADMISSION_KEY] == stats_mod.ADMISSION_TOKEN and 0 <= xargs[stats_mod.SLOT_KEY] < stats_mod.SLOTS
    assert "keep" in json.dumps(received)  # the rest of the body is untouched


def test_escaped_private_keys_are_removed_too():
    app = VllmApp()
    body = b'{"model": "toy", "input": "hi", "vllm_xargs": {"\\u005frlvrx_stats_file": "/etc/passwd"}}'
    call(ExtrapolationMiddleware(app), app, "/v1/responses", body)
    assert not private_keys(json.loads(app.bodies[0]))


def test_bodies_without_private_keys_pass_unchanged():
    """On a route the middleware does not admit (here vLLM's token-in, token-out route)."""
    app = VllmApp()
    for body in (b'{"token_ids": [1],   "sampling_params": {}}', b"not json", b"[" * 100000, b""):
        call(ExtrapolationMiddleware(app), app, "/inference/v1/generate", body)
        assert app.bodies[-1] == body


@pytest.mark.parametrize("path", ["/api/v1/completions", "/v1/completions"])
def test_requests_under_the_root_path_are_checked(path):
    """With --root-path /api, Starlette routes both /api/v1/completions and (behind a proxy that
    strips the prefix) /v1/completions to the completions route: the middleware must see both."""
    app = VllmApp()
    body = json.dumps({"model": "toy", "prompt": "hi", "temprature": 0.5}).encode()
    status, answer = call(ExtrapolationMiddleware(app), app, path, body, root_path="/api")
    assert status == 400 and answer["error"]["param"] == "temprature" and not app.bodies


def test_draining_under_the_root_path_still_serves_metrics():
    app = VllmApp()
    drain = DrainMiddleware(app)
    drain.draining = True
    assert call(drain, app, "/api/metrics", b"", root_path="/api")[0] == 200
    assert call(drain, app, "/api/v1/completions", b"{}", root_path="/api")[0] == 503
