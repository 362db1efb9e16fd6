"""Training loop for Citrus-V models: LM loss on answer tokens + mask loss on `[SEG]` masks.

Used to train the shipped demo model from phantoms, and reused by distillation (which adds its
own terms through `extra_loss`). Resumable: state is checkpointed every `ckpt_every` steps and a
learning curve is appended to `curve.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, IterableDataset

from citrus_edge import tasks
from citrus_edge.atomic import atomic_path
from citrus_edge.calib_data.phantom import PhantomConfig, centroid, generate_phantom
from citrus_edge.config import CitrusVConfig
from citrus_edge.modelling.model import CitrusV, build_model
from citrus_edge.preprocess import qwen_pixels, sam_pixels
from citrus_edge.prompts import n_image_tokens, prompt_ids

log = logging.getLogger(__name__)

TRAIN_CONFIG_VERSION = 1
# Training phantoms use seeds from here on; the default phantom set uses seeds below 1e6.
TRAIN_SEED_BASE = 50_000_000
IGNORE = -100
CENTRE_LOSSES = ("bce", "focal")  # TrainConfig.centre_loss


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Serialised next to the checkpoints; resuming checks it is unchanged."""

    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    w_lm: float = 1.0
    w_mask: float = 1.0
    w_iou: float = 0.5
    w_aux: float = 0.5
    w_mask_aux: float = 0.5
    w_first: float = 0.0  # extra CE on each answer's first token (the count / lesion decision)
    w_count: float = 0.0  # training-only lesion-count head on the answer-start state
    w_centre: float = 0.0  # training-only head marking the visual token of each lesion's centre
    # "bce": one-hot centre tokens, weighted BCE; "focal": a Gaussian heatmap about each centre
    # token with CenterNet's penalty-reduced focal loss (smoother targets, peaks to count).
    centre_loss: str = "bce"
    ckpt_every: int = 100
    log_every: int = 20
    threads: int = 1
    init_from: str | None = None  # Citrus-V checkpoint dir to start from (e.g. continue the demo)
    init_aux_from: str | None = None  # a previous run's state.pt whose training-only heads to keep
    carry_aux: bool = False  # in a staged run: init_aux_from = the previous stage's state.pt
    data_start: int = 0  # index of the first training phantom (a later stage sees fresh ones)
    phantom: PhantomConfig | None = None  # training phantoms' distribution (None: the default)
    # (min_pixels, max_pixels) of the vision input, saved with the model (None: the model's own).
    # The vision tower's weights fit any image size, so a stage may change it.
    pixels: tuple[int, int] | None = None
    # Mix of the training images (`calib_data.phantom_screen.image_kind` of each seed): the
    # fraction of images that are not ultrasound, and of the ultrasound ones that are drawn as
    # a scanner's screen. None (as 0) keeps the clean stream and earlier runs' saved configs.
    screen: float | None = None
    non_us: float | None = None
    # Initial bias (log-odds) of a centre head that starts fresh (no `init_aux_from`); None:
    # PyTorch's default. A fine-tune whose heads cannot be carried sets CenterNet's prior
    # (log(0.1 / 0.9)): at 0 the focal loss starts near 100 and, after gradient clipping,
    # leaves the language model almost no gradient.
    centre_prior: float | None = None
    # Quantization-aware training for the TensorRT targets' 4-bit LLM (`fp16-w4`): the decoder
    # layers' linear weights pass through `fake_int4` in blocks of this many input channels
    # (the INT4 export's grid, `compress.int4_awq`), with a straight-through gradient; the
    # model this run returns holds the quantized weights, so its INT4 export is exact at
    # alpha 0. None: plain float training.
    fake_int4_block: int | None = None
    version: int = TRAIN_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.centre_loss not in CENTRE_LOSSES:
            raise ValueError(f"centre_loss {self.centre_loss!r} is not one of {CENTRE_LOSSES}")
        block = self.fake_int4_block
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"fake_int4_block must be a power of two >= 16, got {block}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


