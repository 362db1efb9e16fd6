"""Undo ModelOpt's process-wide patches of ONNX Runtime's quantization tooling.

`modelopt.onnx.quantization.quantize` replaces functions and methods of
`onnxruntime.quantization` (create_calibrator, the calibrators' collect/compute methods,
QDQQuantizer checks, ...) for the rest of the process. The CPU path (`ort_quant`) relies on ONNX
Runtime's own behaviour, so every ModelOpt call runs inside `ort_patches_undone()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# (module, owner name or None for a module attribute, attribute) that ModelOpt 0.4x patches.
_PATCHED = {
    "onnxruntime.quantization.calibrate": {
        None: ("create_calibrator",),
        "CalibraterBase": ("__init__", "create_inference_session", "select_tensors_to_calibrate"),
        "MinMaxCalibrater": ("augment_graph", "collect_data", "compute_data", "merge_range"),
        "HistogramCalibrater": ("augment_graph", "collect_data"),
        "HistogramCollector": ("collect", "collect_value", "collect_absolute_value"),
    },
    "onnxruntime.quantization.qdq_quantizer": {"QDQQuantizer": ("check_opset_version",)},
    "onnxruntime.quantization.base_quantizer": {"BaseQuantizer": ("adjust_tensor_ranges",)},
}


def _owners() -> Iterator[tuple[object, str]]:
    import importlib

    for module_name, owners in _PATCHED.items():
        module = importlib.import_module(module_name)
        for owner_name, attrs in owners.items():
            owner = module if owner_name is None else getattr(module, owner_name)
            for attr in attrs:
                yield owner, attr


@contextmanager
def ort_patches_undone() -> Iterator[None]:
    """Run a ModelOpt call, then put ONNX Runtime's quantization code back as it was."""
    saved = [(o, a, o.__dict__.get(a, _MISSING)) for o, a in _owners()]
    try:
        yield
    finally:
        for owner, attr, value in saved:
            if value is _MISSING:
                if attr in owner.__dict__:
                    delattr(owner, attr)
            else:
                setattr(owner, attr, value)


_MISSING = object()
