"""The TensorRT paths' own logic, run against fakes that enforce TensorRT 10.3's contracts.

TensorRT cannot be installed here (`fake_tensorrt` says what the fakes enforce). What runs is
the product code: `runtime.tensorrt_backend` (profile selection per step, the KV-cache buffers),
`engines.tensorrt_builder` (the serialized plan written from TensorRT's buffer), `engines.compat`
(module comparison on Jetson), and the version bounds. Real-TensorRT tests stay in
`test_runtime_tensorrt.py` / `test_engines_tensorrt.py` (marker `tensorrt`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomllib
from fake_tensorrt import FakeBuilderTrt, FakeCudart, FakeEngine, FakeHostMemory, FakeTrt

from citrus_edge.config import TINY
from citrus_edge.engines.graph_info import GraphInput
from citrus_edge.engines.profiles import ProfileConfig, llm_profiles, resolve_profile
from citrus_edge.runtime.runtime_errors import BackendRunError
from citrus_edge.runtime.tensorrt_backend import (
    Cuda,
    Engine,
    TrtGraph,
    TrtKvStep,
    select_profile,
)
from citrus_edge.targets import get_target

H, KV_HEADS, HEAD_DIM, VOCAB = 8, 2, 4, 6
LLM_INPUTS = (
    GraphInput("inputs_embeds", ("batch", "seq", H), "float32"),
    GraphInput("position_ids", (3, "batch", "seq"), "int64"),
    GraphInput("attention_mask", ("batch", "total"), "int64"),
    GraphInput("past_key_0", ("batch", KV_HEADS, "past", HEAD_DIM), "float32"),
    GraphInput("past_value_0", ("batch", KV_HEADS, "past", HEAD_DIM), "float32"),
)
W_OUT = np.random.default_rng(0).normal(size=(H, VOCAB)).astype(np.float32)


def _planned_llm_profiles() -> list[dict]:
    """The LLM's `prefill` and `decode` profiles as `make_engine_plan` makes them (TINY on
    orin-nano-8: prefill seq 1..96 with past 0; decode seq 1 with past 1..511)."""
    pc = ProfileConfig(max_context=512, max_text_tokens=32, opt_text_tokens=8, opt_new_tokens=8)
    axes = llm_profiles(get_target("orin-nano-8"), TINY, pc)
    resolved = [resolve_profile(a, LLM_INPUTS, "llm") for a in axes]
    return [{s.name: (s.min, s.opt, s.max) for s in p.inputs} for p in resolved]


def _toy_step(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A one-layer causal "LLM" step: new keys/values from the embeddings, appended to the
    cache; each position's hidden state adds the sum of every cached key/value up to it."""
    emb = x["inputs_embeds"]  # [B, S, H]
    k_new = np.repeat(emb[:, None, :, :HEAD_DIM], KV_HEADS, axis=1)  # [B, kvH, S, d]
    v_new = np.repeat(emb[:, None, :, HEAD_DIM:], KV_HEADS, axis=1)
    k = np.concatenate([x["past_key_0"], k_new], axis=2)  # [B, kvH, P+S, d]
    v = np.concatenate([x["past_value_0"], v_new], axis=2)
    past = x["past_key_0"].shape[2]
    ck, cv = np.cumsum(k[:, 0], axis=1), np.cumsum(v[:, 1], axis=1)  # [B, P+S, d]
    hidden = emb + np.concatenate([ck, cv], axis=-1)[:, past:]  # [B, S, H]
    return {
        "logits": (hidden @ W_OUT).astype(np.float32),
        "last_hidden_state": hidden.astype(np.float32),
        "present_key_0": k.astype(np.float32),
        "present_value_0": v.astype(np.float32),
    }


