"""Load and save Citrus-V in the official checkpoint layout.

Keys: `mllm.model.language_model.*`, `mllm.model.visual.*`, `mllm.lm_head.weight` (the
transformers Qwen2.5-VL names under `mllm.`), `grounding_encoder.sam2_model.*` (original
facebookresearch SAM2 names, mapped onto transformers' `Sam2Model`) and `seg_projector.*`.
A small model written here goes through exactly the path the 8B checkpoint takes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from citrus_edge.atomic import make_staging_dir, umask_mode
from citrus_edge.bundle import foreign_entries, replace_directory
from citrus_edge.config import CitrusVConfig
from citrus_edge.model import CitrusV
from citrus_edge.sam2_keys import hf_to_original, original_to_hf

log = logging.getLogger(__name__)

MLLM, SAM2, PROJ = "mllm.", "grounding_encoder.sam2_model.", "seg_projector."
INDEX = "model.safetensors.index.json"
SAVED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what save_checkpoint writes


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the Citrus-V layout."""


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def _split(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict, dict]:
    parts: tuple[dict, dict, dict] = ({}, {}, {})
    stray = []
    for k, v in state.items():
        for prefix, part in zip((MLLM, SAM2, PROJ), parts, strict=True):
            if k.startswith(prefix):
                part[k[len(prefix) :]] = v
                break
        else:
            stray.append(k)
    if stray:
        raise CheckpointError(f"{path}: unexpected keys outside mllm/SAM2/projector: {stray[:20]}")
    return parts


def _load_part(module: torch.nn.Module, state: dict, prefix: str, path: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = [f"missing {prefix}{k}" for k in result.missing_keys]
    problems += [f"unexpected {prefix}{k}" for k in result.unexpected_keys]
    if problems:
        raise CheckpointError(f"{path}: checkpoint keys do not match the model: {problems[:30]}")


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> CitrusV:
    """Build a `CitrusV` from `config.json` and load the weights; any key mismatch is an error."""
    path = Path(path)
    cfg = CitrusVConfig.load(path / "config.json")
    # Built on the CPU (not meta) so non-persistent buffers such as rotary tables are computed
    # by transformers itself; the weights are then replaced by the checkpoint's.
    model = CitrusV(cfg)
    mllm, sam_original, proj = _split(_read_tensors(path), path)
    try:
        sam_hf, unused = original_to_hf(sam_original)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if unused:
        log.info("%s: %d SAM2 video-memory tensors are unused in image mode", path, len(unused))
    _load_part(model.mllm, mllm, MLLM, path)
    _load_part(model.sam2, sam_hf, SAM2, path)
    _load_part(model.seg_projector, proj, PROJ, path)
    return model.to(dtype).eval()


def state_dict_official(model: CitrusV) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names."""
    out = {MLLM + k: v for k, v in model.mllm.state_dict().items()}
    out.update({SAM2 + k: v for k, v in hf_to_original(model.sam2.state_dict()).items()})
    out.update({PROJ + k: v for k, v in model.seg_projector.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_checkpoint(model: CitrusV, path: Path, tokenizer_json: Path | None = None) -> None:
    """Write `config.json` + `model.safetensors` (+ tokenizer) atomically into directory `path`.

    An existing `path` is replaced only when it is empty or a checkpoint this function wrote
    (`config.json` and nothing but `SAVED_FILES`); otherwise `CheckpointError` names the files
    that would be lost. Modes follow the umask.
    """
    path = Path(path)
    _check_replaceable(path)
    tmp = make_staging_dir(path, "saving")
    try:
        model.config.save(tmp / "config.json")
        weights = tmp / "model.safetensors"
        save_file(state_dict_official(model), str(weights), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
        for f in tmp.iterdir():
            os.chmod(f, umask_mode(0o666))
        _check_replaceable(path)  # a file may have been put there meanwhile
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_replaceable(path: Path) -> None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; choose a new directory")
    stray = foreign_entries(path, SAVED_FILES)
    if not (path / "config.json").is_file() or stray:
        raise CheckpointError(
            f"refusing to replace {path}: it is not a checkpoint save_checkpoint wrote (it "
            f"holds {stray or 'no config.json'}); choose a new directory or move them away"
        )
