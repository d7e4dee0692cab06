"""The wrapper architecture: two backbones of the checkpoint's own class in one vLLM model.

`rl` is loaded from the model path, `base` from `rlvrx_base_path` in the config
(set through `hf_overrides`). Both run on the same input ids and positions, so they
share the scheduler's block table; their attention layers have distinct names, so
vLLM gives each its own KV cache. `forward` returns both hidden states side by side;
`compute_logits` returns the RL logits to vLLM and leaves the base logits in
`server.engine.step.STEP` for the logits processor.

The wrapper, not each backbone, is what vLLM compiles: one graph and one AOT artifact for
both. (Compiled per backbone, the two would share one artifact path — vLLM keys it on the
config and the forward's source, not the module prefix — so every start compiled twice and,
where artifacts load (CUDA), the base would load the graph traced from the RL backbone.
Inside the wrapper's trace the backbones' own compile decorators step aside.)

Under a config.json that ties the output head to the embedding, a checkpoint that stores an
lm_head.weight is loaded untied (transformers and vLLM alike, which re-ties it when equal). vLLM
decides that for the engine's config from the model path, the RL checkpoint; the base backbone
gets the same config with the tie its own checkpoint calls for.
"""

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
from vllm.model_executor.models.registry import ModelRegistry
from vllm.model_executor.models.utils import maybe_prefix
from vllm.transformers_utils.config import checkpoint_has_lm_head

from rlvrx.server.engine.step import STEP



def base_weights(base_path: str) -> Iterable[tuple[str, torch.Tensor]]:
    files = sorted(str(p) for p in Path(base_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in the base model path {base_path}")
    return safetensors_weights_iterator(files, use_tqdm_on_load=False)


def base_backbone_config(vllm_config: VllmConfig, base_path: str) -> VllmConfig:
    """The engine's config, with the output head tied or not as the base checkpoint is loaded."""
    model_config = vllm_config.model_config
    tied = model_config.hf_config.tie_word_embeddings or model_config.word_embeddings_untied_by_checkpoint
    base_tied = tied and not checkpoint_has_lm_head(base_path)
    if base_tied == model_config.hf_config.tie_word_embeddings:
        return vllm_config
    hf_config = copy.deepcopy(model_config.hf_config)
    hf_config.tie_word_embeddings = hf_config.get_text_config().tie_word_embeddings = base_tied
    return vllm_config.with_hf_config(hf_config)


@support_torch_compile
class ExtrapolationForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        inner_cls, _ = ModelRegistry.resolve_model_cls(
            [hf_config.rlvrx_inner_architecture], vllm_config.model_config
        )
        self.base_path = hf_config.rlvrx_base_path
        self.rl = inner_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "rl"))
        self.base = inner_cls(vllm_config=base_backbone_config(vllm_config, self.base_path),
                              prefix=maybe_prefix(prefix, "base"))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("prompt embeddings are not supported: the two models embed differently")

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("the extrapolation pair needs token ids, not embeddings")
        rl_hidden = self.rl(input_ids, positions)
        base_hidden = self.base(input_ids, positions)
        return torch.cat([rl_hidden, base_hidden], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        rl_hidden, base_hidden = hidden_states.chunk(2, dim=-1)
        rl_logits = self.rl.compute_logits(rl_hidden)
        base_logits = self.base.compute_logits(base_hidden)
        if rl_logits is None:  # not the rank that samples
            return None
        STEP.publish(rl_logits, base_logits)
        return rl_logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = {f"rl.{name}" for name in self.rl.load_weights(weights)}
        loaded |= {f"base.{name}" for name in self.base.load_weights(base_weights(self.base_path))}
        return loaded
