"""Model configurations: dataclasses that check themselves, read like dicts, round-trip through JSON."""

import json

import pytest

from sq_spade._files import ModelFileError
from sq_spade.models import BaselineConfig, MclSTExpConfig, SpadeConfig

SPADE = {"backbone": "dummy", "feature_dim": 8, "panel": ["a", "b"], "gene_input": "raw", "n_experts": 2, "n_fine": 4,
         "out_dim": 4, "dropout": 0.1, "routing_temperature": 0.1, "reference_side": "genes"}


def test_round_trip_and_mapping_view():
    cfg = SpadeConfig.from_json(SPADE)
    # keys not given are None, but for n_members: a folder saved before ensembles holds one member
    assert cfg.to_json() == {**{k: None for k in cfg}, "n_members": 1, **SPADE}
    assert SpadeConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    # dict-style use keeps working: item access, get, items, membership, assignment
    assert cfg["n_experts"] == 2 and cfg.get("selection") is None and "panel" in cfg and "nope" not in cfg
    assert dict(cfg.items())["backbone"] == "dummy"
    cfg["reference_side"] = "images"
    assert cfg.reference_side == "images"
    with pytest.raises(KeyError, match="no key 'bogus'"):
        cfg["bogus"] = 1
    with pytest.raises(ValueError, match="'reference_side' has an invalid value 'sideways'"):
        cfg["reference_side"] = "sideways"
    assert cfg.reference_side == "images"  # a refused value leaves the config as it was


@pytest.mark.parametrize(("change", "match"), [
    ({"n_experts": "three"}, "'n_experts' must be of type int, got str"),
    ({"n_experts": 0}, "'n_experts' has an invalid value 0"),
    ({"gene_input": "tpm"}, "'gene_input' has an invalid value 'tpm'"),
    ({"dropout": 1.0}, "'dropout' has an invalid value 1.0"),
    ({"panel": []}, "'panel' has an invalid value"),
    ({"panel": ["a", 3]}, "'panel' has an invalid value"),
    ({"backbone": None}, "'backbone' is required"),
    ({"evil_path": "../../etc/passwd"}, r"Unknown config keys: \['evil_path'\]"),
    ({"n_experts": True}, "'n_experts' must be of type int, got bool"),
])
def test_errors_name_the_key(change, match):
    with pytest.raises(ModelFileError, match=match):
        SpadeConfig.from_json({**SPADE, **change})
    # in memory the same checks raise a plain ValueError
    with pytest.raises(ValueError, match=match):
        SpadeConfig.from_mapping({**SPADE, **change})


def test_mclstexp_and_baseline_configs():
    cfg = MclSTExpConfig.from_json({"backbone": "dummy", "feature_dim": 8, "panel": ["a"], "gene_input": "log1p_cp10k",
                                    "context": "tile", "out_dim": 4, "dropout": 0.0, "spot_encoder": {"n_genes": 1},
                                    "finetune": "none", "position": None, "n_x": None})
    assert cfg.position is None and cfg["tile_size"] is None
    with pytest.raises(ModelFileError, match="'context' has an invalid value 'window'"):
        MclSTExpConfig.from_json({**cfg.to_json(), "context": "window"})
    with pytest.raises(ModelFileError, match="'n_x' has an invalid value 0"):
        MclSTExpConfig.from_json({**cfg.to_json(), "n_x": 0})
    with pytest.raises(ModelFileError, match="'regressor' is required"):
        BaselineConfig.from_json({"backbone": "dummy", "feature_dim": 8, "panel": ["a"]})
    # the keys are those of format 1's configs, so files written now stay readable by the first release
    assert set(BaselineConfig.from_json({"backbone": "x", "feature_dim": 1, "panel": ["a"], "regressor": {}})) == {
        "backbone", "weights_sha256", "feature_dim", "panel", "regressor", "train_sections", "validation_sections",
        "params"}
