"""Typed, versioned configuration of a Citrus-V model (torch-free).

`CitrusVConfig` mirrors the official Citrus-V `config.json` (`model_type: citrus_v`,
`seg_token_idx`, `text_config`, `vision_config`, `grounding_encoder_config`, ...) and converts to
the transformers configs of the two halves. Presets are named constants; derive variants with
`dataclasses.replace`, never by mutating a preset.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citrus_edge.preprocess import PreprocessConfig

CONFIG_VERSION = 1


@dataclass(frozen=True)
class TextDims:
    """The Qwen2.5 language model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"text: heads {self.num_heads}/{self.num_kv_heads} do not divide")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"text: mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )


@dataclass(frozen=True)
class VisionDims:
    """The Qwen2.5-VL vision transformer and patch merger."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    # The patch merger's MLP width; None: Qwen2.5-VL's, hidden_size * spatial_merge_size**2
    # (a pruned student keeps fewer channels; written to config.json only when set).
    merger_intermediate_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_size(self) -> int:
        """Width of the merger's input: 2x2 neighbouring patches concatenated."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def merger_width(self) -> int:
        """The merger MLP's hidden width."""
        return self.merger_intermediate_size or self.merged_size

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision: {self.num_heads} heads do not divide {self.hidden_size}")
        if any(i >= self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"vision: full-attention blocks {self.fullatt_block_indexes} >= depth")


@dataclass(frozen=True)
class Sam2Dims:
    """SAM2: Hiera image encoder, FPN neck, prompt encoder and mask decoder."""

    image_size: int
    embed_dim_per_stage: tuple[int, int, int, int]
    heads_per_stage: tuple[int, int, int, int]
    blocks_per_stage: tuple[int, int, int, int]
    global_attention_blocks: tuple[int, ...]
    window_size_per_stage: tuple[int, int, int, int]
    window_pos_embed_bkg: tuple[int, int] = (7, 7)
    hidden_size: int = 256  # FPN, prompt encoder and mask decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256

    def validate(self) -> None:
        starts = [sum(self.blocks_per_stage[:i]) for i in range(4)]
        bad = [b for b in self.global_attention_blocks if b in starts]
        if bad:
            raise ValueError(
                f"sam2: global-attention blocks {bad} open a Hiera stage (not allowed)"
            )
        if self.image_size % 32:
            raise ValueError(f"sam2: image_size {self.image_size} must be a multiple of 32")


@dataclass(frozen=True)
class TokenIds:
    """Special token ids; they must agree with the tokenizer shipped beside the weights."""

    seg: int
    image: int
    video: int
    vision_start: int
    vision_end: int
    eos: int
    pad: int