@dataclass
class Sample:
    ids: np.ndarray  # [S] int64
    labels: np.ndarray  # [S] int64, IGNORE outside the answer
    pixel_values: np.ndarray  # [N_patches, C*T*P*P]
    grid_thw: tuple[int, int, int]
    sam_pixels: np.ndarray  # [3, S_sam, S_sam]
    mask: np.ndarray  # [S_sam, S_sam] float32 union of lesion masks at SAM input size
    occupancy: np.ndarray  # [n_visual_tokens] fraction of each merged patch covered by lesion
    heat: np.ndarray  # [n_visual_tokens] Gaussian about each centre token (1 there), max-combined
    n_lesions: int

    @property
    def centres(self) -> np.ndarray:
        """[n_visual_tokens] 1 where a lesion's mask centroid falls, else 0 (the heat's peaks)."""
        return (self.heat >= 1.0).astype(np.float32)


def make_sample(model_cfg: CitrusVConfig, tokenizer, seed: int, phantom_cfg: PhantomConfig):
    """One training example: a phantom, a task drawn from the seed, its prompt and answer."""
    ph = generate_phantom(seed, phantom_cfg)
    rgb = np.repeat(ph.image[..., None], 3, axis=2)
    qp = qwen_pixels(rgb, model_cfg.preprocess)
    task = tasks.TASKS[seed % len(tasks.TASKS)]
    prompt, answer = task_text(task, ph, qp.resized_hw)
    lesions = [(les.mask, les.box) for les in ph.lesions]
    return sample_of(model_cfg, tokenizer, rgb, qp, prompt, answer, lesions)


def make_mixed_sample(
    model_cfg: CitrusVConfig,
    tokenizer,
    seed: int,
    phantom_cfg: PhantomConfig,
    screen: float = 0.0,
    non_us: float = 0.0,
):
    """`make_sample`, or for a seed that `image_kind` makes a screen-like phantom or a
    non-ultrasound image, that image with the task's answer (NOT_US_ANSWER and no lesions for
    the latter)."""
    from citrus_edge.calib_data.not_ultrasound import non_us_image
    from citrus_edge.calib_data.phantom_screen import generate_screen_phantom, image_kind
    from citrus_edge.tasks import NOT_US_ANSWER

    kind = image_kind(seed, screen, non_us)
    if kind == "clean":
        return make_sample(model_cfg, tokenizer, seed, phantom_cfg)
    task = tasks.TASKS[seed % len(tasks.TASKS)]
    if kind == "non_us":
        rgb, _ = non_us_image(seed)
        qp = qwen_pixels(rgb, model_cfg.preprocess)
        return sample_of(model_cfg, tokenizer, rgb, qp, tasks.PROMPTS[task], NOT_US_ANSWER, [])
    ph = generate_screen_phantom(seed, phantom_cfg)
    qp = qwen_pixels(ph.image, model_cfg.preprocess)
    prompt, answer = task_text(task, ph, qp.resized_hw)
    lesions = [(les.mask, les.box) for les in ph.lesions]
    return sample_of(model_cfg, tokenizer, ph.image, qp, prompt, answer, lesions)


