"""Train the shipped demo model: tokenizer, training run, export in the official layout.

`make demo-model` runs `train_demo_model`; it is resumable (re-run the same command after an
interruption) and deterministic from `TrainConfig.seed` and the phantom seeds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from citrus_edge.calib_data import tasks
from citrus_edge.calib_data.phantom import PhantomConfig, generate_phantom
from citrus_edge.config import DEMO, CitrusVConfig
from citrus_edge.preprocess import smart_resize
from citrus_edge.prompts import SYSTEM

from .train import TRAIN_SEED_BASE, TrainConfig, task_text, train

log = logging.getLogger(__name__)

# Phantoms whose texts train the tokenizer (a disjoint seed range from training and the sets).
TOKENIZER_SEEDS = range(TRAIN_SEED_BASE - 600, TRAIN_SEED_BASE)


def tokenizer_corpus(model_cfg: CitrusVConfig, phantom_cfg: PhantomConfig) -> list[str]:
    """Every prompt and answer form of the three tasks, from real phantom labels."""
    pp = model_cfg.preprocess
    hw = (phantom_cfg.height, phantom_cfg.width)
    resized = smart_resize(*hw, pp.factor, pp.min_pixels, pp.max_pixels)
    texts = [SYSTEM, "system", "user", "assistant", "0123456789"]
    for seed in TOKENIZER_SEEDS:
        ph = generate_phantom(seed, phantom_cfg)
        for task in tasks.TASKS:
            texts.extend(task_text(task, ph, resized))
    return texts


def build_tokenizer(out: Path, model_cfg: CitrusVConfig = DEMO) -> Path:
    """Write `tokenizer.json` for the demo vocabulary (kept if it already exists: resumable)."""
    from citrus_edge.tokenizer import build_demo_tokenizer

    path = out / "tokenizer.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tok = build_demo_tokenizer(
            tokenizer_corpus(model_cfg, PhantomConfig()), model_cfg.text.vocab_size
        )
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return path


def train_demo_model(out: Path, cfg: TrainConfig | None = None, model_cfg=DEMO) -> Path:
    """Tokenizer + training (resumable) + checkpoint in the official layout at `out/model`."""
    cfg = cfg or TrainConfig()
    from citrus_edge.checkpoint import save_checkpoint

    tok_path = build_tokenizer(out, model_cfg)
    model = train(model_cfg, cfg, out, tok_path)
    save_checkpoint(model, out / "model", tokenizer_json=tok_path)
    return out / "model"
