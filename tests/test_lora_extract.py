"""`rlvrx lora-extract` (tools/lora_extract.py): at full rank the adapter, merged by peft, with the
RL tensors written beside it, is the RL model (float64 logits); at rank R each delta is the best
rank-R approximation (Eckart–Young, against torch.linalg.svd); the report's energies are the
singular values'; refused pairs end in one line with exit code 2; the server takes only per-stream
tensors of the base beside the adapter; and a served low-rank pair whose RL model also differs in
embeddings, lm_head, norms and biases is the float64 reference of base + truncated deltas with the RL
model's own non-projection tensors (tests/engine_checks.py; eager, compiled at TP 2, and on the demo
pair, whose output head is tied to the embedding)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rlvrx.server.engine.adapter import RL_TENSORS_FILE, read_adapter
from rlvrx.server.engine.pair import PairError, check_adapter_pair
from rlvrx.server.toy_pair import build_pair, build_tied_pair, build_tokenizer
from tests.conftest import ROOT, child_env
from rlvrx.tools.lora_extract import PROJECTION_WEIGHT, energy_report, extract, served_rl_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 12]])


def config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def float64(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_full_rank_reproduces_the_rl_model(toy_pairs, tmp_path, family):
    base, rl = toy_pairs[family]
    rows = extract(base, rl, None, tmp_path)
    assert check_adapter_pair(str(tmp_path), str(base)) == config(base)["architectures"][0]  # the server takes it
    assert all(row["dropped_over_delta"] < 1e-5 and row["how"] in ("LoRA", "RL copy", "equal") for row in rows)
    rl_tensors = load_file(str(tmp_path / RL_TENSORS_FILE))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= rl_tensors.keys()
    with torch.no_grad():
        got, want = served_rl_model(base, tmp_path)(IDS).logits, float64(rl)(IDS).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_each_delta_is_the_best_rank_r_approximation(toy_pairs, tmp_path):
    base, rl = toy_pairs["qwen2"]
    rank = 3
    rows = {row["group"]: row for row in extract(base, rl, rank, tmp_path)}
    adapter = read_adapter(tmp_path, config(base))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(rl / "model.safetensors"))
    residual = {}
    for name, w in before.items():
        match = PROJECTION_WEIGHT.fullmatch(name)
        if match is None:
            continue
        delta = after[name].double() - w.double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        lora = adapter.modules[int(name.split(".")[2]), match[2]]
        assert lora.a.shape[0] == rank
        # The tool's SVD is float32's: off by about eps·σ₁/(σ_R − σ_R+1) of the delta.
        assert torch.allclose((lora.b @ lora.a).double(), best, atol=1e-4 * delta.abs().max().item()), name
        group = residual.setdefault(name.replace(name.split(".")[2], "N", 1), [0.0, 0.0])
        group[0] += s[rank:].square().sum().item()
        group[1] += s.square().sum().item()
    for group, (dropped, total) in residual.items():
        assert rows[group]["dropped_over_delta"] == pytest.approx((dropped / total) ** 0.5, rel=1e-4)


def test_report_gives_the_energy_of_the_top_singular_values(toy_pairs, tmp_path):
    base, rl = toy_pairs["llama"]
    table = energy_report(base, rl, tmp_path, ranks=(1, 4))
    energy = json.loads((tmp_path / "rank_energy.json").read_text())
    assert (tmp_path / "rank_energy.png").stat().st_size > 0 and "| rank 1 | rank 4 |" in table
    name = "model.layers.1.mlp.down_proj"
    delta = load_file(str(rl / "model.safetensors"))[f"{name}.weight"] - load_file(str(base / "model.safetensors"))[f"{name}.weight"]
    s2 = torch.linalg.svdvals(delta.double()).square()
    assert energy[name] == pytest.approx((s2.cumsum(0) / s2.sum()).tolist(), abs=1e-6)
    assert len(energy) == 2 * 7 and all(e[-1] == pytest.approx(1.0) for e in energy.values())


def extract_fails(base, rl, out, *extra) -> str:
    proc = subprocess.run([sys.executable, "-m", "rlvrx.server.cli", "lora-extract", "--base", str(base), "--rl", str(rl),
                           "--rank", "2", "--out", str(out), *extra],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("rlvrx: error: "), proc.stderr
    assert not (Path(out) / "adapter_config.json").exists()
    return lines[0]


def edited_copy(rl, tmp_path, edit):
    copy = tmp_path / "rl-edited"
    shutil.copytree(rl, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


def test_refuses_pairs_it_cannot_extract_in_one_line(toy_pairs, tmp_path):
    base, rl = toy_pairs["qwen2"]
    out = tmp_path / "out"
    name = "model.layers.0.mlp.up_proj.weight"

    reshaped = edited_copy(rl, tmp_path / "shape", lambda t: t.update({name: t[name][:, :32].contiguous()}))
    assert f"{name!r} is (128, 32) in the RL checkpoint and (128, 64) in the base" in extract_fails(base, reshaped, out)
    missing = edited_copy(rl, tmp_path / "missing", lambda t: t.pop(name))
    assert f"{name!r} is in the base checkpoint only" in extract_fails(base, missing, out)

    other_vocab = tmp_path / "vocab"
    shutil.copytree(rl, other_vocab)
    build_tokenizer(vocab_size=383).save_pretrained(other_vocab)
    assert "tokenizers differ" in extract_fails(base, other_vocab, out)
    wide, _ = build_pair(tmp_path / "wide", hidden=128)
    assert "hidden_size" in extract_fails(base, wide, out)
    assert "--targets: qkv_proj" in extract_fails(base, rl, out, "--targets", "qkv_proj")
    assert "--out: give the directory" in extract_fails(base, rl, "")
    assert "is one of the two checkpoints" in extract_fails(base, rl, rl)
    assert "is one of the two checkpoints" in extract_fails(base, rl, base)
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a directory" in extract_fails(base, rl, tmp_path / "a-file")


@pytest.mark.parametrize("name, tensor, expected", [
    ("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64), "does not hold per stream"),
    ("model.layers.0.self_attn.q_norm.weight", torch.ones(32), "does not hold per stream"),  # not a Qwen3 base
    ("model.layers.2.input_layernorm.weight", torch.ones(64), "does not hold per stream"),  # 2 layers
    ("model.norm.weight", torch.ones(65), "of shape (65,); this base model's is (64,)"),
])
def test_the_server_takes_only_per_stream_tensors_of_the_base_beside_the_adapter(toy_pairs, tmp_path, name, tensor,
                                                                                  expected):
    base, rl = toy_pairs["qwen2"]
    extract(base, rl, 2, tmp_path)
    tensors = load_file(str(tmp_path / RL_TENSORS_FILE))
    save_file({**tensors, name: tensor}, str(tmp_path / RL_TENSORS_FILE))
    with pytest.raises(PairError, match=re.escape(expected)):
        check_adapter_pair(str(tmp_path), str(base))


@pytest.fixture(scope="module")
def low_rank_pairs(tmp_path_factory):
    """{family: (base, adapter, float64 (reference RL, base))}: rank-4 extractions of toy pairs whose
    RL models also differ in embeddings, lm_head, norms and (Qwen2) q/k/v biases or (Qwen3) q/k norms."""
    root = tmp_path_factory.mktemp("low-rank")
    pairs = {}
    for family in ("qwen2", "qwen3"):
        base, rl = build_pair(root / family, family=family, seed=3)
        tensors = load_file(str(rl / "model.safetensors"))
        generator = torch.Generator().manual_seed(4)
        for name, tensor in tensors.items():
            if name.endswith(".bias"):  # the toy's biases start at zero, so its noise left them equal
                tensors[name] = tensor + 0.3 * torch.randn(tensor.shape, generator=generator)
        save_file(tensors, str(rl / "model.safetensors"))
        adapter_dir = root / family / "adapter"
        rows = extract(base, rl, 4, adapter_dir)
        assert {row["how"] for row in rows} == {"LoRA rank 4", "RL copy"}
        pairs[family] = (base, adapter_dir, (served_rl_model(base, adapter_dir), float64(base)))
    return pairs


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_served_low_rank_pair_is_base_plus_truncated_delta_with_the_rl_models_own_tensors(low_rank_pairs, tmp_path,
                                                                                          family):
    from tests import engine_checks as checks
    from tests.conftest import run_engine

    base, adapter_dir, models = low_rank_pairs[family]
    run = run_engine({"pair": [str(adapter_dir), str(base)], "batches": checks.pair_batches()[:2]}, tmp_path)
    checks.check_greedy(run, models)
    checks.check_sampled(run, models)


def test_served_low_rank_pair_compiled_at_tensor_parallel_2(low_rank_pairs, tmp_path):
    """The RL copies sharded (vocab-parallel embedding and lm_head, q/k/v biases by head) and compiled."""
    from tests import engine_checks as checks
    from tests.conftest import run_engine
    from tests.test_lora import TP

    base, adapter_dir, models = low_rank_pairs["qwen2"]
    run = run_engine({"pair": [str(adapter_dir), str(base)], "batches": checks.pair_batches()[:2], "eager": False,
                      **TP}, tmp_path)
    checks.check_greedy(run, models)
    checks.check_sampled(run, models)


def test_served_low_rank_demo_pair_with_tied_embeddings(tmp_path):
    """The demo pair ties lm_head to the embedding: the RL stream's output head is its own embedding."""
    from transformers import AutoTokenizer

    from rlvrx.server.arith_pair import Task
    from tests import engine_checks as checks
    from tests.conftest import ref_settings, run_engine

    base, rl = ROOT / "demo/pair/base", ROOT / "demo/pair/rl"
    assert config(base)["tie_word_embeddings"]
    extract(base, rl, 4, tmp_path / "adapter")
    assert "lm_head.weight" not in load_file(str(tmp_path / "adapter" / RL_TENSORS_FILE))
    models = served_rl_model(base, tmp_path / "adapter"), float64(base)
    task = Task(AutoTokenizer.from_pretrained(rl))
    prompts = [task.prompt_ids(a, b) for a, b in ((123, 456), (987, 654), (5, 995))]
    batch = [{"prompt_ids": p, "params": checks.greedy(checks.xargs(*s))} for s in checks.GREEDY_SETTINGS for p in prompts]
    # The runner's max_model_len (512) is past the demo's 128 positions; these prompts use 18.
    run = run_engine({"pair": [str(tmp_path / "adapter"), str(base)], "batches": [batch],
                      "env": {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}}, tmp_path)
    results = iter(run[0])
    for s in checks.GREEDY_SETTINGS:
        for prompt in prompts:
            assert next(results)[0]["token_ids"] == checks.reference_greedy(models, prompt, ref_settings(*s)), (s, prompt)


