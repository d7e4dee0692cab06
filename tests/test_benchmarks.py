"""The benchmark scripts run end to end (shrunk): the GPU check under the Triton interpreter, the on-paper
estimate of speculative decoding's bytes per token."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_combine_bench_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/combine_bench.py", "--device", "cpu", "--small", "--kernel", "--baseline", "HEAD",
         "--out", str(out)],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["check"] and all(c["greedy_argmax_equal"] for c in results["check"])
    assert len(results["rows"]) == 2
    for row in results["rows"]:
        assert row["torch_ms"] > 0 and row["kernel_ms"] > 0 and row["decode_ms"] > 0
    assert sorted((r["rows"], r["sigma"] or 0, r["candidates"], r["batch"]) for r in results["vs_sort"]) == sorted(
        (kind, sigma or 0, k, n) for kind, sigma in (("lm", None), ("flat", 2.5), ("flat", 1.0)) for k in (50, 0)
        for n in (1, 4))
    assert all(r["combine_ms"] > 0 and r["sort_ms"] > 0 and r["baseline_ms"] > 0 for r in results["vs_sort"])


def test_hf_generate_steps_are_the_rule_on_the_unpadded_prefix(toy_pairs, monkeypatch):
    """Each step of the transformers baseline (left-padded batch, the base model's cache kept
    between steps) returns kernels.combine of the two models' logits computed afresh on that
    row's prefix alone; every request gets exactly max_tokens tokens."""
    import torch

    from benchmarks.baselines import transformers_generate as hf
    from rlvrx.kernels import RowSettings, combine

    base_path, rl_path = toy_pairs["llama"]
    baseline = hf.TransformersGenerateBaseline(str(rl_path), str(base_path))
    prompts = [baseline.tokenizer(t).input_ids for t in ("Hello", "The quick brown fox jumps over", "What is 7 + 5?")]
    assert len({len(p) for p in prompts}) == 3  # the batch is padded
    steps = []
    original = hf.BaseModelProcessor.__call__

    def recording(self, input_ids, scores):
        out = original(self, input_ids, scores)
        steps.append((input_ids.clone(), scores.clone(), out.clone()))
        return out

    monkeypatch.setattr(hf.BaseModelProcessor, "__call__", recording)
    max_tokens, width = 5, max(len(p) for p in prompts)
    records = baseline.run(prompts, max_tokens, gamma=0.5, tau=0.0, temperature=1.0, top_p=0.7, seed=0)

    assert [r["tokens"] for r in records] == [max_tokens] * 3
    assert all(len(r["itl_s"]) == max_tokens - 1 and 0 < r["ttft_s"] <= r["e2e_s"] for r in records)
    assert len(steps) == max_tokens
    eos = baseline.rl.generation_config.eos_token_id
    settings = RowSettings.uniform(1, gamma=0.5, tau=0.0, generator="base", candidates=50, temperature=1.0, top_p=0.7)
    extrapolated = 0
    for input_ids, scores, out in steps:
        for row, prompt in enumerate(prompts):
            prefix = input_ids[row, width - len(prompt):]
            assert prefix[: len(prompt)].tolist() == prompt
            with torch.no_grad():
                rl, base = (m(prefix[None]).logits[:, -1] for m in (baseline.rl, baseline.base))
            rl, base = (x.index_fill(1, torch.tensor([eos]), float("-inf")) for x in (rl, base))  # min_new_tokens
            torch.testing.assert_close(scores[row], rl[0], atol=1e-4, rtol=1e-4)
            expected = combine(rl, base, settings)
            torch.testing.assert_close(out[row], expected.out[0], atol=1e-4, rtol=1e-4)
            extrapolated += float(expected.prob[0]) > 0
    assert extrapolated > 0  # the settings exercise the rule, not only the proposal
    generated = torch.tensor([r["ids"] for r in records])
    assert torch.equal(steps[-1][0][:, width:], generated[:, :-1])


