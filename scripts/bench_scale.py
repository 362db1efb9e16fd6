"""`make bench-scale`: build a Citrus-V slice of the 8B's widths; peak RSS and seconds per stage.

Writes the issue-16 probe slice (`citrus_edge.modelling.slice`: the 8B's widths and full 151,668-token
vocabulary, 1 LLM layer, 2 vision blocks (one full-attention), Hiera blocks (1, 2, 3, 1); 1.45 B
random parameters) under out/bench-scale/ (reused when present), then runs `citrus_edge.cli.bundle_build`
for each requested target (default: orin-agx-64 with its default recipe) and prints, per stage
(slice, export, quantize, engine plan, validate): seconds and peak RSS, the bytes of weights the
export wrote, and the peak against the goal of 1.5 x exported weight bytes + 2 GB.

Peak RSS per stage: the kernel's high-water mark of this process (`VmHWM` in
/proc/self/status), reset at the start of each stage by writing 5 to /proc/self/clear_refs, and
read when the stage ends. Exact (not sampled); it counts this process only, which is where every
stage runs (ONNX Runtime sessions and ModelOpt run in-process).

Not part of `make test`: one slice build takes minutes and ~10+ GB of memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path

OUT = Path("out/bench-scale")
GIB = 1024**3
GOAL_FIXED = 2 * 10**9  # the goal's + 2 GB
# The slice has random weights: its answers mean nothing, so the default accuracy budget could
# only send the build into a sensitivity search that measures noise. The budget is opened (the
# fidelity is still measured and printed); everything else is the target's default.
NO_GATE = "dice=100,tokens=0"


def vm_kib(field: str) -> int:
    """A `Vm*` field of /proc/self/status, in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class StageMeter:
    """`progress` callback for `build`: seconds and peak RSS of each stage."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.stage: str | None = None
        self.t0 = 0.0
        self.on_leave: dict[str, list] = {}

    def __call__(self, stage: str | None) -> None:
        if self.stage is not None:
            self.rows.append(
                {
                    "stage": self.stage,
                    "seconds": round(time.perf_counter() - self.t0, 1),
                    "peak_rss_bytes": vm_kib("VmHWM") * 1024,
                    "rss_at_end_bytes": vm_kib("VmRSS") * 1024,
                }
            )
            for hook in self.on_leave.get(self.stage, []):
                hook()
            row = self.rows[-1]
            logging.warning(
                "%s: %.1f s, peak RSS %.2f GiB",
                self.stage,
                row["seconds"],
                row["peak_rss_bytes"] / GIB,
            )
        self.stage = stage
        reset_peak()
        self.t0 = time.perf_counter()


class RssTrace:
    """Samples VmRSS every `period` s into a TSV (seconds, GiB, last log message): where in
    a stage the peak falls."""

    def __init__(self, path: Path, period: float = 0.5) -> None:
        import threading

        self.path, self.period, self.last = path, period, ""
        self.done = threading.Event()
        handler = logging.Handler()
        handler.emit = lambda record: setattr(self, "last", record.getMessage()[:80])
        logging.getLogger().addHandler(handler)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        with open(self.path, "w") as fh:
            while not self.done.wait(self.period):
                rss = vm_kib("VmRSS") / 1024**2
                fh.write(f"{time.perf_counter() - t0:.1f}\t{rss:.2f}\t{self.last}\n")
                fh.flush()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


PROBE_HIERA = (1, 2, 3, 1)  # the issue-16 probe's Hiera blocks per stage


def slice_config(llm_layers: int = 1, hiera_blocks: tuple[int, int, int, int] = PROBE_HIERA):
    from citrus_edge.modelling.slice import SliceConfig

    return SliceConfig(
        "citrus-v-8b",
        llm_layers=llm_layers,
        vision_blocks=2,
        full_attention=(1,),
        hiera_blocks=hiera_blocks,
    )


def write_slice_once(folder: Path, meter: StageMeter, cfg) -> Path:
    from citrus_edge.modelling.slice import write_slice

    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text())["name"] == cfg.name:
        logging.info("reusing %s", folder)
        return folder
    meter("slice")
    write_slice(cfg, folder)
    meter(None)
    return folder


def export_weight_bytes(out: Path) -> int:
    """Bytes of graphs, external data and embedding table in the build's fp32 export."""
    total = 0
    for scratch in out.parent.glob(f".{out.name}.scratch-*"):
        for p in (scratch / "fp32").glob("*"):
            if p.suffix in (".onnx", ".data", ".npy"):
                total += p.stat().st_size
    return total


