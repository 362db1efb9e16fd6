"""Which parts of a teacher Citrus-V a distillation student keeps (torch-free).

A `StudentSpec` names, by the teacher's own indexes, the LLM decoder layers, vision-tower blocks
and SAM2 Hiera blocks the student keeps, and the fraction of each LLM MLP's channels; and,
optionally, narrower widths for three parts: the vision tower (`vision-hidden`, `vision-heads`,
`vision-mlp`), SAM2's prompt side (`sam-hidden`, `sam-decoder-mlp`: the FPN neck's output,
prompt encoder, mask decoder and the seg projector's output) and the Hiera stages
(`hiera-width`). Every other width (LLM hidden size and heads, vocabulary) is the teacher's, so
those weights carry over unchanged (`citrus_edge.modelling.student.make_student` copies them
where shapes allow, slices the pruned ones and initialises the re-widened parts afresh).
`student_config` turns a spec into the student's `CitrusVConfig`, checking it against the
teacher first.

CLI form (`StudentSpec.parse`): a preset name from `STUDENT_PRESETS`, or `key=value` pairs
separated by `;`, e.g. `llm-layers=0,3;vision-blocks=1,3;hiera=1,1,1,1;llm-mlp=0.5`.
Keys: `llm-layers` and `vision-blocks` (teacher indexes, increasing; `a-b` is the inclusive
range; `all` keeps every one), `llm-mlp` (fraction of MLP channels kept, in (0, 1]), `hiera`
(blocks kept per Hiera stage, four numbers: each stage's first blocks), `hiera-width` (fraction
of every Hiera stage's channels kept, in (0, 1]; below), `name`.
Width keys (all optional; a width equal to the teacher's changes nothing):
- `vision-hidden` (vision-tower width, an integer), `vision-heads` (its attention heads;
  default the teacher's number), `vision-mlp` (fraction of the teacher's MLP expansion
  intermediate/hidden kept, in (0, 1]; the tower's MLP gets round(vision-mlp * teacher's
  ratio * vision-hidden) channels), `merger-mlp` (fraction of the teacher's patch-merger MLP
  channels kept, in (0, 1], at the student's width). The merger's output stays the LLM's hidden size.
- `sam-hidden` (width of SAM2's FPN-neck output, prompt encoder and mask decoder, a multiple of
  8 whose half the decoder's heads divide), `sam-decoder-mlp` (fraction of the teacher's mask-
  decoder MLP expansion kept, in (0, 1]); the IoU head's hidden width keeps the teacher's
  ratio to `sam-hidden`.
- `hiera-width`: each stage's width becomes round(hiera-width * the teacher's) to a multiple of
  its heads (the teacher's number; each head narrows), the MLPs keep the teacher's ratio.
  Unlike the re-widened parts below, a narrower Hiera is Minitron-pruned: every stage keeps the
  teacher's highest-scoring residual channels, each head its highest-scoring query/key and value
  channels, each MLP its highest-scoring hidden channels (`citrus_edge.modelling.student
  .hiera_channels`), so the encoder starts from the teacher's weights. SAM2-S/T/B+ are Hiera-L's
  family at other widths (Hiera-S: 96 channels in stage 1 against Hiera-L's 144).
A tower whose width or heads differ from the teacher's, or a SAM2 side whose width differs, is
a different function, not a slice of the teacher's (a narrower residual stream changes every
matrix in it), so `make_student` initialises it afresh rather than cutting the teacher's
tensors; the `vision-blocks` then only set its depth and attention kinds. MLP fractions at the
teacher's width (`llm-mlp`, `vision-mlp`, `merger-mlp`) are Minitron-pruned instead: the kept
channels are the teacher's, so the part starts as a close approximation of the teacher's.

Not in a spec, with the reason:
- Attention-head pruning of the LLM (`llm_heads`): in `TextDims` the head size is derived
  (`hidden_size // num_heads`) and mrope_section must sum to half of it, so fewer heads at the
  same hidden size would change the head size of every kept head; a correct GQA head pruning
  (whole KV groups, or query heads evenly per group, keeping head_dim) needs an explicit
  `head_dim` in `TextDims` (citrus_edge/config.py) and in `model.qwen_config`.
- Hidden-size (embedding-channel) pruning: Qwen2.5-VL-3B's widths (hidden 2048, 16 heads,
  2 KV heads, MLP 11008, 36 layers) are a different model family member, not a subset of the
  7B's: the hidden size shrinks (every matrix, the embeddings, the merger's output and the seg
  projector's input change) and it has more layers (36) than the 7B (28), so it is not a depth
  or MLP pruning. The closest expressible preset, "8b-half-layers-3b-mlp", takes the 3B's MLP
  width (11008 of 18944 channels) on half the 7B's layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from citrus_edge.config import CitrusVConfig, Sam2Dims


class StudentSpecError(ValueError):
    """A student spec that cannot be parsed or does not fit its teacher."""


@dataclass(frozen=True)
class StudentSpec:
    """What a student keeps of its teacher; `None` keeps everything of that part."""

    llm_layers: tuple[int, ...] | None = None  # teacher decoder-layer indexes, increasing
    llm_mlp: float = 1.0  # fraction of each LLM MLP's intermediate channels kept
    vision_blocks: tuple[int, ...] | None = None  # teacher vision-tower block indexes
    hiera_blocks: tuple[int, int, int, int] | None = None  # first blocks kept per Hiera stage
    hiera_width: float = 1.0  # fraction of every Hiera stage's channels kept
    vision_hidden: int | None = None  # vision-tower width (None: the teacher's)
    vision_heads: int | None = None  # vision-tower heads (None: the teacher's number)
    vision_mlp: float = 1.0  # fraction of the teacher's vision MLP expansion (intermediate/hidden)
    sam_hidden: int | None = None  # SAM2 neck output / prompt encoder / mask decoder width
    sam_decoder_mlp: float = 1.0  # fraction of the teacher's mask-decoder MLP expansion
    merger_mlp: float = 1.0  # fraction of the vision merger's MLP channels kept
    name: str = "student"

    @classmethod
    def parse(cls, text: str) -> StudentSpec:
        """A preset name or `key=value;...` (module docstring); `StudentSpecError` if bad."""
        raw = text.strip()
        if raw in STUDENT_PRESETS:
            return STUDENT_PRESETS[raw]
        if "=" not in raw:
            raise StudentSpecError(
                f"student spec {text!r}: not a preset ({', '.join(sorted(STUDENT_PRESETS))}) "
                "and not key=value pairs (e.g. 'llm-layers=0,3;llm-mlp=0.5')"
            )
        fields: dict[str, object] = {}
        for part in filter(None, (p.strip() for p in raw.split(";"))):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or not value:
                raise StudentSpecError(f"student spec {text!r}: {part!r} is not key=value")
            field = _KEYS.get(key)
            if field is None:
                raise StudentSpecError(
                    f"student spec {text!r}: unknown key {key!r}; use {', '.join(_KEYS)}"
                )
            if field in fields:
                raise StudentSpecError(f"student spec {text!r}: {key!r} given twice")
            try:
                fields[field] = _parse_value(field, value)
            except ValueError as e:
                raise StudentSpecError(f"student spec {text!r}: {key}={value!r}: {e}") from None
        if "name" not in fields:
            fields["name"] = _auto_name(fields)
        spec = cls(**fields)  # type: ignore[arg-type]
        try:
            spec.check_form()
        except StudentSpecError as e:
            raise StudentSpecError(f"student spec {text!r}: {e}") from None
        return spec

    def check_form(self) -> None:
        """Checks that need no teacher: non-empty, increasing indexes, fraction in (0, 1]."""
        for label, idx in (("llm-layers", self.llm_layers), ("vision-blocks", self.vision_blocks)):
            if idx is None:
                continue
            if not idx:
                raise StudentSpecError(f"{label}: keep at least one")
            if min(idx) < 0 or any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
                raise StudentSpecError(
                    f"{label} {list(idx)}: indexes must be >= 0, increasing, without repeats"
                )
        for label, frac in (
            ("llm-mlp", self.llm_mlp),
            ("vision-mlp", self.vision_mlp),
            ("sam-decoder-mlp", self.sam_decoder_mlp),
            ("merger-mlp", self.merger_mlp),
            ("hiera-width", self.hiera_width),
        ):
            if not 0.0 < frac <= 1.0:
                raise StudentSpecError(f"{label} {frac}: must be in (0, 1]")
        for label, n in (
            ("vision-hidden", self.vision_hidden),
            ("vision-heads", self.vision_heads),
            ("sam-hidden", self.sam_hidden),
        ):
            if n is not None and n < 1:
                raise StudentSpecError(f"{label} {n}: must be >= 1")
        if self.hiera_blocks is not None and (
            len(self.hiera_blocks) != 4 or min(self.hiera_blocks) < 1
        ):
            raise StudentSpecError(
                f"hiera {self.hiera_blocks}: 4 numbers >= 1 (blocks kept per Hiera stage)"
            )
        if not self.name or any(c.isspace() or c in "/;=" for c in self.name):
            raise StudentSpecError(f"name {self.name!r}: non-empty, no spaces, '/', ';' or '='")

    # Methods, so that `citrus_edge.modelling.student` can use them on the spec it is given
    # without importing this stage (the modelling may not import compress: a folder cycle).
    def student_config(self, teacher: CitrusVConfig) -> CitrusVConfig:
        """`student_config(teacher, self)`."""
        return student_config(teacher, self)

    def hiera_kept(self, teacher: CitrusVConfig) -> tuple[int, ...]:
        """Teacher Hiera block indexes this student keeps, in order."""
        return hiera_kept(teacher.sam2, self.hiera_blocks or teacher.sam2.blocks_per_stage)

    def text(self) -> str:
        """The CLI form that parses back to this spec."""
        parts = []
        if self.llm_layers is not None:
            parts.append("llm-layers=" + ",".join(map(str, self.llm_layers)))
        if self.llm_mlp != 1.0:
            parts.append(f"llm-mlp={self.llm_mlp!r}")
        if self.vision_blocks is not None:
            parts.append("vision-blocks=" + ",".join(map(str, self.vision_blocks)))
        if self.hiera_blocks is not None:
            parts.append("hiera=" + ",".join(map(str, self.hiera_blocks)))
        if self.hiera_width != 1.0:
            parts.append(f"hiera-width={self.hiera_width!r}")
        for key, value in (
            ("vision-hidden", self.vision_hidden),
            ("vision-heads", self.vision_heads),
            ("sam-hidden", self.sam_hidden),
        ):
            if value is not None:
                parts.append(f"{key}={value}")
        for key, frac in (
            ("vision-mlp", self.vision_mlp),
            ("sam-decoder-mlp", self.sam_decoder_mlp),
            ("merger-mlp", self.merger_mlp),
        ):
            if frac != 1.0:
                parts.append(f"{key}={frac!r}")
        parts.append(f"name={self.name}")
        return ";".join(parts)


_KEYS = {
    "llm-layers": "llm_layers",
    "llm-mlp": "llm_mlp",
    "vision-blocks": "vision_blocks",
    "hiera": "hiera_blocks",
    "hiera-blocks": "hiera_blocks",
    "hiera-width": "hiera_width",
    "vision-hidden": "vision_hidden",
    "vision-heads": "vision_heads",
    "vision-mlp": "vision_mlp",
    "sam-hidden": "sam_hidden",
    "sam-decoder-mlp": "sam_decoder_mlp",
    "merger-mlp": "merger_mlp",
    "name": "name",
}
_FRACTIONS = ("llm_mlp", "vision_mlp", "sam_decoder_mlp", "merger_mlp", "hiera_width")
_WIDTHS = ("vision_hidden", "vision_heads", "sam_hidden")


def _parse_value(field: str, value: str) -> object:
    if field == "name":
        return value
    if field in _FRACTIONS:
        try:
            return float(value)
        except ValueError:
            raise ValueError("not a number") from None
    if field in _WIDTHS:
        if not value.isdigit():
            raise ValueError("not a whole number")
        return int(value)
    if value == "all" and field != "hiera_blocks":
        return None
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        lo, dash, hi = item.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            raise ValueError(f"{item!r} is not an index or a range a-b")
        if dash and int(hi) < int(lo):
            raise ValueError(f"range {item!r} runs backwards")
        out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    return tuple(out)


def _auto_name(fields: dict[str, object]) -> str:
    """e.g. `l0.3-m0.5-v1.3-h1.1.1.1` from the fields given."""
    parts = []
    for prefix, field in (("l", "llm_layers"), ("v", "vision_blocks"), ("h", "hiera_blocks")):
        value = fields.get(field)
        if value is not None:
            parts.append(prefix + ".".join(map(str, value)))  # type: ignore[arg-type]
    for prefix, field in (
        ("m", "llm_mlp"),
        ("vh", "vision_hidden"),
        ("vn", "vision_heads"),
        ("vm", "vision_mlp"),
        ("sh", "sam_hidden"),
        ("sm", "sam_decoder_mlp"),
        ("mg", "merger_mlp"),
        ("hw", "hiera_width"),
    ):
        if field in fields:
            parts.append(f"{prefix}{fields[field]}")
    return "-".join(parts) or "student"


def student_config(teacher: CitrusVConfig, spec: StudentSpec) -> CitrusVConfig:
    """The student's config: the teacher's, with the kept depths and MLP width of `spec`.

    Vision blocks keep their attention kind (full or windowed), so the full-attention indexes
    are the kept full-attention blocks' new positions; if none is kept, the last kept block
    attends fully (every Qwen2.5-VL tower attends globally at least once, as in the slice).
    Hiera keeps each stage's first blocks (the first carries the stage's width change and
    pooling); a kept global-attention block stays global, and a stage that had global blocks
    but keeps none of them makes its last kept block global (never a stage's first block).
    Raises `StudentSpecError` naming what does not fit the teacher.
    """
    spec.check_form()
    t, v, s = teacher.text, teacher.vision, teacher.sam2
    where = f"student {spec.name!r} of {teacher.name}"
    text = t
    if spec.llm_layers is not None:
        _in_range(spec.llm_layers, t.num_layers, "llm-layers", "decoder layers", where)
        text = dataclasses.replace(text, num_layers=len(spec.llm_layers))
    if spec.llm_mlp != 1.0:
        text = dataclasses.replace(text, intermediate_size=mlp_channels(t.intermediate_size, spec))
    vision = v
    if spec.vision_blocks is not None:
        kept = spec.vision_blocks
        _in_range(kept, v.depth, "vision-blocks", "vision blocks", where)
        full = tuple(i for i, b in enumerate(kept) if b in v.fullatt_block_indexes)
        vision = dataclasses.replace(
            v, depth=len(kept), fullatt_block_indexes=full or (len(kept) - 1,)
        )
    vision = _vision_widths(vision, v, spec, where)
    sam2 = s
    if spec.hiera_blocks is not None:
        over = [
            f"stage {i}: {n} > {m}"
            for i, (n, m) in enumerate(zip(spec.hiera_blocks, s.blocks_per_stage, strict=True))
            if n > m
        ]
        if over:
            raise StudentSpecError(
                f"{where}: hiera {list(spec.hiera_blocks)} keeps more blocks than the teacher's "
                f"{list(s.blocks_per_stage)} ({'; '.join(over)})"
            )
        sam2 = dataclasses.replace(
            s,
            blocks_per_stage=tuple(spec.hiera_blocks),
            global_attention_blocks=student_global_blocks(s, tuple(spec.hiera_blocks)),
        )
    sam2 = _hiera_widths(sam2, spec)
    sam2 = _sam_widths(sam2, s, spec, where)
    return dataclasses.replace(
        teacher, name=f"{teacher.name}-{spec.name}", text=text, vision=vision, sam2=sam2
    )


def _vision_widths(vision, teacher, spec: StudentSpec, where: str):
    """The tower's width, heads and MLP of `spec` (module docstring); the teacher's if unset."""
    hidden = spec.vision_hidden or teacher.hidden_size
    heads = spec.vision_heads or teacher.num_heads
    # The teacher's expansion ratio scaled by vision-mlp, at the student's width.
    inter = max(
        1, round(spec.vision_mlp * teacher.intermediate_size * hidden / teacher.hidden_size)
    )
    if hidden % heads or (hidden // heads) % 4:
        # Qwen2.5-VL's 2-D rotary splits each head into row and column halves of cos/sin pairs.
        raise StudentSpecError(
            f"{where}: vision-hidden {hidden} / vision-heads {heads}: the head size must be a "
            "whole multiple of 4"
        )
    out = dataclasses.replace(vision, hidden_size=hidden, num_heads=heads, intermediate_size=inter)
    # The teacher's merger width (its own, if it was pruned) scaled by merger-mlp, at the
    # student's width; written only where it differs from Qwen2.5-VL's full width.
    merger = max(1, round(spec.merger_mlp * teacher.merger_width * hidden / teacher.hidden_size))
    return dataclasses.replace(
        out, merger_intermediate_size=None if merger == out.merged_size else merger
    )


def _hiera_widths(sam2, spec: StudentSpec):
    """Hiera's stage widths of `spec` (`hiera_width`), each a multiple of its heads."""
    if spec.hiera_width == 1.0:
        return sam2
    dims = tuple(
        hiera_stage_width(d, h, spec.hiera_width)
        for d, h in zip(sam2.embed_dim_per_stage, sam2.heads_per_stage, strict=True)
    )
    return dataclasses.replace(sam2, embed_dim_per_stage=dims)


def hiera_stage_width(teacher_dim: int, heads: int, fraction: float) -> int:
    """round(fraction * teacher_dim) to the nearest multiple of `heads`, at least `heads`."""
    return heads * max(1, round(fraction * teacher_dim / heads))


def _sam_widths(sam2, teacher, spec: StudentSpec, where: str):
    """SAM2's neck-output / prompt / decoder width of `spec`, its decoder MLP and IoU head
    scaled at the teacher's ratios; the teacher's if unset."""
    hidden = spec.sam_hidden or teacher.hidden_size
    heads = teacher.decoder_heads
    # The decoder's cross-attention works at half the width; upscaling and the high-res
    # features go to hidden/4 and hidden/8 channels; the positional encoding to hidden/2.
    if hidden % 8 or (hidden // 2) % heads:
        raise StudentSpecError(
            f"{where}: sam-hidden {hidden}: must be a multiple of 8 whose half the mask "
            f"decoder's {heads} heads divide"
        )
    scale = hidden / teacher.hidden_size
    return dataclasses.replace(
        sam2,
        hidden_size=hidden,
        decoder_mlp_dim=max(1, round(spec.sam_decoder_mlp * teacher.decoder_mlp_dim * scale)),
        iou_head_hidden_dim=max(1, round(teacher.iou_head_hidden_dim * scale)),
    )


def mlp_channels(intermediate_size: int, spec: StudentSpec) -> int:
    """MLP channels the student keeps: round(llm_mlp * teacher's), at least 1."""
    return max(1, round(spec.llm_mlp * intermediate_size))


def hiera_kept(s: Sam2Dims, blocks: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Teacher Hiera block indexes a student of `blocks` per stage keeps, in order."""
    starts = [sum(s.blocks_per_stage[:i]) for i in range(4)]
    return tuple(starts[i] + j for i in range(4) for j in range(blocks[i]))


def student_global_blocks(s: Sam2Dims, blocks: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Global-attention blocks of a student keeping each stage's first `blocks` (see
    `student_config`)."""
    old_starts = [sum(s.blocks_per_stage[:i]) for i in range(4)]
    new_starts = [sum(blocks[:i]) for i in range(4)]
    chosen: list[int] = []
    for i in range(4):
        teacher_globals = [
            g - old_starts[i]
            for g in s.global_attention_blocks
            if old_starts[i] <= g < old_starts[i] + s.blocks_per_stage[i]
        ]
        kept = [r for r in teacher_globals if r < blocks[i]]
        if teacher_globals and not kept and blocks[i] >= 2:
            kept = [blocks[i] - 1]
        chosen.extend(new_starts[i] + r for r in kept)
    return tuple(chosen)


def _in_range(idx: tuple[int, ...], n: int, label: str, what: str, where: str) -> None:
    bad = [i for i in idx if i >= n]
    if bad:
        raise StudentSpecError(
            f"{where}: {label} {bad} out of range; the teacher has {n} {what} (0..{n - 1})"
        )


# -- presets --------------------------------------------------------------------------------
_8B_MLP_3B = 11_008 / 18_944  # Qwen2.5-VL-3B's MLP width over the 7B's
_HIERA_S = 96 / 144  # SAM2 Hiera-S's stage-1 width over Hiera-L's

STUDENT_PRESETS: dict[str, StudentSpec] = {
    s.name: s
    for s in (
        # The shipped demo model (4 LLM layers, 4 vision blocks with full attention at 1 and 3,
        # Hiera 1,1,2,1): half the LLM depth and MLP width, half the vision blocks, one Hiera
        # block per stage. The layers are layer_importance's choice on 12 training phantoms
        # (drop-one LM-loss increase: LLM 5.997, 0.258, 0.245, 0.217; vision 2.728, 0.147,
        # 0.024, 4.696).
        StudentSpec(
            llm_layers=(0, 1),
            llm_mlp=0.5,
            vision_blocks=(0, 3),
            hiera_blocks=(1, 1, 1, 1),
            name="demo-small",
        ),
        # The shipped student, >= 3x fewer parameters than the demo model: 1,027,105 of
        # 3,182,353 (3.10x). demo-small's depths (LLM layers 0,1 by the figures above; vision
        # blocks 0 windowed and 3 full-attention, as export needs a windowed one; Hiera 1,1,1,1),
        # a quarter of the LLM MLP (128 channels, Minitron-pruned), and two re-widened parts
        # initialised afresh: a 64-wide vision tower (4 heads, MLP 128: half the teacher's
        # expansion) and 64-wide SAM2 prompt side (neck output, prompt encoder, mask decoder
        # with MLP 64, seg projector output). The LLM (embeddings, lm_head, layers) and the
        # Hiera backbone are the teacher's.
        StudentSpec(
            llm_layers=(0, 1),
            llm_mlp=0.25,
            vision_blocks=(0, 3),
            hiera_blocks=(1, 1, 1, 1),
            vision_hidden=64,
            vision_heads=4,
            vision_mlp=0.5,
            sam_hidden=64,
            sam_decoder_mlp=0.25,
            name="demo-tiny",
        ),
        # demo-tiny with the teacher's vision tower kept at its width (96, 4 heads), its MLPs
        # Minitron-pruned instead of re-initialised: a quarter of each block's SwiGLU channels
        # (96 of 384) and a sixth of the merger's (64 of 384). 1,046,465 parameters (3.04x
        # fewer); only the 64-wide SAM2 prompt side is fresh, so the visual tokens the LLM
        # counts from start close to the teacher's.
        StudentSpec(
            llm_layers=(0, 1),
            llm_mlp=0.25,
            vision_blocks=(0, 3),
            hiera_blocks=(1, 1, 1, 1),
            vision_mlp=0.25,
            merger_mlp=64 / 384,
            sam_hidden=64,
            sam_decoder_mlp=0.25,
            name="demo-lite",
        ),
        # Citrus-V 8B (28 layers): every other layer.
        StudentSpec(llm_layers=tuple(range(0, 28, 2)), name="8b-half-layers"),
        # The closest expressible to Qwen2.5-VL-3B's widths (module docstring): its MLP width
        # (11008 channels) on half the 7B's layers.
        StudentSpec(
            llm_layers=tuple(range(0, 28, 2)), llm_mlp=_8B_MLP_3B, name="8b-half-layers-3b-mlp"
        ),
        # SAM2 Hiera-L (2,6,36,4; 144..1152 channels) cut to Hiera-S's depths (1,2,11,2) and
        # widths (96, 192, 384, 768: two thirds), keeping Hiera-L's heads.
        StudentSpec(hiera_blocks=(1, 2, 11, 2), hiera_width=_HIERA_S, name="8b-hiera-s"),
        # All of the above plus every other vision block (1,3,..,31 keeps the full-attention
        # blocks 7,15,23,31).
        StudentSpec(
            llm_layers=tuple(range(0, 28, 2)),
            llm_mlp=_8B_MLP_3B,
            vision_blocks=tuple(range(1, 32, 2)),
            hiera_blocks=(1, 2, 11, 2),
            hiera_width=_HIERA_S,
            name="8b-edge",
        ),
    )
}
