"""Prometheus metrics of the HTTP layer: the extrapolation settings that requests ask for."""

import math

from prometheus_client import Histogram

from rlvrx.server.engine.settings import Extrapolation

LABELS = ("model_name", "preset")
REQUEST_GAMMA = Histogram(
    "rlvrx:request_gamma", "Requested extrapolation strength γ.", LABELS,
    buckets=(-1.0, -0.5, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
REQUEST_TAU = Histogram(
    "rlvrx:request_tau", "Requested threshold τ (null = +inf lands in +Inf, \"-inf\" in the lowest bucket).", LABELS,
    buckets=(-5.0, -2.0, -1.0, -0.5, -0.4, -0.35, -0.3, -0.25, -0.2, -0.1, 0.0, 0.5, 1.0, 5.0),
)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)
E2E_LATENCY = Histogram(
    "rlvrx:e2e_latency_seconds", "Request latency at the HTTP layer, by preset (all responses).", LABELS,
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rlvrx:time_to_first_token_seconds", "Time to the first streamed content, by preset (streaming requests).",
    LABELS, buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "rlvrx:inter_token_latency_seconds", "Time between streamed content chunks, by preset (streaming requests).",
    LABELS, buckets=LATENCY_BUCKETS,
)
TAU_CLAMP = 1e3  # ±inf would turn the histogram's sum into nan


def observe_request(model_name: str, preset: str, settings: Extrapolation) -> None:
    labels = (model_name, preset)
    REQUEST_GAMMA.labels(*labels).observe(settings.gamma)
    tau = settings.tau if math.isfinite(settings.tau) else math.copysign(TAU_CLAMP, settings.tau)
    REQUEST_TAU.labels(*labels).observe(tau)
