"""Per-row adapters of the stacked model: which LoRA adapter, at which scale, each row of a step adds.

A stacked engine may hold several adapters of one base (`rlvrx serve --lora-modules`). Each request
names its RL stream's adapter (`adapter`, from the served model name), a scale of that adapter's delta
(`lora_scale`: W + scale·s·B·A, weight-space extrapolation) and, for its base stream, the base itself
or another served adapter (`base_adapter`, e.g. an earlier checkpoint of the same run) — all in its
`SamplingParams.extra_args`, written in full at admission (server.engine.settings).

Before each forward pass the model runner's `_prepare_inputs` is followed by `plan_step`, which turns
the batch's requests and scheduled token counts into groups of rows that share one adapter and scale
(`ROWS`, this process's plan). With several adapters every LoRA layer of the stacked model then calls
`lora_delta`, a custom op (opaque to torch.compile, so the compiled graph reads each step's plan): one
low-rank product per group over that group's rows only, so a step costs the adapters it uses, once
each, whatever the number of adapters held. Forward passes with no plan of their own (vLLM's warm-up
and profiling runs) give every RL row the first adapter. With one adapter there is nothing to group:
the layers add it to every RL row inside the compiled graph, each token's row scaled by its
request's `lora_scale` (`token_scales`, written here before each step), at the cost of one adapter.

The KV cache of a row depends on both streams' adapters and the scale, so prefix caching keys each
request's blocks by them (`salt_cache`): vLLM's block hash takes the request's `cache_salt`.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlvrx.server.engine.host_reads import to_device
from rlvrx.server.engine.settings import ADAPTERS_KEY

RL, BASE = 0, 1  # the two streams, in the stacked model's row order [rl; base]


@dataclass(frozen=True)
class Group:
    """Rows of one stream that add the delta of adapter `slot` times `scale`."""

    stream: int
    slot: int
    scale: float
    ranges: tuple[tuple[int, int], ...]  # [start, end) token ranges of the stream's half


def request_streams(args: dict, slots: dict[str, int]) -> tuple[tuple[int, float], tuple[int, float] | None]:
    """(slot, scale) of a request's RL stream and of its base stream (None: the base, no adapter)."""
    rl = (slots.get(args.get("adapter") or "", 0), float(args.get("lora_scale", 1.0)))
    base_adapter = args.get("base_adapter") or ""
    return rl, ((slots[base_adapter], 1.0) if base_adapter else None)


def grouped(streams: list[tuple[tuple[int, float], tuple[int, float] | None]], counts: np.ndarray) -> tuple[Group, ...]:
    """The groups of a batch: request i has counts[i] consecutive tokens; runs of requests that share a
    stream's adapter and scale join one range."""
    ranges: dict[tuple[int, int, float], list[list[int]]] = {}
    start = 0
    for (rl, base), count in zip(streams, counts.tolist()):
        for stream, key in ((RL, rl), (BASE, base)):
            if key is None or count == 0:
                continue
            runs = ranges.setdefault((stream, *key), [])
            if runs and runs[-1][1] == start:
                runs[-1][1] = start + count
            else:
                runs.append([start, start + count])
        start += count
    return tuple(Group(stream, slot, scale, tuple(map(tuple, runs))) for (stream, slot, scale), runs in ranges.items())


