"""Draining on shutdown: once vLLM starts its graceful shutdown (SIGTERM or SIGINT, with
`--shutdown-timeout` > 0), every new HTTP request but `/metrics` gets an OpenAI-format 503
with `Retry-After`, `/health` included (so load balancers and readiness probes stop routing
here), while the requests already in flight finish.

vLLM 0.32 has no draining state of its own: its signal handler (`serve_http` in
`vllm.entrypoints.launchers.launcher`) calls `engine_client.shutdown(timeout)` and keeps
accepting requests until that returns; a new one then fails inside vLLM with a 500
("cannot schedule new futures after shutdown"). So at start-up (the ASGI lifespan event) this
middleware wraps that method of the app's engine client to learn when the drain begins.
"""

from functools import wraps

from starlette._utils import get_route_path

from rlvrx.server.api.errors import error_body, send_json

RETRY_AFTER_S = 5
MESSAGE = "the server is shutting down and accepts no new requests; retry, or send it to another replica"


class DrainMiddleware:
    def __init__(self, app):
        self.app = app
        self.draining = False

    def watch(self, engine_client) -> None:
        """Set `draining` when vLLM starts shutting `engine_client` down."""
        shutdown = engine_client.shutdown

        @wraps(shutdown)
        def draining_shutdown(*args, **kwargs):
            self.draining = True
            return shutdown(*args, **kwargs)

        engine_client.shutdown = draining_shutdown

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            engine_client = getattr(scope["app"].state, "engine_client", None)
            if engine_client is not None:
                self.watch(engine_client)
        elif scope["type"] == "http" and self.draining:
            if not get_route_path(scope).startswith("/metrics"):
                return await send_json(send, 503, error_body(MESSAGE, None, 503, "ServiceUnavailableError"),
                                       headers=((b"retry-after", str(RETRY_AFTER_S).encode()),))
        return await self.app(scope, receive, send)