def sample_of(model_cfg: CitrusVConfig, tokenizer, rgb, qp, prompt: str, answer: str, lesions):
    """A training example of an image `rgb [H, W, 3]` (its `qwen_pixels` `qp`), a prompt, the
    answer and its lesions as (mask [H, W] bool, box) pairs: tokens, labels on the answer, the
    SAM2 input and mask, and the training-only occupancy and centre-heat targets."""
    from PIL import Image

    pp = model_cfg.preprocess
    n_img = n_image_tokens(qp.grid_thw, model_cfg.vision.spatial_merge_size)
    p_ids = prompt_ids(tokenizer, prompt, n_img).tolist()  # the runtime's own encoding
    a_ids = tokenizer.encode(answer).ids + [model_cfg.tokens.eos]
    (h, w), (rh, rw) = rgb.shape[:2], qp.resized_hw
    union = np.zeros((h, w), dtype=bool)
    for mask, _ in lesions:
        union |= mask
    s, m = pp.sam_image_size, pp.factor
    mask_sam = np.asarray(Image.fromarray(union.astype(np.uint8) * 255).resize((s, s), 0)) > 127
    occ_img = np.asarray(Image.fromarray(union.astype(np.float32)).resize((rw, rh), Image.BILINEAR))
    gh, gw = rh // m, rw // m
    occ = occ_img.reshape(gh, m, gw, m).mean(axis=(1, 3)).reshape(-1)
    heat = np.zeros((gh, gw), dtype=np.float32)
    rows, cols = np.mgrid[0:gh, 0:gw]
    for mask, box in lesions:
        if not mask.any():
            continue
        cy, cx = centroid(mask)
        row = min(int((cy + 0.5) * rh / h) // m, gh - 1)
        col = min(int((cx + 0.5) * rw / w) // m, gw - 1)
        heat = np.maximum(heat, centre_heat(rows - row, cols - col, box, (h, w), (rh, rw), m))
    return Sample(
        ids=np.asarray(p_ids + a_ids, dtype=np.int64),
        labels=np.asarray([IGNORE] * len(p_ids) + a_ids, dtype=np.int64),
        pixel_values=qp.pixel_values,
        grid_thw=qp.grid_thw,
        sam_pixels=sam_pixels(rgb, pp)[0],
        mask=mask_sam.astype(np.float32),
        occupancy=occ.astype(np.float32),
        heat=heat.reshape(-1),
        n_lesions=len(lesions),
    )


def centre_heat(
    d_row: np.ndarray,
    d_col: np.ndarray,
    box: tuple[int, int, int, int],
    image_hw: tuple[int, int],
    resized_hw: tuple[int, int],
    factor: int,
) -> np.ndarray:
    """Gaussian about a lesion's centre token (offsets `d_row`, `d_col` in visual tokens), its
    sigma a sixth of the lesion's box diagonal in tokens (at least half a token), as CenterNet."""
    (h, w), (rh, rw) = image_hw, resized_hw
    x1, y1, x2, y2 = box
    diag = np.hypot((x2 - x1) * rw / w, (y2 - y1) * rh / h) / factor
    sigma = max(0.5, diag / 6)
    return np.exp(-(d_row**2 + d_col**2) / (2 * sigma**2)).astype(np.float32)


def task_text(task: str, ph, resized_hw: tuple[int, int]) -> tuple[str, str]:
    """Prompt and expected answer for a phantom, in the seed's conventions."""
    if task == "segment":
        return tasks.SEGMENT_PROMPT, tasks.segment_answer(len(ph.lesions))
    if task == "detect":
        hw = ph.image.shape[:2]
        boxes = [tasks.resize_box(les.box, hw, resized_hw) for les in ph.lesions]
        return tasks.DETECT_PROMPT, tasks.detect_answer(boxes)
    return tasks.REPORT_PROMPT, tasks.report_answer(ph.lesions)


class PhantomStream(IterableDataset):
    """Endless training samples from fresh phantoms, deterministic from the start index."""

    def __init__(
        self,
        model_cfg,
        tokenizer_path: Path,
        start: int,
        phantom_cfg=None,
        screen=None,
        non_us=None,
    ):
        self.model_cfg, self.tokenizer_path, self.start = model_cfg, tokenizer_path, start
        self.phantom_cfg = phantom_cfg or PhantomConfig()
        self.mix = (screen or 0.0, non_us or 0.0)  # fractions; (0, 0): clean phantoms only

    def __iter__(self) -> Iterator[Sample]:
        from citrus_edge.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer_path)
        i = self.start
        while True:
            seed = TRAIN_SEED_BASE + i
            if self.mix == (0.0, 0.0):
                yield make_sample(self.model_cfg, tok, seed, self.phantom_cfg)
            else:
                yield make_mixed_sample(self.model_cfg, tok, seed, self.phantom_cfg, *self.mix)
            i += 1


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences; concatenate patches; stack SAM inputs."""
    n = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(samples), n), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.ids)] = torch.from_numpy(s.ids)
        labels[b, : len(s.ids)] = torch.from_numpy(s.labels)
        attn[b, : len(s.ids)] = 1
    return {
        "ids": ids,
        "labels": labels,
        "attention_mask": attn,
        "pixel_values": torch.from_numpy(np.concatenate([s.pixel_values for s in samples])),
        "grid_thw": torch.tensor([s.grid_thw for s in samples]),
        "sam_pixels": torch.from_numpy(np.stack([s.sam_pixels for s in samples])),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
        "occupancy": torch.from_numpy(np.concatenate([s.occupancy for s in samples])),
        "heat": torch.from_numpy(np.concatenate([s.heat for s in samples])),
        "n_lesions": torch.tensor([s.n_lesions for s in samples]),
    }


MAX_COUNT = 3  # the count head's classes: 0 .. MAX_COUNT lesions (more are clipped)


# Positives are rare (one visual token per lesion): their BCE weight.
CENTRE_POS_WEIGHT = 10.0
# Heads added to OccupancyHead after earlier runs saved theirs: a carried state may lack them.
LATER_HEADS = ("centre",)


class OccupancyHead(nn.Module):
    """Training-only aids, not shipped: lesion coverage of each visual token, the token of each
    lesion's centre (so that visual features come in countable units, one per lesion), and the
    lesion count read from the state that starts the answer."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 1)
        self.count = nn.Linear(d, MAX_COUNT + 1)
        self.centre = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).squeeze(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per mask: logits, target [..., H, W] -> [...]."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    inter = (p * t).sum(-1)
    return 1 - (2 * inter + 1) / (p.sum(-1) + t.sum(-1) + 1)


def focal_heat_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) against a heatmap whose peaks
    are exactly 1, normalised by the number of peaks."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    peak = heat >= 1.0
    pos = ((1 - p) ** 2 * torch.log(p))[peak].sum()
    neg = ((1 - heat) ** 4 * p**2 * torch.log(1 - p))[~peak].sum()
    return -(pos + neg) / peak.sum().clamp(min=1)


