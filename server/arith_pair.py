"""A demo pair that shows the effect: 3-digit addition, base by SFT, child by GRPO.

Numbers are written least-significant digit first (much easier for a tiny transformer):
the user message "321+654" asks 123 + 456, and the answer "9750" is 0579. The chat
template is minimal (the message, then "="), so chat and completions ("321+654=") agree. The base model learns
from a noisy solver that drops carries (into tens 30%, hundreds 60%, thousands 30%) after
learning from clean labels first, so it is right about half the time; the RL child is a
short GRPO run with an exact-match reward (32 prompts × 8 samples, T = 1, advantage =
reward − group mean, no KL), optionally with the paper's training-time reweighting
Ã = [1 + α(1 − π_old(token))]·Â. Both are Qwen2 models of about 0.8M parameters with a
character-level byte-level tokenizer; everything is seeded, so a rebuild gives the same pair.
With `lora_rank` > 0 the child is instead a PEFT LoRA adapter of the base on every projection
(GRPO trains A and B only), which `rlvrx serve` runs on one stacked backbone.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlvrx.server.toy_pair import PROJECTIONS, SPECIAL_TOKENS

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}="
CARRY_DROP = {1: 0.3, 2: 0.6, 3: 0.3}  # P(dropping the carry into digit i) of the noisy solver


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    clean_steps: int = 500
    noisy_steps: int = 1000
    sft_batch: int = 256
    sft_lr: float = 1e-3
    rl_steps: int = 40
    rl_prompts: int = 32
    rl_samples: int = 8
    rl_lr: float = 3e-5
    alpha: float = 0.0  # training-time reweighting; 0 = plain GRPO
    lora_rank: int = 0  # > 0: the child is a LoRA adapter of this rank (α = 2r) on every projection
    lora_lr: float = 3e-4  # LoRA's GRPO learning rate (LoRA wants about 10× full fine-tuning's)


def rev(n: int, width: int) -> str:
    return str(n).zfill(width)[::-1]


def question(a: int, b: int) -> str:
    return f"{rev(a, 3)}+{rev(b, 3)}"


def answer(total: int) -> str:
    return rev(total, 4)


def noisy_sum(a: int, b: int, rng: random.Random) -> int:
    """Digit-wise addition that sometimes forgets a carry."""
    total, carry = 0, 0
    for i in range(4):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        if carry and rng.random() < CARRY_DROP.get(i, 0.0):
            carry = 0
        s = da + db + carry
        total += (s % 10) * 10**i
        carry = s // 10
    return total


def build_tokenizer():
    """Character-level byte-level BPE (no merges): one token per byte, plus the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def new_model(vocab_size: int, eos_id: int, pad_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    return Qwen2ForCausalLM(config)


class Task:
    """Prompt and answer token ids for the chat format the server uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id

    def prompt_ids(self, a: int, b: int) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question(a, b)}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)

    def answer_ids(self, total: int) -> list[int]:
        return self.tokenizer(answer(total), add_special_tokens=False).input_ids + [self.eos]

    def batch(self, pairs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels with prompt and padding masked) for (a, b, target) triples."""
        seqs, labels = [], []
        for a, b, target in pairs:
            p, t = self.prompt_ids(a, b), self.answer_ids(target)
            seqs.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        return ids, lab


def sft(model, task: Task, cfg: TrainConfig, rng: random.Random, log) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    total = cfg.clean_steps + cfg.noisy_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / total))
    model.train()
    for step in range(total):
        clean = step < cfg.clean_steps
        pairs = []
        for _ in range(cfg.sft_batch):
            a, b = rng.randrange(1000), rng.randrange(1000)
            pairs.append((a, b, a + b if clean else noisy_sum(a, b, rng)))
        ids, labels = task.batch(pairs)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == total - 1:
            log(f"sft step {step + 1}/{total} ({'clean' if clean else 'noisy'}) loss {loss.item():.3f}")


