"""Random-weights Citrus-V checkpoints of a preset's widths at chosen depths ("slices").

A slice keeps every width of its preset (hidden sizes, heads, vocabulary, image sizes) and
takes the depths it is given: LLM layers, vision blocks and which of them attend globally
(full attention), Hiera blocks per stage. With the 8B's widths it exercises export, quantization,
engine plans and the runtime at real tensor sizes on a machine that cannot hold the 8B, e.g.
`SliceConfig("citrus-v-8b", llm_layers=1, vision_blocks=2, full_attention=(1,),
hiera_blocks=(1, 2, 3, 1))`: 1.45 B parameters.

The checkpoint is written in the official layout (`checkpoint.save_checkpoint`) with a tokenizer
whose special-token ids are the config's: for the Qwen vocabulary the stand-in of
`tokenizer.build_qwen_standin_tokenizer` (Qwen2.5's ids 151643-151667, `[SEG]` 151665), for the
demo vocabulary the shipped demo model's tokenizer. Random weights: the text it generates is
noise; what it measures is sizes, memory, time and agreement between engines.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from citrus_edge.config import DEMO_TOKENS, PRESETS, QWEN_TOKENS, CitrusVConfig, Sam2Dims

log = logging.getLogger(__name__)

SLICE_CONFIG_VERSION = 1


class SliceError(ValueError):
    """A slice that cannot be built from its preset (unknown preset, depths out of range)."""


@dataclass(frozen=True)
class SliceConfig:
    """Which preset to slice and the depths to keep; `None` keeps the preset's depth.

    `full_attention`: indexes of the vision blocks that attend over the whole image (the rest
    use windows); `None` keeps the preset's indexes below `vision_blocks`, or the last block
    when none is left. Hiera's global-attention blocks are placed at the same relative depth
    in their stage as the preset's (`hiera_global_blocks`).
    """

    preset: str
    llm_layers: int | None = None
    vision_blocks: int | None = None
    full_attention: tuple[int, ...] | None = None
    hiera_blocks: tuple[int, int, int, int] | None = None
    seed: int = 0
    version: int = SLICE_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SliceError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("llm_layers", "vision_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SliceError(f"{name} must be 1 or more, got {value}")
        if self.hiera_blocks is not None and (
            len(self.hiera_blocks) != 4 or min(self.hiera_blocks) < 1
        ):
            raise SliceError(
                f"hiera_blocks must be 4 numbers >= 1 (blocks per Hiera stage), got "
                f"{self.hiera_blocks}"
            )
        depth = self.vision_blocks or PRESETS[self.preset].vision.depth
        bad = [i for i in self.full_attention or () if not 0 <= i < depth]
        if bad:
            raise SliceError(
                f"full-attention blocks {bad} are not vision blocks 0..{depth - 1}; pass "
                "indexes below vision_blocks"
            )
        if self.version != SLICE_CONFIG_VERSION:
            raise SliceError(f"slice config version {self.version} is not {SLICE_CONFIG_VERSION}")

    def model_config(self) -> CitrusVConfig:
        """The preset with these depths (widths, tokens and preprocessing unchanged)."""
        base = PRESETS[self.preset]
        text = dataclasses.replace(base.text, num_layers=self.llm_layers or base.text.num_layers)
        depth = self.vision_blocks or base.vision.depth
        full = self.full_attention
        if full is None:
            full = tuple(i for i in base.vision.fullatt_block_indexes if i < depth) or (depth - 1,)
        vision = dataclasses.replace(
            base.vision, depth=depth, fullatt_block_indexes=tuple(sorted(set(full)))
        )
        blocks = self.hiera_blocks or base.sam2.blocks_per_stage
        sam2 = dataclasses.replace(
            base.sam2,
            blocks_per_stage=tuple(blocks),
            global_attention_blocks=hiera_global_blocks(base.sam2, tuple(blocks)),
        )
        return dataclasses.replace(base, name=self.name, text=text, vision=vision, sam2=sam2)

    @property
    def name(self) -> str:
        """e.g. `citrus-v-8b-slice-l1-v2f1-h1.2.3.1`."""
        cfg = PRESETS[self.preset]
        depth = self.vision_blocks or cfg.vision.depth
        full = "" if self.full_attention is None else "f" + ".".join(map(str, self.full_attention))
        hiera = ".".join(map(str, self.hiera_blocks or cfg.sam2.blocks_per_stage))
        layers = self.llm_layers or cfg.text.num_layers
        return f"{self.preset}-slice-l{layers}-v{depth}{full}-h{hiera}"


def hiera_global_blocks(base: Sam2Dims, blocks: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Global-attention block indexes for Hiera stages of `blocks` blocks.

    Each of `base`'s global blocks keeps its stage and its relative depth in
    it, never the stage's first block (SAM2 does not allow that); a stage of one block has none.
    """
    old = base.blocks_per_stage
    old_starts = [sum(old[:i]) for i in range(4)]
    new_starts = [sum(blocks[:i]) for i in range(4)]
    chosen: set[int] = set()
    for g in base.global_attention_blocks:
        stage = max(i for i in range(4) if old_starts[i] <= g)
        if blocks[stage] < 2:
            continue
        rel = (g - old_starts[stage]) / old[stage]  # in (0, 1)
        offset = min(blocks[stage] - 1, max(1, round(rel * blocks[stage])))
        chosen.add(new_starts[stage] + offset)
    return tuple(sorted(chosen))