def small_phantom_set(n: int) -> Path:
    """A phantom set of `n` images (a tenth calib, a tenth eval; 3 records each): the build
    runs the 1.45 B model on every calib and eval record, ~96 decode steps each."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    folder = OUT / f"phantoms-n{n}"
    if (folder / "manifest.jsonl").is_file():
        return folder / "manifest.jsonl"
    return write_phantom_set(folder, n, seed=0, overwrite=folder.exists())


def build_one(model_dir: Path, spec: str, eval_limit: int, data: Path, work: Path = OUT) -> dict:
    from citrus_edge.cli.bundle_build import BuildConfig, build

    target, _, recipe = spec.partition(":")
    out = work / f"bundle-{target}-{recipe or 'default'}"
    if out.exists():
        shutil.rmtree(out)  # ours: written by this script
    meter = StageMeter()
    exported = {}
    meter.on_leave["export"] = [lambda: exported.setdefault("bytes", export_weight_bytes(out))]
    cfg = BuildConfig(
        target=target,
        model_dir=model_dir,
        recipe=recipe or None,
        calib=data,
        eval_data=data,
        eval_limit=eval_limit,
        budget=NO_GATE,
    )
    t0 = time.perf_counter()
    try:
        manifest = build(cfg, out, progress=meter)
    except Exception as e:  # reported with the stages measured so far, then the next target
        logging.info("build %s failed", spec, exc_info=True)
        failed = meter.stage
        meter(None)
        return {
            "target": target,
            "recipe": recipe or "default",
            "stages": meter.rows,
            "error": f"failed in stage {failed}: {type(e).__name__}: {str(e)[:300]}",
        }
    meter(None)
    bundle_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    weights = exported.get("bytes", 0)
    peak = max(r["peak_rss_bytes"] for r in meter.rows)
    goal = 1.5 * weights + GOAL_FIXED
    planned = planner_bytes(model_dir, target, manifest["recipe"]["name"])
    return {
        "target": target,
        "recipe": manifest["recipe"]["name"],
        "planner": planned,
        "bundle_weight_bytes": weight_files_bytes(out),
        "onnx_checker_full": check_graphs(out),
        "stages": meter.rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "export_weight_bytes": weights,
        "bundle_bytes": bundle_bytes,
        "peak_rss_bytes": peak,
        "goal_bytes": goal,
        "peak_over_goal": round(peak / goal, 3),
        "accuracy": manifest.get("accuracy"),
        "quantization": manifest.get("quantization"),
    }


def check_graphs(folder: Path) -> dict[str, str]:
    """`onnx.checker` with full shape inference on every graph of a bundle: "ok" or the error."""
    import onnx

    result = {}
    for path in sorted(folder.glob("*.onnx")):
        try:
            onnx.checker.check_model(str(path), full_check=True)
            result[path.name] = "ok"
        except Exception as e:  # reported, not raised: the figures above still stand
            result[path.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


def weight_files_bytes(folder: Path) -> dict[str, int]:
    """Bytes of each component's weight files in a bundle: graphs + external data, table."""
    sizes: dict[str, int] = {}
    for p in folder.iterdir():
        if p.suffix in (".onnx", ".data", ".npy"):
            name = p.name.split(".")[0]
            sizes[name] = sizes.get(name, 0) + p.stat().st_size
    return sizes


def planner_bytes(model_dir: Path, target: str, recipe: str) -> dict[str, float]:
    """The planner's weight bytes per component for the slice's config (from dimensions)."""
    from citrus_edge.cli.memory_plan import plan
    from citrus_edge.config import CitrusVConfig
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import get_target

    cfg = CitrusVConfig.load(model_dir / "config.json")
    p = plan(cfg, get_target(target), get_recipe(recipe))
    return {c.component: c.weight_bytes for c in p.components}


def export_only(model_dir: Path, release: bool, work: Path = OUT) -> dict:
    """`load_checkpoint` + `export_all` alone (what `build`'s export stage does)."""
    from citrus_edge.export.export_manifest import checkpoint_source_hash
    from citrus_edge.export.export_run import export_all
    from citrus_edge.modelling.checkpoint import load_checkpoint

    out = work / "export"
    if out.exists():
        shutil.rmtree(out)  # ours: written by this script
    meter = StageMeter()
    trace = RssTrace(work / "export_rss.tsv")
    meter("export")
    export_all(
        load_checkpoint(model_dir),
        out,
        source_hash=checkpoint_source_hash(model_dir),
        tokenizer_json=model_dir / "tokenizer.json",
        release_weights=release,
    )
    meter(None)
    trace.stop()
    weights = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data", ".npy"))
    return {"release_weights": release, "stages": meter.rows, "export_weight_bytes": weights}


