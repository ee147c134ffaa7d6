"""The layers of docs/ARCHITECTURE.md, enforced: every import of every module of the package,
at any depth (functions, ``TYPE_CHECKING`` blocks, ``importlib.import_module("...")``),
relative ones resolved, is checked against the rules below. A failure lists every forbidden
edge at once, as ``file:line: importer -> imported: rule``.

Rules (the *unit* of a module is its top-level subpackage or module: ``slide``, ``pipeline``,
``_qt``, ...):

1. The core (every unit but ``_qt`` and the npe2 entry points) never imports Qt or napari
   (:data:`GUI`), nor ``_qt``, nor an entry point.
2. A unit imports only the units :data:`MAY_IMPORT` gives it, plus the package-level shared
   modules (:data:`SHARED`) and the package root (``__version__``). A shared module imports
   only the shared modules its own :data:`MAY_IMPORT` row names (``_weights`` -> ``_inert``,
   ``_io``).
3. No module imports a private name (a leading underscore: a module or an attribute) of
   another unit. The shared modules ``_inert``, ``_io``, ``_malloc``, ``_weights`` and the
   entry points are private by name only; their *public* names may be imported where rule 2
   allows.
4. Every unit of the package is in :data:`MAY_IMPORT` and named in docs/ARCHITECTURE.md, and
   napari.yaml points only at entry points and ``_qt``.

Edges in :data:`EXCEPTIONS` are allowed for the reason given (and must be imported inside a
function); edges in :data:`PENDING` are known violations in files being edited by others,
each with its fix. Both lists must stay true: an entry that no longer occurs fails the test.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import napari_milview

PKG = "napari_milview"
ROOT = Path(napari_milview.__file__).resolve().parent
REPO = ROOT.parent

#: GUI toolkits the core never imports (top-level package names).
GUI = frozenset({"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "napari_builtins",
                 "magicgui", "superqt", "vispy"})
#: The npe2 entry points (napari.yaml's python_name targets besides ``_qt``).
ENTRY_POINTS = frozenset({"_reader", "_writer", "_sample_data"})
#: Package-level modules any unit may import (they import only each other, as their
#: :data:`MAY_IMPORT` rows say).
SHARED = frozenset({"_inert", "_io", "_malloc", "_weights", "assets"})
#: The front end: may import Qt and napari.
FRONT = frozenset({"_qt"}) | ENTRY_POINTS

_PIPELINE_AND_BELOW = frozenset({"pipeline", "slide", "tissue", "features", "mil", "result"})
#: unit -> the units (besides itself, :data:`SHARED` and the root) it may import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    # shared, package-level: the stand-ins, files, malloc and assets import nothing of ours;
    # the weight reader uses the stand-ins and the file checks
    "_inert": frozenset(), "_io": frozenset(), "_malloc": frozenset(), "assets": frozenset(),
    "_weights": frozenset({"_inert", "_io"}),
    # foundations: nothing of ours
    "slide": frozenset(), "tissue": frozenset(), "features": frozenset(), "mil": frozenset(),
    "result": frozenset(), "synthetic": frozenset(),
    # composition
    "pipeline": frozenset({"slide", "tissue", "features", "mil", "result"}),
    "overlay": frozenset({"slide", "result"}),
    # drivers: the pipeline and below, and the overlays (exports)
    "stain": _PIPELINE_AND_BELOW | {"overlay"},
    "evidence": _PIPELINE_AND_BELOW | {"overlay"},
    "cohort": _PIPELINE_AND_BELOW | {"overlay"},
    # the docks' background runs (Qt-free): the MIL run path, the staining runs, the evidence
    "jobs": _PIPELINE_AND_BELOW | {"stain", "evidence"},
    # front ends
    "cli": _PIPELINE_AND_BELOW | {"overlay", "stain", "evidence", "cohort", "synthetic"},
}
CORE = frozenset(MAY_IMPORT)
# entry points and docks: the whole core; the docks also use the entry points' public names
# (the slide-file patterns of the manifest), the entry points each other (sample -> reader)
MAY_IMPORT.update(dict.fromkeys(ENTRY_POINTS, CORE | ENTRY_POINTS))
MAY_IMPORT["_qt"] = CORE | ENTRY_POINTS
#: Units DESIGN.md plans that do not exist yet (allowed in the table, not required on disk).
PLANNED: frozenset[str] = frozenset()

#: (importing module, imported module or name) -> why it is allowed. Imported inside a function.
EXCEPTIONS = {
    ("napari_milview.cli", "napari_milview._qt.demo.run_demo"):
        "`milview demo` is the one CLI command that is a GUI: it opens napari with the docks; "
        "imported inside the command, so `import napari_milview.cli` stays Qt-free",
}
#: Known violations in modules others are editing now: (importer, imported) -> the fix.
PENDING = {
}


# ------------------------------------------------------------------------------ the walker
@dataclass(frozen=True)
class Edge:
    path: str  # repository-relative file
    line: int
    importer: str  # dotted module
    target: str  # dotted module, or module.name for `from module import name`
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.target}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module of ``from <level dots><module> import ...`` in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


class _Imports(ast.NodeVisitor):
    """Every import statement and ``import_module`` call, with whether it is inside a
    function (a lazy import)."""

    def __init__(self, importer: str, is_package: bool, path: str):
        self.importer, self.is_package, self.path = importer, is_package, path
        self.edges: list[Edge] = []
        self.unfollowed: list[str] = []
        self._depth = 0

    def _add(self, node: ast.AST, target: str) -> None:
        self.edges.append(Edge(self.path, node.lineno, self.importer, target, self._depth > 0))

    def _function(self, node) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.importer, self.is_package, node.level, node.module)
        for alias in node.names:
            self._add(node, base if alias.name == "*" else f"{base}.{alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                self._add(node, _resolve(self.importer, self.is_package, level,
                                         arg.value.lstrip(".") or None) if level else arg.value)
            elif not _own_package_fstring(arg):
                self.unfollowed.append(f"{self.path}:{node.lineno}: {self.importer}: "
                                       f"{name}() of a computed name the check cannot follow")
        self.generic_visit(node)


def _own_package_fstring(arg: ast.AST) -> bool:
    """``f"{__package__}.{x}"``: a module of the importer's own package."""
    return (isinstance(arg, ast.JoinedStr) and bool(arg.values)
            and isinstance(arg.values[0], ast.FormattedValue)
            and isinstance(arg.values[0].value, ast.Name)
            and arg.values[0].value.id == "__package__")


