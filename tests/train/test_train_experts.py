from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sq_spade.nn.experts import ExpertHeads
from sq_spade.nn.losses import bleep_loss
from sq_spade.train import (
    EarlyStopping,
    StackedAdamW,
    cosine_schedule,
    fit_experts,
    history_to_json,
    load_checkpoint_state,
    make_generator,
    state_for_checkpoint,
)

pytestmark = pytest.mark.usefixtures("no_progress")


def shared_factor(n, d=16, g=10, k=3, n_experts=2, seed=0, noise=0.1):
    """Image features and genes that share a hidden factor z; experts are offset clusters."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    a, b = rng.normal(size=(k, d)), rng.normal(size=(k, g))
    expert = rng.integers(0, n_experts, n)
    offsets = rng.normal(scale=3, size=(n_experts, d))
    feats = z @ a + offsets[expert] + noise * rng.normal(size=(n, d))
    genes = z @ b + noise * rng.normal(size=(n, g))
    return feats.astype("f4"), genes.astype("f4"), expert


def unrelated(n, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 16)).astype("f4"), rng.normal(size=(n, 10)).astype("f4"),
            np.repeat([0, 1], n // 2))


def val_loss_of(img, gene, f, g, ex, e):
    with torch.no_grad():
        sel = torch.from_numpy(ex == e)
        x, y = torch.from_numpy(f)[sel], torch.from_numpy(g)[sel]
        return float(bleep_loss(img.forward_one(x, e), gene.forward_one(y, e)))


def test_learns_shared_factor_and_retrieves():
    f, g, ex = shared_factor(260)
    img, gene, hist = fit_experts(
        f[:200], g[:200], ex[:200], n_experts=2, val_features=f[200:], val_genes=g[200:],
        val_expert=ex[200:], epochs=30, batch_size=32, lr=1e-3, out_dim=16, device="cpu")
    assert hist["val_loss"].shape == hist["train_loss"].shape == (30, 2)
    assert np.all(hist["val_loss"][-1] < 0.7 * hist["val_loss"][0])
    assert np.all(hist["train_loss"][-1] < hist["train_loss"][0])
    assert not img.training and img.weight1.device.type == "cpu"
    vf, vg, vex = f[200:], g[200:], ex[200:]
    for e in range(2):
        sel = vex == e
        with torch.no_grad():
            zi = torch.nn.functional.normalize(img.forward_one(torch.from_numpy(vf[sel]), e), dim=1)
            zg = torch.nn.functional.normalize(gene.forward_one(torch.from_numpy(vg[sel]), e), dim=1)
        top1 = float((zi @ zg.T).argmax(1).eq(torch.arange(sel.sum())).float().mean())
        assert top1 > 5 / sel.sum()  # chance is 1 / n


def test_each_expert_trains_as_if_alone():
    """Stacked training == torch AdamW + cosine on one head pair, even while others run on."""
    f, g, _ = shared_factor(28)
    ex = np.array([0] * 8 + [1] * 20)  # expert 0: 1 batch per epoch, expert 1: 3
    torch.manual_seed(0)
    init = (ExpertHeads(2, 16, 4, 0.0), ExpertHeads(2, 10, 4, 0.0))
    img, gene, hist = fit_experts(f, g, ex, n_experts=2, epochs=4, batch_size=8, lr=1e-2,
                                  dropout=0.0, out_dim=4, device="cpu", init=init)
    assert hist["steps"].tolist() == [4, 12]
    hi, hg = init[0].to_heads()[0], init[1].to_heads()[0]
    opt = torch.optim.AdamW([*hi.parameters(), *hg.parameters()], lr=1e-2, weight_decay=1e-2)
    sched = cosine_schedule(opt, 4)
    x, y = torch.from_numpy(f[:8]), torch.from_numpy(g[:8])
    for _ in range(4):  # one full batch per epoch: the shuffling order does not matter
        loss = bleep_loss(hi(x), hg(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    got_i, got_g = img.to_heads()[0], gene.to_heads()[0]
    for a, b in ((got_i, hi), (got_g, hg)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(va, vb, atol=1e-6, rtol=1e-5, msg=k)
    # `init` was copied, not trained in place
    assert not torch.allclose(init[0].weight1[0], img.weight1[0])


def test_same_seed_same_weights():
    f, g, ex = shared_factor(80)
    kw = {"n_experts": 2, "epochs": 3, "batch_size": 16, "out_dim": 8, "device": "cpu"}
    state = torch.get_rng_state()
    a1, b1, _ = fit_experts(f, g, ex, seed=3, **kw)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    a2, b2, _ = fit_experts(f, g, ex, seed=3, **kw)
    a3, _, _ = fit_experts(f, g, ex, seed=4, **kw)
    for p, q in zip([*a1.parameters(), *b1.parameters()], [*a2.parameters(), *b2.parameters()],
                    strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a1.weight1, a3.weight1)


def test_best_validation_epoch_is_restored_per_expert():
    f, g, ex = unrelated(60)  # nothing to learn: validation loss rises after a few epochs
    tr, va = slice(0, None, 2), slice(1, None, 2)
    img, gene, hist = fit_experts(
        f[tr], g[tr], ex[tr], n_experts=2, val_features=f[va], val_genes=g[va],
        val_expert=ex[va], epochs=15, batch_size=32, lr=1e-2, out_dim=16, device="cpu")
    best = hist["best_epoch"]
    assert np.all(best >= 0) and np.all(best < 14)
    assert np.all(hist["val_loss"][-1] > hist["best_val_loss"])
    np.testing.assert_allclose(hist["best_val_loss"], np.nanmin(hist["val_loss"], axis=0))
    for e in range(2):  # the returned weights give the best loss, not the last one
        got = val_loss_of(img, gene, f[va], g[va], ex[va], e)
        assert got == pytest.approx(hist["best_val_loss"][e], rel=1e-5)


def test_expert_without_validation_keeps_last_epoch():
    f, g, ex = unrelated(60)
    kw = {"n_experts": 2, "epochs": 8, "batch_size": 32, "lr": 1e-2, "out_dim": 8,
          "device": "cpu", "seed": 1}
    img0, _, _ = fit_experts(f[:40], g[:40], ex[:40], **kw)
    only0 = np.zeros(10, dtype=int)  # validation spots for expert 0 only
    img1, _, hist = fit_experts(f[:40], g[:40], ex[:40], val_features=f[40:50],
                                val_genes=g[40:50], val_expert=only0, **kw)
    assert hist["n_val"].tolist() == [10, 0]
    as_json = json.loads(json.dumps(history_to_json(hist)))
    assert as_json["val_loss"][0][1] is None and as_json["n_val"] == [10, 0]
    assert hist["best_epoch"][1] == -1 and np.isnan(hist["val_loss"][:, 1]).all()
    torch.testing.assert_close(img1.weight1[1], img0.weight1[1])  # last epoch, unchanged run
    if hist["best_epoch"][0] < 7:
        assert not torch.allclose(img1.weight1[0], img0.weight1[0])


def test_patience_stops_experts():
    f, g, ex = unrelated(60)
    tr, va = slice(0, None, 2), slice(1, None, 2)
    _, _, hist = fit_experts(
        f[tr], g[tr], ex[tr], n_experts=2, val_features=f[va], val_genes=g[va],
        val_expert=ex[va], epochs=50, batch_size=32, lr=1e-2, out_dim=8, device="cpu",
        patience=3)
    stopped = hist["stopped_epoch"]
    assert np.all(stopped >= 0)
    np.testing.assert_array_equal(stopped, hist["best_epoch"] + 3)
    assert hist["n_epochs"] == stopped.max() + 1 < 50
    assert hist["steps"].tolist() == (stopped + 1).tolist()  # 1 batch per epoch each


def test_empty_expert_raises_or_warns():
    f, g, _ = shared_factor(20)
    ex = np.zeros(20, dtype=int)
    with pytest.raises(ValueError, match="expert"):
        fit_experts(f, g, ex, n_experts=2, epochs=1, device="cpu")
    torch.manual_seed(0)
    init = (ExpertHeads(2, 16, 4), ExpertHeads(2, 10, 4))
    with pytest.warns(UserWarning, match="no training spot"):
        img, _, hist = fit_experts(f, g, ex, n_experts=2, epochs=2, out_dim=4, device="cpu",
                                   empty="warn", init=init)
    assert hist["trained"].tolist() == [True, False]
    assert torch.equal(img.weight1[1], init[0].weight1[1])
    assert not torch.equal(img.weight1[0], init[0].weight1[0])


def test_bad_arguments():
    f, g, ex = shared_factor(20)
    with pytest.raises(ValueError, match="expert"):
        fit_experts(f, g, ex + 5, n_experts=2, device="cpu")
    with pytest.raises(ValueError, match="genes"):
        fit_experts(f, g[:10], ex, n_experts=2, device="cpu")
    with pytest.raises(ValueError, match="val_"):
        fit_experts(f, g, ex, n_experts=2, val_features=f, device="cpu")
    with pytest.raises(ValueError, match="loss"):
        fit_experts(f, g, ex, n_experts=2, loss="mse", device="cpu")
    with pytest.raises(ValueError, match="features"):
        fit_experts(f[:, :, None], g, ex, n_experts=2, device="cpu")


def test_stacked_adamw_leaves_inactive_experts_untouched():
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = StackedAdamW([w], n_experts=3, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        (w * torch.tensor([[1.0], [1.0], [0.0]])).sum().backward()
        opt.step(active=torch.tensor([True, False, True]), lr=torch.tensor([0.1, 0.1, 0.2]))
    assert torch.all(w[1] == 1)  # inactive: no decay, no momentum
    assert torch.all(w[0] < 1) and torch.all(w[2] < 1)  # zero grad still decays when active
    assert opt.state[w]["step"].tolist() == [3, 0, 3]


def test_stacked_adamw_checkpoint_round_trip():
    def build():
        torch.manual_seed(0)
        heads = ExpertHeads(3, 4, 5, dropout=0.0)
        return heads, StackedAdamW(heads.parameters(), 3, lr=0.1)

    def step(heads, opt, x, active):
        opt.zero_grad()
        heads.forward_all(x).pow(2).sum().backward()
        opt.step(active=torch.tensor(active))

    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    h1, o1 = build()
    step(h1, o1, x1, [True, False, True])
    state = state_for_checkpoint({"heads": h1}, o1)
    h2, o2 = build()
    load_checkpoint_state(state, {"heads": h2}, o2)
    step(h1, o1, x2, [True, True, False])
    step(h2, o2, x2, [True, True, False])
    assert torch.equal(h1.weight1, h2.weight1)
    assert o2.state[h2.weight1]["step"].tolist() == [2, 1, 1]


def test_checkpoint_state_resumes_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    def run(model, opt, sched, gen, n):
        for _ in range(n):
            x = torch.randn(4, 3, generator=gen)
            loss = torch.nn.functional.dropout(model(x), 0.5).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, opt, cosine_schedule(opt, 10, warmup_steps=2), make_generator(7)

    model, opt, sched, gen = build()
    run(model, opt, sched, gen, 4)
    state = state_for_checkpoint({"model": model}, opt, sched, {"batches": gen},
                                 metadata={"epoch": 4})
    json.dumps(state["metadata"])
    save_file(state["tensors"], tmp_path / "ckpt.safetensors")
    meta = json.loads(json.dumps(state["metadata"]))
    run(model, opt, sched, gen, 3)
    expected = model.weight.detach().clone()

    model2, opt2, sched2, gen2 = build()
    user = load_checkpoint_state({"tensors": load_file(tmp_path / "ckpt.safetensors"),
                                  "metadata": meta}, {"model": model2}, opt2, sched2,
                                 {"batches": gen2})
    assert user == {"epoch": 4}
    run(model2, opt2, sched2, gen2, 3)
    torch.testing.assert_close(model2.weight, expected, rtol=0, atol=0)


def test_early_stopping_vector():
    es = EarlyStopping(patience=2)
    es.step([3.0, np.nan])
    es.step([2.0, np.nan])
    es.step([2.5, np.nan])
    assert es.stop.tolist() == [False, False]
    es.step([2.6, np.nan])
    assert es.stop.tolist() == [True, False]
    assert es.best_epoch.tolist() == [1, -1]


def _windowed(f, g, ex, n_experts, splits):
    from sq_spade.train import TrainingWindows

    calls = []

    def loader(a, b):
        def load():
            calls.append((a, b))
            return f[a:b], g[a:b], ex[a:b]
        return load

    bounds = list(zip([0, *splits], [*splits, len(f)], strict=True))
    counts = np.stack([np.bincount(ex[a:b], minlength=n_experts) for a, b in bounds])
    return TrainingWindows([loader(a, b) for a, b in bounds], counts, f.shape[1], g.shape[1], key="t"), calls


def test_one_window_is_the_in_memory_training():
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(60, 8)).astype("f4"), rng.normal(size=(60, 5)).astype("f4")
    ex = rng.integers(0, 3, 60)
    kw = dict(n_experts=3, epochs=3, batch_size=8, out_dim=4, device="cpu", seed=1)
    ref = fit_experts(f, g, ex, **kw)
    src, calls = _windowed(f, g, ex, 3, [])
    got = fit_experts(src, None, None, **kw)
    for a, b in zip(ref[0].state_dict().values(), got[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(calls) == 1  # read once, kept


def test_windows_are_read_one_at_a_time_each_epoch():
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(90, 8)).astype("f4"), rng.normal(size=(90, 5)).astype("f4")
    ex = rng.integers(0, 3, 90)
    src, calls = _windowed(f, g, ex, 3, [30, 60])
    img, gen, hist = fit_experts(src, None, None, n_experts=3, epochs=4, batch_size=8, out_dim=4, device="cpu")
    assert len(calls) == 3 * 4 and sorted(set(calls)) == [(0, 30), (30, 60), (60, 90)]
    orders = [calls[i:i + 3] for i in range(0, 12, 3)]
    assert len({tuple(o) for o in orders}) > 1  # window order reshuffled across epochs
    # every expert took ceil(count / batch) steps in every window of every epoch
    per_window = np.ceil(src.expert_counts / 8).sum(axis=0)
    np.testing.assert_array_equal(hist["steps"], 4 * per_window)
    assert np.isfinite(hist["train_loss"]).all()
    bad = type(src)(src.loaders, src.expert_counts[:, :2], 8, 5)
    with pytest.raises(ValueError, match="expert_counts"):
        fit_experts(bad, None, None, n_experts=3, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="`genes` and `expert` must be None"):
        fit_experts(src, g, None, n_experts=3, epochs=1, device="cpu")
