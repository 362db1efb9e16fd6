"""The runtime never imports torch or transformers: every module of `citrus_edge.runtime` is
imported and the whole pipeline (image, video, files, bench) runs in a process where importing
either fails, and gives the reference's tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_runtime_support import CASES, bundle, case_image, reference

CHILD = r"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["transformers"] = None
import importlib, json, pkgutil
from pathlib import Path
import numpy as np
import citrus_edge.runtime as runtime

modules = sorted(m.name for m in pkgutil.iter_modules(runtime.__path__))
for name in modules:
    importlib.import_module(f"citrus_edge.runtime.{name}")
from citrus_edge.runtime.bench import run_bench
from citrus_edge.runtime.result_files import write_json, write_overlay
from citrus_edge.runtime.pipeline import Pipeline
from citrus_edge.runtime.video import run_video

bundle, image, prompt, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
pipe = Pipeline.from_bundle(bundle, max_new_tokens=24, constrained_decoding=False)
result = pipe(image, prompt)
write_json(result, out / "result.json")
write_overlay(image, result, out / "overlay.png")
frames = list(run_video(pipe, [image, image[:, ::-1].copy()], prompt))
bench = run_bench(bundle, [(image, prompt)], max_new_tokens=4, repeats=1, warmup=0,
                  cold_start=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                and sys.modules[m] is not None)
print(json.dumps({"modules": modules, "tokens": result.token_ids, "n_seg": result.n_seg,
                  "frames": len(frames), "bench": bench["e2e_ms"]["n"], "loaded": loaded}))
"""


def test_runtime_runs_without_torch_and_transformers(tmp_path):
    case = CASES[1]
    image = case_image(case)
    np.save(tmp_path / "image.npy", image)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle("seg")), str(tmp_path / "image.npy"), case[3],
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_modules = {
        "artifacts", "backends", "bench", "decode", "engine_folder", "inputs", "measure",
        "observe", "onnxruntime_flavour", "ort_backend", "pipeline", "result_files",
        "runtime_errors", "segment", "tensorrt_backend", "video",
    }  # fmt: skip
    assert expected_modules <= set(out["modules"])
    assert out["loaded"] == []
    assert out["tokens"] == reference("seg")(image, case[3]).token_ids
    assert out["n_seg"] == 2 and out["frames"] == 2 and out["bench"] == 1
    assert (tmp_path / "result.json").is_file() and (tmp_path / "overlay.png").is_file()


@pytest.mark.parametrize("module", ["citrus_edge.runtime", "citrus_edge.runtime.pipeline"])
def test_import_stays_light(module):
    """Importing the runtime pulls in neither torch nor onnxruntime (ORT loads on first use)."""
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
