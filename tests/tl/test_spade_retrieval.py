"""SPADE as users call it: expert-consistent retrieval, clean references, sized mixtures (issue 13)."""

import warnings

import anndata as ad
import numpy as np
import pytest
import torch

import sq_spade as sqs
from sq_spade.models._spade import Spade, build_module
from sq_spade.nn.retrieval import mixture_retrieve_predict, retrieve_predict
from sq_spade.tl._experts import choose_n_experts, spade_retrieve

GENES = [f"gene{i}" for i in range(12)]


# --- two separated clusters, one expert each ----------------------------------------------------------------
def _two_cluster_model(seed=0):
    """A hand-built 2-expert Spade: features = 6 base dims + 2 cluster dims (A: 0, B: 10).

    Both image heads are the same random head blind to the cluster dims, so a cluster-B spot
    embedded by expert B lands exactly where its base would land under expert A: comparing
    vectors across the two experts' spaces then mixes B spots into A queries' neighbours.
    """
    torch.manual_seed(seed)
    cfg = {"backbone": "fake", "feature_dim": 8, "panel": ["g0"], "gene_input": "log1p_cp10k", "n_experts": 2,
           "n_fine": 2, "out_dim": 16, "dropout": 0.0, "routing_temperature": 0.1, "reference_side": "images"}
    module = build_module(cfg, centroids=np.array([[0.0] * 8, [0.0] * 6 + [10.0, 10.0]], np.float32),
                          fine_to_expert=np.array([0, 1]))
    with torch.no_grad():
        heads = module.image_heads
        for p in (heads.weight1, heads.bias1, heads.weight2, heads.bias2):
            p[1] = p[0]
        heads.weight1[:, 6:] = 0.0
    return Spade(module, cfg)


def _two_clusters(rng, n):
    base = np.tile(rng.normal(size=(n, 6)).astype(np.float32), (2, 1))  # cluster B: the bases of A, shifted
    f = np.hstack([base, np.zeros((2 * n, 2), np.float32)])
    f[n:, 6:] = 10.0
    return f, np.repeat([0.0, 1.0], n)[:, None].astype(np.float32)


def test_cross_expert_retrieval_mixes_clusters_and_expert_consistent_does_not():
    rng = np.random.default_rng(0)
    model = _two_cluster_model()
    f_ref, v_ref = _two_clusters(rng, 60)
    f_q = f_ref[:60] + rng.normal(0, 0.01, (60, 8)).astype(np.float32)  # queries of cluster A
    f_q[:, 6:] = 0.0
    assert (model.assign(f_ref) == np.repeat([0, 1], 60)).all() and (model.assign(f_q) == 0).all()
    # what the code did before: queries and keys by their own experts, compared across spaces
    old = retrieve_predict(model.embed_images(f_q), model.embed_images(f_ref), v_ref, k=10)
    assert old.mean() > 0.2  # cluster-B spots among the neighbours of cluster-A queries
    for routing in ("soft", "hard"):
        new, info = spade_retrieve(model, f_q, f_ref, v_ref, side="images", k=10, routing=routing)
        assert np.allclose(new, 0.0)  # within-cluster neighbours only
        assert info["n_keys"] == [60, 60] and info["n_queries"][0] == 60 and info["fallback"] == []
    # both sides as keys: still within the query's expert only
    new, info = spade_retrieve(model, f_q, f_ref, v_ref, reference_genes=v_ref, side="both", k=10)
    assert np.allclose(new, 0.0) and info["n_keys"] == [120, 120]


def test_expert_with_fewer_than_k_or_no_reference_spots():
    rng = np.random.default_rng(1)
    model = _two_cluster_model()
    f_ref, v_ref = _two_clusters(rng, 30)
    f_q, _ = _two_clusters(rng, 5)
    # k above an expert's reference spots: that expert retrieves all of them (its cluster's mean value)
    pred, info = spade_retrieve(model, f_q, f_ref, v_ref, side="images", k=50, routing="hard", weighting="uniform")
    assert np.allclose(pred[:, 0], np.repeat([0.0, 1.0], 5))
    # no reference spot of expert 1: its queries retrieve from all reference spots, in expert 1's space
    pred, info = spade_retrieve(model, f_q, f_ref[:30], v_ref[:30], side="images", k=5, routing="hard")
    assert info["fallback"] == [1] and info["n_keys"] == [30, 0] and np.allclose(pred, 0.0)


