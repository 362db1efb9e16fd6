"""The token embedding table, written beside the graphs as `embeddings.npy`.

Token embedding lookup and image splicing stay on the host (`citrus_edge.host_inputs`), reading
this table; the runtime then needs no torch. The LLM step graph itself is described in
`citrus_edge.component_specs.llm_spec` and traced from
`citrus_edge.modelling.export_wrappers.LlmStepExport`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .export_manifest import (
    MANIFEST_SCHEMA,
    library_versions,
    manifest_path,
    sha256_file,
    write_json_atomic,
)

if TYPE_CHECKING:
    from citrus_edge.modelling.model import CitrusV

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"


def write_embeddings(model: CitrusV, out_dir: Path, source_hash: str) -> dict[str, Any]:
    """Write the token embedding table as `embeddings.npy` (float32 [V, H]) with its manifest.

    The runtime looks tokens up in numpy (`host_inputs.embed`) and splices image features
    before calling the LLM graph. Returns the manifest.
    """
    table = model.mllm.model.language_model.embed_tokens.weight.detach().float().numpy()
    path = Path(out_dir) / EMBEDDINGS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(table, dtype=np.float32))
    tmp.replace(path)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kind": "embeddings",
        "component": "embeddings",
        "file": path.name,
        "sha256": sha256_file(path),
        "shape": list(table.shape),
        "dtype": "float32",
        "precision": "float32",
        "model_config": model.config.name,
        "source": source_hash,
        "versions": library_versions(),
    }
    write_json_atomic(manifest_path(path), manifest)
    log.info("embeddings: wrote %s %s", path.name, table.shape)
    return manifest
