"""Does a low-rank copy of a full RLVR child keep what extrapolation needs? (`rlvrx lora-extract`)

    .venv/bin/python benchmarks/lowrank_fidelity.py --out benchmarks/out/lowrank   # the demo pair

For each rank (default 1, 4, 16, 64, full) the pair the stacked engine serves for the extracted
adapter (base + truncated projection deltas, the RL model's own embeddings, norms and biases) is
compared with the exact pair in the float64 reference of ALGORITHM.md (kernels/reference.py; the
engine equals it, tests/test_lora_extract.py), on the demo's held-out problems:

- per-token KL(q_exact ‖ q_lowrank) at the paper setting (γ 0.05, τ −0.3, generator base, k 50,
  T 1, top-p 0.7), mean and p99, along answers sampled from the exact pair's q; a position where
  the low-rank q gives zero mass to a token the exact q can emit (top-p cuts elsewhere) has
  KL = ∞ and is counted apart; and the mean KL at the demo setting below (top-p 1: the paper's
  top-p 0.7 leaves one token at most positions of this near-deterministic task);
- agreement of the flagged set {v in the generator's top 50 : Δ(v) ≤ τ} (mean Jaccard index);
- Pearson correlation of Δlog p over the generator's top-50 tokens at those positions;
- demo accuracy (avg@n at T = 1) of RL alone and of selective extrapolation at the demo's best
  setting in RESULTS.md (generator base, γ 0.5, τ −0.5, k 0); base alone once (it is shared).

Prints one table and writes it as JSON under --out (the adapters too).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlvrx.kernels import RowSettings, combine  # noqa: E402
from rlvrx.kernels.reference import Settings, two_stage_distribution  # noqa: E402
from rlvrx.server.arith_pair import Task, test_problems  # noqa: E402
from rlvrx.tools.lora_extract import extract, served_rl_model  # noqa: E402

PAPER = Settings(gamma=0.05, tau=-0.3, generator="base", candidates=50, temperature=1.0, top_p=0.7)
DEMO_BEST = Settings(gamma=0.5, tau=-0.5, generator="base", candidates=0, temperature=1.0, top_p=1.0)
RL_ALONE = Settings(gamma=0.0, tau=-math.inf, generator="rl", candidates=0, temperature=1.0, top_p=1.0)
BASE_ALONE = Settings(gamma=0.0, tau=-math.inf, generator="base", candidates=0, temperature=1.0, top_p=1.0)
MAX_NEW = 6


@torch.no_grad()
def next_logits(model, ids: list[list[int]]) -> np.ndarray:
    """[N, V] float64 next-token logits after each id list (one forward pass per length)."""
    out = np.empty((len(ids), model.config.vocab_size))
    for length in {len(x) for x in ids}:
        rows = [i for i, x in enumerate(ids) if len(x) == length]
        out[rows] = model(torch.tensor([ids[i] for i in rows])).logits[:, -1].double().numpy()
    return out


def sample(rl, base, prompts: list[list[int]], s: Settings, eos: int, seed: int) -> list[list[int]]:
    """Answers (up to and including eos) sampled from q of (rl, base) under s, as the server
    computes it (kernels.combine, float32)."""
    generator = torch.Generator().manual_seed(seed)
    settings = RowSettings.uniform(len(prompts), s.gamma, s.tau, s.generator, s.candidates, s.temperature, s.top_p)
    seqs, answers, done = [list(p) for p in prompts], [[] for _ in prompts], [False] * len(prompts)
    for _ in range(MAX_NEW):
        log_q = combine(torch.from_numpy(next_logits(rl, seqs)), torch.from_numpy(next_logits(base, seqs)), settings).out
        tokens = torch.multinomial(log_q.softmax(-1), 1, generator=generator).squeeze(1).tolist()
        for i, token in enumerate(tokens):
            seqs[i].append(token)
            if not done[i]:
                answers[i].append(token)
                done[i] = token == eos
        if all(done):
            break
    return answers


def accuracy(answers: list[list[int]], expected: list[list[int]]) -> float:
    return sum(a == e for a, e in zip(answers, expected)) / len(expected)


def kl(qe: np.ndarray, ql: np.ndarray) -> float:
    support = qe > 0
    return math.inf if (ql[support] == 0).any() else float((qe[support] * np.log(qe[support] / ql[support])).sum())


def fidelity(exact, low, base, contexts: list[list[int]]) -> dict:
    """KL, flagged-set agreement and Δ correlation of the low-rank pair at the given contexts."""
    a_exact, a_low, b = next_logits(exact, contexts), next_logits(low, contexts), next_logits(base, contexts)
    kls, demo_kls, jaccards, deltas = [], [], [], []
    for ae, al, bb in zip(a_exact, a_low, b):
        kls.append(kl(two_stage_distribution(ae, bb, PAPER), two_stage_distribution(al, bb, PAPER)))
        demo_kls.append(kl(two_stage_distribution(ae, bb, DEMO_BEST), two_stage_distribution(al, bb, DEMO_BEST)))
        top = np.argsort(-bb)[:PAPER.candidates]
        log_b = bb - np.logaddexp.reduce(bb)
        de, dl = (ae - np.logaddexp.reduce(ae) - log_b)[top], (al - np.logaddexp.reduce(al) - log_b)[top]
        fe, fl = set(top[de <= PAPER.tau]), set(top[dl <= PAPER.tau])
        jaccards.append(len(fe & fl) / len(fe | fl) if fe | fl else 1.0)
        deltas.append((de, dl))
    finite = np.array([k for k in kls if math.isfinite(k)])
    de, dl = (np.concatenate(d) for d in zip(*deltas))
    return {"positions": len(kls), "kl_mean": float(finite.mean()), "kl_p99": float(np.quantile(finite, 0.99)),
            "kl_infinite": sum(not math.isfinite(k) for k in kls) / len(kls), "kl_mean_demo": float(np.mean(demo_kls)),
            "flag_jaccard": float(np.mean(jaccards)), "delta_corr": float(np.corrcoef(de, dl)[0, 1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="demo/pair/base")
    parser.add_argument("--rl", default="demo/pair/rl")
    parser.add_argument("--ranks", default="1,4,16,64,full")
    parser.add_argument("--problems", type=int, default=250)
    parser.add_argument("--n", type=int, default=4, help="samples per problem for the accuracies")
    parser.add_argument("--out", default="benchmarks/out/lowrank")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_grad_enabled(False)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    base, exact = load(args.base), load(args.rl)
    task = Task(AutoTokenizer.from_pretrained(args.rl))
    problems = test_problems(args.problems)
    prompts = [task.prompt_ids(a, b) for a, b in problems] * args.n
    expected = [task.answer_ids(a + b) for a, b in problems] * args.n
    one = prompts[: args.problems]
    # The positions where KL is measured: answers the exact pair samples at the paper setting.
    contexts = [p + answer[:i] for p, answer in zip(one, sample(exact, base, one, PAPER, task.eos, seed=1))
                for i in range(len(answer))]
    base_acc = accuracy(sample(base, base, prompts, BASE_ALONE, task.eos, seed=2), expected)
    rows = []
    for rank in ["exact", *args.ranks.split(",")]:
        if rank == "exact":
            low, row = exact, {"rank": rank}
        else:
            extract(args.base, args.rl, None if rank == "full" else int(rank), out / f"rank-{rank}")
            low = served_rl_model(args.base, out / f"rank-{rank}")
            row = {"rank": rank, **fidelity(exact, low, base, contexts)}
        row["acc_rl"] = accuracy(sample(low, base, prompts, RL_ALONE, task.eos, seed=3), expected)
        row["acc_extrapolated"] = accuracy(sample(low, base, prompts, DEMO_BEST, task.eos, seed=4), expected)
        row["acc_base"] = base_acc
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| rank | mean KL | p99 KL | KL = ∞ | mean KL, demo setting | flagged-set Jaccard | corr Δlog p "
          "| RL alone | extrapolated | base alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fid = (f"{r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['kl_infinite']:.1%} | {r['kl_mean_demo']:.2e} | "
               f"{r['flag_jaccard']:.3f} | {r['delta_corr']:.3f}") if "kl_mean" in r else "— | — | — | — | — | —"
        print(f"| {r['rank']} | {fid} | {r['acc_rl']:.3f} | {r['acc_extrapolated']:.3f} | {r['acc_base']:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
