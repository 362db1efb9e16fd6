"""Knowledge distillation of a Citrus-V student from a teacher, single-process or data-parallel.

Losses (each weighted in `compress.distill_config.DistillConfig`): KL on the answer tokens'
logits at a temperature, cosine/MSE on the `[SEG]` embedding after the seg projector (the SAM2
prompt token), BCE + Dice of the student's mask logits against the teacher's, MSE on the SAM2
image embeddings (NanoSAM/EdgeTAM-style; needs no labels), normalised MSE on the visual tokens
(the vision tower's merger output, [N, LLM hidden] for both; needs no labels), plus the training
loop's own ground-truth terms (`train.compute_losses`, weighted by the run's TrainConfig).

A student whose SAM2 prompt side is narrower than the teacher's (`compress.student_spec`'s
`sam-hidden`; `modelling.student` initialises it afresh) cannot compare its image embeddings
[B, d, h, w] or its `[SEG]` prompt token [N, d] with the teacher's [.., D, ..] directly. A
training-only linear adapter maps the student's d channels to the teacher's D (FitNets' regressor:
a 1x1 convolution for the embeddings, a linear layer for the token), and the loss compares the
adapted student with the teacher. Why an adapter rather than skipping the terms: these two are
the only signals that teach the fresh neck and prompt side the teacher's features before the mask
terms can (mask KD needs a working decoder; the GT mask loss alone is what the ground-truth
baseline has); and why not a fixed projection (e.g. the teacher's channels' top-d principal
directions): a learnt map only asks the student's features to carry the teacher's information
linearly, not to copy an arbitrary d-subspace of it. The adapters live in `DistillStep` beside the
occupancy head, are trained and checkpointed with it (exact resume), and are not part of the
student. The visual-token term needs none: the merger writes the LLM's hidden size, which a
student keeps.

Why not `train.train(..., extra_loss=...)`: that loop has no data parallelism (rank shards,
DDP wrapper, rank-0 writes), no periodic evaluation and no progress hook, and `extra_loss`
gets the model, not its outputs, so every distillation term would run the student a second
time. This loop reuses train's pieces instead: the phantom samples, `collate`,
`compute_losses` (its `keep` hands back the pass's hidden states and logits), the training-only
heads, TrainConfig's schedule and GT weights, and the same exact-resume scheme (`state.pt`
every `ckpt_every` steps; a resumed run ends bit-identical to a straight one).

Why not `modelopt.torch.distill` (mtd.convert(student, mode=[("kd_loss", KDLossConfig)])): it
wraps the student in a DistillationModel that runs teacher and student through their own
`forward()` and pairs the outputs of named submodules through forward hooks. Citrus-V has no
single forward (the loop calls the LLM, SAM2 encoder and mask decoder separately), and the
pairs distilled here are not module outputs: logits at the answer positions only, hidden
states picked at each sample's `[SEG]` positions, and the mask decoder run on the student's
own image features with the student's own `[SEG]` states. Its logits loss (LogitsDistillation
Loss) is the same temperature KL as `kl_loss` below, so nothing is lost by writing it out; and
the DistillationModel wrapper would also stand between DDP and the student's state dict.

Data-parallel (`torchrun`): every process builds the same teacher and student; rank r takes
its share of each step's global batch (`DistillConfig.batch_size` samples in micro-batches of
`micro_batch`); DDP averages the gradients. A step's gradient is the mean of its micro-batches'
gradients, whether they sit in one process (accumulation) or several (DDP), so the result
depends on the global batch and the micro-batch size, not on the number of processes. Rank 0
writes the checkpoints, curves and the final model. On GPU nodes (one process per GPU, NCCL):

    torchrun --standalone --nproc_per_node 8 -m citrus_edge distill \\
        --teacher PATH --student SPEC --steps N --out DIR --batch-size 64 --micro-batch 2

across nodes replace `--standalone` with `--nnodes N --node-rank I --rdzv-backend c10d
--rdzv-endpoint HOST:29500`. With CUDA under torchrun the backend is NCCL and each process
uses cuda:LOCAL_RANK; on CPU it is gloo (what `tests/test_distill_ddp.py` runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from citrus_edge.calib_data.phantom import PhantomConfig
from citrus_edge.modelling.model import CitrusV
from citrus_edge.modelling.train import (
    IGNORE,
    TRAIN_SEED_BASE,
    OccupancyHead,
    Sample,
    TrainConfig,
    collate,
    compute_losses,
    dice_loss,
    llm_forward,
    make_sample,
    sample_of,
)

log = logging.getLogger(__name__)

# Held-out phantoms of the periodic evaluation: seeds no training stage draws (training uses
# TRAIN_SEED_BASE upwards, the default phantom set below 1e6).
EVAL_SEED_BASE = 70_000_000
KD_TERMS = ("kl", "seg", "mask_kd", "feat", "vis")
STATE = "state.pt"
MODEL_DIR = "model"


# --- the losses -----------------------------------------------------------------------------


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of [N, V] logits at temperature T, mean over rows, times T^2."""
    if student.shape != teacher.shape:
        raise ValueError(f"logits {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.shape[0] == 0:
        return student.sum() * 0.0
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def seg_embedding_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """[N, D] `[SEG]` prompt tokens: mean (1 - cosine similarity), or their MSE."""
    if student.shape != teacher.shape:
        raise ValueError(f"[SEG] embeddings {tuple(student.shape)} vs {tuple(teacher.shape)}")
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"seg loss {kind!r} is not cosine or mse")