def _toy_shapes(s: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    b, seq, _ = s["inputs_embeds"]
    total = s["past_key_0"][2] + seq
    assert s["attention_mask"] == (b, total), "attention_mask must cover past + seq"
    kv = (b, KV_HEADS, total, HEAD_DIM)
    return {
        "logits": (b, seq, VOCAB),
        "last_hidden_state": (b, seq, H),
        "present_key_0": kv,
        "present_value_0": kv,
    }


def _llm_engine(trt: FakeTrt, profiles: list[dict]) -> FakeEngine:
    f32, i64 = np.float32, np.int64
    kv = (-1, KV_HEADS, -1, HEAD_DIM)
    tensors = {
        "inputs_embeds": ("in", f32, (-1, -1, H)),
        "position_ids": ("in", i64, (3, -1, -1)),
        "attention_mask": ("in", i64, (-1, -1)),
        "past_key_0": ("in", f32, kv),
        "past_value_0": ("in", f32, kv),
        "logits": ("out", f32, (-1, -1, VOCAB)),
        "last_hidden_state": ("out", f32, (-1, -1, H)),
        "present_key_0": ("out", f32, kv),
        "present_value_0": ("out", f32, kv),
    }
    return FakeEngine(trt, tensors, profiles, _toy_shapes, _toy_step)


def _open(tmp_path: Path, fake: FakeEngine, trt: FakeTrt, component: str) -> Engine:
    path = tmp_path / f"{component}.engine"
    path.write_bytes(trt.register(component.encode(), fake))
    return Engine(trt, Cuda(trt.cudart), path, component)


def _feeds(emb: np.ndarray, past: int) -> dict[str, np.ndarray]:
    seq = emb.shape[0]
    pos = np.broadcast_to(np.arange(past, past + seq), (3, 1, seq)).astype(np.int64)
    return {
        "inputs_embeds": emb[None].astype(np.float32),
        "position_ids": pos,
        "attention_mask": np.ones((1, past + seq), np.int64),
    }


@pytest.fixture
def llm(tmp_path):
    trt = FakeTrt()
    fake = _llm_engine(trt, _planned_llm_profiles())
    step = TrtKvStep(_open(tmp_path, fake, trt, "llm"))
    return step, fake


def test_decode_steps_switch_to_the_decode_profile(llm):
    """Prefill in profile 0, then each decode step in profile 1: before the fix the first
    decode step's `set_input_shape` (past 5, outside `prefill`'s past 0..0) was refused."""
    step, fake = llm
    tokens = np.random.default_rng(1).normal(size=(9, H)).astype(np.float32)
    logits, hidden = step(_feeds(tokens[:5], 0))  # prefill: 5 prompt tokens
    got = [logits]
    for i in range(5, 9):  # 4 decode steps, one token each
        logits, hidden = step(_feeds(tokens[i : i + 1], i))
        got.append(logits)
    context = fake.contexts[0]
    assert context.runs == [0, 1, 1, 1, 1]  # the profile each execute ran in
    assert context.switches == [1]  # one switch, no switching back and forth
    assert context.refused == [] and step.cache_len == 9
    # the same answer as one prefill of every position: the KV buffers swapped correctly
    whole = _toy_step(
        {
            **_feeds(tokens, 0),
            "past_key_0": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32),
            "past_value_0": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32),
        }
    )
    np.testing.assert_allclose(np.stack(got), whole["logits"][0, 4:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden, whole["last_hidden_state"][0, -1], rtol=1e-5, atol=1e-5)


def test_next_answer_switches_back_to_prefill(llm):
    step, fake = llm
    tokens = np.random.default_rng(2).normal(size=(4, H)).astype(np.float32)
    step(_feeds(tokens[:3], 0))
    step(_feeds(tokens[3:], 3))
    step.reset()
    step(_feeds(tokens[:2], 0))  # a new prompt: empty cache again
    assert fake.contexts[0].runs == [0, 1, 0] and fake.contexts[0].switches == [1, 0]


def test_shape_outside_every_profile_is_refused_naming_the_ranges(llm):
    step, fake = llm
    too_long = np.zeros((97, H), np.float32)  # prefill allows seq 1..96
    with pytest.raises(BackendRunError) as e:
        step(_feeds(too_long, 0))
    msg = str(e.value)
    assert "fit none of the engine's 2 optimisation profiles" in msg
    assert "[1, 96, 8]" in msg and "rebuild the engine" in msg
    assert fake.contexts[0].runs == []


def test_select_profile_keeps_the_active_one_when_it_fits():
    profiles = [{"x": ((1, 1), (1, 8))}, {"x": ((1, 1), (1, 16))}]
    assert select_profile(profiles, {"x": (1, 4)}, active=1) == 1  # both fit: no switch
    assert select_profile(profiles, {"x": (1, 4)}, active=0) == 0
    assert select_profile(profiles, {"x": (1, 12)}, active=0) == 1
    assert select_profile(profiles, {"x": (1, 17)}) is None
    assert select_profile(profiles, {"x": (1, 4, 1)}) is None  # wrong rank


def test_single_profile_graph_never_switches(tmp_path):
    trt = FakeTrt()
    tensors = {"x": ("in", np.float32, (-1, 3)), "y": ("out", np.float32, (-1, 3))}
    fake = FakeEngine(
        trt,
        tensors,
        [{"x": ((1, 3), (2, 3), (4, 3))}],
        lambda s: {"y": s["x"]},
        lambda x: {"y": 2 * x["x"]},
    )
    graph = TrtGraph(_open(tmp_path, fake, trt, "mask_decoder"))
    out = graph.run({"x": np.arange(6, dtype=np.float64).reshape(2, 3)})
    np.testing.assert_array_equal(out["y"], 2 * np.arange(6).reshape(2, 3))
    assert graph.max_leading_dim("x") == 4
    assert fake.contexts[0].switches == [] and fake.contexts[0].runs == [0]
    with pytest.raises(BackendRunError, match="fit none"):
        graph.run({"x": np.zeros((5, 3))})


def test_fake_cudart_catches_a_too_small_buffer():
    cuda = FakeCudart()
    _, ptr = cuda.cudaMalloc(16)
    with pytest.raises(AssertionError, match="out of bounds"):
        cuda.cudaMemcpyAsync(ptr, np.zeros(5, np.float32).ctypes.data, 20, 1, 0)


# -- engine compatibility: the module, not only the SM --------------------------------------
def _sidecar(module: str | None, name: str = "Orin") -> dict:
    return {
        "component": "llm",
        "tensorrt_version": "10.3.0.30",
        "device": {"index": 0, "name": name, "sm": "8.7", "module": module},
        "target": "orin-agx-64",
        "bundle": "/data/B",
    }


AGX = "NVIDIA Jetson AGX Orin Developer Kit (65.9 GB)"
NANO = "NVIDIA Jetson Orin Nano Developer Kit (7.8 GB)"


def test_engine_from_another_orin_module_is_refused():
    """AGX, NX and Nano are all sm_87 and CUDA calls each GPU "Orin": before the fix an AGX
    engine passed the check on a Nano."""
    from citrus_edge.engines.compat import check_engine_compat
    from citrus_edge.engines.engine_errors import EngineMismatchError

    check_engine_compat(_sidecar(AGX), "10.3.0.30", "8.7", device_name="Orin", module=AGX)
    with pytest.raises(EngineMismatchError) as e:
        check_engine_compat(
            _sidecar(AGX),
            "10.3.0.30",
            "8.7",
            device_name="Orin",
            module=NANO,
            module_target="orin-nano-8",
        )
    assert f"the module {AGX} (this device is {NANO})" in str(e.value)
    assert e.value.command == "citrus-edge engines build /data/B --target orin-nano-8"


def test_engine_from_another_gpu_of_the_same_sm_is_refused():
    from citrus_edge.engines.compat import check_engine_compat
    from citrus_edge.engines.engine_errors import EngineMismatchError

    side = dict(_sidecar(None, "NVIDIA RTX 6000 Ada Generation"), target="x86-ada")
    side["device"]["sm"] = "8.9"
    check_engine_compat(side, "10.3.0", "8.9", device_name="NVIDIA RTX 6000 Ada Generation")
    with pytest.raises(EngineMismatchError, match="GPU 'NVIDIA RTX 6000 Ada Generation'"):
        check_engine_compat(side, "10.3.0", "8.9", device_name="NVIDIA GeForce RTX 4090")


# -- the builder: plan written from TensorRT's buffer; the Jetson module checked -----------
def test_serialized_plan_is_written_without_a_copy(tmp_path, monkeypatch):
    """`build_engines` writes TensorRT's IHostMemory itself and hashes it where it lies; before
    the fix `_Build.component` made `memoryview(...).tobytes()`, a second copy of each plan."""
    from test_engines_plan import make_graphs

    from citrus_edge.engines import make_engine_plan, tensorrt_builder
    from citrus_edge.engines.device import CudaDevice
    from citrus_edge.recipes import FP16

    graphs = make_graphs(tmp_path / "g")
    plan = make_engine_plan(graphs, "x86-ada", FP16, TINY)
    trt = FakeBuilderTrt("10.3.0")
    written = []
    real_write = tensorrt_builder.write_bytes

    def spy(path, data):
        written.append(data)
        return real_write(path, data)

    device = CudaDevice(0, "NVIDIA RTX 6000 Ada Generation", "8.9")
    monkeypatch.setattr(tensorrt_builder, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_builder, "cuda_device", lambda: device)
    monkeypatch.setattr(tensorrt_builder, "jetson_target", lambda: None)
    monkeypatch.setattr(tensorrt_builder, "write_bytes", spy)
    engines = tensorrt_builder.build_engines(plan, graphs, tmp_path / "engines")
    assert len(trt.plans) == 4 and all(p.copies == 0 for p in trt.plans)
    assert [type(d) for d in written] == [FakeHostMemory] * 5  # 4 plans + the timing cache
    assert all(any(d is p for d in written) for p in trt.plans)  # the buffers themselves
    for component, path in engines.items():
        data = path.read_bytes()
        assert data == f"plan of {component}.onnx".encode() * 100
        side = json.loads(tensorrt_builder.sidecar_path(path).read_text())
        assert side["engine_sha256"] == hashlib.sha256(data).hexdigest()
        assert side["device"]["module"] is None and side["device"]["sm"] == "8.9"
    assert (tmp_path / "x86-ada.timing.cache").read_bytes() == b"timing-cache"


def test_qdq_graph_is_parsed_from_an_fp16_carrier_copy(tmp_path, monkeypatch):
    """The int4 LLM (strongly typed) is parsed from an fp16-carrier copy, the fp16 float graphs
    (weakly typed, FP16 flag) from the bundle itself; before the fix the Q/DQ graph was parsed
    with float32 carriers and every unquantized layer ran FP32/TF32."""
    from test_engines_plan import make_graphs

    from citrus_edge.engines import make_engine_plan, tensorrt_builder
    from citrus_edge.engines.device import CudaDevice
    from citrus_edge.recipes import FP16_W4

    graphs = make_graphs(tmp_path / "g", quant={"llm": "int4"})
    plan = make_engine_plan(graphs, "x86-ada", FP16_W4, TINY)
    assert [c.fp16_carrier for c in plan.components] == [False, True, False, False]
    trt = FakeBuilderTrt("10.3.0")
    device = CudaDevice(0, "NVIDIA RTX 6000 Ada Generation", "8.9")
    monkeypatch.setattr(tensorrt_builder, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_builder, "cuda_device", lambda: device)
    monkeypatch.setattr(tensorrt_builder, "jetson_target", lambda: None)
    engines = tensorrt_builder.build_engines(plan, graphs, tmp_path / "engines", None)
    f32, f16, int4 = 1, 10, 22  # onnx.TensorProto FLOAT, FLOAT16, INT4
    llm = trt.parsed["llm.onnx"]
    assert llm["folder"] != str(graphs) and llm["strongly_typed"]
    assert llm["initializer_types"] == {f16, int4}  # scales and constants fp16, weights int4
    vision = trt.parsed["vision.onnx"]
    assert vision["folder"] == str(graphs) and f32 in vision["initializer_types"]
    side = json.loads(tensorrt_builder.sidecar_path(engines["llm"]).read_text())
    assert side["fp16_carrier"] and side["parsed_onnx_sha256"] != side["source_onnx_sha256"]


def test_builder_refuses_a_plan_for_another_orin_module():
    from citrus_edge.engines.device import CudaDevice
    from citrus_edge.engines.engine_errors import DeviceMismatchError
    from citrus_edge.engines.tensorrt_builder import check_device

    plan = SimpleNamespace(target="orin-agx-64", tensorrt=None)
    nano = CudaDevice(0, "Orin", "8.7", NANO)
    with pytest.raises(DeviceMismatchError) as e:
        check_device(plan, nano, "10.3.0", "/data/B", module_target="orin-nano-8")
    assert "this device is NVIDIA Jetson Orin Nano" in str(e.value)
    assert e.value.command == "citrus-edge engines build /data/B --target orin-nano-8"


# -- version bounds --------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["11.0.0", "8.6.2"])
def test_tensorrt_other_than_10_is_refused(monkeypatch, version):
    """TensorRT 11 has no weakly typed builder flags; 8.6 (JetPack 6.0) not the 10 API."""
    from citrus_edge.engines.device import import_tensorrt
    from citrus_edge.engines.engine_errors import TensorRTUnavailableError
    from citrus_edge.runtime.runtime_errors import TensorRTSetupError
    from citrus_edge.runtime.tensorrt_backend import import_tensorrt as runtime_import

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__=version, Builder=1))
    with pytest.raises(TensorRTUnavailableError, match=f"TensorRT {version} is installed"):
        import_tensorrt()
    with pytest.raises(TensorRTSetupError, match=f"TensorRT {version} is not TensorRT 10"):
        runtime_import()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0", Builder=1))
    assert import_tensorrt().__version__ == "10.3.0"


