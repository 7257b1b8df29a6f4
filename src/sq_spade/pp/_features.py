"""Frozen backbone features of every spot's patch, into ``obsm``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._settings import settings
from sq_spade._validation import check_positive, get_table, is_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData


def feature_provenance(adata: Any, key: str) -> dict[str, Any] | None:
    """What :func:`compute_features` recorded for ``obsm[key]`` (``None`` when unknown)."""
    return adata.uns.get(K.FEATURES_UNS, {}).get(key)


def check_features_backbone(adata: Any, key: str, backbone: str, weights_sha256: str | None = None) -> None:
    """Refuse features computed with another backbone (or other weights) than a model expects."""
    prov = feature_provenance(adata, key)
    if prov is None:
        return
    if prov.get("backbone") != backbone:
        raise ValueError(
            f"`obsm[{key!r}]` holds features of backbone {prov.get('backbone')!r}, but the model expects "
            f"{backbone!r}: compute them with sqs.pp.compute_features(..., backbone={backbone!r})."
        )
    if weights_sha256 and prov.get("weights_sha256") not in (None, weights_sha256):
        raise ValueError(
            f"`obsm[{key!r}]` was computed with other weights of {backbone!r} (sha256 "
            f"{str(prov.get('weights_sha256'))[:12]}...) than the model's ({weights_sha256[:12]}...)."
        )


def compute_features(
    sdata: SpatialData,
    *,
    backbone: str | Any = "efficientnet_lite0",
    weights: str | None = None,
    key_added: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int | None = None,
    tta: bool = False,
    table_key: str = K.TABLE_KEY,
    image_key: str | None = None,
    shapes_key: str | None = None,
    patch_size_um: float | None = None,
    mpp: float | None = None,
    patch_px: int | None = None,
    cache: bool = True,
) -> str:
    """Compute frozen backbone features of every spot's patch into ``obsm``.

    Patches are those of :func:`sq_spade.pp.extract_patches` (its recorded geometry, or
    112 um at 0.5 um/px); the backbone sees them resized to its input size.

    Parameters
    ----------
    sdata
        SpatialData with one or several sections.
    backbone
        A registered backbone name (see :func:`sq_spade.nn.backbones.list_backbones`) or a
        :class:`~sq_spade.nn.backbones.Backbone` instance.
    weights
        Local weights file for backbones that need one (DenseNet-121, ResNet-50, UNI, ...).
    key_added
        ``obsm`` key; default ``"X_<backbone>"``.
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``...
    num_workers
        DataLoader workers reading patches (default: ``settings.num_workers``; 0 on CPU is
        best, since the forward pass dominates there).
    tta
        Average the features of the 8 flips/rotations of each patch.
    table_key, image_key, shapes_key
        Which table, image and spots to use.
    patch_size_um, mpp, patch_px
        Patch geometry (see :func:`sq_spade.pp.extract_patches`).
    cache
        Use the on-disk cache in ``settings.cache_dir`` when it is set. Its key is the sha256 of
        every patch's pixels, the backbone's name and weights and ``tta``: the same inputs give
        the cached features, any change recomputes them.

    Returns
    -------
    The ``obsm`` key written. Float32 ``(n_spots, D)`` features go to ``obsm[key]``, and
    ``uns['sq_spade_features'][key]`` records the backbone, its weights' sha256, the patch
    geometry, TTA and the package version. Rows not covered (``shapes_key`` restricting to a
    section) keep earlier values or NaN.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    >>> sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, mpp=1.0)
    'X_dummy'
    >>> sd.tables["table"].obsm["X_dummy"].shape
    (4, 64)
    """
    import torch

    import sq_spade
    from sq_spade._utils import atomic_path, process_rank, resolve_device
    from sq_spade.nn.backbones import Backbone, get_backbone
    from sq_spade.nn.inference import embed_batches
    from sq_spade.pp._patches import patches as make_patches

    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image, got {type(sdata).__name__}.")
    check_positive(batch_size, "batch_size", integer=True)
    num_workers = settings.num_workers if num_workers is None else num_workers
    check_positive(num_workers, "num_workers", integer=True, allow_zero=True)
    table = get_table(sdata, table_key)
    model = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights)
    key = key_added or K.features_key(model.name)
    dev = resolve_device(device)
    p = make_patches(sdata, table_key=table_key, image_key=image_key, shapes_key=shapes_key,
                     patch_size_um=patch_size_um, mpp=mpp, patch_px=patch_px)
    # only weights identified by their sha256 can key a cache entry (a name alone can be re-registered)
    cacheable = cache and settings.cache_dir is not None and _is_sha256(model.weights_sha256)
    cache_path = _cache_path(p, model, tta) if cacheable else None
    from_cache = cache_path is not None and cache_path.is_file()
    if from_cache:
        feats = np.load(cache_path, allow_pickle=False)
    else:
        loader = torch.utils.data.DataLoader(
            p, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=dev.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        feats = embed_batches(model, loader, device=dev, tta=tta, total=len(loader), desc=f"features ({model.name})")
        feats = np.asarray(feats, dtype=np.float32)
        if cache_path is not None and process_rank() == 0:  # one writer under torchrun
            with atomic_path(cache_path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, feats, allow_pickle=False)
    if feats.shape != (len(p), model.dim):
        raise RuntimeError(f"backbone returned {feats.shape}, expected {(len(p), model.dim)}")
    # assemble fully before touching the table, so errors leave it unchanged
    if key in table.obsm and np.shape(table.obsm[key]) == (table.n_obs, model.dim):
        out = np.array(table.obsm[key], dtype=np.float32, copy=True)
    else:
        out = np.full((table.n_obs, model.dim), np.nan, np.float32)
    out[p.rows] = feats
    geometry = {k: v for k, v in p.geometry.to_dict().items()}
    table.obsm[key] = out
    table.uns.setdefault(K.FEATURES_UNS, {})[key] = {
        "backbone": model.name, "weights_sha256": model.weights_sha256, "dim": int(model.dim),
        "input_size": int(model.input_size), "patch_geometry": geometry, "tta": bool(tta),
        "sq_spade_version": sq_spade.__version__, "device": dev.type,
        "from_cache": bool(from_cache),
    }
    return key


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _cache_path(patches: Any, model: Any, tta: bool) -> Any:
    """Cache file of these exact patches through this exact backbone (hash of the pixels)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    h.update(f"{model.name}|{model.weights_sha256}|{model.input_size}|{model.dim}|tta={tta}|v1".encode())
    for batch in patches.iter_batches(256):
        h.update(batch.tobytes())
    return Path(settings.cache_dir) / f"features_{model.name}_{h.hexdigest()[:32]}.npy"
