"""Throughput of the phantom generator, the DICOM writer and a whole phantom set.

Usage: python scripts/bench_phantoms.py [--n 200] [--set-n 500]
Prints images/s for each stage (single process).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from citrus_edge.calib_data.dicom_writer import write_us_dicom
from citrus_edge.calib_data.phantom import generate_phantom
from citrus_edge.calib_data.phantom_set import write_phantom_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="phantoms for the per-stage timings")
    parser.add_argument("--set-n", type=int, default=500, help="images in the whole-set timing")
    args = parser.parse_args()

    start = time.perf_counter()
    phantoms = [generate_phantom(seed) for seed in range(args.n)]
    gen_s = time.perf_counter() - start
    print(f"generate_phantom: {args.n / gen_s:7.1f} images/s ({gen_s:.2f} s for {args.n})")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for phantom in phantoms:
            path = Path(tmp) / f"{phantom.seed}.dcm"
            write_us_dicom(path, phantom.image, phantom.spacing_mm, seed=phantom.seed)
        dcm_s = time.perf_counter() - start
        print(f"write_us_dicom:   {args.n / dcm_s:7.1f} images/s ({dcm_s:.2f} s for {args.n})")

        start = time.perf_counter()
        write_phantom_set(Path(tmp) / "set", args.set_n)
        set_s = time.perf_counter() - start
        print(
            f"write_phantom_set: {args.set_n / set_s:6.1f} images/s "
            f"({set_s:.2f} s for {args.set_n}, DICOM + masks + labels + manifest)"
        )


if __name__ == "__main__":
    main()
