"""Which layers of a Citrus-V matter: drop-one-layer loss and Block Influence, per layer.

For every LLM decoder layer, vision-tower block and Hiera block, on calibration batches
(`train.collate` batches, e.g. from `train.PhantomStream`):
- `loss_increase`: how much the loss grows when that one layer is skipped (its input passed
  straight on). LLM layers and vision blocks: the LM cross-entropy on the answer tokens
  (`train.compute_losses`' `lm` term); Hiera blocks: the mask loss (`mask` + `mask_aux`).
- `kl`: LLM layers and vision blocks: mean KL(full model || model without the layer) of the
  next-token distributions on the answer tokens (needs no labels' correctness, only positions).
- `block_influence`: ShortGPT's Block Influence, 1 - mean cosine similarity of the layer's input
  and output hidden states (tokens of the attention mask; all patches for the vision tower and
  Hiera). Low: the layer changes little, a candidate to drop.
A Hiera stage's first block changes the width and pools, so it cannot be skipped: its row
holds `None` (`droppable: False`); `compress.student_spec` always keeps it.

`choose_layers(rows, keep)` takes the `keep` layers whose removal costs most (their
`loss_increase`, Block Influence breaking ties), in order, for a `StudentSpec`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from citrus_edge.modelling.model import CitrusV
from citrus_edge.modelling.train import IGNORE, llm_forward

PARTS = ("llm", "vision", "hiera")


def language_forward(model: CitrusV, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits [B, S-1, V] of a collated batch (`train.llm_forward`'s)."""
    return llm_forward(model, batch)[2]


def _answer(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"][:, 1:] != IGNORE  # [B, S-1]


def _lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
    ).item()


def _kl(full: torch.Tensor, dropped: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    sel = _answer(batch)
    p = F.log_softmax(full[sel].float(), -1)
    q = F.log_softmax(dropped[sel].float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def _mask_loss(model: CitrusV, batch: dict[str, torch.Tensor]) -> float:
    from citrus_edge.modelling.train import OccupancyHead, compute_losses

    aux = OccupancyHead(model.config.text.hidden_size)
    losses = compute_losses(model, aux, batch)
    return sum(losses[k].item() for k in ("mask", "mask_aux") if k in losses)


@contextlib.contextmanager
def _without(model: CitrusV, part: str, index: int) -> Iterator[None]:
    """`model` with block `index` of `part` skipped (restored on exit)."""
    if part == "llm":
        owner, attr, extra = model.mllm.model.language_model, "layers", None
    elif part == "vision":
        owner, attr = model.mllm.model.visual, "blocks"
        extra = "fullatt_block_indexes"
    else:
        owner, attr, extra = model.sam2.vision_encoder.backbone, "blocks", "stage_ends"
    blocks = getattr(owner, attr)
    saved_extra = getattr(owner, extra) if extra else None
    setattr(owner, attr, torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != index]))
    if extra == "fullatt_block_indexes":  # the others keep their attention kind
        owner.fullatt_block_indexes = [i - (i > index) for i in saved_extra if i != index]
    elif extra == "stage_ends":
        owner.stage_ends = [e - (e >= index) for e in saved_extra]
    try:
        yield
    finally:
        setattr(owner, attr, blocks)
        if extra:
            setattr(owner, extra, saved_extra)


def _blocks(model: CitrusV, part: str) -> torch.nn.ModuleList:
    if part == "llm":
        return model.mllm.model.language_model.layers
    if part == "vision":
        return model.mllm.model.visual.blocks
    return model.sam2.vision_encoder.backbone.blocks


def _hiera_firsts(model: CitrusV) -> set[int]:
    b = model.config.sam2.blocks_per_stage
    return {sum(b[:i]) for i in range(4)}


