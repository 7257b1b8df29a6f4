"""The documentation builds without a warning and has its API and tutorial pages.

``sphinx-build -W --keep-going`` (as ``make docs``), with this interpreter, into a temporary
folder. The tutorials are rendered from their committed outputs (``nb_execution_mode =
"off"``), so the build needs neither data nor a kernel.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: Public functions whose API page must exist (one per namespace at least).
API_PAGES = [
    "sq_spade.io.read_st", "sq_spade.io.combine_sections", "sq_spade.datasets.her2st",
    "sq_spade.pp.extract_patches", "sq_spade.pp.compute_features", "sq_spade.tl.train_experts",
    "sq_spade.tl.predict_expression", "sq_spade.tl.cross_validate", "sq_spade.tl.few_shot",
    "sq_spade.pl.spatial", "sq_spade.pl.embedding", "sq_spade.models.Spade",
]
#: Every notebook of docs/tutorials/ (their only copy) must become a page.
TUTORIALS = sorted(p.stem for p in (DOCS / "tutorials").glob("*.ipynb"))


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    pytest.importorskip("sphinx_book_theme")
    out = tmp_path_factory.mktemp("docs_html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(out / ".doctrees"),
           str(DOCS), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out / "html"


@pytest.mark.slow
@pytest.mark.xdist_group("docs")
def test_docs_build_without_warnings(built_docs):
    proc, _ = built_docs
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if re.search(r"WARNING|ERROR", ln)]
    assert proc.returncode == 0, "sphinx-build -W failed:\n" + "\n".join(warnings or [proc.stderr[-3000:]])


@pytest.mark.slow
@pytest.mark.xdist_group("docs")
def test_docs_have_api_and_tutorial_pages(built_docs):
    proc, html = built_docs
    for page in ("index", "installation", "concepts", "backbones", "tutorials", "api/index", "changelog"):
        assert (html / f"{page}.html").exists(), f"{page}.html missing\n{proc.stderr[-2000:]}"
    for name in API_PAGES:
        page = html / "api" / "generated" / f"{name}.html"
        assert page.exists(), f"API page of {name} missing"
        # the page documents the object (autodoc ran), not an empty stub
        assert f'id="{name}"' in page.read_text(encoding="utf-8"), f"{name} not documented on its page"
    index = (html / "tutorials.html").read_text(encoding="utf-8")
    assert TUTORIALS, "no notebook in docs/tutorials/"
    for name in TUTORIALS:
        page = html / "tutorials" / f"{name}.html"
        assert page.exists(), f"tutorial page {name} missing"
        text = page.read_text(encoding="utf-8")
        assert "<img" in text, f"tutorial {name} rendered without its figures"
        assert f"tutorials/{name}.html" in index, f"tutorial {name} not linked from tutorials.html"
