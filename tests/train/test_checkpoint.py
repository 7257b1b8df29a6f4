"""Checkpoints of both trainers: exact resume, atomic writes under SIGKILL, no code run on load."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sq_spade
from sq_spade._files import CONFIG_FILE, LOCK_FILE
from sq_spade.train import CheckpointError, read_checkpoint
from sq_spade.train import fit_contrastive as _fit_contrastive
from sq_spade.train import fit_experts as _fit_experts
from sq_spade.train._checkpoint import Checkpointer
from tests.train.test_train_contrastive import Patches, TinyNet

SRC = str(Path(sq_spade.__file__).resolve().parents[1])
# a checkpoint every epoch unless a test says otherwise (the default is every 10)
fit_experts = functools.partial(_fit_experts, checkpoint_every=1)
fit_contrastive = functools.partial(_fit_contrastive, checkpoint_every=1)


pytestmark = pytest.mark.usefixtures("no_progress")


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def interrupt_after(epoch):
    """Raise once the loop has finished (and possibly checkpointed) ``epoch`` epochs."""
    original = Checkpointer.end_epoch

    def end_epoch(self, done, finished, **kw):
        saved = original(self, done, finished, **kw)
        if done == epoch:
            raise Interrupted
        return saved

    Checkpointer.end_epoch = end_epoch
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        Checkpointer.end_epoch = original


def assert_same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_history(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True), k
        else:
            assert x == y or (x != x and y != y), k


# --- data --------------------------------------------------------------------------------------
def expert_data(seed=0, n=60, d=8, g=5, e=3):
    rng = np.random.default_rng(seed)
    f, x = rng.normal(size=(n, d)).astype("f4"), rng.normal(size=(n, g)).astype("f4")
    vf, vx = rng.normal(size=(n // 2, d)).astype("f4"), rng.normal(size=(n // 2, g)).astype("f4")
    return {"features": f, "genes": x, "expert": np.arange(n) % e, "val_features": vf,
            "val_genes": vx, "val_expert": np.arange(n // 2) % e}


EXPERTS = {"n_experts": 3, "epochs": 6, "batch_size": 8, "out_dim": 4, "dropout": 0.3,
           "lr": 1e-2, "warmup_steps": 2, "device": "cpu"}


def contrastive_data(n=48, d=12, g=8, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    f = (z @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))).astype("f4")
    e = np.log1p(np.exp(z @ rng.normal(size=(3, g)))).astype("f4")
    return f, e, rng.integers(0, 5, size=(n, 2)), z


SMALL = {"out_dim": 8, "heads": 2, "dim_head": 4, "device": "cpu", "dropout": 0.3,
         "encoder_dropout": 0.2}


# --- fit_experts -------------------------------------------------------------------------------
CHILD = """
import os, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
sys.path.insert(0, {src!r})
import sq_spade
sq_spade.settings.progress = False
from sq_spade.train import fit_experts
from sq_spade.train._checkpoint import Checkpointer

def block():
    open({marker!r}, "w").close()
    time.sleep(300)  # until SIGKILL

