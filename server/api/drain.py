"""Draining on shutdown: once vLLM starts its graceful shutdown (SIGTERM or SIGINT, with
`--shutdown-timeout` > 0), every new HTTP request but `/metrics` gets an OpenAI-format 503
with `Retry-After`, `/health` included (so load balancers and readiness probes stop routing
here), while the requests already in flight finish; then the server exits within seconds.

vLLM 0.32 has no draining state of its own: its signal handler (`serve_http` in
`vllm.entrypoints.launchers.launcher`) calls `engine_client.shutdown(timeout)` in a thread and
keeps accepting requests until that returns; a new one then fails inside vLLM with a 500
("cannot schedule new futures after shutdown"). That call signals the engine core to drain and
waits up to `timeout` for its process to exit, so the server's exit waits on the engine core: a
slow teardown, or an engine core stuck with nothing in flight, held it for the whole timeout.
So at start-up (the ASGI lifespan event) this middleware wraps that method: it marks the drain,
waits (off the event loop) for the HTTP requests in flight here to finish, at most `timeout`,
and only then has vLLM stop the engine core, with `ENGINE_EXIT_S` for it to exit before vLLM
kills it.
"""

import asyncio
import time
from functools import wraps

from starlette._utils import get_route_path

from rlvrx.server.api.errors import error_body, send_json

RETRY_AFTER_S = 5
MESSAGE = "the server is shutting down and accepts no new requests; retry, or send it to another replica"
# What vLLM itself gives an engine core it stops with nothing to do (vllm.v1.utils.shutdown
# without a timeout); the requests have drained by then.
ENGINE_EXIT_S = 5.0
POLL_S = 0.05


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class DrainMiddleware:
    def __init__(self, app):
        self.app = app
        self.draining = False
        self.in_flight = 0  # HTTP requests let through and not yet answered in full

    def watch(self, engine_client) -> None:
        """Drain here when vLLM starts shutting `engine_client` down (see the module's docstring)."""
        shutdown = engine_client.shutdown

        @wraps(shutdown)
        def draining_shutdown(timeout: float | None = None) -> None:
            self.draining = True
            if timeout:  # 0: vLLM aborts what is in flight; None: no drain asked for
                if not on_event_loop():  # the requests waited for are served there
                    self.wait_idle(timeout)
                timeout = min(timeout, ENGINE_EXIT_S)
            return shutdown(timeout=timeout)

        engine_client.shutdown = draining_shutdown

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(POLL_S)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            engine_client = getattr(scope["app"].state, "engine_client", None)
            if engine_client is not None:
                self.watch(engine_client)
        elif scope["type"] == "http":
            if self.draining and not get_route_path(scope).startswith("/metrics"):
                return await send_json(send, 503, error_body(MESSAGE, None, 503, "ServiceUnavailableError"),
                                       headers=((b"retry-after", str(RETRY_AFTER_S).encode()),))
            self.in_flight += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
        return await self.app(scope, receive, send)
