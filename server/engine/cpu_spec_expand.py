"""A work-around for a vLLM 0.32 CPU bug that makes speculative decoding sample at random temperatures.

Before verifying drafts, vLLM's rejection sampler expands each request's temperature, top-k and top-p to
its draft positions (`expand_batch_to_tokens`). On CPU the expansion is a C++ kernel that takes int64
tensors only; its wrapper converts the output to int64 — a copy — so the float32 temperatures (and the
int32 top-k) it writes never reach the real output, which keeps whatever `new_empty` left in it. Every
sampled request with a draft is then verified at a garbage temperature: wrong tokens, NaN logprobs
(vLLM serving one model alone included). On CPU only, the expansion is done in torch.
"""

import torch


def install() -> None:
    """Replace the expansion (called in every vLLM process; a no-op off CPU)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens:
        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                           replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
    """[batch] → [num_tokens]: entry i repeated for request i's tokens (cumulative counts
    `cu_num_tokens`), with `replace_from` turned into `replace_to` (vLLM's semantics)."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return x.repeat_interleave(counts.long(), output_size=num_tokens)
