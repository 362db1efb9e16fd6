"""scripts/profile_ops.py: per-operator profile tables of bundles side by side (issue 19)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_ops.py"


def _load():
    spec = importlib.util.spec_from_file_location("profile_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_ops"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


po = _load()


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name: str, op: str, ts: int, dur: int) -> list[dict]:
    """A node's three events, as ONNX Runtime writes them (fences carry no kernel time)."""
    args = {"op_name": op, "provider": "CPUExecutionProvider"}
    return [
        {"cat": "Node", "name": f"{name}_fence_before", "ts": ts, "dur": 0, "args": args},
        {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": args},
        {"cat": "Node", "name": f"{name}_fence_after", "ts": ts + dur, "dur": 0, "args": args},
    ]


def fake_profile() -> list[dict]:
    """A warm-up run (t=0) then two runs (t=1000, t=2000) of a 3-node graph."""
    events = [{"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5}]
    for start, scale in ((0, 10), (1000, 1), (2000, 1)):  # the warm-up is 10x slower
        events.append(_run(start, 700 * scale))
        events += _node("/mm1", "MatMulInteger", start + 1, 300 * scale)
        events += _node("/mm2", "MatMulInteger", start + 301, 100 * scale)
        events += _node("/dq", "DynamicQuantizeLinear", start + 401, 200 * scale)
    return events


def test_aggregate_sums_per_op_type_per_run_without_the_warm_up():
    t = po.aggregate(fake_profile(), runs=2, skip_runs=1)
    assert t.ms == pytest.approx({"MatMulInteger": 0.4, "DynamicQuantizeLinear": 0.2})
    assert t.share == pytest.approx({"MatMulInteger": 400 / 6, "DynamicQuantizeLinear": 200 / 6})
    assert sum(t.share.values()) == pytest.approx(100.0)
    assert t.nodes == {"MatMulInteger": 2, "DynamicQuantizeLinear": 1}
    assert t.total_ms == pytest.approx(0.6)
    assert t.run_ms == pytest.approx(0.7)


def test_aggregate_takes_each_nodes_median_so_one_slow_run_does_not_count():
    # Without skipping, the 10x slower warm-up is one run of three: the medians ignore it.
    t = po.aggregate(fake_profile(), runs=3)
    assert t.total_ms == pytest.approx(0.6) and t.run_ms == pytest.approx(0.7)
    assert t.nodes["MatMulInteger"] == 2  # distinct nodes, not events
    # Two cases (alternating runs): medians per case, summed over the cases.
    events = [{"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5}]
    for start, us in ((0, 100), (1000, 50), (2000, 100), (3000, 50), (4000, 900)):
        events.append(_run(start, us + 10))
        events += _node("/mm", "MatMul", start + 1, us)
    two = po.aggregate(events[:-4], runs=2, cases=2)  # runs 0..3: case 0 = 100, case 1 = 50
    assert two.ms == pytest.approx({"MatMul": 0.15}) and two.run_ms == pytest.approx(0.17)
    with pytest.raises(po.ProfileInputError, match="expected 0 warm-up plus 3 x 2 case"):
        po.aggregate(events, runs=3, cases=2)


def test_a_profile_short_of_runs_is_refused():
    with pytest.raises(
        po.ProfileInputError, match="3 model runs, expected 1 warm-up plus 5 x 1 case"
    ):
        po.aggregate(fake_profile(), runs=5, skip_runs=1)
    with pytest.raises(po.ProfileInputError, match="at least 1"):
        po.aggregate(fake_profile(), runs=0)


def test_the_llm_gets_a_long_decode_unit_unless_a_validation_case_is_one():
    short = [
        {"batch": 1, "seq": 7, "past": 0, "pad": 0},
        {"batch": 1, "seq": 1, "past": 5, "pad": 0},
    ]
    names = [u.name for u in po.units_of({"vision": [{"grid_h": 8}], "llm": short})]
    assert names == ["vision", "llm", "llm decode (seq 1, past 200)", "llm prefill (seq 200)"]
    long = [*short, {"batch": 1, "seq": 1, "past": 300, "pad": 0}]
    names = [u.name for u in po.units_of({"llm": long})]
    assert names == ["llm", "llm prefill (seq 200)"]


def test_the_table_puts_bundles_side_by_side_with_their_ratio():
    int8 = po.aggregate(fake_profile(), runs=2, skip_runs=1)
    fp32 = po.OpTimes({"MatMul": 0.3}, {"MatMul": 100.0}, {"MatMul": 2}, 0.3, 0.35)
    text = po.format_unit("llm", ["a (int8)", "b (fp32)"], [int8, fp32])
    lines = text.splitlines()
    assert lines[0] == "== llm"
    row = next(x for x in lines if x.startswith("MatMulInteger"))
    assert row.split("|")[1].split() == ["0.400", "66.7", "2"]
    assert row.split("|")[2].split() == ["-", "-", "-"]
    total = next(x for x in lines if x.startswith("total (nodes)"))
    assert [c.split() for c in total.split("|")[1:]] == [
        ["0.600", "100.0", "3"],
        ["0.300", "100.0", "2"],
    ]
    assert lines[-1] == "ratio a (int8) / b (fp32) node time: 2.00  (model_run: 2.00)"


def test_main_profiles_a_bundle_and_writes_json(tiny_fp32_bundle, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(po.tempfile, "tempdir", str(scratch))  # where the profiles go
    out = tmp_path / "ops.json"
    assert (
        po.main([str(tiny_fp32_bundle), str(tiny_fp32_bundle), "--runs", "1", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    from citrus_edge.cpu_features import describe

    assert printed[0] == describe()
    doc = json.loads(out.read_text())
    assert list(doc["units"]) == [
        "vision", "llm", "sam_encoder", "mask_decoder",
        "llm decode (seq 1, past 200)", "llm prefill (seq 200)",
    ]  # fmt: skip
    labels = [b["label"] for b in doc["bundles"]]
    assert labels == ["1:bundle (fp32)", "2:bundle (fp32)"]
    for unit in doc["units"].values():
        for times in unit.values():
            assert sum(op["share"] for op in times["ops"].values()) == pytest.approx(100.0)
            assert times["total_ms"] > 0
    assert sum(1 for x in printed if x.startswith("ratio 1:bundle (fp32) / 2:bundle (fp32)")) == 6
    assert list(scratch.iterdir()) == []  # the profiler's files are deleted


def test_component_limits_the_units(tiny_fp32_bundle, tmp_path, capsys):
    out = tmp_path / "llm.json"
    argv = [str(tiny_fp32_bundle), "--runs", "1", "--component", "llm", "--json", str(out)]
    assert po.main(argv) == 0
    units = list(json.loads(out.read_text())["units"])
    assert units == ["llm", "llm decode (seq 1, past 200)", "llm prefill (seq 200)"]


def test_a_folder_that_is_no_bundle_is_one_line_and_exit_2(tmp_path, capsys):
    assert po.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"profile_ops: {tmp_path}: not a citrus-edge bundle (no manifest.json)"]
