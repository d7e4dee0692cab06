"""The V1 logits processor that turns each row into the extrapolated distribution.

Per request it reads the settings from `SamplingParams.extra_args` (validated at
admission by `validate_params`, which answers HTTP 400 naming the field). Each step it
takes the base model's rows left by the wrapper model (`server.engine.step`) and:

* rows that extrapolate get `kernels.combine`'s output, which already includes
  temperature and top-p; at admission their temperature and top-p were moved into
  `extra_args` and the sampler's set to 1, so vLLM does not apply them twice;
* rows of the `base` pass-through get the base model's logits, rows of the `rl`
  pass-through keep the RL logits: vLLM's sampler treats them as it would the model alone.

vLLM applies allowed-token, bad-words, min-tokens and logit-bias edits to the RL rows
before this processor; when a row has any, the same edits are carried over to its
base row (the difference against an unedited copy), so both models see one request.

Bookkeeping (on the first tensor-parallel rank only; every rank combines the same rows):
M of each extrapolated row goes to its request's stats slot at its output position, and
at the next step the rows whose token vLLM kept are settled for the metrics (`settle`);
device values reach the host without blocking the step (`server.engine.host_reads`).
"""

import functools
import math
import os
import time
from dataclasses import dataclass, field

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rlvrx.kernels import GREEDY_EPS, SELECTION, RowSettings, combine
from rlvrx.server.engine import metrics
from rlvrx.server.engine import settings as settings_mod
from rlvrx.server.engine import stats
from rlvrx.server.engine.host_reads import HostReads, to_device
from rlvrx.server.engine.step import STEP

TEMPERATURE_KEY = "_rlvrx_temperature"
TOP_P_KEY = "_rlvrx_top_p"
# The private extra_args keys: written at admission (the API server's middleware and
# validate_params, in one process), never taken from a client.
PRIVATE_KEYS = (stats.SLOT_KEY, stats.ADMISSION_KEY, TEMPERATURE_KEY, TOP_P_KEY)


@dataclass(frozen=True)
class RowState:
    settings: settings_mod.Extrapolation
    temperature: float
    top_p: float
    stats_slot: int | None
    edits_logits: bool  # vLLM edits this row's RL logits before the processor
    output_ids: list[int]  # vLLM's running list of the request's generated tokens
    # {output position: M} last written to the stats slot, for the positions not yet behind the
    # output: a position sampled again (a prompt prefilled in chunks, a rejected draft position of
    # speculative decoding) replaces its value instead of adding to it.
    written: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RowLayout:
    """Which request each logits row belongs to and which of its output positions it samples, counted
    from the request's next one. Without speculative decoding row i is request i at offset 0; with it a
    request has one row per draft token and one bonus row (server.engine.speculative)."""

    requests: tuple[int, ...]  # batch index of each row's request
    offsets: tuple[int, ...]  # each row's output position past the request's current output


@functools.lru_cache(maxsize=64)
def plain_layout(num_rows: int) -> RowLayout:
    """Row i is request i at offset 0. Cached: the per-step check that the plan still fits compares
    the same object, not two tuples of the batch's length."""
    return RowLayout(tuple(range(num_rows)), (0,) * num_rows)


@dataclass(frozen=True)
class BatchPlan:
    """Index tensors and settings for the current batch, rebuilt when it changes."""

    ext_rows: torch.Tensor | None  # rows that extrapolate (None: none do)
    ext_all: bool  # every row of the batch extrapolates, in order
    base_rows: torch.Tensor | None  # rows of the base pass-through
    settings: RowSettings | None  # settings of ext_rows, in that order
    states: list[RowState]  # every row of the batch, in order
    offsets: list[int]  # each of those rows' output position past its request's current output
    ext_states: list[RowState]  # the states of ext_rows, in that order
    ext_offsets: list[int]  # the offsets of ext_rows, in that order
    ext_position: list[int | None]  # each row's index in ext_states (None: not extrapolated)