def collect(files: dict[str, tuple[str, bool, str]]) -> tuple[list[Edge], list[str]]:
    """``files``: module -> (repository path, is a package ``__init__``, source)."""
    edges, unfollowed = [], []
    for mod, (path, is_package, source) in sorted(files.items()):
        v = _Imports(mod, is_package, path)
        v.visit(ast.parse(source, filename=path))
        edges += v.edges
        unfollowed += v.unfollowed
    return edges, unfollowed


def package_files() -> dict[str, tuple[str, bool, str]]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        out[module_name(p)] = (p.relative_to(REPO).as_posix(), p.name == "__init__.py",
                               p.read_text(encoding="utf-8"))
    return out


# ------------------------------------------------------------------------------ the rules
def unit(module: str) -> str:
    """``napari_milview.slide.core`` -> ``slide``; the root (and ``__version__``) -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("__") else ""


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _may_import(src: str, dst: str) -> bool:
    """Whether unit ``src`` may import another unit ``dst``: its :data:`MAY_IMPORT` row, and
    the shared modules unless ``src`` is one itself (then its row alone)."""
    return dst in MAY_IMPORT.get(src, frozenset()) or (dst in SHARED and src not in SHARED)


def violations(edges: list[Edge]) -> list[tuple[Edge, str]]:
    """Every edge that breaks a rule, with the rule."""
    out = []
    for e in edges:
        src = unit(e.importer)
        top = e.target.split(".")[0]
        if top in GUI:
            if src not in FRONT:
                out.append((e, f"the core ({src}) imports the GUI toolkit {top}"))
            continue
        if top != PKG:
            continue
        dst = unit(e.target)
        if dst == src:
            continue
        if src not in FRONT and dst in FRONT:
            out.append((e, f"the core ({src}) imports the front end ({dst})"))
        elif dst and not _may_import(src, dst):
            allowed = sorted(MAY_IMPORT.get(src, ()))
            also = "" if src in SHARED else ", and the shared modules"
            out.append((e, f"{src} may not import {dst} (it may import: "
                           f"{', '.join(allowed) or 'nothing of ours'}{also})"))
        rest = e.target.split(".")[2:]
        hidden = [p for p in rest if _private(p)]
        if hidden:
            out.append((e, f"a private name of another unit ({dst}): {'.'.join(hidden)}"))
    return out


def _report(found: list[tuple[Edge, str]]) -> str:
    return "\n".join(f"  {e.where()}: {why}" for e, why in found)


# ------------------------------------------------------------------------------ the tests
def test_no_forbidden_imports():
    edges, unfollowed = collect(package_files())
    assert edges, "the walker found no imports at all"
    found = violations(edges)
    excused = set(EXCEPTIONS) | set(PENDING)
    new = [(e, why) for e, why in found if (e.importer, e.target) not in excused]
    eager = [(e, "an EXCEPTIONS edge must be imported inside a function")
             for e, _ in found if (e.importer, e.target) in EXCEPTIONS and not e.in_function]
    problems = new + eager
    msg = []
    if problems:
        msg.append(f"{len(problems)} forbidden import(s) (docs/ARCHITECTURE.md):\n"
                   + _report(problems))
    if unfollowed:
        msg.append("imports the check cannot follow:\n  " + "\n  ".join(unfollowed))
    assert not msg, "\n".join(msg)


def test_exceptions_and_pending_are_still_true():
    """An excused edge that is gone must leave the lists (so they only shrink)."""
    found = {(e.importer, e.target) for e, _ in violations(collect(package_files())[0])}
    stale = sorted(k for k in (*EXCEPTIONS, *PENDING) if k not in found)
    assert not stale, "no longer imported, remove from EXCEPTIONS/PENDING: " + ", ".join(
        f"{a} -> {b}" for a, b in stale)


def test_every_unit_is_placed():
    units = {unit(m) for m in package_files()} - {""}
    missing = sorted(units - set(MAY_IMPORT))
    assert not missing, f"new units {missing}: place them in MAY_IMPORT and ARCHITECTURE.md"
    gone = sorted(set(MAY_IMPORT) - units - PLANNED)
    assert not gone, f"units {gone} no longer exist: drop them from MAY_IMPORT"
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    unnamed = sorted(u for u in units if not re.search(
        rf"(?<![\w.]){re.escape(u)}(\.py|/)", doc))
    assert not unnamed, f"docs/ARCHITECTURE.md does not name {unnamed}"


def test_manifest_points_at_front_ends_only():
    names = re.findall(r"python_name:\s*([\w.]+):", (ROOT / "napari.yaml").read_text())
    assert names
    wrong = sorted(n for n in names if unit(n) not in FRONT)
    assert not wrong, f"napari.yaml points at the core: {wrong}"


# ------------------------------------------------------------------- the check checks itself
_BAD = {
    f"{PKG}.slide.core": ("napari_milview/slide/core.py", False, (
        "def f():\n"
        "    from ..features.bag import Bag\n"  # slide -> features
        "    from napari_milview.mil import base\n")),  # slide -> mil
    f"{PKG}.mil.base": ("napari_milview/mil/base.py", False,
                        "from ..slide import open_slide\n"),  # mil -> slide
    f"{PKG}.pipeline": ("napari_milview/pipeline.py", False, (
        "from .slide.core import _pool_local\n"  # private name of another unit
        "from .features import _h5\n"  # private module of another unit
        "from ._weights import _hidden\n"  # private name of a shared module
        "from ._weights import read_state_dict\n")),  # fine
    f"{PKG}.overlay.export": ("napari_milview/overlay/export.py", False, (
        "if TYPE_CHECKING:\n    from .._reader import layer_data\n")),  # core -> entry point
    f"{PKG}.cohort": ("napari_milview/cohort.py", False, (
        "from .stain import robustness\n"  # cohort -> stain
        "from . import _io, __version__\n")),  # fine
    f"{PKG}.stain": ("napari_milview/stain/__init__.py", True, (
        "import qtpy.QtWidgets\n"  # core -> Qt
        "from ..cohort import fingerprint\n"  # stain -> cohort
        "from ._common import angle_deg\n")),  # own unit: fine
    f"{PKG}.result": ("napari_milview/result.py", False, (
        "import importlib\nimportlib.import_module('napari')\n"  # core -> napari, by name
        "importlib.import_module(name)\n")),  # cannot follow
    f"{PKG}._inert": ("napari_milview/_inert.py", False, (
        "from ._weights import torch_load\n")),  # shared -> shared not in its row
    f"{PKG}._weights": ("napari_milview/_weights.py", False, (
        "from ._inert import SAFE_GLOBALS\nfrom ._io import file_problem\n"  # fine
        "from . import _malloc\n")),  # shared -> shared not in its row
    f"{PKG}._qt.demo": ("napari_milview/_qt/demo.py", False, (
        "import napari\nfrom .._reader import read_slide\n"  # front end: fine
        "from ..stain._common import angle_deg\n")),  # private module of another unit
}


def test_the_check_finds_each_kind_of_violation():
    edges, unfollowed = collect(_BAD)
    got = sorted((e.importer.removeprefix(f"{PKG}."), e.target.removeprefix(f"{PKG}."), e.line)
                 for e, _ in violations(edges))
    assert got == sorted([
        ("slide.core", "features.bag.Bag", 2), ("slide.core", "mil.base", 3),
        ("mil.base", "slide.open_slide", 1),
        ("pipeline", "slide.core._pool_local", 1), ("pipeline", "features._h5", 2),
        ("pipeline", "_weights._hidden", 3),
        ("overlay.export", "_reader.layer_data", 2),
        ("cohort", "stain.robustness", 1),
        ("stain", "qtpy.QtWidgets", 1), ("stain", "cohort.fingerprint", 2),
        ("result", "napari", 2),
        ("_qt.demo", "stain._common.angle_deg", 3),
        ("_inert", "_weights.torch_load", 1), ("_weights", "_malloc", 3),
    ])
    assert len(unfollowed) == 1 and "napari_milview/result.py:3" in unfollowed[0]
    lazy = {e.target: e.in_function for e in edges if e.importer == f"{PKG}.slide.core"}
    assert lazy == {f"{PKG}.features.bag.Bag": True, f"{PKG}.mil.base": True}


@pytest.mark.parametrize(("importer", "is_package", "level", "module", "expected"), [
    (f"{PKG}.overlay.export", False, 2, "_reader", f"{PKG}._reader"),
    (f"{PKG}.overlay", True, 1, "heatmap", f"{PKG}.overlay.heatmap"),
    (f"{PKG}.overlay", True, 2, None, PKG),
    (f"{PKG}.features.encoders.demo", False, 3, "_weights", f"{PKG}._weights"),
    (f"{PKG}.cli", False, 1, None, PKG),
])
def test_relative_imports_resolve(importer, is_package, level, module, expected):
    assert _resolve(importer, is_package, level, module) == expected