def test_mixture_retrieval_weights_experts_and_checks_arguments():
    keys = np.eye(3, dtype=np.float32)
    values = np.array([[1.0], [2.0], [3.0]], np.float32)
    weights = np.array([[0.75, 0.25], [0.0005, 0.9995]])
    pred, info = mixture_retrieve_predict(lambda e, r: keys[[0, 2]][r], weights, np.array([0, 0, 1]),
                                          lambda e, r: keys[r], values, k=1)
    # row 0: 0.75 * (its nearest key of expert 0: value 1) + 0.25 * (expert 1's only key: 3)
    assert np.allclose(pred[:, 0], [0.75 * 1 + 0.25 * 3, 3.0])  # row 1: weight 0.0005 dropped
    assert info["n_queries"] == [1, 2]
    with pytest.raises(ValueError, match="`key_expert`"):
        mixture_retrieve_predict(lambda e, r: keys[r], weights, np.array([0, 0, 2]), lambda e, r: keys[r], values)
    with pytest.raises(ValueError, match="`weights`"):
        mixture_retrieve_predict(lambda e, r: keys[r], -weights, np.array([0, 0, 1]), lambda e, r: keys[r], values)


# --- the number of experts -----------------------------------------------------------------------------------
def test_n_experts_auto_rule_and_checks():
    assert choose_n_experts("auto", 100)[0] == 1
    assert choose_n_experts("auto", 10 * sqs.tl._experts.SPOTS_PER_EXPERT)[0] == 10
    assert choose_n_experts("auto", 10**7)[0] == 16
    assert choose_n_experts(16, 100) == (16, {"n_experts": 16, "n_experts_rule": "given", "n_train_spots": 100})
    for bad in ("many", 0, -1, 2.5):
        with pytest.raises(ValueError, match="n_experts"):
            choose_n_experts(bad, 100)


# --- end to end, with a clean reference ------------------------------------------------------------------------
def _sections(names):
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=s, seed=i, n_rows=10, n_cols=10,
                                                                  patient=f"p{i}") for i, s in names])
    t = sd.tables["table"]
    p = sqs.pp.patches(sd, patch_size_um=30, microns_per_pixel=1.0)
    rng = np.random.default_rng(len(names))
    colour = np.stack([p[i].reshape(-1, 3).mean(0) for i in range(len(p))]) / 255
    t.obsm["X_fake"] = np.hstack([colour, rng.normal(0, 0.05, (len(p), 5))]).astype(np.float32)
    return sd


def _shuffled(sd):
    """The training spots with their expression shuffled among them (image-expression pairs broken)."""
    t = sd.tables["table"].copy()
    t.X = t.X[np.random.default_rng(0).permutation(t.n_obs)]
    return t


