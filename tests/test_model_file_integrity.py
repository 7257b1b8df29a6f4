"""Guarantees of the model-file container (docs/model_files.md), one class of attack or fault each.

Symbolic links, concurrent writers, a model saved over a checkpoint, an edited config (its
sha256 is recorded in the config and in the tensors file), sizes that do not fit the tensors
(checked from the safetensors header before any module is built) and non-finite parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sq_spade._files import (
    CONFIG_FILE,
    LOCK_FILE,
    ModelFileError,
    config_digest,
    load_model_files,
    save_model_files,
)
from sq_spade.models import MclSTExp, Spade
from tests.conftest import write_signed
from tests.models.test_mclstexp_model import _model as mclstexp_model
from tests.models.test_spade_model import _model as spade_model


def _tensors_file(folder):
    return folder / json.loads((folder / CONFIG_FILE).read_text())["tensors_file"]


# --- symbolic links ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["config", "tensors"])
def test_a_symlinked_file_is_refused_even_when_it_is_valid(tmp_path, which):
    """A link is refused whatever it points to: here to a valid copy outside the folder."""
    save_model_files(tmp_path / "m", cls="T", config={"n": 1}, tensors={"w": np.ones(3, np.float32)}, version="x")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "m" / CONFIG_FILE if which == "config" else _tensors_file(tmp_path / "m")
    moved = outside / target.name
    os.replace(target, moved)
    target.symlink_to(moved)
    with pytest.raises(ModelFileError, match="symbolic link"):
        load_model_files(tmp_path / "m", cls="T")


def test_a_symlinked_lock_file_is_refused_on_save(tmp_path):
    save_model_files(tmp_path / "m", cls="T", config={"n": 1}, tensors={"w": np.ones(3, np.float32)}, version="x")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "m" / LOCK_FILE).unlink()
    (tmp_path / "m" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ModelFileError, match="symbolic link"):
        save_model_files(tmp_path / "m", cls="T", config={"n": 2}, tensors={"w": np.ones(3, np.float32)}, version="x")
    assert victim.read_text() == "keep"
    with pytest.raises(ModelFileError, match="symbolic link"):  # readers refuse it too
        load_model_files(tmp_path / "m", cls="T")
    (tmp_path / "m" / LOCK_FILE).unlink()
    assert load_model_files(tmp_path / "m", cls="T")[0] == {"n": 1}  # the folder is untouched


def test_model_load_refuses_a_symlinked_tensors_file(tmp_path):
    m = spade_model()
    m.save(tmp_path / "m")
    ten = _tensors_file(tmp_path / "m")
    os.replace(ten, tmp_path / ten.name)
    ten.symlink_to(tmp_path / ten.name)
    with pytest.raises(ModelFileError, match="symbolic link"):
        Spade.load(tmp_path / "m")


# --- concurrent writers -------------------------------------------------------------------------
WRITER = r"""
import sys, numpy as np
from sq_spade._files import save_model_files
path, base = sys.argv[1], int(sys.argv[2])
for i in range(12):
    save_model_files(path, cls="T", config={"n": base + i}, tensors={"w": np.full((64, 256), base + i, np.float32)}, version="x")
