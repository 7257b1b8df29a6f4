"""Training whose loss stops being finite stops with TrainingDivergedError; checkpoints are checked whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sq_spade._files import CONFIG_FILE
from sq_spade.train import (
    CheckpointError,
    TrainingDivergedError,
    fit_contrastive,
    fit_experts,
    read_checkpoint,
)
from tests.conftest import write_signed
from tests.train.test_checkpoint import EXPERTS, contrastive_data, expert_data

SMALL = {"out_dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "batch_size": 16, "device": "cpu"}


@pytest.mark.parametrize("how", ["huge lr", "inf features"])
def test_fit_experts_stops_when_the_loss_is_not_finite(tmp_path, how):
    data = expert_data()
    kw = {**EXPERTS, "epochs": 3}
    if how == "huge lr":
        kw["lr"] = 1e30
    else:
        data["features"] = data["features"].copy()
        data["features"][0, 0] = 3e38  # finite, but its square is not
    with pytest.raises(TrainingDivergedError, match=r"NaN or infinite in epoch \d.*`lr`"):
        fit_experts(**data, **kw, checkpoint_dir=tmp_path / "ckpt")
    if (tmp_path / "ckpt" / CONFIG_FILE).exists():  # only epochs with a finite loss were checkpointed
        info = read_checkpoint(tmp_path / "ckpt")
        assert np.isfinite(info["history"]["train_loss"]).all()


def test_fit_contrastive_stops_when_the_loss_is_not_finite():
    f, e, p, _ = contrastive_data()
    with pytest.raises(TrainingDivergedError, match="NaN or infinite"):
        fit_contrastive(f, e, p, **SMALL, epochs=3, lr=1e30)


def test_a_finite_run_is_untouched():
    img, gen, hist = fit_experts(**expert_data(), **{**EXPERTS, "epochs": 2})
    assert np.isfinite(hist["train_loss"]).all()


# --- checkpoints: loop state and epochs -------------------------------------------------------------
def _checkpoint(tmp_path, epochs=2):
    folder = tmp_path / "ckpt"
    fit_experts(**expert_data(), **{**EXPERTS, "epochs": epochs}, checkpoint_dir=folder)
    return folder, json.loads((folder / CONFIG_FILE).read_text())


EDITS = {
    "epoch beyond epochs": lambda c: c.update(epoch=c["epoch"] + 5),
    "epoch not in history": lambda c: c.update(epoch=1),
    "history missing": lambda c: c["loop"].pop("history"),
    "stopper missing": lambda c: c["loop"].pop("stopper"),
    "history column cut": lambda c: c["loop"]["history"]["train_loss"]["values"].pop(),
    "values not an object": lambda c: c["loop"].update(values=[1, 2]),
    "bad array dtype": lambda c: c["loop"]["history"]["lr"].update({"__array__": "|O"}),
    "loop not an object": lambda c: c.update(loop="x"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_damaged_loop_state_is_a_checkpoint_error(tmp_path, edit):
    folder, doc = _checkpoint(tmp_path)
    EDITS[edit](doc["config"])
    write_signed(folder / CONFIG_FILE, doc)  # crafted: the digests recomputed
    with pytest.raises(CheckpointError, match="`path`"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="`resume`"):
        fit_experts(**expert_data(), **{**EXPERTS, "epochs": 2}, checkpoint_dir=folder, resume=True)