def _block_influence(
    model: CitrusV, part: str, batches: list[dict[str, torch.Tensor]]
) -> list[float | None]:
    """1 - mean cos(in, out) per block of `part` (None where the shapes differ)."""
    blocks = _blocks(model, part)
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)
    shape_ok = [True] * len(blocks)
    mask: list[torch.Tensor | None] = [None]

    def hook(i: int):
        def fn(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            if x.shape != y.shape:
                shape_ok[i] = False
                return
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            if part == "llm" and mask[0] is not None:
                cos = cos[mask[0].bool()]
            sums[i] += cos.sum().item()
            counts[i] += cos.numel()

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            mask[0] = batch["attention_mask"]
            if part == "hiera":
                model.encode_image_sam(batch["sam_pixels"])
            else:
                language_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [
        1 - sums[i] / counts[i] if shape_ok[i] and counts[i] else None for i in range(len(blocks))
    ]


def layer_importance(
    model: CitrusV,
    batches: Iterable[dict[str, torch.Tensor]],
    parts: tuple[str, ...] = PARTS,
) -> list[dict]:
    """One JSON-able row per layer of each of `parts` (module docstring), in model order."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"layer_importance: unknown parts {bad}; choose from {PARTS}")
    batches = list(batches)
    if not batches:
        raise ValueError("layer_importance: no calibration batches")
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        with torch.no_grad():
            full_logits = [language_forward(model, b) for b in batches]
            base_lm = [_lm_loss(lg, b) for lg, b in zip(full_logits, batches, strict=True)]
            base_mask = [_mask_loss(model, b) for b in batches] if "hiera" in parts else []
            for part in parts:
                influence = _block_influence(model, part, batches)
                firsts = _hiera_firsts(model) if part == "hiera" else set()
                for i in range(len(_blocks(model, part))):
                    row = {"part": part, "index": i, "droppable": i not in firsts}
                    if not row["droppable"]:
                        row.update(loss_increase=None, kl=None, block_influence=influence[i])
                        rows.append(row)
                        continue
                    with _without(model, part, i):
                        if part == "hiera":
                            loss = [_mask_loss(model, b) for b in batches]
                            row["loss_increase"] = _mean(loss) - _mean(base_mask)
                            row["kl"] = None
                        else:
                            logits = [language_forward(model, b) for b in batches]
                            lm = [_lm_loss(lg, b) for lg, b in zip(logits, batches, strict=True)]
                            row["loss_increase"] = _mean(lm) - _mean(base_lm)
                            row["kl"] = _mean(
                                [
                                    _kl(f, d, b)
                                    for f, d, b in zip(full_logits, logits, batches, strict=True)
                                ]
                            )
                    row["block_influence"] = influence[i]
                    rows.append(row)
    finally:
        model.train(was_training)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def choose_layers(importance: list[dict], keep: int, part: str = "llm") -> tuple[int, ...]:
    """The `keep` layers of `part` whose removal costs most, in model order.

    Ranked by `loss_increase`, then Block Influence; undroppable blocks (a Hiera stage's first)
    are always chosen first. Raises `ValueError` if `keep` is not 1..the number of layers.
    """
    rows = [r for r in importance if r["part"] == part]
    if not 1 <= keep <= len(rows):
        raise ValueError(f"choose_layers: keep {keep} is not 1..{len(rows)} ({part} layers)")

    def rank(r: dict) -> tuple[float, float, float]:
        if not r.get("droppable", True):
            return (math.inf, math.inf, -r["index"])
        return (r["loss_increase"], r["block_influence"] or 0.0, -r["index"])

    chosen = sorted(rows, key=rank, reverse=True)[:keep]
    return tuple(sorted(r["index"] for r in chosen))


def format_table(importance: list[dict]) -> str:
    """A printable table of the rows."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:+.4f}"

    lines = [f"{'part':<7}{'index':>6}{'loss_increase':>15}{'kl':>10}{'block_infl':>12}"]
    for r in importance:
        lines.append(
            f"{r['part']:<7}{r['index']:>6}{num(r['loss_increase']):>15}{num(r['kl']):>10}"
            f"{num(r['block_influence']):>12}"
        )
    return "\n".join(lines)
