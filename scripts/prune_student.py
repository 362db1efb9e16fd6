"""Prune a Citrus-V checkpoint into a student checkpoint by a student spec, without training:
python scripts/prune_student.py CHECKPOINT SPEC OUT

`distill --student SPEC` prunes its own teacher; this writes the student of any checkpoint
(e.g. an already distilled student, to prune it further and distil it on with
`distill --student OUT`). SPEC is a preset name or the `key=value;...` form of
`compress.student_spec`. OUT is written like every checkpoint (`save_checkpoint`: atomically,
and never over a folder it did not write).
"""

import argparse
import sys
from pathlib import Path

from citrus_edge.compress.student_spec import StudentSpec, StudentSpecError
from citrus_edge.modelling.checkpoint import (
    CheckpointError,
    check_checkpoint_out,
    load_checkpoint,
    save_checkpoint,
)
from citrus_edge.modelling.student import make_student, param_count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("spec")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    try:
        spec = StudentSpec.parse(args.spec)
        check_checkpoint_out(args.out)
        if not (args.checkpoint / "config.json").is_file():
            raise CheckpointError(f"{args.checkpoint}: no config.json (not a checkpoint)")
        source = load_checkpoint(args.checkpoint)
        student = make_student(source, spec)
    except (StudentSpecError, CheckpointError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    tokenizer = args.checkpoint / "tokenizer.json"
    save_checkpoint(student, args.out, tokenizer if tokenizer.is_file() else None)
    print(f"{args.out}: {param_count(student):,} parameters (from {param_count(source):,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
