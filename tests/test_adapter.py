"""The PEFT LoRA adapter reader (server/engine/adapter.py, server/engine/rl_stream.py): for every
adapter PEFT loads as plain LoRA — scaling, rsLoRA, rank and alpha patterns, selective and regex
targets, adapter_model.bin, the initialisations that leave the base alone, PiSSA/OLoRA saved converted,
modules_to_save, LoRA on embed_tokens and lm_head, trainable tokens, trained and LoRA biases — the
weights the stacked model gives the RL stream are, tensor by tensor, the checkpoint of PEFT's own load
and merge_and_unload; packed layers line up with vLLM's qkv_proj and gate_up_proj; everything else
(unconverted PiSSA-like adapters, DoRA and other variants, a quantized base, prompt embeddings where the
RL model embeds differently, ...) is refused in one line."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlvrx.server.engine.adapter import ATTENTION, read_adapter
from rlvrx.server.engine.pair import PairError, check_adapter_pair, check_serving_flags
from rlvrx.server.toy_pair import build_lora_child, merge_adapter
from tests.test_startup import serve_fails


@pytest.fixture(scope="module")
def base(toy_pairs):
    return toy_pairs["qwen2"][0]


def base_config(base) -> dict:
    return json.loads((base / "config.json").read_text())


def edit_config(adapter_dir, **fields):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def add_tensor(adapter_dir, name, tensor):
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({**tensors, name: tensor}, str(adapter_dir / "adapter_model.safetensors"))


def rl_weights(adapter, base_tensors: dict) -> dict:
    """The RL model's weights as the stacked model serves them: the base's, plus B·A on each targeted
    projection, replaced by the RL stream's own copies."""
    weights = dict(base_tensors)
    for (layer, name), lora in adapter.modules.items():
        key = f"model.layers.{layer}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}.weight"
        weights[key] = base_tensors[key] + lora.b @ lora.a
    return {**weights, **adapter.rl.materialize(base_tensors)}


