"""Does a low-rank copy of a full RLVR child keep what extrapolation needs? (`rlvrx lora-extract`)

    .venv/bin/python benchmarks/lowrank_fidelity.py --out benchmarks/out/lowrank   # the demo pair
    .venv/bin/python benchmarks/lowrank_fidelity.py --task real --base models/smollm2/base \
        --rl models/real-rlvr/full/final --ranks 1,4,16,64 --problems 60 --n 2 --kl-problems 30 \
        --out benchmarks/out/lowrank-real   # the real pair (--no-accuracy: the KL columns only)

For each rank (default 1, 4, 16, 64, full) the pair the stacked engine serves for the extracted
adapter (base + truncated projection deltas, the RL model's own embeddings, norms and biases) is
compared with the exact pair in the float64 reference of ALGORITHM.md (kernels/reference.py; the
engine equals it, tests/test_lora_extract.py), on the task's held-out problems (`--task demo`: the
demo's reversed addition; `--task real`: the word problems of benchmarks/real_rlvr_task.py in the
pair's chat template, the GRPO pair of benchmarks/real_rlvr.py):

- per-token KL(q_exact ‖ q_lowrank) at the paper setting (γ 0.05, τ −0.3, generator base, k 50,
  T 1, top-p 0.7), mean and p99, along answers sampled from the exact pair's q; a position where
  the low-rank q gives zero mass to a token the exact q can emit (top-p cuts elsewhere) has
  KL = ∞ and is counted apart; and the mean KL at a second setting without top-p or a candidate
  limit, where q never gives a token zero mass (demo: its best setting below, as the paper's top-p
  0.7 leaves one token at most positions of that near-deterministic task; real: the paper setting at
  top-p 1 and k 0 — with k 50, a token outside the top 50 that only one of the two pairs flags has
  mass in one q and none in the other);
- agreement of the flagged set {v in the generator's top 50 : Δ(v) ≤ τ} (mean Jaccard index);
- Pearson correlation of Δlog p over the generator's top-50 tokens at those positions;
- accuracy (avg@n) of RL alone and of extrapolation (demo: T = 1, and its best setting in
  RESULTS.md, generator base, γ 0.5, τ −0.5, k 0; real: the task's T = 1, top-p 0.7, and the
  paper setting); base alone once (it is shared).

The demo pair runs in float64; the real pair's models run in float32, as the server serves them
(`--dtype float32`), and their logits go to the float64 reference. Answers are sampled with each
model's KV cache through kernels.combine, as the server computes q. Prints one table and writes it
as JSON under --out (the adapters too).
"""

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pair_sampling import answer_logits, sample  # noqa: E402
from rlvrx.kernels.reference import Settings, two_stage_distribution  # noqa: E402
from rlvrx.server.arith_pair import Task, test_problems  # noqa: E402
from rlvrx.tools.lora_extract import extract, served_rl_model  # noqa: E402

PAPER = Settings(gamma=0.05, tau=-0.3, generator="base", candidates=50, temperature=1.0, top_p=0.7)
DEMO_BEST = Settings(gamma=0.5, tau=-0.5, generator="base", candidates=0, temperature=1.0, top_p=1.0)
RL_ALONE = Settings(gamma=0.0, tau=-math.inf, generator="rl", candidates=0, temperature=1.0, top_p=1.0)
BASE_ALONE = Settings(gamma=0.0, tau=-math.inf, generator="base", candidates=0, temperature=1.0, top_p=1.0)


@dataclass
class Problems:
    """A task's held-out prompts, how to score an answer, and its settings."""
    prompts: list[list[int]]
    correct: Callable[[int, list[int]], bool]  # (problem index, answer ids) -> right?
    eos: int
    max_new: int
    second_kl: Settings  # the setting of the second KL column
    second_kl_name: str
    rl: Settings  # RL alone, for its accuracy
    extrapolated: Settings  # the rule, for its accuracy


def demo_problems(rl_path: str, count: int) -> Problems:
    from transformers import AutoTokenizer

    task = Task(AutoTokenizer.from_pretrained(rl_path))
    problems = test_problems(count)
    expected = [task.answer_ids(a + b) for a, b in problems]
    return Problems([task.prompt_ids(a, b) for a, b in problems], lambda i, answer: answer == expected[i],
                    task.eos, 6, DEMO_BEST, "demo setting", RL_ALONE, DEMO_BEST)


def real_problems(rl_path: str, count: int) -> Problems:
    from transformers import AutoTokenizer

    from benchmarks import real_rlvr_task

    tokenizer = AutoTokenizer.from_pretrained(rl_path)
    problems = real_rlvr_task.problems("heldout", count, seed=1)  # those of benchmarks/real_rlvr_eval.py
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["problem"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in problems]

    def correct(i: int, answer: list[int]) -> bool:
        return real_rlvr_task.reward(tokenizer.decode(answer, skip_special_tokens=True), problems[i]["answer"]) == 1

    return Problems(prompts, correct, tokenizer.eos_token_id, 40, replace(PAPER, top_p=1.0, candidates=0),
                    "paper, top-p 1, k 0",
                    replace(RL_ALONE, top_p=0.7), PAPER)


TASKS = {"demo": demo_problems, "real": real_problems}


def accuracy(problems: Problems, answers: list[list[int]]) -> float:
    n = len(problems.prompts)
    return sum(problems.correct(i % n, answer) for i, answer in enumerate(answers)) / len(answers)


def kl(qe: np.ndarray, ql: np.ndarray) -> float:
    support = qe > 0
    return math.inf if (ql[support] == 0).any() else float((qe[support] * np.log(qe[support] / ql[support])).sum())