TIED_HEADS = [{"rl": "copy"}, {"base": "copy", "rl": "copy"}, {"rl": "own"}, {"base": "own"},
              {"base": "own", "rl": "own"}, {"base": "copy", "rl": "own"}]


@pytest.mark.parametrize("heads", TIED_HEADS, ids=lambda h: ",".join(f"{k}-{v}" for k, v in h.items()))
def test_a_tied_pair_that_stores_lm_head_extracts_as_transformers_loads_it(tmp_path, heads):
    """Each model's head is its stored one when that differs from its embedding, else its
    embedding: a stored copy is left out, the RL head is copied beside the adapter when either
    model has a head of its own, and the adapter with the RL copies is the RL model as
    transformers loads it."""
    base, rl = build_tied_pair(tmp_path, heads)
    extract(base, rl, None, tmp_path / "adapter")
    assert check_adapter_pair(str(tmp_path / "adapter"), str(base)) == "Qwen2ForCausalLM"
    rl_tensors = load_file(str(tmp_path / "adapter" / RL_TENSORS_FILE))
    # The RL head is copied where it is its own, or where the base has one and the two differ.
    assert ("lm_head.weight" in rl_tensors) == ("own" in heads.values())
    with torch.no_grad():
        got, want = served_rl_model(base, tmp_path / "adapter")(IDS).logits, float64(rl)(IDS).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("heads", [{"base": "own", "rl": "copy"}, {"rl": "own"}],
                         ids=["base-own,rl-copy", "rl-own"])
