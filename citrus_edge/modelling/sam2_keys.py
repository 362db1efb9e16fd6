"""Parameter names of SAM2 as facebookresearch/sam2 writes them, and as transformers' Sam2Model does.

The Citrus-V checkpoint stores its SAM2 under `grounding_encoder.sam2_model.` with the original
`SAM2Base` names (`image_encoder.trunk.*`, `sam_prompt_encoder.*`, `sam_mask_decoder.*`, plus the
video-memory modules). We run transformers' image-only `Sam2Model`. This module maps names both
ways; strip the `grounding_encoder.sam2_model.` prefix before calling it.

What changes between the two namings (learnt from transformers' `convert_sam2_to_hf.py`, checked
against `sam2/modeling/*`):
- renames only, with the same tensor, for almost every weight: `image_encoder.trunk` ->
  `vision_encoder.backbone`, `.normN` -> `.layer_normN`, `out_proj` -> `o_proj`, the neck's
  `convs.N.conv` -> `convs.N`, the prompt encoder's and mask decoder's `nn.Sequential` indices ->
  named convs and norms. Hiera's fused `attn.qkv` keeps the same name and the same row layout;
- the original `MLP(num_layers=n)` holds `layers.0 .. layers.n-1`, HF's `Sam2FeedForward` holds
  `proj_in, layers.0 .. layers.n-3, proj_out` (n is read from the keys present);
- one concat: the original's four `point_embeddings.N.weight` of shape [1, C] are the rows of HF's
  `point_embed.weight` [4, C];
- one copy: HF keeps the prompt encoder's random-Fourier matrix twice (see `HF_ONLY_KEYS`).
The memory path (memory attention, memory encoder, object pointers, ...) has no place in Sam2Model;
its keys are returned apart as "known unused", never dropped silently.

Importing this module does not import torch; only the point-embedding concat does, when called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "HF_ONLY_KEYS",
    "KNOWN_UNUSED_PATTERNS",
    "Sam2KeyError",
    "Sam2TensorMismatchError",
    "hf_to_original",
    "is_known_unused",
    "original_to_hf",
]


class Sam2KeyError(KeyError):
    """State-dict keys that no SAM2 mapping rule accounts for (or that clash after mapping)."""

    def __init__(self, message: str, keys: Iterable[str]) -> None:
        self.keys = sorted(keys)
        shown = "\n  ".join(self.keys[:40])
        more = f"\n  ... and {len(self.keys) - 40} more" if len(self.keys) > 40 else ""
        self.message = f"{message} ({len(self.keys)} keys):\n  {shown}{more}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


class Sam2TensorMismatchError(ValueError):
    """Two HF tensors that must hold the same values (one original tensor) differ."""


# Original (SAM2Base) keys of the video-memory path. transformers' Sam2Model is the single-image
# model and has no such modules (its `_keys_to_ignore_on_load_unexpected` lists their HF names).
KNOWN_UNUSED_PATTERNS: tuple[str, ...] = (
    r"memory_attention\..+",  # cross-attention from the current frame to past memories
    r"memory_encoder\..+",  # fuses a predicted mask into a memory feature map
    r"maskmem_tpos_enc",  # temporal position of each memory slot
    r"no_mem_pos_enc",  # position encoding paired with no_mem_embed in the memory bank
    r"no_obj_ptr",  # object pointer used when no object is predicted
    r"no_obj_embed_spatial",  # SAM2.1: memory embedding for occluded frames
    r"mask_downsample\..+",  # mask-as-output shortcut used when tracking from a given mask
    r"obj_ptr_proj\..+",  # projects the SAM output token into an object pointer
    r"obj_ptr_tpos_proj\..+",  # SAM2.1: temporal position encoding of object pointers
)
_UNUSED_RE = re.compile("|".join(f"(?:{p})" for p in KNOWN_UNUSED_PATTERNS))

# Sam2Model.state_dict() keys with no original key of their own.
HF_ONLY_KEYS: dict[str, str] = {
    "shared_image_embedding.positional_embedding": (
        "second copy of the prompt encoder's random-Fourier matrix, used for the image-wide "
        "positional encoding; the original has one (sam_prompt_encoder.pe_layer."
        "positional_encoding_gaussian_matrix), so original_to_hf fills both from it"
    ),
}
# HF key -> the HF key it must equal.
_HF_COPIES = {
    "shared_image_embedding.positional_embedding": "prompt_encoder.shared_embedding.positional_embedding",
}

# Placeholders in the templates below; each side of a rule uses the same ones.
_PLACEHOLDERS = {
    "i": r"\d+",
    "n": r"[1-4]",  # two-way transformer norms
    "hn": r"[12]",  # Hiera block norms
    "p": r"weight|bias",
    "qkv": r"q|k|v",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
}

_TRUNK, _HF_TRUNK = "image_encoder.trunk", "vision_encoder.backbone"
_PE, _HF_PE = "sam_prompt_encoder", "prompt_encoder"
_MD, _HF_MD = "sam_mask_decoder", "mask_decoder"
_TF, _HF_TF = f"{_MD}.transformer", f"{_HF_MD}.transformer"

# (original template, HF template): one tensor each, same values, same shape.
_RULES: tuple[tuple[str, str], ...] = (
    ("no_mem_embed", "no_memory_embedding"),  # added to the lowest-res features of a lone image
    # Hiera trunk
    (f"{_TRUNK}.pos_embed", f"{_HF_TRUNK}.pos_embed"),  # [1, C, 7, 7] background, interpolated
    (f"{_TRUNK}.pos_embed_window", f"{_HF_TRUNK}.pos_embed_window"),  # [1, C, w0, w0] tiled
    (f"{_TRUNK}.patch_embed.proj.{{p}}", f"{_HF_TRUNK}.patch_embed.projection.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.norm{{hn}}.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.layer_norm{{hn}}.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.attn.proj.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.attn.proj.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.proj.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.proj.{{p}}"),  # stage change
    # FPN neck: the original wraps each 1x1 conv in a Sequential named `conv`
    ("image_encoder.neck.convs.{i}.conv.{p}", "vision_encoder.neck.convs.{i}.{p}"),
    # prompt encoder
    (
        f"{_PE}.pe_layer.positional_encoding_gaussian_matrix",
        f"{_HF_PE}.shared_embedding.positional_embedding",
    ),
    (f"{_PE}.not_a_point_embed.weight", f"{_HF_PE}.not_a_point_embed.weight"),
    (f"{_PE}.no_mask_embed.weight", f"{_HF_PE}.no_mask_embed.weight"),
    (f"{_PE}.mask_downscaling.0.{{p}}", f"{_HF_PE}.mask_embed.conv1.{{p}}"),
    (f"{_PE}.mask_downscaling.1.{{p}}", f"{_HF_PE}.mask_embed.layer_norm1.{{p}}"),
    (f"{_PE}.mask_downscaling.3.{{p}}", f"{_HF_PE}.mask_embed.conv2.{{p}}"),
    (f"{_PE}.mask_downscaling.4.{{p}}", f"{_HF_PE}.mask_embed.layer_norm2.{{p}}"),
    (f"{_PE}.mask_downscaling.6.{{p}}", f"{_HF_PE}.mask_embed.conv3.{{p}}"),
    # mask decoder
    (f"{_MD}.iou_token.weight", f"{_HF_MD}.iou_token.weight"),
    (f"{_MD}.mask_tokens.weight", f"{_HF_MD}.mask_tokens.weight"),
    (f"{_MD}.obj_score_token.weight", f"{_HF_MD}.obj_score_token.weight"),
    (f"{_MD}.conv_s0.{{p}}", f"{_HF_MD}.conv_s0.{{p}}"),
    (f"{_MD}.conv_s1.{{p}}", f"{_HF_MD}.conv_s1.{{p}}"),
    (f"{_MD}.output_upscaling.0.{{p}}", f"{_HF_MD}.upscale_conv1.{{p}}"),
    (f"{_MD}.output_upscaling.1.{{p}}", f"{_HF_MD}.upscale_layer_norm.{{p}}"),
    (f"{_MD}.output_upscaling.3.{{p}}", f"{_HF_MD}.upscale_conv2.{{p}}"),
    # two-way transformer
    (
        f"{_TF}.layers.{{i}}.{{attn}}.{{qkv}}_proj.{{p}}",
        f"{_HF_TF}.layers.{{i}}.{{attn}}.{{qkv}}_proj.{{p}}",
    ),
    (f"{_TF}.layers.{{i}}.{{attn}}.out_proj.{{p}}", f"{_HF_TF}.layers.{{i}}.{{attn}}.o_proj.{{p}}"),
    (f"{_TF}.layers.{{i}}.norm{{n}}.{{p}}", f"{_HF_TF}.layers.{{i}}.layer_norm{{n}}.{{p}}"),
    (
        f"{_TF}.final_attn_token_to_image.{{qkv}}_proj.{{p}}",
        f"{_HF_TF}.final_attn_token_to_image.{{qkv}}_proj.{{p}}",
    ),
    (
        f"{_TF}.final_attn_token_to_image.out_proj.{{p}}",
        f"{_HF_TF}.final_attn_token_to_image.o_proj.{{p}}",
    ),
    (f"{_TF}.norm_final_attn.{{p}}", f"{_HF_TF}.layer_norm_final_attn.{{p}}"),
)

# (original prefix, HF prefix) of each MLP: original `MLP` keeps `layers.0..n-1`, HF
# `Sam2FeedForward` keeps `proj_in, layers.0..n-3, proj_out`.
_MLPS: tuple[tuple[str, str], ...] = (
    (f"{_TRUNK}.blocks.{{i}}.mlp", f"{_HF_TRUNK}.blocks.{{i}}.mlp"),  # n = 2
    (f"{_TF}.layers.{{i}}.mlp", f"{_HF_TF}.layers.{{i}}.mlp"),  # n = 2
    (f"{_MD}.output_hypernetworks_mlps.{{i}}", f"{_HF_MD}.output_hypernetworks_mlps.{{i}}"),  # 3
    (f"{_MD}.iou_prediction_head", f"{_HF_MD}.iou_prediction_head"),  # n = iou_head_depth (3)
    (f"{_MD}.pred_obj_score_head", f"{_HF_MD}.pred_obj_score_head"),  # n = 3
)

# The original's point_embeddings.N.weight [1, C] (N = 0..3) are the rows of HF's [4, C].
_POINTS_RE = re.compile(rf"{_PE}\.point_embeddings\.(\d+)\.weight")
_POINTS_TEMPLATE = f"{_PE}.point_embeddings.{{}}.weight"
_HF_POINTS = f"{_HF_PE}.point_embed.weight"


def _compile(template: str, suffix: str = "") -> re.Pattern[str]:
    """A full-match regex for `template`, each `{name}` a named group from `_PLACEHOLDERS`."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
        for k, part in enumerate(parts)
    )
    return re.compile(regex + suffix)