def print_result(r: dict) -> None:
    if "error" in r:
        print(f"\n{r['target']} ({r['recipe']}): {r['error']}")
        for s in r["stages"]:
            print(
                f"  {s['stage']:<12} {s['seconds']:>8.1f} s, peak RSS {s['peak_rss_bytes'] / GIB:.2f} GiB"
            )
        return
    print(f"\n{r['target']} ({r['recipe']}): {r['seconds']:.0f} s")
    print(f"  {'stage':<12} {'seconds':>8} {'peak RSS GiB':>13} {'RSS at end GiB':>15}")
    for s in r["stages"]:
        print(
            f"  {s['stage']:<12} {s['seconds']:>8.1f} {s['peak_rss_bytes'] / GIB:>13.2f} "
            f"{s['rss_at_end_bytes'] / GIB:>15.2f}"
        )
    measured, planned = r["bundle_weight_bytes"], r["planner"]
    total = sum(measured.values())
    print(
        f"  planner {sum(planned.values()) / GIB:.3f} GiB vs bundle weight files {total / GIB:.3f} GiB"
    )
    print("    files: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in sorted(measured.items())))
    print("    plan:  " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in sorted(planned.items())))
    for name, verdict in r["onnx_checker_full"].items():
        print(f"  onnx.checker (full_check) {name}: {verdict}")
    if r.get("accuracy") is not None:
        print(f"  fidelity vs FP32 (random weights): {json.dumps(r['accuracy'], default=str)}")
    if r.get("quantization") is not None:
        print(f"  quantization: {json.dumps(r['quantization'], default=str)[:600]}")
    w = r["export_weight_bytes"]
    print(f"  exported weight bytes {w / GIB:.2f} GiB; bundle {r['bundle_bytes'] / GIB:.2f} GiB")
    print(
        f"  peak {r['peak_rss_bytes'] / GIB:.2f} GiB vs goal 1.5 x {w / GIB:.2f} + 2 GB = "
        f"{r['goal_bytes'] / GIB:.2f} GiB: x{r['peak_over_goal']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--target",
        action="append",
        help="TARGET[:RECIPE], repeatable (default: orin-agx-64 with its default recipe)",
    )
    ap.add_argument("--eval-limit", type=int, default=2, help="eval records the build measures")
    ap.add_argument("--phantoms", type=int, default=10, help="images of the calib/eval set")
    ap.add_argument("--export-only", action="store_true", help="measure the export stage only")
    ap.add_argument(
        "--keep-weights", action="store_true", help="export without release_weights (before)"
    )
    ap.add_argument(
        "--llm-layers",
        type=int,
        default=1,
        help="LLM layers of the slice (default 1, the issue's probe; two depths give the "
        "per-layer cost the README's full-8B projection uses)",
    )
    ap.add_argument(
        "--hiera-blocks",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=PROBE_HIERA,
        help="Hiera blocks per stage, e.g. 2,6,36,4 (Hiera-L's full depth; the SAM2 encoder "
        "is 0.2 B parameters and fits at full depth). Default 1,2,3,1, the probe; another "
        "depth builds under out/bench-scale/<slice name>/",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if len(args.hiera_blocks) != 4 or min(args.hiera_blocks) < 1:
        ap.error(f"--hiera-blocks: four counts >= 1 expected, got {args.hiera_blocks}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    meter = StageMeter()
    cfg = slice_config(args.llm_layers, args.hiera_blocks)
    if args.hiera_blocks != PROBE_HIERA:
        work = OUT / cfg.name
        name = "slice"
    else:  # the probe's folders as issue 16 named them
        work = OUT
        name = "slice" if args.llm_layers == 1 else f"slice-llm{args.llm_layers}"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = write_slice_once(work / name, meter, cfg)
    results = {"slice": meter.rows, "builds": []}
    for row in meter.rows:
        print(f"slice: {row['seconds']:.1f} s, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB")
    if args.export_only:
        r = export_only(model_dir, release=not args.keep_weights, work=work)
        w, peak = r["export_weight_bytes"], r["stages"][0]["peak_rss_bytes"]
        print(
            f"export (release_weights={r['release_weights']}): {r['stages'][0]['seconds']} s, "
            f"peak RSS {peak / GIB:.2f} GiB, exported weights {w / GIB:.2f} GiB, "
            f"peak / goal {peak / (1.5 * w + GOAL_FIXED):.3f}"
        )
        return
    for spec in args.target or ["orin-agx-64"]:
        r = build_one(model_dir, spec, args.eval_limit, small_phantom_set(args.phantoms), work)
        print_result(r)
        results["builds"].append(r)
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    if any("error" in r for r in results["builds"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
