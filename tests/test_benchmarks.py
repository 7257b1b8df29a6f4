"""The benchmarks folder stays navigable: no import cycle, one ``SPLITS``, every script documented.

The benchmarks themselves are too long for the suite (``benchmarks/run_all.py`` runs the
page's); here their source is parsed, and ``run_all.steps`` and ``benchmarks/README.md`` read.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODULES = {p.stem: p for p in sorted(BENCH.glob("*.py"))}
#: Scripts a user runs (helpers start with an underscore; run_all.py runs the others).
SCRIPTS = sorted(name for name in MODULES if not name.startswith("_") and name != "run_all")


def local_imports(path: Path) -> set[str]:
    """The benchmark modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def module_assignments(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all

        yield run_all
    finally:
        sys.path.remove(str(BENCH))


def test_no_import_cycle_between_scripts():
    graph = {name: local_imports(path) - {name} for name, path in MODULES.items()}
    assert graph["bench_accuracy"] >= {"_data", "tune_validation"}  # the parser sees local imports
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def test_splits_defined_once():
    owners = {name: module_assignments(path) & {"SPLITS", "SPLIT_TITLES"} for name, path in MODULES.items()}
    assert {name: found for name, found in owners.items() if found} == {"_data": {"SPLITS", "SPLIT_TITLES"}}
    sys.path.insert(0, str(BENCH))
    try:
        from _data import SPLIT_TITLES, SPLITS
    finally:
        sys.path.remove(str(BENCH))
    assert set(SPLIT_TITLES) <= set(SPLITS)
    for folds in SPLITS.values():
        for train, test in folds:
            assert train and test and not set(train) & set(test)


def test_every_script_is_run_by_run_all_or_documented(run_all):
    readme = (BENCH / "README.md").read_text()
    own, _, helpers = readme.partition("## Run on their own")[2].partition("## Helpers")
    page = readme.partition("## Run on their own")[0]
    stepped = {Path(cmd[0]).stem for cmd in run_all.steps(["0"]).values()}
    listed_alone = set(re.findall(r"^\| `(\w+)\.py` \|", own, flags=re.M))
    listed_page = set(re.findall(r"^\| `\w+` \| `(\w+)\.py` \|", page, flags=re.M))
    assert stepped <= set(SCRIPTS)
    assert listed_page == stepped, "README's run_all table differs from run_all.steps()"
    assert not listed_alone & stepped
    missing = set(SCRIPTS) - stepped - listed_alone
    assert not missing, f"benchmarks neither run by run_all.py nor in benchmarks/README.md: {sorted(missing)}"
    for name in MODULES:
        if name.startswith("_"):
            assert f"`{name}.py`" in helpers, f"helper {name}.py not described in benchmarks/README.md"
