"""The do-it-yourself baseline: transformers `generate` on the RL model, the base model in a logits processor.

What a user without this server would write: the RL model runs `model.generate` (sampling)
on a left-padded batch of the requests in flight together; at every step a `LogitsProcessor`
runs the base model on the new tokens — keeping its own KV cache (`past_key_values`) and
attention mask between steps, with positions counted from each row's first real token as
`generate` counts them for the RL model — and replaces the RL scores by log q from
`kernels.combine`. `generate` then samples from log q as given: its temperature is 1 and
top-k / top-p are off, since combine already applied the request's temperature and top-p.

Every request yields exactly `max_tokens` tokens: `min_new_tokens = max_new_tokens` masks
the end-of-sequence token in the RL scores, and the processor carries every masked (−inf)
entry over to the base logits, as the server does for masks. (The server's requests use
`ignore_eos` instead, which changes the probability of one token, not the cost.)
Timestamps come from a streamer that `generate` hands each step's tokens. Written for the
serving benchmark; not used by the server.
"""

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from rlvrx.kernels import RowSettings, combine


class BaseModelProcessor(LogitsProcessor):
    """Turns the RL scores of each step into log q, running the base model incrementally.

    `prompt_mask` [B, P] is the attention mask of the left-padded prompts; the generated
    tokens are all real (no row stops early), so step t's mask is `prompt_mask` followed by
    t ones.
    """

    def __init__(self, base, prompt_mask: torch.Tensor, settings: RowSettings):
        self.base = base
        self.prompt_mask = prompt_mask
        self.settings = settings
        self.cache = None
        self.seen = 0  # tokens of each row already in the base model's cache

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        generated = self.prompt_mask.new_ones(rows, length - self.prompt_mask.shape[1])
        mask = torch.cat([self.prompt_mask, generated], dim=1)
        new = input_ids[:, self.seen:]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, self.seen:]
        with torch.no_grad():
            out = self.base(input_ids=new, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache, self.seen = out.past_key_values, length
        base_logits = out.logits[:, -1].float().masked_fill(scores == float("-inf"), float("-inf"))
        return combine(scores, base_logits, self.settings).out


class StepClock(BaseStreamer):
    """Seconds since `start` at which each generated step's tokens came out of `generate`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:  # the first call hands over the prompt
            self.stamps.append(time.perf_counter() - self.start)
        self.prompt_seen = True

    def end(self) -> None:
        pass


class TransformersGenerateBaseline:
    """RL and base model as transformers models on the CPU (or wherever `device` says)."""

    def __init__(self, rl_path: str, base_path: str, dtype: str = "float32", device: str = "cpu"):
        torch_dtype = getattr(torch, dtype)
        self.rl = AutoModelForCausalLM.from_pretrained(rl_path, dtype=torch_dtype).to(device).eval()
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(rl_path)
        self.device = device

    def run(self, prompts: list[list[int]], max_tokens: int, gamma: float, tau: float, temperature: float,
            top_p: float, seed: int) -> list[dict]:
        """Generate for all prompts together; returns per request {tokens, ttft_s, e2e_s, itl_s, ids}."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        processor = BaseModelProcessor(self.base, mask, RowSettings.uniform(
            len(prompts), gamma, tau, "base", 50, temperature, top_p))
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, pad_token_id=pad)
        torch.manual_seed(seed)
        clock = StepClock()
        with torch.no_grad():
            out = self.rl.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   logits_processor=[processor], streamer=clock)
        stamps = clock.stamps
        return [{"tokens": len(row), "ids": row, "ttft_s": stamps[0], "e2e_s": stamps[-1],
                 "itl_s": [b - a for a, b in zip(stamps, stamps[1:])]} for row in out[:, width:].tolist()]
