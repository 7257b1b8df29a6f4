"""Training under torchrun: 2 CPU processes (gloo) must give the single-process weights."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sq_spade
from sq_spade import settings
from sq_spade.train._distributed import DistributedContext, resolve_distributed

# One script, run by torchrun (2 processes) and imported here (1 process): the same scenarios,
# the same data. Each process writes its own weights with safetensors (a test's business; the
# library writes from rank 0 only, which scenario "tl" checks).
SCRIPT = textwrap.dedent('''
    import json
    import os
    import sys
    import warnings

    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from torch import nn

    import sq_spade as sqs
    from sq_spade.train import fit_contrastive, fit_experts

    sqs.settings.progress = False
    SMALL = dict(out_dim=8, heads=2, dim_head=4, device="cpu", lr=3e-3, weight_decay=0.05)


    def factor_data(n, seed=0):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(n, 3))
        f = z @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(n, 12))
        e = np.log1p(np.exp(z @ rng.normal(size=(3, 10))))
        return f.astype("f4"), e.astype("f4"), rng.integers(0, 5, size=(n, 2)), z


    class Patches(torch.utils.data.Dataset):
        """8 x 8 uint8 patches coloured by the hidden factor; counts the patches it serves."""

        def __init__(self, z, seed=0):
            rng = np.random.default_rng(seed)
            base = (np.tanh(z) * 100 + 128)[:, None, None, :]
            self.x = np.clip(base + rng.normal(scale=10, size=(len(z), 8, 8, 3)), 0, 255)
            self.x = self.x.astype(np.uint8)
            self.served = 0

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            self.served += 1
            return self.x[i]


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(F.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


    def state(fit):
        mods = {"head": fit.image_head, "spot": fit.spot_encoder, "enc": fit.image_encoder}
        return {f"{k}.{n}": t.detach().clone().contiguous() for k, m in mods.items()
                if m is not None for n, t in m.state_dict().items()}


    def frozen(distributed):
        # whole-batch attention (context=None) and dropout: exact only with whole-batch compute
        f, e, p, _ = factor_data(57)
        fit = fit_contrastive(f[:45], e[:45], p[:45], None, val_features=f[45:],
                              val_expr=e[45:], val_pos=p[45:], epochs=4, batch_size=16,
                              patience=2, distributed=distributed, **SMALL)
        return state(fit), fit.history, {}


    def encoder(distributed):
        # 33 spots in batches of 16: parts of 8 + 8, twice, then a lone spot that every process
        # encodes; 10 validation spots split 5 + 5; augmentation on
        _, e, p, z = factor_data(43, seed=1)
        torch.manual_seed(0)
        net = Net()
        tr, va = Patches(z[:33]), Patches(z[33:], seed=1)
        fit = fit_contrastive(None, e[:33], p[:33], None, images=tr, image_encoder=net,
                              val_expr=e[33:], val_pos=p[33:], val_images=va, epochs=3,
                              batch_size=16, augment=True, distributed=distributed, **SMALL)
        return state(fit), fit.history, {"served": tr.served + va.served}


    def synth_sections():
        sd = sqs.io.combine_sections([
            sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=4, n_cols=4,
                                           patient=f"p{i}", n_genes=12) for i in range(2)])
        return sd, list(sd.tables["table"].var_names)


    def tl_dummy(distributed, out=None):
        sd, genes = synth_sections()
        model = sqs.tl.train_contrastive(
            sd, backbone="dummy", finetune="all", panel=genes, epochs=2, batch_size=8,
            train_sections=["s0"], validation_sections=["s1"], patch_px=16, out_dim=8, heads=2,
            dim_head=4, lr=3e-3, device="cpu", distributed=distributed)
        if out is not None:
            model.save(os.path.join(out, "model"))  # every rank calls save: rank 0 writes
            if int(os.environ["RANK"]) == 1:
                model.save(os.path.join(out, "rank1_model"))  # must write nothing
        sd_state = {f"head.{k}": v for k, v in model.image_head.state_dict().items()}
        sd_state.update({f"spot.{k}": v for k, v in model.spot_encoder.state_dict().items()})
        return {k: v.clone() for k, v in sd_state.items()}, model.config["history"], {}


    def experts(distributed):
        # SPADE's experts have no DDP: every rank trains the same experts on its own
        rng = np.random.default_rng(2)
        f, g = rng.normal(size=(40, 12)).astype("f4"), rng.random((40, 10)).astype("f4")
        img, gene, hist = fit_experts(f, g, np.arange(40) % 2, n_experts=2, epochs=2,
                                      batch_size=8, out_dim=8, device="cpu")
        return {"img." + k: v.clone() for k, v in img.state_dict().items()}, hist, {}


    SCENARIOS = {"frozen": frozen, "encoder": encoder, "tl": tl_dummy, "experts": experts}


    def history_json(h):
        return {k: np.asarray(h[k], dtype=float).tolist() for k in ("train_loss", "val_loss")} | {
            "world_size": h.get("world_size"), "n_epochs": int(h["n_epochs"])}


    if __name__ == "__main__":
        out = sys.argv[1]
        rank = int(os.environ["RANK"])
        for name, fn in SCENARIOS.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tensors, hist, extra = fn("auto", out) if name == "tl" else fn("auto")
            save_file(tensors, os.path.join(out, f"{name}_rank{rank}.safetensors"))
            with open(os.path.join(out, f"{name}_rank{rank}.json"), "w") as fh:
                json.dump(history_json(hist) | extra | {"warnings": [str(w.message) for w in caught
                          if "BatchNorm" in str(w.message)]}, fh)
        import torch.distributed as dist

        dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train_ddp.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def torchrun_out(script):
    """Run every scenario under ``torchrun --nproc_per_node=2`` (gloo, CPU) once."""
    out = script.parent / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(sq_spade.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(script), str(out)]
    # own session: on a timeout the whole group (torchrun and its workers) is killed
    proc = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-4000:]
    return out


@pytest.fixture(scope="module")
def single(script):
    """The same scenarios in this one process (no process group)."""
    old = settings.progress
    settings.progress = False
    try:
        ns = runpy.run_path(str(script), run_name="single_process")
        return {name: fn(False) for name, fn in ns["SCENARIOS"].items()}
    finally:
        settings.progress = old


def _ranks(out, name):
    w = [load_file(out / f"{name}_rank{r}.safetensors") for r in (0, 1)]
    h = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
    return w, h


def _assert_close(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("name", ["frozen", "encoder", "tl"])
def test_ddp_matches_single_process(torchrun_out, single, name):
    (w0, w1), (h0, h1) = _ranks(torchrun_out, name)
    ws, hs, extra = single[name]
    # every process returns the same model
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert h0 == h1
    # ... which is the single-process model, up to float rounding
    _assert_close(w0, {k: v.float() if v.is_floating_point() else v for k, v in ws.items()})
    np.testing.assert_allclose(h0["train_loss"], hs["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(h0["val_loss"], hs["val_loss"], rtol=1e-5)
    assert h0["world_size"] == 2 and hs["world_size"] == 1
    if name == "encoder":
        # each process loaded its own part of the patches (plus the lone spot of each epoch)
        assert h0["served"] < extra["served"] and h1["served"] < extra["served"]
        assert h0["served"] + h1["served"] == extra["served"] + 3 + 1  # + one probe patch
        assert not h0["warnings"]  # GroupNorm, no BatchNorm warning


@pytest.mark.xdist_group("ddp")
def test_only_rank0_writes_and_experts_run_on_every_rank(torchrun_out, single):
    from sq_spade.models import MclSTExp

    saved = torchrun_out / "model"
    assert sorted(p.suffix for p in saved.iterdir() if p.name != ".lock") == [".json", ".safetensors"]
    assert not (torchrun_out / "rank1_model").exists()
    back = MclSTExp.load(saved)
    w0, _ = _ranks(torchrun_out, "tl")[0]
    assert torch.equal(back.image_head.projection.weight, w0["head.projection.weight"])
    # SPADE's experts: no DDP, each rank trains the same experts as a single process
    (e0, e1), _ = _ranks(torchrun_out, "experts")
    assert all(torch.equal(e0[k], e1[k]) for k in e0)
    _assert_close(e0, single["experts"][0])


# --- in-process: no torchrun ------------------------------------------------------------------
def test_resolve_distributed_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cpu = torch.device("cpu")
    assert not resolve_distributed("auto", cpu).enabled
    assert not resolve_distributed(False, cpu).enabled
    with pytest.raises(RuntimeError, match="torchrun"):
        resolve_distributed(True, cpu)
    with pytest.raises(ValueError, match="distributed"):
        resolve_distributed("yes", cpu)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not resolve_distributed("auto", cpu).enabled  # a single process needs no group


def test_shards_cover_each_global_batch_once():
    for world in (2, 3, 4):
        for n in range(1, 12):
            parts = [DistributedContext(True, r, world).shard(torch.arange(n)) for r in range(world)]
            if n < world:  # too few rows: every process takes the whole batch
                assert all(p.tolist() == list(range(n)) for p in parts)
            else:
                assert torch.cat(parts).tolist() == list(range(n))
                assert [len(p) for p in parts] == DistributedContext(True, 0, world).sizes(n)
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_non_zero_rank_writes_nothing_and_shows_no_progress(monkeypatch, tmp_path, capsys):
    from sq_spade._files import save_model_files
    from sq_spade._utils import progress

    monkeypatch.setenv("RANK", "1")  # as torchrun sets it (no process group here)
    assert save_model_files(tmp_path / "m", cls="X", config={}, tensors={"a": torch.zeros(2)},
                            version="0") == tmp_path / "m"
    assert not (tmp_path / "m").exists()
    assert list(progress(range(3), enabled=True, desc="hidden")) == [0, 1, 2]
    assert "hidden" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    save_model_files(tmp_path / "m", cls="X", config={}, tensors={"a": torch.zeros(2)}, version="0")
    assert (tmp_path / "m" / "config.json").exists()


def test_sync_batchnorm_swap_puts_the_original_layers_back():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    bn = net[1]
    ctx = DistributedContext(True, 0, 2, torch.device("cuda", 0))  # conversion is CUDA-only
    with ctx.synced_batchnorm(net, trainable=True):
        assert isinstance(net[1], torch.nn.SyncBatchNorm) and net[1].weight is bn.weight
        net[1].running_mean.add_(1.0)
        net[1].running_var = net[1].running_var * 2  # a new tensor, as .to(device) makes
    assert net[1] is bn
    assert torch.equal(bn.running_mean, torch.ones(4)) and torch.equal(bn.running_var, 2 * torch.ones(4))
    with pytest.warns(UserWarning, match="BatchNorm"):
        DistributedContext(True, 0, 2).warn_batchnorm([net])
