"""The tutorials run top to bottom on the real data and compute what their text describes.

Each notebook is executed from ``docs/tutorials/`` (their only copy, the one the docs render)
with nbclient in a fresh ``python3`` kernel (this interpreter), in a temporary working
directory, with ``SQ_SPADE_DATA_DIR`` pointing at the data folder; a check cell appended to it
prints the key results as JSON, which the test reads back. Nothing is written to the
repository: ``scripts/execute_tutorials.py`` is what refreshes the committed outputs. The cheap
consistency checks of the committed notebooks (executed, no errors, stored once) need no data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_DIR, require_data

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
NAMES = ["01_spade_predict_h_and_e_only", "02_mclstexp_vs_references", "03_few_shot_probes",
         "04_whole_slide_virtual_map"]
MARK = "SQ_SPADE_CHECK "


def _her2st_files(*sections: str) -> list[str]:
    from sq_spade.datasets._public import HER2ST_IMAGES

    out = []
    for s in sections:
        out += [f"her2st/data/ST-cnts/{s}.tsv.gz", f"her2st/data/ST-spotfiles/{s}_selection.tsv",
                f"her2st/{HER2ST_IMAGES[s]}"]
    return out


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("execute_tutorials", ROOT / "scripts" / "execute_tutorials.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, check_source: str, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    """Execute a tutorial plus a check cell; return the check's JSON and the executed notebook."""
    import nbformat
    from nbformat.v4 import new_code_cell

    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    nb.cells.append(new_code_cell("import json as _json, math as _math, numpy as _np\n" + check_source))
    env = dict(os.environ, SQ_SPADE_DATA_DIR=str(DATA_DIR))
    # a cell that raises fails the test here with its traceback (nbclient's CellExecutionError)
    _script().execute_notebook(nb, cwd=tmp_path, timeout=1800, env=env)
    texts = [o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream"]
    lines = [ln for ln in "".join(texts).splitlines() if ln.startswith(MARK)]
    assert lines, f"the check cell printed nothing: {nb.cells[-1].outputs}"
    return json.loads(lines[-1][len(MARK):]), nb


def _images(nb: Any) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.xdist_group("tutorials")
def test_tutorial_01_predicts_an_h_and_e_only_section(tmp_path):
    require_data(*_her2st_files("C2", "C3", "C4"))
    check = f'''
feats = query.tables["table"].obsm["X_efficientnet_lite0"]
print({MARK!r} + _json.dumps({{
    "query_genes": int(query.tables["table"].n_vars),
    "pred_shape": list(query.tables["predicted"].layers["predicted"].shape),
    "panel": len(model.panel),
    "panel_from_train": sorted(train.tables["table"].uns["sq_spade_panel"]["train_sections"]),
    "metrics": metrics.to_dict("records"),
    "reloaded_same": bool(_np.allclose(reloaded.embed_images(feats), model.embed_images(feats), atol=1e-5)),
    "saved": sorted(p.name for p in path.iterdir()),
}}, default=str))
'''
    out, nb = _run(NAMES[0], check, tmp_path)
    assert out["query_genes"] == 0  # the query never had counts
    assert out["pred_shape"] == [184, out["panel"]] and out["panel"] > 0
    assert out["panel_from_train"] == ["C2", "C3"]
    (row,) = out["metrics"]
    assert row["section"] == "C4" and row["n_spots"] == 184 and row["n_genes"] == out["panel"]
    assert _finite(row["ACG"]) and _finite(row["HEG"]) and _finite(row["MSE"])
    assert row["ACG"] > 0  # retrieval from serial sections of the same tumour beats chance
    assert out["reloaded_same"]
    assert any(n.endswith(".safetensors") for n in out["saved"]), out["saved"]
    assert _images(nb) >= 5  # patches, history, experts x2, observed vs predicted


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.xdist_group("tutorials")
def test_tutorial_02_cross_validates_three_methods(tmp_path):
    require_data(*_her2st_files("B4", "C2", "C3", "C4"))
    check = f'''
print({MARK!r} + _json.dumps({{
    "results": results[["method", "fold", "section", "ACG", "HEG", "n_genes"]].to_dict("records"),
    "per_gene_methods": sorted(per_gene["method"].unique()),
    "by_patient": by_patient[["method", "fold", "section", "ACG", "train_sections"]].to_dict("records"),
}}, default=str))
'''
    out, nb = _run(NAMES[1], check, tmp_path)
    res = out["results"]
    assert sorted({(r["method"], r["section"]) for r in res}) == sorted(
        (m, s) for m in ("knn", "mclstexp", "ridge") for s in ("C2", "C3", "C4"))
    assert all(r["fold"] == r["section"] for r in res)  # leave one section out
    assert all(_finite(r["ACG"]) and _finite(r["HEG"]) and r["n_genes"] > 0 for r in res)
    assert out["per_gene_methods"] == ["knn", "mclstexp", "ridge"]
    bp = out["by_patient"]
    assert {(r["method"], r["fold"], r["section"]) for r in bp} == {
        (m, f, s) for m in ("ridge", "knn") for f, s in (("B", "B4"), ("C", "C2"), ("C", "C3"), ("C", "C4"))}
    # patient-disjoint: no fold trains on a section of its own patient
    assert all(not any(t.startswith(r["fold"]) for t in r["train_sections"].split(",")) for r in bp)
    assert all(_finite(r["ACG"]) for r in bp)
    assert _images(nb) >= 1


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.xdist_group("tutorials")
def test_tutorial_03_probes_three_embeddings(tmp_path):
    require_data(*_her2st_files("A1", "B4", "C2"), "her2st/data/ST-pat/lbl/A1_labeled_coordinates.tsv")
    check = f'''
print({MARK!r} + _json.dumps({{
    "shapes": {{k: list(a1_table.obsm[k].shape) for k in keys}},
    "labelled": {{str(k): int(v) for k, v in a1_table.obs["pathology"].value_counts().items()}},
    "few_shot": fs[["embedding", "shots", "balanced_accuracy_mean", "n_repeats"]].to_dict("records"),
    "dropped": {{str(k): v for k, v in raw.attrs.get("dropped_classes", {{}}).items()}},
    "n_draws": int(len(raw)),
    "diff_rows": int(len(diff)),
}}, default=str))
'''
    out, nb = _run(NAMES[2], check, tmp_path)
    assert out["shapes"] == {"X_efficientnet_lite0": [346, 384], "X_spade": [346, 256], "X_mclstexp": [346, 256]}
    assert set(out["labelled"]) == {"invasive cancer", "cancer in situ", "connective tissue", "adipose tissue"}
    assert min(out["labelled"].values()) >= 9  # every class has spots for 8 shots plus a test spot
    fs = out["few_shot"]
    assert {(r["embedding"], r["shots"]) for r in fs} == {
        (k, s) for k in ("X_efficientnet_lite0", "X_spade", "X_mclstexp") for s in (1, 2, 4, 8)}
    assert all(0.0 <= r["balanced_accuracy_mean"] <= 1.0 and r["n_repeats"] == 30 for r in fs)
    assert not any(out["dropped"].values())  # the same four classes at every shot count
    assert out["n_draws"] == 3 * 4 * 30 and out["diff_rows"] == 4 * 30  # paired: one row per draw
    # 8 labelled spots per class do better than chance (0.25) for the frozen features
    lite0_8 = next(r for r in fs if r["embedding"] == "X_efficientnet_lite0" and r["shots"] == 8)
    assert lite0_8["balanced_accuracy_mean"] > 0.25
    assert _images(nb) >= 4  # labels on tissue, probe curves, two UMAPs


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.xdist_group("tutorials")
def test_tutorial_04_maps_an_h_and_e_only_slide(tmp_path):
    require_data(*_her2st_files("A1", "C2", "C3", "C4"), "her2st/data/ST-pat/lbl/A1_labeled_coordinates.tsv")
    check = f'''
print({MARK!r} + _json.dumps({{
    "n_tiles": int(n_tiles), "pred_rows": int(pred.n_obs), "slide_tables": sorted(slide.tables),
    "r_spots": float(r_spots), "r_tiles": float(r_tiles),
    "scores": {{k: {{m: float(v[m]) for m in ("ari", "nmi", "ari_shuffled_p95")}} for k, v in scores.items()}},
    "vec": list(vec.shape),
}}))
'''
    out, nb = _run(NAMES[3], check, tmp_path)
    assert out["n_tiles"] > 100 and out["pred_rows"] == out["n_tiles"]
    assert {"tiles", "predicted"} <= set(out["slide_tables"])  # no spots table: the slide had none
    assert _finite(out["r_spots"]) and _finite(out["r_tiles"]) and out["r_tiles"] > 0
    assert set(out["scores"]) == {"predicted", "observed"} and all(_finite(v["ari"]) for v in out["scores"].values())
    assert out["vec"] == [1, 384]  # one vector per slide, of the default Lite0 features (blocks 3-5)
    assert _images(nb) >= 4  # mask, two maps, domains


# --- the committed notebooks (no data needed) ---------------------------------------------------
def test_tutorials_are_stored_once():
    """The notebooks live in docs/tutorials only (no second copy to drift), and all are tested here."""
    assert sorted(p.stem for p in TUTORIALS.glob("*.ipynb")) == NAMES
    elsewhere = []
    for folder, dirs, files in os.walk(ROOT):
        # hidden folders (.git, .venv, caches) and build output are not the repository's notebooks
        dirs[:] = [d for d in dirs if not d.startswith((".", "_build")) and Path(folder, d) != TUTORIALS]
        elsewhere += [Path(folder, f).relative_to(ROOT) for f in files if f.endswith(".ipynb")]
    assert not elsewhere, f"notebooks outside docs/tutorials/: {elsewhere}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_tutorial_is_executed(name):
    import nbformat

    path = TUTORIALS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "run scripts/execute_tutorials.py"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "cells were not run top to bottom in one kernel"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert _images(nb) >= 1
    assert not any("@@" in c.source for c in nb.cells if c.cell_type == "markdown")  # placeholders filled
