"""The extrapolation math: `combine` (the rule for a batch of rows) and its settings.

`combine` is the one entry point the engine calls: the fused Triton kernel
(`kernels.triton_combine`) for CUDA tensors whose rows all select by Δlog p, the PyTorch
implementation (`kernels.rule`) elsewhere (and for the entropy / random criteria, which only
the replacement-curve experiments use); both compute the same outputs. `kernels.reference` is the
float64 two-stage reference used by the tests.
"""

import torch

from rlvrx.kernels import rule
from rlvrx.kernels.rule import GREEDY_EPS, SELECTION, Combined, RowSettings


def combine(
    rl_logits: torch.Tensor, base_logits: torch.Tensor, settings: RowSettings, want_delta: bool = False
) -> Combined:
    """Apply the rule to a batch of rows; see kernels/rule.py for inputs and outputs."""
    if rl_logits.is_cuda and settings.selection is None:
        from rlvrx.kernels import triton_combine  # imported on first use: Triton is a GPU dependency

        return triton_combine.combine(rl_logits, base_logits, settings, want_delta)
    return rule.combine(rl_logits, base_logits, settings, want_delta)


__all__ = ["GREEDY_EPS", "SELECTION", "Combined", "RowSettings", "combine"]
