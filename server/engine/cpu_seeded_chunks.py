"""A work-around for a vLLM 0.32 CPU bug that lets one request kill the engine.

When a prompt is prefilled in chunks (a long prompt, or several prompts sharing one step's
token budget), vLLM samples every chunk and throws the sample of each non-final chunk away;
for a request with a `seed` it then rewinds the request's generator with
`get_offset`/`set_offset`, which CPU generators do not have: "RuntimeError: CPU Generator does
not use offset" in the worker, and the engine is dead. On CPU only, the generators of the
thrown-away rows are set aside while vLLM does that bookkeeping, so they are not rewound: a
seeded request's draws then also depend on how its prompt was chunked, where vLLM on a GPU
would give the same draws either way.
"""

import numpy as np


def install() -> None:
    """Wrap the model runner's bookkeeping (called in every vLLM process; a no-op off CPU)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._bookkeeping_sync
    if getattr(original, "keeps_cpu_generators", False):
        return

    def bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        held = {i: generators.pop(i) for i in map(int, discarded) if i in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(held)

    bookkeeping_sync.keeps_cpu_generators = True
    GPUModelRunner._bookkeeping_sync = bookkeeping_sync
