"""`import citrus_edge.engines` stays cheap: no TensorRT, ONNX Runtime, onnx or torch."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_heavy_module():
    code = (
        "import sys, citrus_edge.engines as e; "
        "e.EnginePlan, e.check_engine_compat, e.ProfileConfig; "
        "print(sorted(m for m in ('tensorrt', 'onnxruntime', 'onnx', 'torch', 'cuda') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builders_are_reached_lazily():
    import citrus_edge.engines as engines

    assert callable(engines.build_bundle_engines) and callable(engines.optimize_for_cpu)
    assert callable(engines.build_engines)  # importable without TensorRT installed
