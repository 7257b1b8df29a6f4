import numpy as np
import pytest

import sq_spade as sqs
from sq_spade.datasets._fetch import REGISTRY
from tests.conftest import DATA_DIR, require_data


@pytest.mark.realdata
def test_registry_matches_shared_checksums():
    require_data("SHA256SUMS")
    sums = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        h, p = line.split()
        sums[p.removeprefix("./")] = h
    n = 0
    for origin, files in REGISTRY.items():
        for path, sha in files.items():
            assert sums[f"{origin.folder}/{path}"] == sha
            n += 1
    assert n >= 40


def test_offline_uncached_error_names_file_and_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(sqs.settings, "data_dir", tmp_path)
    with pytest.raises(sqs.datasets.DataUnavailableError, match="SQ_SPADE_DATA_DIR") as e:
        sqs.datasets.histogene_genes()
    assert "her_hvg_cut_1000.npy" in str(e.value)


@pytest.mark.realdata
def test_histogene_panel():
    require_data("histogene/data/her_hvg_cut_1000.npy")
    genes = sqs.datasets.histogene_genes()
    assert len(genes) == 785 and len(set(genes)) == 785


@pytest.mark.realdata
def test_a1_labels_join_counts(her2st_section):
    require_data("her2st/data/ST-pat/lbl/A1_labeled_coordinates.tsv")
    labels = sqs.datasets.her2st_labels("A1")
    t = her2st_section("A1").tables["table"]
    joined = labels.reindex(t.obs["spot_id"])
    assert joined.notna().mean() > 0.95
    assert joined.value_counts()["invasive cancer"] > 250


def test_bad_section_name():
    with pytest.raises(ValueError, match="`section` must be one of"):
        sqs.datasets.her2st("Z9")


def test_synthetic_section_is_seeded():
    a = sqs.datasets.synthetic_section(seed=3).tables["table"].X.toarray()
    b = sqs.datasets.synthetic_section(seed=3).tables["table"].X.toarray()
    c = sqs.datasets.synthetic_section(seed=4).tables["table"].X.toarray()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
