"""CPU int8 of a 1-LLM-layer student: calibration feeds of mixed shapes (`ort_quant`).

A student of the demo model with one LLM layer ("llm-layers=0;vision-blocks=0,3") answered
some calibration records with two or three `[SEG]`s, so the mask decoder was recorded with
`seg_hidden` of [1, D], [2, D] and [3, D]. ORT's histogram calibrators (percentile, the CPU
default, and entropy) stack each tensor over the samples of one `collect_data` call and failed
with "inhomogeneous shape". `StaticQdqQuantizer` now calibrates once per input shape.

The TINY student does not reliably answer with several `[SEG]`s, so the recorded mask-decoder
feeds are given 1, 2 and 3 rows here (the recorded row repeated) before calibration.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import tiny_export_with_phantoms, tiny_model, tiny_tokenizer

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import citrus_edge.compress.quantize as quantize_module  # noqa: E402
from citrus_edge.compress.calibrate import FeedsReader  # noqa: E402
from citrus_edge.compress.ort_quant import StaticQdqQuantizer, shape_groups  # noqa: E402
from citrus_edge.compress.registry import QuantRequest  # noqa: E402
from citrus_edge.compress.settings import CPU_STATIC_INT8, QuantizeConfig  # noqa: E402
from citrus_edge.compress.student_spec import StudentSpec  # noqa: E402
from citrus_edge.modelling.student import make_student  # noqa: E402

CONFIG = QuantizeConfig(max_new_tokens=16)
SEG_ROWS = (1, 2, 3)


def _with_seg_rows(feeds):
    """The mask-decoder feeds with `seg_hidden` of 1, 2, 3, 1, ... rows (first row repeated)."""
    out = []
    for i, f in enumerate(feeds):
        rows = SEG_ROWS[i % len(SEG_ROWS)]
        out.append({**f, "seg_hidden": np.repeat(f["seg_hidden"][:1], rows, axis=0)})
    return out


@pytest.fixture(scope="module")
def student_export(tmp_path_factory):
    """The TINY export of a 1-LLM-layer student, and a phantom set: (root, export, manifest)."""
    from citrus_edge.export import export_all

    root, _, manifest = tiny_export_with_phantoms(tmp_path_factory.mktemp("student"), 12)
    student = make_student(tiny_model(), StudentSpec.parse("llm-layers=0"))
    assert student.config.text.num_layers == 1
    tokenizer = root / "tokenizer-student.json"
    tiny_tokenizer().save(str(tokenizer))
    export = root / "student-fp32"
    export_all(student, export, source_hash="random:tiny-student", tokenizer_json=tokenizer)
    return root, export, manifest


def test_shape_groups_split_by_input_shape_in_first_seen_order():
    a1, a2 = {"x": np.zeros((1, 4)), "y": np.zeros(2)}, {"x": np.ones((1, 4)), "y": np.ones(2)}
    b = {"x": np.zeros((3, 4)), "y": np.zeros(2)}
    c = {"x": np.zeros((1, 4)), "y": np.zeros(5)}
    assert shape_groups([a1, b, a2, c], ["x", "y"]) == [[a1, a2], [b], [c]]
    assert shape_groups([a1, a2], ["x", "y"]) == [[a1, a2]]  # one shape: one call, as before
    assert shape_groups([a1, b], ["y"]) == [[a1, b]]  # only the graph's own inputs count


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_of_mixed_seg_counts(student_export, tmp_path, method):
    """The mask decoder calibrates on feeds with 1, 2 and 3 `[SEG]` rows and is written."""
    _, export, _ = student_export
    src = export / "mask_decoder.onnx"
    model = onnx.load(str(src))
    inputs = [i.name for i in model.graph.input]
    rng = np.random.default_rng(0)
    base = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]
        base[i.name] = rng.standard_normal(dims).astype(np.float32)
    feeds = _with_seg_rows(
        [{**base, "seg_hidden": rng.standard_normal(base["seg_hidden"].shape, np.float32)}] * 6
    )
    assert len({f["seg_hidden"].shape for f in feeds}) == 3
    # What failed before: one collect_data over every sample.
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        src,
        list(CPU_STATIC_INT8.op_types),
        augmented_model_path=str(tmp_path / "aug.onnx"),
        calibrate_method=CalibrationMethod.Percentile,
        providers=["CPUExecutionProvider"],
    )
    with pytest.raises(ValueError, match="inhomogeneous"):
        calibrator.collect_data(FeedsReader(feeds, inputs))
    del calibrator

    work = tmp_path / "work"
    work.mkdir()
    request = QuantRequest(
        "mask_decoder", "int8", "onnxruntime", src, work, CPU_STATIC_INT8, feeds, method
    )
    quantizer = StaticQdqQuantizer(request, CPU_STATIC_INT8)
    assert quantizer.n_calib == len(feeds)
    assert len(quantizer.ranges.data) > 100  # 139 tensors on the TINY mask decoder
    dst = tmp_path / "mask_decoder.int8.onnx"
    quantizer.write(dst, frozenset())
    qmodel = onnx.load(str(dst))
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    for f in feeds[:3]:  # runs with every [SEG] count
        outs = sess.run(None, f)
        assert all(np.isfinite(o).all() for o in outs)


def test_quantize_student_with_mixed_seg_counts(student_export, monkeypatch):
    """`quantize` (cpu, int8, percentile) of the 1-layer student when its calibration answers
    hold 1, 2 and 3 `[SEG]`s: every graph is quantized (it raised "inhomogeneous shape")."""
    root, export, manifest = student_export
    run_pipeline = quantize_module.run_pipeline

    def recorded_with_seg_rows(*args, **kwargs):
        run = run_pipeline(*args, **kwargs)
        run.feeds["mask_decoder"] = _with_seg_rows(run.feeds["mask_decoder"])
        return run

    monkeypatch.setattr(quantize_module, "run_pipeline", recorded_with_seg_rows)
    report = quantize_module.quantize(
        export, "int8", "cpu", manifest, budget=None, out_dir=root / "int8", config=CONFIG
    )
    assert report.method == "percentile"
    # 2 samples on 12 phantoms (1 and 2 rows): already a mix of shapes
    assert report.calibration["samples"]["mask_decoder"] >= 2
    for name in ("vision", "sam_encoder", "mask_decoder", "llm"):
        assert report.components[name].precision == "int8", name
        assert (root / "int8" / f"{name}.onnx").is_file(), name
    assert report.components["mask_decoder"].check["ok"]