{patch}
data = dict(np.load({data!r}, allow_pickle=False))
fit_experts(**data, **{kwargs!r}, checkpoint_dir={folder!r}, checkpoint_every={every})
"""


def run_and_kill(tmp_path, data, kwargs, folder, every, patch):
    """Train in a child process and SIGKILL it once it calls ``block()``."""
    np.savez(tmp_path / "data.npz", **data)
    marker = tmp_path / "blocked"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(threads=torch.get_num_threads(), src=SRC, marker=str(marker),
                                   patch=textwrap.dedent(patch), data=str(tmp_path / "data.npz"),
                                   kwargs=kwargs, folder=str(folder), every=every))
    child = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited with {child.returncode} before blocking: "
                            f"{child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "child never reached the blocking point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def test_experts_resume_with_validation_and_patience(tmp_path):
    data = expert_data(3)
    kw = {**EXPERTS, "patience": 2}
    img, gen, hist = fit_experts(**data, **kw)
    assert hist["stopped_epoch"].tolist() == [-1, 3, -1]  # an expert stops after the resume
    with interrupt_after(3):  # the checkpoint of epoch 2 is on disk, epoch 3 is lost
        fit_experts(**data, **kw, checkpoint_dir=tmp_path, checkpoint_every=2)
    info = read_checkpoint(tmp_path)
    assert (info["kind"], info["epoch"], info["finished"]) == ("fit_experts", 2, False)
    img2, gen2, hist2 = fit_experts(**data, **kw, checkpoint_dir=tmp_path, checkpoint_every=2,
                                    resume=True)
    assert_same_modules(img, img2)
    assert_same_modules(gen, gen2)
    assert_same_history(hist, hist2)
    assert read_checkpoint(tmp_path)["finished"]


@pytest.mark.parametrize("stop_after", [1, 4])
def test_experts_resume_without_validation(tmp_path, stop_after):
    data = {k: v for k, v in expert_data(1).items() if not k.startswith("val_")}
    img, gen, hist = fit_experts(**data, **EXPERTS)
    with interrupt_after(stop_after):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path / "a")
    # resume from a path, writing later checkpoints to another folder
    img2, gen2, hist2 = fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path / "b",
                                    resume=tmp_path / "a")
    assert_same_modules(img, img2)
    assert_same_modules(gen, gen2)
    assert_same_history(hist, hist2)
    assert read_checkpoint(tmp_path / "a")["epoch"] == stop_after
    assert read_checkpoint(tmp_path / "b")["epoch"] == EXPERTS["epochs"]


@pytest.mark.parametrize("dropped", ["global_rng", "generators", "optimizer"])
def test_resume_needs_every_piece_of_state(tmp_path, monkeypatch, dropped):
    """Control: leave one piece of state out of the restore and the run is no longer the same."""
    import sq_spade.train._checkpoint as ck

    data = expert_data(2)
    img, _, _ = fit_experts(**data, **EXPERTS)
    with interrupt_after(3):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path)
    real = ck.load_checkpoint_state

    def partial_restore(state, modules, optimizer=None, scheduler=None, generators=None,
                        restore_global_rng=True):
        return real(state, modules, None if dropped == "optimizer" else optimizer, scheduler,
                    None if dropped == "generators" else generators,
                    restore_global_rng=dropped != "global_rng")

    monkeypatch.setattr(ck, "load_checkpoint_state", partial_restore)
    img2, _, _ = fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path, resume=True)
    assert not torch.equal(img.weight1, img2.weight1)


def test_finished_run_resumes_to_its_result(tmp_path):
    data = expert_data(3)
    kw = {**EXPERTS, "patience": 1, "epochs": 40}
    img, _, hist = fit_experts(**data, **kw, checkpoint_dir=tmp_path, checkpoint_every=100)
    info = read_checkpoint(tmp_path)
    assert info["finished"] and info["epoch"] == hist["n_epochs"] < 40  # stopped early
    stamp = (tmp_path / CONFIG_FILE).stat().st_mtime_ns
    img2, _, hist2 = fit_experts(**data, **kw, checkpoint_dir=tmp_path, resume=True)
    assert_same_modules(img, img2)
    assert_same_history(hist, hist2)
    assert (tmp_path / CONFIG_FILE).stat().st_mtime_ns == stamp  # nothing trained, nothing written


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    data = expert_data(4)
    img, _, hist = fit_experts(**data, **EXPERTS)
    img2, _, hist2 = fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path / "new",
                                 resume=True)
    assert_same_modules(img, img2)
    assert_same_history(hist, hist2)
    assert read_checkpoint(tmp_path / "new")["epoch"] == EXPERTS["epochs"]
    with pytest.warns(UserWarning, match="holds a checkpoint"):
        fit_experts(**data, **{**EXPERTS, "epochs": 1}, checkpoint_dir=tmp_path / "new")


# --- fit_contrastive ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_contrastive_frozen_resume_equals_uninterrupted(tmp_path, schedule):
    f, e, p, _ = contrastive_data()
    kw = {**SMALL, "epochs": 12, "batch_size": 16, "lr": 1e-2, "patience": 2,
          "schedule": schedule, "val_features": f[32:], "val_expr": e[32:], "val_pos": p[32:]}
    ref = fit_contrastive(f[:32], e[:32], p[:32], **kw)
    with interrupt_after(3):
        fit_contrastive(f[:32], e[:32], p[:32], **kw, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert read_checkpoint(tmp_path)["epoch"] == 2
    got = fit_contrastive(f[:32], e[:32], p[:32], **kw, checkpoint_dir=tmp_path,
                          checkpoint_every=2, resume=True)
    assert_same_modules(ref.image_head, got.image_head)
    assert_same_modules(ref.spot_encoder, got.spot_encoder)
    assert_same_history(ref.history, got.history)
    assert ref.history["stopped_early"] and ref.history["n_epochs"] > 3


def test_contrastive_without_validation_resumes(tmp_path):
    f, e, p, _ = contrastive_data(seed=1)
    kw = {**SMALL, "epochs": 4, "batch_size": 16}
    ref = fit_contrastive(f, e, p, **kw)
    with interrupt_after(1):
        fit_contrastive(f, e, p, **kw, checkpoint_dir=tmp_path)
    got = fit_contrastive(f, e, p, **kw, checkpoint_dir=tmp_path, resume=True)
    assert_same_modules(ref.spot_encoder, got.spot_encoder)
    assert_same_history(ref.history, got.history)


@pytest.mark.parametrize(("finetune", "num_workers"), [("all", 0), ("last", 1)])
def test_contrastive_trainable_encoder_resume(tmp_path, finetune, num_workers):
    _, e, p, z = contrastive_data()

    def run(**ck):
        torch.manual_seed(0)
        net = TinyNet()  # a fresh encoder, as a restarted process would build
        return fit_contrastive(None, e[:32], p[:32], images=Patches(z[:32]), image_encoder=net,
                               finetune=finetune, val_expr=e[32:], val_pos=p[32:],
                               val_images=Patches(z[32:], seed=1), epochs=4, batch_size=16,
                               lr=3e-3, patience=None, num_workers=num_workers, **SMALL, **ck)

    ref = run()
    with interrupt_after(2):
        run(checkpoint_dir=tmp_path)
    names = read_checkpoint(tmp_path)["tensors"]
    assert "part.encoder.fc.weight" in names and "part.encoder.bn.running_mean" in names
    assert ("part.encoder.conv.weight" in names) == (finetune == "all")  # frozen: not saved
    got = run(checkpoint_dir=tmp_path, resume=True)
    assert_same_modules(ref.image_encoder, got.image_encoder)
    assert_same_modules(ref.image_head, got.image_head)
    assert_same_modules(ref.spot_encoder, got.spot_encoder)
    assert_same_history(ref.history, got.history)


def test_contrastive_refuses_other_frozen_encoder_weights(tmp_path):
    _, e, p, z = contrastive_data()
    kw = {"images": Patches(z), "finetune": "last", "epochs": 2, "batch_size": 16, **SMALL}
    torch.manual_seed(0)
    with interrupt_after(1):
        fit_contrastive(None, e, p, image_encoder=TinyNet(), checkpoint_dir=tmp_path, **kw)
    torch.manual_seed(1)  # another initialisation of the frozen conv
    with pytest.raises(ValueError, match="image_encoder.*frozen_digest"):
        fit_contrastive(None, e, p, image_encoder=TinyNet(), checkpoint_dir=tmp_path,
                        resume=True, **kw)


# --- argument checks ---------------------------------------------------------------------------
def test_resume_with_other_arguments_or_data_is_refused(tmp_path):
    data = expert_data(5)
    with interrupt_after(2):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`lr`=0\.001 \(checkpoint: 0\.01\)"):
        fit_experts(**data, **{**EXPERTS, "lr": 1e-3}, checkpoint_dir=tmp_path, resume=True)
    wider = {**data, "features": np.hstack([data["features"], data["features"][:, :1]]),
             "val_features": np.hstack([data["val_features"], data["val_features"][:, :1]])}
    with pytest.raises(ValueError, match=r"`features` has shape \(60, 9\) \(checkpoint: \(60, 8\)\)"):
        fit_experts(**wider, **EXPERTS, checkpoint_dir=tmp_path, resume=True)
    other = {**data, "genes": data["genes"] + 1}
    with pytest.raises(ValueError, match="`genes` holds other values"):
        fit_experts(**other, **EXPERTS, checkpoint_dir=tmp_path, resume=True)
    f, e, p, _ = contrastive_data()
    with pytest.raises(CheckpointError, match="fit_experts checkpoint, not a fit_contrastive"):
        fit_contrastive(f, e, p, epochs=2, **SMALL, checkpoint_dir=tmp_path, resume=True)
    # the refused attempts left the checkpoint as it was
    assert read_checkpoint(tmp_path)["epoch"] == 2


def test_checkpoint_arguments_are_checked(tmp_path):
    data = expert_data(6)
    with pytest.raises(ValueError, match="`resume=True`.*`checkpoint_dir`"):
        fit_experts(**data, **EXPERTS, resume=True)
    with pytest.raises(ValueError, match="`checkpoint_every` must be a positive integer"):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="`resume`"):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path, resume=3)
    with pytest.raises(FileNotFoundError, match="`resume`: no checkpoint folder"):
        fit_experts(**data, **EXPERTS, resume=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`checkpoint_dir` must be a folder"):
        fit_experts(**data, **EXPERTS, checkpoint_dir=tmp_path / "file")
    # a model folder is never overwritten by checkpoints
    model = tmp_path / "model"
    model.mkdir()
    (model / CONFIG_FILE).write_text(json.dumps({"class": "Spade"}))
    with pytest.raises(ValueError, match="holds a saved Spade model"):
        fit_experts(**data, **EXPERTS, checkpoint_dir=model)
    (model / CONFIG_FILE).write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="not a readable sq_spade config"):
        fit_experts(**data, **EXPERTS, checkpoint_dir=model)


# --- safety ------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_pickles_are_refused_and_never_run(tmp_path):
    data = expert_data(7)
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Payload(marker))
    kw = {**EXPERTS, "epochs": 2}
    # a pickle (as torch.save would write) passed as the checkpoint
    (tmp_path / "ckpt.pt").write_bytes(blob)
    with pytest.raises(CheckpointError, match="is a file.*pickle"):
        fit_experts(**data, **kw, resume=tmp_path / "ckpt.pt")
    # a pickle in place of config.json
    folder = tmp_path / "a"
    fit_experts(**data, **kw, checkpoint_dir=folder)
    (folder / CONFIG_FILE).write_bytes(blob)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        fit_experts(**data, **kw, checkpoint_dir=folder, resume=True)
    # a pickle in place of the tensors file, with the config's hash updated to match it
    folder = tmp_path / "b"
    fit_experts(**data, **kw, checkpoint_dir=folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / cfg["tensors_file"]).write_bytes(blob)
    import hashlib

    cfg["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fit_experts(**data, **kw, checkpoint_dir=folder, resume=True)
    with pytest.raises(CheckpointError):
        read_checkpoint(folder)
    assert not marker.exists()


KILL_POINTS = {
    # killed while writing the new tensors file (a partial temporary file is left)
    "tensors": """
        import safetensors.torch as st
        real = st.save_file
        calls = []
        def save_file(tensors, filename, metadata=None):
            calls.append(1)
            real(tensors, filename, metadata)
            if len(calls) == 2:
                size = os.path.getsize(filename)
                with open(filename, "rb+") as fh:
                    fh.truncate(size // 2)
                block()
        st.save_file = save_file
    """,
    # killed after the new tensors file is in place, before the config names it
    "rename": """
        import sq_spade._files as mf
        real = mf.atomic_path
        calls = []
        def atomic_path(path):
            calls.append(1)
            if len(calls) == 2:
                block()
            return real(path)
        mf.atomic_path = atomic_path
    """,
    # killed after writing the new config's temporary file, before renaming it
    "config": """
        import contextlib
        import sq_spade._files as mf
        real = mf.atomic_path
        calls = []
        @contextlib.contextmanager
        def atomic_path(path):
            calls.append(1)
            with real(path) as tmp:
                yield tmp
                if len(calls) == 2:
                    block()
        mf.atomic_path = atomic_path
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path, point):
    """A real process, killed while writing the checkpoint of epoch 4, then resumed."""
    data = expert_data(3)
    kw = {**EXPERTS, "patience": 2}
    folder = tmp_path / "ckpt"
    run_and_kill(tmp_path, data, kw, folder, 2, KILL_POINTS[point])
    assert len([p for p in folder.iterdir() if p.name != LOCK_FILE]) > 2  # the killed write left something behind
    info = read_checkpoint(folder)
    assert (info["epoch"], info["finished"]) == (2, False)  # the previous checkpoint, intact
    img, gen, hist = fit_experts(**data, **kw)
    img2, gen2, hist2 = fit_experts(**data, **kw, checkpoint_dir=folder, checkpoint_every=2,
                                    resume=True)
    assert_same_modules(img, img2)
    assert_same_modules(gen, gen2)
    assert_same_history(hist, hist2)
    # the next writes cleared what the killed one left
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    assert len(names) == 2 and CONFIG_FILE in names, names