@pytest.mark.parametrize("n_experts", [1, 2])
def test_clean_reference_accuracy_beats_shuffled_control(n_experts):
    train = _sections([(0, "s0"), (1, "s1")])
    query = _sections([(2, "s2")])
    kw = dict(features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, epochs=30, batch_size=32,
              n_experts=n_experts)
    accs = {}
    for name, data in (("clean", train), ("shuffled", _shuffled(train))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sqs.tl.train_experts(data, **kw)
        # an expert of ~100 spots is below the rule: warned, only when there are several
        assert any("fewer than" in str(w.message) for w in caught) == (n_experts > 1)
        assert model.config["reference_side"] == "images"  # no validation section: the image side
        assert model.config["selection"]["n_experts"] == n_experts
        for side in ("genes", "images"):
            model.config["reference_side"] = side
            # a clean reference: the held-out section is not in it
            sqs.tl.predict_expression(query, model, reference=data, k=20, features_key="X_fake",
                                      reference_features_key="X_fake")
            accs[name, side] = float(sqs.tl.evaluate_expression(query)["ACG"].iloc[0])
    for side in ("genes", "images"):
        assert accs["clean", side] > 0.4, accs  # was -0.31 on the gene side with 2 experts
        assert accs["shuffled", side] < 0.2 and accs["clean", side] - accs["shuffled", side] > 0.25, accs


def test_predict_expression_routing_argument():
    train = _sections([(0, "s0"), (1, "s1")])
    model = sqs.tl.train_experts(train, features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, n_experts=1,
                                 epochs=2, batch_size=32)
    q = ad.AnnData(X=train.tables["table"].X[:5], obsm={"X_fake": train.tables["table"].obsm["X_fake"][:5]},
                   var=train.tables["table"].var)
    with pytest.raises(ValueError, match="`routing`"):
        sqs.tl.predict_expression(q, model, reference=train, k=5, features_key="X_fake", routing="nearest")
    out = sqs.tl.predict_expression(q, model, reference=train, k=5, features_key="X_fake", routing="hard")
    assert out.uns["sq_spade_prediction"]["predicted"]["routing"] == "hard"


# --- one coherent space ----------------------------------------------------------------------------------------
def _two_expert_models():
    train = _sections([(0, "s0"), (1, "s1")])
    kw = dict(features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, epochs=20, batch_size=32, n_experts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return train, {al: sqs.tl.train_experts(train, alignment=al, **kw) for al in ("procrustes", "none")}


def test_aligned_embedding_does_not_jump_between_experts(tmp_path):
    train, models = _two_expert_models()
    x = _sections([(2, "s2")]).tables["table"].obsm["X_fake"]  # spots not used for the rotations

    def jump(model, space):
        # a spot whose routing weight moves from 0.45 to 0.55 between the two experts
        z0, z1 = (model.embed_images_by(x, e) for e in (0, 1))
        if space == "published" and model.module.rotation is not None:
            z0, z1 = (model.module.image_heads.forward_one(torch.as_tensor(x), e).detach().numpy() for e in (0, 1))
        a, b = 0.45 * z0 + 0.55 * z1, 0.55 * z0 + 0.45 * z1
        return float(np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)))

    pro, none = models["procrustes"], models["none"]
    assert jump(pro, "aligned") < 0.03 < 0.1 < jump(pro, "published")
    assert jump(none, "aligned") > 0.1  # no common space: the published sum
    # embed writes the aligned space by default; the published sum stays one argument away
    t = train.tables["table"]
    sqs.tl.embed(train, pro, features_key="X_fake", key_added="X_al")
    sqs.tl.embed(train, pro, features_key="X_fake", key_added="X_pub", space="published")
    assert not np.allclose(t.obsm["X_al"], t.obsm["X_pub"])
    assert t.uns["spade"]["embedding"]["space"] == "published"
    with pytest.raises(ValueError, match="`space`"):
        sqs.tl.embed(train, pro, features_key="X_fake", space="common")
    # the rotations travel with the model; retrieval within an expert does not depend on them
    pro.save(tmp_path / "m")
    back = Spade.load(tmp_path / "m")
    assert back.config["alignment"] == "procrustes"
    assert np.allclose(back.embed_images(x), pro.embed_images(x), atol=1e-5)
    vals = np.random.default_rng(0).random((t.n_obs, 3)).astype(np.float32)
    f = t.obsm["X_fake"]
    rotated = spade_retrieve(pro, x, f, vals, side="images", k=10)[0]
    pro.module.rotation = None
    assert np.allclose(rotated, spade_retrieve(pro, x, f, vals, side="images", k=10)[0], atol=1e-3)


def test_shared_gene_head_is_one_head_for_all_experts():
    from sq_spade.train import fit_experts

    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(60, 8)).astype("f4"), rng.normal(size=(60, 5)).astype("f4")
    ex = np.repeat([0, 1, 2], 20)
    img, gene, hist = fit_experts(f, g, ex, n_experts=3, epochs=3, batch_size=8, out_dim=4, device="cpu",
                                  shared_gene_head=True, val_features=f[:12], val_genes=g[:12], val_expert=ex[:12])
    for p in gene.parameters():
        assert torch.equal(p[0], p[1]) and torch.equal(p[0], p[2])
    assert len(set(np.asarray(hist["best_epoch"]).tolist())) == 1  # one epoch for all experts
    img2, gene2, _ = fit_experts(f, g, ex, n_experts=3, epochs=3, batch_size=8, out_dim=4, device="cpu")
    assert not torch.equal(gene2.weight1[0], gene2.weight1[1])  # independent heads otherwise
    # a model trained with a shared gene head says so
    train = _sections([(0, "s0")])
    m = sqs.tl.train_experts(train, features_key="X_fake", backbone="fake", panel=GENES, n_fine=2, epochs=2,
                             batch_size=32)
    assert m.config["alignment"] == "shared_genes" and m.config["selection"]["n_experts"] == 1
    with pytest.raises(ValueError, match="`alignment`"):
        sqs.tl.train_experts(train, features_key="X_fake", backbone="fake", panel=GENES, alignment="rotate")
