"""The hand-off of one engine step's logits from the wrapper model to the logits processor.

vLLM's sampler receives a single logits tensor (the RL model's). The wrapper model's
`compute_logits` leaves the base model's rows for the same positions here, and the
logits processor, which runs later in the same step and the same process, takes them.
"""

from dataclasses import dataclass

import torch


@dataclass
class StepLogits:
    base: torch.Tensor | None = None  # [num_rows, vocab], base model, raw
    rl_raw: torch.Tensor | None = None  # copy of the RL rows before vLLM's masks, if asked
    keep_rl_raw: bool = False  # set by the processor when a row has masks or a logit bias

    def publish(self, rl_logits: torch.Tensor, base_logits: torch.Tensor) -> None:
        self.base = base_logits
        self.rl_raw = rl_logits.clone() if self.keep_rl_raw else None


STEP = StepLogits()
