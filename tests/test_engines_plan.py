"""EnginePlan: flags, FP32 layers, DLA, workspace, JSON round trip and validation errors.

The graphs are small ONNX files built with `onnx.helper` that declare the exported components'
inputs (names, named dynamic axes, dtypes) and, where asked, explicit Q/DQ weights; the plan reads
nothing else from a graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from citrus_edge.bundle import write_manifest
from citrus_edge.config import TINY
from citrus_edge.engines import EngineOptions, EnginePlan, EnginePlanError, make_engine_plan
from citrus_edge.engines.component import PRECISION_FLAGS
from citrus_edge.engines.engine_plan import workspace_bytes
from citrus_edge.recipes import COMPONENTS, FP16, FP32, Recipe, get_recipe
from citrus_edge.targets import UnsupportedPrecisionError, get_target

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
QTYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN, "int4": TensorProto.INT4}


def _inputs(component: str, cfg=TINY) -> list:
    v, t, s = cfg.vision, cfg.text, cfg.sam2
    pd = 3 * v.temporal_patch_size * v.patch_size**2
    kv = ["batch", t.num_kv_heads, "past", t.head_dim]
    d, side = s.hidden_size, s.image_size
    table = {
        "vision": [
            ("pixel_values", ["n_patches", pd], F), ("window_index", ["n_units"], I64),
            ("reverse_index", ["n_units"], I64), ("cos", ["n_patches", v.head_dim], F),
            ("sin", ["n_patches", v.head_dim], F), ("gather_index", ["n_windows", 64], I64),
            ("window_valid", ["n_windows", 64], BOOL), ("scatter_index", ["n_patches"], I64),
        ],
        "llm": [
            ("inputs_embeds", ["batch", "seq", t.hidden_size], F),
            ("position_ids", [3, "batch", "seq"], I64),
            ("attention_mask", ["batch", "total"], I64),
            *((f"past_{kind}_{i}", kv, F) for i in range(t.num_layers) for kind in ("key", "value")),
        ],
        "sam_encoder": [("pixels", ["batch", 3, side, side], F)],
        "mask_decoder": [
            ("seg_hidden", ["n", t.hidden_size], F),
            ("image_embeddings", [1, d, side // 16, side // 16], F),
            ("feat_s0", [1, d // 8, side // 4, side // 4], F),
            ("feat_s1", [1, d // 4, side // 8, side // 8], F),
        ],
    }  # fmt: skip
    return [helper.make_tensor_value_info(n, dt, shape) for n, shape, dt in table[component]]


def make_graph(path, component: str, quant: str | None = None, norm_names: bool = True) -> None:
    """A valid graph with the component's inputs: first input @ W, then a norm-like Pow/Mul.

    quant: W comes from a DequantizeLinear of an int8 / fp8 / int4 initializer (Q/DQ graph).
    norm_names: name the Pow/Mul nodes like the exported vision norms ("/norm1/Pow").
    """
    inputs = _inputs(component)
    x = inputs[0]
    k = x.type.tensor_type.shape.dim[-1].dim_value
    nodes, inits = [], [numpy_helper.from_array(np.float32(2.0), "two")]
    if quant:
        inits += [
            helper.make_tensor("w_q", QTYPES[quant], [k, 4], [1] * (4 * k)),
            numpy_helper.from_array(np.float32(0.1), "w_scale"),
            helper.make_tensor("w_zp", QTYPES[quant], [], [0]),
        ]
        nodes.append(
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], "/proj/DQ")
        )
    else:
        inits.append(numpy_helper.from_array(np.ones((k, 4), np.float32), "w"))
    prefix = ("/norm1", "/merger/ln_q") if norm_names else ("/mlp", "/head")
    nodes += [
        helper.make_node("MatMul", [x.name, "w"], ["y"], "/proj/MatMul"),
        helper.make_node("Pow", ["y", "two"], ["y2"], f"{prefix[0]}/Pow"),
        helper.make_node("Mul", ["y2", "y"], ["out"], f"{prefix[1]}/Mul"),
    ]
    rank = len(x.type.tensor_type.shape.dim)
    out = helper.make_tensor_value_info("out", F, [None] * rank)
    graph = helper.make_graph(nodes, component, inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_graphs(root, quant: dict[str, str] | None = None, **kw):
    root.mkdir(parents=True, exist_ok=True)
    for c in COMPONENTS:
        make_graph(root / f"{c}.onnx", c, (quant or {}).get(c), **kw)
    return root


@pytest.fixture
def graphs(tmp_path):
    return make_graphs(tmp_path / "fp32")


FP16_INT4 = get_recipe("fp16-w4")  # fp16 encoders and decoder, int4 weight-only LLM


def test_plan_lists_file_precision_profiles_and_flags(graphs):
    plan = make_engine_plan(graphs, "orin-agx-64", FP16, TINY)
    assert plan.backend == "tensorrt" and plan.target == "orin-agx-64"
    for c in plan.components:
        assert c.onnx == f"{c.component}.onnx" and len(c.onnx_sha256) == 64
        assert c.precision == "fp16" and not c.strongly_typed
        assert c.builder_flags[0] == "FP16" and c.engine == f"{c.component}.engine"
        assert c.profiles and all(p.inputs for p in c.profiles)
    assert [p.name for p in plan.component("llm").profiles] == ["prefill", "decode"]
    pixels = plan.component("vision").profiles[0].inputs[0]
    assert pixels.name == "pixel_values" and pixels.max == (256, 1176)  # 224^2 budget: 16x16


def test_vision_norms_forced_fp32_only_where_fp16_flag(graphs):
    plan = make_engine_plan(graphs, "orin-agx-64", FP16, TINY)
    vision = plan.component("vision")
    assert vision.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert any("norm" in p for p in vision.fp32_layers) and any(
        "ln_q" in p for p in vision.fp32_layers
    )
    assert vision.fp32_nodes_matched == 2  # "/norm1/Pow" and "/merger/ln_q/Mul"
    assert not plan.component("llm").fp32_layers  # only the vision encoder's pitfall
    bf16 = make_engine_plan(graphs, "x86-ampere", Recipe("bf16", *["bf16"] * 4), TINY)
    assert bf16.component("vision").builder_flags == ("BF16",)  # fp32's exponent range


def test_vision_without_norm_nodes_is_refused_not_built_in_plain_fp16(tmp_path):
    root = make_graphs(tmp_path / "g", norm_names=False)
    with pytest.raises(EnginePlanError, match="FP32 patterns"):
        make_engine_plan(root, "orin-agx-64", FP16, TINY)


def test_strongly_typed_graphs_carry_no_precision_flags(tmp_path):
    root = make_graphs(tmp_path / "q", quant={"llm": "int4"})
    plan = make_engine_plan(root, "orin-nx-16", FP16_INT4, TINY)
    llm = plan.component("llm")
    assert llm.strongly_typed and llm.quant_types == ("int4",)
    assert not set(llm.builder_flags) & PRECISION_FLAGS and not llm.fp32_layers
    assert plan.component("vision").builder_flags[0] == "FP16"  # float graph: flags


def test_fp8_q_dq_plan_on_ada(tmp_path):
    root = make_graphs(tmp_path / "q", quant={c: "fp8" for c in COMPONENTS})
    plan = make_engine_plan(root, "x86-ada", "fp8", TINY)
    assert all(c.strongly_typed and c.builder_flags == () for c in plan.components)
    assert all(c.quant_types == ("fp8",) for c in plan.components)


def test_fp8_plan_for_orin_is_refused(tmp_path):
    root = make_graphs(tmp_path / "q", quant={c: "fp8" for c in COMPONENTS})
    with pytest.raises(UnsupportedPrecisionError, match="orin-agx-64 cannot run fp8"):
        make_engine_plan(root, "orin-agx-64", "fp8", TINY)
    # A plan edited by hand to fp8 is refused on load as well.
    data = make_engine_plan(root, "x86-ada", "fp8", TINY).to_dict()
    data["target"] = "orin-agx-64"
    with pytest.raises(UnsupportedPrecisionError, match="no FP8 tensor cores"):
        EnginePlan.from_dict(data)


def test_recipe_and_graph_quantization_must_agree(graphs, tmp_path):
    with pytest.raises(EnginePlanError, match="no Q/DQ.*compress"):
        make_engine_plan(graphs, "orin-agx-64", FP16_INT4, TINY)  # float LLM graph
    int8 = make_graphs(tmp_path / "q8", quant={"llm": "int8"})
    with pytest.raises(EnginePlanError, match=r"asks for int4 \(\['int4'\]\).*\['int8'\]"):
        make_engine_plan(int8, "orin-agx-64", FP16_INT4, TINY)
    with pytest.raises(EnginePlanError, match="asks for fp16 but llm.onnx is quantized"):
        make_engine_plan(int8, "orin-agx-64", FP16, TINY)


def test_fp32_recipe_clears_tf32(graphs):
    plan = make_engine_plan(graphs, "x86-hopper", FP32, TINY)
    assert all(c.builder_flags in ((), ("OBEY_PRECISION_CONSTRAINTS",)) for c in plan.components)
    assert all(c.cleared_flags == ("TF32",) for c in plan.components)
    assert not plan.component("vision").fp32_layers  # already fp32


@pytest.mark.parametrize(
    ("target", "usable_gb"),
    [("orin-nano-8", 8.0 - 2.5), ("orin-agx-64", 64.0 - 8.0), ("x86-hopper", 80.0 - 1.5)],
)
def test_workspace_is_a_quarter_of_usable_memory(graphs, target, usable_gb):
    plan = make_engine_plan(graphs, target, FP16, TINY)
    assert plan.workspace_bytes == int(usable_gb * 1e9 / 4)
    assert workspace_bytes(get_target("orin-nano-8")) == 1_375_000_000
    half = make_engine_plan(graphs, target, FP16, TINY, EngineOptions(workspace_fraction=0.5))
    assert half.workspace_bytes == int(usable_gb * 1e9 / 2)


def test_tensorrt_version_expected_for_jetpack(graphs):
    orin = make_engine_plan(graphs, "orin-nx-16", FP16, TINY).tensorrt
    assert (orin.minimum, orin.expected, orin.jetpack) == ("10.3", "10.3", "6.1/6.2")
    x86 = make_engine_plan(graphs, "x86-ampere", FP16, TINY)
    assert x86.tensorrt.expected is None and x86.tensorrt.minimum == "10.3"
    assert x86.timing_cache == "x86-ampere.timing.cache"


def test_dla_only_on_targets_that_have_it(graphs):
    dla = EngineOptions(dla=(("sam_encoder", 1),))
    plan = make_engine_plan(graphs, "orin-agx-64", FP16, TINY, dla)
    sam = plan.component("sam_encoder")
    assert sam.dla_core == 1 and "GPU_FALLBACK" in sam.builder_flags
    assert all(p.fixed for p in sam.profiles)  # DLA takes no dynamic dimensions
    assert plan.component("vision").dla_core is None
    for target in ("orin-nano-8", "x86-ada", "thor"):
        with pytest.raises(EnginePlanError, match="has no DLA cores"):
            make_engine_plan(graphs, target, FP16, TINY, dla)
    with pytest.raises(EnginePlanError, match="core 2"):
        make_engine_plan(graphs, "orin-nx-16", FP16, TINY, EngineOptions(dla=(("sam_encoder", 2),)))
    with pytest.raises(EnginePlanError, match="DLA serves"):
        make_engine_plan(graphs, "orin-agx-64", FP16, TINY, EngineOptions(dla=(("vision", 0),)))
    with pytest.raises(EnginePlanError, match="DLA builds here take"):
        make_engine_plan(graphs, "orin-agx-64", FP32, TINY, dla)


def test_cpu_plan_uses_onnxruntime_without_builder_settings(graphs):
    plan = make_engine_plan(graphs, "cpu", FP32, TINY)
    assert plan.backend == "onnxruntime" and plan.workspace_bytes is None
    assert all(not c.builder_flags and not c.profiles for c in plan.components)
    assert plan.component("llm").engine == "llm.ort.onnx"
    assert EnginePlan.from_json(plan.to_json()) == plan


def test_json_round_trip(tmp_path):
    root = make_graphs(tmp_path / "q", quant={"llm": "int4"})
    options = EngineOptions(dla=(("sam_encoder", 0),), workspace_fraction=0.3)
    plan = make_engine_plan(root, "orin-agx-64", FP16_INT4, TINY, options)
    again = EnginePlan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    assert EnginePlan.load(plan.save(tmp_path / "engine_plan.json")) == plan


def _edited(plan: EnginePlan, edit) -> dict:
    data = json.loads(plan.to_json())
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("target"), r"plan\.target: missing"),
        (lambda d: d.update(workspace_bytes="lots"), r"plan\.workspace_bytes: expected an integer"),
        (lambda d: d.update(version=2), r"version: 2 is not 1"),
        (lambda d: d.update(kind="other"), r"plan\.kind"),
        (lambda d: d["components"][0].pop("onnx"), r"plan\.components\[0\]\.onnx: missing"),
        (
            lambda d: d["components"][0].update(builder_flags=["FP17"]),
            r"components\[vision\]\.builder_flags: unknown flags \['FP17'\]",
        ),
        (
            lambda d: d["components"][1].update(builder_flags=["FP16"]),
            r"components\[llm\]\.builder_flags: \['FP16'\] on a strongly typed network",
        ),
        (
            lambda d: d["components"][1].update(strongly_typed=False),
            r"components\[llm\]\.strongly_typed: int4 needs an explicitly quantized",
        ),
        (
            lambda d: d["components"][0].update(fp32_layers=[]),
            r"components\[vision\]\.fp32_layers: layers forced to FP32 need OBEY",
        ),
        (
            lambda d: d["components"][2].update(dla_core=0),
            r"components\[sam_encoder\]\.dla_core: needs a core >= 0 and GPU_FALLBACK",
        ),
        (
            lambda d: d["components"][0]["profiles"][0]["axes"].update(n_units=[4, 2, 9]),
            r"components\[0\]\.profiles\[0\].*min <= opt <= max",
        ),
        (
            lambda d: d["components"][3]["profiles"][0]["inputs"]["seg_hidden"].update(max="4"),
            r"inputs\.seg_hidden\.max: expected list",
        ),
        (lambda d: d["components"].pop(), r"components: need each of"),
        (lambda d: d["components"][1].update(precision="int8"), r"llm\]\.precision: int8 differs"),
        (
            lambda d: d["components"][0].update(precision="fp32"),
            r"weakly typed fp32 network takes the precision flags \[\], got \[.FP16.\]",
        ),
        (lambda d: d["options"].update(ort_level="max"), r"plan\.options: ort_level 'max'"),
    ],
)
def test_from_json_errors_name_the_field(tmp_path, edit, message):
    root = make_graphs(tmp_path / "q", quant={"llm": "int4"})
    plan = make_engine_plan(root, "orin-agx-64", FP16_INT4, TINY)
    with pytest.raises(EnginePlanError, match=message):
        EnginePlan.from_dict(_edited(plan, edit))


def test_not_json_is_a_plan_error():
    with pytest.raises(EnginePlanError, match="not JSON"):
        EnginePlan.from_json("{nope")


def test_missing_graph_and_tampered_bundle(tmp_path):
    root = make_graphs(tmp_path / "b")
    (root / "llm.onnx").rename(root / "other.onnx")
    with pytest.raises(EnginePlanError, match=r"no ONNX graph for \['llm'\]"):
        make_engine_plan(root, "orin-agx-64", FP16, TINY)
    (root / "other.onnx").rename(root / "llm.onnx")
    write_manifest(root, {"components": {c: {"onnx": f"{c}.onnx"} for c in COMPONENTS}})
    assert make_engine_plan(root, "orin-agx-64", FP16, TINY).component("llm").onnx == "llm.onnx"
    make_graph(root / "llm.onnx", "llm", norm_names=False)  # changed after the manifest
    with pytest.raises(EnginePlanError, match="sha256 differs"):
        make_engine_plan(root, "orin-agx-64", FP16, TINY)


def _replace_graph(path, nodes, inits, component, domains=()) -> None:
    """Overwrite `path` with a graph of the component's inputs and the given body."""
    inputs = _inputs(component)
    rank = len(inputs[0].type.tensor_type.shape.dim)
    out = helper.make_tensor_value_info("out", F, [None] * rank)
    opsets = [helper.make_opsetid("", 21), *(helper.make_opsetid(d, 1) for d in domains)]
    graph = helper.make_graph(nodes, component, inputs, [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def test_tensorrt_custom_int4_dq_counts_as_q_dq(tmp_path):
    # modelopt's "*trt*" INT4 methods write TensorRT's own DQ op; its type is in its name.
    root = make_graphs(tmp_path / "g")
    k = TINY.text.hidden_size
    nodes = [
        helper.make_node(
            "TRT_INT4DequantizeLinear", ["w_q", "w_scale"], ["w"], "/proj/DQ", domain="trt"
        ),
        helper.make_node("MatMul", ["inputs_embeds", "w"], ["out"], "/proj/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(np.zeros((k, 4), np.int8), "w_q"),  # packed: type says int8
        numpy_helper.from_array(np.float32(0.1), "w_scale"),
    ]
    _replace_graph(root / "llm.onnx", nodes, inits, "llm", domains=("trt",))
    llm = make_engine_plan(root, "orin-agx-64", FP16_INT4, TINY).component("llm")
    assert llm.strongly_typed and llm.quant_types == ("int4",) and not llm.builder_flags


def test_cpu_int8_accepts_ort_formats_and_refuses_them_on_tensorrt(tmp_path):
    # ORT static QDQ keeps activations in uint8; the LLM's int8 weight-only is MatMulNBits(8).
    root = make_graphs(tmp_path / "g", quant={c: "int8" for c in COMPONENTS})
    k = TINY.text.hidden_size
    nodes = [
        helper.make_node(
            "MatMulNBits", ["inputs_embeds", "b", "s"], ["out"], "/proj/MatMulNBits",
            domain="com.microsoft", K=k, N=4, bits=8, block_size=32,
        )
    ]  # fmt: skip
    inits = [
        numpy_helper.from_array(np.zeros((4, k // 32, 32), np.uint8), "b"),
        numpy_helper.from_array(np.ones((4 * k // 32,), np.float32), "s"),
    ]
    _replace_graph(root / "llm.onnx", nodes, inits, "llm", domains=("com.microsoft",))
    pd = _inputs("vision")[0].type.tensor_type.shape.dim[-1].dim_value
    qdq = [
        helper.make_node("QuantizeLinear", ["pixel_values", "a_s", "a_zp"], ["xq"], "/q"),
        helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], "/dq"),
        helper.make_node("DequantizeLinear", ["w_q", "a_s"], ["w"], "/w_dq"),
        helper.make_node("MatMul", ["xd", "w"], ["out"], "/proj/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(np.float32(0.1), "a_s"),
        numpy_helper.from_array(np.uint8(128), "a_zp"),
        numpy_helper.from_array(np.ones((pd, 4), np.int8), "w_q"),
    ]
    _replace_graph(root / "vision.onnx", qdq, inits, "vision")
    plan = make_engine_plan(root, "cpu", "int8", TINY)
    assert plan.component("llm").quant_types == ("int8",)
    assert plan.component("vision").quant_types == ("int8", "uint8")
    assert all(c.strongly_typed and not c.builder_flags for c in plan.components)
    with pytest.raises(EnginePlanError, match=r"vision: .*\['int8'\].*carries \['int8', 'uint8'\]"):
        make_engine_plan(root, "orin-agx-64", "int8", TINY)  # TensorRT takes signed int8 only
    make_graph(root / "vision.onnx", "vision", "int8")
    with pytest.raises(EnginePlanError, match=r"ONNX Runtime operators \(\['MatMulNBits'\]\)"):
        make_engine_plan(root, "orin-agx-64", "int8", TINY)