def test_spec_bytes_estimate(tmp_path):
    """The on-paper table: speculation divides each system's bytes per token by the accepted length, and the
    two-backbone pair at an accepted length of 2 reads what one model reads without speculation."""
    out = tmp_path / "bytes.json"
    proc = subprocess.run([sys.executable, "benchmarks/spec_bytes_estimate.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["system"], r["batch"], r["accepted_length"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 27
    for (system, batch, length), row in rows.items():
        assert abs(row["gb_per_token"] * length / rows[(system, batch, 1)]["gb_per_token"] - 1) < 1e-12
    for batch in (1, 8, 32):
        assert abs(rows[("rlvrx, two backbones", batch, 2)]["ratio_to_one_model_no_spec"] - 1) < 1e-12
        assert rows[("rlvrx, stacked LoRA", batch, 1)]["ratio_to_one_model_no_spec"] > 0.5


@pytest.mark.parametrize("selection,tau", [("delta_logp", -0.05), ("entropy", 1.0), ("random", 0.3)])
def test_pair_sampling_follows_the_rule_on_each_unpadded_prefix(hf_models, selection, tau):
    """benchmarks/pair_sampling.py (the offline sampler of lowrank_fidelity and real_rlvr_accuracy):
    in a left-padded batch with KV caches, every token drawn has mass under the float64 reference's q
    on that row's own prefix, the reported extrapolated count is Σ of the reference's M along the
    answer, and answer_logits are the logits of each prefix computed afresh."""
    import math

    import numpy as np

    from benchmarks.pair_sampling import answer_logits, sample
    from rlvrx.kernels import reference
    from tests.conftest import next_logits, ref_settings

    rl, base = hf_models["llama"]
    prompts = [[5, 9], [3, 17, 4, 8, 2], [11, 6, 7]]
    s = ref_settings(0.5, tau, "base", 20, temperature=1.0, top_p=0.9, selection=selection)
    sampled = sample(rl, base, prompts, s, eos=-1, seed=3, max_new=6)
    assert [len(a) for a in sampled.answers] == [6, 6, 6]
    for prompt, answer, flagged in zip(prompts, sampled.answers, sampled.extrapolated):
        expected = 0.0
        for i, token in enumerate(answer):
            a, b = next_logits((rl, base), prompt + answer[:i])
            assert reference.two_stage_distribution(a, b, s)[token] > 0
            expected += reference.extrapolation_probability(a, b, s)
        assert math.isclose(flagged, expected, abs_tol=1e-5)
    logits = answer_logits(rl, prompts, sampled.answers, chunk=2)
    positions = [(p, a[:i]) for p, a in zip(prompts, sampled.answers) for i in range(len(a))]
    assert logits.shape[0] == len(positions)
    for row, (prompt, prefix) in zip(logits, positions):
        np.testing.assert_allclose(row, next_logits((rl,), prompt + prefix)[0], atol=1e-9)
    alone = sample(rl, rl, prompts, ref_settings(0.0, -math.inf, "rl", 0, temperature=1.0), eos=-1, seed=3, max_new=3)
    assert alone.extrapolated == [0.0] * 3


def test_real_rlvr_accuracy_records_one_line_per_problem(hf_models, tmp_path):
    """real_rlvr_accuracy.run: answer r of the repeated prompt list belongs to problem r mod count,
    and its records are what evaluation.summarize reads."""
    import math

    from benchmarks import real_rlvr_accuracy as acc
    from benchmarks.lowrank_fidelity import Problems
    from rlvrx.server import evaluation

    rl, base = hf_models["llama"]
    prompts = [[5, 9], [3, 17, 4]]
    problems = Problems(prompts, lambda i, answer: i == 0, eos=-1, max_new=4, second_kl=None, second_kl_name="",
                        rl=None, extrapolated=None)
    results = tmp_path / "rl.jsonl"
    acc.run("rl", acc.RUNS["rl"], (base, rl), problems, 3, results)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["problem_id"] for r in records] == [0, 1]
    assert [r["correct"] for r in records] == [[True] * 3, [False] * 3]
    assert [r["completion_tokens"] for r in records] == [12, 12] and all(r["extrapolated_tokens"] == 0 for r in records)
    row = evaluation.summarize(results, [3])[0]
    assert row["avg@n"] == 0.5 and row["pass@3"] == 0.5
    assert math.isclose(row["ci95"], 1.96 * math.sqrt(0.5) / math.sqrt(2))
