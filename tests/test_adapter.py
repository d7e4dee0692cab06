"""The PEFT LoRA adapter reader (server/engine/adapter.py): the deltas it reads are the ones PEFT
merges (scaling, rsLoRA, rank and alpha patterns, selective targets), packed layers line up with
vLLM's qkv_proj and gate_up_proj, and everything that is not plain LoRA is refused in one line."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlvrx.server.engine.adapter import read_adapter
from rlvrx.server.engine.pair import PairError, check_adapter_pair
from rlvrx.server.toy_pair import build_lora_child
from tests.test_startup import serve_fails

PROJECTION_WEIGHT = re.compile(r"model\.layers\.(\d+)\.\w+\.(\w+)\.weight")


@pytest.fixture(scope="module")
def base(toy_pairs):
    return toy_pairs["qwen2"][0]


def base_config(base) -> dict:
    return json.loads((base / "config.json").read_text())


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"o_proj": 3.0, "up_proj": 20.0}},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
], ids=["alpha-over-r", "rslora", "patterns", "selective"])
def test_deltas_are_what_peft_merges(base, tmp_path, options):
    adapter_dir, merged_dir = build_lora_child(base, tmp_path, **options)
    adapter = read_adapter(adapter_dir, base_config(base))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    targeted = 0
    for name, weight in before.items():
        match = PROJECTION_WEIGHT.fullmatch(name)
        lora = adapter.modules.get((int(match[1]), match[2])) if match else None
        merged_delta = after[name] - weight
        if lora is None:
            assert not merged_delta.any(), name
        else:
            targeted += 1
            assert torch.allclose(lora.b @ lora.a, merged_delta, atol=1e-5), name
    assert targeted == len(adapter.modules) > 0


def test_packed_layers_stack_the_ranks_and_leave_untargeted_slices_zero(base, tmp_path):
    adapter_dir, _ = build_lora_child(base, tmp_path, target_modules=["q_proj", "v_proj", "up_proj"],
                                      rank_pattern={"v_proj": 2})
    adapter = read_adapter(adapter_dir, base_config(base))
    a, (q, k, v) = adapter.packed(0, ("q_proj", "k_proj", "v_proj"))
    assert a.shape == (4 + 2, 64) and [b.shape for b in (q, k, v)] == [(64, 6), (32, 6), (32, 6)]
    for b, name in ((q, "q_proj"), (v, "v_proj")):
        lora = adapter.modules[0, name]
        assert torch.equal(b @ a, lora.b @ lora.a)
    assert not k.any()
    _, (gate, up) = adapter.packed(1, ("gate_proj", "up_proj"))
    assert not gate.any() and up.any()
    assert adapter.packed(0, ("o_proj",)) is None


def edit_config(adapter_dir, **fields):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def add_tensor(adapter_dir, name, tensor):
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({**tensors, name: tensor}, str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("options, edit, expected", [
    ({"use_dora": True}, None, "DoRA (use_dora)"),
    ({"use_dora": True}, lambda d: edit_config(d, use_dora=False), "DoRA is not served"),
    ({"lora_bias": True, "target_modules": ["q_proj"]}, None, "LoRA bias"),
    ({"bias": "all"}, None, "trains biases"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, None, "embeddings or lm_head"),
    ({}, lambda d: edit_config(d, r=8), "rank 8 need (8, 128)"),
    ({}, lambda d: add_tensor(d, "base_model.model.lm_head.weight", torch.zeros(384, 64)), "embeddings or lm_head"),
    ({}, lambda d: add_tensor(d, "base_model.model.model.layers.5.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
     "not a projection of this base model"),
    ({}, lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
], ids=["dora", "dora-weights", "lora-bias", "bias", "modules-to-save", "embedding", "rank", "lm-head-tensor",
        "layer-out-of-range", "no-weights"])
def test_refuses_what_is_not_plain_lora(base, tmp_path, options, edit, expected):
    adapter_dir, _ = build_lora_child(base, tmp_path, **options)
    if edit is not None:
        edit(adapter_dir)
    with pytest.raises(PairError, match=re.escape(expected)):
        check_adapter_pair(str(adapter_dir), str(base))


def test_refuses_an_adapter_of_another_shape(base, tmp_path):
    from rlvrx.server.toy_pair import build_pair

    wide_base, _ = build_pair(tmp_path / "wide", hidden=128)
    adapter_dir, _ = build_lora_child(wide_base, tmp_path / "lora")
    with pytest.raises(PairError, match=re.escape("need (4, 128) and (64, 4)")):
        check_adapter_pair(str(adapter_dir), str(base))


@pytest.fixture
def other_architecture(base, tmp_path):
    other = tmp_path / "gpt2"
    shutil.copytree(base, other)
    config = base_config(other)
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    return other


def test_serve_refuses_in_one_line(base, other_architecture, tmp_path):
    adapter_dir, _ = build_lora_child(base, tmp_path / "dora", use_dora=True)
    assert "DoRA" in serve_fails(adapter_dir, base)
    adapter_dir, _ = build_lora_child(base, tmp_path / "plain")
    line = serve_fails(adapter_dir, other_architecture)
    assert "GPT2LMHeadModel" in line and "merge_and_unload" in line
