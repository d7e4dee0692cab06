"""Build a small base/RL model pair from scratch, offline, in about a second.

Used by the tests (tiny Qwen2-, Llama- and Qwen3-family pairs) and by `make serve` until a
trained demo pair exists. The tokenizer is a byte-level BPE trained here on a short
built-in text; the base model has random weights; the "RL" child is the base plus a
small perturbation, so Δlog p has the small signed spread that τ thresholds are for.
`build_lora_child` makes the child a PEFT LoRA adapter of the base instead (and the same
child merged into a full checkpoint, the tests' reference).
"""

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Please reason step by step.",
    "Put your final answer within \\boxed{}. What is 7 + 5? The answer is 12.",
    "Reinforcement learning with verifiable rewards changes a few tokens a lot.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" \\ | @ # $ % ^ & _ ~",
    "Hello, world! How are you today? I am fine, thank you. Let us count: one two three.",
]
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_pair(out_dir: str | Path, family: str = "qwen2", hidden: int = 64, layers: int = 2,
               seed: int = 0, rl_noise: float = 0.05) -> tuple[Path, Path]:
    """Write `<out_dir>/base` and `<out_dir>/rl` checkpoints; return their paths."""
    import transformers

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    base = model_cls(config).float()
    generator = torch.Generator().manual_seed(seed + 1)
    rl = model_cls(config).float()
    with torch.no_grad():
        for (_, p_base), (_, p_rl) in zip(base.named_parameters(), rl.named_parameters()):
            noise = torch.randn(p_base.shape, generator=generator) * rl_noise * p_base.abs().mean()
            p_rl.copy_(p_base + noise)
    paths = []
    for name, model in (("base", base), ("rl", rl)):
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def build_tied_pair(out_dir: str | Path, heads: dict[str, str], seed: int = 7) -> tuple[Path, Path]:
    """A Qwen2 pair (as build_pair) whose config ties lm_head to the embedding, and whose checkpoints
    named in `heads` also store an lm_head.weight: "copy", the embedding's values (as some trainers
    save a tied head), or "own", other values (a tie broken in training: transformers and vLLM then
    load the stored head, untied)."""
    import json

    from safetensors.torch import load_file, save_file

    base, rl = build_pair(out_dir, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for path in (base, rl):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        tensors = load_file(str(path / "model.safetensors"))
        embedding = tensors["model.embed_tokens.weight"]
        tensors.pop("lm_head.weight")
        if heads.get(path.name) == "copy":
            tensors["lm_head.weight"] = embedding.clone()
        elif heads.get(path.name) == "own":
            tensors["lm_head.weight"] = embedding + 0.1 * torch.randn(embedding.shape, generator=generator)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return base, rl


def build_lora_child(base_path: str | Path, out_dir: str | Path, rank: int = 4, alpha: float = 8.0,
                     seed: int = 0, std: float = 0.06, convert: bool = False, safe_serialization: bool = True,
                     **lora_options) -> tuple[Path, Path]:
    """Write `<out_dir>/adapter` (a PEFT LoRA adapter of the base, "trained": every LoRA factor random
    and nonzero, unlike PEFT's zero-B start, every other trainable tensor — modules_to_save copies,
    trainable tokens, biases — its start plus noise) and `<out_dir>/merged` (the adapter as PEFT loads
    it onto the base, merged by merge_and_unload, with the tokenizer); return (adapter, merged).
    `lora_options` go to peft's LoraConfig (target_modules defaults to every projection). With an
    initialisation that changes the base (PiSSA, OLoRA, ...), `convert` saves the adapter converted
    to plain LoRA (PEFT's path_initial_model_for_weight_conversion); `safe_serialization=False` saves
    adapter_model.bin."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    options = {"target_modules": PROJECTIONS, **lora_options}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=alpha, **options))
    if convert:  # PEFT's recipe: the initial adapter, saved before training as plain LoRA
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(out / "initial")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_(noise if ".lora_" in name else param + noise)
    conversion = {"path_initial_model_for_weight_conversion": str(out / "initial")} if convert else {}
    model.save_pretrained(out / "adapter", safe_serialization=safe_serialization, **conversion)
    return out / "adapter", merge_adapter(base_path, out / "adapter", out / "merged")


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load the adapter onto the base as PEFT does, merge it (merge_and_unload) and write the merged
    checkpoint with the base's tokenizer to `out_dir`; return it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out_dir)
    return Path(out_dir)
