"""The house rules of the package layout, checked on the source (issue 17).

Every module under the project's packages is parsed with `ast`; each `import` is recorded with
the module it resolves to and where it sits: at module level (run on import, class bodies and
`try`/`if` blocks included), inside a function or method (run on call), or under
`if TYPE_CHECKING:` (never run). Nothing is imported, so the rules hold whatever is installed.

Folders: `citrus_edge.<name>` is the folder `<name>` when it is a package (the stages, and the
subpackages `citrus_edge/` grows, such as the modelling one); the plain modules directly in
`citrus_edge/` are the folder "core". Dynamic imports (`importlib.import_module`) are not seen;
today each stays inside its own folder (compress/registry.py, engines/__init__.py,
runtime/backends.py).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "citrus_edge"

# Installed package -> source folder, as `[tool.setuptools.package-dir]` in pyproject.toml says
# (checked by test_package_map_matches_pyproject). Subpackages inside these folders are found by
# walking them, so a new `citrus_edge/modelling/` needs no entry here.
PACKAGE_DIRS = {
    "citrus_edge": "citrus_edge",
    "citrus_edge.calib_data": "calib_data",
    "citrus_edge.compress": "compress",
    "citrus_edge.export": "export",
    "citrus_edge.engines": "engines",
    "citrus_edge.runtime": "runtime",
}

# The build pipeline, left to right. A stage may import the stages to its left; to its right only
# the runtime's public API (the names `runtime/__init__.py` lists in `__all__`).
PIPELINE = ("calib_data", "compress", "export", "engines", "runtime")

# For the cycle message: the intended layering, each folder importing only folders to its left.
# Folders not listed (the orchestration and CLI subpackage to come) rank last.
LAYERS = ("core", "modelling", *PIPELINE)

# What the runtime (the cart's library) must never import, at any scope: the build-time stages,
# and the modelling subpackage (torch).
RUNTIME_FORBIDDEN = ("export", "compress", "modelling")
# What the runtime may import only inside a function (the TensorRT engine checks it needs when a
# TensorRT backend starts), never at module level.
RUNTIME_LAZY_ONLY = ("engines",)

# Folders allowed to import torch or transformers at module level. Issue 17: "no module outside
# the modelling subpackage imports torch or transformers at module level"; the modelling
# subpackage is to be `citrus_edge/modelling/` (folder "modelling"). The build-time stages
# (compress/, export/) are not exempt: their torch code imports torch inside the functions that
# need it or lives in the modelling subpackage. Should the restructure decide that the export
# stage is modelling by nature, adding "export" here is the one-line change.
TORCH_ALLOWED_FOLDERS = ("modelling",)
# Module-level imports that load torch or transformers: these packages and their submodules.
TORCH_MODULES = ("torch", "transformers", "safetensors.torch", "modelopt.torch")

# File names that may repeat: every package has them.
REPEATABLE_NAMES = ("__init__.py", "__main__.py")

# Not code: data folders inside the packages.
SKIP_DIRS = ("demo_model", "__pycache__")


@dataclass(frozen=True)
class Import:
    path: str  # source file, relative to the repository root
    line: int
    module: str  # the imported module, resolved to an absolute dotted name
    names: tuple[str, ...]  # for `from module import a, b`: ("a", "b"); for `import module`: ()
    scope: str  # "module", "function" or "type_checking"
    source: str  # the module the import sits in

    @property
    def where(self) -> str:
        shown = f"from {self.module} import {', '.join(self.names)}" if self.names else self.module
        return f"{self.path}:{self.line} {shown} ({self.scope})"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module the packages install."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if any(part in SKIP_DIRS for part in rel.parts):
                continue
            # Only files inside packages (every folder on the way has an __init__.py).
            if any(not (base / Path(*rel.parts[:i]) / "__init__.py").is_file()
                   for i in range(len(rel.parts))):  # fmt: skip
                continue
            parts = [*package.split("."), *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            # A nested folder that is also installed as its own package is walked there.
            if name in found:
                continue
            found[name] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def folder_of(module: str) -> str | None:
    """The folder a project module belongs to; None for anything outside the project."""
    parts = module.split(".")
    if parts[0] != TOP:
        return None
    if len(parts) >= 2 and f"{TOP}.{parts[1]}" in PACKAGES:
        return parts[1]
    if module == f"{TOP}.__main__":  # `python -m citrus_edge`: an entry point of the CLI
        return "cli"
    return "core"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(node: ast.ImportFrom, source: str) -> str:
    if not node.level:
        return node.module or ""
    package = source if source in PACKAGES else source.rpartition(".")[0]
    parts = package.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _imports_of(source: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(rel, node.lineno, alias.name, (), scope, source))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, source)
            if base == "__future__":
                return
            plain = [a.name for a in node.names if f"{base}.{a.name}" not in MODULES]
            for alias in node.names:  # `from package import submodule` imports the submodule
                if f"{base}.{alias.name}" in MODULES:
                    found.append(Import(rel, node.lineno, f"{base}.{alias.name}", (), scope,
                                        source))  # fmt: skip
            if plain:
                found.append(Import(rel, node.lineno, base, tuple(plain), scope, source))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, "function")
        elif isinstance(node, ast.If) and scope == "module" and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type_checking")
            for child in node.orelse:
                visit(child, scope)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, scope)

    visit(tree, "module")
    return found


IMPORTS = [imp for name, path in sorted(MODULES.items()) for imp in _imports_of(name, path)]


def _report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


def _runtime_public_names() -> set[str]:
    """What `citrus_edge.runtime` offers: its `__all__` (else its top-level public names)."""
    tree = ast.parse(MODULES[f"{TOP}.runtime"].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {ast.literal_eval(elt) for elt in node.value.elts}  # type: ignore[attr-defined]
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def _is_runtime_public(imp: Import, public: set[str]) -> bool:
    if imp.module != f"{TOP}.runtime":
        return False  # a submodule: `citrus_edge.runtime.pipeline` is not the public API
    return all(name in public and not name.startswith("_") for name in imp.names)


def _sorted(imports: list[Import]) -> list[Import]:
    return sorted(imports, key=lambda imp: (imp.path, imp.line, imp.module))


def _rank(folder: str) -> int:
    return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)


def _shortest_path(edges: dict[tuple[str, str], list[Import]], start: str, goal: str) -> list[str]:
    """Folders from start to goal along edges (breadth first); [] if none."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])  # type: ignore[arg-type]
            return path[::-1]
        for src, dst in sorted(edges):
            if src == node and dst not in previous:
                previous[dst] = node
                queue.append(dst)
    return []


