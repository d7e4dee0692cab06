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
"""

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from kernels import GREEDY_EPS, SELECTION, RowSettings, combine
from server.engine import metrics
from server.engine import settings as settings_mod
from server.engine.stats import FILE_KEY, SLOT_KEY, StatsTable
from server.engine.step import STEP

TEMPERATURE_KEY = "_rlvrx_temperature"
TOP_P_KEY = "_rlvrx_top_p"


@dataclass(frozen=True)
class RowState:
    settings: settings_mod.Extrapolation
    temperature: float
    top_p: float
    stats_file: str | None
    stats_slot: int | None
    edits_logits: bool  # vLLM edits this row's RL logits before the processor
    output_ids: list[int]  # vLLM's running list of the request's generated tokens


@dataclass(frozen=True)
class BatchPlan:
    """Index tensors and settings for the current batch, rebuilt when it changes."""

    ext_rows: torch.Tensor | None  # rows that extrapolate (None: none do)
    ext_all: bool  # every row of the batch extrapolates, in order
    base_rows: torch.Tensor | None  # rows of the base pass-through
    settings: RowSettings | None  # settings of ext_rows, in that order
    stats: list[tuple[int, str, int]]  # (position in ext_rows, file, slot)
    rows_per_label: Counter  # rows of each metrics label (extrapolated, rl, base)
    ext_states: list[RowState]  # the states of ext_rows, in that order


def read_settings(params: SamplingParams, defaults: settings_mod.Extrapolation = settings_mod.Extrapolation()
                  ) -> settings_mod.Extrapolation:
    try:
        return settings_mod.parse(params.extra_args, defaults)
    except settings_mod.SettingsError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.field, value=(params.extra_args or {}).get(exc.field)) from None


def edits_logits(params: SamplingParams) -> bool:
    return bool(params.allowed_token_ids or params.bad_words or params.logit_bias
                or params.min_tokens or params.structured_outputs is not None)


class ExtrapolationLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Check the settings and write them out in full (missing fields take the server's
        defaults), so the engine process needs no defaults; for extrapolating requests, take
        over temperature and top-p."""
        found = read_settings(params, settings_mod.server_defaults())
        args = {**(params.extra_args or {}), **found.as_xargs()}
        if found.passthrough is None and TEMPERATURE_KEY not in args:
            args.update({TEMPERATURE_KEY: params.temperature, TOP_P_KEY: params.top_p})
            if params.temperature >= GREEDY_EPS:
                params.temperature = 1.0
            params.top_p = 1.0
        params.extra_args = args

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, RowState] = {}
        self.plan: BatchPlan | None = None
        self.tables: dict[str, StatsTable | None] = {}
        names = vllm_config.model_config.served_model_name
        self.model_name = names[0] if isinstance(names, (list, tuple)) else str(names)
        # Δ rows of the last step's extrapolated rows, read once their sampled token is known.
        self.pending_delta: tuple[torch.Tensor, list[tuple[int, list[int], int]]] | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.observe_emitted_delta()
        if process_dict_updates(self.rows, batch_update, self.new_row):
            self.plan = None
            STEP.keep_rl_raw = any(row.edits_logits for row in self.rows.values())

    @staticmethod
    def new_row(params: SamplingParams, prompt_ids, output_ids) -> RowState:
        args = params.extra_args or {}
        slot = args.get(SLOT_KEY)
        return RowState(
            settings=read_settings(params),
            temperature=float(args.get(TEMPERATURE_KEY, params.temperature)),
            top_p=float(args.get(TOP_P_KEY, params.top_p)),
            stats_file=args.get(FILE_KEY) if slot is not None else None,
            stats_slot=int(slot) if slot is not None else None,
            edits_logits=edits_logits(params),
            output_ids=output_ids,
        )

    def build_plan(self, num_rows: int) -> BatchPlan:
        ext = sorted(i for i, r in self.rows.items() if i < num_rows and r.settings.passthrough is None)
        base = sorted(i for i, r in self.rows.items() if i < num_rows and r.settings.passthrough == "base")
        states = [self.rows[i] for i in ext]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)  # noqa: E731
        selection = [SELECTION[r.settings.selection] for r in states]
        row_settings = RowSettings(
            gamma=as_tensor([r.settings.gamma for r in states], torch.float32),
            tau=as_tensor([r.settings.tau for r in states], torch.float32),
            use_base=as_tensor([r.settings.generator == "base" for r in states], torch.bool),
            candidates=as_tensor([r.settings.candidates for r in states], torch.int64),
            temperature=as_tensor([r.temperature for r in states], torch.float32),
            top_p=as_tensor([r.top_p for r in states], torch.float32),
            selection=as_tensor(selection, torch.int64) if any(selection) else None,  # None: the fused kernel's path
        ) if ext else None
        return BatchPlan(
            ext_rows=as_tensor(ext, torch.int64) if ext else None,
            ext_all=ext == list(range(num_rows)),
            base_rows=as_tensor(base, torch.int64) if base else None,
            settings=row_settings,
            stats=[(pos, r.stats_file, r.stats_slot) for pos, r in enumerate(states) if r.stats_slot is not None],
            rows_per_label=Counter(r.settings.label for i, r in self.rows.items() if i < num_rows),
            ext_states=states,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        started = time.perf_counter()
        if self.plan is None:
            self.plan = self.build_plan(logits.shape[0])
        plan = self.plan
        for label, count in plan.rows_per_label.items():
            metrics.GENERATED_TOKENS.labels(self.model_name, label).inc(count)
        if plan.ext_rows is not None or plan.base_rows is not None:
            logits = self.combine_rows(logits, plan)
        metrics.COMBINE_SECONDS.labels(self.model_name).observe(time.perf_counter() - started)
        return logits

    def combine_rows(self, logits: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
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
        if plan.ext_rows is not None:
            if plan.ext_all:
                logits, prob, delta = combine(logits, base, plan.settings, want_delta=True)
            else:
                out, prob, delta = combine(logits[plan.ext_rows], base[plan.ext_rows], plan.settings, want_delta=True)
                logits[plan.ext_rows] = out
            self.record(plan, prob)
            self.pending_delta = (delta, [(pos, r.output_ids, len(r.output_ids)) for pos, r in enumerate(plan.ext_states)])
        return logits

    def observe_emitted_delta(self) -> None:
        """Δlog p of the tokens sampled from last step's extrapolated rows, now that vLLM
        has appended them to the requests' output lists (finished requests included)."""
        if self.pending_delta is None:
            return
        delta, rows = self.pending_delta
        self.pending_delta = None
        picked = [(pos, ids[n]) for pos, ids, n in rows if len(ids) > n and 0 <= ids[n] < delta.shape[1]]
        if not picked:
            return
        positions = torch.tensor([p for p, _ in picked], device=delta.device)
        tokens = torch.tensor([t for _, t in picked], device=delta.device)
        histogram = metrics.DELTA_LOGP.labels(self.model_name, "extrapolated")
        for value in delta[positions, tokens].tolist():
            histogram.observe(value)

    def record(self, plan: BatchPlan, prob: torch.Tensor) -> None:
        values = prob.tolist()
        metrics.EXTRAPOLATED_TOKENS.labels(self.model_name, "extrapolated").inc(sum(values))
        by_file: dict[str, tuple[list[int], list[float]]] = {}
        for pos, path, slot in plan.stats:
            slots, vals = by_file.setdefault(path, ([], []))
            slots.append(slot)
            vals.append(values[pos])
        for path, (slots, vals) in by_file.items():
            table = self.table(path)
            if table is not None:
                table.add(slots, vals)

    def table(self, path: str) -> StatsTable | None:
        if path not in self.tables:
            try:
                self.tables[path] = StatsTable(path)
            except OSError:  # engine on another host: the API server's table is not here
                self.tables[path] = None
        return self.tables[path]
