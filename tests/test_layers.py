"""The package's layering, checked on the source: every import, function-local ones included.

Floors (docs/architecture.md), each importing only from floors below it or from inside its own
package; ``if TYPE_CHECKING:`` imports are exempt (they never run)::

    app    demo
    3      tl
    2      pp, train, models, datasets, pl
    1      io, nn
    0      base: _constants, _settings, _validation, _utils, _serialize, _config, _files,
           _metrics, _docs, _version, _deprecate, _logging

Besides: nothing inside the package imports the face (``import sq_spade``, ``from sq_spade
import settings``); ``nn`` and ``train`` touch no AnnData; a function-local import of a package
module is for the torch floors (``nn``, ``train``) only, every other module being light enough
to import at module level; and the user-facing namespaces import without torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import sq_spade

PKG = Path(sq_spade.__file__).resolve().parent
BASE = {"_constants", "_settings", "_validation", "_utils", "_serialize", "_config", "_files", "_metrics", "_docs",
        "_version", "_deprecate", "_logging"}
FLOORS = {**{m: 0 for m in BASE}, "io": 1, "nn": 1, "pp": 2, "train": 2, "models": 2, "datasets": 2, "pl": 2,
          "tl": 3, "demo": 4, "face": 5}
#: Packages whose modules import torch: importing them inside a function keeps the others fast.
HEAVY = {"nn", "train"}
#: Modules that must not be imported by the array-only floors.
TABLE_LIBRARIES = ("anndata", "spatialdata", "scanpy", "squidpy")


@dataclass(frozen=True)
class Import:
    source: str  # dotted module doing the import
    target: str  # dotted module imported (``sq_spade`` for the face)
    line: int
    local: bool  # inside a function
    type_checking: bool


def _module_name(path: Path) -> str:
    parts = ["sq_spade", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, source: str | None = None) -> list[Import]:
    source = source or _module_name(path)
    out: list[Import] = []

    def visit(node: ast.AST, local: bool, tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(source, alias.name, node.lineno, local, tc))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{source}:{node.lineno}: relative import"
            mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.append(Import(source, full if mod.startswith("sq_spade") and _is_module(full) else mod,
                                  node.lineno, local, tc))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                visit(child, local, True)
            else:
                visit(child, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), tc)

    visit(ast.parse(path.read_text(), filename=str(path)), False, False)
    return out


def _package(dotted: str) -> str:
    """The floor's key of a package module: ``sq_spade.tl._x`` -> ``tl``, ``sq_spade._utils`` -> ``_utils``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "face"


ALL = [imp for p in sorted(PKG.rglob("*.py")) for imp in _imports(p)]
INTERNAL = [i for i in ALL if i.target.split(".")[0] == "sq_spade" and not i.type_checking]


def _where(imp: Import) -> str:
    return f"{imp.source}:{imp.line} imports {imp.target}"


def test_every_module_has_a_floor():
    packages = {_package(_module_name(p)) for p in PKG.rglob("*.py")}
    assert packages <= set(FLOORS), f"modules without a floor: {sorted(packages - set(FLOORS))}"


def test_no_import_runs_up_or_across_the_floors():
    bad = []
    for imp in INTERNAL:
        if imp.source == "sq_spade" or imp.target == "sq_spade":
            continue  # the face (next test)
        src, dst = _package(imp.source), _package(imp.target)
        same_package = src == dst or (src in BASE and dst in BASE)
        if not same_package and FLOORS[dst] >= FLOORS[src]:
            bad.append(f"{_where(imp)} (floor {FLOORS[src]} -> {FLOORS[dst]})")
    assert not bad, "imports that are not downward:\n" + "\n".join(sorted(set(bad)))


def test_nothing_inside_imports_the_face():
    bad = [_where(i) for i in INTERNAL if i.target == "sq_spade" and i.source != "sq_spade"]
    assert not bad, "use `from sq_spade._settings import settings` / `sq_spade._version`:\n" + "\n".join(bad)


def test_nn_and_train_touch_no_tables():
    bad = [_where(i) for i in ALL if _package(i.source) in ("nn", "train") and not i.type_checking
           and i.target.split(".")[0] in TABLE_LIBRARIES]
    assert not bad, "\n".join(bad)


def test_function_local_imports_only_for_the_torch_floors():
    bad = [_where(i) for i in INTERNAL if i.local and _package(i.target) not in HEAVY
           and _package(i.source) not in HEAVY | {"demo"}]
    assert not bad, "import light modules at module level:\n" + "\n".join(bad)


def test_the_checks_see_function_local_and_type_checking_imports(tmp_path):
    """Control: a made-up io module with an upward local import and a TYPE_CHECKING one."""
    path = tmp_path / "_probe.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sq_spade.tl import embed\n"
                    "def f():\n    import sq_spade\n    from sq_spade.tl._common import rows_of\n")
    found = _imports(path, source="sq_spade.io._probe")
    by_target = {i.target: i for i in found if i.target.startswith("sq_spade")}
    assert by_target["sq_spade.tl"].type_checking and not by_target["sq_spade.tl"].local
    assert by_target["sq_spade.tl._common"].local and not by_target["sq_spade.tl._common"].type_checking
    assert by_target["sq_spade"].local
    assert FLOORS[_package(by_target["sq_spade.tl._common"].target)] > FLOORS["io"]


@pytest.mark.parametrize("namespace", ["sq_spade", "sq_spade.pp", "sq_spade.tl", "sq_spade.pl", "sq_spade.io",
                                       "sq_spade.datasets", "sq_spade.models"])
def test_namespaces_import_without_torch(namespace):
    code = (f"import sys; import {namespace}; "
            "heavy = [m for m in ('torch', 'anndata', 'spatialdata', 'scanpy', 'sklearn') if m in sys.modules]; "
            "print(','.join(heavy))")
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout.strip()
    assert out == "", f"`import {namespace}` imported {out}"
