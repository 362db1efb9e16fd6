"""What one distillation run does: its loss weights and schedule (torch-free).

Serialised as `distill_config.json` next to the run's checkpoints; resuming checks it (and the
run's teacher, student and data) unchanged, as training does with `train_config.json`.

The ground-truth terms (LM, mask, IoU, training-only heads) and the optimiser's settings are
the training loop's own: `train` holds overrides of `citrus_edge.modelling.train.TrainConfig`
fields by name (its GT weights `w_lm`, `w_mask`, ..., `min_lr`, `weight_decay`, ...), checked
when the run builds its TrainConfig. `w_gt` scales all ground-truth terms at once (0: distil
from unlabelled images only).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citrus_edge.atomic import atomic_path

# 2: the visual-token term (`w_vis`) and the SAM2-width adapters in `state.pt`; a version-1
# run folder is refused on resume (its settings differ: version, w_vis).
DISTILL_CONFIG_VERSION = 2
CONFIG_NAME = "distill_config.json"
SEG_LOSSES = ("cosine", "mse")
# TrainConfig fields that DistillConfig sets itself (or that make no sense in a distillation).
OWN_FIELDS = ("steps", "batch_size", "lr", "warmup", "seed", "ckpt_every", "init_from", "version")


class DistillConfigError(ValueError):
    """A distillation setting is out of range, or a resumed run's settings changed."""


# TrainConfig fields a `--train KEY=VALUE` may set, and their kinds (kept here, torch-free, so
# that the CLI checks them before torch loads; tests/test_distill.py checks them against
# TrainConfig): the ground-truth weights and heads, the LR floor and weight decay.
TRAIN_OPTIONS: dict[str, Any] = {
    **dict.fromkeys(
        ("w_lm", "w_mask", "w_iou", "w_aux", "w_mask_aux", "w_first", "w_count", "w_centre"), float
    ),
    "min_lr": float,
    "weight_decay": float,
    "centre_loss": ("bce", "focal"),
}


