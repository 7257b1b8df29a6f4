"""Every registered backbone keeps the contract, as timm's ``tests/test_models.py`` does for its models.

Parametrised over the registry, so a new backbone is tested by registering it: built without
weights (``pretrained=False``), its full-size architecture runs on the meta device (no memory,
no compute, so UNI's and Virchow2's ViTs cost nothing), and every backbone small enough for CI
also runs a real forward on a tiny input on the CPU. ``docs/backbones.md`` must list it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sq_spade.nn.backbones import (
    BACKBONES,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    get_backbone,
    get_backbone_spec,
)

ROOT = Path(__file__).resolve().parents[3]
NAMES = list(BACKBONES)  # the built-ins, at collection time
#: Above this many parameters a random-weight CPU build is left out (UNI 303M, Virchow2 631M:
#: seconds and gigabytes each); their architecture is still run at full size on the meta device.
MAX_CPU_PARAMS = 100_000_000
#: The normalisation column of docs/backbones.md, by the start of its text.
NORMALISATIONS = {"ImageNet": (IMAGENET_MEAN, IMAGENET_STD), "0.5 / 0.5": (HALF, HALF),
                  "OpenAI CLIP": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}


def docs_table() -> dict[str, dict[str, str]]:
    """The "Built-in backbones" table of docs/backbones.md: name -> D, input and normalisation."""
    rows = {}
    for line in (ROOT / "docs" / "backbones.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[m.group(1)] = {"dim": cells[2], "input_size": cells[3], "normalisation": cells[4]}
    return rows


def meta_build(name: str) -> tuple[Backbone, int]:
    """The backbone built without weights on the meta device, and its number of parameters."""
    with torch.device("meta"):
        bb = get_backbone(name, pretrained=False)
    return bb, sum(p.numel() for p in bb.parameters())


def test_docs_table_lists_every_backbone_in_order():
    table = docs_table()
    assert list(table) == NAMES, "docs/backbones.md's table and the registry list other backbones"
    for name, row in table.items():
        spec = get_backbone_spec(name)
        assert (int(row["dim"]), int(row["input_size"])) == (spec.dim, spec.input_size), name
        norm = [v for k, v in NORMALISATIONS.items() if row["normalisation"].startswith(k)]
        assert norm == [(spec.mean, spec.std)], f"{name}: {row['normalisation']!r} in the docs"


@pytest.mark.parametrize("name", NAMES)
def test_full_size_architecture_on_meta_device(name):
    spec = get_backbone_spec(name)
    bb, _ = meta_build(name)
    assert isinstance(bb, Backbone) and bb.spec is spec and not bb.training
    assert (bb.name, bb.dim, bb.input_size) == (name, spec.dim, spec.input_size)
    assert bb.weights_sha256 in ("random", "none")  # nothing was loaded
    assert tuple(bb.mean.shape) == tuple(bb.std.shape) == (1, 3, 1, 1)
    with torch.device("meta"):
        out = bb(torch.zeros(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, spec.dim)


class _Recorder(nn.Module):
    """Stands in for a model too big to build for real: records its input, returns zeros."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.seen = dim, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return torch.zeros(x.shape[0], self.dim)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_normalises_inside(name):
    """(B, 3, H, W) in [0, 1] -> (B, D), the model seeing (x - mean) / std of the spec."""
    spec = get_backbone_spec(name)
    size = min(spec.input_size, 64)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected_in = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    _, n_params = meta_build(name)
    if n_params > MAX_CPU_PARAMS:
        # the same wrapper and spec around a recorder: what this backbone's model would receive
        bb = Backbone(spec, _Recorder(spec.dim), weights_sha256="random").eval()
        out = bb(x)
        (seen,) = bb.model.seen
    else:
        bb = get_backbone(name, pretrained=False)
        assert bb.weights_sha256 in ("random", "none")
        seen = []
        bb.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.inference_mode():
            out = bb(x)
        (seen,) = seen
        assert torch.isfinite(out).all()
        assert (out[0] - out[1]).abs().max() > 0  # two images, two features
    assert tuple(out.shape) == (2, spec.dim) and out.dtype == torch.float32
    torch.testing.assert_close(seen, expected_in)


@pytest.mark.parametrize("name", NAMES)
def test_offers_layers_final_last_and_defaults_among_them(name):
    """Every backbone says which layers it offers; "final" is always one, last, and is the (B, dim) output."""
    spec = get_backbone_spec(name)
    assert isinstance(spec.layers, dict) and list(spec.layers)[-1] == "final" and spec.layers["final"] == spec.dim
    assert all(isinstance(d, int) and d > 0 for d in spec.layers.values())
    assert spec.default_layers and set(spec.default_layers) <= set(spec.layers)
    assert spec.layer_dim(spec.default_layers) == sum(spec.layers[n] for n in spec.default_layers)
    with pytest.raises(ValueError, match="layers backbone"):
        spec.check_layers(["no_such_layer"])


@pytest.mark.parametrize("name", NAMES)
def test_every_offered_layer_has_its_dimension(name):
    """Pooled outputs of all offered layers at once: each block has its declared width, final equals forward."""
    spec = get_backbone_spec(name)
    if len(spec.layers) == 1:  # final only: forward_layers is forward
        bb = Backbone(spec, _Recorder(spec.dim), weights_sha256="random").eval()
        assert tuple(bb.forward_layers(torch.rand(1, 3, 8, 8), "final").shape) == (1, spec.dim)
        return
    _, n_params = meta_build(name)
    assert n_params <= MAX_CPU_PARAMS  # the intermediate layers of a giant would need a test of their own
    bb = get_backbone(name, pretrained=False)
    size = min(spec.input_size, 64)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        every = bb.forward_layers(x, list(spec.layers))
        final = bb(x)
        pieces = [bb.forward_layers(x, n) for n in spec.layers]
    assert tuple(every.shape) == (2, sum(spec.layers.values()))
    assert [p.shape[1] for p in pieces] == list(spec.layers.values())
    torch.testing.assert_close(torch.cat(pieces, 1), every)  # each layer alone = its slice of all
    torch.testing.assert_close(every[:, -spec.dim:], final)
    # asked out of order: the backbone's order
    torch.testing.assert_close(bb.forward_layers(x, list(spec.layers)[::-1]), every)