def llm_forward(
    model: CitrusV, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced pass: visual tokens [B * n_visual, H], last hidden states [B, S, H] and
    next-token logits [B, S-1, V]."""
    cfg = model.config
    ids, attn = batch["ids"], batch["attention_mask"]
    mm = (ids == cfg.tokens.image).int()
    pos, _ = model.mllm.model.get_rope_index(
        ids, mm, image_grid_thw=batch["grid_thw"], attention_mask=attn
    )
    visual = model.mllm.model.get_image_features(
        batch["pixel_values"], batch["grid_thw"], return_dict=True
    ).pooler_output
    visual = torch.cat(visual, dim=0)  # [B * n_visual, H]
    emb = model.mllm.model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == cfg.tokens.image)[..., None], visual.to(emb.dtype))
    out = model.mllm.model.language_model(
        inputs_embeds=emb, attention_mask=attn, position_ids=pos, use_cache=False
    )
    hidden = out.last_hidden_state  # [B, S, H]
    return visual, hidden, model.mllm.lm_head(hidden[:, :-1])


def compute_losses(
    model: CitrusV,
    aux: OccupancyHead,
    batch: dict[str, torch.Tensor],
    centre_loss: str = "bce",
    keep: dict | None = None,
) -> dict[str, torch.Tensor]:
    """LM loss on answer tokens, mask loss (best of 3 + IoU head) per `[SEG]`, occupancy aux.

    `keep`, when given, receives the pass's `hidden` states and `logits` (distillation reuses
    them rather than running the model twice)."""
    cfg = model.config
    ids = batch["ids"]
    visual, hidden, logits = llm_forward(model, batch)
    if keep is not None:
        keep.update(hidden=hidden, logits=logits)
    lm = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )
    losses = {"lm": lm, "aux": F.binary_cross_entropy_with_logits(aux(visual), batch["occupancy"])}
    centre_logits = aux.centre(visual).squeeze(-1)
    if centre_loss == "focal":
        losses["centre"] = focal_heat_loss(centre_logits, batch["heat"])
    else:  # one-hot: the heat's peaks are the centre tokens
        centres = (batch["heat"] >= 1.0).float()
        losses["centre"] = F.binary_cross_entropy_with_logits(
            centre_logits, centres, pos_weight=torch.tensor(CENTRE_POS_WEIGHT)
        )
    answer_start = (batch["labels"] != IGNORE).float().argmax(dim=1) - 1  # [B]
    rows = torch.arange(len(ids))
    # The first answer token carries the decision (lesion count, or whether to answer [SEG]).
    first = batch["labels"][rows, answer_start + 1]
    losses["first"] = F.cross_entropy(logits[rows, answer_start], first)
    count = batch["n_lesions"].clamp(max=MAX_COUNT)
    losses["count"] = F.cross_entropy(aux.count(hidden[rows, answer_start]), count)
    # The state that predicts [SEG] (position p where token p+1 is [SEG]) prompts SAM2.
    is_seg = batch["labels"][:, 1:] == cfg.tokens.seg  # [B, S-1]
    b_idx, p_idx = is_seg.nonzero(as_tuple=True)
    # Training aid (discarded after training): the state at the last prompt position, which
    # decides the answer's first token, also prompts SAM2 for every image with a lesion, so the
    # decoder and projector see every lesion image and that state must look at the image.
    lesion_b = (batch["mask"].flatten(1).amax(1) > 0).nonzero(as_tuple=True)[0]
    n_seg = len(b_idx)
    b_all = torch.cat([b_idx, lesion_b])
    p_all = torch.cat([p_idx, answer_start[lesion_b]])
    if len(b_all):
        per, iou_loss = _mask_losses(model, batch, b_all, hidden[b_all, p_all])
        if n_seg:
            losses["mask"] = per[:n_seg].mean()
        if len(lesion_b):
            losses["mask_aux"] = per[n_seg:].mean()
        losses["iou"] = iou_loss
    return losses


def _mask_losses(
    model: CitrusV, batch: dict[str, torch.Tensor], b_idx: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-3 BCE + Dice per prompt [N], and the IoU head's MSE to the masks' real IoU."""
    s = model.config.sam2.image_size
    feats = model.encode_image_sam(batch["sam_pixels"][b_idx])
    low, iou_pred = model.decode_masks(feats, states)
    up = F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)  # [N,3,S,S]
    target = batch["mask"][b_idx][:, None].expand_as(up)
    per = F.binary_cross_entropy_with_logits(up, target, reduction="none").mean((-2, -1))
    per = per + dice_loss(up, target)  # [N, 3]
    with torch.no_grad():
        pred = up > 0
        inter = (pred & (target > 0.5)).sum((-2, -1)).float()
        union = (pred | (target > 0.5)).sum((-2, -1)).float()
        iou_true = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return per.min(dim=1).values, F.mse_loss(iou_pred, iou_true)


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(
    model_cfg: CitrusVConfig,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer_path: Path,
    extra_loss: Callable[[CitrusV, dict], dict[str, torch.Tensor]] | None = None,
) -> CitrusV:
    """Train (or resume) into `out_dir`; returns the model. `extra_loss` adds named loss terms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(model_cfg, cfg, out_dir, tokenizer_path, extra_loss)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, also after an interruption


def stage_config(model_cfg: CitrusVConfig, cfg: TrainConfig) -> CitrusVConfig:
    """`model_cfg` with the stage's vision input size (`cfg.pixels`), if it sets one."""
    if cfg.pixels is None:
        return model_cfg
    lo, hi = cfg.pixels
    pp = dataclasses.replace(model_cfg.preprocess, min_pixels=lo, max_pixels=hi)
    return dataclasses.replace(model_cfg, preprocess=pp)


