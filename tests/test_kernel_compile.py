"""The fused kernel compiles to machine code for Ampere (sm_80) and Hopper (sm_90) without a
GPU, in every variant a launch can ask for, and spills no registers: a kernel that only works
in the Triton interpreter (tests/test_triton.py) cannot land.

The compiles run in child processes without TRITON_INTERPRET (tests/conftest.py sets it for
this one), one per architecture, side by side; Triton's cache makes a rerun of an unchanged
kernel quick.
"""

import json
import subprocess
import sys

from tests.conftest import ROOT, child_env

ARCHS = (80, 90)
VARIANTS_PER_ARCH = 5 * 2 * 2  # (RL, base) dtypes × vocabulary alignment × Δ written or not


def test_every_variant_compiles_for_ampere_and_hopper_without_spills():
    procs = [subprocess.Popen([sys.executable, "tests/kernel_compile_runner.py", str(arch)], cwd=ROOT,
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, stderr[-3000:]
        results += json.loads(stdout.strip().splitlines()[-1])
    table = "\n".join(json.dumps(r) for r in results)
    print(table)  # registers per variant, for `pytest -s`
    assert len(results) == len(ARCHS) * VARIANTS_PER_ARCH, table
    assert all(r["spills"] == 0 for r in results), table
