"""Retrain the shipped demo model from phantoms (resumable): python scripts/train_demo.py --out runs/demo

Runs the stages of `compress.demo_model.DEMO_STAGES` into OUT/stageN and writes OUT/model.
"""

import argparse
import logging
from pathlib import Path

from citrus_edge.modelling.demo_training import train_demo_model

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(train_demo_model(args.out))