def grow_vision(model: CitrusV, model_cfg: CitrusVConfig) -> CitrusV:
    """`model` with its vision tower deepened to `model_cfg`'s depth, computing the same function.

    The new blocks come after the old ones with zeroed output projections (attention `proj`,
    MLP `down_proj`), so each starts as the identity of its residual stream. Everything but the
    vision depth and its full-attention block indexes must match, and the old full-attention
    blocks must keep their indexes.
    """
    old = dataclasses.replace(model.config, preprocess=model_cfg.preprocess)
    v_old, v_new = old.vision, model_cfg.vision
    same = dataclasses.replace(v_new, depth=v_old.depth, fullatt_block_indexes=())
    kept = tuple(i for i in v_new.fullatt_block_indexes if i < v_old.depth)
    if (
        dataclasses.replace(old, vision=same) != dataclasses.replace(model_cfg, vision=same)
        or dataclasses.replace(v_old, fullatt_block_indexes=()) != same
        or kept != tuple(v_old.fullatt_block_indexes)
    ):
        raise ValueError(
            f"cannot grow {old.name} into {model_cfg.name}: more than the depth differs"
        )
    grown = build_model(model_cfg, seed=None)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    blocks = grown.mllm.model.visual.blocks
    new_keys = {
        f"mllm.model.visual.blocks.{i}.{k}"
        for i in range(v_old.depth, v_new.depth)
        for k in blocks[i].state_dict()
    }
    if unexpected or set(missing) != new_keys:
        raise RuntimeError(f"growing the vision tower: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for block in blocks[v_old.depth :]:
            for layer in (block.attn.proj, block.mlp.down_proj):
                layer.weight.zero_()
                layer.bias.zero_()
    return grown


def _load_heads(aux: OccupancyHead, state_path: Path) -> None:
    """Carry a previous run's training-only heads: all of them, except LATER_HEADS it predates."""
    saved = torch.load(state_path, weights_only=False)["aux"]
    missing, unexpected = aux.load_state_dict(saved, strict=False)
    missing = [k for k in missing if k.split(".")[0] not in LATER_HEADS]
    if missing or unexpected:
        raise RuntimeError(
            f"{state_path}: training-only heads do not match (Missing keys: {missing}; "
            f"unexpected keys: {unexpected})"
        )


def fake_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """`w [out, in]` rounded to symmetric INT4 (-8..7, scale = block amax / 7) in blocks of
    `block` input channels, as `compress.int4_awq.quantize_blocks` rounds the exported `W.T`
    (an all-zero block keeps scale 1); the gradient passes straight through. Written in torch,
    not by calling that numpy function, so that it runs on the training device at every step;
    tests/test_train.py holds the two bit-equal."""
    out_f, in_f = w.shape
    blocks = -(-in_f // block)
    padded = F.pad(w, (0, blocks * block - in_f)).reshape(out_f, blocks, block)
    amax = padded.detach().abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(padded / scale), -8, 7) * scale
    q = q.reshape(out_f, blocks * block)[:, :in_f]
    return w + (q - w).detach()


class _FakeInt4(nn.Module):
    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_int4(w, self.block)


def _llm_linears(model: CitrusV) -> list[nn.Linear]:
    """The decoder layers' linear layers: the MatMuls the INT4 LLM recipes quantize."""
    layers = model.mllm.model.language_model.layers
    return [m for m in layers.modules() if isinstance(m, nn.Linear)]


def fake_quantize_llm(model: CitrusV, block: int) -> None:
    """Route the LLM decoder's linear weights through `fake_int4` (a parametrization: the
    float weights stay the trained parameters; `bake_fake_quant` makes them the quantized
    ones)."""
    for linear in _llm_linears(model):
        parametrize.register_parametrization(linear, "weight", _FakeInt4(block))


def bake_fake_quant(model: CitrusV) -> CitrusV:
    """Replace each parametrized weight by its quantized value (what training saw)."""
    for linear in _llm_linears(model):
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    return model


def _check_or_write_config(cfg: TrainConfig, out_dir: Path) -> None:
    """Write `train_config.json`; when resuming (a `state.pt` exists), require it unchanged."""
    path = out_dir / "train_config.json"
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if (out_dir / "state.pt").exists() and path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
        if changed:
            raise ValueError(
                f"{path}: resuming with a different training config ({', '.join(changed)}); "
                "use a new output directory or the saved config"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2))
    tmp.replace(path)


