"""Retrain the shipped demo model from phantoms (resumable): python scripts/train_demo.py --out runs/demo"""

import argparse
import dataclasses
import logging
from pathlib import Path

from citrus_edge.compress.demo_model import train_demo_model
from citrus_edge.compress.train import TrainConfig

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = dataclasses.replace(TrainConfig(), steps=args.steps)
    print(train_demo_model(args.out, cfg))
