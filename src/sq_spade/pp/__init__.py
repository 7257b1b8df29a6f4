"""Preprocessing: tissue masks and tiles, patches around spots, gene panels, normalisation, frozen backbone features."""

from __future__ import annotations

from typing import Any

from sq_spade.pp._features import compute_features
from sq_spade.pp._genes import normalize, select_genes
from sq_spade.pp._patches import Patches, extract_patches, patches
from sq_spade.pp._store import FeatureStore, FeatureWindow, write_feature_store
from sq_spade.pp._tiles import tile_tissue
from sq_spade.pp._tissue import detect_tissue


def register_backbone(name: str, factory: Any, **kwargs: Any) -> Any:
    """Register a user backbone under ``name`` (see :func:`sq_spade.nn.backbones.register_backbone`).

    ``factory(weights)`` returns a torch module mapping float ``(B, 3, H, W)`` in [0, 1]
    (after the normalisation given by ``mean``/``std``) to ``(B, D)`` features.

    Examples
    --------
    >>> import torch
    >>> def tiny(weights=None, pretrained=True):
    ...     return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    >>> spec = sqs.pp.register_backbone("mean_rgb", tiny, dim=3, overwrite=True)
    >>> spec.name, spec.dim
    ('mean_rgb', 3)
    """
    from sq_spade.nn.backbones import register_backbone as _register

    return _register(name, factory, **kwargs)


__all__ = ["FeatureStore", "FeatureWindow", "Patches", "compute_features", "detect_tissue", "extract_patches",
           "normalize", "patches", "register_backbone", "select_genes", "tile_tissue", "write_feature_store"]
