"""Per-request extrapolation settings: one typed object, parsed and validated in one place.

Requests carry their settings in `SamplingParams.extra_args` (filled from the OpenAI
request's `vllm_xargs` by vLLM, or by our API layer from first-class fields). Missing
keys take the defaults passed in (the server's), else the paper's values below.
Errors name the offending field, so the HTTP layer can answer 400 with `param` set.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rlvrx.kernels import SELECTION

FIELDS = ("gamma", "tau", "generator", "candidates", "selection", "base_adapter", "lora_scale")
PRESETS = ("extrapolate", "rl", "base")
GENERATORS = ("base", "rl")
# What flags a position for extrapolation (τ is the threshold of each):
# Δlog p of the proposed token ≤ τ (the paper's rule); the generator's entropy (nats) ≥ τ;
# a coin with probability τ. The last two are the paper's baselines for its replacement curve.
SELECTIONS = tuple(SELECTION)
GAMMA_RANGE = (-1.0, 10.0)
LORA_SCALE_RANGE = (0.0, 10.0)
# A stacked engine's requests: the adapters (as loaded now) and scale their KV depends on, written at
# admission (server.engine.processor) and read where the engine core keys prefix caching
# (server.engine.adapter_rows).
ADAPTERS_KEY = "adapters_cache_key"
MAX_CANDIDATES = 1 << 20


class SettingsError(ValueError):
    """A request field with a bad value; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Extrapolation:
    """What one request asks for. `tau` is +inf for "always extrapolate"."""

    gamma: float = 0.05
    tau: float = -0.3
    generator: str = "base"
    candidates: int = 50
    selection: str = "delta_logp"
    preset: str = "extrapolate"
    # The stacked path's adapters (server.engine.adapter_rows): the RL stream is `adapter` (named by the
    # served model name; "" = the first served) with its delta scaled by `lora_scale`; the base stream
    # is the base, or the served adapter `base_adapter` (an earlier checkpoint of the same run).
    adapter: str = ""
    base_adapter: str = ""
    lora_scale: float = 1.0

    @property
    def passthrough(self) -> str | None:
        """The model whose own logits the sampler may use unchanged, if any.

        The presets, and τ = −∞ (no proposal is ever rejected, so q is the generator's
        own distribution; likewise an entropy threshold of +∞ or a coin of probability 0):
        vLLM's sampler then applies temperature and top-p itself and
        the output is token-for-token that of the model alone.
        """
        if self.preset != "extrapolate":
            return self.preset
        never_flagged = {"delta_logp": self.tau == -math.inf, "entropy": self.tau == math.inf, "random": self.tau == 0}
        return self.generator if never_flagged[self.selection] else None

    @property
    def label(self) -> str:
        """The `preset` label of the metrics: extrapolated, rl or base."""
        return "extrapolated" if self.preset == "extrapolate" else self.preset

    def as_xargs(self) -> dict[str, Any]:
        """The settings as `vllm_xargs` entries (JSON-safe)."""
        return {"gamma": self.gamma, "tau": tau_json(self.tau), "generator": self.generator,
                "candidates": self.candidates, "selection": self.selection, "preset": self.preset,
                "adapter": self.adapter, "base_adapter": self.base_adapter, "lora_scale": self.lora_scale}


def tau_json(tau: float) -> float | str:
    """τ as JSON can carry it: ±inf as the strings `parse_tau` reads back."""
    return tau if math.isfinite(tau) else ("inf" if tau > 0 else "-inf")


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(field, f"'{field}' must be a number, got {value!r}")
    if math.isnan(value):
        raise SettingsError(field, f"'{field}' must not be NaN")
    return float(value)


def ranged(field: str, bounds: tuple[float, float]):
    """The parser of a number field that must lie in [lo, hi]."""
    def parse_number(value: Any) -> float:
        number = _number(field, value)
        lo, hi = bounds
        if not lo <= number <= hi:
            raise SettingsError(field, f"'{field}' must be in [{lo:g}, {hi:g}], got {value!r}")
        return number
    return parse_number


parse_gamma = ranged("gamma", GAMMA_RANGE)


def parse_tau(value: Any) -> float:
    """null → +inf (extrapolate everywhere); "-inf"/"inf" accepted since JSON has no infinities."""
    if value is None:
        return math.inf
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("inf", "+inf", "infinity", "+infinity"):
            return math.inf
        if word in ("-inf", "-infinity"):
            return -math.inf
        raise SettingsError("tau", f"'tau' must be a number, null, \"inf\" or \"-inf\", got {value!r}")
    return _number("tau", value)


def parse_generator(value: Any) -> str:
    if value not in GENERATORS:
        raise SettingsError("generator", f"'generator' must be one of {list(GENERATORS)}, got {value!r}")
    return value