class Exact:
    """The exact pair at the measured positions, computed once for every rank."""

    def __init__(self, a_exact: np.ndarray, b: np.ndarray, second: Settings):
        self.b, self.second = b, second
        self.q = [two_stage_distribution(ae, bb, PAPER) for ae, bb in zip(a_exact, b)]
        self.q_second = [two_stage_distribution(ae, bb, second) for ae, bb in zip(a_exact, b)]
        self.log_b = [bb - np.logaddexp.reduce(bb) for bb in b]
        self.top = [np.argsort(-bb)[: PAPER.candidates] for bb in b]
        self.delta = [(ae - np.logaddexp.reduce(ae) - lb)[top] for ae, lb, top in zip(a_exact, self.log_b, self.top)]


def fidelity(exact: Exact, a_low: np.ndarray) -> dict:
    """KL, flagged-set agreement and Δ correlation of the low-rank pair at the measured positions."""
    kls, second_kls, jaccards, deltas = [], [], [], []
    for i, al in enumerate(a_low):
        bb = exact.b[i]
        kls.append(kl(exact.q[i], two_stage_distribution(al, bb, PAPER)))
        second_kls.append(kl(exact.q_second[i], two_stage_distribution(al, bb, exact.second)))
        top, de = exact.top[i], exact.delta[i]
        dl = (al - np.logaddexp.reduce(al) - exact.log_b[i])[top]
        fe, fl = set(top[de <= PAPER.tau]), set(top[dl <= PAPER.tau])
        jaccards.append(len(fe & fl) / len(fe | fl) if fe | fl else 1.0)
        deltas.append((de, dl))
    finite = np.array([k for k in kls if math.isfinite(k)])
    finite_second = [k for k in second_kls if math.isfinite(k)]
    de, dl = (np.concatenate(d) for d in zip(*deltas))
    return {"positions": len(kls), "kl_mean": float(finite.mean()), "kl_p99": float(np.quantile(finite, 0.99)),
            "kl_infinite": sum(not math.isfinite(k) for k in kls) / len(kls),
            "kl_mean_second": float(np.mean(finite_second)),
            "kl_infinite_second": 1 - len(finite_second) / len(second_kls), "flag_jaccard": float(np.mean(jaccards)),
            "delta_corr": float(np.corrcoef(de, dl)[0, 1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="demo")
    parser.add_argument("--base", default="demo/pair/base")
    parser.add_argument("--rl", default="demo/pair/rl")
    parser.add_argument("--ranks", default="1,4,16,64,full")
    parser.add_argument("--problems", type=int, default=250)
    parser.add_argument("--n", type=int, default=4, help="samples per problem for the accuracies")
    parser.add_argument("--kl-problems", type=int, default=None,
                        help="problems whose sampled answers give the KL positions (default: all)")
    parser.add_argument("--no-accuracy", action="store_true", help="KL, flagged sets and Δ correlation only")
    parser.add_argument("--out", default="benchmarks/out/lowrank")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_grad_enabled(False)

    from transformers import AutoModelForCausalLM

    dtype = torch.float64 if args.task == "demo" else torch.float32
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # noqa: E731
    base, exact = load(args.base), load(args.rl)
    problems = TASKS[args.task](args.rl, args.problems)
    prompts = problems.prompts * args.n
    # The positions where KL is measured: answers the exact pair samples at the paper setting.
    one = problems.prompts[: args.kl_problems]
    answers = sample(exact, base, one, PAPER, problems.eos, seed=1, max_new=problems.max_new).answers
    reference = Exact(answer_logits(exact, one, answers), answer_logits(base, one, answers), problems.second_kl)
    base_alone = replace(BASE_ALONE, top_p=problems.rl.top_p)
    base_acc = None if args.no_accuracy else \
        accuracy(problems, sample(base, base, prompts, base_alone, problems.eos, 2, problems.max_new).answers)
    rows = []
    for rank in ["exact", *args.ranks.split(",")]:
        if rank == "exact":
            low, row = exact, {"rank": rank}
        else:
            extract(args.base, args.rl, None if rank == "full" else int(rank), out / f"rank-{rank}")
            low = served_rl_model(args.base, out / f"rank-{rank}", dtype).eval()
            row = {"rank": rank, **fidelity(reference, answer_logits(low, one, answers))}
        if not args.no_accuracy:
            rl_alone = sample(low, low, prompts, problems.rl, problems.eos, 3, problems.max_new)  # one stream: τ = −∞
            row["acc_rl"] = accuracy(problems, rl_alone.answers)
            row["acc_extrapolated"] = accuracy(problems, sample(low, base, prompts, problems.extrapolated, problems.eos,
                                                                4, problems.max_new).answers)
            row["acc_base"] = base_acc
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"| rank | mean KL | p99 KL | KL = ∞ | mean KL, {problems.second_kl_name} | flagged-set Jaccard "
          "| corr Δlog p | RL alone | extrapolated | base alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fid = "— | — | — | — | — | —"
        if "kl_mean" in r:
            infinite = f" (∞ at {r['kl_infinite_second']:.1%})" if r["kl_infinite_second"] else ""
            fid = (f"{r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['kl_infinite']:.1%} | {r['kl_mean_second']:.2e}{infinite} | "
                   f"{r['flag_jaccard']:.3f} | {r['delta_corr']:.3f}")
        accuracies = " | ".join(f"{r[k]:.3f}" if k in r else "—" for k in ("acc_rl", "acc_extrapolated", "acc_base"))
        print(f"| {r['rank']} | {fid} | {accuracies} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
