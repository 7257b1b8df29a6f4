from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sq_spade import settings
from sq_spade.nn.losses import clip_loss
from sq_spade.train import default_augmentation, fit_contrastive

SMALL = {"out_dim": 16, "heads": 2, "dim_head": 8, "device": "cpu"}


@pytest.fixture(autouse=True)
def _quiet():
    old = settings.progress
    settings.progress = False
    yield
    settings.progress = old


def shared_factor(n, d=16, g=10, k=3, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    a, b = rng.normal(size=(k, d)), rng.normal(size=(k, g))
    feats = z @ a + noise * rng.normal(size=(n, d))
    expr = np.log1p(np.exp(z @ b)) + noise * rng.normal(size=(n, g))
    pos = rng.integers(0, 6, size=(n, 2))
    return feats.astype("f4"), expr.astype("f4"), pos, z


def test_learns_shared_factor_and_retrieves():
    f, e, p, _ = shared_factor(260)
    fit = fit_contrastive(f[:200], e[:200], p[:200], "self", val_features=f[200:],
                          val_expr=e[200:], val_pos=p[200:], epochs=20, batch_size=32, lr=1e-3,
                          patience=None, **SMALL)
    h = fit.history
    assert h["val_loss"].shape == (20,) and h["n_epochs"] == 20
    assert h["val_loss"][-1] < 0.75 * h["val_loss"][0]
    assert fit.image_encoder is None and not fit.spot_encoder.training
    with torch.no_grad():
        zi = F.normalize(fit.image_head(torch.from_numpy(f[200:])), dim=1)
        zs = F.normalize(fit.spot_encoder(torch.from_numpy(e[200:]), torch.from_numpy(p[200:]),
                                          "self"), dim=1)
    top1 = float(((zi @ zs.T).argmax(1) == torch.arange(60)).float().mean())
    assert top1 > 4 / 60  # chance is 1/60


def test_position_tables_sized_from_data():
    f, e, p, _ = shared_factor(40)
    vp = p[:10].copy()
    vp[0] = [9, 11]  # validation positions count too
    fit = fit_contrastive(f, e, p, val_features=f[:10], val_expr=e[:10], val_pos=vp, epochs=1,
                          batch_size=16, **SMALL)
    assert fit.spot_encoder.x_embed.num_embeddings == 10
    assert fit.spot_encoder.y_embed.num_embeddings == 12
    fit = fit_contrastive(f, e, None, epochs=1, batch_size=16, **SMALL)
    assert fit.spot_encoder.x_embed is None and fit.history["n_x"] is None


def test_same_seed_same_weights():
    f, e, p, _ = shared_factor(48)
    kw = {"epochs": 2, "batch_size": 16, **SMALL}
    a = fit_contrastive(f, e, p, seed=1, **kw)
    b = fit_contrastive(f, e, p, seed=1, **kw)
    c = fit_contrastive(f, e, p, seed=2, **kw)
    for x, y in zip(a.spot_encoder.parameters(), b.spot_encoder.parameters(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.image_head.projection.weight, b.image_head.projection.weight)
    assert not torch.equal(a.image_head.projection.weight, c.image_head.projection.weight)


def test_early_stopping_restores_best_weights():
    rng = np.random.default_rng(3)  # nothing to learn: validation loss rises quickly
    f, e = rng.normal(size=(64, 16)).astype("f4"), rng.random((64, 10)).astype("f4")
    p = rng.integers(0, 4, size=(64, 2))
    tr, va = slice(0, 40), slice(40, 64)
    fit = fit_contrastive(f[tr], e[tr], p[tr], val_features=f[va], val_expr=e[va],
                          val_pos=p[va], epochs=60, batch_size=40, lr=1e-2, patience=2, **SMALL)
    h = fit.history
    assert h["stopped_early"] and h["n_epochs"] == h["best_epoch"] + 3 < 60
    assert h["val_loss"][-1] > h["best_val_loss"] == pytest.approx(h["val_loss"].min())
    with torch.no_grad():  # all 24 validation spots form one batch
        got = clip_loss(fit.image_head(torch.from_numpy(f[va])),
                        fit.spot_encoder(torch.from_numpy(e[va]), torch.from_numpy(p[va])))
    assert float(got) == pytest.approx(h["best_val_loss"], rel=1e-5)


def test_group_context_and_bleep_loss():
    f, e, p, _ = shared_factor(48)
    groups = np.repeat([0, 1, 2], 16)
    fit = fit_contrastive(f, e, p, groups, val_features=f[:8], val_expr=e[:8], val_pos=p[:8],
                          val_context=groups[:8], loss="bleep", epochs=2, batch_size=16, **SMALL)
    assert np.isfinite(fit.history["val_loss"]).all()
    with pytest.raises(ValueError, match="val_context"):
        fit_contrastive(f, e, p, groups, val_features=f[:8], val_expr=e[:8], val_pos=p[:8],
                        epochs=1, **SMALL)


# --- trainable image encoder ----------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class Patches(torch.utils.data.Dataset):
    """8 x 8 uint8 patches whose colours encode the hidden factor."""

    def __init__(self, z, seed=0):
        rng = np.random.default_rng(seed)
        base = (np.tanh(z[:, :3]) * 100 + 128)[:, None, None, :]
        self.x = np.clip(base + rng.normal(scale=10, size=(len(z), 8, 8, 3)), 0, 255)
        self.x = self.x.astype(np.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def finetune_run(finetune, epochs=2, **kw):
    _, e, p, z = shared_factor(48)
    torch.manual_seed(0)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit = fit_contrastive(None, e[:32], p[:32], images=Patches(z[:32]), image_encoder=net,
                          finetune=finetune, val_expr=e[32:], val_pos=p[32:],
                          val_images=Patches(z[32:], seed=1), epochs=epochs, batch_size=16,
                          **SMALL, **kw)
    changed = {k: not torch.equal(before[k], v) for k, v in fit.image_encoder.state_dict().items()}
    return fit, changed


def test_finetune_all_last_none():
    fit, changed = finetune_run("all")
    assert fit.image_head.in_dim == 6
    assert changed["conv.weight"] and changed["fc.weight"] and changed["bn.running_mean"]
    assert np.isfinite(fit.history["val_loss"]).all()
    _, changed = finetune_run("last")
    assert changed["fc.weight"] and not changed["conv.weight"]
    assert not changed["bn.running_mean"]  # frozen parts stay in eval mode
    fit, changed = finetune_run("none")
    assert not any(changed.values())
    assert all(p.requires_grad for p in fit.image_encoder.parameters())  # handed back as found
    _, changed = finetune_run(["conv."], augment=False)
    assert changed["conv.weight"] and not changed["fc.weight"]


def test_finetune_learns_and_is_deterministic():
    fit1, _ = finetune_run("all", epochs=6, lr=3e-3)
    fit2, _ = finetune_run("all", epochs=6, lr=3e-3)
    h = fit1.history
    assert h["val_loss"].min() < h["val_loss"][0]
    assert torch.equal(fit1.image_encoder.conv.weight, fit2.image_encoder.conv.weight)


def test_augmentation_keeps_pixels_and_shape():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    out = default_augmentation()(img)
    assert out.shape == img.shape and out.dtype == torch.uint8
    rot = default_augmentation().transforms[-1]
    for _ in range(4):  # rotations by 90 degrees only permute pixels
        r = rot(img)
        assert torch.equal(r.flatten().sort().values, img.flatten().sort().values)


def test_bad_arguments():
    f, e, p, z = shared_factor(20)
    with pytest.raises(ValueError, match="features"):
        fit_contrastive(f, e, p, images=Patches(z), image_encoder=TinyNet(), device="cpu")
    with pytest.raises(ValueError, match="features"):
        fit_contrastive(None, e, p, device="cpu")
    with pytest.raises(ValueError, match="pos"):
        fit_contrastive(f, e, -p - 1, device="cpu")
    with pytest.raises(ValueError, match="context"):
        fit_contrastive(f, e, p, "batch", device="cpu")
    with pytest.raises(ValueError, match="finetune"):
        fit_contrastive(None, e, p, images=Patches(z), image_encoder=TinyNet(),
                        finetune="some", epochs=1, **SMALL)
    bad = Patches(z)
    bad.x = bad.x.astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        fit_contrastive(None, e, p, images=bad, image_encoder=TinyNet(), epochs=1, **SMALL)
