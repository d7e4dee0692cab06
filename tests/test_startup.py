"""`rlvrx serve` refuses a pair that cannot share one engine, or an engine that cannot start:
its output ends in one line `rlvrx: error: ...` naming the cause, exit code 2."""

import json
import shutil
import socket
import subprocess
import sys

import pytest

from rlvrx.server.toy_pair import build_pair
from tests.conftest import ROOT, child_env, free_port


def serve_fails(rl, base, *extra, only_line=True, in_engine=False, env=None):
    proc = subprocess.run([sys.executable, "-m", "rlvrx.server.cli", "serve", "--rl", str(rl), "--base", str(base), *extra],
                          cwd=ROOT, env=child_env(**(env or {})), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("rlvrx: error: ")
    if not in_engine:  # refused in our process: no traceback (vLLM's engine processes log their own)
        assert "Traceback" not in proc.stderr
    if only_line:  # refused before vLLM starts: nothing else printed
        assert len(lines) == 1
    return lines[-1]


@pytest.fixture(scope="module")
def other_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    return {"llama": build_pair(root / "llama", family="llama"), "wide": build_pair(root / "wide", hidden=128)}


def test_refuses_different_architectures(toy_pairs, other_pairs):
    assert "architectures differ" in serve_fails(toy_pairs["qwen2"][1], other_pairs["llama"][0])


def test_refuses_different_shapes(toy_pairs, other_pairs):
    assert "hidden_size" in serve_fails(toy_pairs["qwen2"][1], other_pairs["wide"][0])


def test_refuses_configs_that_would_run_the_base_wrongly(toy_pairs, tmp_path):
    """A base with an untied output head under a tied RL model would use its embedding matrix
    as the head (the base backbone is built from the RL model's config)."""
    base, rl = toy_pairs["qwen2"]
    shutil.copytree(rl, tmp_path / "rl")
    config = json.loads((tmp_path / "rl" / "config.json").read_text())
    (tmp_path / "rl" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    line = serve_fails(tmp_path / "rl", base)
    assert "configs differ in tie_word_embeddings (RL True, base False)" in line


def test_refuses_different_tokenizers(toy_pairs, tmp_path):
    base, rl = toy_pairs["qwen2"]
    other = tmp_path / "base"
    shutil.copytree(base, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100], list(vocab)[101]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "tokenizers differ" in serve_fails(rl, other)


def test_refuses_missing_path_and_bad_defaults(toy_pairs, tmp_path):
    base, rl = toy_pairs["qwen2"]
    assert "no config.json" in serve_fails(tmp_path / "missing", base)
    assert "--generator" in serve_fails(rl, base, "--generator", "teacher")
    assert "--gamma" in serve_fails(rl, base, "--gamma", "50")
    assert "--tau" in serve_fails(rl, base, "--tau", "abc")


def test_refuses_an_architecture_vllm_does_not_support(toy_pairs, tmp_path):
    base, rl = toy_pairs["qwen2"]
    for name, path in (("base", base), ("rl", rl)):
        shutil.copytree(path, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["architectures"] = ["MadeUpForCausalLM"]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert "MadeUpForCausalLM is not supported" in serve_fails(tmp_path / "rl", tmp_path / "base", only_line=False)


def test_vllm_config_errors_end_in_one_line(toy_pairs):
    base, rl = toy_pairs["qwen2"]
    line = serve_fails(rl, base, "--max-model-len", "4096", only_line=False)
    assert "vLLM refused to start" in line and "max_model_len" in line


def test_engine_start_up_failures_end_in_one_line_naming_the_cause(toy_pairs):
    """Failures inside vLLM's engine processes: the KV cache larger than the machine's memory
    (raised in the worker process), and no memory at all for the KV cache (in the engine core)."""
    base, rl = toy_pairs["qwen2"]
    common = ("--enforce-eager", "--max-model-len", "512", "--port", str(free_port()))
    line = serve_fails(rl, base, *common, only_line=False, in_engine=True, env={"VLLM_CPU_KVCACHE_SPACE": "100000"})
    assert "vLLM refused to start: Available memory" in line and "VLLM_CPU_KVCACHE_SPACE" in line
    line = serve_fails(rl, base, *common, only_line=False, in_engine=True, env={"VLLM_CPU_KVCACHE_SPACE": "0"})
    assert "vLLM refused to start: No available memory for the cache blocks" in line


def test_refuses_pipeline_parallelism(toy_pairs):
    base, rl = toy_pairs["qwen2"]
    for flags in (("--pipeline-parallel-size", "2"), ("-pp", "2")):
        assert "--pipeline-parallel-size must be 1" in serve_fails(rl, base, *flags, only_line=False)


def test_refuses_disable_by_batch_size_where_it_cannot_apply(toy_pairs):
    """The server's own speculative key (server.engine.draft_gate): ngram only, a whole number ≥ 1."""
    base, rl = toy_pairs["qwen2"]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    for config, message in (({**ngram, "method": "draft_model", "model": str(rl), "disable_by_batch_size": 4},
                             "ngram method only"),
                            ({**ngram, "disable_by_batch_size": 0}, "whole number")):
        line = serve_fails(rl, base, "--speculative-config", json.dumps(config), only_line=False)
        assert line.startswith("rlvrx: error: --speculative-config: disable_by_batch_size") and message in line


# `rlvrx serve` with its check of the port skipped: the port is taken after the check, before vLLM binds.
SKIP_PORT_CHECK = "import sys, rlvrx.server.cli as cli; cli.check_listen_address = lambda args: None; cli.main(sys.argv[1:])"


@pytest.mark.parametrize("command", [["-m", "rlvrx.server.cli"], ["-c", SKIP_PORT_CHECK]], ids=["checked", "race"])
def test_a_port_in_use_ends_in_one_line_before_the_engine_starts(toy_pairs, command):
    """`make serve` twice: the second one ended in vLLM's traceback (OSError: Address already in use)."""
    base, rl = toy_pairs["qwen2"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, *command, "serve", "--rl", str(rl), "--base", str(base),
                               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager"],
                              cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rlvrx: error: 127.0.0.1 port {port} is already in use (another server? choose one with --port)")
    assert "EngineCore" not in proc.stdout + proc.stderr  # refused before vLLM started its engine (which logs so)


@pytest.fixture(scope="module")
def lora_child(toy_pairs, tmp_path_factory):
    from rlvrx.server.toy_pair import build_lora_child

    return build_lora_child(toy_pairs["qwen2"][0], tmp_path_factory.mktemp("lora"))[0]


@pytest.mark.parametrize("path", ["two_backbones", "stacked"])
def test_the_users_hf_overrides_reach_the_engine(toy_pairs, lora_child, path):
    """--hf-overrides used to be replaced by the pair's own: a user's max_position_embeddings of 64
    now makes vLLM refuse a max_model_len of 128 (the toy models have 512)."""
    base, rl = toy_pairs["qwen2"]
    line = serve_fails(rl if path == "two_backbones" else lora_child, base, "--max-model-len", "128",
                       "--hf-overrides", json.dumps({"max_position_embeddings": 64}), only_line=False)
    assert "vLLM refused to start" in line and "max_model_len" in line and "64" in line


@pytest.mark.parametrize("flags, message", [
    (("--hf-overrides", '{"architectures": ["Qwen2ForCausalLM"]}'), "--hf-overrides: 'architectures' is set by"),
    (("--hf-overrides", '{"rlvrx_base_path": "/x"}'), "--hf-overrides: 'rlvrx_base_path' is set by"),
    (("--logits-processors", "a.b:C"), "--logits-processors: the pair's combine"),
    (("--logprobs_mode", "raw_logprobs"), "--logprobs-mode: the pair reports processed_logprobs"),
    (("--model", "/somewhere"), "--model: the served pair is given with --rl and --base"),
])
def test_refuses_flags_that_would_replace_the_pairs_own(toy_pairs, flags, message):
    base, rl = toy_pairs["qwen2"]
    assert serve_fails(rl, base, *flags, only_line=False).startswith(f"rlvrx: error: {message}")