def mask_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of mask logits [..., H, W] against the teacher's probabilities."""
    if student.shape != teacher.shape:
        raise ValueError(f"mask logits {tuple(student.shape)} vs {tuple(teacher.shape)}")
    target = teacher.sigmoid()
    bce = F.binary_cross_entropy_with_logits(student, target)
    return bce + dice_loss(student, target).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of the SAM2 image embeddings [B, D, h, w] (the student's neck keeps the teacher's
    width and resolution, so no adapter is needed)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"SAM2 image embeddings {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: "
            "feature distillation needs the same neck width and image size"
        )
    return F.mse_loss(student, teacher)


def visual_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of [N, H] visual tokens divided by the teacher's mean square (1.0: predicting zeros).

    Normalised because the merger's outputs are large (mean square about 51 on the demo model,
    so a plain MSE of a fresh tower would outweigh every other term about fifty times) and their
    scale differs between models; the ratio keeps one default weight meaningful."""
    if student.shape != teacher.shape:
        raise ValueError(f"visual tokens {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    scale = teacher.detach().pow(2).mean().clamp_min(1e-12)
    return F.mse_loss(student, teacher) / scale


def gt_weights(tc: TrainConfig) -> dict[str, float]:
    """The ground-truth terms' weights, as `train.train` applies them."""
    return {
        "lm": tc.w_lm,
        "mask": tc.w_mask,
        "iou": tc.w_iou,
        "aux": tc.w_aux,
        "mask_aux": tc.w_mask_aux,
        "first": tc.w_first,
        "count": tc.w_count,
        "centre": tc.w_centre,
    }