def check_served_as_peft_merges(base, adapter_dir, merged_dir) -> set[str]:
    """Every tensor of PEFT's merged checkpoint is the stacked model's, and PEFT changed exactly the
    projections the adapter has LoRA for; return the other tensors PEFT changed."""
    before, after = load_file(str(base / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    adapter = read_adapter(adapter_dir, base_config(base))
    served = rl_weights(adapter, before)
    assert served.keys() == after.keys()
    for name, weight in after.items():
        assert torch.allclose(served[name], weight, rtol=0, atol=2e-6), name
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    projections = {name for name in changed if name.endswith("_proj.weight")}
    assert {(int(n.split(".")[2]), n.split(".")[4]) for n in projections} == adapter.modules.keys() != set()
    return changed - projections

SERVED = {  # id: (build_lora_child options, tensors changed beyond the projections)
    "alpha-over-r": ({}, set()),
    "rslora": ({"use_rslora": True}, set()),
    "patterns": ({"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                  "alpha_pattern": {"o_proj": 3.0, "up_proj": 20.0}}, set()),
    "selective": ({"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]}, set()),
    # a regex that names lm_head and embed_tokens to exclude them (PEFT full-matches it to module names)
    "regex": ({"target_modules": r"^(?!.*(lm_head|embed_tokens)).*_proj$"}, set()),
    "bin": ({"safe_serialization": False}, set()),
    "pissa-converted": ({"init_lora_weights": "pissa", "convert": True}, set()),
    "olora-converted": ({"init_lora_weights": "olora", "convert": True}, set()),
    "modules-to-save": ({"modules_to_save": ["embed_tokens", "lm_head", "norm"]},
                        {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                         *(f"model.layers.{i}.{n}.weight" for i in (0, 1)
                           for n in ("input_layernorm", "post_attention_layernorm"))}),
    "lora-embeddings": ({"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
                        {"model.embed_tokens.weight", "lm_head.weight"}),
    "trainable-tokens": ({"trainable_token_indices": [5, 7, 300]}, {"model.embed_tokens.weight"}),
    "trainable-tokens-dict": ({"trainable_token_indices": {"embed_tokens": [5, 9], "lm_head": [9, 200, 383]}},
                              {"model.embed_tokens.weight", "lm_head.weight"}),
    "trained-biases": ({"bias": "all"}, {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qkv"}),
    "lora-bias": ({"lora_bias": True, "target_modules": ["q_proj", "v_proj"]},
                  {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qv"}),
}


@pytest.mark.parametrize("case", SERVED)
def test_the_rl_stream_is_what_peft_loads_and_merges(base, tmp_path, case):
    options, others = SERVED[case]
    adapter_dir, merged_dir = build_lora_child(base, tmp_path, **options)
    assert check_served_as_peft_merges(base, adapter_dir, merged_dir) == others


@pytest.mark.parametrize("fields", [
    {"fan_in_fan_out": True},  # PEFT turns it off on nn.Linear
    *({"init_lora_weights": init} for init in (False, "gaussian", "eva", "orthogonal", "mica")),
], ids=["fan-in-fan-out", "init-false", "gaussian", "eva", "orthogonal", "mica"])
def test_config_fields_that_peft_loads_as_plain_lora(base, tmp_path, fields):
    adapter_dir, _ = build_lora_child(base, tmp_path)
    edit_config(adapter_dir, **fields)
    check_served_as_peft_merges(base, adapter_dir, merge_adapter(base, adapter_dir, tmp_path / "remerged"))


def test_a_converted_pissa_adapter_on_the_base_is_the_trained_model(base, tmp_path):
    """What the refusal of an unconverted adapter asks for: PEFT's conversion, served on the unchanged
    base, is the model PEFT trained (PEFT's load of the unconverted adapter, which moves the base)."""
    _, trained = build_lora_child(base, tmp_path / "unconverted", init_lora_weights="pissa")
    converted, _ = build_lora_child(base, tmp_path / "converted", init_lora_weights="pissa", convert=True)
    served = rl_weights(read_adapter(converted, base_config(base)), load_file(str(base / "model.safetensors")))
    for name, weight in load_file(str(trained / "model.safetensors")).items():
        assert torch.allclose(served[name], weight, rtol=0, atol=2e-5), name


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


def pickle_a_function(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save({"weights": print}, adapter_dir / "adapter_model.bin")


@pytest.mark.parametrize("options, edit, expected", [
    ({"init_lora_weights": "pissa"}, None, "init_lora_weights='pissa'"),
    *(({}, lambda d, init=init: edit_config(d, init_lora_weights=init),
       f"init_lora_weights={init!r}: it was trained on the base changed to W - s*B0*A0; save it converted")
      for init in ("pissa_niter_4", "olora", "corda", "lora_ga")),
    ({}, lambda d: edit_config(d, init_lora_weights="loftq"), "LoftQ trains it on a quantized residual"),
    ({"use_dora": True}, None, "DoRA (use_dora)"),
    ({"use_dora": True}, lambda d: edit_config(d, use_dora=False), "DoRA is not served"),
    ({}, lambda d: edit_config(d, layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    ({}, lambda d: edit_config(d, target_parameters=["mlp.up_proj.weight"]), "target_parameters"),
    ({}, lambda d: add_tensor(d, "base_model.model.model.layers.0.self_attn.o_proj.lora_B.bias", torch.ones(64)),
     "has a LoRA bias (lora_bias) on model.layers.0.self_attn.o_proj, which has no bias in this base model"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["up_proj"]}, None,
     "a whole projection, as modules_to_save copies it"),
    ({}, lambda d: add_tensor(d, "base_model.model.model.norm.lora_A.weight", torch.zeros(4, 64)),
     "LoRA is served on q/k/v/o and gate/up/down projections, embed_tokens and lm_head only"),
    ({"trainable_token_indices": [5, 7]}, lambda d: edit_config(d, trainable_token_indices=[5]),
     "that trainable_token_indices in adapter_config.json does not index"),
    ({}, lambda d: edit_config(d, r=8), "rank 8 need (8, 128)"),
    ({}, lambda d: add_tensor(d, "base_model.model.model.layers.5.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
     "not a projection of this base model"),
    ({}, lambda d: add_tensor(d, "base_model.model.lm_head.weight", torch.zeros(385, 64)),
     "of shape (385, 64); this base model's is (384, 64)"),
    ({}, lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors or adapter_model.bin"),
    ({}, pickle_a_function, "cannot read adapter_model.bin in"),
], ids=["pissa", "pissa-niter", "olora", "corda", "lora-ga", "loftq", "dora", "dora-weights", "layer-replication",
        "target-parameters", "lora-bias-without-bias", "projection-copy", "lora-on-a-norm", "token-indices", "rank",
        "layer-out-of-range", "lm-head-shape", "no-weights", "pickled-function"])
def test_refuses_what_peft_would_not_load_as_it_is_served(base, tmp_path, options, edit, expected):
    adapter_dir, _ = build_lora_child(base, tmp_path, **options)
    if edit is not None:
        edit(adapter_dir)
    with pytest.raises(PairError, match=re.escape(expected)):
        check_adapter_pair(str(adapter_dir), str(base))


@pytest.mark.parametrize("options", [
    {"modules_to_save": ["embed_tokens"]}, {"target_modules": ["q_proj", "embed_tokens"]},
    {"trainable_token_indices": [5]},
], ids=["modules-to-save", "lora", "trainable-tokens"])
def test_refuses_changed_embeddings_on_a_base_with_a_tied_head(base, tmp_path, options):
    """PEFT's model keeps the base's head where its merge changes the tied matrix (or ties it anew)."""
    adapter_dir, _ = build_lora_child(base, tmp_path, **options)
    tied = tmp_path / "tied"
    shutil.copytree(base, tied)
    (tied / "config.json").write_text(json.dumps({**base_config(base), "tie_word_embeddings": True}))
    with pytest.raises(PairError, match="of a base whose lm_head is tied to its embeddings"):
        check_adapter_pair(str(adapter_dir), str(tied))


def test_refuses_an_adapter_of_another_shape(base, tmp_path):
    from rlvrx.server.toy_pair import build_pair

    wide_base, _ = build_pair(tmp_path / "wide", hidden=128)
    adapter_dir, _ = build_lora_child(wide_base, tmp_path / "lora")
    with pytest.raises(PairError, match=re.escape("need (4, 128) and (64, 4)")):
        check_adapter_pair(str(adapter_dir), str(base))


def test_prompt_embeddings_only_where_both_streams_embed_alike(toy_pairs, base, tmp_path):
    plain, _ = build_lora_child(base, tmp_path / "plain")
    check_serving_flags(str(plain), str(base), prompt_embeds=True, quantization=None)
    for options in ({"modules_to_save": ["embed_tokens"]}, {"target_modules": ["q_proj", "embed_tokens"]},
                    {"trainable_token_indices": [5]}):
        own, _ = build_lora_child(base, tmp_path / "own", **options)
        with pytest.raises(PairError, match="gives the RL model its own embeddings"):
            check_serving_flags(str(own), str(base), prompt_embeds=True, quantization=None)
        check_serving_flags(str(own), str(base), prompt_embeds=False, quantization=None)
    with pytest.raises(PairError, match="the two models embed token ids differently"):
        check_serving_flags(str(toy_pairs["qwen2"][1]), str(base), prompt_embeds=True, quantization=None)


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
    pissa, _ = build_lora_child(base, tmp_path / "pissa", init_lora_weights="pissa")
    assert "path_initial_model_for_weight_conversion" in serve_fails(pissa, base)
    adapter_dir, _ = build_lora_child(base, tmp_path / "plain")
    line = serve_fails(adapter_dir, other_architecture)
    assert "GPT2LMHeadModel" in line and "merge_and_unload" in line


def test_serve_refuses_a_quantized_base_before_vllm_loads_anything(base, tmp_path):
    adapter_dir, _ = build_lora_child(base, tmp_path / "plain")
    quantized = tmp_path / "awq"
    shutil.copytree(base, quantized)
    (quantized / "config.json").write_text(json.dumps(
        {**base_config(base), "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}))
    assert "is quantized (awq)" in serve_fails(adapter_dir, quantized)
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    assert "is quantized (GGUF)" in serve_fails(adapter_dir, gguf)


def test_serve_refuses_flags_that_would_serve_another_model(toy_pairs, base, tmp_path):
    """Checked once vLLM has parsed its flags (its import logs a line or two first), before it loads anything."""
    own, _ = build_lora_child(base, tmp_path / "own", modules_to_save=["embed_tokens"])
    assert "--enable-prompt-embeds: the adapter" in serve_fails(own, base, "--enable-prompt-embeds", only_line=False)
    assert "--enable-prompt-embeds: the two models" in serve_fails(toy_pairs["qwen2"][1], base,
                                                                   "--enable-prompt-embeds", only_line=False)
    assert "--quantization fp8" in serve_fails(own, base, "--quantization", "fp8", only_line=False)
