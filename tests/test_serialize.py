import json
from dataclasses import dataclass

import numpy as np
import torch

from sq_spade._serialize import storable, to_jsonable


@dataclass
class Point:
    x: float
    y: np.int64


def test_to_jsonable_converts_numpy_torch_and_dataclasses():
    obj = {"a": np.arange(3), "b": (np.float32(0.5), np.bool_(True)), 3: Point(1.0, np.int64(2)),
           "t": torch.tensor([1.5, 2.0]), "nan": [np.nan, float("inf")], "s": "x", "n": None}
    out = to_jsonable(obj)
    assert out == {"a": [0, 1, 2], "b": [0.5, True], "3": {"x": 1.0, "y": 2}, "t": [1.5, 2.0],
                   "nan": [out["nan"][0], float("inf")], "s": "x", "n": None}
    assert np.isnan(out["nan"][0])
    assert type(out["b"][1]) is bool and type(out["3"]["y"]) is int
    strict = to_jsonable(obj, nonfinite="null")
    assert strict["nan"] == [None, None]
    json.dumps(strict, allow_nan=False)  # strict JSON


def test_storable_writes_what_h5ad_takes():
    out = storable({"sections": ["a", "b"], "loss": [1.0, None], "seed": None, "nested": [{"k": 1}, None], "e": []})
    assert set(out) == {"sections", "loss", "nested", "e"}
    assert out["sections"].dtype.kind == "U" and np.isnan(out["loss"][1]) and out["nested"] == {"0": {"k": 1}}
    assert out["e"].shape == (0,)