def _train(
    model_cfg: CitrusVConfig,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer_path: Path,
    extra_loss: Callable[[CitrusV, dict], dict[str, torch.Tensor]] | None,
) -> CitrusV:
    _check_or_write_config(cfg, out_dir)
    model_cfg = stage_config(model_cfg, cfg)
    if cfg.init_from is not None:
        from citrus_edge.modelling.checkpoint import load_checkpoint

        model = load_checkpoint(Path(cfg.init_from))
        saved = dataclasses.replace(model.config, preprocess=model_cfg.preprocess)
        if saved.vision.depth < model_cfg.vision.depth:
            model = grow_vision(model, model_cfg)
        elif saved != model_cfg:
            raise ValueError(f"{cfg.init_from}: its config differs from {model_cfg.name}")
        model.config = model_cfg  # the stage's image size; the weights are unchanged
    else:
        model = build_model(model_cfg, seed=cfg.seed)
    if cfg.fake_int4_block is not None:
        fake_quantize_llm(model, cfg.fake_int4_block)  # before a resume loads its state
    aux = OccupancyHead(model_cfg.text.hidden_size)
    if cfg.init_aux_from is not None:
        _load_heads(aux, Path(cfg.init_aux_from))
    elif cfg.centre_prior is not None:
        with torch.no_grad():
            aux.centre.bias.fill_(cfg.centre_prior)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    state_path = out_dir / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        aux.load_state_dict(st["aux"], strict=False)  # heads added later start fresh
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log.info("resumed at step %d", step)
    model.train()
    stream = PhantomStream(
        model_cfg,
        tokenizer_path,
        start=cfg.data_start + step * cfg.batch_size,
        phantom_cfg=cfg.phantom,
        screen=cfg.screen,
        non_us=cfg.non_us,
    )
    loader = DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=1,
        collate_fn=lambda s: collate(s, model_cfg.tokens.pad),
        prefetch_factor=4,
    )
    weights = {"lm": cfg.w_lm, "mask": cfg.w_mask, "iou": cfg.w_iou, "aux": cfg.w_aux}
    weights.update(
        mask_aux=cfg.w_mask_aux, first=cfg.w_first, count=cfg.w_count, centre=cfg.w_centre
    )
    t0, acc = time.time(), {}
    curve = (out_dir / "curve.jsonl").open("a")
    for batch in loader:
        if step >= cfg.steps:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        losses = compute_losses(model, aux, batch, cfg.centre_loss)
        if extra_loss is not None:
            losses.update(extra_loss(model, batch))
        total = sum(weights.get(k, 1.0) * v for k, v in losses.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in losses.items():
            acc.setdefault(k, []).append(v.item())
        if step % cfg.log_every == 0:
            row = {
                "step": step,
                "lr": cfg.lr_at(step),
                "s_per_step": (time.time() - t0) / cfg.log_every,
            }
            row.update({k: float(np.mean(v)) for k, v in acc.items()})
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            log.info("%s", row)
            t0, acc = time.time(), {}
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            st = {"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict()}
            _save_state(state_path, {**st, "step": step})
    curve.close()
    return bake_fake_quant(model).eval()
