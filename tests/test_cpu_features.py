"""The instruction-set line printed beside every CPU speed figure (issue 19)."""

from __future__ import annotations

from citrus_edge import cpu_features
from citrus_edge.cpu_features import FLAGS, describe, instruction_sets

BLOCK = """processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 fma f16c avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_int8 amx_tile

"""
SAPPHIRE = BLOCK.format(n=0) + BLOCK.format(n=1)
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD Ryzen 5 3600\nflags\t: fma f16c avx avx2\n"


def test_flags_and_cores_are_read_from_the_text():
    sets = instruction_sets(SAPPHIRE)
    assert sets["model"] == "Intel(R) Xeon(R) Processor"
    assert sets["cores"] == 2
    present = {f for f, on in sets["flags"].items() if on}
    assert present == {
        "fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8"
    }  # fmt: skip
    assert set(sets["flags"]) == set(FLAGS)  # every flag that matters, present or not
    assert not sets["flags"]["avx_vnni"] and not sets["flags"]["amx_bf16"]


def test_describe_names_the_sets_in_order():
    line = describe(instruction_sets(SAPPHIRE))
    assert line == (
        "Intel(R) Xeon(R) Processor: FMA F16C AVX2 AVX-512 AVX-512BW VNNI(AVX-512) "
        "BF16(AVX-512) AMX-INT8, 2 cores"
    )
    assert describe(instruction_sets(AVX2_ONLY)) == "AMD Ryzen 5 3600: FMA F16C AVX2, 1 cores"


def test_a_flag_is_matched_whole_not_as_a_prefix():
    sets = instruction_sets("processor : 0\nflags : avx512fx avx2_fake\n")
    assert not any(sets["flags"].values())
    assert sets["model"] == "unknown"
    assert describe(sets).startswith("unknown: none of FMA")


def test_no_cpuinfo_is_unknown_and_never_raises(monkeypatch):
    monkeypatch.setattr(cpu_features.sys, "platform", "darwin")
    sets = instruction_sets()
    assert sets["model"] == "unknown" and sets["flags"] == {}
    assert "unknown" in sets["source"]
    assert "instruction sets unknown" in describe(sets)


def test_unreadable_cpuinfo_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_features.sys, "platform", "linux")
    monkeypatch.setattr(cpu_features, "CPUINFO", str(tmp_path / "missing"))
    assert instruction_sets()["flags"] == {}
    assert instruction_sets("")["model"] == "unknown"
