"""check_engine_compat: engines built for another TensorRT or GPU are refused with a rebuild command."""

from __future__ import annotations

import pytest

from citrus_edge.engines import EngineMismatchError, check_engine_compat
from citrus_edge.engines.compat import normalize_sm, rebuild_command, same_tensorrt


def sidecar(**changes) -> dict:
    base = {
        "schema": 1,
        "kind": "citrus-edge tensorrt engine",
        "component": "vision",
        "tensorrt_version": "10.3.0.30",
        "device": {"index": 0, "name": "Orin", "sm": "8.7"},
        "target": "orin-agx-64",
        "bundle": "/data/bundles/citrus-v-8b",
    }
    return {**base, **changes}


def test_matching_engine_passes():
    check_engine_compat(sidecar(), "10.3.0.30", "8.7")
    check_engine_compat(sidecar(), "10.3.0", "sm_87")  # a shorter version agrees on its fields


def test_tensorrt_version_mismatch_names_the_rebuild_command():
    with pytest.raises(EngineMismatchError) as err:
        check_engine_compat(sidecar(), "10.7.0.23", "8.7")
    command = "citrus-edge engines build /data/bundles/citrus-v-8b --target orin-agx-64"
    assert err.value.command == command
    message = str(err.value)
    assert command in message
    assert "TensorRT 10.3.0.30 (this device runs 10.7.0.23)" in message


def test_sm_mismatch_rebuilds_for_the_target_of_this_gpu():
    with pytest.raises(EngineMismatchError) as err:
        check_engine_compat(sidecar(), "10.3.0.30", "8.9", bundle="b")
    assert err.value.command == "citrus-edge engines build b --target x86-ada"
    assert "sm 8.7 (this GPU is sm 8.9)" in str(err.value)


def test_both_mismatches_are_reported():
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0.30 .* and sm 8.7"):
        check_engine_compat(sidecar(), "10.8.0", "9.0")


def test_several_targets_share_an_sm():
    # An x86 engine on an Orin: four Orin targets have sm 8.7; the first is named, all listed.
    command, remark = rebuild_command("b", "x86-ampere", "8.7")
    assert command == "citrus-edge engines build b --target orin-agx-64"
    assert "orin-agx-32" in remark and "orin-nano-8" in remark


def test_unknown_sm_keeps_the_target_and_says_so():
    with pytest.raises(EngineMismatchError, match="no known target has sm 7.5"):
        check_engine_compat(sidecar(), "10.3.0.30", "7.5")


def test_sidecar_without_fields_is_a_mismatch_with_a_command():
    with pytest.raises(EngineMismatchError, match="lacks 'tensorrt_version'") as err:
        check_engine_compat(
            {"component": "llm", "device": {"sm": "8.7"}, "target": "thor"}, "10.3", "8.7"
        )
    assert err.value.command == "citrus-edge engines build BUNDLE --target thor"


@pytest.mark.parametrize("value", ["8.7", "sm_87", "87", (8, 7), "SM87", " 8.7 "])
def test_normalize_sm(value):
    assert normalize_sm(value) == "8.7"


def test_normalize_sm_thor_and_garbage():
    assert normalize_sm("sm_110") == "11.0"
    with pytest.raises(ValueError, match="not a compute capability"):
        normalize_sm("ampere")


def test_same_tensorrt():
    assert same_tensorrt("10.3.0.30", "10.3.0")
    assert not same_tensorrt("10.3.0.30", "10.3.0.26")
    assert not same_tensorrt("10.3.0", "10.3.1")
    assert not same_tensorrt("10.3", "10.3.0")  # too vague to vouch for
