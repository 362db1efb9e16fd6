"""Plans of a real exported TINY model, and `citrus-edge engines build` for the cpu target."""

from __future__ import annotations

import json

import pytest
from fixtures import tiny_model

from citrus_edge.bundle import write_manifest
from citrus_edge.config import TINY
from citrus_edge.engines import EnginePlan, EnginePlanError, build_bundle_engines, make_engine_plan
from citrus_edge.engines.bundle_engines import default_out_dir, select_plan, stored_plans
from citrus_edge.engines.engine_plan import PLAN_FILE
from citrus_edge.recipes import FP16, FP32

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from citrus_edge.export.export_manifest import random_source_hash
    from citrus_edge.export.export_run import export_all

    out = tmp_path_factory.mktemp("engines") / "tiny-export"
    export_all(tiny_model(), out, image_sizes=((56, 140),), source_hash=random_source_hash("tiny"))
    return out


def _copy(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_plan_reads_the_exported_graphs(export_dir):
    plan = make_engine_plan(export_dir, "orin-agx-64", FP16, TINY)
    vision = plan.component("vision")
    # The export's vision norms are found by the FP32 patterns: 2 blocks x (norm1 + norm2) and
    # the merger's ln_q, several nodes each (Pow, ReduceMean, Add, Sqrt, Div, Mul, ...).
    assert vision.fp32_nodes_matched >= 5 * 6
    names = {s.name for s in vision.profiles[0].inputs}
    assert names == {
        "pixel_values", "window_index", "reverse_index", "cos", "sin", "gather_index",
        "window_valid", "scatter_index",
    }  # fmt: skip
    prefill, decode = plan.component("llm").profiles
    past = {s.name: s for s in decode.inputs}["past_key_0"]
    assert past.max == (1, TINY.text.num_kv_heads, 1023, TINY.text.head_dim)
    assert {s.name: s for s in prefill.inputs}["attention_mask"].max == (1, 64 + 512)
    sam = plan.component("sam_encoder").profiles[0].inputs
    assert [(s.name, s.max) for s in sam] == [("pixels", (1, 3, 256, 256))]
    assert make_engine_plan(export_dir, "orin-agx-64", FP16) == plan  # config.json read


def test_cpu_build_from_a_plan_stored_in_the_bundle(export_dir, tmp_path):
    bundle = _copy(export_dir, tmp_path / "bundle")
    plan = make_engine_plan(bundle, "cpu", FP32, TINY)
    # As `citrus-edge build` writes it: components filled in later, the plan under engine_plan.
    write_manifest(bundle, {"components": None, "engine_plan": plan.to_dict()})
    assert stored_plans(bundle) == {"cpu": plan}
    built = build_bundle_engines(bundle)  # the only stored plan: cpu
    assert built.out_dir == default_out_dir(bundle, "cpu") and built.backend == "onnxruntime"
    manifest = json.loads(built.manifest.read_text())
    assert manifest["target"] == "cpu" and manifest["plan"] == plan.to_dict()
    for component, path in built.engines.items():
        side = json.loads(path.with_name(f"{component}.ort.json").read_text())
        assert side["level"] == "extended"
        assert 0 <= max(side["verification"]["max_abs_diff"].values()) <= 1e-5, component
        assert manifest["files"][path.name]["sha256"] == side["sha256"]
    # A rebuild replaces the engines folder; a folder with a stranger's file is refused.
    again = build_bundle_engines(bundle, "cpu")
    assert again.engines == built.engines
    (built.out_dir / "notes.txt").write_text("mine")
    with pytest.raises(EnginePlanError, match=r"did not write: \['notes.txt'\]"):
        build_bundle_engines(bundle, "cpu")


def test_plan_file_and_replanning(export_dir, tmp_path):
    bundle = _copy(export_dir, tmp_path / "bundle")
    with pytest.raises(EnginePlanError, match=r"pass --target \(stored plans: none\)"):
        select_plan(bundle)
    with pytest.raises(EnginePlanError, match="pass --recipe"):
        select_plan(bundle, "cpu")
    planned = select_plan(bundle, "cpu", recipe="fp32")  # from the graphs and config.json
    assert planned.target == "cpu" and planned.recipe == FP32
    orin = make_engine_plan(bundle, "orin-nx-16", FP16, TINY)
    (bundle / PLAN_FILE).write_text(orin.to_json())
    assert select_plan(bundle) == orin
    # The stored plan's recipe carries over to a target it has no plan for.
    assert select_plan(bundle, "x86-ada").recipe == FP16
    with pytest.raises(ValueError, match="unknown target 'jetson'"):
        select_plan(bundle, "jetson")


def test_stored_plans_disagreeing_are_refused(export_dir, tmp_path):
    bundle = _copy(export_dir, tmp_path / "bundle")
    plan = make_engine_plan(bundle, "orin-nx-16", FP16, TINY)
    (bundle / PLAN_FILE).write_text(json.dumps({"orin-nx-16": plan.to_dict()}))
    other = EnginePlan.from_dict({**plan.to_dict(), "notes": ["edited"]})
    write_manifest(bundle, {"engine_plan": other.to_dict()})
    with pytest.raises(EnginePlanError, match="hold different plans for orin-nx-16"):
        stored_plans(bundle)


def test_engines_build_takes_family_names_and_this_jetsons_module(
    export_dir, tmp_path, monkeypatch
):
    """A bundle planned off the device for `orin` (orin-agx-64) is re-planned on a Nano for
    orin-nano-8 (its profiles and workspace), with no --target, and `--target orin-nano` works."""
    from citrus_edge.engines import bundle_engines as engines_build
    from citrus_edge.engines.engine_plan import workspace_bytes
    from citrus_edge.targets import get_target

    bundle = _copy(export_dir, tmp_path / "bundle")
    agx = make_engine_plan(bundle, "orin", FP16, TINY)  # a family name: off a Jetson, the AGX
    assert agx.target == "orin-agx-64"
    (bundle / PLAN_FILE).write_text(agx.to_json())
    assert select_plan(bundle, "orin-nano").target == "orin-nano-8"
    assert select_plan(bundle, "orin").target == "orin-agx-64"  # no Jetson here
    monkeypatch.setattr(engines_build, "jetson_target", lambda: "orin-nano-8")  # on a Nano
    nano = select_plan(bundle)
    assert nano.target == "orin-nano-8" and nano.recipe == FP16
    assert nano.workspace_bytes == workspace_bytes(get_target("orin-nano-8")) == 1_375_000_000
    assert nano.workspace_bytes < agx.workspace_bytes