@dataclass(frozen=True)
class CitrusVConfig:
    """A whole Citrus-V model: Qwen2.5-VL + SAM2 + seg projector."""

    name: str
    text: TextDims
    vision: VisionDims
    sam2: Sam2Dims
    tokens: TokenIds
    projector: str = "mlp"  # "mlp" (Linear-ReLU-Linear, released 8B) or "residual"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.text.validate()
        self.vision.validate()
        self.sam2.validate()
        if self.projector not in ("mlp", "residual"):
            raise ValueError(f"projector must be 'mlp' or 'residual', got {self.projector!r}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError("vision.out_hidden_size must equal text.hidden_size")
        if self.preprocess.sam_image_size != self.sam2.image_size:
            raise ValueError("preprocess.sam_image_size must equal sam2.image_size")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not {CONFIG_VERSION}")

    # -- official config.json -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The official-looking `config.json` content (plus our preprocessing block)."""
        t = self.tokens
        return {
            "model_type": "citrus_v",
            "architectures": ["CitrusVForConditionalGeneration"],
            "citrus_edge_config_version": self.version,
            "name": self.name,
            "seg_token_idx": t.seg,
            "image_token_id": t.image,
            "video_token_id": t.video,
            "vision_start_token_id": t.vision_start,
            "vision_end_token_id": t.vision_end,
            "eos_token_id": t.eos,
            "pad_token_id": t.pad,
            "projector_type": self.projector,
            "text_config": dataclasses.asdict(self.text),
            "vision_config": {
                k: v
                for k, v in dataclasses.asdict(self.vision).items()
                if not (k == "merger_intermediate_size" and v is None)
            },
            "grounding_encoder_config": dataclasses.asdict(self.sam2),
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CitrusVConfig:
        if d.get("model_type") != "citrus_v":
            raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'citrus_v'")

        def tup(dc: type, raw: dict) -> Any:
            names = {f.name for f in dataclasses.fields(dc)}
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"{dc.__name__}: unknown fields {sorted(unknown)}")
            return dc(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

        return cls(
            name=d.get("name", "citrus_v"),
            text=tup(TextDims, d["text_config"]),
            vision=tup(VisionDims, d["vision_config"]),
            sam2=tup(Sam2Dims, d["grounding_encoder_config"]),
            tokens=TokenIds(
                seg=d["seg_token_idx"],
                image=d["image_token_id"],
                video=d["video_token_id"],
                vision_start=d["vision_start_token_id"],
                vision_end=d["vision_end_token_id"],
                eos=d["eos_token_id"],
                pad=d["pad_token_id"],
            ),
            projector=d.get("projector_type", "mlp"),
            preprocess=PreprocessConfig(**d.get("preprocess", {})),
            version=d.get("citrus_edge_config_version", CONFIG_VERSION),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CitrusVConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid Citrus-V config: {e}") from e


# -- presets ------------------------------------------------------------------------------
# Token ids of the Qwen2.5 tokenizer (the 8B appends [SEG] after the Qwen vocabulary).
QWEN_TOKENS = TokenIds(
    seg=151665,
    image=151655,
    video=151656,
    vision_start=151652,
    vision_end=151653,
    eos=151645,
    pad=151643,
)

# Citrus-V 8B: Qwen2.5-VL-7B dims + SAM2 Hiera-L. For planning and loading; never built here.
CITRUS_V_8B = CitrusVConfig(
    name="citrus-v-8b",
    text=TextDims(
        vocab_size=151_668,
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
    ),
    vision=VisionDims(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
    ),
    sam2=Sam2Dims(
        image_size=1024,
        embed_dim_per_stage=(144, 288, 576, 1152),
        heads_per_stage=(2, 4, 8, 16),
        blocks_per_stage=(2, 6, 36, 4),
        global_attention_blocks=(23, 33, 43),
        window_size_per_stage=(8, 4, 16, 8),
    ),
    tokens=QWEN_TOKENS,
    preprocess=PreprocessConfig(max_pixels=65535, sam_image_size=1024),
)

# Token ids of the demo tokenizer (citrus_edge/tokenizer.py puts the specials first).
DEMO_TOKENS = TokenIds(seg=10, image=5, video=6, vision_start=3, vision_end=4, eos=1, pad=0)

DEMO_SIDE = 336  # the demo model's vision input side, in pixels

# The shipped demo model: the same architecture at CPU size (see README for the reasoning).
# Small rope_theta and a spatial-heavy mrope_section so image rows/columns rotate visibly.
DEMO = CitrusVConfig(
    name="citrus-v-demo",
    text=TextDims(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=20.0,
        mrope_section=(2, 6, 8),
        max_position_embeddings=1024,
    ),
    vision=VisionDims(
        depth=4,
        hidden_size=96,
        intermediate_size=384,
        num_heads=4,
        out_hidden_size=128,
        fullatt_block_indexes=(1, 3),
    ),
    sam2=Sam2Dims(
        image_size=256,
        embed_dim_per_stage=(16, 32, 64, 128),
        heads_per_stage=(1, 1, 2, 4),
        blocks_per_stage=(1, 1, 2, 1),
        global_attention_blocks=(3,),
        window_size_per_stage=(8, 4, 4, 4),
        hidden_size=128,
        decoder_mlp_dim=512,
        decoder_heads=4,
        iou_head_hidden_dim=128,
    ),
    tokens=DEMO_TOKENS,
    # Every image becomes ~336x336 (144 visual tokens; a 256-px phantom is upsampled): stages
    # 1-4 trained at 224x224 (64 tokens), stages 5-7 at this size (see compress.demo_model).
    preprocess=PreprocessConfig(
        min_pixels=DEMO_SIDE * DEMO_SIDE, max_pixels=DEMO_SIDE * DEMO_SIDE, sam_image_size=256
    ),
)

# A tiny random model for fast tests.
TINY = dataclasses.replace(
    DEMO,
    name="citrus-v-tiny",
    text=dataclasses.replace(
        DEMO.text,
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        num_kv_heads=1,
        mrope_section=(4, 6, 6),
    ),
    vision=dataclasses.replace(
        DEMO.vision,
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    ),
    sam2=dataclasses.replace(
        DEMO.sam2, hidden_size=32, decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32
    ),
    # At most 224x224 (64 visual tokens): small inputs keep the tests fast.
    preprocess=dataclasses.replace(DEMO.preprocess, min_pixels=3136, max_pixels=224 * 224),
)

PRESETS: dict[str, CitrusVConfig] = {c.name: c for c in (CITRUS_V_8B, DEMO, TINY)}