class DistillStep(nn.Module):
    """The student and its training-only heads; `forward(batch)` returns the named loss terms
    and the weighted total (a module, so that DDP sees the pass and syncs its gradients). The
    teacher is held outside the module tree: it is frozen, not synced, not saved."""

    def __init__(self, student: CitrusV, teacher: CitrusV, cfg: Any, tc: TrainConfig):
        super().__init__()
        self.student = student
        self.aux = OccupancyHead(student.config.text.hidden_size)
        self._teacher = (teacher,)
        self.cfg, self.tc = cfg, tc
        self.weights = {k: cfg.w_gt * w for k, w in gt_weights(tc).items()}
        self.weights.update(
            kl=cfg.w_kl,
            kl_first=cfg.w_kl_first,
            seg=cfg.w_seg,
            mask_kd=cfg.w_mask_kd,
            feat=cfg.w_feat,
        )
        self.weights["vis"] = getattr(cfg, "w_vis", 0.0)
        # Training-only FitNets adapters, student SAM2 width -> teacher's (module docstring);
        # made after the aux head, so that its seeded initialisation is the same as without.
        self.adapters = nn.ModuleDict()
        d, big = student.config.sam2.hidden_size, teacher.config.sam2.hidden_size
        if d != big:
            if cfg.w_feat > 0:
                self.adapters["feat"] = nn.Conv2d(d, big, kernel_size=1)
            if cfg.w_seg > 0:
                self.adapters["seg"] = nn.Linear(d, big)
            log.info("SAM2 width %d vs teacher %d: adapters %s", d, big, list(self.adapters))

    def _adapt(self, term: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[term](x) if term in self.adapters else x

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg, student, teacher = self.cfg, self.student, self._teacher[0]
        w_vis = self.weights["vis"]
        # The student's visual tokens, from the pass compute_losses makes anyway (its `keep`
        # hands back hidden states and logits only): the tower's output as get_image_features
        # reads it, before the split per image, i.e. llm_forward's `visual`.
        seen: list[torch.Tensor] = []
        hook = (
            student.mllm.model.visual.register_forward_hook(
                lambda _m, _a, out: seen.append(out.pooler_output)
            )
            if w_vis > 0
            else None
        )
        try:
            if cfg.w_gt > 0:
                keep: dict[str, torch.Tensor] = {}
                losses = compute_losses(student, self.aux, batch, self.tc.centre_loss, keep)
                hidden, logits = keep["hidden"], keep["logits"]
            else:  # no labels needed beyond the token sequence the teacher is forced along
                losses = {}
                _, hidden, logits = llm_forward(student, batch)
        finally:
            if hook is not None:
                hook.remove()
        with torch.no_grad():
            t_visual, t_hidden, t_logits = llm_forward(teacher, batch)
        if w_vis > 0:
            losses["vis"] = visual_loss(seen[0], t_visual)
        answer = batch["labels"][:, 1:] != IGNORE  # positions predicting an answer token
        if cfg.w_kl > 0:
            losses["kl"] = kl_loss(logits[answer], t_logits[answer], cfg.temperature)
        if cfg.w_kl_first > 0:
            # Each row's first answer position (where the count / decision token is predicted).
            first = answer & (answer.cumsum(dim=1) == 1)
            losses["kl_first"] = kl_loss(logits[first], t_logits[first], cfg.temperature)
        is_seg = batch["labels"][:, 1:] == student.config.tokens.seg
        b_idx, p_idx = is_seg.nonzero(as_tuple=True)
        n_seg = len(b_idx)
        s_feats = t_feats = None
        if cfg.w_feat > 0 or (cfg.w_mask_kd > 0 and n_seg):
            # The GT mask loss encodes the lesion images again; at these sizes that is cheaper
            # than threading the features through compute_losses.
            s_feats = student.encode_image_sam(batch["sam_pixels"])
            with torch.no_grad():
                t_feats = teacher.encode_image_sam(batch["sam_pixels"])
        if cfg.w_feat > 0:
            losses["feat"] = feature_loss(self._adapt("feat", s_feats[-1]), t_feats[-1])
        if n_seg:
            s_states, t_states = hidden[b_idx, p_idx], t_hidden[b_idx, p_idx]
            if cfg.w_seg > 0:
                with torch.no_grad():
                    t_seg = teacher.seg_projector(t_states)
                s_seg = self._adapt("seg", student.seg_projector(s_states))
                losses["seg"] = seg_embedding_loss(s_seg, t_seg, cfg.seg_loss)
            if cfg.w_mask_kd > 0:
                s_low, _ = student.decode_masks([f[b_idx] for f in s_feats], s_states)
                with torch.no_grad():
                    t_low, _ = teacher.decode_masks([f[b_idx] for f in t_feats], t_states)
                losses["mask_kd"] = mask_kd_loss(s_low, t_low)
        losses["total"] = sum(self.weights.get(k, 1.0) * v for k, v in losses.items())
        return losses


# --- data -----------------------------------------------------------------------------------


def record_sample(model_cfg, tokenizer, record, manifest_dir: Path) -> Sample:
    """A training sample from a manifest record: its image, prompt, answer and lesion masks
    (none: an image without labels; the ground-truth mask terms then see no lesion)."""
    from PIL import Image

    from citrus_edge.calib_data.load import load_image
    from citrus_edge.preprocess import qwen_pixels

    rgb = load_image(record.abs_image(manifest_dir), record.frame).pixels
    qp = qwen_pixels(rgb, model_cfg.preprocess)
    masks = [np.asarray(Image.open(p).convert("L")) > 127 for p in record.abs_masks(manifest_dir)]
    lesions = list(zip(masks, record.boxes, strict=False))
    return sample_of(model_cfg, tokenizer, rgb, qp, record.prompt, record.answer, lesions)


class SampleSource:
    """Sample `i` of a run's data: fresh training phantoms, or a manifest's records in turn."""

    def __init__(self, model_cfg, tokenizer_path: Path, manifest: Path | None, split: str):
        self.model_cfg, self.tokenizer_path, self.manifest = model_cfg, tokenizer_path, manifest
        self.split = split
        self._tok = None
        self.records = None
        if manifest is not None:
            from citrus_edge.calib_data.data_manifest import read_manifest

            self.records = read_manifest(manifest, split=split)
            if not self.records:
                raise ValueError(f"{manifest}: no records in split {split!r}")

    def __call__(self, i: int) -> Sample:
        if self._tok is None:
            from citrus_edge.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
        if self.records is None:
            base = TRAIN_SEED_BASE if self.split == "train" else EVAL_SEED_BASE
            return make_sample(self.model_cfg, self._tok, base + i, PhantomConfig())
        rec = self.records[i % len(self.records)]
        return record_sample(self.model_cfg, self._tok, rec, Path(self.manifest).parent)


class RankStream(IterableDataset):
    """This process's samples, step after step from `start_step`: the global batch of step s is
    samples [s*B, (s+1)*B) (after `offset`); its micro-batch k = rank * accum + a."""

    def __init__(self, source, start_step, batch, micro, accum, rank, offset=0):
        self.source, self.start_step, self.batch, self.micro = source, start_step, batch, micro
        self.accum, self.rank, self.offset = accum, rank, offset

    def __iter__(self) -> Iterator[Sample]:
        step = self.start_step
        while True:
            for a in range(self.accum):
                first = self.offset + step * self.batch + (self.rank * self.accum + a) * self.micro
                for i in range(first, first + self.micro):
                    yield self.source(i)
            step += 1


# --- the run --------------------------------------------------------------------------------


def _distributed(device: str | None) -> tuple[int, int, torch.device, bool]:
    """(world size, rank, device, whether this call started the process group)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 1, 0, torch.device(device or "cpu"), False
    created = False
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return dist.get_world_size(), dist.get_rank(), dev, created


def describe_student(student: Any) -> str:
    """What the run records as its student (a resume must name the same)."""
    if isinstance(student, CitrusV):
        return f"model:{student.config.name}"
    if isinstance(student, str | os.PathLike):
        return f"checkpoint:{Path(student).resolve()}"
    text = getattr(student, "text", None)  # StudentSpec.text(): its CLI form
    return f"spec:{text() if callable(text) else student}"


def _build_student(teacher: CitrusV, student: Any, seed: int = 0) -> CitrusV:
    if isinstance(student, CitrusV):
        return student
    if isinstance(student, str | os.PathLike):
        from citrus_edge.modelling.checkpoint import load_checkpoint

        return load_checkpoint(Path(student))
    from citrus_edge.modelling.student import make_student

    return make_student(teacher, student, seed=seed)


def _check_pair(teacher: CitrusV, student: CitrusV) -> None:
    t, s = teacher.config, student.config
    if s.tokens != t.tokens or s.text.vocab_size != t.text.vocab_size:
        raise ValueError(f"student {s.name}: its tokens/vocabulary differ from {t.name}'s")
    if s.preprocess != t.preprocess or s.vision.spatial_merge_size != t.vision.spatial_merge_size:
        raise ValueError(f"student {s.name}: its image preprocessing differs from {t.name}'s")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(step_module: DistillStep, batches: list[dict]) -> dict[str, float]:
    """Mean of each loss term over held-out batches (no gradients; the weights unchanged)."""
    was = step_module.training
    step_module.eval()
    acc: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in batches:
            for k, v in step_module(batch).items():
                acc.setdefault(k, []).append(float(v))
    step_module.train(was)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _truncate(path: Path, step: int) -> None:
    """Drop curve rows written after the checkpoint a resume starts from."""
    if not path.exists():
        return
    rows = [x for x in path.read_text().splitlines() if x and json.loads(x)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def distill(
    teacher_dir: Path,
    student: Any,
    cfg: Any,
    out_dir: Path,
    data: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    device: str | None = None,
) -> CitrusV:
    """Distil `student` from the teacher checkpoint at `teacher_dir` into `out_dir` (or resume
    the run there); returns the student and writes it as a checkpoint to `out_dir/model`.

    `student`: a StudentSpec (`compress.student_spec`, built by `modelling.student`), a
    checkpoint directory, or a CitrusV. `cfg`: a `compress.distill_config.DistillConfig`
    (duck-typed here: compress imports modelling, so modelling importing compress would close
    a folder cycle). `data`: a manifest (its `train` split trains, its `eval` split evaluates);
    None: fresh training phantoms and held-out phantoms. `progress` gets one dict per step
    (`kind` "step") and per evaluation (`kind` "eval"). Under torchrun: data-parallel (see the
    module docstring).
    """
    tc = TrainConfig(**cfg.train_fields())  # TypeError on a field TrainConfig lacks
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    world, rank, dev, created = _distributed(device)
    try:
        accum = cfg.accumulation(world)
        run = {
            "teacher": str(teacher_dir.resolve()),
            "student": describe_student(student),
            "data": None if data is None else str(Path(data).resolve()),
        }
        if not (teacher_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{teacher_dir}: no tokenizer.json (the teacher's tokenizer)")
        if rank == 0:
            cfg.check_or_write(out_dir, run)
        _barrier(world)
        threads = torch.get_num_threads()
        torch.set_num_threads(tc.threads)
        try:
            return _run(teacher_dir, student, cfg, tc, out_dir, data, progress, world, rank,
                        dev, accum)  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _run(teacher_dir, student_arg, cfg, tc, out_dir, data, progress, world, rank, dev,
         accum) -> CitrusV:  # fmt: skip
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint

    teacher = load_checkpoint(teacher_dir).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the training-only heads' initialisation
    student = _build_student(teacher, student_arg, cfg.seed)
    _check_pair(teacher, student)
    step_module = DistillStep(student, teacher, cfg, tc).to(dev)
    params = list(step_module.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    step = 0
    state_path = out_dir / STATE
    if state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location=dev)
        step_module.student.load_state_dict(st["student"])
        step_module.aux.load_state_dict(st["aux"])
        step_module.adapters.load_state_dict(st["adapters"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log.info("resumed at step %d", step)
        if rank == 0:
            _truncate(out_dir / "curve.jsonl", step)
            _truncate(out_dir / "eval.jsonl", step)
    model = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Not every parameter sees every micro-batch (no [SEG] in it: no mask decoder).
        model = DistributedDataParallel(step_module, find_unused_parameters=True)
    model_cfg = student.config
    tokenizer = teacher_dir / "tokenizer.json"
    source = SampleSource(model_cfg, tokenizer, data, "train")
    stream = RankStream(
        source, step, cfg.batch_size, cfg.micro_batch, accum, rank, offset=tc.data_start
    )
    loader = DataLoader(
        stream,
        batch_size=cfg.micro_batch,
        num_workers=1,
        collate_fn=lambda s: collate(s, model_cfg.tokens.pad),
        prefetch_factor=4,
    )
    eval_batches: list[dict] = []
    if rank == 0:
        eval_source = SampleSource(model_cfg, tokenizer, data, "eval")
        samples = [eval_source(i) for i in range(cfg.eval_samples)]
        eval_batches = [
            _to(collate(samples[i : i + cfg.micro_batch], model_cfg.tokens.pad), dev)
            for i in range(0, len(samples), cfg.micro_batch)
        ]

    def run_eval(at: int) -> None:
        if rank == 0:
            row = {"step": at, **evaluate(step_module, eval_batches)}
            _append(out_dir / "eval.jsonl", row)
            if progress is not None:
                progress({"kind": "eval", **row})
        _barrier(world)

    step_module.train()
    if step == 0:
        run_eval(0)
    batches = iter(loader)
    t0, acc = time.time(), {}
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = tc.lr_at(step)
        opt.zero_grad(set_to_none=True)
        for a in range(accum):
            batch = _to(next(batches), dev)
            sync = world > 1 and a < accum - 1
            with model.no_sync() if sync else contextlib.nullcontext():
                losses = model(batch)
                (losses["total"] / accum).backward()
            for k, v in losses.items():
                acc.setdefault(k, []).append(v.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if progress is not None and rank == 0:
            progress({"kind": "step", "step": step, "steps": cfg.steps,
                      **{k: v[-1] for k, v in acc.items()}})  # fmt: skip
        if step % cfg.log_every == 0 and rank == 0:
            row = {
                "step": step,
                "lr": tc.lr_at(step),
                "s_per_step": (time.time() - t0) / cfg.log_every,
            }
            row.update({k: float(np.mean(v)) for k, v in acc.items()})
            _append(out_dir / "curve.jsonl", row)
            t0, acc = time.time(), {}
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            if rank == 0:
                st = {
                    "student": student.state_dict(),
                    "aux": step_module.aux.state_dict(),
                    "adapters": step_module.adapters.state_dict(),
                }
                _save_state(state_path, {**st, "opt": opt.state_dict(), "step": step})
            _barrier(world)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            run_eval(step)
    student.eval()
    if rank == 0:
        save_checkpoint(student.to("cpu"), out_dir / MODEL_DIR, tokenizer_json=tokenizer)
    _barrier(world)
    return student


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _save_state(path: Path, state: dict) -> None:
    from citrus_edge.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


__all__ = [
    "EVAL_SEED_BASE",
    "KD_TERMS",
    "DistillStep",
    "describe_student",
    "distill",
    "evaluate",
    "feature_loss",
    "kl_loss",
    "mask_kd_loss",
    "seg_embedding_loss",
    "visual_loss",
]
