"""Targets table, recipes and the precision check (torch-free modules)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from citrus_edge.recipes import (
    FP8,
    FP16_W4,
    INT8,
    INT8_W4,
    PRECISIONS,
    RECIPES,
    Recipe,
    get_precision,
    get_recipe,
)
from citrus_edge.targets import (
    TARGETS,
    ResolutionProfile,
    UnsupportedPrecisionError,
    check_recipe,
    get_target,
    targets_supporting,
)

ORINS = ("orin-agx-64", "orin-agx-32", "orin-nx-16", "orin-nano-8")


@pytest.mark.parametrize(
    ("name", "memory_gb", "bandwidth_gbs", "int8_tops", "dla", "sm"),
    [
        ("orin-agx-64", 64.0, 204.8, 275.0, 2, "8.7"),
        ("orin-agx-32", 32.0, 204.8, 200.0, 2, "8.7"),
        ("orin-nx-16", 16.0, 102.4, 100.0, 2, "8.7"),
        ("orin-nano-8", 8.0, 68.0, 40.0, 0, "8.7"),
        ("thor", 128.0, None, None, 0, "11.0"),
        ("x86-ampere", 48.0, 768.0, None, 0, "8.6"),
        ("x86-ada", 48.0, 960.0, None, 0, "8.9"),
        ("x86-hopper", 80.0, 2000.0, None, 0, "9.0"),
        ("cpu", 32.0, 76.8, None, 0, None),
    ],
)
def test_table_facts(name, memory_gb, bandwidth_gbs, int8_tops, dla, sm):
    t = get_target(name)
    assert (t.memory_gb, t.bandwidth_gbs, t.int8_tops, t.dla_cores, t.sm) == (
        memory_gb,
        bandwidth_gbs,
        int8_tops,
        dla,
        sm,
    )
    assert 0 < t.usable_memory_gb < t.memory_gb
    assert t.tensorrt == (t.kind != "cpu")
    json.dumps(t.to_dict())


def test_table_is_complete_and_notes_say_what_is_not_measured():
    assert list(TARGETS) == [
        "cpu",
        "orin-agx-64",
        "orin-agx-32",
        "orin-nx-16",
        "orin-nano-8",
        "thor",
        "x86-ampere",
        "x86-ada",
        "x86-hopper",
    ]
    assert "102 GB/s" in get_target("orin-nano-8").notes  # Super mode
    assert "not confirmed" in get_target("thor").notes
    for name in ("x86-ampere", "x86-ada", "x86-hopper", "cpu"):
        assert "representative" in get_target(name).notes


def test_precision_sets():
    for name in ORINS:
        t = get_target(name)
        assert t.kind == "jetson" and t.sm == "8.7"
        assert {"fp16", "int8", "int4"} <= t.precisions
        assert not {"fp8", "nvfp4"} & t.precisions
    assert targets_supporting("fp8") == ["thor", "x86-ada", "x86-hopper"]
    assert targets_supporting("nvfp4") == ["thor"]
    assert get_target("cpu").precisions == {"fp32", "int8", "int4"}
    for t in TARGETS.values():
        assert t.precisions <= set(PRECISIONS)


@pytest.mark.parametrize("name", ORINS)
def test_fp8_refused_on_every_orin(name):
    with pytest.raises(UnsupportedPrecisionError) as e:
        check_recipe(get_target(name), FP8)
    msg = str(e.value)
    for component in ("vision", "llm", "sam_encoder", "mask_decoder"):
        assert f"{name} cannot run fp8 for {component}" in msg
    assert "Jetson Orin (Ampere sm_87) has no FP8 tensor cores" in msg
    assert "targets that can: thor, x86-ada, x86-hopper" in msg
    assert isinstance(e.value, ValueError)


def test_one_refused_component_is_named_alone():
    recipe = FP16_W4.with_component("llm", "fp8")
    with pytest.raises(UnsupportedPrecisionError) as e:
        check_recipe(get_target("orin-nx-16"), recipe)
    msg = str(e.value)
    assert "orin-nx-16 cannot run fp8 for llm" in msg
    assert "for vision" not in msg and "for sam_encoder" not in msg
    check_recipe(get_target("x86-ada"), recipe)  # and Ada runs it


def test_nvfp4_and_cpu_refusals_name_the_able_targets():
    nvfp4 = FP16_W4.with_component("llm", "nvfp4")
    with pytest.raises(UnsupportedPrecisionError, match="NVFP4 needs Blackwell.*can: thor\n"):
        check_recipe(get_target("x86-hopper"), nvfp4)
    check_recipe(get_target("thor"), nvfp4)
    with pytest.raises(UnsupportedPrecisionError) as e:
        check_recipe(get_target("cpu"), FP16_W4)
    assert "cpu cannot run fp16 for vision" in str(e.value)
    assert "targets that can: orin-agx-64, orin-agx-32" in str(e.value)


def test_default_recipes():
    for t in TARGETS.values():
        check_recipe(t, get_recipe(t.default_recipe))
    assert get_target("cpu").default_recipe == "int8"
    for name in ORINS:
        assert get_target(name).default_recipe == "fp16-w4"
        assert "fp8" not in dict(get_recipe(get_target(name).default_recipe).items()).values()


def test_recipe_presets():
    assert dict(FP16_W4.items()) == {
        "vision": "fp16",
        "llm": "int4",
        "sam_encoder": "fp16",
        "mask_decoder": "fp16",
    }
    assert dict(INT8_W4.items())["llm"] == "int4" and INT8_W4.vision == "int8"
    assert set(dict(FP8.items()).values()) == {"fp8"}
    assert list(RECIPES) == ["fp32", "fp16", "int8", "int8-w4", "fp16-w4", "fp8"]
    for r in RECIPES.values():
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_recipe_derivation_does_not_mutate_presets():
    before = INT8_W4.to_dict()
    derived = INT8_W4.with_component("llm", "int8")
    assert derived.llm == "int8" and derived.vision == "int8"
    assert derived.name == "int8-w4+llm=int8"
    assert INT8_W4.to_dict() == before and RECIPES["int8-w4"] is INT8_W4
    assert RECIPES["int8-w4"].llm == "int4"
    assert INT8.with_component("vision", "fp16", name="mine").name == "mine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        INT8_W4.llm = "fp16"  # type: ignore[misc]


def test_recipe_validation():
    with pytest.raises(ValueError, match="weight-only format for the LLM"):
        INT8.with_component("vision", "int4")
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        INT8.with_component("llm", "int3")
    with pytest.raises(ValueError, match="unknown component"):
        INT8.with_component("audio", "int8")


def test_bytes_per_weight():
    assert get_precision("int4").weight_bytes == 0.5 + 2 / 128
    assert get_precision("nvfp4").weight_bytes == 0.5 + 1 / 16
    assert [get_precision(p).weight_bytes for p in ("fp32", "fp16", "bf16", "int8", "fp8")] == [
        4,
        2,
        2,
        1,
        1,
    ]


def test_lookups_list_known_names():
    with pytest.raises(ValueError, match="orin-nano-8.*x86-hopper"):
        get_target("orin-nano-4")
    with pytest.raises(ValueError, match="fp16-w4"):
        get_recipe("w4a8")


def test_resolution_profile_validates():
    with pytest.raises(ValueError, match="multiples of 28"):
        ResolutionProfile((56, 56), (250, 250), (448, 448))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ResolutionProfile((56, 56), (504, 504), (448, 448))
    with pytest.raises(ValueError, match="multiple of 32"):
        ResolutionProfile((56, 56), (252, 252), (448, 448), sam_max_side=1000)


def test_target_validates():
    t = get_target("orin-nano-8")
    with pytest.raises(ValueError, match="needs \\['fp8'\\]"):
        dataclasses.replace(t, default_recipe="fp8")
    with pytest.raises(ValueError, match="sm must be None"):
        dataclasses.replace(t, sm=None)


def test_modules_are_torch_free():
    code = (
        "import sys, citrus_edge.targets, citrus_edge.recipes\n"
        "heavy = {'torch', 'transformers', 'PIL', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import citrus_edge.cli.memory_plan\n"
        "assert not {'torch', 'transformers'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- target names as users say them (families, Jetson detection) ----------------------------
def _jetson(root, model: str | None, mem_kib: int | None):
    """Fake device-tree and meminfo files under `root` (what /proc holds on a Jetson)."""
    proc = root / "proc"
    (proc / "device-tree").mkdir(parents=True, exist_ok=True)
    if model is not None:
        (proc / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    if mem_kib is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {mem_kib} kB\nMemFree:  1234 kB\n")
    return root


AGX_DEVKIT = "NVIDIA Jetson AGX Orin Developer Kit"
NX_DEVKIT = "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"
NANO_DEVKIT = "NVIDIA Jetson Orin Nano Developer Kit"


@pytest.mark.parametrize(
    ("model", "mem_kib", "requested", "expected"),
    [
        (AGX_DEVKIT, 64_335_836, "orin", "orin-agx-64"),  # 65.9 GB
        (AGX_DEVKIT, 30_536_432, "orin", "orin-agx-32"),  # 31.3 GB
        (AGX_DEVKIT, 30_536_432, "orin-agx", "orin-agx-32"),
        (NX_DEVKIT, 15_655_372, "orin", "orin-nx-16"),  # 16.0 GB
        (NX_DEVKIT, 15_655_372, "orin-nx", "orin-nx-16"),
        (NANO_DEVKIT, 7_620_240, "orin", "orin-nano-8"),  # 7.8 GB
        (NANO_DEVKIT + " Super", 7_620_240, "orin-nano", "orin-nano-8"),
    ],
)
def test_family_resolves_to_this_jetson(tmp_path, model, mem_kib, requested, expected):
    from citrus_edge.targets import resolve_target

    res = resolve_target(requested, root=_jetson(tmp_path, model, mem_kib))
    assert (res.target.name, res.how) == (expected, "this device")
    assert res.to_dict()["requested"] == requested and res.to_dict()["resolved"] == expected
    assert model in res.device and f"{mem_kib * 1024 / 1e9:.1f} GB" in res.device
    assert f"{requested} -> {expected} (this device" in res.describe()


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("orin", "orin-agx-64"), ("orin-agx", "orin-agx-64"), ("orin-nx", "orin-nx-16")]
    + [("orin-nano", "orin-nano-8"), ("thor", "thor"), ("orin-nano-8", "orin-nano-8")],
)
def test_family_off_a_jetson_is_its_documented_default(tmp_path, requested, expected):
    from citrus_edge.targets import FAMILIES, resolve_target

    res = resolve_target(requested, root=tmp_path)  # no device tree: a workstation
    assert res.target.name == expected and res.device is None
    if requested in FAMILIES:
        assert res.how == "family default" and FAMILIES[requested].default == expected
        assert "the family's default" in res.describe()
    else:
        assert res.how == "exact" and res.describe() == f"target {expected}"
    assert get_target(requested).name == expected  # what the CLI and BuildConfig call


def test_family_of_another_jetson_is_not_this_device(tmp_path):
    """`--target orin-nano` typed on an AGX Orin cross-builds for a Nano; an exact name is
    never replaced by the device it is typed on."""
    from citrus_edge.targets import resolve_target

    root = _jetson(tmp_path, AGX_DEVKIT, 64_335_836)
    nano = resolve_target("orin-nano", root=root)
    assert (nano.target.name, nano.how) == ("orin-nano-8", "family default")
    assert AGX_DEVKIT in nano.device
    exact = resolve_target("orin-nx-16", root=root)
    assert (exact.target.name, exact.how) == ("orin-nx-16", "exact")


@pytest.mark.parametrize(
    ("model", "mem_kib", "needle"),
    [
        (NX_DEVKIT, 7_620_240, "orin-nx-16 16 GB"),  # Orin NX 8GB: no such target
        (NANO_DEVKIT, 3_800_000, "orin-nano-8 8 GB"),  # Orin Nano 4GB
    ],
)
def test_module_no_target_describes_is_refused(tmp_path, model, mem_kib, needle):
    from citrus_edge.targets import UnknownModuleError, resolve_target

    with pytest.raises(UnknownModuleError) as e:
        resolve_target("orin", root=_jetson(tmp_path, model, mem_kib))
    assert needle in str(e.value) and "pass an exact --target" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI prints it as one line


def test_jetson_detection_reads_the_device_tree(tmp_path):
    from citrus_edge.jetson import detect_jetson, family_of

    assert detect_jetson(tmp_path) is None  # no device tree
    assert detect_jetson(_jetson(tmp_path / "pi", "Raspberry Pi 5 Model B", 8_000_000)) is None
    m = detect_jetson(_jetson(tmp_path / "agx", AGX_DEVKIT, 64_335_836))
    assert (m.family, round(m.memory_gb, 2)) == ("orin-agx", 65.88)
    assert detect_jetson(_jetson(tmp_path / "x", "NVIDIA Jetson Xavier NX", None)).family is None
    assert family_of("NVIDIA Jetson AGX Thor Developer Kit") == "thor"
    assert family_of("NVIDIA Jetson Orin NX 16GB") == "orin-nx"


def test_unknown_name_lists_targets_and_families():
    with pytest.raises(ValueError, match="orin-nano-8.*x86-hopper.*family.*orin-agx"):
        get_target("xavier")