_ORIG_RULES = [(_compile(o), h) for o, h in _RULES]
_HF_RULES = [(_compile(h), o) for o, h in _RULES]
_LEAF = r"\.(?P<p>weight|bias)"
_ORIG_MLPS = [(_compile(o, r"\.layers\.(?P<k>\d+)" + _LEAF), o, h) for o, h in _MLPS]
_HF_MLPS = [
    (_compile(h, r"\.(?P<slot>proj_in|proj_out|layers\.\d+)" + _LEAF), o, h) for o, h in _MLPS
]


def is_known_unused(key: str) -> bool:
    """Whether an original SAM2 key belongs to the video-memory path that Sam2Model lacks."""
    return _UNUSED_RE.fullmatch(key) is not None


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    """The other side's name of a one-to-one key, or None when no rule matches."""
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def _checked_depths(found: dict[str, set[int]], what: str) -> dict[str, int]:
    """MLP prefix -> number of indexed layers; indices must run 0..n-1."""
    bad = [prefix for prefix, ks in found.items() if ks != set(range(len(ks)))]
    if bad:
        raise Sam2KeyError(f"{what} MLP layer indices do not run 0..n-1", bad)
    return {prefix: len(ks) for prefix, ks in found.items()}


def _original_mlp_names(keys: Iterable[str]) -> dict[str, str]:
    """Original MLP key -> HF key, for the keys that belong to an MLP."""
    hits: list[tuple[str, str, int, str]] = []  # (key, HF prefix, layer, leaf)
    found: dict[str, set[int]] = {}
    for key in keys:
        for pattern, _, hf_template in _ORIG_MLPS:
            match = pattern.fullmatch(key)
            if match:
                hf_prefix = hf_template.format(**match.groupdict())
                hits.append((key, hf_prefix, int(match["k"]), match["p"]))
                found.setdefault(hf_prefix, set()).add(int(match["k"]))
                break
    depths = _checked_depths(found, "original")
    if short := [prefix for prefix, n in depths.items() if n < 2]:
        raise Sam2KeyError("original MLPs with fewer than 2 layers have no HF counterpart", short)
    names = {}
    for key, prefix, k, leaf in hits:
        slot = "proj_in" if k == 0 else "proj_out" if k == depths[prefix] - 1 else f"layers.{k - 1}"
        names[key] = f"{prefix}.{slot}.{leaf}"
    return names


