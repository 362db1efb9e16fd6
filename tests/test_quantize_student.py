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
from citrus_edge.compress.ort_quant import (  # noqa: E402
    StaticQdqQuantizer,
    calib_chunks,
    shape_groups,
)
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


def test_calib_chunks_keep_a_call_within_the_byte_budget():
    class Session:  # what calib_chunks asks of the calibrator's session: one run
        runs = 0

        def run(self, names, feeds):
            Session.runs += 1
            assert names is None and set(feeds) == {"x"}
            return [np.zeros(100, np.float32), np.zeros(150, np.float32)]  # 1,000 bytes

    group = [{"x": np.full(2, i), "extra": 0} for i in range(5)]
    chunks = calib_chunks(Session(), group, ["x"], budget=2_500)
    assert [len(c) for c in chunks] == [2, 2, 1] and sum(chunks, []) == group
    assert calib_chunks(Session(), group, ["x"], budget=10**6) == [group]  # fits: one call
    assert [len(c) for c in calib_chunks(Session(), group, ["x"], budget=10)] == [1] * 5
    before = Session.runs
    assert calib_chunks(Session(), group[:1], ["x"], budget=10) == [group[:1]]
    assert Session.runs == before  # a single sample is never measured


def _random_feeds(src, n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` feeds of standard-normal float32 for a graph's inputs (symbolic dims: 1)."""
    rng = np.random.default_rng(seed)
    inputs = onnx.load(str(src), load_external_data=False).graph.input
    return [
        {
            i.name: rng.standard_normal(
                [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]
            ).astype(np.float32)
            for i in inputs
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("component", ["sam_encoder", "mask_decoder"])
def test_calibrating_only_what_the_quantizer_reads_writes_the_same_graph(
    student_export, tmp_path, monkeypatch, component
):
    """Recording only the candidates' activation inputs (not every MatMul's inputs and
    outputs) leaves the written QDQ graph byte for byte the same, with fewer tensors recorded.
    Measured on the TINY student: sam_encoder 23 of 76 tensors, mask_decoder 41 of 135."""
    _, export, _ = student_export
    src = export / f"{component}.onnx"
    feeds = _random_feeds(src, 3)
    written, counts = {}, {}
    for mode in ("needed", "all"):
        if mode == "all":  # every tensor ORT would select: the calibration before
            monkeypatch.setattr(StaticQdqQuantizer, "calibrated_tensors", lambda self: _All())
        work = tmp_path / mode
        work.mkdir()
        request = QuantRequest(
            component, "int8", "onnxruntime", src, work, CPU_STATIC_INT8, feeds, "percentile"
        )
        quantizer = StaticQdqQuantizer(request, CPU_STATIC_INT8)
        counts[mode] = len(quantizer.ranges.data)
        quantizer.write(tmp_path / f"{mode}.onnx", frozenset())
        written[mode] = (tmp_path / f"{mode}.onnx").read_bytes()
    print(component, counts)
    assert counts["needed"] < counts["all"]
    assert written["needed"] == written["all"]


class _All(set):
    """A set that contains everything (`tensors & _All()` keeps every tensor)."""

    def __rand__(self, other):
        return set(other)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_chunked_calibration_gives_the_same_ranges(student_export, tmp_path, monkeypatch, method):
    """Cut into one-sample calls (a budget of 1 byte), min-max calibration merges to exactly the
    ranges of one call over all samples. The percentile method's histogram takes its bin width
    from the first call and widens by whole bins (ONNX Runtime's `collect_absolute_value`), so
    its ranges may move by a fraction of a bin: allowed `PERCENTILE_CHUNK_RTOL` of the range
    (measured on these feeds: no change)."""
    from citrus_edge.compress import ort_quant

    _, export, _ = student_export
    src = export / "mask_decoder.onnx"
    feeds = _random_feeds(src, 4)
    ranges, calls = {}, []

    def recorded(*args):
        calls.append(calib_chunks(*args))
        return calls[-1]

    monkeypatch.setattr(ort_quant, "calib_chunks", recorded)
    for budget in (ort_quant.CALIB_CALL_BYTES, 1):
        monkeypatch.setattr(ort_quant, "CALIB_CALL_BYTES", budget)
        calls.clear()
        work = tmp_path / f"work-{budget}"
        work.mkdir()
        request = QuantRequest(
            "mask_decoder", "int8", "onnxruntime", src, work, CPU_STATIC_INT8, feeds, method
        )
        ranges[budget] = StaticQdqQuantizer(request, CPU_STATIC_INT8).ranges.data
        assert [len(c) for c in calls[0]] == ([4] if budget > 1 else [1, 1, 1, 1])
    big, small = ranges[ort_quant.CALIB_CALL_BYTES], ranges[1]
    assert big.keys() == small.keys() and len(big) > 30  # 41 on the TINY student
    if method == "minmax":
        for name in big:
            np.testing.assert_array_equal(big[name].range_value, small[name].range_value)
        return
    worst = max(
        float(np.max(np.abs(np.subtract(big[n].range_value, small[n].range_value))))
        / float(np.max(np.abs(big[n].range_value)))
        for n in big
    )
    print(f"percentile: largest range change {worst:.2e} of the range")
    assert worst <= PERCENTILE_CHUNK_RTOL


PERCENTILE_CHUNK_RTOL = 0.01


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
    # 41 tensors on the TINY mask decoder: the quantized MatMuls' and Gemms' activation inputs
    assert len(quantizer.ranges.data) == len(quantizer.calibrated_tensors()) == 41
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
