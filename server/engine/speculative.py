"""Speculative decoding verified against the rule's distribution q.

vLLM 0.32 refuses custom logits processors under `--speculative-config`, and its rejection sampler
would verify the drafts against the RL model's logits. Here the engine keeps the extrapolation
processor (`build_logitsprocs`) and turns every row the rejection sampler receives into the row the
processor would hand the sampler without speculation (`verify_against_q`): for each request, one row per
draft token and the bonus row, each at its own output position. The wrapper models already ran both
streams over every scheduled token, drafts included, so the base logits of those rows are in
`server.engine.step.STEP`. vLLM then accepts and resamples the drafts against q exactly as against a
single model's distribution: a greedy request accepts a draft iff it is the rule's greedy pick, a
sampled one with probability q(draft), and a rejected position is redrawn from q less the draft.

vLLM's edits of the RL rows (allowed tokens, bad words, min tokens, structured-output masks) reach the
base rows as without speculation: the same vLLM functions edit each row first, and the processor
carries the difference over. vLLM applies them again afterwards, which changes nothing (masks), and
applies penalties and top-k after q, as it does without speculation.

A step in which no request has a draft (none matched, or `disable_by_batch_size` silenced the drafter,
server.engine.draft_gate) samples as without speculation (`sample_plainly_without_drafts`): vLLM would
send it through the rejection sampler all the same, which on this CPU costs ~9 ms a step more (in
every engine the plugin loads in, vLLM serving one model included).
"""

import dataclasses
import functools

import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.logits_processor import _load_custom_logitsprocs as load_custom_logitsprocs
from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker import gpu_model_runner

from rlvrx.server.engine.processor import ExtrapolationLogitsProcessor, RowLayout
from rlvrx.server.engine.step import STEP


def install() -> None:
    if getattr(RejectionSampler.forward, "rlvrx", False):
        return
    gpu_model_runner.build_logitsprocs = keep_extrapolation_processor(gpu_model_runner.build_logitsprocs)
    RejectionSampler.forward = verify_against_q(RejectionSampler.forward)
    RejectionSampler.forward.rlvrx = True
    gpu_model_runner.GPUModelRunner._sample = sample_plainly_without_drafts(gpu_model_runner.GPUModelRunner._sample)


def keep_extrapolation_processor(build):
    """vLLM's `build_logitsprocs`, which under speculative decoding keeps the extrapolation processor
    beside the one built-in processor vLLM keeps there (min tokens) instead of refusing it."""

    @functools.wraps(build)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        if (vllm_config.speculative_config is None or is_pooling_model
                or load_custom_logitsprocs(tuple(custom_logitsprocs)) != [ExtrapolationLogitsProcessor]):
            return build(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)
        return LogitsProcessors([MinTokensLogitsProcessor(vllm_config, device, is_pin_memory),
                                 ExtrapolationLogitsProcessor(vllm_config, device, is_pin_memory)])

    return build_logitsprocs


def sample_plainly_without_drafts(sample):
    """The model runner's `_sample`, which for a step without drafts takes vLLM's plain sampler: one row
    per request, as the rejection sampler's would be, and the same [requests, 1] output, which vLLM's
    bookkeeping reads as a step without speculation. In every engine the plugin loads in, vLLM alone
    included, so that `:rl` and `:base` stay the same floats as vLLM serving their model."""

    @functools.wraps(sample)
    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: SpecDecodeMetadata | None):
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return sample(self, logits, spec_decode_metadata)

    return _sample


def extrapolation_processor(sampling_metadata: SamplingMetadata) -> ExtrapolationLogitsProcessor | None:
    return next((p for p in sampling_metadata.logitsprocs.non_argmax_invariant
                 if isinstance(p, ExtrapolationLogitsProcessor)), None)


def verify_against_q(forward):
    @functools.wraps(forward)
    def verify(self: RejectionSampler, metadata: SpecDecodeMetadata, draft_probs: torch.Tensor | None,
               logits: torch.Tensor, sampling_metadata: SamplingMetadata):
        processors = sampling_metadata.logitsprocs
        ours = extrapolation_processor(sampling_metadata)
        if ours is None:
            return forward(self, metadata, draft_probs, logits, sampling_metadata)
        logits = logits.float()
        if STEP.rl_raw is not None:
            logits = edit_rows(self, logits, metadata, sampling_metadata)
        logits = ours.apply_rows(logits, layout(tuple(metadata.num_draft_tokens)))
        # The bonus rows now hold q: the sampler that draws them must not run the processor again.
        others = LogitsProcessors(p for p in processors.all if p is not ours)
        return forward(self, metadata, draft_probs, logits, dataclasses.replace(sampling_metadata, logitsprocs=others))

    return verify


@functools.lru_cache(maxsize=64)
def layout(num_draft_tokens: tuple[int, ...]) -> RowLayout:
    """Rows of the rejection sampler's logits: each request's draft positions, then its bonus position."""
    requests = tuple(i for i, n in enumerate(num_draft_tokens) for _ in range(n + 1))
    offsets = tuple(j for n in num_draft_tokens for j in range(n + 1))
    return RowLayout(requests, offsets)


def edit_rows(sampler: RejectionSampler, logits: torch.Tensor, metadata: SpecDecodeMetadata,
              sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """The RL rows with vLLM's masks applied as vLLM applies them to draft and bonus rows, without the
    penalties (they act on q, after the processor, as without speculation)."""
    masks_only = dataclasses.replace(sampling_metadata, no_penalties=True, thinking_budget_state_holder=None)
    targets, bonus = metadata.target_logits_indices, metadata.bonus_logits_indices
    logits[targets] = sampler.apply_logits_processors(logits[targets], masks_only, metadata)
    min_tokens = LogitsProcessors(p for p in sampling_metadata.logitsprocs.non_argmax_invariant
                                  if isinstance(p, MinTokensLogitsProcessor))
    logits[bonus] = sampler.sampler.apply_logits_processors(
        logits[bonus], dataclasses.replace(masks_only, logitsprocs=min_tokens), predict_bonus_token=True)
    return logits
