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
    ap.add_argument("--init-from", type=Path, default=None, help="continue from a checkpoint dir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = None if args.init_from is None else str(args.init_from)
    cfg = dataclasses.replace(TrainConfig(), steps=args.steps, init_from=init)
    print(train_demo_model(args.out, cfg))