def test_served_tied_pair_whose_checkpoints_store_lm_head(tmp_path, heads):
    """A base that stores its head (vLLM then unties the engine's config) with an RL model whose head
    is its embedding, and a tied base with an RL head of its own: the served rank-4 extraction is the
    float64 reference of both models as transformers loads them."""
    from tests import engine_checks as checks
    from tests.conftest import run_engine

    base, rl = build_tied_pair(tmp_path, heads)
    extract(base, rl, 4, tmp_path / "adapter")
    models = served_rl_model(base, tmp_path / "adapter"), float64(base)
    run = run_engine({"pair": [str(tmp_path / "adapter"), str(base)], "batches": checks.pair_batches()[:2]}, tmp_path)
    checks.check_greedy(run, models)
    checks.check_sampled(run, models)


def test_carries_the_rl_models_generation_config_and_chat_template(toy_pairs, tmp_path):
    """What vLLM reads as the RL checkpoint's generation config (its file, or without one what it
    derives from config.json: here an eos token list unlike the base's) is what it reads from the
    adapter directory; the RL tokenizer's own chat template is there too."""
    from transformers import AutoTokenizer
    from vllm.transformers_utils.config import try_get_generation_config

    base, rl = toy_pairs["qwen2"]
    child = tmp_path / "rl"
    shutil.copytree(rl, child)
    (child / "config.json").write_text(json.dumps({**config(child), "eos_token_id": [0, 2]}))
    tokenizer = AutoTokenizer.from_pretrained(child)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}"
    tokenizer.save_pretrained(child)
    (child / "generation_config.json").unlink()  # save_pretrained's, from the config before the edit

    def read(path) -> dict:
        return try_get_generation_config(str(path), trust_remote_code=False).to_diff_dict()

    for case, file in (("derived", None), ("file", {"temperature": 0.6, "top_k": 7, "max_new_tokens": 9,
                                                       "repetition_penalty": 1.2, "eos_token_id": [0, 1]})):
        if file is not None:
            (child / "generation_config.json").write_text(json.dumps(file))
        extract(base, child, 2, tmp_path / case)
        assert read(tmp_path / case) == read(child) != read(base), case
        assert AutoTokenizer.from_pretrained(tmp_path / case).chat_template == tokenizer.chat_template
    assert read(tmp_path / "file")["top_k"] == 7


