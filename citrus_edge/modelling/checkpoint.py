"""Load and save Citrus-V in the official checkpoint layout.

Keys: `mllm.model.language_model.*`, `mllm.model.visual.*`, `mllm.lm_head.weight` (the
transformers Qwen2.5-VL names under `mllm.`), `grounding_encoder.sam2_model.*` (original
facebookresearch SAM2 names, mapped onto transformers' `Sam2Model`) and `seg_projector.*`.
A small model written here goes through exactly the path the 8B checkpoint takes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from citrus_edge.atomic import make_staging_dir, umask_mode
from citrus_edge.bundle import foreign_entries, replace_directory
from citrus_edge.config import CitrusVConfig
from citrus_edge.modelling.model import CitrusV
from citrus_edge.modelling.sam2_keys import hf_to_original, original_to_hf

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
        state.update(read_safetensors(path / shard))
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.safetensors` file, read straight into their own memory.

    Plain reads, no memory map: the file's pages stay in the page cache, not in this process
    (safetensors' `load_file` maps the file and copies out of it, so a checkpoint is resident
    twice while it loads: 2 x 34 GB for the 8B). Raises `CheckpointError` for a malformed file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        state = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            state[name] = _read_tensor(fh, 8 + n, name, info, path)
    return state


def _read_tensor(fh, base: int, name: str, info: dict, path: Path) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if end - begin != nbytes:
        raise CheckpointError(f"{path}: {name} holds {end - begin} bytes, {shape} needs {nbytes}")
    buf = torch.empty(nbytes, dtype=torch.uint8)
    fh.seek(base + begin)
    view, done = memoryview(buf.numpy()), 0
    while done < nbytes:
        got = fh.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{path}: truncated at {name}; the file is incomplete")
        done += got
    return buf.view(dtype).reshape(shape)


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
    result = module.load_state_dict(state, strict=False, assign=True)
    problems = [f"missing {prefix}{k}" for k in result.missing_keys]
    problems += [f"unexpected {prefix}{k}" for k in result.unexpected_keys]
    if problems:
        raise CheckpointError(f"{path}: checkpoint keys do not match the model: {problems[:30]}")


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> CitrusV:
    """Build a `CitrusV` from `config.json` and load the weights; any key mismatch is an error."""
    path = Path(path)
    cfg = CitrusVConfig.load(path / "config.json")
    # Parameters are made on the meta device (no memory, no random init) and the checkpoint's
    # tensors are assigned in their place, so one copy of the weights is ever held (the 8B: 34
    # GB fp32, not 68). Buffers stay on the CPU: non-persistent ones such as rotary tables are
    # computed by transformers itself.
    with _parameters_on_meta():
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
    if cfg.text.tie_word_embeddings:
        model.mllm.tie_weights()  # assigned tensors are separate; make lm_head the table again
    return model.to(dtype).eval()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (buffers unchanged)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def state_dict_official(model: CitrusV) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names (detached, contiguous tensors).

    Tensors are the model's own where possible, not copies (one copy of the 8B's weights is 34
    GB); one that shares storage with an earlier one (tied weights) is cloned, since safetensors
    stores no shared tensors. Clone before changing the model if the values must not follow.
    """
    out = {MLLM + k: v for k, v in model.mllm.state_dict().items()}
    out.update({SAM2 + k: v for k, v in hf_to_original(model.sam2.state_dict()).items()})
    out.update({PROJ + k: v for k, v in model.seg_projector.state_dict().items()})
    seen: set[int] = set()
    result = {}
    for k, v in out.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        result[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return result


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


def check_checkpoint_out(path: Path) -> None:
    """Raise `CheckpointError` unless `save_checkpoint` may write `path` (new, empty, or a
    checkpoint it wrote); call it before making weights that would otherwise be lost."""
    _check_replaceable(Path(path))


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
