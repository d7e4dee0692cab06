"""Sampling a model pair offline with transformers, as the server computes q (kernels.combine).

Shared by the benchmarks that need many answers of a pair without a server
(`lowrank_fidelity.py`, `real_rlvr_accuracy.py`): left-padded batches, each model with its own KV
cache, float64 logits into `kernels.combine`, one multinomial draw per row from its log q.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from rlvrx.kernels import SELECTION, RowSettings, combine
from rlvrx.kernels.reference import Settings


@dataclass
class Sampled:
    answers: list[list[int]]  # token ids, up to and including eos, per prompt
    extrapolated: list[float]  # expected number of extrapolated positions per answer (Σ of the rule's M)


def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of id lists padded on the left."""
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in seqs])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(rl, base, prompts: list[list[int]], s: Settings, eos: int, seed: int, max_new: int,
           chunk: int = 128, progress: str | None = None) -> Sampled:
    """Answers (at most max_new tokens) sampled from q of (rl, base) under s (any selection criterion).
    Pass the same model twice for one model alone: it then runs once per step. `progress`: the label
    of a progress bar over the prompts (none by default)."""
    from tqdm import tqdm

    models = (rl,) if rl is base else (rl, base)
    generator, answers, extrapolated = torch.Generator().manual_seed(seed), [], []
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None)
    for first in range(0, len(prompts), chunk):
        part = prompts[first : first + chunk]
        settings = replace(RowSettings.uniform(len(part), s.gamma, s.tau, s.generator, s.candidates, s.temperature,
                                               s.top_p), selection=torch.full((len(part),), SELECTION[s.selection]))
        ids, mask, positions = left_padded(part)
        runs = [model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
                for model in models]
        out, flagged, done = [[] for _ in part], [0.0] * len(part), torch.zeros(len(part), dtype=torch.bool)
        for _ in range(max_new):
            logits = [run.logits[:, -1].double() for run in runs]
            combined = combine(logits[0], logits[-1], settings)
            tokens = torch.multinomial(combined.out.softmax(-1), 1, generator=generator)
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(tokens[i, 0].item())
                flagged[i] += combined.prob[i].item()
            done |= tokens[:, 0] == eos
            if done.all():
                break
            mask, positions = torch.cat([mask, torch.ones_like(tokens)], 1), positions[:, -1:] + 1
            runs = [model(tokens, attention_mask=mask, position_ids=positions, past_key_values=run.past_key_values,
                          use_cache=True) for model, run in zip(models, runs)]
        answers += out
        extrapolated += flagged
        bar.update(len(part))
    bar.close()
    return Sampled(answers, extrapolated)


@torch.no_grad()
def answer_logits(model, prompts: list[list[int]], answers: list[list[int]], chunk: int = 32) -> np.ndarray:
    """[positions, V] float64 logits at each answer token's position (the prediction of answer[i] after
    prompt + answer[:i]), answers in order: one teacher-forced pass per chunk."""
    out = []
    for first in range(0, len(prompts), chunk):
        seqs = [p + a[:-1] for p, a in zip(prompts[first : first + chunk], answers[first : first + chunk])]
        ids, mask, positions = left_padded(seqs)
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, answer in enumerate(answers[first : first + chunk]):
            out.append(logits[row, ids.shape[1] - len(answer) :].double().numpy())
    return np.concatenate(out)
