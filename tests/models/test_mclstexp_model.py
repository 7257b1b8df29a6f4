import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from sq_spade.models import ModelFileError
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.nn.heads import ProjectionHead
from sq_spade.nn.spot_encoder import SpotEncoder
from tests.conftest import write_signed

G, D, OUT = 6, 8, 8


def _model(context="self", position="grid", finetune="none", encoder=None, feature_dim=D, seed=0):
    torch.manual_seed(seed)
    n_xy = None if position is None else 5
    spot = SpotEncoder(G, n_xy, n_xy, heads=2, dim_head=4, out_dim=OUT)
    head = ProjectionHead(feature_dim, OUT)
    for p in list(spot.parameters()) + list(head.parameters()):
        nn.init.normal_(p, std=0.3)
    cfg = {"backbone": "dummy", "weights_sha256": "none", "feature_dim": feature_dim,
           "panel": [f"g{i}" for i in range(G)], "gene_input": "log1p_cp10k", "position": position,
           "n_x": n_xy, "n_y": n_xy, "position_bin_um": 100.0 if position == "pixel" else None,
           "context": context, "tile_size": 4, "out_dim": OUT, "dropout": 0.1, "spot_encoder": spot.config(),
           "finetune": finetune, "patch_px": 16 if finetune != "none" else None,
           "input_size": 16 if finetune != "none" else None, "train_sections": ["a"], "validation_sections": [],
           "history": {"train_loss": [1.0, 0.5]}, "params": {"epochs": 2}}
    return MclSTExp(head, spot, cfg, image_encoder=encoder)


def _spots(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, G)).astype(np.float32) * 3, rng.integers(0, 5, (n, 2)),
            rng.integers(0, 6, n))


def test_save_load_gives_identical_embeddings(tmp_path):
    m = _model(context="tile")
    feats = np.random.default_rng(1).normal(size=(30, D)).astype(np.float32)
    expr, pos, groups = _spots()
    m.save(tmp_path / "m")
    back = MclSTExp.load(tmp_path / "m")
    assert np.array_equal(m.embed_images(feats), back.embed_images(feats))
    assert np.array_equal(m.embed_spots(expr, pos, groups), back.embed_spots(expr, pos, groups))
    assert back.config == json.loads(json.dumps(m.config.to_json()))  # the config survives as JSON
    assert back.history == m.history and back.panel == m.panel
    names = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name != ".lock")  # the writers' lock
    assert len(names) == 2 and names[0] == "config.json" and re.match(r"model-[0-9a-f]{16}\.safetensors$", names[1])


@pytest.mark.parametrize("context", ["self", "tile"])
def test_keys_do_not_depend_on_batching_or_order(context):
    m = _model(context=context)
    expr, pos, groups = _spots(60)
    ctx = groups if context == "tile" else None
    ref = m.embed_spots(expr, pos, ctx, batch_size=4096)
    for bs in (1, 7, 25):
        assert np.allclose(m.embed_spots(expr, pos, ctx, batch_size=bs), ref, atol=1e-5)
    perm = np.random.default_rng(3).permutation(60)
    shuffled = m.embed_spots(expr[perm], pos[perm], None if ctx is None else ctx[perm], batch_size=9)
    assert np.allclose(shuffled, ref[perm], atol=1e-5)
    # a spot's key depends on its own expression only under "self", on its tile-mates under "tile"
    changed = expr.copy()
    other = int(np.flatnonzero(groups == groups[0])[1])
    changed[other] = changed[other][::-1] * 2  # a different profile (LayerNorm ignores a uniform shift)
    moved = m.embed_spots(changed, pos, ctx)
    assert np.allclose(moved[0], ref[0], atol=1e-6) == (context == "self")


def test_tile_model_needs_tile_ids_and_positions_are_checked():
    m = _model(context="tile")
    expr, pos, _ = _spots(10)
    with pytest.raises(ValueError, match="tile"):
        m.embed_spots(expr, pos)
    with pytest.raises(ValueError, match="`pos` is required"):
        _model().embed_spots(expr, None)
    with pytest.raises(ValueError, match="must be None"):
        _model(position=None).embed_spots(expr, pos)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        _model().embed_spots(expr, pos + 5)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        _model().embed_images(np.zeros((3, 4), np.float32))


def test_load_refuses_inconsistent_configs(tmp_path):
    _model().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    doc = json.loads(path.read_text())
    bad = json.loads(json.dumps(doc))
    bad["config"]["panel"] = bad["config"]["panel"][:-1]  # panel no longer fits the encoder
    write_signed(path, bad)
    with pytest.raises(ModelFileError, match="genes"):
        MclSTExp.load(tmp_path / "m")
    bad = json.loads(json.dumps(doc))
    bad["config"]["context"] = "neighbours"
    write_signed(path, bad)
    with pytest.raises(ModelFileError, match="context"):
        MclSTExp.load(tmp_path / "m")
    bad = json.loads(json.dumps(doc))
    bad["config"]["n_x"] = 65536  # tables on disk are 5 rows
    bad["config"]["spot_encoder"]["n_x"] = 65536
    write_signed(path, bad)
    with pytest.raises(ModelFileError, match="spot_encoder"):
        MclSTExp.load(tmp_path / "m")


class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4, 5)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def registry():
    """The backbone registry, restored after the test, so test backbones do not outlive it."""
    from sq_spade.nn.backbones import BACKBONES

    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


def test_finetuned_model_roundtrip_keeps_encoder_weights(tmp_path, registry):
    from sq_spade.nn.backbones import get_backbone, register_backbone

    register_backbone("tiny_conv_test", lambda weights=None: _TinyConv(), dim=5, input_size=16, overwrite=True)
    enc = get_backbone("tiny_conv_test")
    torch.manual_seed(1)
    for p in enc.parameters():
        nn.init.normal_(p, std=0.5)
    m = _model(finetune="all", encoder=enc, feature_dim=5)
    m.config["backbone"] = "tiny_conv_test"
    patches = np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    emb = m.embed_patches(patches, batch_size=4, device="cpu")
    assert emb.shape == (6, OUT)
    # a dataset of patches gives the same as the array
    assert np.allclose(m.embed_patches(list(patches), batch_size=5, device="cpu"), emb, atol=1e-6)
    m.save(tmp_path / "m")
    back = MclSTExp.load(tmp_path / "m")
    assert np.array_equal(back.embed_patches(patches, device="cpu"), m.embed_patches(patches, device="cpu"))
    with pytest.raises(ValueError, match="embed_patches"):
        back.embed_images(np.zeros((2, 5), np.float32))
    # weights of the encoder really come from the file: a fresh backbone embeds differently
    fresh = _model(finetune="all", encoder=get_backbone("tiny_conv_test"), feature_dim=5)
    assert not np.allclose(fresh.embed_patches(patches, device="cpu"), emb, atol=1e-3)
