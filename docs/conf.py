"""Sphinx configuration of the sq_spade documentation."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

import sq_spade  # noqa: E402

project = "sq_spade"
author = "sq_spade developers"
copyright = "2026, sq_spade developers"  # noqa: A001
version = release = sq_spade.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_mock_imports: list[str] = []
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
# The tutorials live only in docs/tutorials/ (this source folder), committed with their outputs
# (scripts/execute_tutorials.py executes them in place; tests/test_tutorials.py executes them
# again); the docs render them as they are, so building the docs needs no data and no GPU.
nb_execution_mode = "off"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "sq_spade"
html_static_path: list[str] = []
suppress_warnings = ["mystnb.unknown_mime_type"]
