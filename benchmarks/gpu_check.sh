#!/usr/bin/env bash
# The GPU check of issue 13 in one call (torch, Triton; no vLLM): the fused kernel's
# correctness and cost on CUDA, a 7B-shaped decode step with the combine's share of it, the
# stacked LoRA step against two backbones beside issue 10's roofline, and the kernel under
# CUDA graphs. JSON per part and tables.md land in the output directory; the tables are
# printed last.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--small]
# OUT_DIR: the argument, else $OUT (the device tool's), else benchmarks/out/gpu_check.
# --small: tiny shapes on the CPU, the kernel under TRITON_INTERPRET=1 (tests/test_gpu_check.py).
# GPU_CHECK_BUDGET_S (default 360): past its share of it each part stops cleanly and keeps
# what it measured; a part that fails does not stop the others; exit 1 if any failed or the
# kernel mismatched.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out/gpu_check}
small=()
for arg in "$@"; do
    case $arg in
        --small) small=(--small); export TRITON_INTERPRET=1 ;;
        *) out=$arg ;;
    esac
done
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-360}
start=$(date +%s)
status=0

# part SHARE_OF_BUDGET_PERCENT COMMAND...: runs until start + that share of the budget, killed a
# minute past it should it not stop by itself.
part() {
    local until=$((start + budget * $1 / 100))
    shift
    local limit=$((until - $(date +%s) + 60))
    ((limit < 10)) && limit=10
    timeout -k 10 "$limit" "$python" "$@" --until "$until" "${small[@]}" || status=1
}

run_all() {
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
    part 40 benchmarks/kernel_check.py --sections correctness,cost --out "$out"
    part 85 benchmarks/decode_step_bench.py --out "$out"
    part 100 benchmarks/kernel_check.py --sections graphs --out "$out"
    echo "gpu_check: $(($(date +%s) - start)) s, exit $status"
    "$python" benchmarks/gpu_check_tables.py "$out" | tee "$out/tables.md"
    return $status
}

run_all 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