@torch.no_grad()
def sample_answers(model, task: Task, prompts: list[list[int]], temperature: float, max_new: int = 6,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Answers (token ids, up to and including <|im_end|>) for equal-length prompts."""
    model.eval()
    ids = torch.tensor(prompts)
    out = model(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    answers = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                answers[i].append(t)
        done |= nxt == task.eos
        if done.all():
            break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return answers


def accuracy(model, task: Task, problems: list[tuple[int, int]], temperature: float, seed: int = 1) -> float:
    gen = torch.Generator().manual_seed(seed)
    prompts = [task.prompt_ids(a, b) for a, b in problems]
    got = sample_answers(model, task, prompts, temperature, generator=gen)
    return sum(g == task.answer_ids(a + b) for g, (a, b) in zip(got, problems)) / len(problems)


def grpo(model, task: Task, cfg: TrainConfig, rng: random.Random, log) -> None:
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lora_lr if cfg.lora_rank else cfg.rl_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    for step in range(cfg.rl_steps):
        problems = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(cfg.rl_prompts)]
        prompts = [task.prompt_ids(a, b) for a, b in problems for _ in range(cfg.rl_samples)]
        answers = sample_answers(model, task, prompts, temperature=1.0, generator=gen)
        rewards = torch.tensor([float(ans == task.answer_ids(a + b))
                                for ans, (a, b) in zip(answers, [p for p in problems for _ in range(cfg.rl_samples)])])
        adv = (rewards.view(cfg.rl_prompts, cfg.rl_samples) - rewards.view(cfg.rl_prompts, cfg.rl_samples).mean(1,
               keepdim=True)).view(-1)
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(prompts), width), task.pad)
        mask = torch.zeros((len(prompts), width))
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, len(p) : len(p) + len(a)] = 1.0
        model.train()
        logp = model(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        token_mask = mask[:, 1:]
        weight = 1.0 + cfg.alpha * (1.0 - logp.detach().exp())  # π_old = the sampling policy (on-policy)
        loss = -(adv[:, None] * weight * logp * token_mask).sum() / token_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == cfg.rl_steps - 1:
            log(f"grpo step {step + 1}/{cfg.rl_steps} reward {rewards.mean().item():.3f}")


TEST_SEED = 99  # the held-out problems the trainer reports accuracy on


def test_problems(count: int = 512) -> list[tuple[int, int]]:
    rng = random.Random(TEST_SEED)
    return [(rng.randrange(1000), rng.randrange(1000)) for _ in range(count)]


def report(model, task: Task, name: str, log) -> dict[str, float]:
    test = test_problems()
    scores = {"greedy": accuracy(model, task, test, 0.0), "T=1": accuracy(model, task, test, 1.0)}
    log(f"{name} accuracy: greedy {scores['greedy']:.3f}, T=1 {scores['T=1']:.3f}")
    return scores


def train_pair(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> tuple[Path, Path]:
    """Train and save `<out>/base` and `<out>/rl`; returns their paths."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    task = Task(tokenizer)
    model = new_model(len(tokenizer), task.eos, task.pad)
    sft(model, task, cfg, rng, log)
    out = Path(out_dir)
    save(model, tokenizer, out / "base")
    report(model, task, "base", log)
    train_rl(out / "base", out / "rl", cfg, log)
    return out / "base", out / "rl"


def train_rl(base_dir: str | Path, out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """GRPO from a saved base checkpoint (so runs with different α share one base); with
    `cfg.lora_rank` the child saved is a PEFT adapter directory (with the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed + 1)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    task = Task(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                 target_modules=PROJECTIONS))
    grpo(model, task, cfg, rng, log)
    save(model, tokenizer, Path(out_dir))
    name = f"rl (alpha={cfg.alpha:g}{f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ''})"
    return report(model, task, name, log)


def save(model, tokenizer, path: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
