"""Write a quantized export folder: the FP32 export with its graphs replaced, atomically.

Same layout as `export.export_all`'s folder: `<component>.onnx` (+ `.onnx.data`) with its
`<component>.manifest.json` updated (sha256, precision, the quantization facts), the other files
copied unchanged, `quantize_report.json`, and `export_manifest.json` listing every file with
its sha256. Everything is written into a temporary folder beside `out_dir` and renamed into
place; an existing `out_dir` is replaced only when a previous `quantize` wrote it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.atomic import make_staging_dir
from citrus_edge.bundle import (
    EXPORT_KIND,
    EXPORT_MANIFEST,
    OutputFolderError,
    check_replaceable,
    replace_directory,
    sha256_file,
)
from citrus_edge.host_inputs import int8_rows_dtype, quantize_rows, table_dtype
from citrus_edge.recipes import COMPONENTS

from .report import REPORT_FILE, ComponentReport, QuantizeReport, json_db


def read_export(export_dir: Path) -> dict[str, Any]:
    """The `export_manifest.json` of an FP32 export folder naming all four graphs."""
    path = export_dir / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: no {EXPORT_MANIFEST}; pass an export_all folder")
    export = json.loads(path.read_text())
    missing = [c for c in COMPONENTS if c not in export.get("graphs", {})]
    if missing:
        raise ValueError(f"{path}: names no graph for {missing}")
    if export.get("precision", "float32") != "float32":
        raise ValueError(
            f"{export_dir} holds {export.get('precision')} graphs; quantize the FP32 export"
        )
    return export


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing `out_dir` unless `overwrite` and a previous `quantize` wrote it (and
    it holds nothing but the files it listed): `bundle.check_replaceable`."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    hint = "move them away or choose another out_dir"
    listed = check_replaceable(out_dir, EXPORT_MANIFEST, EXPORT_KIND, "`quantize`", hint)
    if listed is not None and REPORT_FILE not in listed:
        raise OutputFolderError(
            f"refusing to replace {out_dir}: it is not a folder `quantize` wrote (its "
            f"{EXPORT_MANIFEST} lists no {REPORT_FILE}); {hint}"
        )


def copy_graph(src: Path, dst_dir: Path) -> Path:
    """Copy a graph and its `<name>.onnx.data` (if any) into `dst_dir`; returns the copy."""
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    if Path(f"{src}.data").is_file():
        shutil.copyfile(f"{src}.data", f"{dst}.data")
    return dst


def graph_bytes(path: Path) -> tuple[int, int]:
    """(file bytes including external data, bytes of the weights: initializers + constants)."""
    import onnx

    total = path.stat().st_size
    if Path(f"{path}.data").is_file():
        total += Path(f"{path}.data").stat().st_size
    model = onnx.load(str(path), load_external_data=False)  # sizes only: never read the weights
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims
    ]
    return total, sum(tensor_bytes(t) for t in tensors)


def tensor_bytes(t) -> int:
    """Stored bytes of a tensor: raw data, typed fields, or the `length` of external data."""
    external = {e.key: e.value for e in t.external_data}
    if "length" in external:
        return int(external["length"])
    from onnx import helper

    if t.raw_data:
        return len(t.raw_data)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims)) * itemsize


TABLE_CHUNK_ROWS = 8192  # rows converted at a time (the 8B's float32 table is 2.2 GB)


def store_embeddings(src: Path, dst: Path, dtype: str) -> None:
    """Write the embedding table `src` (.npy, float32 [V, H]) as `dtype` at `dst`: "float16",
    or "int8" rows with a scale each (`host_inputs.int8_rows_dtype`); converted in chunks of
    rows into a mapped temp file, then renamed."""
    table = np.load(src, mmap_mode="r")
    vocab, hidden = table.shape
    out_dtype = int8_rows_dtype(hidden) if dtype == "int8" else np.dtype(dtype)
    shape = (vocab,) if dtype == "int8" else (vocab, hidden)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=out_dtype, shape=shape)
        for start in range(0, vocab, TABLE_CHUNK_ROWS):
            rows = table[start : start + TABLE_CHUNK_ROWS]
            out[start : start + len(rows)] = (
                quantize_rows(rows, start) if dtype == "int8" else rows.astype(out_dtype)
            )
        out.flush()
        del out
        tmp.replace(dst)
    except BaseException as e:  # interrupted too: no temp file left
        tmp.unlink(missing_ok=True)
        if isinstance(e, ValueError):  # a row that is not finite: name the table
            raise ValueError(f"{src}: {e}") from e
        raise


def payload_bytes(files: list[Path]) -> int:
    """Bytes of what a bundle carries besides its manifests: graphs, weights, tables, tokenizer."""
    return sum(p.stat().st_size for p in files if not p.name.endswith("manifest.json"))


# -- 6. write the output folder -----------------------------------------------------------


def write_quantized_export(
    export_dir: Path,
    export: dict,
    qdir: Path,
    report: QuantizeReport,
    out_dir: Path,
    overwrite: bool = False,
) -> None:
    """Copy the export with the quantized graphs of `qdir` (`<component>.onnx`, for every
    component the report marks quantized) in place, update the manifests, rename into place.

    `out_dir` is checked again (`check_out_dir`) just before the rename."""
    staging = make_staging_dir(out_dir, "writing")
    quantized = [c for c, r in report.components.items() if r.status == "quantized"]
    try:
        replaced = {f"{c}.onnx" for c in quantized}
        stale = replaced | {f"{n}.data" for n in replaced}
        table = qdir / export["embeddings"]["file"]
        if table.is_file():  # stored in another dtype (`QuantizeConfig.embeddings_dtype`)
            stale.add(table.name)
        for p in export_dir.iterdir():
            if p.is_file() and p.name not in stale and p.name != EXPORT_MANIFEST:
                shutil.copyfile(p, staging / p.name)
        if table.is_file():
            shutil.copyfile(table, staging / table.name)
            _update_embeddings_manifest(staging, table.name)
        for c in quantized:
            copy_graph(qdir / f"{c}.onnx", staging)
            _update_graph_manifest(staging, c, report.components[c])
        _write_json(staging / REPORT_FILE, report.to_dict())
        _write_json(staging / EXPORT_MANIFEST, _export_manifest(export, staging, report))
        check_out_dir(out_dir, overwrite)  # a file may have been put there meanwhile
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_with_float_components(
    quant_dir: Path, export_dir: Path, components: list[str], recipe: dict, out_dir: Path, why: dict
) -> None:
    """A new export folder at `out_dir` (absent): the quantized export `quant_dir` with the
    graphs of `components` taken back from the FP32 export `export_dir` (graph, external data,
    component manifest; for the LLM also its embedding table, which a quantized LLM stores in
    fp16). `export_manifest.json` names `recipe` (the mixed one) and lists every file's sha256;
    `why` is recorded as `float_components`. Staged, then renamed."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists")
    export = json.loads((quant_dir / EXPORT_MANIFEST).read_text())
    fp32 = json.loads((export_dir / EXPORT_MANIFEST).read_text())
    staging = make_staging_dir(out_dir, "writing")
    try:
        taken = set()
        for c in components:
            graph = fp32["graphs"][c]["file"]
            taken |= {graph, f"{graph}.data", fp32["graphs"][c]["manifest"]}
            if c == "llm":
                table = fp32["embeddings"]["file"]
                taken |= {table, f"{Path(table).stem}.manifest.json"}
        for src in (quant_dir, export_dir):
            for p in src.iterdir():
                if (
                    p.is_file()
                    and p.name != EXPORT_MANIFEST
                    and (p.name in taken) == (src == export_dir)
                ):
                    shutil.copyfile(p, staging / p.name)
        out = dict(export)
        out["precision"], out["recipe"] = recipe["name"], recipe
        out["graphs"] = {
            name: {**g, "precision": "fp32"} if name in components else g
            for name, g in export["graphs"].items()
        }
        out["float_components"] = why
        out["files"] = {
            p.name: sha256_file(p)
            for p in sorted(staging.iterdir())
            if p.is_file() and p.name != EXPORT_MANIFEST
        }
        _write_json(staging / EXPORT_MANIFEST, out)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _update_graph_manifest(folder: Path, component: str, rep: ComponentReport) -> None:
    path = folder / f"{component}.manifest.json"
    data = json.loads(path.read_text())
    graph = folder / f"{component}.onnx"
    data_file = Path(f"{graph}.data")
    data["sha256"] = sha256_file(graph)
    data["external_data"] = (
        {"file": data_file.name, "sha256": sha256_file(data_file)} if data_file.is_file() else None
    )
    data["precision"] = rep.precision
    data["quantization"] = {
        "scheme": rep.scheme,
        "sqnr_db": json_db(rep.sqnr_db),
        "sqnr_mode": rep.sqnr_mode,
        "check": rep.check,
        "float_nodes": rep.float_nodes,
        **rep.details,
    }
    _write_json(path, data)


def _update_embeddings_manifest(folder: Path, name: str) -> None:
    path = folder / f"{Path(name).stem}.manifest.json"
    data = json.loads(path.read_text())
    dtype = table_dtype(np.load(folder / name, mmap_mode="r"))
    data.update(sha256=sha256_file(folder / name), dtype=dtype, precision=dtype)
    _write_json(path, data)


def _export_manifest(export: dict, folder: Path, report: QuantizeReport) -> dict[str, Any]:
    out = dict(export)
    out["precision"] = report.recipe["name"]
    out["recipe"] = report.recipe
    out["target"] = report.target
    out["quantized_from"] = {"source": export.get("source"), "files": export["files"]}
    out["graphs"] = {
        name: {**g, "precision": report.components[name].precision}
        for name, g in export["graphs"].items()
    }
    out["files"] = {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != EXPORT_MANIFEST
    }
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    replace_directory(staging, out_dir)  # out_dir was checked to hold only our own files
