"""Export every component of a Citrus-V model into one folder, atomically.

The folder holds `<component>.onnx` + `<component>.manifest.json` for each registered component,
`embeddings.npy` + `embeddings.manifest.json`, `config.json`, `tokenizer.json` (when given) and
`export_manifest.json` listing every file with its sha256. It is written into a temporary folder
beside `out_dir` and renamed into place once every graph has been validated.
"""

from __future__ import annotations

import functools
import gc
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from citrus_edge.atomic import make_staging_dir
from citrus_edge.bundle import replace_directory, sigterm_cleanup

from .embedding_table import write_embeddings
from .export_config import ExportConfig
from .export_manifest import (
    EXPORT_KIND,
    EXPORT_MANIFEST,
    MANIFEST_SCHEMA,
    check_export_out,
    library_versions,
    sha256_file,
    write_json_atomic,
)
from .graph import GraphResult, export_component
from .spec import REGISTRY

if TYPE_CHECKING:
    from torch import nn

    from citrus_edge.modelling.model import CitrusV

log = logging.getLogger(__name__)

BUNDLE_MANIFEST = EXPORT_MANIFEST
DEFAULT_IMAGE_SIZES = ((224, 224), (168, 280), (280, 196))


def check_exportable(cfg) -> None:
    """Refuse, before any work, a config whose graphs could not serve their specs: a vision
    tower of full-attention blocks only never reads the window layout the vision graph takes
    (the trace would drop those inputs, after the LLM was exported)."""
    from citrus_edge.modelling.onnx_trace import UnexportableModelError

    v = cfg.vision
    if set(range(v.depth)) <= set(v.fullatt_block_indexes):
        raise UnexportableModelError(
            f"{cfg.name}: every vision block is full-attention ({list(v.fullatt_block_indexes)} "
            f"of {v.depth}), so the vision graph's window inputs would go unused; keep at least "
            "one windowed block"
        )


def export_all(
    model: CitrusV,
    out_dir: Path,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    *,
    source_hash: str,
    tokenizer_json: Path | None = None,
    opset: int = 17,
    overwrite: bool = False,
    release_weights: bool = False,
) -> dict[str, Any]:
    """Export, validate and describe every component of `model` into `out_dir`.

    Args:
        model: the Citrus-V to export (float32; put in eval mode here).
        out_dir: the folder to create. An existing folder is an error unless `overwrite`, and
            even then only a previous export holding nothing but its listed files is replaced
            (`manifest.check_export_out`, before any work and again before the rename).
        image_sizes: (height, width) pixels, multiples of 28, at whose grids the one vision
            graph is validated.
        source_hash: `manifest.checkpoint_source_hash(checkpoint_dir)` of the weights, or
            `manifest.random_source_hash(config_name)` for a random model.
        tokenizer_json: copied beside the graphs when given.
        opset: ONNX opset (>= 17).
        release_weights: free each part of `model`'s weights once nothing left to export needs
            it (the embedding table once written, each graph's modules once traced and their
            PyTorch outputs on the validation samples computed, before ONNX Runtime loads the
            graph), so the torch weights and a graph's copies are not all held at once (the 8B-width slice:
            the table alone is 2.2 GB). `model` is unusable afterwards: pass a model loaded for
            this call only (`build` does).

    Returns the content of `export_manifest.json`. Raises `ExportValidationError` when a graph
    disagrees with PyTorch, `FileExistsError` (`bundle.OutputFolderError`) for an `out_dir`
    that is not ours to replace; nothing is left at `out_dir` then. On SIGTERM the staging
    folder is removed before the process ends (`bundle.sigterm_cleanup`).
    """
    t0 = time.perf_counter()
    export_cfg = ExportConfig(image_sizes=tuple(image_sizes), opset=opset)
    out_dir = Path(out_dir)
    check_export_out(out_dir, overwrite)
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"tokenizer_json {tokenizer_json} is not a file")
    check_exportable(model.config)
    from . import components  # noqa: F401  (registers every component)

    model.eval()
    with sigterm_cleanup():
        staging = make_staging_dir(out_dir, "exporting")
        try:
            # The table first: no graph reads it (token lookup is on the host).
            embeddings = write_embeddings(model, staging, source_hash)
            if release_weights:
                _release(model, "embeddings")
            results = []
            for name in REGISTRY:
                release = functools.partial(_release, model, name) if release_weights else None
                results.append(
                    export_component(
                        name,
                        model,
                        staging,
                        source_hash=source_hash,
                        export_cfg=export_cfg,
                        release=release,
                    )
                )
            model.config.save(staging / "config.json")
            if tokenizer_json is not None:
                shutil.copyfile(tokenizer_json, staging / "tokenizer.json")
            seconds = time.perf_counter() - t0
            manifest = _bundle_manifest(
                model, staging, results, embeddings, export_cfg, source_hash
            )
            manifest["total_seconds"] = round(seconds, 2)
            write_json_atomic(staging / BUNDLE_MANIFEST, manifest)
            check_export_out(out_dir, overwrite)  # a file may have been put there meanwhile
            _move_into_place(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _log_summary(results, out_dir, seconds)
    return manifest


def _released_modules(model: CitrusV, part: str) -> list[nn.Module]:
    """Modules no later step of `export_all` reads once `part` is done (registry order:
    embeddings, llm, sam_encoder, mask_decoder, vision)."""
    lm = model.mllm.model.language_model
    return {
        "embeddings": [lm.embed_tokens],
        "llm": [lm.layers, lm.norm, model.mllm.lm_head],
        "sam_encoder": [model.sam2.vision_encoder],
        "vision": [model.mllm.model.visual],
    }.get(part, [])


def _release(model: CitrusV, part: str) -> None:
    """Replace the parameters of `part`'s modules by empty tensors, freeing their memory."""
    import torch

    freed = 0
    for module in _released_modules(model, part):
        for p in module.parameters():
            freed += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype)
    gc.collect()
    log.info("%s done: released %.2f GB of torch weights", part, freed / 1e9)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    replace_directory(staging, out_dir)  # out_dir was checked to hold only our own files


def _bundle_manifest(
    model: CitrusV,
    folder: Path,
    results: list[GraphResult],
    embeddings: dict[str, Any],
    export_cfg: ExportConfig,
    source_hash: str,
) -> dict[str, Any]:
    graphs = {
        r.component: {
            "file": r.onnx_path.name,
            "manifest": r.manifest_path.name,
            "max_abs_error": r.max_abs,
            "max_rel_error": r.max_rel,
            "seconds": round(r.seconds, 2),
        }
        for r in results
    }
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": EXPORT_KIND,
        "model_config": model.config.name,
        "model_config_version": model.config.version,
        "source": source_hash,
        "precision": "float32",
        "export_config": export_cfg.to_dict(),
        "versions": library_versions(),
        "graphs": graphs,
        "embeddings": {"file": embeddings["file"], "shape": embeddings["shape"]},
        "files": files,
    }


def _log_summary(results: list[GraphResult], out_dir: Path, seconds: float) -> None:
    for r in results:
        log.info(
            "  %-13s max abs %.2e  max rel %.2e  %6.1f s",
            r.component,
            r.max_abs,
            r.max_rel,
            r.seconds,
        )
    log.info("exported %d graphs to %s in %.1f s", len(results), out_dir, seconds)
