"""`rlvrx eval`: scoring, pass@k, and a resumable run against the live server."""

import itertools
import json
import statistics
import subprocess
import sys

import pytest

from rlvrx.server import evaluation
from tests.conftest import ROOT, child_env


def test_last_boxed_takes_the_last_balanced_box():
    text = r"First \boxed{1}, then \boxed{\frac{1}{2}} and no more"
    assert evaluation.last_boxed(text) == r"\frac{1}{2}"
    assert evaluation.last_boxed("no box") is None
    assert evaluation.last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("response,answer,expected", [
    (r"so \boxed{12}", "12", True),
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{12} wait, \boxed{13}", "12", False),
    ("12", "12", False),  # no box, no credit
])
def test_is_correct_uses_math_verify_on_the_last_box(response, answer, expected):
    assert evaluation.is_correct(response, answer) is expected


def test_exact_scoring_compares_the_whole_answer():
    assert evaluation.is_correct(" 9750 ", "9750", "exact")
    assert not evaluation.is_correct("9751", "9750", "exact")


@pytest.mark.parametrize("response, answer, expected", [
    ("3 + 4 = 7.\nAnswer: 7", "7", True),
    ("Answer: 7, since 3 + 4 = 7", "7", True),     # the last number after the last 'Answer:'
    ("Answer: 8. Oh wait, 9", "9", True),
    ("Answer: 12 apples, not 13", "12", False),     # last number after 'Answer:' is 13
    ("The total is 1,200", "1200", True),
    ("5 - 9 = -4", "-4", True),
    ("Answer: none; 6 left", "6", True),
    ("Answer:", "6", False),
    ("I have 6 cats and 7 dogs", "6", False),
    ("", "0", False),
])
def test_number_scoring_takes_the_last_integer(response, answer, expected):
    assert evaluation.is_correct(response, answer, "number") is expected


def test_summary_reports_a_confidence_interval_over_problems(tmp_path):
    per_problem = [[True, True, False, False], [True, True, True, True], [False, False, False, True]]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({"setting": "rl", "setting_fields": {"preset": "rl"}, "problem_id": str(i),
                                           "answer": "1", "responses": [""] * 4, "correct": correct,
                                           "completion_tokens": 4, "extrapolated_tokens": 0}) + "\n"
                               for i, correct in enumerate(per_problem)))
    [row] = evaluation.summarize(results, [1])
    accuracies = [sum(c) / len(c) for c in per_problem]
    assert row["avg@n"] == pytest.approx(statistics.mean(accuracies))
    assert row["ci95"] == pytest.approx(1.96 * statistics.stdev(accuracies) / len(accuracies) ** 0.5)
    assert "±ci95" in evaluation.format_table([row], [1])


def test_pass_at_k_is_the_unbiased_estimator():
    """Against brute force: the fraction of k-subsets of the n samples with a correct one."""
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 2)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert evaluation.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_eval_runs_resumes_and_reports(live_server, tmp_path):
    url, name, _ = live_server
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) for a in (1, 2, 3)))
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "rlvrx.server.cli", "eval", "--url", url + "/v1", "--model", name, "--data", str(data),
               "--n", "2", "--k", "1,2", "--gamma", "0,0.5", "--tau=-0.3,null", "--max-tokens", "8",
               "--seed", "1", "--concurrency", "4", "--out", str(out)]
    first = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 * (2 * 2 + 2)  # problems × (γ×τ grid + rl + base)
    assert all(len(r["responses"]) == 2 and len(r["correct"]) == 2 for r in records)
    assert {r["setting"] for r in records} >= {"rl", "base", "gamma=0.5,tau=null,generator=base,candidates=50"}
    assert all(r["extrapolated_tokens"] == 0 for r in records if r["setting"] in ("rl", "base"))
    assert any(r["extrapolated_tokens"] > 0 for r in records if r["setting"].startswith("gamma=0.5,tau=null"))

    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert len(summary) == 6 and all("pass@2" in row and 0 <= row["avg@n"] <= 1 for row in summary)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "avg@n" in first.stdout

    before = out.read_text()
    second = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and out.read_text() == before  # resumed: nothing left to sample


def test_eval_selection_criterion_reaches_the_server(live_server, tmp_path):
    """`--selection random`: τ = 1 flags every position, τ = 0 none (the replacement-curve baseline)."""
    url, name, _ = live_server
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"problem": "What is 2 + 2?", "answer": "4"}))
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "rlvrx.server.cli", "eval", "--url", url + "/v1", "--model", name, "--data", str(data),
               "--n", "2", "--gamma", "0", "--tau", "0,1", "--selection", "random", "--presets", "",
               "--max-tokens", "6", "--seed", "1", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = {r["setting"]: r for r in map(json.loads, out.read_text().splitlines())}
    never = records["gamma=0,tau=0,generator=base,candidates=50,selection=random"]
    always = records["gamma=0,tau=1,generator=base,candidates=50,selection=random"]
    assert never["extrapolated_tokens"] == 0
    assert always["extrapolated_tokens"] == pytest.approx(always["completion_tokens"])
