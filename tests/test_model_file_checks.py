"""Each integrity check of a model folder, tested in effect.

Every case breaks exactly one thing in an otherwise valid folder and expects the error of the
check that guards it, by its message: removing only that check makes its case fail (the folder
would load, or fail later with another message).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sq_spade._files import ModelFileError, load_model_files, save_model_files


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    save_model_files(path, cls="T", config={"n": 3}, tensors={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                     version="x")
    return path


def _edit(path: Path, **changes) -> None:
    doc = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            doc.pop(k)
        else:
            doc[k] = v
    (path / "config.json").write_text(json.dumps(doc))


_DROP = object()


def _tensors_name(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["tensors_file"]


def _resign(path: Path, edit=None, tensors=None) -> None:
    """Apply ``edit(doc)`` and/or new ``tensors``, then record the digests a save would (config and tensors hashes).

    So that only the check aimed at by a test can refuse the folder, not the config-integrity check.
    """
    from safetensors.torch import load_file, save_file

    from sq_spade._files import config_digest

    doc = json.loads((path / "config.json").read_text())
    if edit is not None:
        edit(doc)
    name = doc["tensors_file"]
    ten = load_file(str(path / name)) if tensors is None else tensors
    doc["config_sha256"] = config_digest(doc)
    save_file(ten, str(path / name), metadata={"config_sha256": doc["config_sha256"]})
    doc["tensors_sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(doc))


def test_the_valid_folder_loads(tmp_path):
    cfg, ten = load_model_files(_saved(tmp_path), cls="T")
    assert cfg == {"n": 3} and torch.equal(ten["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder"):
        load_model_files(tmp_path / "nowhere", cls="T")


def test_missing_config(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelFileError, match="lacks config.json"):
        load_model_files(path, cls="T")


def test_config_not_json(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model_files(path, cls="T")


def test_wrong_format_name(tmp_path):
    path = _saved(tmp_path)
    _edit(path, format="something-else")
    with pytest.raises(ModelFileError, match="not an sq_spade model config"):
        load_model_files(path, cls="T")


def test_format_version_not_an_integer(tmp_path):
    path = _saved(tmp_path)
    _edit(path, format_version="1")
    with pytest.raises(ModelFileError, match="must be an integer"):
        load_model_files(path, cls="T")


def test_newer_format_version(tmp_path):
    path = _saved(tmp_path)
    _edit(path, format_version=99)
    with pytest.raises(ModelFileError, match="upgrade sq_spade"):
        load_model_files(path, cls="T")


def test_unknown_older_format_version(tmp_path):
    path = _saved(tmp_path)
    _edit(path, format_version=0)
    with pytest.raises(ModelFileError, match="not a model-file format"):
        load_model_files(path, cls="T")


def test_other_model_class(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ModelFileError, match=r"holds a 'T' model, not a 'Other'"):
        load_model_files(path, cls="Other")


def test_unknown_top_level_key(tmp_path):
    path = _saved(tmp_path)
    _edit(path, extra=1)
    with pytest.raises(ModelFileError, match=r"Unknown keys.*extra"):
        load_model_files(path, cls="T")


@pytest.mark.parametrize("name", ["../outside.safetensors", "model-XYZ.safetensors", None])
def test_tensors_file_outside_the_pattern(tmp_path, name):
    path = _saved(tmp_path)
    if name is not None:
        # a real, matching file where the bad name points, so only the name check can refuse it
        (path / name).write_bytes((path / _tensors_name(path)).read_bytes())
    _edit(path, tensors_file=_DROP if name is None else name)
    with pytest.raises(ModelFileError, match="tensors_file"):
        load_model_files(path, cls="T")


def test_tensors_file_missing(tmp_path):
    path = _saved(tmp_path)
    name = _tensors_name(path)
    (path / name).unlink()
    with pytest.raises(ModelFileError, match=f"lacks {name}"):
        load_model_files(path, cls="T")


def test_config_not_an_object(tmp_path):
    path = _saved(tmp_path)
    _resign(path, lambda doc: doc.update(config=[1, 2]))
    with pytest.raises(ModelFileError, match="`config` must be a JSON object"):
        load_model_files(path, cls="T")


def test_tensors_changed_after_saving(tmp_path):
    from safetensors.torch import save_file

    path = _saved(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    # a valid safetensors file with other values (and the right config digest), under the recorded name:
    # only the tensors' sha256 tells
    save_file({"w": torch.zeros(2, 3)}, str(path / _tensors_name(path)),
              metadata={"config_sha256": doc["config_sha256"]})
    with pytest.raises(ModelFileError, match="does not match the sha256 its config records"):
        load_model_files(path, cls="T")


def test_missing_sha256(tmp_path):
    path = _saved(tmp_path)
    _edit(path, tensors_sha256=_DROP)
    with pytest.raises(ModelFileError, match="does not match the sha256 its config records"):
        load_model_files(path, cls="T")


def test_config_edited_after_saving(tmp_path):
    path = _saved(tmp_path)
    _edit(path, config={"n": 4})  # a valid config, another value: only the config digest tells
    with pytest.raises(ModelFileError, match="edited after saving"):
        load_model_files(path, cls="T")


def test_unreadable_tensors_with_a_matching_sha256(tmp_path):
    path = _saved(tmp_path)
    junk = b"not a safetensors file at all"
    (path / _tensors_name(path)).write_bytes(junk)
    _edit(path, tensors_sha256=hashlib.sha256(junk).hexdigest())
    with pytest.raises(ModelFileError, match="safetensors"):
        load_model_files(path, cls="T")


def _spade(tmp_path: Path) -> Path:
    import sq_spade as sqs
    from sq_spade.models._spade import build_module

    config = {"backbone": "fake", "feature_dim": 4, "panel": ["a", "b", "c"], "gene_input": "log1p_cp10k",
              "n_experts": 2, "n_fine": 3, "out_dim": 5, "dropout": 0.0, "routing_temperature": 0.1,
              "reference_side": "genes"}
    torch.manual_seed(0)
    model = sqs.models.Spade(build_module(config), config)
    return model.save(tmp_path / "spade")


def test_a_saved_spade_model_loads(tmp_path):
    import sq_spade as sqs

    assert sqs.models.Spade.load(_spade(tmp_path)).n_experts == 2


def test_config_that_does_not_fit_its_class(tmp_path):
    import sq_spade as sqs

    path = _spade(tmp_path)
    _resign(path, lambda doc: doc["config"].update(n_experts=-1))
    with pytest.raises(Exception, match="n_experts"):
        sqs.models.Spade.load(path)


def test_tensors_that_do_not_fit_the_config(tmp_path):
    from safetensors.torch import load_file

    import sq_spade as sqs

    path = _spade(tmp_path)
    tensors = load_file(str(path / _tensors_name(path)))
    tensors["stray"] = torch.zeros(1)
    _resign(path, tensors=tensors)
    with pytest.raises(ModelFileError, match="does not fit"):
        sqs.models.Spade.load(path)