def _hf_mlp_names(keys: Iterable[str]) -> dict[str, str]:
    """HF MLP key -> original key, for the keys that belong to a Sam2FeedForward."""
    hits: list[tuple[str, str, str, str]] = []  # (key, original prefix, slot, leaf)
    found: dict[str, set[int]] = {}
    for key in keys:
        for pattern, orig_template, _ in _HF_MLPS:
            match = pattern.fullmatch(key)
            if match:
                prefix = orig_template.format(**match.groupdict())
                hits.append((key, prefix, match["slot"], match["p"]))
                layers = found.setdefault(prefix, set())
                if match["slot"].startswith("layers."):
                    layers.add(int(match["slot"].split(".")[1]))
                break
    depths = _checked_depths(found, "HF")  # hidden layers only; n = hidden + 2
    names = {}
    for key, prefix, slot, leaf in hits:
        if slot == "proj_in":
            k = 0
        elif slot == "proj_out":
            k = depths[prefix] + 1  # after the hidden layers
        else:
            k = int(slot.split(".")[1]) + 1
        names[key] = f"{prefix}.layers.{k}.{leaf}"
    return names


def _put(out: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Insert into `out`, refusing a name that two source keys both map to."""
    if key in out:
        raise Sam2KeyError(f"two keys map to {key!r}, one of them {source!r}", [key])
    out[key] = value


def _stack_points(points: dict[int, Tensor]) -> Tensor:
    """The original's per-label point embeddings [1, C] each -> HF's one [N, C] table."""
    import torch

    if set(points) != set(range(len(points))):
        names = [_POINTS_TEMPLATE.format(k) for k in points]
        raise Sam2KeyError("point_embeddings indices do not run 0..n-1", names)
    rows = [points[k] for k in range(len(points))]
    if any(row.dim() != 2 or row.shape[0] != 1 for row in rows):
        shapes = [tuple(row.shape) for row in rows]
        raise ValueError(f"point_embeddings.N.weight must each be [1, C], got {shapes}")
    return torch.cat(rows, dim=0)  # [N, C]


def original_to_hf(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an original SAM2 state dict (no `grounding_encoder.sam2_model.` prefix) for Sam2Model.

    Returns (hf_state, unused): `hf_state` is ready for `Sam2Model.load_state_dict` (tensors are
    shared with `state` except the concatenated point embeddings and the cloned HF-only copy);
    `unused` lists, in input order, the original keys of the video-memory path (`is_known_unused`).
    Raises Sam2KeyError listing every key that is neither mapped nor known unused.
    """
    mlp_names = _original_mlp_names(state)
    hf_state: dict[str, Tensor] = {}
    unused: list[str] = []
    unknown: list[str] = []
    points: dict[int, Tensor] = {}
    for key, tensor in state.items():
        if is_known_unused(key):
            unused.append(key)
        elif match := _POINTS_RE.fullmatch(key):
            points[int(match[1])] = tensor
        elif (name := mlp_names.get(key) or _rename(key, _ORIG_RULES)) is not None:
            _put(hf_state, name, tensor, key)
        else:
            unknown.append(key)
    if unknown:
        raise Sam2KeyError("original SAM2 keys with no Sam2Model counterpart", unknown)
    if points:
        _put(hf_state, _HF_POINTS, _stack_points(points), _POINTS_TEMPLATE.format("N"))
    for copy, source in _HF_COPIES.items():
        if source in hf_state:
            _put(hf_state, copy, hf_state[source].clone(), source)
    return hf_state, unused


def _check_copies(state: Mapping[str, Tensor]) -> None:
    """HF-only copies must equal their source, since only the source is written back."""
    for copy, source in _HF_COPIES.items():
        if copy in state and source not in state:
            raise Sam2KeyError(f"{copy} is only a copy; its source is missing", [source])
        if copy not in state:
            continue
        a, b = state[copy], state[source]
        same = a.shape == b.shape and (a.is_meta or b.is_meta or bool((a == b).all()))
        if not same:
            raise Sam2TensorMismatchError(
                f"{copy} differs from {source}; the original checkpoint has one tensor for both. "
                f"Copy {source} into {copy} (as original_to_hf does) before converting back."
            )


def hf_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Sam2Model state dict to original SAM2 names (the inverse of `original_to_hf`).

    `HF_ONLY_KEYS` are dropped after checking they equal what they copy (Sam2TensorMismatchError
    if not); the point-embedding table is split back into [1, C] rows. Video-memory keys are not
    produced (Sam2Model has none). Raises Sam2KeyError listing every key with no rule.
    """
    _check_copies(state)
    mlp_names = _hf_mlp_names(state)
    original: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in HF_ONLY_KEYS:
            continue
        if key == _HF_POINTS:
            for k in range(tensor.shape[0]):  # [N, C] -> N x [1, C]
                _put(original, _POINTS_TEMPLATE.format(k), tensor[k : k + 1].clone(), key)
        elif (name := mlp_names.get(key) or _rename(key, _HF_RULES)) is not None:
            _put(original, name, tensor, key)
        else:
            unknown.append(key)
    if unknown:
        raise Sam2KeyError("Sam2Model keys with no original SAM2 counterpart", unknown)
    return original
