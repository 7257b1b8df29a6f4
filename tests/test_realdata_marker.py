"""Every test that needs the data folder carries the ``realdata`` marker (read from the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import DATA_FIXTURES

TESTS = Path(__file__).resolve().parent
#: names whose use means the data folder is read
DATA_NAMES = {"require_data", "DATA_DIR", "her2st", "stutility_mob", "her2st_labels", "histogene_panel"}
#: tests that name a loader but are refused before any file is read
NO_DATA = {"test_bad_section_name"}


def _marked(fn: ast.FunctionDef) -> bool:
    return any("realdata" in ast.unparse(d) for d in fn.decorator_list)


def _needs_data(fn: ast.FunctionDef) -> bool:
    if {a.arg for a in fn.args.args} & set(DATA_FIXTURES):
        return True
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id in DATA_NAMES:
            return True
        if isinstance(node, ast.Attribute) and node.attr in DATA_NAMES and "datasets" in ast.unparse(node.value):
            return True
    return False


def _unmarked() -> list[str]:
    out = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any("realdata" in ast.unparse(n) for n in tree.body
                            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets))
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_") and _needs_data(fn):
                if fn.name not in NO_DATA and not (module_marked or _marked(fn)):
                    out.append(f"{path.relative_to(TESTS)}::{fn.name}")
    return out


def test_every_test_needing_the_data_folder_is_marked_realdata():
    assert _unmarked() == []


def test_the_check_sees_real_data_tests():
    # not vacuous: the real-data tests of the readers and tutorials are found (and are marked)
    found = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_") and _needs_data(fn):
                found.append(fn.name)
    assert {"test_her2st_sections", "test_visium_mini", "test_real_panels_her2st"} <= set(found)
    assert len(found) >= 18


def test_unmarked_data_test_fails(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("CI", "")  # a missing file skips (not fails) the marked test
    pytester.makeconftest((TESTS / "conftest.py").read_text().replace("from tests.", "from "))
    pytester.makepyfile(test_x="""
import pytest
from conftest import require_data

def test_unmarked():
    require_data("nothing")

@pytest.mark.realdata
def test_marked():
    require_data("nothing")
""")
    res = pytester.runpytest("-p", "no:cacheprovider")
    res.assert_outcomes(failed=1, skipped=1)
    res.stdout.fnmatch_lines(["*lacks @pytest.mark.realdata*"])