class AdapterRows:
    """This process's plan of the current step (set by the model runner, read by `lora_delta`)."""

    def __init__(self):
        self.slots: dict[str, int] = {}  # adapter name → slot; set by a stacked model with adapters
        self.requests: dict[str, tuple] = {}  # request id → request_streams(), cached
        self.tokens = 0  # scheduled tokens of the planned step (0: no plan)
        self.groups: tuple[Group, ...] = ()
        # One adapter: each token's scale of its RL row's delta (set by the stacked model, read inside
        # its compiled graph); `scaled` tokens at its start may hold a scale other than 1.
        self.token_scales: torch.Tensor | None = None
        self.scaled = 0

    def plan_step(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        streams = []
        for req_id in runner.input_batch.req_ids:
            if req_id not in self.requests:
                params = runner.requests[req_id].sampling_params
                self.requests[req_id] = request_streams(getattr(params, "extra_args", None) or {}, self.slots)
            streams.append(self.requests[req_id])
        if len(self.requests) > 4 * len(streams) + 64:  # forget finished requests
            keep = set(runner.input_batch.req_ids)
            self.requests = {r: v for r, v in self.requests.items() if r in keep}
        self.tokens = int(num_scheduled_tokens.sum())
        self.groups = grouped(streams, num_scheduled_tokens)
        self.indices.cache_clear()
        if self.token_scales is not None:
            self.write_scales([rl[1] for rl, _ in streams], num_scheduled_tokens)

    def write_scales(self, scales: list[float], counts: np.ndarray) -> None:
        if all(scale == 1.0 for scale in scales):
            if self.scaled:
                self.token_scales[:self.scaled].fill_(1.0)
            self.scaled = 0
            return
        per_token = np.repeat(np.asarray(scales, dtype=np.float32), counts)
        self.token_scales[:len(per_token)].copy_(to_device(per_token.tolist(), self.token_scales.dtype,
                                                           self.token_scales.device))
        self.scaled = len(per_token)

    def rows(self, num_rows: int, device: torch.device) -> list[tuple[int, float, slice | torch.Tensor]]:
        """(slot, scale, rows) of each group, for a forward pass over `num_rows` = 2·T rows (T ≥ the
        step's tokens when the runner pads the batch)."""
        half = num_rows // 2
        if not self.tokens or half < self.tokens:  # a warm-up or profiling pass
            return [(0, 1.0, slice(0, half))]
        return self.indices(half, device)

    @functools.lru_cache(maxsize=8)
    def indices(self, half: int, device: torch.device) -> list[tuple[int, float, slice | torch.Tensor]]:
        out = []
        for group in self.groups:
            offset = half * group.stream
            if len(group.ranges) == 1:
                (start, end), = group.ranges
                rows = slice(offset + start, offset + end)
            else:
                rows = to_device([i for start, end in group.ranges for i in range(offset + start, offset + end)],
                                 torch.int64, device)
            out.append((group.slot, group.scale, rows))
        return out


ROWS = AdapterRows()


@torch.library.custom_op("rlvrx::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[rows, out]: each row's adapter delta scale·(x·Aᵀ)·Bᵀ as this step's plan assigns it (zero for
    rows with no adapter). a: [adapters, R, in], b: [adapters, out, R] (s folded in, ranks padded)."""
    out = x.new_zeros(x.shape[0], b.shape[1])
    for slot, scale, rows in ROWS.rows(x.shape[0], x.device):
        h = F.linear(x[rows], a[slot])
        out[rows] = F.linear(h if scale == 1.0 else h * scale, b[slot])
    return out


@lora_delta.register_fake
def _(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], b.shape[1])


def salt_cache(request) -> None:
    """Key the request's cached KV blocks by its streams' adapters and scale (an EngineCoreRequest;
    the key was written at admission, server.engine.processor)."""
    args = getattr(request.sampling_params, "extra_args", None) or {}
    if ADAPTERS_KEY in args:
        key = f"rlvrx:{args[ADAPTERS_KEY]}"
        request.cache_salt = f"{request.cache_salt}|{key}" if request.cache_salt else key


def install() -> None:
    """Plan each step after vLLM prepares its inputs; salt each request as the engine core takes it."""
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prepare = GPUModelRunner._prepare_inputs
    if getattr(prepare, "rlvrx", False):
        return

    @functools.wraps(prepare)
    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if ROWS.slots:
            ROWS.plan_step(self, num_scheduled_tokens)
        return out

    prepare_inputs.rlvrx = True
    GPUModelRunner._prepare_inputs = prepare_inputs
    from_request = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls, request, block_hasher):
        salt_cache(request)
        return from_request(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)