def standin_tokenizer_json(cfg: CitrusVConfig, folder: Path) -> Path:
    """Write a tokenizer whose special ids are `cfg.tokens` into `folder`; returns its path."""
    from citrus_edge.modelling.tokenizer_training import build_qwen_standin_tokenizer
    from citrus_edge.tokenizer import QWEN_SPECIALS, load_tokenizer

    path = Path(folder) / "tokenizer.json"
    if cfg.tokens == QWEN_TOKENS:
        need = 151_643 + len(QWEN_SPECIALS)
        if cfg.text.vocab_size < need:
            raise SliceError(
                f"{cfg.name}: vocab_size {cfg.text.vocab_size} cannot hold the Qwen2.5 special "
                f"tokens (ids up to {need - 1}); use vocab_size >= {need}"
            )
        build_qwen_standin_tokenizer().save(str(path))
    elif cfg.tokens == DEMO_TOKENS:
        from citrus_edge.defaults import DEMO_MODEL_DIR

        tok = load_tokenizer(DEMO_MODEL_DIR)
        if tok.get_vocab_size() > cfg.text.vocab_size:
            raise SliceError(
                f"{cfg.name}: vocab_size {cfg.text.vocab_size} is below the demo tokenizer's "
                f"{tok.get_vocab_size()} ids"
            )
        tok.save(str(path))
    else:
        raise SliceError(
            f"{cfg.name}: no stand-in tokenizer for token ids {cfg.tokens}; the slice supports "
            "the Qwen2.5 ids (citrus-v-8b) and the demo ids (citrus-v-demo, citrus-v-tiny)"
        )
    return path


def write_random_checkpoint(cfg: CitrusVConfig, out: Path, seed: int = 0) -> Path:
    """A random-weights `cfg` model with its stand-in tokenizer, saved at `out` (official layout).

    `out` must be new, empty, or a checkpoint `save_checkpoint` wrote (checked before any
    weights are made). Returns `out`.
    """
    from citrus_edge.modelling.checkpoint import check_checkpoint_out, save_checkpoint
    from citrus_edge.modelling.model import build_model

    out = Path(out)
    check_checkpoint_out(out)
    with tempfile.TemporaryDirectory(prefix=".slice-tok-") as tmp:
        tokenizer = standin_tokenizer_json(cfg, Path(tmp))
        model = build_model(cfg, seed=seed)
        log.info("%s: %.3f G random parameters", cfg.name, _count(model) / 1e9)
        save_checkpoint(model, out, tokenizer_json=tokenizer)
    return out


def write_slice(slice_cfg: SliceConfig, out: Path) -> CitrusVConfig:
    """Write the slice's random checkpoint at `out`; returns its model config."""
    cfg = slice_cfg.model_config()
    write_random_checkpoint(cfg, out, seed=slice_cfg.seed)
    return cfg


def _count(model: object) -> int:
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
