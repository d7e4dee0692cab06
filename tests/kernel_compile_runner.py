"""Compile the fused kernel for NVIDIA GPUs on a machine without one; print each variant's
registers and spills as JSON on the last line of stdout.

Each variant is a real call of `kernels.triton_combine.combine` on CPU tensors whose launch is
turned into Triton's `warmup` (compile, no launch) for the target GPU, so the signature, the
alignment specialisation and the constexprs are exactly those of a launch there. Triton's
wheel bundles ptxas, so this builds the machine code itself. Spills are counted as Triton's
driver counts them (`n_spills`: the kernel's local memory in 4-byte words), read from the
compiled binary with the bundled cuobjdump.

Must run without TRITON_INTERPRET (tests/test_kernel_compile.py starts it with child_env()).
Usage: python tests/kernel_compile_runner.py ARCH   (80: Ampere, 90: Hopper)
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlvrx.kernels import RowSettings, triton_combine  # noqa: E402

# (RL logits, base logits): the processor passes vLLM's float32 rows with the base model's
# rows in the model's dtype (float32 after vLLM's edits were carried over); direct callers
# pass two rows of one dtype.
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
VOCABS = [152064, 50257]  # a multiple of 16 (Triton specialises V and the strides on it), and not


class CompileOnlyDriver:
    """The part of a Triton driver that `warmup` uses, for a GPU that is not here."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


class Warmup:
    """Stands in for the kernel in `combine`: `kernel[grid](...)` compiles it instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
        return launch


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory per thread in bytes) of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", text).groups()
    return int(regs), int(stack)


def main() -> None:
    arch = int(sys.argv[1])
    warmup = Warmup(triton_combine._combine_kernel)
    triton_combine._combine_kernel = warmup
    triton.runtime.driver.set_active(CompileOnlyDriver(arch))
    settings = RowSettings.uniform(1, gamma=0.05, tau=-0.3, generator="base", candidates=50, temperature=1.0,
                                   top_p=0.7)
    results = []
    for rl_dtype, base_dtype in DTYPES:
        for vocab in VOCABS:
            for want_delta in (True, False):
                rl, base = torch.zeros(1, vocab, dtype=rl_dtype), torch.zeros(1, vocab, dtype=base_dtype)
                triton_combine.combine(rl, base, settings, want_delta=want_delta)
                registers, local_bytes = resource_usage(warmup.compiled.asm["cubin"])
                results.append({"arch": f"sm_{arch}", "rl": str(rl_dtype).removeprefix("torch."),
                                "base": str(base_dtype).removeprefix("torch."), "vocab": vocab, "delta": want_delta,
                                "registers": registers, "spills": local_bytes // 4})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
