"""The wheel installs the stage folders as citrus_edge.* and the runtime works without torch."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("citrus_edge-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"citrus_edge"}, tops
    for sub in ("runtime", "export", "compress", "engines", "calib_data"):
        assert f"citrus_edge/{sub}/__init__.py" in names


def test_runtime_imports_in_fresh_venv_without_torch(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            f"{wheel}[cpu]",
        ],
        check=True,
    )
    code = (
        "import sys, citrus_edge.runtime as r, citrus_edge.runtime.onnxruntime_flavour as f;"
        "print(f.check_onnxruntime());"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    # Run outside the checkout so the installed wheel, not the source tree, is imported.
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "onnxruntime"
    blocked = subprocess.run([str(py), "-c", "import torch"], capture_output=True, cwd=tmp_path)
    assert blocked.returncode != 0  # the runtime environment really has no torch
