"""The demo pair's task and trainer (a few steps: the pipeline, not the accuracy)."""

import random
from dataclasses import replace

from rlvrx.server import arith_pair
from rlvrx.server.engine.pair import check_pair


def test_reversed_notation_and_the_noisy_solver():
    assert arith_pair.question(123, 45) == "321+540"
    assert arith_pair.answer(168) == "8610"
    rng = random.Random(0)
    exact = 0
    for _ in range(2000):
        a, b = rng.randrange(1000), rng.randrange(1000)
        noisy = arith_pair.noisy_sum(a, b, rng)
        assert 0 <= a + b - noisy and (a + b - noisy) % 10 == 0  # only carries can go missing
        exact += noisy == a + b
    assert 0.3 < exact / 2000 < 0.8  # an imperfect teacher


def test_tokenizer_is_character_level_and_the_chat_prompt_is_the_question():
    tokenizer = arith_pair.build_tokenizer()
    task = arith_pair.Task(tokenizer)
    assert tokenizer.decode(task.prompt_ids(123, 456)) == "321+654="
    assert len(task.answer_ids(579)) == 5 and task.answer_ids(579)[-1] == task.eos


def test_training_pipeline_writes_a_servable_pair(tmp_path):
    cfg = replace(arith_pair.TrainConfig(), clean_steps=3, noisy_steps=3, sft_batch=16, rl_steps=2, rl_prompts=4,
                  rl_samples=2, alpha=0.2)
    base, rl = arith_pair.train_pair(tmp_path, cfg, log=lambda _: None)
    assert check_pair(str(rl), str(base)) == "Qwen2ForCausalLM"


def test_lora_child_is_an_adapter_the_stacked_model_serves(tmp_path):
    from rlvrx.server.engine.pair import check_adapter_pair
    from tests.conftest import ROOT

    base = ROOT / "demo" / "pair" / "base"
    cfg = replace(arith_pair.TrainConfig(), rl_steps=2, rl_prompts=4, rl_samples=2, lora_rank=4)
    arith_pair.train_rl(base, tmp_path / "lora", cfg, log=lambda _: None)
    assert check_adapter_pair(str(tmp_path / "lora"), str(base)) == "Qwen2ForCausalLM"
