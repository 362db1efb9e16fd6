"""ONNX Runtime-optimized graphs for the cpu target: saved optimisations, same outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from citrus_edge.bundle import sha256_file
from citrus_edge.engines import OptimizedGraphMismatchError, optimize_for_cpu
from citrus_edge.engines.ort_sessions import compare_graphs, random_feeds, sidecar_path

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript exporter


class LayerNormMlp(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: ORT 'extended' fuses the bias + erf-GELU."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, 16] -> [B, S, 8]
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ort") / "small.onnx"
    torch.onnx.export(
        LayerNormMlp().eval(),
        (torch.randn(2, 5, 16),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def _ops(path) -> set[tuple[str, str]]:
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node}


def test_extended_optimisation_is_saved_and_matches_the_source(small_graph, tmp_path):
    feeds = random_feeds(small_graph, {"batch": 3, "seq": 7}, seed=1)
    result = optimize_for_cpu(small_graph, tmp_path / "small.ort.onnx", "extended", feeds)
    assert result.path.is_file() and result.sidecar == sidecar_path(result.path)
    assert result.max_abs_diff["y"] <= 1e-5
    assert ("com.microsoft", "BiasGelu") in _ops(result.path)  # the fusion was saved
    assert ("ai.onnx", "Erf") in _ops(small_graph) and ("ai.onnx", "Erf") not in _ops(result.path)
    # Independent check on fresh inputs of another shape.
    other = random_feeds(small_graph, {"batch": 1, "seq": 11}, seed=2)
    assert max(compare_graphs(small_graph, result.path, other).values()) <= 1e-5


def test_sidecar_records_versions_providers_level_and_hashes(small_graph, tmp_path):
    import onnxruntime

    feeds = random_feeds(small_graph, seed=3)
    result = optimize_for_cpu(small_graph, tmp_path / "small.ort.onnx", "basic", feeds)
    side = json.loads(result.sidecar.read_text())
    assert side["onnxruntime_version"] == onnxruntime.__version__
    assert side["providers"] == ["CPUExecutionProvider"] and side["level"] == "basic"
    assert side["source_sha256"] == sha256_file(small_graph)
    assert side["sha256"] == sha256_file(result.path)
    assert side["verification"]["max_abs_diff"]["y"] <= 1e-5


def test_a_different_graph_is_reported_per_output(small_graph, tmp_path):
    torch.manual_seed(1)  # same architecture, other weights
    other = tmp_path / "other.onnx"
    torch.onnx.export(
        LayerNormMlp().eval(), (torch.randn(2, 5, 16),), str(other), input_names=["x"],
        output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    feeds = random_feeds(small_graph, seed=4)
    with pytest.raises(OptimizedGraphMismatchError, match=r"y: shape \(2, 2, 8\).*max abs diff"):
        compare_graphs(small_graph, other, feeds)


def test_unknown_level_and_integer_inputs_are_refused(small_graph, tmp_path):
    with pytest.raises(ValueError, match="level 'max'"):
        optimize_for_cpu(small_graph, tmp_path / "x.ort.onnx", "max")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["i"], ["o"])],
        "ints",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.INT64, [2])],
    )
    path = tmp_path / "ints.onnx"
    opset = [onnx.helper.make_opsetid("", 17)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opset), str(path))
    with pytest.raises(ValueError, match="pass feeds for non-float inputs"):
        random_feeds(path)
    out = optimize_for_cpu(path, tmp_path / "ints.ort.onnx", feeds={"i": np.arange(2)})
    assert out.max_abs_diff == {"o": 0.0}


def test_an_ort_static_int8_graph_plans_for_the_cpu_only(small_graph, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from citrus_edge.engines.component import check_quantization
    from citrus_edge.engines.engine_errors import EnginePlanError
    from citrus_edge.engines.graph_info import read_graph

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([random_feeds(small_graph, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantized = tmp_path / "int8.onnx"
    quantize_static(str(small_graph), str(quantized), Reader(), quant_format=QuantFormat.QDQ)
    graph = read_graph(quantized)
    assert graph.has_qdq and "int8" in graph.quant_types
    check_quantization("vision", "int8", graph, "onnxruntime")  # int32 biases / uint8 allowed
    with pytest.raises(EnginePlanError, match="re-quantize"):
        check_quantization("vision", "int8", graph, "tensorrt")
    feeds = random_feeds(small_graph, seed=9)
    out = optimize_for_cpu(quantized, tmp_path / "int8.ort.onnx", "extended", feeds)
    assert out.max_abs_diff["y"] <= 1e-5
    # Checked against the source as ORT runs it (integer kernels), not its fake-quant float run.
    side = json.loads(out.sidecar.read_text())
    assert side["verification"]["reference_level"] == "extended"
