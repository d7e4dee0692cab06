"""The pair check at function level: every config field outside the documented whitelist must
agree (the base backbone is built from the RL model's config), and the whitelisted ones may
differ."""

import json
import shutil

import pytest

from rlvrx.server.engine.pair import IGNORED_CONFIG_FIELDS, PairError, check_pair

# One edit of the base's config.json per field that changes the forward pass.
REFUSED = {
    "tie_word_embeddings": {"tie_word_embeddings": True},
    "rms_norm_eps": {"rms_norm_eps": 1e-5},
    "rope_parameters": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
    "rope scaling": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}},
    "sliding_window": {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 0},
    "quantization_config": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}},
    "hidden_act": {"hidden_act": "gelu"},
    "hidden_size": {"hidden_size": 128},
    "max_position_embeddings": {"max_position_embeddings": 1024},
    "attention_bias": {"attention_bias": True},
}
# Fields that may differ, written the way older transformers versions and RL trainers write them.
ACCEPTED = {
    "_name_or_path": "Qwen/Qwen2.5-32B", "transformers_version": "4.43.1", "torch_dtype": "bfloat16",
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 1, "use_cache": False, "initializer_range": 0.02,
    "output_attentions": False, "output_hidden_states": False, "return_dict": True,
}


@pytest.fixture()
def pair_copy(toy_pairs, tmp_path):
    """(rl, base): copies of the Qwen2 toy pair's configs and tokenizers (no weights)."""
    paths = []
    for name, source in zip(("rl", "base"), reversed(toy_pairs["qwen2"])):
        shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors"))
        paths.append(tmp_path / name)
    return paths


def edit_config(path, edits=None, drop=()):
    config = json.loads((path / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(edits or {})
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_a_base_config_that_differs_in(pair_copy, name):
    rl, base = pair_copy
    edit_config(base, REFUSED[name])
    with pytest.raises(PairError, match="configs differ in") as refused:
        check_pair(str(rl), str(base))
    field = name if name != "rope scaling" else "rope_parameters"
    assert field in str(refused.value)


def test_names_the_differing_fields_of_both_sides(pair_copy):
    rl, base = pair_copy
    edit_config(rl, {"tie_word_embeddings": True})
    with pytest.raises(PairError) as refused:
        check_pair(str(rl), str(base))
    assert str(refused.value).startswith("configs differ in tie_word_embeddings (RL True, base False)")


def test_accepts_the_whitelisted_fields_and_older_spellings(pair_copy):
    rl, base = pair_copy
    assert set(ACCEPTED) | {"dtype"} == IGNORED_CONFIG_FIELDS  # the test covers the whole whitelist
    # transformers 4.x wrote RoPE as rope_theta/rope_scaling and no layer_types.
    edit_config(base, {**ACCEPTED, "rope_theta": 10000.0, "rope_scaling": None},
                drop=("dtype", "rope_parameters", "layer_types"))
    assert check_pair(str(rl), str(base)) == "Qwen2ForCausalLM"
