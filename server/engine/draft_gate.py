"""Speculation off in the steps where it does not pay: `disable_by_batch_size` (vLLM V0's key).

Verifying k drafts costs k + 1 positions per request of both streams. Where a decode step is bound by
computation rather than by reading the weights (this CPU from a few requests up; a GPU at large
batches) a full batch gains nothing from drafts and loses their verification (benchmarks/RESULTS.md,
"Speculative decoding verified against q"). `--speculative-config '{"method": "ngram", ...,
"disable_by_batch_size": N}'` keeps the n-gram drafter silent in every step whose batch holds N
requests or more: those steps run as without speculation (one position per request, nothing to
verify), and drafting resumes when the batch shrinks below N. Which tokens come out does not change:
with or without drafts, every token is drawn from q.

vLLM 0.32 dropped the key with its V0 engine. `apply` takes it out of the config handed to vLLM and
passes it to the engine in the model's hf_overrides; `install` gates the model runner's drafting on it.
"""

import functools

KEY = "disable_by_batch_size"
OVERRIDE = "rlvrx_disable_by_batch_size"


class DraftGateError(ValueError):
    pass


def apply(speculative_config: dict | None, hf_overrides: dict) -> dict | None:
    """vLLM's part of a speculative config; the threshold, when given, goes into `hf_overrides`."""
    if not speculative_config or KEY not in speculative_config:
        return speculative_config
    config = dict(speculative_config)
    threshold = config.pop(KEY)
    if config.get("method") != "ngram":
        raise DraftGateError(f"{KEY} is taken with the ngram method only, not {config.get('method')!r}")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise DraftGateError(f"{KEY} must be a whole number of requests ≥ 1, not {threshold!r}")
    hf_overrides[OVERRIDE] = threshold
    return config


def install() -> None:
    # The model runner, not vLLM's NgramProposer: importing that module (numba, llvmlite) before a
    # CPU worker registers its Triton kernel overrides breaks their scan of every module.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner.propose_draft_token_ids, "rlvrx", False):
        return
    GPUModelRunner.propose_draft_token_ids = silent_from_threshold(GPUModelRunner.propose_draft_token_ids)
    GPUModelRunner.propose_draft_token_ids.rlvrx = True


def silent_from_threshold(propose):
    @functools.wraps(propose)
    def gated(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        threshold = getattr(self.model_config.hf_config, OVERRIDE, None)
        if threshold is not None and len(sampled_token_ids) >= threshold:
            return [[] for _ in sampled_token_ids]
        return propose(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    return gated