def parse_candidates(value: Any, vocab_size: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SettingsError("candidates", f"'candidates' must be a non-negative integer, got {value!r}")
    limit = vocab_size or MAX_CANDIDATES
    if not 0 <= value <= limit:
        raise SettingsError("candidates", f"'candidates' must be in [0, {limit}] (0 = whole vocabulary), got {value}")
    return value


def parse_selection(value: Any) -> str:
    if value not in SELECTIONS:
        raise SettingsError("selection", f"'selection' must be one of {list(SELECTIONS)}, got {value!r}")
    return value


def parse_preset(value: Any) -> str:
    if value not in PRESETS:
        raise SettingsError("preset", f"'preset' must be one of {list(PRESETS)}, got {value!r}")
    return value


def adapter_parser(field: str):
    def parse_name(value: Any) -> str:
        if not isinstance(value, str):
            raise SettingsError(field, f"'{field}' must be the name of a served adapter, got {value!r}")
        return value
    return parse_name


@dataclass(frozen=True)
class ServedAdapters:
    """The adapters requests may name, set by `pair.engine_kwargs` in the process that admits
    requests: none on the two-backbone path. `scalable`: every adapter is LoRA on the projections
    only, so its delta can be scaled and the base stream can carry one (an adapter's own embeddings,
    norms or head are the RL stream's alone)."""

    names: tuple[str, ...] = ()
    scalable: bool = False
    base_streams: bool = False  # the engine holds several adapters, so a base stream can be one of them
    # name → the key its KV blocks are cached under: a new one each time a name is loaded at run time
    keys: dict[str, str] = field(default_factory=dict)

    def cache_key(self, found: Extrapolation) -> str:
        """What a request's cached KV depends on: both streams' adapters (as loaded now) and the scale."""
        key = lambda name: self.keys.get(name, name)  # noqa: E731
        return f"{key(found.adapter)}|{key(found.base_adapter)}|{found.lora_scale!r}"


_served_adapters = ServedAdapters()


def set_served_adapters(served: ServedAdapters) -> None:
    global _served_adapters
    _served_adapters = served


def served_adapters() -> ServedAdapters:
    return _served_adapters


def check_adapters(found: Extrapolation, served: ServedAdapters) -> Extrapolation:
    """The settings with `adapter` resolved to a served name ("" → the first); SettingsError for an
    adapter that is not served, or a scale or base adapter the served adapters cannot take."""
    if not served.names:
        for field, default in (("base_adapter", ""), ("lora_scale", 1.0)):
            if getattr(found, field) != default:
                raise SettingsError(field, f"'{field}' needs LoRA adapters: this server serves two full checkpoints")
        if found.adapter:
            raise SettingsError("model", f"no adapter {found.adapter!r} is served here")
        return found
    for field in ("adapter", "base_adapter"):
        name = getattr(found, field)
        if name and name not in served.names:
            raise SettingsError("model" if field == "adapter" else field,
                                f"'{field}': no served adapter is named {name!r}; served: {list(served.names)}")
    if not served.scalable and (found.base_adapter or found.lora_scale != 1.0):
        field = "base_adapter" if found.base_adapter else "lora_scale"
        raise SettingsError(field, f"'{field}' needs adapters that are LoRA on the projections only; a served "
                                   "adapter also changes embeddings, norms, biases or the output head")
    if found.base_adapter and not served.base_streams:
        raise SettingsError("base_adapter", "'base_adapter' needs an engine of several adapters (--lora-modules "
                                            "with two or more, or runtime loading with --max-loras of 2 or more)")
    return replace(found, adapter=found.adapter or served.names[0])


_server_defaults = Extrapolation()


def set_server_defaults(defaults: Extrapolation) -> None:
    """Set once by `rlvrx serve` (in the API server's process, where requests are admitted):
    the defaults for requests that reach the engine without the HTTP layer's fields, such
    as the other generation endpoints or raw `vllm_xargs`."""
    global _server_defaults
    _server_defaults = defaults


def server_defaults() -> Extrapolation:
    return _server_defaults


_PARSERS = {"gamma": parse_gamma, "tau": parse_tau, "generator": parse_generator,
            "candidates": parse_candidates, "selection": parse_selection, "preset": parse_preset,
            "adapter": adapter_parser("adapter"), "base_adapter": adapter_parser("base_adapter"),
            "lora_scale": ranged("lora_scale", LORA_SCALE_RANGE)}


def parse(values: Mapping[str, Any] | None, defaults: Extrapolation = Extrapolation(),
          vocab_size: int | None = None) -> Extrapolation:
    """Settings from a mapping (extra_args, or request fields); unknown keys are ignored."""
    values = values or {}
    changes = {}
    for name, parser in _PARSERS.items():
        if name in values:
            value = values[name]
            changes[name] = parse_candidates(value, vocab_size) if name == "candidates" else parser(value)
    found = replace(defaults, **changes)
    if found.selection == "random" and not 0.0 <= found.tau <= 1.0:
        raise SettingsError("tau", f"with selection 'random', 'tau' is the probability of extrapolating a position "
                                   f"and must be in [0, 1], got {found.tau!r}")
    return found
