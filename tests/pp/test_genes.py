import numpy as np
import pytest
import scipy.sparse as sp

import sq_spade as sqs
from sq_spade import _constants as K


def _two_sections():
    a = sqs.datasets.synthetic_section(section="s1", seed=1, n_genes=40)
    b = sqs.datasets.synthetic_section(section="s2", seed=2, n_genes=40)
    return sqs.io.combine_sections([a, b])


def test_spade_panel_is_union_from_training_sections_only():
    sd = _two_sections()
    t = sd.tables["table"]
    p1 = sqs.pp.select_genes(sd, "spade", n_top=5, train_sections=["s1"], inplace=False)
    # changing the held-out section's counts cannot change the panel
    rows = (t.obs[K.SECTION_KEY] == "s2").to_numpy()
    X = t.X.toarray()
    X[rows] = np.random.default_rng(0).poisson(50, size=X[rows].shape)
    t.X = sp.csr_matrix(X)
    p2 = sqs.pp.select_genes(sd, "spade", n_top=5, train_sections=["s1"], inplace=False)
    assert p1 == p2 and 1 <= len(p1) <= 5
    both = sqs.pp.select_genes(sd, "spade", n_top=5, inplace=False)
    assert set(p1) <= set(both) or len(both) >= len(p1)


def test_spade_panel_uses_genes_shared_by_training_sections():
    a = sqs.datasets.synthetic_section(section="s1", seed=1, n_genes=40)
    b = sqs.datasets.synthetic_section(section="s2", seed=2, n_genes=30)
    sd = sqs.io.combine_sections([a, b])
    panel = sqs.pp.select_genes(sd, "spade", n_top=20, inplace=False)
    assert all(int(g.removeprefix("gene")) < 30 for g in panel)


def test_heg_and_list_panels_and_exclusions():
    sd = sqs.datasets.synthetic_section(n_genes=20)
    t = sd.tables["table"]
    means = np.asarray(t.X.mean(0)).ravel()
    heg = sqs.pp.select_genes(sd, "heg", n_top=3, inplace=False)
    assert set(heg) <= set(t.var_names[np.argsort(-means)[:6]])
    with pytest.warns(UserWarning, match="not in the table"):
        sqs.pp.select_genes(sd, ["gene1", "gene2", "nope"])
    assert t.var[K.PANEL_VAR].sum() == 2
    assert t.uns[K.PANEL_UNS]["genes"] == ["gene1", "gene2"]
    with pytest.raises(ValueError, match="None of the"):
        sqs.pp.select_genes(sd, ["x", "y"])


def test_mito_ribo_excluded():
    sd = sqs.datasets.synthetic_section(n_genes=6)
    t = sd.tables["table"]
    t.var_names = ["MT-CO1", "RPL3", "RPS6", "ACTB", "KRT8", "ERBB2"]
    assert sqs.pp.select_genes(sd, list(t.var_names), inplace=False) == ["ACTB", "KRT8", "ERBB2"]
    assert len(sqs.pp.select_genes(sd, list(t.var_names), exclude_mito=False, exclude_ribo=False, inplace=False)) == 6


def test_normalize_over_panel():
    sd = sqs.datasets.synthetic_section(n_genes=10)
    t = sd.tables["table"]
    raw = t.X.copy()
    sqs.pp.select_genes(sd, ["gene0", "gene1", "gene2"])
    sqs.pp.normalize(sd)
    Y = t.layers[K.NORMALIZED_LAYER].toarray()
    sums = np.expm1(Y[:, :3]).sum(1)
    assert np.allclose(sums[np.asarray(raw[:, :3].sum(1)).ravel() > 0], 1e4, rtol=1e-4)
    assert (t.X != raw).nnz == 0  # raw counts kept


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda X: X * 0.5, "integer"),
    (lambda X: -X, "negative"),
])
def test_normalize_refuses_non_counts(mutate, match):
    sd = sqs.datasets.synthetic_section(n_genes=5)
    t = sd.tables["table"]
    t.X = sp.csr_matrix(mutate(t.X.toarray() + 1))
    with pytest.raises(ValueError, match=match):
        sqs.pp.normalize(sd)
    assert K.NORMALIZED_LAYER not in t.layers


@pytest.mark.realdata
def test_real_panels_her2st(her2st_section):
    sd = sqs.io.combine_sections([her2st_section("C2"), her2st_section("C3"), her2st_section("C4")])
    panel = sqs.pp.select_genes(sd, "spade", n_top=50, train_sections=["C2", "C3"], inplace=False)
    assert 50 <= len(panel) <= 100
    assert not any(g.startswith(("MT-", "RPL", "RPS")) for g in panel)
    hist = sqs.datasets.histogene_genes()
    sqs.pp.select_genes(sd, hist)
    n = int(sd.tables["table"].var[K.PANEL_VAR].sum())
    assert 700 < n <= 785
    sqs.pp.normalize(sd)
    assert sd.tables["table"].layers[K.NORMALIZED_LAYER].shape == sd.tables["table"].shape
