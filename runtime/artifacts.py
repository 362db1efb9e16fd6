"""What the runtime reads from a bundle: config, tokenizer, embedding table and component files.

A bundle is what `export.export_all` writes plus the bundle `manifest.json`
(`citrus_edge.bundle.write_manifest`), whose sha256 of every file is checked on load. The file of
each component comes from the bundle manifest's `"components"` mapping
(`name -> {"file": ..., "precision": ...}`) when the bundle has one; a bundle
written straight from an export has none, and then `export_manifest.json` (itself hashed in the
bundle manifest) names the graphs. `citrus_edge.bundle.bundle_components` turns the latter into the
former.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from citrus_edge.bundle import (
    EMBEDDINGS,
    EXPORT_MANIFEST,
    Bundle,
    BundleError,
    components_of_export,
    load_bundle,
)
from citrus_edge.config import CitrusVConfig
from citrus_edge.host_inputs import int8_rows_dtype, table_dtype
from citrus_edge.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
GRAPHS = ("vision", "llm", "sam_encoder", "mask_decoder")
# Tokens the prompt builder writes as text: their ids must be the config's.
PROMPT_TOKENS = {
    "image": "<|image_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


@dataclass(frozen=True)
class BundleArtifacts:
    """A verified bundle opened for the runtime."""

    bundle: Bundle
    config: CitrusVConfig
    tokenizer: Tokenizer
    embeddings: np.ndarray  # memory-mapped: [V, H] float32 / float16, or [V] int8 rows
    components: dict[str, dict[str, Any]]

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    def graph_file(self, component: str) -> Path:
        """The ONNX graph of `component` in the bundle (listed, hence hashed, in its manifest)."""
        return self.bundle.file(self.components[component]["file"])


def _components(bundle: Bundle) -> dict[str, dict[str, Any]]:
    if "components" in bundle.manifest:
        components = dict(bundle.manifest["components"])
        source = "the bundle manifest"
    else:
        export = json.loads(bundle.file(EXPORT_MANIFEST).read_text())
        components = components_of_export(export)
        source = EXPORT_MANIFEST
    missing = [n for n in (*GRAPHS, EMBEDDINGS) if n not in components]
    if missing:
        raise BundleError(f"{bundle.path}: {source} names no {missing} component(s)")
    log.debug("%s: component files from %s", bundle.path, source)
    return components


def _check_tokens(tokenizer: Tokenizer, config: CitrusVConfig, path: Path) -> None:
    for field, text in PROMPT_TOKENS.items():
        expected, found = getattr(config.tokens, field), tokenizer.token_to_id(text)
        if found != expected:
            raise BundleError(
                f"{path}: tokenizer.json maps {text} to {found}, config.json says {expected}; "
                "the tokenizer does not belong to this model"
            )


def _load_embeddings(path: Path, config: CitrusVConfig) -> np.ndarray:
    try:  # the 8B's table is 2 GiB: map it, read rows on use
        table = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as e:
        raise BundleError(f"{path}: not a readable .npy embedding table ({e})") from e
    vocab, hidden = config.text.vocab_size, config.text.hidden_size
    # float16 or int8 rows where the LLM was quantized
    # (`compress.settings.QuantizeConfig.embeddings_dtype`); rows become float32 on lookup
    # (`host_inputs.embed`).
    if table.dtype.names:
        ok = table.shape == (vocab,) and table.dtype == int8_rows_dtype(hidden)
    else:
        ok = table.shape == (vocab, hidden) and table.dtype in (np.float32, np.float16)
    if not ok:
        raise BundleError(
            f"{path}: embedding table is {table_dtype(table)} {table.shape}, config says "
            f"float32 or float16 {(vocab, hidden)} or int8 rows ({vocab},) of {hidden}"
        )
    return table


def open_bundle(path: Path, verify: bool = True) -> BundleArtifacts:
    """Verify (sha256 of every file) and open a bundle; raises `BundleError` naming the file."""
    bundle = load_bundle(Path(path), verify=verify)
    config = CitrusVConfig.load(bundle.file(CONFIG_FILE))
    tokenizer = load_tokenizer(bundle.file(TOKENIZER_FILE))
    _check_tokens(tokenizer, config, bundle.path)
    components = _components(bundle)
    embeddings = _load_embeddings(bundle.file(components[EMBEDDINGS]["file"]), config)
    return BundleArtifacts(bundle, config, tokenizer, embeddings, components)