def _folder_edges() -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in IMPORTS:
        src, dst = folder_of(imp.source), folder_of(imp.module)
        if dst is not None and src != dst:
            edges[(src, dst)].append(imp)  # type: ignore[index]
    return edges


def _cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """Strongly connected components of more than one folder (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return components


# --- the parser itself --------------------------------------------------------------------------


def test_package_map_matches_pyproject():
    # No tomllib: the project supports Python 3.10. The table is `"package" = "folder"` lines.
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    assert dict(re.findall(r'^"([\w.]+)"\s*=\s*"([\w./]+)"', table, re.MULTILINE)) == PACKAGE_DIRS


def test_parser_sees_every_package_and_both_scopes():
    assert {folder_of(name) for name in MODULES} >= {"core", *PIPELINE}
    scopes = {imp.scope for imp in IMPORTS}
    assert {"module", "function", "type_checking"} <= scopes
    # `from .pipeline import Pipeline` inside runtime/__init__.py's __getattr__ resolves.
    assert any(imp.source == f"{TOP}.runtime" and imp.module == f"{TOP}.runtime.pipeline"
               and imp.scope == "function" for imp in IMPORTS)  # fmt: skip
    unresolved = sorted(
        imp.where for imp in IMPORTS
        if imp.module.startswith(f"{TOP}.") and imp.module not in MODULES
    )  # fmt: skip
    assert not unresolved, _report("imports of project modules that do not exist", unresolved)


# --- the house rules (issue 17) -----------------------------------------------------------------


def test_core_imports_no_stage():
    """The torch-free core (citrus_edge/*.py) is what everyone shares: it imports no stage, no
    modelling and no CLI (any scope)."""
    bad = [
        f"core -> {folder_of(imp.module)}: {imp.where}"
        for imp in _sorted(IMPORTS)
        if folder_of(imp.source) == "core" and folder_of(imp.module) not in (None, "core")
    ]
    assert not bad, _report("the core importing a stage, the modelling or the CLI", bad)


def test_runtime_imports_no_build_time_stage():
    """The runtime imports nothing from export/ or compress/, and engines/ only in functions."""
    bad = []
    for imp in _sorted(IMPORTS):
        if folder_of(imp.source) != "runtime":
            continue
        dst = folder_of(imp.module)
        if dst in RUNTIME_FORBIDDEN or (dst in RUNTIME_LAZY_ONLY and imp.scope == "module"):
            bad.append(imp.where)
    assert not bad, _report(
        f"the runtime imports {'/'.join(RUNTIME_FORBIDDEN)} (any scope) or "
        f"{'/'.join(RUNTIME_LAZY_ONLY)} (module level)",
        bad,
    )


def test_no_stage_imports_a_stage_to_its_right():
    """calib_data -> compress -> export -> engines -> runtime; rightward only the runtime's
    public API (`from citrus_edge.runtime import <name in __all__>`)."""
    public = _runtime_public_names()
    bad = []
    for imp in _sorted(IMPORTS):
        src, dst = folder_of(imp.source), folder_of(imp.module)
        if src not in PIPELINE or dst not in PIPELINE:
            continue
        if PIPELINE.index(dst) <= PIPELINE.index(src):
            continue
        if dst == "runtime" and _is_runtime_public(imp, public):
            continue
        bad.append(f"{src} -> {dst}: {imp.where}")
    assert not bad, _report(
        f"stages importing a stage to their right (runtime public API: {sorted(public)})",
        bad,
    )


def test_only_modelling_imports_torch_at_module_level():
    bad = []
    for imp in _sorted(IMPORTS):
        if imp.scope != "module" or folder_of(imp.source) in TORCH_ALLOWED_FOLDERS:
            continue
        if any(imp.module == m or imp.module.startswith(f"{m}.") for m in TORCH_MODULES):
            bad.append(imp.where)
    files = sorted({line.split(":")[0] for line in bad})
    assert not bad, _report(
        f"module-level torch/transformers imports outside {TORCH_ALLOWED_FOLDERS} "
        f"in {len(files)} modules",
        bad,
    )


def test_no_cycle_between_folders():
    """Folder graph over every import (module level, in functions, under TYPE_CHECKING). The
    message lists, per cycle, every import that runs against LAYERS with one cycle it closes."""
    edges = _folder_edges()
    lines = []
    for component in _cycles(edges):
        inner = {e: imps for e, imps in edges.items() if e[0] in component and e[1] in component}
        summary = ", ".join(f"{s}->{d} ({len(i)})" for (s, d), i in sorted(inner.items()))
        lines.append(f"cycle among {component}; folder edges: {summary}")
        for (src, dst), imps in sorted(inner.items()):
            if _rank(dst) < _rank(src):
                continue  # imports leftwards: the layering wants this edge
            loop = " -> ".join([src, *_shortest_path(inner, dst, src)])
            lines.append(f"  {src} -> {dst}, closing {loop} ({len(imps)} imports):")
            lines.extend(f"    {imp.where}" for imp in _sorted(imps))
    assert not lines, "folder cycles:\n  " + "\n  ".join(lines)


def test_module_names_are_unique():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in MODULES.values():
        if path.name not in REPEATABLE_NAMES:
            by_name[path.name].append(path.relative_to(ROOT).as_posix())
    bad = [f"{name}: {', '.join(sorted(paths))}"
           for name, paths in sorted(by_name.items()) if len(paths) > 1]  # fmt: skip
    assert not bad, _report("file names used by more than one module", bad)
