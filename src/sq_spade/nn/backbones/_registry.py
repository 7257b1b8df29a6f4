"""The backbone contract and registry: :class:`BackboneSpec`, :class:`Backbone` and the lookup functions.

A family module (``dummy``, ``efficientnet_lite``, ``torchvision``, ``pathology``) defines
factories and calls :func:`register_backbone` when it is imported; the package ``__init__``
imports every family, so the registry is full before any lookup.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sq_spade._utils import sha256_file

if TYPE_CHECKING:
    import pandas as pd

#: Default normalisation of a :class:`BackboneSpec` (ImageNet mean / std of [0, 1] RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WeightsArg = str | os.PathLike | None

#: Name of the pooled output of the whole backbone (its ``(B, dim)`` features) in ``layers``.
FINAL_LAYER = "final"

#: ``forward_layers(model, x, names) -> {name: (B, C) tensor}``: pooled outputs of the named layers
#: of ``model`` (the factory's module) for normalised images ``x``.
LayersFn = Callable[[nn.Module, Tensor, tuple[str, ...]], Mapping[str, Tensor]]


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
    layers
        The layers whose globally average-pooled outputs the backbone offers as features, name
        -> dimension, shallow to deep; ``"final"`` (the ``(B, dim)`` output) is always offered
        and always last. Names are those of the modules in the factory's model.
    default_layers
        The layers :func:`sq_spade.pp.compute_features` uses when it is not told (``("final",)``
        unless measured otherwise).
    forward_layers
        ``forward_layers(model, x, names) -> {name: (B, C)}``: the pooled outputs of the named
        layers for normalised images ``x``; required when ``layers`` offers more than
        ``"final"``.

    Examples
    --------
    >>> spec = get_backbone_spec("efficientnet_lite0")
    >>> spec.dim, spec.input_size
    (1280, 224)
    >>> spec.default_layers, spec.layer_dim(spec.default_layers)
    (('blocks.3', 'blocks.4', 'blocks.5'), 384)
    """

    name: str
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = "user"
    license: str = "unknown"
    factory: Callable[..., nn.Module]
    layers: Mapping[str, int] | None = field(default=None, compare=False)
    default_layers: tuple[str, ...] = (FINAL_LAYER,)
    forward_layers: LayersFn | None = field(default=None, compare=False)

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
        layers = dict(self.layers or {})
        if not isinstance(self.layers or {}, Mapping) or not all(isinstance(k, str) and k for k in layers):
            raise TypeError(f"`layers` must map layer names (str) to dimensions, got {self.layers!r}.")
        for k, v in layers.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"`layers[{k!r}]` must be a positive integer dimension, got {v!r}.")
        if layers.get(FINAL_LAYER, self.dim) != self.dim:
            raise ValueError(f"`layers[{FINAL_LAYER!r}]` must equal `dim` ({self.dim}), got "
                             f"{layers[FINAL_LAYER]}.")
        layers.pop(FINAL_LAYER, None)
        layers[FINAL_LAYER] = self.dim  # always offered, always last
        object.__setattr__(self, "layers", layers)
        if len(layers) > 1 and not callable(self.forward_layers):
            raise TypeError(f"`forward_layers` must be callable when `layers` offers more than "
                            f"{FINAL_LAYER!r}, got {self.forward_layers!r}.")
        object.__setattr__(self, "default_layers", self.check_layers(self.default_layers, arg="default_layers"))

    def check_layers(self, layers: str | Sequence[str] | None, *, arg: str = "layers") -> tuple[str, ...]:
        """``layers`` as a tuple of offered names in the backbone's order (``None``: the defaults).

        Examples
        --------
        >>> get_backbone_spec("efficientnet_lite0").check_layers(["blocks.5", "blocks.3"])
        ('blocks.3', 'blocks.5')
        """
        if layers is None:
            return self.default_layers
        names = (layers,) if isinstance(layers, str) else layers
        try:
            names = tuple(names)
        except TypeError:
            raise TypeError(f"`{arg}` must be a layer name or a sequence of names, got "
                            f"{type(layers).__name__}.") from None
        assert isinstance(self.layers, dict)
        unknown = [n for n in names if not isinstance(n, str) or n not in self.layers]
        if unknown or not names:
            raise ValueError(f"`{arg}` must name one or more layers backbone {self.name!r} offers: "
                             f"{list(self.layers)}; got {list(names) if names else 'none'}"
                             f"{f' (unknown: {unknown})' if unknown else ''}.")
        return tuple(n for n in self.layers if n in set(names))

    def layer_dim(self, layers: str | Sequence[str] | None = None) -> int:
        """Dimension of the concatenated pooled outputs of ``layers`` (``None``: the defaults).

        Examples
        --------
        >>> get_backbone_spec("efficientnet_lite0").layer_dim("final")
        1280
        """
        assert isinstance(self.layers, dict)
        return sum(self.layers[n] for n in self.check_layers(layers))


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

    def _normalise(self, x: Tensor) -> Tensor:
        """``x`` checked as ``(B, 3, H, W)`` floats in ``[0, 1]`` and normalised by the backbone's mean/std."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must be a (B, 3, H, W) tensor, got {shape}.")
        if not x.is_floating_point():
            raise TypeError(f"`x` must be float in [0, 1] (divide uint8 by 255), got {x.dtype}.")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, D)`` of images ``x`` ``(B, 3, H, W)`` with values in ``[0, 1]``."""
        x = self._normalise(x)
        out = self.model(x)
        if not isinstance(out, Tensor) or tuple(out.shape) != (x.shape[0], self.dim):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"backbone {self.name!r} returned {shape}, expected "
                               f"({x.shape[0]}, {self.dim}).")
        return out

    @property
    def layers(self) -> dict[str, int]:
        """The layers offered as features, name -> dimension (see :class:`BackboneSpec`)."""
        return dict(self.spec.layers or {})

    def forward_layers(self, x: Tensor, layers: str | Sequence[str] | None = None) -> Tensor:
        """Pooled outputs of ``layers`` concatenated, ``(B, sum of their dims)``, in the backbone's order.

        ``layers=None`` gives the backbone's ``default_layers``; ``"final"`` alone is
        :meth:`forward`.

        Examples
        --------
        >>> bb = get_backbone("dummy")
        >>> bb.forward_layers(torch.rand(2, 3, 32, 32), ["pool", "final"]).shape
        torch.Size([2, 160])
        """
        names = self.spec.check_layers(layers)
        if names == (FINAL_LAYER,):
            return self.forward(x)
        x = self._normalise(x)
        assert self.spec.forward_layers is not None  # checked by BackboneSpec
        pooled = self.spec.forward_layers(self.model, x, names)
        dims = self.layers
        parts = []
        for n in names:
            t = pooled.get(n) if isinstance(pooled, Mapping) else None
            if not isinstance(t, Tensor) or tuple(t.shape) != (x.shape[0], dims[n]):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise RuntimeError(f"backbone {self.name!r} returned {got} for layer {n!r}, expected "
                                   f"({x.shape[0]}, {dims[n]}).")
            parts.append(t)
        return torch.cat(parts, 1)

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
    layers: Mapping[str, int] | None = None,
    default_layers: Sequence[str] = (FINAL_LAYER,),
    forward_layers: LayersFn | None = None,
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
    layers, default_layers, forward_layers
        Intermediate layers offered as features (see :class:`BackboneSpec`); by default only
        ``"final"``, the ``(B, dim)`` output.
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
                        weights_source=weights_source, license=license, factory=factory,
                        layers=layers, default_layers=tuple(default_layers) if not isinstance(
                            default_layers, str) else (default_layers,),
                        forward_layers=forward_layers)
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
    """The registered backbones: name, dim, input size, weights source, licence and the layers they offer.

    Examples
    --------
    >>> df = list_backbones()
    >>> "efficientnet_lite0" in set(df["name"])
    True
    """
    import pandas as pd

    rows = [{"name": s.name, "dim": s.dim, "input_size": s.input_size,
             "weights_source": s.weights_source, "license": s.license,
             "layers": ", ".join(f"{k} ({v})" for k, v in (s.layers or {}).items()),
             "default_layers": ", ".join(s.default_layers)} for s in BACKBONES.values()]
    return pd.DataFrame(rows, columns=["name", "dim", "input_size", "weights_source", "license", "layers",
                                       "default_layers"])


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


def tag_weights(model: nn.Module, sha: str) -> nn.Module:
    """Record the sha256 of ``model``'s weights (or ``"random"``, ``"none"``) for :func:`build_backbone`."""
    model.weights_sha256 = sha  # read by get_backbone
    return model

