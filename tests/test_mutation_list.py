"""The mutation list of benchmarks/mutation.py stays applicable and covers every class of issue 18."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutation():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mutation

        yield mutation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_every_snippet_occurs_exactly_once(mutation):
    stale = {m.id: problem for m in mutation.MUTATIONS if (problem := mutation.check(m))}
    assert stale == {}, "refresh these snippets in benchmarks/mutation.py"


def test_ids_unique_mutations_change_something_and_tests_exist(mutation):
    ids = [m.id for m in mutation.MUTATIONS]
    assert len(ids) == len(set(ids))
    for m in mutation.MUTATIONS:
        assert m.find != m.replace and m.tests and m.what, m.id
        for t in m.tests:
            path, _, name = t.partition("::")
            assert (ROOT / path).is_file(), (m.id, t)
            if name:
                assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), (m.id, t)


def test_the_list_covers_every_class_of_the_issue(mutation):
    kinds = {m.kind for m in mutation.MUTATIONS}
    assert kinds >= {"observed", "patch geometry", "routing temperature", "validation routing", "gene_input",
                     "weighting/temperature", "by/n_heg", "panel leak", "model-file checks",
                     "cross-validation leak", "GPU averaging"}
    ids = {m.id for m in mutation.MUTATIONS}
    # the survivors named by the issue, each planted
    assert ids >= {"observed_ignored", "resampled_half_pixel", "padded_wrong_axis", "routing_temperature_default",
                   "validation_farthest_centroid", "gene_input_raw_predict", "weighting_dropped",
                   "temperature_dropped", "spade_panel_last_section", "heg_panel_leak", "sha256_check_removed",
                   "class_check_removed", "cv_reference_leak", "gather_mean_unweighted"}


def test_a_mutation_applies_in_a_copy_and_leaves_the_source_alone(mutation, tmp_path):
    import shutil

    m = next(m for m in mutation.MUTATIONS if m.id == "heg_panel_leak")
    before = (mutation.SRC / "sq_spade" / m.file).read_text()
    shutil.copytree(mutation.SRC / "sq_spade", tmp_path / "sq_spade")
    assert mutation.check(m, tmp_path) is None
    f = tmp_path / "sq_spade" / m.file
    f.write_text(f.read_text().replace(m.find, m.replace))
    assert mutation.check(m, tmp_path) is not None  # applied: the snippet is gone from the copy
    assert (mutation.SRC / "sq_spade" / m.file).read_text() == before


def test_list_mode(mutation, capsys):
    assert mutation.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert f"{len(mutation.MUTATIONS)} mutations" in out and "cv_reference_leak" in out
