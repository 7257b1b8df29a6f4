"""sq_spade.nn.backbones.torchvision: DenseNet-121 / ResNet-50 from local files (no network here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones import IMAGENET_MEAN, IMAGENET_STD, WeightsUnavailableError, get_backbone
from sq_spade.nn.backbones import torchvision as tvb
from tests.nn.backbones.conftest import image_like


def test_densenet121_from_local_file_matches_torchvision(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.densenet121(weights=None).eval()
    path = tmp_path / "densenet.pth"
    torch.save(tv.state_dict(), path)  # with the classifier, as torchvision ships it
    bb = get_backbone("densenet121", weights=path)
    assert bb.weights_sha256 == sha256_file(path) and bb.dim == 1024
    x = image_like(1, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = F.adaptive_avg_pool2d(F.relu(tv.features((x - mean) / std)), 1).flatten(1)
        torch.testing.assert_close(bb(x), expected)
    # a checkpoint in torch's cache with legacy "norm.1" names is used without downloading
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
              for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    cache = tmp_path / "hub"
    (cache / "checkpoints").mkdir(parents=True)
    torch.save(legacy, cache / "checkpoints" / "densenet121-a639ec97.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    monkeypatch.setattr(tvb, "_download", lambda url, dst: pytest.fail("no download expected"))
    bb2 = get_backbone("densenet121")
    with torch.inference_mode():
        torch.testing.assert_close(bb2(x), expected)


def test_resnet50_from_safetensors_matches_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(2)
    tv = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    bb = get_backbone("resnet50", weights=path)
    tv.fc = nn.Identity()
    x = image_like(1, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = bb(x)
        torch.testing.assert_close(out, tv((x - mean) / std))
    assert out.shape == (1, 2048)


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_torchvision_download_failure_says_pass_weights(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvb, "_download", offline)
    with pytest.raises(WeightsUnavailableError, match=r"weights=") as e:
        get_backbone(name)
    assert "network unreachable" in str(e.value)
    assert get_backbone(name, pretrained=False).weights_sha256 == "random"

