"""The GPU check (benchmarks/gpu_check.sh) on the CPU: the whole `--small` run end to end, a
kernel mismatch caught, and the plain-torch decode step of decode_step_bench.py equal to
transformers' Qwen2 (the stacked step's LoRA rows equal to the merged weights)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import decode_step_bench as bench
from benchmarks import kernel_check
from benchmarks.timing import Budget
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_small_run_writes_every_part_and_its_tables(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--small", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {name: json.loads((tmp_path / f"{name}.json").read_text())
             for name in ("kernel_correctness", "kernel_cost", "kernel_graphs", "decode_step")}
    assert all(not p["stopped_early"] for p in parts.values())

    checks = parts["kernel_correctness"]["records"]
    assert len(checks) == 8 and all(r["ok"] and r["all_written"] for r in checks)
    small = [r["vs_reference"] for r in checks if r["vocab"] == kernel_check.SMALL.reference_sampled_max_vocab]
    large = [r["vs_reference"] for r in checks if r["vocab"] > kernel_check.SMALL.reference_sampled_max_vocab]
    assert all(r["greedy_rows"] == 1 and r["sampled_rows"] == 1 and r["unfinished"] == 0 for r in small)
    assert all(r["greedy_rows"] == 1 and r["sampled_rows"] == 0 for r in large)
    assert all(r["kernel_ms"] > 0 and r["copy_ms"] > 0 and r["torch_ms"] > 0 for r in parts["kernel_cost"]["records"])
    assert all(r["eager_us"] > 0 for r in parts["kernel_graphs"]["records"])
    steps = parts["decode_step"]["records"]
    assert [r["batch"] for r in steps] == [1, 2]
    for r in steps:
        assert all(r[name]["ms"] > 0 for name in ("single", "two_backbones", "stacked", "stacked_no_lora"))
        assert r["combine_ms"] > 0 and 0 < r["roofline"]["stacked_over_two_backbones"]

    tables = (tmp_path / "tables.md").read_text()
    assert tables.count("#### ") == 5 and "did not run" not in tables and "FAIL" not in tables
    assert tables in (tmp_path / "gpu_check.log").read_text()


def test_a_kernel_mismatch_fails_the_check_and_is_still_written(tmp_path, monkeypatch):
    combine = kernel_check.triton_combine.combine

    def off_by_a_little(*args, **kwargs):
        got = combine(*args, **kwargs)
        return got._replace(prob=got.prob + 1e-3)

    monkeypatch.setattr(kernel_check.triton_combine, "combine", off_by_a_little)
    grid = kernel_check.Grid(vocabs=(100,), batches=(2,), reference_sampled_max_vocab=100, repeats=1, graph_calls=1)
    monkeypatch.setattr(kernel_check, "DTYPES", {"float32": torch.float32})
    monkeypatch.setattr(kernel_check, "SETTINGS", {"paper": 50})
    jobs = kernel_check.ReferenceJobs(1)
    path, results = kernel_check.run_section("correctness", grid, "cpu", Budget(None), tmp_path, jobs)
    [record] = json.loads(path.read_text())["records"]
    assert not record["ok"] and record["vs_torch"]["max_M_error"] == pytest.approx(1e-3, rel=1e-2)
    jobs.collect(Budget(None))
    assert results["records"][0]["vs_reference"]["max_M_error"] == pytest.approx(1e-3, rel=1e-2)


def qwen2_weights(model) -> bench.Weights:
    """decode_step_bench's weights from a transformers Qwen2 model."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(bench.Layer(
            ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
            wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            bqkv=torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), wo=attn.o_proj.weight,
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), w_down=mlp.down_proj.weight))
    return bench.Weights(embed=model.model.embed_tokens.weight, layers=layers, norm=model.model.norm.weight,
                         lm_head=model.lm_head.weight)


@torch.no_grad()
def test_decode_step_is_a_qwen2_step_and_lora_rows_are_the_merged_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = bench.SMALL
    config = Qwen2Config(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate, vocab_size=shape.vocab, rope_theta=shape.rope_theta,
                         rms_norm_eps=shape.eps, tie_word_embeddings=False, max_position_embeddings=shape.context)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).double().eval()
    for p in model.parameters():  # biases and norms away from their 0 / 1 initial values
        p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, shape.vocab, (2, shape.context))
    expected = model(ids).logits[:, -1]
    cache = model(ids[:, :-1], use_cache=True).past_key_values
    size = (shape.layers, 2, shape.kv_heads, shape.context, shape.head_dim)
    k_cache, v_cache = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for i, layer in enumerate(cache.layers):
        k_cache[i, :, :, :-1], v_cache[i, :, :, :-1] = layer.keys, layer.values
    weights = qwen2_weights(model)
    got = bench.decode_step(weights, shape, k_cache, v_cache, ids[:, -1])
    # Not to float64's precision: the step computes norms, RoPE and softmax in float32 (for bf16
    # weights), and transformers rounds its RoPE angles in float32 another way.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    lora = [bench.LoraLayer(*((a.double(), b.double()) for a, b in vars(layer).values()))
            for layer in bench.random_lora(shape, 4, "cpu", torch.float32)]
    stacked = bench.decode_step(weights, shape, k_cache.clone(), v_cache.clone(), ids[:, -1], lora=lora, lora_rows=1)
    assert (stacked[0] - got[0]).abs().max() > 1e-4  # the delta moves the RL row
    for layer, adapter in zip(weights.layers, lora):
        for name, (a, b) in zip(("wqkv", "wo", "w_gate_up", "w_down"), vars(adapter).values()):
            setattr(layer, name, getattr(layer, name) + b @ a)
    merged = bench.decode_step(weights, shape, k_cache, v_cache, ids[:, -1])
    torch.testing.assert_close(stacked[0], merged[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stacked[1], got[1], atol=1e-12, rtol=0)
