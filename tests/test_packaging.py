"""A wheel built from the repository installs one import name, `rlvrx` (the repository's folders
server/, kernels/ and tools/ as rlvrx.server, rlvrx.kernels and rlvrx.tools), and its entry
points name modules that exist under it."""

import subprocess
import sys
import zipfile
from configparser import ConfigParser

from tests.conftest import ROOT


def test_wheel_installs_only_rlvrx(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"rlvrx"}
    # rlvrx is a namespace package: no folder of the repository becomes its __init__
    assert "rlvrx/__init__.py" not in names
    for module in ("server/cli.py", "server/engine/processor.py", "server/api/middleware.py",
                   "kernels/triton_combine.py", "tools/lora_extract.py"):
        assert f"rlvrx/{module}" in names
    assert not any("/tests/" in n or n.startswith(("tests/", "benchmarks/")) for n in names)

    entry_points = ConfigParser()
    (dist,) = dist_info
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode())
    targets = [value for section in entry_points.sections() for value in entry_points[section].values()]
    assert targets and all(t.startswith("rlvrx.") for t in targets)
    for target in targets:
        module = target.split(":")[0]
        assert f"{module.replace('.', '/')}.py" in names, target
