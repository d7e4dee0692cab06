#!/usr/bin/env bash
# The GPU check, in one call of a few minutes, on a machine with torch, Triton and
# transformers (no vLLM needed): the fused kernel against the PyTorch path on CUDA, then
# the timing table (kernel, unfused PyTorch, copy bandwidth, 7B-shaped decode step).
#   bash benchmarks/gpu_check.sh [--small]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/out
python3 benchmarks/combine_bench.py --device cuda --out benchmarks/out/gpu_check.json "$@"
