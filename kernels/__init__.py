"""The extrapolation math: `combine` (the rule for a batch of rows) and its settings.

`combine` is the one entry point the engine calls. Today it is the PyTorch
implementation in `kernels.rule`; the fused Triton kernel slots in behind it on CUDA.
`kernels.reference` is the float64 two-stage reference used by the tests.
"""

from kernels.rule import GREEDY_EPS, Combined, RowSettings, combine

__all__ = ["GREEDY_EPS", "Combined", "RowSettings", "combine"]
