"""The paper-style baseline: two separate vLLM engines, one token per `generate` call.

As ALGORITHM.md describes the authors' implementation: each step asks the RL engine and
the base engine for one token (`max_tokens=1`) with their top-50 log-probs, pads the
tokens missing from one list with that list's minimum, applies the τ/γ rule on the host
(NumPy; temperature and top-p on both stages, top-p by `kernels.top_p.top_p_log`), samples,
appends the token and repeats. Requests in flight together share each
`generate` call. Written for the serving benchmark; not used by the server.
"""

import time

import numpy as np
import torch

from rlvrx.kernels.top_p import top_p_log

TOP = 50


def sampling_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """top_p(softmax(logits / T), P) of one row, as ALGORITHM.md defines it."""
    logp = torch.from_numpy(logits / temperature).double().log_softmax(dim=-1)
    return top_p_log(logp[None], torch.tensor([top_p], dtype=torch.float64))[0].exp().numpy()


def combine_top50(rl_top: dict[int, float], base_top: dict[int, float], gamma: float, tau: float,
                  rng: np.random.Generator, temperature: float, top_p: float) -> int:
    """One step of the two-stage rule on the two engines' top-50 log-probs (generator base, k = 50)."""
    tokens = sorted(set(rl_top) | set(base_top))
    a_min, b_min = min(rl_top.values()), min(base_top.values())
    a = np.array([rl_top.get(t, a_min) for t in tokens])
    b = np.array([base_top.get(t, b_min) for t in tokens])
    base_ids = list(base_top)
    p_base = sampling_probs(np.array([base_top[t] for t in base_ids]), temperature, top_p)
    y0 = base_ids[rng.choice(len(base_ids), p=p_base)]
    i0 = tokens.index(y0)
    if a[i0] - b[i0] > tau:
        return y0
    candidates = [tokens.index(t) for t in base_ids]
    e = (1 + gamma) * a[candidates] - gamma * b[candidates]
    return tokens[candidates[rng.choice(len(candidates), p=sampling_probs(e, temperature, top_p))]]


class TwoEngineBaseline:
    def __init__(self, rl_path: str, base_path: str, **engine_kwargs):
        from vllm import LLM

        self.rl = LLM(model=rl_path, max_logprobs=TOP, **engine_kwargs)
        self.base = LLM(model=base_path, max_logprobs=TOP, **engine_kwargs)

    def run(self, prompts: list[list[int]], max_tokens: int, gamma: float, tau: float, temperature: float,
            top_p: float, seed: int) -> list[dict]:
        """Generate for all prompts together; returns per request {tokens, ttft_s, e2e_s, itl_s}."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rng = np.random.default_rng(seed)
        params = SamplingParams(max_tokens=1, logprobs=TOP, temperature=1.0, seed=seed)
        outputs = [[] for _ in prompts]
        stamps = [[] for _ in prompts]
        start = time.perf_counter()
        for _ in range(max_tokens):
            batch = [TokensPrompt(prompt_token_ids=p + o) for p, o in zip(prompts, outputs)]
            rl_out = self.rl.generate(batch, params, use_tqdm=False)
            base_out = self.base.generate(batch, params, use_tqdm=False)
            for i, (r, b) in enumerate(zip(rl_out, base_out)):
                rl_top = {t: lp.logprob for t, lp in r.outputs[0].logprobs[0].items()}
                base_top = {t: lp.logprob for t, lp in b.outputs[0].logprobs[0].items()}
                outputs[i].append(combine_top50(rl_top, base_top, gamma, tau, rng, temperature, top_p))
                stamps[i].append(time.perf_counter() - start)
        return [{"tokens": len(o), "ttft_s": s[0], "e2e_s": s[-1],
                 "itl_s": [b - a for a, b in zip(s, s[1:])]} for o, s in zip(outputs, stamps)]