def parse_train_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of `TRAIN_OPTIONS` -> (key, value); one-line `DistillConfigError` if bad."""
    key, sep, raw = (s.strip() for s in text.partition("="))
    kind = TRAIN_OPTIONS.get(key)
    if not sep or kind is None:
        raise DistillConfigError(
            f"--train {text!r}: expected KEY=VALUE with KEY one of {', '.join(TRAIN_OPTIONS)}"
        )
    if isinstance(kind, tuple):
        if raw not in kind:
            raise DistillConfigError(f"--train {text!r}: {key} is one of {', '.join(kind)}")
        return key, raw
    try:
        value = float(raw)
    except ValueError:
        raise DistillConfigError(f"--train {text!r}: {raw!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise DistillConfigError(f"--train {text!r}: expected a finite number >= 0")
    return key, value


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. Loss weights of 0 switch a term off (and skip its work)."""

    w_kl: float = 1.0  # KL(teacher || student) on the answer tokens' logits
    temperature: float = 2.0  # of the KL (the loss is scaled by T^2, as Hinton et al.)
    # The same KL once more on each answer's first token alone (the lesion count or the
    # lesion/no-lesion decision), as TrainConfig.w_first weights its cross-entropy: averaged over
    # all answer tokens the KL gives the decision token a few percent of its weight.
    w_kl_first: float = 0.0
    w_seg: float = 1.0  # the [SEG] embedding after the seg projector (the SAM2 prompt token)
    seg_loss: str = "cosine"  # SEG_LOSSES
    w_mask_kd: float = 1.0  # BCE + Dice of the student's mask logits against the teacher's
    w_feat: float = 1.0  # MSE on the SAM2 image embeddings (needs no labels)
    w_vis: float = 1.0  # normalised MSE on the visual tokens (merger output; needs no labels)
    w_gt: float = 1.0  # scale of every ground-truth term (TrainConfig's weights inside)
    steps: int = 1000
    batch_size: int = 8  # global: summed over processes and micro-batches
    micro_batch: int = 2  # samples per forward pass; batch_size / (processes * micro_batch)
    lr: float = 3e-4
    warmup: int = 20
    seed: int = 0
    eval_every: int = 100  # 0: evaluate only at the start and the end
    eval_samples: int = 8  # held-out phantoms of the periodic evaluation
    ckpt_every: int = 50
    log_every: int = 10
    train: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides, e.g. (("w_mask", 2.0),)
    version: int = DISTILL_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple((str(k), v) for k, v in dict(self.train).items()))
        weights = ("w_kl", "w_kl_first", "w_seg", "w_mask_kd", "w_feat", "w_vis", "w_gt")
        for name in weights:
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise DistillConfigError(f"{name} {v!r}: expected a finite weight >= 0")
        if not any(getattr(self, n) > 0 for n in weights):
            raise DistillConfigError("every loss weight is 0: nothing to train")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistillConfigError(f"temperature {self.temperature!r}: expected > 0")
        if self.seg_loss not in SEG_LOSSES:
            raise DistillConfigError(f"seg_loss {self.seg_loss!r} is not one of {SEG_LOSSES}")
        for name in ("steps", "batch_size", "micro_batch", "log_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise DistillConfigError(f"{name} {getattr(self, name)}: expected >= 1")
        for name in ("warmup", "eval_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise DistillConfigError(f"{name} {getattr(self, name)}: expected >= 0")
        if self.batch_size % self.micro_batch:
            raise DistillConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro_batch}"
            )
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise DistillConfigError(f"lr {self.lr!r}: expected >= 0")
        clash = sorted(k for k, _ in self.train if k in OWN_FIELDS)
        if clash:
            raise DistillConfigError(
                f"train overrides {clash}: set them on DistillConfig itself, not in `train`"
            )

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per process and step; raises unless the global batch splits evenly."""
        per = self.micro_batch * world_size
        if self.batch_size % per:
            raise DistillConfigError(
                f"batch_size {self.batch_size} does not split into {world_size} processes x "
                f"micro_batch {self.micro_batch}; choose a multiple of {per}"
            )
        return self.batch_size // per

    def train_fields(self) -> dict[str, Any]:
        """Keyword arguments of the run's TrainConfig (schedule, optimiser, GT weights)."""
        own = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup": self.warmup,
            "seed": self.seed,
            "ckpt_every": self.ckpt_every,
            "log_every": self.log_every,
        }
        return {**own, **dict(self.train)}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = dict(self.train)
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        if data.get("version") != DISTILL_CONFIG_VERSION:
            raise DistillConfigError(
                f"distill config version {data.get('version')!r} is not {DISTILL_CONFIG_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DistillConfigError(f"distill config: unknown fields {unknown}")
        data = dict(data)
        data["train"] = tuple(dict(data.get("train", {})).items())
        return cls(**data)

    def check_or_write(self, out_dir: Path, run: dict[str, Any]) -> bool:
        """Write `distill_config.json` (the config and `run`: teacher, student, data); when a
        `state.pt` is already there (a resume), require both unchanged instead. Returns whether
        this is a resume."""
        path = Path(out_dir) / CONFIG_NAME
        current = json.loads(json.dumps({"config": self.to_dict(), "run": run}))
        if (Path(out_dir) / "state.pt").exists() and path.exists():
            saved = json.loads(path.read_text())
            try:  # a field added since the run started reads as its default
                saved["config"] = DistillConfig.from_dict(saved["config"]).to_dict()
            except (DistillConfigError, KeyError, TypeError):
                pass  # compared as saved: the difference names what changed
            changed = sorted(
                f"{part}.{k}"
                for part in ("config", "run")
                for k in current[part].keys() | saved.get(part, {}).keys()
                if current[part].get(k) != saved.get(part, {}).get(k)
            )
            if changed:
                raise DistillConfigError(
                    f"{path}: resuming with different settings ({', '.join(changed)}); use a new "
                    "output directory or the saved settings"
                )
            return True
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(current, indent=2))
        return False
