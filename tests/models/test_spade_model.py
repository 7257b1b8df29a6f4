import json
import re

import numpy as np
import pytest
import torch

from sq_spade.models import ModelFileError, Spade
from sq_spade.models._spade import build_module
from tests.conftest import write_signed


def _model(seed=0, d=8, g=5, e=3, k=6):
    torch.manual_seed(seed)
    cfg = {"backbone": "dummy", "weights_sha256": "none", "feature_dim": d, "panel": [f"g{i}" for i in range(g)],
           "gene_input": "log1p_cp10k", "n_experts": e, "n_fine": k, "out_dim": 4, "dropout": 0.1,
           "routing_temperature": 0.1, "reference_side": "genes"}
    module = build_module(cfg, centroids=torch.randn(k, d), fine_to_expert=torch.arange(k) % e)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return Spade(module, cfg)


def test_save_load_roundtrip_gives_same_embeddings(tmp_path):
    m = _model()
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    m.save(tmp_path / "m")
    back = Spade.load(tmp_path / "m")
    assert np.array_equal(m.embed_images(x), back.embed_images(x))
    assert np.array_equal(m.assign(x), back.assign(x))
    assert back.panel == m.panel
    # what is on disk is safetensors + json, nothing else
    names = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name != ".lock")  # the writers' lock
    assert len(names) == 2 and names[0] == "config.json" and re.match(r"model-[0-9a-f]{16}\.safetensors$", names[1])


def test_soft_routing_tends_to_hard():
    m = _model()
    x = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    soft = m.embed_images(x, routing="soft", temperature=1e-4)
    hard = m.embed_images(x, routing="hard")
    assert np.allclose(soft, hard, atol=1e-5)
    assert not np.allclose(m.embed_images(x, temperature=10.0), hard, atol=1e-3)


def test_load_refuses_tampered_or_newer_files(tmp_path):
    m = _model()
    m.save(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["format_version"] = 99
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="newer"):
        Spade.load(tmp_path / "m")
    doc["format_version"] = 2
    doc["config"]["n_experts"] = "three"
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="config_sha256"):  # an edit alone is refused as such
        Spade.load(tmp_path / "m")
    write_signed(cfg_path, doc)  # the class's own checks refuse it even with the digests recomputed
    with pytest.raises(ModelFileError, match="n_experts"):
        Spade.load(tmp_path / "m")
    doc["config"]["n_experts"] = 3
    doc["config"]["evil_path"] = "../../etc/passwd"
    write_signed(cfg_path, doc)
    with pytest.raises(ModelFileError, match="Unknown config keys"):
        Spade.load(tmp_path / "m")


def test_crafted_pickle_in_place_of_tensors_is_refused(tmp_path):
    import pickle

    m = _model()
    m.save(tmp_path / "m")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    tensors = next((tmp_path / "m").glob("model-*.safetensors"))
    tensors.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError):
        Spade.load(tmp_path / "m")
    assert not (tmp_path / "pwned").exists()


def _write_original(tmp_path, d=8, g=5, e=3, k=6, out=4, extra_key=None):
    rng = torch.Generator().manual_seed(0)
    paths = []
    for i in range(e):
        sd = {}
        for prefix, n_in in (("image_projection", d), ("spot_projection", g)):
            sd[f"{prefix}.projection.weight"] = torch.randn(out, n_in, generator=rng)
            sd[f"{prefix}.projection.bias"] = torch.randn(out, generator=rng)
            sd[f"{prefix}.fc.weight"] = torch.randn(out, out, generator=rng)
            sd[f"{prefix}.fc.bias"] = torch.randn(out, generator=rng)
            sd[f"{prefix}.layer_norm.weight"] = torch.rand(out, generator=rng) + 0.5
            sd[f"{prefix}.layer_norm.bias"] = torch.randn(out, generator=rng)
        if extra_key:
            sd[extra_key] = torch.zeros(1)
        p = tmp_path / f"expert_{i}.pt"
        torch.save({"model": sd, "epoch": 3}, p)
        paths.append(p)
    np.save(tmp_path / "centroids.npy", np.random.default_rng(0).normal(size=(k, d)).astype(np.float32))
    np.save(tmp_path / "fine_to_expert.npy", np.arange(k) % e)
    return paths


def test_from_original_maps_keys_and_computes_each_expert(tmp_path):
    paths = _write_original(tmp_path)
    m = Spade.from_original(paths, tmp_path / "centroids.npy", tmp_path / "fine_to_expert.npy",
                            backbone="uni", panel=[f"g{i}" for i in range(5)])
    x = torch.randn(7, 8)
    # expert 1's image head, computed by hand from the original file
    sd = torch.load(paths[1], weights_only=True)["model"]
    h = x @ sd["image_projection.projection.weight"].T + sd["image_projection.projection.bias"]
    y = torch.nn.functional.gelu(h) @ sd["image_projection.fc.weight"].T + sd["image_projection.fc.bias"]
    ref = torch.nn.functional.layer_norm(h + y, (4,), sd["image_projection.layer_norm.weight"],
                                         sd["image_projection.layer_norm.bias"])
    got = m.module.image_heads.forward_assigned(x, torch.full((7,), 1))
    assert torch.allclose(got, ref, atol=1e-5)


def test_from_original_is_strict(tmp_path):
    paths = _write_original(tmp_path, extra_key="image_projection.unknown")
    with pytest.raises(ValueError, match="unexpected"):
        Spade.from_original(paths, tmp_path / "centroids.npy", tmp_path / "fine_to_expert.npy",
                            backbone="uni", panel=[f"g{i}" for i in range(5)])


def test_from_original_reads_per_organ_centroids(tmp_path):
    """The original saves each organ's centroids as (1, K, D): one file, several files, or (G, K, D) all load."""
    paths = _write_original(tmp_path, k=6)
    c = np.load(tmp_path / "centroids.npy")
    panel = [f"g{i}" for i in range(5)]
    flat = Spade.from_original(paths, c, tmp_path / "fine_to_expert.npy", backbone="uni", panel=panel)
    assert flat.feature_recipe == {"layers": ["final"], "tta": False, "zscore": None}
    x = np.random.default_rng(1).normal(size=(9, 8)).astype(np.float32)
    np.save(tmp_path / "organ.npy", c[None])  # (1, K, D)
    np.save(tmp_path / "organ_a.npy", c[None, :4])
    np.save(tmp_path / "organ_b.npy", c[None, 4:])
    for centroids in (tmp_path / "organ.npy", [tmp_path / "organ_a.npy", tmp_path / "organ_b.npy"],
                      c.reshape(2, 3, 8)):
        m = Spade.from_original(paths, centroids, tmp_path / "fine_to_expert.npy", backbone="uni", panel=panel)
        assert m.config.feature_dim == 8 and m.config.n_fine == 6
        np.testing.assert_allclose(m.routing_weights(x), flat.routing_weights(x), atol=1e-6)
    # what cannot be centroids is named clearly
    np.save(tmp_path / "bad.npy", np.zeros((2, 2, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"`centroids` must be fine centroids \(K, D\), or per organ \(1, K, D\)"):
        Spade.from_original(paths, tmp_path / "bad.npy", tmp_path / "fine_to_expert.npy", backbone="uni", panel=panel)
    with pytest.raises(ValueError, match="centroids` are 5-d but the image heads take 8-d"):
        Spade.from_original(paths, c[:, :5], tmp_path / "fine_to_expert.npy", backbone="uni", panel=panel)
