"""Prometheus metrics produced inside the engine process, by the logits processor.

They reach the API server's `/metrics` through prometheus-client's multiprocess mode:
`rlvrx serve` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before any process
imports prometheus-client, so the engine (in its own process or in the API server's)
writes its samples there and vLLM's `/metrics` collects them with vLLM's own.
"""

from prometheus_client import Counter, Histogram

LABELS = ("model_name", "preset")
DELTA_BUCKETS = (-5.0, -3.0, -2.0, -1.0, -0.6, -0.5, -0.4, -0.35, -0.3, -0.25, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5,
                 1.0, 2.0, 3.0, 5.0)
COMBINE_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

GENERATED_TOKENS = Counter(
    "rlvrx:generated_tokens", "Tokens sampled, by served model and preset (extrapolated, rl, base).", LABELS
)
EXTRAPOLATED_TOKENS = Counter(
    "rlvrx:extrapolated_tokens",
    "Extrapolated positions: the sum over sampled positions of the probability that the proposal was "
    "rejected (exact count for greedy requests).",
    LABELS,
)
DELTA_LOGP = Histogram(
    "rlvrx:delta_logp", "Δlog p = log π_RL − log π_Base of emitted tokens of extrapolated requests.", LABELS,
    buckets=DELTA_BUCKETS,
)
DRAFT_TOKENS = Counter(
    "rlvrx:spec_draft_tokens",
    "Draft tokens verified by speculative decoding (against q for extrapolated requests), by served model and "
    "preset.", LABELS,
)
ACCEPTED_DRAFT_TOKENS = Counter(
    "rlvrx:spec_accepted_tokens",
    "Draft tokens accepted and kept; accepted / draft tokens is the acceptance rate of the preset.", LABELS,
)
COMBINE_SECONDS = Histogram(
    "rlvrx:combine_seconds", "Time in the extrapolation logits processor per engine step.", ("model_name",),
    buckets=COMBINE_BUCKETS,
)
