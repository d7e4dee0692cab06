"""The extrapolation request fields in the server's OpenAPI schema (`/openapi.json`).

vLLM's FastAPI app documents its request models; the fields that the middleware reads
(`server.api.middleware`) are added to the request schemas of /v1/chat/completions and
/v1/completions, top level and grouped under `extrapolation`, with the ranges and choices of
`server.engine.settings` and the server's defaults, as are the fields of OpenAI's documented
request that vLLM's request models lack (accepted, and ignored). The middleware refuses
unknown fields, so the two schemas say so (`additionalProperties: false`).
"""

import math
from typing import Any

from rlvrx.server.engine import settings as settings_mod

DESCRIPTIONS = {
    "gamma": "Extrapolation strength γ: an extrapolated token is drawn from (1+γ)·log π_RL − γ·log π_Base.",
    "tau": "Threshold τ of the selection criterion. delta_logp: the proposed token is kept when its "
           "Δlog p = log π_RL − log π_Base is above τ; entropy: a position is extrapolated when the generator's "
           "entropy (nats) is at least τ; random: τ is the probability, in [0, 1], of extrapolating a position. "
           "null or \"inf\" is +∞, \"-inf\" is −∞.",
    "generator": "The model that proposes tokens.",
    "candidates": "k: an extrapolated token is drawn from the generator's top-k tokens by raw logit "
                  "(0 = the whole vocabulary).",
    "selection": "What flags a position for extrapolation: delta_logp (the paper's rule), entropy or random.",
    "base_adapter": "Stacked LoRA engines: a served adapter (an earlier checkpoint of the same run) to stand for the "
                    "base model, so that Δlog p = log π_<model> − log π_<base_adapter>; \"\" is the base itself.",
    "lora_scale": "Stacked LoRA engines: the scale of the RL adapter's delta, W + lora_scale·s·B·A (1 + α is "
                  "weight-space extrapolation); with <name>:rl it serves that model alone.",
}


def field_schemas(defaults: settings_mod.Extrapolation, vocab_size: int) -> dict[str, dict[str, Any]]:
    """JSON schemas of the request fields, keyed as `settings.FIELDS`."""
    lo, hi = settings_mod.GAMMA_RANGE
    infinities = [settings_mod.tau_json(math.inf), settings_mod.tau_json(-math.inf)]
    types = {
        "gamma": {"type": "number", "minimum": lo, "maximum": hi},
        "tau": {"anyOf": [{"type": "number"}, {"type": "string", "enum": infinities}, {"type": "null"}]},
        "generator": {"type": "string", "enum": list(settings_mod.GENERATORS)},
        "candidates": {"type": "integer", "minimum": 0, "maximum": vocab_size},
        "selection": {"type": "string", "enum": list(settings_mod.SELECTIONS)},
        "base_adapter": {"type": "string"},
        "lora_scale": {"type": "number", "minimum": settings_mod.LORA_SCALE_RANGE[0],
                       "maximum": settings_mod.LORA_SCALE_RANGE[1]},
    }
    default = defaults.as_xargs()
    return {field: {**types[field], "title": field.replace("_", " ").capitalize(), "description": DESCRIPTIONS[field],
                    "default": default[field]} for field in settings_mod.FIELDS}


def add_fields(schema: dict[str, Any], routes: dict[str, frozenset[str]], defaults: settings_mod.Extrapolation,
               vocab_size: int) -> None:
    """Add the fields to the request schema of each route in an OpenAPI document; `routes` maps
    each route to the OpenAI fields it accepts."""
    fields = field_schemas(defaults, vocab_size)
    grouped = {"anyOf": [{"type": "object", "properties": fields, "additionalProperties": False}, {"type": "null"}],
               "title": "Extrapolation",
               "description": "The same fields grouped; a field may not be given both here and at the top level."}
    for route, documented in routes.items():
        ref = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        request = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        ignored = {name: {"title": name, "description": "A field of OpenAI's request; accepted and ignored here."}
                   for name in sorted(documented - set(request["properties"]))}
        request["properties"].update({**ignored, **fields, "extrapolation": grouped})
        request["additionalProperties"] = False


def extend(app, routes: dict[str, frozenset[str]], defaults: settings_mod.Extrapolation, vocab_size: int) -> None:
    """Make the app's `openapi()` (what /openapi.json serves) include the fields."""
    vllm_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = vllm_openapi()  # built once and cached by FastAPI; adding the fields again changes nothing
        add_fields(schema, routes, defaults, vocab_size)
        return schema

    app.openapi = openapi
