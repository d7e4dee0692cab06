"""Prompt logprobs per served name: a patch of vLLM's prompt-logprobs step.

Prompt logprobs (`prompt_logprobs`, and `/v1/completions` with `echo` and `logprobs`, which is how
lm-evaluation-harness scores loglikelihood tasks) are computed by vLLM 0.32's model runner in
`_get_prompt_logprobs_dict`, after the step's sampling: per request, the model's
`compute_logits` on the prompt's hidden states, then `sampler.compute_logprobs` (a log-softmax),
with no logits processor and nothing that knows the request's settings. The wrapper models'
`compute_logits` returns the RL model's logits, so every name would score prompts with the RL
model. No plugin surface reaches that step, so for its duration `compute_logprobs` is replaced by
one that knows whose rows it is given and scores them as the generation path reports a token:

* `<name>:rl`: the RL model's log-softmax (vLLM's own computation);
* `<name>:base`: the base model's log-softmax (the rows `compute_logits` left in `step.STEP`);
* `<name>`: the log-softmax of `kernels.combine`'s row at the request's settings — log q for a
  sampled request (−inf where q is 0, which vLLM's server writes as −9999.0), the greedy row for
  temperature 0 — as the processor hands it to the sampler.

As vLLM does for one model, the presets' scores ignore temperature and top-p (the model's own
distribution), and no row carries the request's masks or logit bias. Every tensor-parallel rank
scores the same rows (vLLM gathers the logits on all of them).
"""

import torch

from rlvrx.kernels import combine
from rlvrx.server.engine.pair import ARCHITECTURE, STACKED_ARCHITECTURE
from rlvrx.server.engine.processor import ExtrapolationLogitsProcessor, RowState, row_settings
from rlvrx.server.engine.step import STEP

# The rule's scratch is a few times its rows × vocabulary: a prompt chunk (up to
# --max-num-batched-tokens rows) goes through it in slices of this many rows.
ROWS_PER_COMBINE = 256


def install() -> None:
    """Wrap the model runner's prompt-logprobs step (called in every vLLM process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict
    if getattr(original, "scores_per_name", False):
        return

    def get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        calls = scored_calls(self, num_scheduled_tokens) if serves_a_pair(self) else []
        if all(state.settings.preset == "rl" for _, _, state in calls):
            return original(self, hidden_states, num_scheduled_tokens)
        self.sampler.compute_logprobs = PromptScorer(calls, self.sampler.compute_logprobs)
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            del self.sampler.compute_logprobs  # the class's own again

    get_prompt_logprobs_dict.scores_per_name = True
    GPUModelRunner._get_prompt_logprobs_dict = get_prompt_logprobs_dict


def serves_a_pair(runner) -> bool:
    """Whether the runner's model is one of ours (the plugin is loaded into every vLLM engine)."""
    return bool({ARCHITECTURE, STACKED_ARCHITECTURE} & set(runner.model_config.hf_config.architectures or ()))


def scored_calls(runner, num_scheduled_tokens: dict[str, int]) -> list[tuple[str, int, RowState]]:
    """(request id, rows, settings) of each `compute_logits` call `_get_prompt_logprobs_dict` makes
    this step, in its order: by its own rules, a request with prompt logprobs whose prompt has
    positions left to score in this step's tokens."""
    calls = []
    for req_id in runner.num_prompt_logprobs:
        request, scheduled = runner.requests[req_id], num_scheduled_tokens.get(req_id)
        if scheduled is None or request.prompt_token_ids is None:
            continue
        rows = min(scheduled, len(request.prompt_token_ids) - request.num_computed_tokens - 1)
        if rows > 0:
            calls.append((req_id, rows, ExtrapolationLogitsProcessor.new_row(request.sampling_params, None, [])))
    return calls


class PromptScorer:
    """Stands in for `Sampler.compute_logprobs` during one prompt-logprobs step: call i receives the
    RL logits of calls[i]'s rows (the base ones are in STEP) and returns that request's scores."""

    def __init__(self, calls: list[tuple[str, int, RowState]], log_softmax):
        self.calls = iter(calls)
        self.log_softmax = log_softmax

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        req_id, rows, state = next(self.calls, (None, None, None))
        if rows != logits.shape[0] or STEP.base is None or STEP.base.shape != logits.shape:
            raise RuntimeError(f"prompt logprobs: vLLM scored {logits.shape[0]} rows where {rows} of request "
                               f"{req_id} were expected (has vLLM's _get_prompt_logprobs_dict changed?)")
        preset = state.settings.preset
        if preset == "rl":
            return self.log_softmax(logits)
        if preset == "base":
            return self.log_softmax(STEP.base)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, ROWS_PER_COMBINE):
            part = slice(start, start + ROWS_PER_COMBINE)
            rl, base = logits[part], STEP.base[part]
            out[part] = self.log_softmax(combine(rl, base, row_settings([state] * rl.shape[0], logits.device)).out)
        return out
