"""The real RLVR pair's benchmarks without training: the task (benchmarks/real_rlvr_task.py) is
seeded, its answers right, its held-out split never trained on, the reward TRL sees is the one
the evaluation scores, and the Δlog p histogram is read from /metrics as the difference of two reads."""

import json
import math
import re

import pytest

from benchmarks import real_rlvr, real_rlvr_eval, real_rlvr_task as task
from rlvrx.server import evaluation


def solve(question: str) -> int:
    """An independent solver of the task's wordings: the numbers in order, the operation by phrase."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "then gives away" in question:
        return n[0] + n[1] - n[2]
    if "more" in question:
        return n[0] + n[1]
    if "gives away" in question:
        return n[0] - n[1]
    if "bags" in question:
        return n[0] * n[1]
    if "minutes are there in" in question:
        return 60 * n[0] + (n[1] if len(n) > 1 else 0)
    raise AssertionError(f"unknown wording: {question}")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_problems_are_seeded_distinct_and_correct(split):
    problems = task.problems(split, 300, seed=3)
    assert problems == task.problems(split, 300, seed=3)
    assert problems != task.problems(split, 300, seed=4)
    assert len({p["problem"] for p in problems}) == 300
    for p in problems:
        question = p["problem"].removesuffix(" " + task.INSTRUCTION)
        assert question != p["problem"] and int(p["answer"]) == solve(question) >= 0
    assert {p["problem"].split()[0] for p in problems} >= {"How", "There"}  # several templates


def test_held_out_problems_are_never_trained_on():
    train = {p["problem"] for p in task.problems("train", 2000, seed=0)}
    held_out = {p["problem"] for p in task.problems("heldout", 500, seed=1)}
    assert not train & held_out
    assert not {p["problem"] for p in task.problems("train", 500, seed=1)} & held_out  # same seed too
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1, seed=0)


def test_trl_reward_is_the_evaluation_score():
    completions = [[{"role": "assistant", "content": "4 + 5 = 9\nAnswer: 9"}],
                   [{"role": "assistant", "content": "Answer: 8"}],
                   [{"role": "assistant", "content": "no idea"}]]
    rewards = real_rlvr.reward_function(completions, answer=["9", "9", "9"], prompts=None)
    assert rewards == [1.0, 0.0, 0.0]
    assert rewards == [float(evaluation.is_correct(c[-1]["content"], "9", "number")) for c in completions]


def test_delta_histogram_is_the_difference_of_two_reads(tmp_path, capsys):
    before = {-0.5: 10.0, -0.3: 20.0, 0.0: 50.0, math.inf: 100.0}
    after = {-0.5: 12.0, -0.3: 25.0, 0.0: 70.0, math.inf: 140.0}  # 40 new tokens: 2, 3, 15, 20 per bucket
    real_rlvr_eval.delta_histogram(before, after, tmp_path)
    written = json.loads((tmp_path / "delta_logp.json").read_text())
    assert written["tokens"] == 40 and written["flagged_at_tau_-0.3"] == pytest.approx(5 / 40)
    assert [b["count"] for b in written["buckets"]] == [2, 3, 15, 20]
    assert "0.1250" in capsys.readouterr().out
    real_rlvr_eval.delta_histogram(after, after, tmp_path / "resumed")  # nothing new: says so, no crash
    assert "nothing was sampled" in capsys.readouterr().out
