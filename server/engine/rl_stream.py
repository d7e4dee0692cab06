"""The RL stream's own copies of the base tensors that an adapter changes beyond the projections' LoRA.

The stacked model (server/engine/stacked.py) gives the RL rows their own copy of a tensor that the
adapter changes: embeddings, lm_head, norms, q/k/v biases, under their checkpoint names. A copy comes
whole (PEFT's modules_to_save and trained biases, `rlvrx lora-extract`'s rlvrx_rl_tensors.safetensors)
or as an edit of a tensor — the whole copy if there is one, else the base checkpoint's own, seen while
vLLM loads it: a low-rank delta (LoRA on embed_tokens or lm_head), rows replaced (trainable tokens), a
bias added (a LoRA bias). server/engine/adapter.py reads and checks them.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """w + left·right (any scaling already in `left`)."""

    left: torch.Tensor  # [out, r]
    right: torch.Tensor  # [r, in]

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.left @ self.right


@dataclass(frozen=True)
class Rows:
    """w with the rows `indices` replaced by `values`."""

    indices: torch.Tensor  # [n], int64
    values: torch.Tensor  # [n, in]

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        out = w.clone()
        out[self.indices] = self.values
        return out


@dataclass(frozen=True)
class Shift:
    """w + delta."""

    delta: torch.Tensor

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta


Edit = LowRank | Rows | Shift


@dataclass(frozen=True)
class RLTensors:
    copies: dict[str, torch.Tensor]  # checkpoint name → the RL model's tensor
    edits: dict[str, Edit]  # checkpoint name → what makes the RL model's tensor of the copy or the base's

    @property
    def names(self) -> frozenset[str]:
        """The tensors the RL stream holds a copy of."""
        return frozenset(self.copies) | frozenset(self.edits)

    @property
    def from_base(self) -> frozenset[str]:
        """The base checkpoint's tensors that edits start from."""
        return frozenset(self.edits) - frozenset(self.copies)

    def materialize(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every RL copy, in float32; `base` holds (at least) the base tensors of `from_base`."""
        out = {name: tensor.float() for name, tensor in self.copies.items()}
        for name, edit in self.edits.items():
            out[name] = edit.apply(out[name] if name in out else base[name].float())
        return out