"""


@pytest.mark.slow
def test_concurrent_writers_and_readers_never_break_the_folder(tmp_path):
    """Two processes and two threads save into one folder while this thread keeps loading it."""
    path = tmp_path / "m"
    save_model_files(path, cls="T", config={"n": 0}, tensors={"w": np.zeros((64, 256), np.float32)}, version="x")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(base)], env=env) for base in (1000, 2000)]
    errors = []

    def thread_writer(base):
        try:
            for i in range(12):
                save_model_files(path, cls="T", config={"n": base + i},
                                 tensors={"w": np.full((64, 256), base + i, np.float32)}, version="x")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_writer, args=(b,)) for b in (3000, 4000)]
    for t in threads:
        t.start()
    loads = 0
    while any(p.poll() is None for p in procs) or any(t.is_alive() for t in threads):
        cfg, ten = load_model_files(path, cls="T")  # never a config without its tensors
        assert np.all(ten["w"].numpy() == cfg["n"])
        loads += 1
    for t in threads:
        t.join()
    assert [p.wait() for p in procs] == [0, 0] and not errors
    cfg, ten = load_model_files(path, cls="T")
    assert np.all(ten["w"].numpy() == cfg["n"]) and loads > 0
    left = sorted(p.name for p in path.iterdir())
    assert len(left) == 3 and left[:2] == [LOCK_FILE, CONFIG_FILE], left  # one tensors file, no temporaries


def test_a_reader_waits_for_a_writer_holding_the_lock(tmp_path):
    from sq_spade._files import folder_lock

    save_model_files(tmp_path / "m", cls="T", config={"n": 1}, tensors={"w": np.ones(3, np.float32)}, version="x")
    done = []
    with folder_lock(tmp_path / "m", exclusive=True):
        t = threading.Thread(target=lambda: done.append(load_model_files(tmp_path / "m", cls="T")))
        t.start()
        time.sleep(0.3)
        assert not done  # blocked while a writer holds the folder
    t.join(10)
    assert done and done[0][0] == {"n": 1}


# --- a model saved over a checkpoint (and foreign folders) ---------------------------------------
def test_model_save_into_a_checkpoint_folder_is_refused(tmp_path):
    from sq_spade.train import fit_experts, read_checkpoint

    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(16, 8)).astype("f4"), rng.normal(size=(16, 5)).astype("f4")
    folder = tmp_path / "ckpt"
    fit_experts(f, g, np.zeros(16, int), n_experts=1, epochs=1, batch_size=8, out_dim=4, device="cpu",
                checkpoint_dir=folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="training checkpoint"):
        spade_model().save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert read_checkpoint(folder)["epoch"] == 1


def test_save_refuses_a_folder_with_a_foreign_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / CONFIG_FILE).write_text('{"learning_rate": 0.1}')
    with pytest.raises(ValueError, match="not an sq_spade model config"):
        spade_model().save(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_FILE).read_text() == '{"learning_rate": 0.1}'


# --- config integrity ----------------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["config value", "class field", "version string", "downgrade to format 1"])
def test_an_edited_config_is_refused(tmp_path, edit):
    m = spade_model()
    m.save(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 2 and doc["config_sha256"] == config_digest(doc)
    if edit == "config value":
        doc["config"]["routing_temperature"] = 0.5  # a valid value: only the digest notices
    elif edit == "class field":
        doc["config"]["panel"] = doc["config"]["panel"][::-1]
    elif edit == "version string":
        doc["sq_spade_version"] = "0.0.1"
    else:  # an edit that also claims the older format, which had no digest
        doc["config"]["routing_temperature"] = 0.5
        doc["format_version"] = 1
        del doc["config_sha256"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="config_sha256"):
        Spade.load(tmp_path / "m")


def test_the_digest_is_recorded_in_the_tensors_file(tmp_path):
    save_model_files(tmp_path / "m", cls="T", config={"n": 1}, tensors={"w": np.ones(3, np.float32)}, version="x")
    from safetensors import safe_open

    doc = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    with safe_open(str(_tensors_file(tmp_path / "m")), "pt") as fh:
        assert fh.metadata() == {"config_sha256": doc["config_sha256"]}


# --- sizes checked against the tensors before anything is built -----------------------------------
@pytest.mark.parametrize(("key", "value"), [("out_dim", 10**7), ("n_experts", 10**7), ("feature_dim", 10**7),
                                            ("out_dim", 3), ("n_experts", 2)])
def test_spade_sizes_that_do_not_fit_the_tensors_are_refused_before_building(tmp_path, monkeypatch, key, value):
    spade_model().save(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(path.read_text())
    doc["config"][key] = value
    write_signed(path, doc)  # a crafted file: its digests recomputed

    def built(*a, **k):
        raise AssertionError("modules were built from an unchecked config")

    monkeypatch.setattr(Spade, "_from_files", classmethod(built))
    with pytest.raises(ModelFileError, match="does not fit the Spade config"):
        Spade.load(tmp_path / "m")


@pytest.mark.parametrize("key", ["out_dim", "n_x", "n_y", "feature_dim"])
def test_mclstexp_sizes_that_do_not_fit_the_tensors_are_refused_before_building(tmp_path, monkeypatch, key):
    mclstexp_model().save(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(path.read_text())
    doc["config"][key] = 10**7
    if key in doc["config"]["spot_encoder"]:
        doc["config"]["spot_encoder"][key] = 10**7  # consistent, so only the tensors can tell
    write_signed(path, doc)
    monkeypatch.setattr(MclSTExp, "_from_files", classmethod(lambda *a: pytest.fail("built")))
    with pytest.raises(ModelFileError, match="does not fit the MclSTExp config"):
        MclSTExp.load(tmp_path / "m")


def test_a_tensor_of_another_shape_is_a_model_file_error(tmp_path):
    spade_model().save(tmp_path / "m")
    ten = _tensors_file(tmp_path / "m")
    tensors = load_file(str(ten))
    key = next(k for k in tensors if k.startswith("gene_heads"))
    tensors[key] = torch.zeros(tuple(s + 1 for s in tensors[key].shape))
    doc = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    save_file(tensors, str(ten))
    write_signed(tmp_path / "m" / CONFIG_FILE, doc)
    with pytest.raises(ModelFileError, match=key.replace(".", r"\.")):
        Spade.load(tmp_path / "m")


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_config_floats_are_refused(tmp_path, value):
    spade_model().save(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(path.read_text())
    doc["config"]["routing_temperature"] = float(value.replace("Infinity", "inf"))
    write_signed(path, doc)
    with pytest.raises(ModelFileError, match="routing_temperature.*finite"):
        Spade.load(tmp_path / "m")


# --- finite parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_are_refused_on_save(tmp_path, bad):
    m = spade_model()
    m.save(tmp_path / "m")
    before = (tmp_path / "m" / CONFIG_FILE).read_bytes()
    with torch.no_grad():
        next(m.module.parameters()).view(-1)[0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.save(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_FILE).read_bytes() == before  # the saved model is kept
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing half-written


def test_non_finite_parameters_are_refused_on_load(tmp_path):
    spade_model().save(tmp_path / "m")
    ten = _tensors_file(tmp_path / "m")
    tensors = load_file(str(ten))
    key = next(k for k in tensors if k.startswith("image_heads"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(ten))
    write_signed(tmp_path / "m" / CONFIG_FILE, json.loads((tmp_path / "m" / CONFIG_FILE).read_text()))
    with pytest.raises(ModelFileError, match=f"{key!r} holds NaN"):
        Spade.load(tmp_path / "m")