MEMORY_BOUND = 3  # lora-extract's peak allocation, in float64 sizes of the largest tensor (README)


def test_peak_memory_is_a_small_multiple_of_the_largest_tensor(tmp_path):
    """A full-rank extraction of a 12-layer pair (the adapter alone is ~35 float64 sizes of the
    largest tensor) allocates at most MEMORY_BOUND of them at once, as torch's CPU allocator
    counts it. safetensors maps each checkpoint file as one storage, which the profiler reports
    as an allocation of the file's size: those pages are the page cache's, and left out."""
    from torch.profiler import ProfilerActivity, profile

    base, rl = build_pair(tmp_path, hidden=128, layers=12, seed=5)
    largest = max(t.numel() for t in load_file(str(rl / "model.safetensors")).values()) * 8
    mapped = {(path / "model.safetensors").stat().st_size for path in (base, rl)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        extract(base, rl, None, tmp_path / "adapter")
    profiler.export_chrome_trace(str(tmp_path / "trace.json"))
    allocated = peak = 0
    for event in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]:
        if event.get("name") == "[memory]" and abs(event["args"]["Bytes"]) not in mapped:
            allocated += event["args"]["Bytes"]
            peak = max(peak, allocated)
    adapter = sum(t.numel() * 8 for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values())
    assert adapter > 10 * MEMORY_BOUND * largest  # what the tool used to hold
    assert peak <= MEMORY_BOUND * largest, f"peak {peak} bytes, largest tensor {largest} bytes in float64"