def test_tensorrt_extra_is_bounded_to_the_apis_the_code_uses():
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = extras["optional-dependencies"]["tensorrt"]
    assert sorted(deps) == ["cuda-python>=12.6,<13", "tensorrt>=10.3,<11"]


# -- ONNX Runtime's TensorRT / CUDA providers get options -----------------------------------
@pytest.fixture
def planned_bundle(tmp_path):
    """A folder with graphs, a manifest naming each component's precision, and the engine
    plan `build` stores for orin-nano-8 (TINY: head dim 32, one KV head, context 1024)."""
    from test_engines_plan import make_graphs

    from citrus_edge.engines import make_engine_plan
    from citrus_edge.recipes import FP16

    root = make_graphs(tmp_path / "B")
    plan = make_engine_plan(root, "orin-nano-8", FP16, TINY)
    precisions = {"vision": "fp16", "llm": "int4", "sam_encoder": "fp32", "mask_decoder": "int8"}
    manifest = {
        "components": {c: {"file": f"{c}.onnx", "precision": p} for c, p in precisions.items()},
        "engine_plan": plan.to_dict(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _shapes(text: str) -> dict[str, str]:
    return dict(part.split(":") for part in text.split(","))


def test_tensorrt_provider_options_from_the_bundle(planned_bundle):
    from citrus_edge.runtime.ort_backend import provider_options

    llm = provider_options("TensorrtExecutionProvider", planned_bundle / "llm.onnx", "llm")
    assert llm["trt_fp16_enable"] is True and llm["trt_int8_enable"] is False  # int4 Q/DQ
    cache = str(planned_bundle.parent / "B-engines" / "onnxruntime-tensorrt")
    assert llm["trt_engine_cache_enable"] and llm["trt_engine_cache_path"] == cache
    assert llm["trt_timing_cache_enable"] and llm["trt_timing_cache_path"] == cache
    lo, opt, hi = (_shapes(llm[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    # one profile covering prefill (past 0) and decode (past 1..1023), tuned for decode
    assert lo["past_key_0"] == "1x1x0x32" and hi["past_key_0"] == "1x1x1023x32"
    assert opt["past_key_0"].startswith("1x1x") and opt["inputs_embeds"] == "1x1x64"
    assert set(lo) == {"inputs_embeds", "position_ids", "attention_mask"} | {
        f"past_{kv}_{i}" for kv in ("key", "value") for i in range(TINY.text.num_layers)
    }
    sam = provider_options(
        "TensorrtExecutionProvider", planned_bundle / "sam_encoder.onnx", "sam_encoder"
    )
    assert sam["trt_fp16_enable"] is False and sam["trt_layer_norm_fp32_fallback"] is False
    dec = provider_options(
        "TensorrtExecutionProvider", planned_bundle / "mask_decoder.onnx", "mask_decoder"
    )
    assert dec["trt_int8_enable"] is True and dec["trt_fp16_enable"] is True
    assert provider_options("CUDAExecutionProvider", planned_bundle / "llm.onnx", "llm") == {
        "device_id": 0
    }


def test_sessions_get_the_options_unless_the_caller_gave_some(planned_bundle, monkeypatch):
    """Before the fix the providers went to ONNX Runtime bare: FP32 engines, rebuilt in every
    session."""
    import onnxruntime as ort

    from citrus_edge.runtime import ort_backend

    seen = []

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            seen.append(providers)

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in seen[-1]]

    monkeypatch.setattr(ort_backend, "check_providers", lambda names: None)
    monkeypatch.setattr(ort_backend, "check_session_providers", lambda *a: None)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    backend = ort_backend.OnnxRuntimeBackend(["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    backend.session(planned_bundle / "llm.onnx", "llm")
    (trt_name, trt_opts), cuda = seen[0]
    assert trt_name == "TensorrtExecutionProvider" and trt_opts["trt_fp16_enable"] is True
    assert "trt_profile_max_shapes" in trt_opts and cuda == (
        "CUDAExecutionProvider",
        {"device_id": 0},
    )
    assert Path(trt_opts["trt_engine_cache_path"]).is_dir()
    mine = ("TensorrtExecutionProvider", {"trt_fp16_enable": False})
    ort_backend.OnnxRuntimeBackend([mine]).session(planned_bundle / "llm.onnx", "llm")
    assert seen[1] == [mine]
