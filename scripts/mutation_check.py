"""A short mutation check of the shared host code: does the test suite notice small faults?

For each source file below, small faults (mutants) are made one at a time with Python's `ast`
(a comparison flipped, `+`/`-` and `*`/`/` swapped, an integer or float constant off by one,
`and`/`or` swapped, a `not` or unary minus dropped, argmax/argmin, min/max, floor/ceil and
any/all swapped, a returned value replaced by None), and the file's fast tests are run against
each. A mutant is *killed* when a test fails (or errors, or runs past the timeout) and
*survives* when every test passes.

The working tree is never touched: the repository (tracked and untracked, not ignored files, as
they are now) is copied to a temporary folder; symlinks in the copy's `citrus_edge` folder make
the stage folders its subpackages (`citrus_edge/runtime -> ../runtime`, as pyproject's
package-dir maps them), and the copy goes first on `sys.path` and in `PYTHONPATH`, ahead of
the editable install (checked before anything runs). Heavy libraries are imported once; each
mutant's tests run in a forked child that imports the project afresh from the copy (and are
killed, with anything they started, at the timeout).

    .venv/bin/python scripts/mutation_check.py               # every file, at most 40 mutants each
    .venv/bin/python scripts/mutation_check.py --max-per-file 0 citrus_edge/boxes.py   # all
    .venv/bin/python scripts/mutation_check.py runtime/onnxruntime_flavour.py \
        --tests tests/test_runtime_backends.py::test_one_flavour_is_accepted_and_named

Prints per file: mutants, killed, survived and the surviving mutations (line, what changed).
Exit status 1 when a file's kill rate is below `--min-kill` (default 0.90).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pyproject's [tool.setuptools.package-dir]: the stage folders are subpackages of citrus_edge.
STAGES = ("calib_data", "compress", "export", "engines", "runtime")
# Each file and the fast tests that exercise it (seconds, no bundle export).
TARGETS: dict[str, tuple[str, ...]] = {
    "citrus_edge/postprocess.py": ("tests/test_host_oracles.py",),
    "citrus_edge/boxes.py": ("tests/test_boxes.py", "tests/test_host_boxes.py"),
    "citrus_edge/preprocess.py": ("tests/test_host_oracles.py",),
    "runtime/decode.py": ("tests/test_runtime_decode.py",),
}
# Imported once in the parent so that each forked child starts with them loaded.
PRELOAD = (
    "numpy",
    "PIL.Image",
    "pytest",
    "torch",
    "torch.nn.functional",
    "tokenizers",
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
)

_COMPARE_SWAP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BINOP_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_NAME_SWAP = {
    "argmax": "argmin",
    "argmin": "argmax",
    "min": "max",
    "max": "min",
    "minimum": "maximum",
    "maximum": "minimum",
    "floor": "ceil",
    "ceil": "floor",
    "any": "all",
    "all": "any",
}
_SYMBOL = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.And: "and",
    ast.Or: "or",
}


@dataclass(frozen=True)
class Mutation:
    """One fault: the `site`-th node of the tree's walk, changed by `apply` (in place, on a
    copy of the tree); `line` and `what` describe it in the original source."""

    site: int
    line: int
    what: str
    apply: Callable[[ast.AST], ast.AST | None] = field(compare=False, repr=False)


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: annotations, docstrings, log calls and the messages of
    raised errors (their mutants change no behaviour a test should pin)."""
    skip: set[int] = set()

    def all_of(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            all_of(node.returns)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                all_of(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            all_of(node.annotation)
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in node.exc.args:
                all_of(arg)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logger"):
                all_of(node)
        elif isinstance(node, ast.JoinedStr):
            all_of(node)
    return skip


def _mutations_of(node: ast.AST, site: int) -> Iterator[Mutation]:
    line = getattr(node, "lineno", 0)
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = _COMPARE_SWAP.get(type(op))
            if new is not None:

                def apply(n, i=i, new=new):
                    n.ops[i] = new()

                yield Mutation(site, line, f"{_SYMBOL[type(op)]} -> {_SYMBOL[new]}", apply)
    elif isinstance(node, (ast.BinOp, ast.AugAssign)):
        new = _BINOP_SWAP.get(type(node.op))
        if new is not None:

            def apply(n, new=new):
                n.op = new()

            yield Mutation(site, line, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", apply)
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And

        def apply(n, new=new):
            n.op = new()

        yield Mutation(site, line, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", apply)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        sign = "not " if isinstance(node.op, ast.Not) else "-"
        yield Mutation(site, line, f"drop unary '{sign.strip()}'", lambda n: n.operand)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value

        def apply(n, v=v):
            n.value = v + 1

        yield Mutation(site, line, f"constant {v!r} -> {v + 1!r}", apply)
    elif isinstance(node, (ast.Name, ast.Attribute)):
        name = node.id if isinstance(node, ast.Name) else node.attr
        new = _NAME_SWAP.get(name)
        if new is not None and isinstance(node.ctx, ast.Load):

            def apply(n, new=new):
                if isinstance(n, ast.Name):
                    n.id = new
                else:
                    n.attr = new

            yield Mutation(site, line, f"{name} -> {new}", apply)
    elif isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):

            def apply(n):
                n.value = ast.Constant(None)

            yield Mutation(site, line, "return value -> None", apply)


def enumerate_mutations(source: str) -> list[Mutation]:
    """Every mutation of `source`, in a fixed order (the tree's breadth-first walk)."""
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    docstrings = {
        id(body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (body := n.body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
    }
    out = []
    for site, node in enumerate(ast.walk(tree)):
        if id(node) in skip or id(node) in docstrings:
            continue
        out.extend(_mutations_of(node, site))
    return out


def mutant_source(source: str, mutation: Mutation) -> str:
    """`source` with `mutation` applied (re-printed by `ast.unparse`: comments are lost)."""
    tree = copy.deepcopy(ast.parse(source))
    for site, node in enumerate(ast.walk(tree)):
        if site == mutation.site:
            replacement = mutation.apply(node)
            if replacement is not None:  # the node is replaced by one of its children
                _replace(tree, node, replacement)
            break
    return ast.unparse(ast.fix_missing_locations(tree))


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                value[[v is old for v in value].index(True)] = new
                return
    raise AssertionError("node to replace not found")


def select(mutations: list[Mutation], cap: int) -> list[Mutation]:
    """At most `cap` mutations spread evenly over the file (all when `cap` is 0)."""
    if cap <= 0 or len(mutations) <= cap:
        return mutations
    return [mutations[(i * len(mutations)) // cap] for i in range(cap)]


def copy_repository(dest: Path) -> None:
    """Copy the working tree's files (tracked, and untracked but not ignored) into `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        src = REPO / raw.decode()
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dest / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / raw.decode())


def link_stages(copy_root: Path) -> None:
    """Make the copy's `citrus_edge` folder the whole package: a symlink per stage folder
    (`citrus_edge/runtime -> ../runtime`, ...), so that the copy imports as installed whether
    it is found through `sys.path`/`PYTHONPATH` or as the current directory."""
    for stage in STAGES:
        (copy_root / "citrus_edge" / stage).symlink_to(Path("..") / stage)


@dataclass
class FileResult:
    path: str
    total: int  # mutations the file offers
    killed: list[tuple[Mutation, str]] = field(default_factory=list)  # (mutation, how)
    survived: list[Mutation] = field(default_factory=list)
    baseline_s: float = 0.0

    @property
    def tried(self) -> int:
        return len(self.killed) + len(self.survived)

    @property
    def kill_rate(self) -> float:
        return len(self.killed) / self.tried if self.tried else 1.0


def run_tests(copy_root: Path, tests: tuple[str, ...], timeout: float, log: Path) -> str:
    """Run `tests` in a forked child against the copy: "pass", "fail", "error" or "timeout"."""
    pid = os.fork()
    if pid == 0:  # child: a fresh import of the project from the copy, then pytest
        code = 3
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy_root)
            for name in [m for m in sys.modules if m == "citrus_edge" or m.startswith("citrus_")]:
                del sys.modules[name]
            import pytest

            args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
            code = int(pytest.main(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {0: "pass", 1: "fail"}.get(code, "error")
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)  # the child and whatever it started
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def check_file(
    copy_root: Path, rel: str, tests: tuple[str, ...], cap: int, logs: Path
) -> FileResult:
    target = copy_root / rel
    original = target.read_text()
    mutations = enumerate_mutations(original)
    chosen = select(mutations, cap)
    result = FileResult(rel, len(mutations))
    stem = rel.replace("/", "_")
    try:
        target.write_text(ast.unparse(ast.parse(original)))  # the baseline: re-printed, unmutated
        t0 = time.monotonic()
        outcome = run_tests(copy_root, tests, 600, logs / f"{stem}.baseline.log")
        result.baseline_s = time.monotonic() - t0
        if outcome != "pass":
            tail = (logs / f"{stem}.baseline.log").read_text()[-3000:]
            raise SystemExit(f"{rel}: its tests do not pass unmutated ({outcome}):\n{tail}")
        timeout = 3 * result.baseline_s + 10
        for k, m in enumerate(chosen):
            target.write_text(mutant_source(original, m))
            outcome = run_tests(copy_root, tests, timeout, logs / f"{stem}.{k:03d}.log")
            if outcome == "pass":
                result.survived.append(m)
            else:
                result.killed.append((m, outcome))
            print(f"  {rel}:{m.line} {m.what}: {outcome}", file=sys.stderr, flush=True)
    finally:
        target.write_text(original)
    return result


def report(results: list[FileResult]) -> str:
    lines = [
        f"{'file':<28} {'offered':>7} {'tried':>5} {'killed':>6} {'survived':>8} {'kill %':>6}"
    ]
    for r in results:
        lines.append(
            f"{r.path:<28} {r.total:>7} {r.tried:>5} {len(r.killed):>6} {len(r.survived):>8} "
            f"{100 * r.kill_rate:>6.1f}"
        )
    tried = sum(r.tried for r in results)
    killed = sum(len(r.killed) for r in results)
    lines.append(
        f"{'all':<28} {'':>7} {tried:>5} {killed:>6} {tried - killed:>8} "
        f"{100 * killed / max(tried, 1):>6.1f}"
    )
    for r in results:
        how = {}
        for _, h in r.killed:
            how[h] = how.get(h, 0) + 1
        lines.append(
            f"\n{r.path}: tests {' '.join(TARGETS[r.path])} (baseline "
            f"{r.baseline_s:.1f} s); killed by {how}"
        )
        for m in r.survived:
            lines.append(f"  survived: line {m.line}: {m.what}")
    return "\n".join(lines)


def _check_imports_from(copy_root: Path) -> None:
    """New Python processes (as a test's subprocess would be), started in the copy or
    elsewhere, import the copy, not the working tree through the editable install."""
    probe = (
        "import citrus_edge.runtime.decode as d, citrus_edge as c; print(d.__file__, c.__file__)"
    )
    for cwd in (copy_root, copy_root.parent):
        found = subprocess.run(
            [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.split()
        if not all(f.startswith(str(copy_root)) for f in found):
            raise SystemExit(f"the copy is not what imports ({found}); stopped, nothing was run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(TARGETS), help="files of TARGETS")
    parser.add_argument("--max-per-file", type=int, default=40, help="0: every mutant")
    parser.add_argument("--min-kill", type=float, default=0.90)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and logs")
    parser.add_argument(
        "--tests",
        help="comma-separated pytest paths or node ids to run instead of TARGETS' (then any "
        "file of the repository may be named)",
    )
    args = parser.parse_args(argv)
    if args.tests:
        TARGETS.update({f: tuple(args.tests.split(",")) for f in args.files})
    unknown = [f for f in args.files if f not in TARGETS or not (REPO / f).is_file()]
    if unknown:
        parser.error(f"no tests are listed for {unknown} (or no such file); known: {list(TARGETS)}")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant must never run a stale .pyc
    sys.dont_write_bytecode = True
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(f"preload {name}: {e}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="citrus-mutation-"))
    try:
        copy_root, logs = work / "repo", work / "logs"
        logs.mkdir()
        copy_repository(copy_root)
        link_stages(copy_root)
        sys.path.insert(0, str(copy_root))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(copy_root), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        _check_imports_from(copy_root)
        t0 = time.monotonic()
        results = [
            check_file(copy_root, rel, TARGETS[rel], args.max_per_file, logs) for rel in args.files
        ]
        print(report(results))
        print(f"\n{time.monotonic() - t0:.0f} s; copy at {work}" if args.keep else "")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.kill_rate >= args.min_kill for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
