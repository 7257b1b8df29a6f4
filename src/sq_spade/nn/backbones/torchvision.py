"""``"densenet121"`` / ``"resnet50"``: torchvision architectures, weights from a local file or torchvision's download.

DenseNet-121 is mclSTExp's image encoder and ResNet-50 BLEEP's. Their ImageNet weights are not
on PyPI: a local state dict with torchvision's key names, the file in torch's hub cache, or
(with network) torchvision's download.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones._registry import WeightsArg, register_backbone, tag_weights
from sq_spade.nn.backbones._weights import WeightsUnavailableError, load_into, read_weights_file

__all__: list[str] = []


class _DenseNetFeatures(nn.Module):
    """torchvision DenseNet ``features`` + ReLU + global average pooling."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)


# torchvision's own fix for DenseNet checkpoints saved with "norm.1"-style names
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _densenet_key(k: str) -> str | None:
    if k.startswith("classifier."):
        return None
    m = _DENSENET_LEGACY.match(k)
    return m.group(1) + m.group(2) if m else k


def _download(url: str, dst: Path) -> None:
    """Download ``url`` to ``dst`` (checked against the hash prefix in torchvision names)."""
    m = re.search(r"-([0-9a-f]{8,})\.", Path(url).name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=m.group(1) if m else None,
                                   progress=False)


def _torchvision_weights_file(name: str, url: str) -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return path
    try:
        _download(url, path)
    except Exception as e:  # noqa: BLE001 - any network / hash failure means "not available"
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of {name!r} from {url} ({type(e).__name__}: "
            f"{e}). Without network, download the file elsewhere and pass it with "
            f"`get_backbone({name!r}, weights='/path/to/{Path(url).name}')` (a torch state dict "
            f"or .safetensors with torchvision key names), or place it at {path}."
        ) from e
    return path


def _build_densenet121() -> nn.Module:
    import torchvision

    return _DenseNetFeatures(torchvision.models.densenet121(weights=None).features)


def _build_resnet50() -> nn.Module:
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()  # pooled 2048-d features
    return model


def _densenet_layers(model: nn.Module, x: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Pooled outputs of DenseNet ``denseblock1..3`` (before their transition) and ``final``."""
    out: dict[str, Tensor] = {}
    for mod_name, mod in model.features.named_children():
        x = mod(x)
        if mod_name in names:
            out[mod_name] = x.mean(dim=(2, 3))
        if "final" not in names and len(out) == len(names):
            return out
    out["final"] = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
    return out


def _resnet_layers(model: nn.Module, x: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Pooled outputs of ResNet ``layer1..3`` and ``final`` (pooled ``layer4``)."""
    out: dict[str, Tensor] = {}
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for mod_name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, mod_name)(x)
        if mod_name in names:
            out[mod_name] = x.mean(dim=(2, 3))
        if "final" not in names and len(out) == len(names):
            return out
    out["final"] = x.mean(dim=(2, 3))
    return out


def _resnet_key(k: str) -> str | None:
    return None if k.startswith("fc.") else k


def _densenet121_factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
    import torchvision

    return _torchvision_load(_build_densenet121, "densenet121", weights, pretrained, _densenet_key,
                             torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url)


def _resnet50_factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
    import torchvision

    return _torchvision_load(_build_resnet50, "resnet50", weights, pretrained, _resnet_key,
                             torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url)


def _torchvision_load(build: Callable[[], nn.Module], name: str, weights: WeightsArg,
                      pretrained: bool, key_map: Callable[[str], str | None],
                      url: str) -> nn.Module:
    if weights is None and not pretrained:
        return tag_weights(build(), "random")
    path = Path(weights) if weights is not None else _torchvision_weights_file(name, url)
    model = build()
    load_into(model, read_weights_file(path), source=path.name, key_map=key_map, strict=True)
    return tag_weights(model, sha256_file(path))


register_backbone("densenet121", _densenet121_factory, dim=1024,
                  weights_source="local file (torchvision names); else torchvision "
                                 "IMAGENET1K_V1 download",
                  license="BSD-3-Clause (torchvision)",
                  layers={"denseblock1": 256, "denseblock2": 512, "denseblock3": 1024},
                  forward_layers=_densenet_layers)
register_backbone("resnet50", _resnet50_factory, dim=2048,
                  weights_source="local file (torchvision names); else torchvision "
                                 "IMAGENET1K_V2 download",
                  license="BSD-3-Clause (torchvision)",
                  layers={"layer1": 256, "layer2": 512, "layer3": 1024},
                  forward_layers=_resnet_layers)
