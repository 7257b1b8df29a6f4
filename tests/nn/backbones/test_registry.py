"""sq_spade.nn.backbones._registry: specs, registration, lookup and the (B, 3, H, W) -> (B, D) wrapper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones import (
    BACKBONES,
    Backbone,
    BackboneSpec,
    get_backbone,
    list_backbones,
    register_backbone,
)

BUILTIN_DIMS = {"dummy": 64, "efficientnet_lite0": 1280, "efficientnet_lite2": 1280,
                "densenet121": 1024, "resnet50": 2048, "uni": 1024, "virchow2": 2560,
                "conch": 512}



def test_list_contains_builtins_with_dims():
    df = list_backbones()
    assert list(df.columns) == ["name", "dim", "input_size", "weights_source", "license", "layers", "default_layers"]
    assert dict(zip(df["name"], df["default_layers"], strict=True))["efficientnet_lite0"] == "blocks.3, blocks.4, blocks.5"
    dims = dict(zip(df["name"], df["dim"], strict=True))
    for name, dim in BUILTIN_DIMS.items():
        assert dims[name] == dim
    sizes = dict(zip(df["name"], df["input_size"], strict=True))
    assert sizes["efficientnet_lite2"] == 260 and sizes["conch"] == 448
    assert df["license"].str.len().min() > 0 and df["weights_source"].str.len().min() > 0


def test_register_custom_and_normalisation(registry, tmp_path):
    seen = {}

    def factory(weights=None):
        seen["weights"] = weights
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    spec = register_backbone("meanrgb", factory, dim=3, input_size=16, mean=(0.5, 0.5, 0.5),
                             std=(0.25, 0.25, 0.25), license="MIT")
    assert isinstance(spec, BackboneSpec) and BACKBONES["meanrgb"] is spec
    assert "meanrgb" in set(list_backbones()["name"])
    bb = get_backbone("meanrgb")
    assert isinstance(bb, Backbone) and not bb.training
    assert (bb.name, bb.dim, bb.input_size, bb.weights_sha256) == ("meanrgb", 3, 16, "unknown")
    # normalisation happens inside forward: (1 - 0.5) / 0.25 = 2, (0.5 - 0.5) / 0.25 = 0
    x = torch.ones(2, 3, 16, 16)
    x[1] = 0.5
    torch.testing.assert_close(bb(x), torch.tensor([[2.0] * 3, [0.0] * 3]))
    # a weights file is handed to the factory and hashed
    w = tmp_path / "w.bin"
    w.write_bytes(b"abc")
    bb2 = get_backbone("meanrgb", weights=w)
    assert seen["weights"] == w and bb2.weights_sha256 == sha256_file(w)


def test_factory_receives_pretrained_when_it_accepts_it(registry):
    calls = []

    def factory(weights=None, pretrained=True):
        calls.append(pretrained)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    register_backbone("flagged", factory, dim=3)
    get_backbone("flagged", pretrained=False)
    get_backbone("flagged")
    assert calls == [False, True]


def test_duplicate_name_refused_unless_overwrite(registry):
    def f(weights=None):
        return nn.Flatten()

    register_backbone("dup", f, dim=3)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("dup", f, dim=4)
    assert BACKBONES["dup"].dim == 3
    register_backbone("dup", f, dim=4, overwrite=True)
    assert BACKBONES["dup"].dim == 4
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("efficientnet_lite0", f, dim=3)


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="unknown backbone 'nope'") as e:
        get_backbone("nope")
    for name in BUILTIN_DIMS:
        assert name in str(e.value)


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"dim": 0}, "dim"), ({"dim": 3, "input_size": -1}, "input_size"),
    ({"dim": 3, "std": (1, 0, 1)}, "std"), ({"dim": 3, "mean": (0.5, 0.5)}, "mean"),
    ({"dim": 2.5}, "dim"),
])
def test_bad_specs_refused(registry, kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        register_backbone("bad", lambda w: nn.Flatten(), **kwargs)
    assert "bad" not in BACKBONES


def test_wrong_output_dim_and_input_refused(registry):
    register_backbone("liar", lambda w: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                      dim=5)
    bb = get_backbone("liar")
    with pytest.raises(RuntimeError, match=r"expected \(1, 5\)"):
        bb(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        bb(torch.rand(1, 8, 8, 3))
    with pytest.raises(TypeError, match="divide uint8 by 255"):
        bb(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError):
        get_backbone("liar", weights="/no/such/file.pt")



def test_builtins_registered_whichever_module_is_imported_first():
    """Importing a family or the registry module directly still fills the whole registry, in order."""
    code = ("from sq_spade.nn.backbones.pathology import ConchVisionTower\n"
            "from sq_spade.nn.backbones._registry import BACKBONES\n"
            "print(','.join(BACKBONES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == list(BACKBONES)
    assert list(BACKBONES)[:len(BUILTIN_DIMS)] == list(BUILTIN_DIMS)