@dataclass(frozen=True)
class SampledStep:
    """One step's rows, settled at the next step once vLLM has kept (or thrown away) their tokens."""

    states: list[RowState]
    positions: list[int]  # the output position each row sampled
    offsets: list[int]  # each row's offset past its request's output (> 0: the row verified a draft)
    ext_position: list[int | None]  # each row's index in the step's extrapolated rows
    prob: torch.Tensor | None  # [rows of ext] M of each extrapolated row, on the device
    delta: torch.Tensor | None  # [rows of ext, V] Δlog p of the extrapolated rows, on the device


def read_settings(params: SamplingParams, defaults: settings_mod.Extrapolation = settings_mod.Extrapolation()
                  ) -> settings_mod.Extrapolation:
    try:
        return settings_mod.parse(params.extra_args, defaults)
    except settings_mod.SettingsError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.field, value=(params.extra_args or {}).get(exc.field)) from None


def row_settings(states: list[RowState], device: torch.device) -> RowSettings:
    """`kernels.combine`'s settings for rows of these states, in this order."""
    as_tensor = lambda values, dtype: to_device(values, dtype, device)  # noqa: E731
    selection = [SELECTION[r.settings.selection] for r in states]
    return RowSettings(
        gamma=as_tensor([r.settings.gamma for r in states], torch.float32),
        tau=as_tensor([r.settings.tau for r in states], torch.float32),
        use_base=as_tensor([r.settings.generator == "base" for r in states], torch.bool),
        candidates=as_tensor([r.settings.candidates for r in states], torch.int64),
        temperature=as_tensor([r.temperature for r in states], torch.float32),
        top_p=as_tensor([r.top_p for r in states], torch.float32),
        selection=as_tensor(selection, torch.int64) if any(selection) else None,  # None: the fused kernel's path
    )


def check_private(args: dict) -> None:
    """Private keys pass only with this server's admission token and well-formed values: a
    client that sends one (on any route) gets a 400, never an engine that fails on it."""
    private = [k for k in args if isinstance(k, str) and k.startswith(stats.PRIVATE_PREFIX)]
    if not private:
        return
    if args.get(stats.ADMISSION_KEY) != stats.ADMISSION_TOKEN or any(k not in PRIVATE_KEYS for k in private):
        key = next((k for k in private if k != stats.ADMISSION_KEY), private[0])
        raise VLLMValidationError(f"'vllm_xargs.{key}' is reserved for the server", parameter=f"vllm_xargs.{key}")
    slot = args.get(stats.SLOT_KEY)
    if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < stats.SLOTS):
        raise VLLMValidationError(f"bad statistics slot {slot!r}", parameter=f"vllm_xargs.{stats.SLOT_KEY}")
    for key, low in ((TEMPERATURE_KEY, 0.0), (TOP_P_KEY, 1e-9)):
        value = args.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= (1 if key == TOP_P_KEY else math.inf):
            raise VLLMValidationError(f"bad value {value!r}", parameter=f"vllm_xargs.{key}")


def edits_logits(params: SamplingParams) -> bool:
    return bool(params.allowed_token_ids or params.bad_words or params.logit_bias
                or params.min_tokens or params.structured_outputs is not None)


class ExtrapolationLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Check the settings and write them out in full (missing fields take the server's
        defaults), so the engine process needs no defaults; for extrapolating requests, take
        over temperature and top-p."""
        check_private(params.extra_args or {})
        found = read_settings(params, settings_mod.server_defaults())
        served = settings_mod.served_adapters()
        try:
            found = settings_mod.check_adapters(found, served)
        except settings_mod.SettingsError as exc:
            raise VLLMValidationError(str(exc), parameter=exc.field) from None
        args = {**(params.extra_args or {}), **found.as_xargs()}
        if served.names:
            args[settings_mod.ADAPTERS_KEY] = served.cache_key(found)
        if found.passthrough is None and TEMPERATURE_KEY not in args:
            args.update({TEMPERATURE_KEY: params.temperature, TOP_P_KEY: params.top_p,
                         stats.ADMISSION_KEY: stats.ADMISSION_TOKEN})
            if params.temperature >= GREEDY_EPS:
                params.temperature = 1.0
            params.top_p = 1.0
        params.extra_args = args

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, RowState] = {}
        self.plan: BatchPlan | None = None
        self.plan_layout: RowLayout | None = None  # the layout self.plan was built for
        names = vllm_config.model_config.served_model_name
        self.model_name = names[0] if isinstance(names, (list, tuple)) else str(names)
        # Every tensor-parallel rank runs this processor on the same rows; only the first records.
        self.records = get_tensor_model_parallel_rank() == 0
        self.table = self.open_table() if self.records else None
        marks = (self.table.mark_submitted, self.table.mark_done) if self.table is not None else ()
        self.reads = HostReads(device.type == "cuda", *marks)
        self.sampled: SampledStep | None = None  # the last step's rows, settled at the next step

    @staticmethod
    def open_table() -> stats.StatsTable | None:
        # Named by `rlvrx serve` in the environment rather than the model config: a path in the
        # config would change vLLM's compile-cache key at every start.
        path = os.environ.get(stats.ENV)
        if not path:
            return None
        try:
            return stats.StatsTable(path)
        except (OSError, ValueError):  # engine on another host: the API server's table is not here
            return None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.rows, batch_update, self.new_row):
            self.plan = None
            STEP.keep_rl_raw = any(row.edits_logits for row in self.rows.values())

    @staticmethod
    def new_row(params: SamplingParams, prompt_ids, output_ids) -> RowState:
        """A row's state from extra_args as admission (validate_params) wrote them."""
        args = params.extra_args or {}
        return RowState(
            settings=read_settings(params),
            temperature=float(args.get(TEMPERATURE_KEY, params.temperature)),
            top_p=float(args.get(TOP_P_KEY, params.top_p)),
            stats_slot=args.get(stats.SLOT_KEY),
            edits_logits=edits_logits(params),
            output_ids=output_ids,
        )

    def build_plan(self, layout: RowLayout) -> BatchPlan:
        rows = [r for r, request in enumerate(layout.requests) if request in self.rows]
        row_state = {r: self.rows[layout.requests[r]] for r in rows}
        ext = [r for r in rows if row_state[r].settings.passthrough is None]
        base = [r for r in rows if row_state[r].settings.passthrough == "base"]
        ext_states = [row_state[r] for r in ext]
        position = {row: pos for pos, row in enumerate(ext)}
        return BatchPlan(
            ext_rows=to_device(ext, torch.int64, self.device) if ext else None,
            ext_all=ext == list(range(len(layout.requests))),
            base_rows=to_device(base, torch.int64, self.device) if base else None,
            settings=row_settings(ext_states, self.device) if ext else None,
            states=[row_state[r] for r in rows],
            offsets=[layout.offsets[r] for r in rows],
            ext_states=ext_states,
            ext_offsets=[layout.offsets[r] for r in ext],
            ext_position=[position.get(r) for r in rows],
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.apply_rows(logits, plain_layout(logits.shape[0]))

    def apply_rows(self, logits: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """`apply` for logits rows laid out as `layout` says."""
        if self.records:
            self.settle()
        if not self.rows:
            return logits
        started = time.perf_counter()
        if self.plan is None or self.plan_layout != layout:
            self.plan, self.plan_layout = self.build_plan(layout), layout
        plan = self.plan
        prob, delta = None, None
        if plan.ext_rows is not None or plan.base_rows is not None:
            logits, prob, delta = self.combine_rows(logits, plan)
        if self.records:
            self.record(plan, prob, delta)
            metrics.COMBINE_SECONDS.labels(self.model_name).observe(time.perf_counter() - started)
        return logits

    def combine_rows(self, logits: torch.Tensor, plan: BatchPlan
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The batch's logits with extrapolated and base rows replaced; M and Δlog p of the extrapolated rows."""
        base = STEP.base
        if base is None or base.shape != logits.shape:
            raise RuntimeError(
                "the extrapolation processor found no base-model logits for this step: "
                "it needs the RLVRExtrapolationForCausalLM wrapper model (see `rlvrx serve`)"
            )
        if STEP.rl_raw is not None:
            # Carry vLLM's edits of the RL rows (masks, biases) over to the base rows.
            edits = logits - STEP.rl_raw.float()
            base = torch.where(logits == -math.inf, -math.inf, base.float() + edits.nan_to_num(0.0))
        if plan.base_rows is not None:
            logits[plan.base_rows] = base[plan.base_rows].float()
        if plan.ext_rows is None:
            return logits, None, None
        if plan.ext_all:
            logits, prob, delta = combine(logits, base, plan.settings, want_delta=True)
        else:
            out, prob, delta = combine(logits[plan.ext_rows], base[plan.ext_rows], plan.settings, want_delta=True)
            logits[plan.ext_rows] = out
        return logits, prob, delta

    def record(self, plan: BatchPlan, prob: torch.Tensor | None, delta: torch.Tensor | None) -> None:
        """Have M of each extrapolated row with a slot written to its output position (the API
        server reads the slot when the last token arrives), and keep the step to settle the
        metrics once the kept tokens are known."""
        writes = [(state, len(state.output_ids), offset, pos)
                  for pos, (state, offset) in enumerate(zip(plan.ext_states, plan.ext_offsets))
                  if state.stats_slot is not None]
        if writes and self.table is not None:
            self.reads.submit([prob], lambda values: self.write_stats(writes, values[0]))
        positions = [len(s.output_ids) + offset for s, offset in zip(plan.states, plan.offsets)]
        self.sampled = SampledStep(states=plan.states, positions=positions, offsets=plan.offsets,
                                   ext_position=plan.ext_position, prob=prob, delta=delta)

    def write_stats(self, writes: list[tuple[RowState, int, int, int]], prob: list[float]) -> None:
        for state, length, offset, pos in writes:
            if offset == 0:  # positions behind the output are final
                for done in [p for p in state.written if p < length]:
                    del state.written[done]
            position = length + offset
            # sampled again for the same position: replace
            self.table.add(state.stats_slot, position, prob[pos] - state.written.get(position, 0.0))
            state.written[position] = prob[pos]

    def settle(self) -> None:
        """Metrics of the last step's rows whose token vLLM kept (its output list grew; a
        non-final chunk of a prompt keeps none): Δlog p of each kept extrapolated token, and
        the token counts of rows without a stats slot (the API server counts the others from
        the response, where tokens sampled after a stop are left out too). Runs in `apply`,
        after async scheduling has replaced the last step's placeholder ids (-1) with the
        sampled ones; a placeholder that is still there is not read."""
        step, self.sampled = self.sampled, None
        if step is None:
            return
        picked_rows, picked_tokens, picked_names, unslotted, unslotted_names = [], [], [], [], []
        for state, length, offset, pos in zip(step.states, step.positions, step.offsets, step.ext_position):
            name = self.name_of(state)
            # Rows 1..n of a request with n drafts (speculative decoding): row j is kept iff draft j was accepted.
            if offset:
                metrics.DRAFT_TOKENS.labels(name, state.settings.label).inc()
            if len(state.output_ids) <= length:
                continue
            if offset:
                metrics.ACCEPTED_DRAFT_TOKENS.labels(name, state.settings.label).inc()
            if state.stats_slot is None:
                metrics.GENERATED_TOKENS.labels(name, state.settings.label).inc()
                if pos is not None:
                    unslotted.append(pos)
                    unslotted_names.append(name)
            if pos is not None and 0 <= (token := state.output_ids[length]) < step.delta.shape[1]:
                picked_rows.append(pos)
                picked_tokens.append(token)
                picked_names.append(name)
        if not picked_rows and not unslotted:
            return
        index = lambda values: to_device(values, torch.int64, step.delta.device)  # noqa: E731
        rows, tokens = index(picked_rows), index(picked_tokens)
        self.reads.submit([step.prob[index(unslotted)], step.delta[rows, tokens]],
                          functools.partial(self.observe, unslotted_names, picked_names))

    def name_of(self, state: RowState) -> str:
        """The `model_name` label of a row: its adapter's served name, else the engine's."""
        return state.settings.adapter or self.model_name

    def observe(self, unslotted_names: list[str], picked_names: list[str], values: list[list[float]]) -> None:
        """Metrics from device values: M of kept rows without a slot, Δlog p of kept tokens."""
        unslotted_prob, delta = values
        for name, prob in zip(unslotted_names, unslotted_prob):
            metrics.EXTRAPOLATED_TOKENS.labels(name, "extrapolated").inc(prob)
        for name, value in zip(picked_names, delta):
            if math.isfinite(value):  # a row without a distribution has NaN Δ
                metrics.DELTA_LOGP.labels(name, "extrapolated").observe(value)
