"""Frozen backbone features of every spot's patch, into ``obsm``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._serialize import to_jsonable
from sq_spade._settings import settings
from sq_spade._utils import atomic_path, copy_data, process_rank, resolve_device
from sq_spade._validation import (
    check_choice,
    check_positive,
    feature_recipe,
    get_table,
    is_spatialdata,
    section_labels,
)
from sq_spade._version import __version__
from sq_spade.pp._patches import DEFAULT_FILL, _build_patches

FINAL_LAYER = "final"  # sq_spade.nn.backbones.FINAL_LAYER, without importing torch here

if TYPE_CHECKING:
    from spatialdata import SpatialData


def feature_provenance(adata: Any, key: str) -> dict[str, Any] | None:
    """What :func:`compute_features` recorded for ``obsm[key]`` (``None`` when unknown)."""
    return adata.uns.get(K.UNS.FEATURES, {}).get(key)


def comparable_provenance(prov: Any) -> dict[str, Any] | None:
    """The entries of a provenance record that decide what the features are, with defaults filled in.

    ``None`` when there is no record. Values are plain JSON (an ``h5ad``/``zarr`` round trip
    gives numpy scalars and drops ``None``; both compare equal to what was written).

    Examples
    --------
    >>> p = comparable_provenance({"backbone": "uni", "dim": 1024, "device": "cuda"})
    >>> p["backbone"], p["tta"], "device" in p
    ('uni', False, False)
    """
    if prov is None:
        return None
    out: dict[str, Any] = {}
    for k, default in K.FEATURE_PROVENANCE_DEFAULTS.items():
        v = prov.get(k)
        v = to_jsonable(default if v is None or (k == "zscore" and v in (False, "none")) else v)
        if k == "patch_geometry" and isinstance(v, dict):
            v = {g: to_jsonable(v.get(g, d)) for g, d in K.PATCH_GEOMETRY_DEFAULTS.items()}
        out[k] = v
    return out


def _same(a: Any, b: Any) -> bool:
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(b, float) and isinstance(a, int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def provenance_differences(a: Any, b: Any) -> list[str]:
    """What differs between two provenance records, as ``"entry: a vs b"`` (entries as compared).

    Examples
    --------
    >>> provenance_differences({"backbone": "uni", "tta": True}, {"backbone": "uni"})
    ['tta: True vs False']
    """
    pa, pb = comparable_provenance(a), comparable_provenance(b)
    if pa is None or pb is None:
        return [] if pa is pb else ["provenance: recorded vs missing" if pb is None else "provenance: missing vs recorded"]
    out = []
    for k in pa:
        if k == "patch_geometry" and isinstance(pa[k], dict) and isinstance(pb[k], dict):
            out += [f"patch_geometry.{g}: {pa[k][g]!r} vs {pb[k][g]!r}" for g in pa[k] if not _same(pa[k][g], pb[k][g])]
        elif not _same(pa[k], pb[k]):
            out.append(f"{k}: {pa[k]!r} vs {pb[k]!r}")
    return out


def check_features_backbone(adata: Any, key: str, backbone: str, weights_sha256: str | None = None,
                            recipe: Any = None, *, expected: Any = None, expected_from: str = "the model") -> None:
    """Refuse features computed otherwise than a model (or the other side of a comparison) expects.

    ``backbone`` and ``weights_sha256`` are checked whenever ``obsm[key]`` has a provenance record.
    ``expected`` (a provenance record, e.g. the one a model was trained on) is compared in full
    (:data:`~sq_spade._constants.FEATURE_PROVENANCE_DEFAULTS`: backbone, weights, patch geometry,
    TTA, layers, normalisation): features made differently, or without a record to compare
    (``anndata.concat`` drops ``uns``), are refused with a message naming what differs.
    ``recipe`` (a model's layers, TTA and z-score) is checked as well.
    """
    prov = feature_provenance(adata, key)
    if prov is None:
        if expected is not None:
            raise ValueError(
                f"`obsm[{key!r}]` has no provenance record (uns[{K.UNS.FEATURES!r}][{key!r}]; anndata.concat "
                f"drops `uns`), so it cannot be checked against {expected_from}, whose features were made with "
                f"backbone {expected.get('backbone')!r}: recompute them with sqs.pp.compute_features, or copy the "
                f"record back into `uns`.")
        return
    if recipe is not None:
        have, want = feature_recipe(prov), feature_recipe(recipe)
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if diff:
            what = ", ".join(f"{k}={h!r} (the model expects {w!r})" for k, (h, w) in diff.items())
            raise ValueError(
                f"`obsm[{key!r}]` was computed with {what}: compute them as the model expects with "
                f"sqs.pp.compute_features(..., layers={want['layers']!r}, tta={want['tta']!r}, "
                f"zscore={want['zscore']!r}) or drop them to let them be computed.")
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
    if expected is not None:
        diffs = provenance_differences(prov, expected)
        if diffs:
            raise ValueError(
                f"`obsm[{key!r}]` was computed differently from {expected_from}'s features ({'; '.join(diffs)}; "
                f"this table's value first). Features made differently are not comparable: recompute them "
                f"with the same settings.")


@renamed_arguments(mpp="microns_per_pixel")
@inject_docs
def compute_features(
    sdata: SpatialData,
    *,
    backbone: str | Any = "efficientnet_lite0",
    weights: str | None = None,
    key_added: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int | None = None,
    layers: str | Sequence[str] | None = None,
    tta: bool = False,
    zscore: K.Zscore | Literal["auto"] | None = "auto",
    keep_views: bool = False,
    table_key: str = K.TABLES.DEFAULT,
    image_key: str | None = None,
    shapes_key: str | None = None,
    patch_size_um: float | None = None,
    microns_per_pixel: float | None = None,
    patch_px: int | None = None,
    cache: bool = True,
    parallel: str | None = None,
    client: Any = None,
    copy: bool = False,
) -> str | SpatialData:
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
    %(device)s
    num_workers
        DataLoader workers reading patches (default: ``settings.num_workers``; 0 on CPU is
        best, since the forward pass dominates there).
    layers
        Which layers' globally average-pooled outputs make the features, concatenated
        shallow to deep: one name or several among those the backbone offers
        (``get_backbone_spec(backbone).layers``; ``"final"`` is the backbone's last pooled
        output). ``None``: the backbone's ``default_layers``; for ``"efficientnet_lite0"``
        stages ``blocks.3``, ``blocks.4`` and ``blocks.5`` (80 + 112 + 192 = 384-d), which
        predict expression better than its final 1280-d features (``docs/backbones.md``).
    tta
        Average the features of the 8 dihedral views (4 rotations, with and without a flip)
        of each patch: 8 times the compute; off by default (see ``docs/backbones.md`` for its
        measured gain).
    zscore
        ``"section"``: standardise every feature column within each section (mean 0, sd 1 over
        that section's spots computed here), which removes per-section shifts in staining and
        scale between the concatenated layers. ``None``: raw pooled values. ``"auto"``:
        ``"section"`` when ``layers`` include an intermediate layer, ``None`` for ``"final"``
        alone (as models imported from the original SPADE expect).
    keep_views
        With ``tta=True``: also store the 8 views' features, ``(n_spots, 8, D)``, in
        ``obsm[key + "_views"]`` (z-scored like the mean), for training on a random view.
    table_key, image_key, shapes_key
        Which table, image and spots to use.
    patch_size_um, microns_per_pixel, patch_px
        Patch geometry (see :func:`sq_spade.pp.extract_patches`).
    cache
        Use the on-disk cache in ``settings.cache_dir`` when it is set. Its key is the sha256 of
        every patch's pixels, the backbone's name and weights, ``layers``, ``tta`` and
        ``keep_views``: the same inputs give the cached features, any change recomputes them
        (the z-score is applied after the cache).
    parallel
        ``None`` (default): every section in this process. ``"dask"``: one dask task per
        section on ``client`` (or, without one, on a temporary local cluster of single-threaded
        worker processes, one per section up to the number of CPUs). Each worker builds the
        backbone once and keeps it for its next sections (a :class:`Backbone` instance, or one
        whose weights no sha256 identifies, is sent once to each worker instead); each task
        reads its section's patches itself, so zarr-backed images are read by the workers from
        disk (DataLoader workers are not used there; the cache, when on, holds one entry per
        section). Rows, values and provenance are those of the serial path. ``weights`` must be
        readable at the same path on every worker. Each worker holds one section's level at a
        time (at most ``settings.memory_budget_bytes``, larger ones are read window by window)
        and one backbone. On GPUs, pass a client of ``dask_cuda.LocalCUDACluster`` (one worker
        per GPU). The local cluster starts worker processes: in a script, call this under
        ``if __name__ == "__main__":``.
    client
        A :class:`distributed.Client` to run on; implies ``parallel="dask"``.
    copy
        Compute into a copy of ``sdata`` (tables copied, images shared) and return the copy.

    Returns
    -------
    The ``obsm`` key written (the copy of ``sdata`` when ``copy=True``). Float32 ``(n_spots, D)``
    features go to ``obsm[key]``, and ``uns['sq_spade_features'][key]`` records the backbone, its
    weights' sha256, the layers, the patch geometry, TTA, the z-score and the package version.
    Rows not covered (``shapes_key`` restricting to a section) keep earlier values or NaN.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    >>> sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    'X_dummy'
    >>> sd.tables["table"].obsm["X_dummy"].shape
    (4, 64)

    Intermediate layers, 8-view TTA, the views kept:

    >>> sqs.pp.compute_features(sd, backbone="dummy", layers=["pool", "final"], tta=True,
    ...                         keep_views=True, key_added="X_tta", patch_size_um=32, microns_per_pixel=1.0)
    'X_tta'
    >>> sd.tables["table"].obsm["X_tta"].shape, sd.tables["table"].obsm["X_tta_views"].shape
    ((4, 160), (4, 8, 160))

    Many sections in parallel, on a dask cluster (a local one when ``client`` is not given):

    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> with LocalCluster(n_workers=4, threads_per_worker=1) as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     sqs.pp.compute_features(sdata, backbone="efficientnet_lite0", client=client)
    'X_efficientnet_lite0'
    """
    from sq_spade.nn.backbones import Backbone, get_backbone

    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image, got {type(sdata).__name__}.")
    if copy:
        sdata = copy_data(sdata)
    check_positive(batch_size, "batch_size", integer=True)
    num_workers = settings.num_workers if num_workers is None else num_workers
    check_positive(num_workers, "num_workers", integer=True, allow_zero=True)
    if parallel not in (None, "dask"):
        raise ValueError(f"`parallel` must be None or 'dask', got {parallel!r}.")
    if client is not None:
        _check_client(client)
    distributed = parallel == "dask" or client is not None
    table = get_table(sdata, table_key)
    if not isinstance(tta, bool) or not isinstance(keep_views, bool):
        raise TypeError(f"`tta` and `keep_views` must be bool, got {tta!r} and {keep_views!r}.")
    if keep_views and not tta:
        raise ValueError("`keep_views=True` needs `tta=True`: the views are the 8 dihedral transforms.")
    if zscore != "auto" and zscore is not None:
        check_choice(zscore, "zscore", (*K.ZSCORES, "auto", None))
    spec = backbone.spec if isinstance(backbone, Backbone) else None
    if spec is None:
        from sq_spade.nn.backbones import get_backbone_spec

        spec = get_backbone_spec(backbone)
    names = spec.check_layers(layers)  # before building: a wrong name costs no weights
    if zscore == "auto":
        zscore = None if names == (FINAL_LAYER,) else "section"
    dim = spec.layer_dim(names)
    model = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights)
    key = key_added or K.features_key(model.name)
    # levels are loaded by whoever embeds them: here, or in each dask worker
    p = _build_patches(sdata, table_key=table_key, image_key=image_key, shapes_key=shapes_key,
                       patch_size_um=patch_size_um, mpp=microns_per_pixel, patch_px=patch_px, fill=DEFAULT_FILL, level=None,
                       load=not distributed)
    record = {"backbone": model.name, "weights_sha256": model.weights_sha256, "dim": int(dim),
              "layers": list(names), "input_size": int(model.input_size),
              "patch_geometry": dict(p.geometry.to_dict()), "tta": bool(tta), "zscore": zscore}
    kept = _rows_kept(table, key, p.rows, dim, record)  # checked before any pixel is embedded
    job = _Job(batch_size=batch_size, num_workers=num_workers, tta=tta, layers=names, views=keep_views,
               cache_dir=settings.cache_dir if cache else None, memory_budget_bytes=settings.memory_budget_bytes,
               progress=settings.progress)
    if distributed:
        parts = p.by_section()
        # a backbone given by name is rebuilt by each worker; an instance is shipped to each
        results = _embed_with_dask(parts, model, weights=weights, rebuildable=not isinstance(backbone, Backbone),
                                   device=settings.device if device is None else device, job=job, client=client)
        feats = np.empty((len(p), *_shape(dim, keep_views)), np.float32)
        for part, (f, _, _) in zip(parts, results, strict=True):
            if f.shape != (len(part), *_shape(dim, keep_views)):
                raise RuntimeError(f"backbone returned {f.shape}, expected {(len(part), *_shape(dim, keep_views))}")
            feats[np.searchsorted(p.rows, part.rows)] = f  # p.rows is sorted, parts are subsets
        from_cache = all(r[1] for r in results)
        dev_types = sorted({r[2] for r in results})
        dev_type = dev_types[0] if len(dev_types) == 1 else ",".join(dev_types)
    else:
        dev = resolve_device(device)
        feats, from_cache = _embed(p, model, dev, job)
        dev_type = dev.type
    views = feats if keep_views else None
    if views is not None:
        feats = views.mean(axis=1)
    if zscore == "section":
        shift, scale = _section_standardisation(feats, section_labels(table)[p.rows])
        feats = (feats - shift) / scale
        if views is not None:
            views = (views - shift[:, None, :]) / scale[:, None, :]
    # assemble fully before touching the table, so errors leave it unchanged
    out = _merged(table, key, (dim,), p.rows, feats)
    views_key = key + K.VIEWS_SUFFIX
    out_views = None if views is None else _merged(table, views_key, (8, dim), p.rows, views)
    geometry = {k: v for k, v in p.geometry.to_dict().items()}
    if kept is not None:  # the rows kept were made the same way: one record lists every section
        old_sections = dict((kept.get("patch_geometry") or {}).get("sections") or {})
        geometry["sections"] = {**old_sections, **geometry["sections"]}
    table.obsm[key] = out
    if out_views is not None:
        table.obsm[views_key] = out_views
    prov = {
        "backbone": model.name, "weights_sha256": model.weights_sha256, "dim": int(dim),
        "layers": list(names), "input_size": int(model.input_size), "patch_geometry": geometry,
        "tta": bool(tta), "zscore": zscore, "views_key": views_key if keep_views else None,
        "sq_spade_version": __version__, "device": dev_type, "from_cache": bool(from_cache),
    }
    table.uns.setdefault(K.UNS.FEATURES, {})[key] = {k: v for k, v in prov.items() if v is not None}
    log_info("computed %s features (%d dims) of %d spots%s: obsm[%r] of table %r", model.name, dim, len(p),
             " (from the cache)" if from_cache else "", key, table_key)
    return sdata if copy else key


def _shape(dim: int, views: bool) -> tuple[int, ...]:
    return (8, dim) if views else (dim,)


def _merged(table: Any, key: str, shape: tuple[int, ...], rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``obsm[key]`` with ``rows`` replaced by ``values`` (other rows kept when the shape fits, else NaN)."""
    if key in table.obsm and np.shape(table.obsm[key]) == (table.n_obs, *shape):
        out = np.array(table.obsm[key], dtype=np.float32, copy=True)
    else:
        out = np.full((table.n_obs, *shape), np.nan, np.float32)
    out[rows] = values
    return out


def _section_standardisation(feats: np.ndarray, sections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and sd of its section's features (columns with sd 0 keep scale 1)."""
    shift = np.empty_like(feats)
    scale = np.empty_like(feats)
    for s in dict.fromkeys(sections):
        m = sections == s
        x = feats[m].astype(np.float64)
        sd = x.std(axis=0)
        shift[m] = x.mean(axis=0)
        scale[m] = np.where(sd > 1e-12, sd, 1.0)
    return shift, scale


def _rows_kept(table: Any, key: str, rows: np.ndarray, dim: int, record: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance of ``obsm[key]`` when its rows outside ``rows`` are kept, ``None`` when it is rebuilt.

    Rows this call does not compute keep their features only when these were made the same way
    (one provenance record describes every row); features made otherwise in those rows are
    refused, so ``obsm[key]`` never mixes two geometries or backbones.
    """
    if key not in table.obsm or np.shape(table.obsm[key]) != (table.n_obs, dim):
        return None
    others = np.ones(table.n_obs, dtype=bool)
    others[rows] = False
    old = np.asarray(table.obsm[key])[others]
    if not others.any() or not np.isfinite(old).any():
        return None  # nothing of value outside the rows recomputed
    prov = feature_provenance(table, key)
    diffs = provenance_differences(record, prov)
    if diffs:
        raise ValueError(
            f"`key_added`: obsm[{key!r}] holds features made otherwise ({'; '.join(diffs)}; this call's value "
            f"first) in {int(others.sum())} rows this call does not compute (`shapes_key` covers "
            f"{len(rows)} of {table.n_obs}). One key would then mix two kinds of features: pass another "
            f"`key_added`, or compute every row with the same settings.")
    return prov


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _weights_digest(model: Any) -> str:
    """blake2b of every tensor the backbone holds now (a fine-tuned copy differs from its pretrained sha)."""
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16)
    # parameters and every buffer (non-persistent ones too: they are not in the state dict)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    for name in ("mean", "std"):  # normalisation buffers (not in the state dict)
        v = getattr(model, name, None)
        if v is not None:
            h.update(f"{name}={[float(x) for x in torch.as_tensor(v).flatten()]}".encode())
    return h.hexdigest()


def _cache_path(patches: Any, model: Any, job: _Job, cache_dir: Any) -> Any:
    """Cache file of these exact patches through this exact backbone (hash of the pixels).

    The key covers the backbone's name, declared weights sha256, input size, dimension and
    normalisation (mean/std), a digest of the weights it holds now, TTA, the layers and views, and
    every patch's pixels.
    """
    import hashlib
    from pathlib import Path

    spec = getattr(model, "spec", None)
    norm = (tuple(getattr(spec, "mean", ())), tuple(getattr(spec, "std", ())))
    h = hashlib.sha256()
    h.update(f"{model.name}|{model.weights_sha256}|{model.input_size}|{model.dim}|norm={norm}|"
             f"weights={_weights_digest(model)}|tta={job.tta}|layers={','.join(job.layers)}|views={job.views}|v2".encode())
    for batch in patches.iter_batches(256):
        h.update(batch.tobytes())
    return Path(cache_dir) / f"features_{model.name}_{h.hexdigest()[:32]}.npy"


def _read_cache(path: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached features, or ``None`` (with a warning naming the file) when the entry is unusable."""
    import warnings

    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = f"it cannot be read ({type(e).__name__}: {e})"
    else:
        if feats.shape != shape or feats.dtype != np.float32:
            reason = f"it holds {feats.dtype} {feats.shape}, not float32 {shape}"
        elif not np.isfinite(feats).all():
            reason = "it holds NaN or infinite values"
        else:
            return feats
    warnings.warn(f"Feature cache entry {str(path)!r} is unusable ({reason}); recomputing the features and "
                  f"replacing it.", UserWarning, stacklevel=3)
    return None


def _write_cache(path: Any, feats: np.ndarray) -> None:
    """Store features in the cache; a failure (full disk, read-only folder) warns and is otherwise ignored."""
    import warnings

    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, feats, allow_pickle=False)
    except OSError as e:
        warnings.warn(f"Could not write the feature cache entry {str(path)!r} ({type(e).__name__}: {e}); the "
                      f"features are returned but not cached.", UserWarning, stacklevel=3)


@dataclass(frozen=True)
class _Job:
    """How to embed patches: the settings a dask worker cannot read from this process."""

    batch_size: int
    num_workers: int
    tta: bool
    layers: tuple[str, ...]
    views: bool
    cache_dir: Any
    memory_budget_bytes: int
    progress: bool


def _embed(p: Any, model: Any, dev: Any, job: _Job) -> tuple[np.ndarray, bool]:
    """Features ``(len(p), D)`` float32 of patches ``p`` and whether they came from the cache."""
    import torch

    from sq_spade.nn.inference import embed_batches

    # only weights identified by their sha256 can key a cache entry (a name alone can be re-registered)
    cacheable = job.cache_dir is not None and _is_sha256(model.weights_sha256)
    cache_path = _cache_path(p, model, job, job.cache_dir) if cacheable else None
    expected = (len(p), *_shape(model.spec.layer_dim(job.layers), job.views))
    feats = None
    if cache_path is not None and cache_path.is_file():
        feats = _read_cache(cache_path, expected)
    from_cache = feats is not None
    if feats is None:
        loader = torch.utils.data.DataLoader(
            p, batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers,
            pin_memory=dev.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if job.num_workers > 0 else None,
        )
        feats = embed_batches(model, loader, device=dev, tta=job.tta, layers=job.layers, views=job.views,
                              total=len(loader),
                              desc=f"features ({model.name})", progress=job.progress)
        feats = np.asarray(feats, dtype=np.float32)
        if not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats).reshape(len(feats), -1).all(axis=1)).sum())
            raise FloatingPointError(f"Backbone {model.name!r} returned NaN or infinite features for {bad} of "
                                     f"{len(feats)} patches (broken or diverged weights?); nothing was written.")
        if cache_path is not None and process_rank() == 0:  # one writer under torchrun
            _write_cache(cache_path, feats)
    if feats.shape != expected:
        raise RuntimeError(f"backbone returned {feats.shape}, expected {expected}")
    return feats, from_cache


# ----------------------------------------------------------------------------------------------
# many sections through dask: one task per section, one backbone per worker process


@dataclass(frozen=True)
class _BackboneRecipe:
    """What a worker needs to build the client's backbone itself (its spec travels, not the name)."""

    spec: Any
    weights: Any
    weights_sha256: str


#: Backbones built in this process by dask tasks, keyed by (name, weights sha256); the last two.
_WORKER_BACKBONES: OrderedDict[tuple[str, str], Any] = OrderedDict()
_WORKER_LOCK = threading.Lock()


def _worker_backbone(source: Any) -> Any:
    """The backbone of a task: built once per worker process from a recipe, or the shipped one."""
    if not isinstance(source, _BackboneRecipe):
        return source  # a scattered Backbone: already one copy per worker
    from sq_spade.nn.backbones import build_backbone

    key = (source.spec.name, source.weights_sha256)
    with _WORKER_LOCK:  # threads of one worker build it once
        model = _WORKER_BACKBONES.get(key)
        if model is None:
            model = build_backbone(source.spec, source.weights)
            if model.weights_sha256 != source.weights_sha256:
                raise RuntimeError(
                    f"a dask worker built backbone {source.spec.name!r} with weights of sha256 "
                    f"{model.weights_sha256[:12]}..., not the client's {source.weights_sha256[:12]}...: "
                    "the weights file differs on that worker.")
            _WORKER_BACKBONES[key] = model
            while len(_WORKER_BACKBONES) > 2:
                _WORKER_BACKBONES.popitem(last=False)
        _WORKER_BACKBONES.move_to_end(key)
    return model


def _section_task(part: Any, source: Any, device: str, job: _Job) -> tuple[np.ndarray, bool, str]:
    """One section on a dask worker: load its level (under the budget), embed its patches."""
    model = _worker_backbone(source)
    dev = resolve_device(device)
    feats, from_cache = _embed(part.resolved(job.memory_budget_bytes), model, dev, job)
    return feats, from_cache, dev.type


def _check_client(client: Any) -> None:
    try:
        from distributed import Client
    except ImportError as e:  # pragma: no cover - distributed ships with spatialdata
        raise ImportError("`client` needs dask.distributed: pip install 'sq-spade[distributed]'.") from e
    if not isinstance(client, Client):
        raise TypeError(f"`client` must be a distributed.Client, got {type(client).__name__}.")


def _embed_with_dask(parts: list[Any], model: Any, *, weights: Any, rebuildable: bool, device: str,
                     job: _Job, client: Any) -> list[tuple[np.ndarray, bool, str]]:
    """Run :func:`_section_task` for every section on ``client`` (or a temporary local cluster).

    Workers rebuild the backbone from its spec and ``weights`` when it was given by name and
    its weights are identified (a sha256, or none at all); otherwise the instance itself is
    scattered to every worker once (random or unidentified weights cannot be rebuilt).
    """
    from distributed import Client, LocalCluster

    if client is None:
        import os

        n = max(1, min(len(parts), os.cpu_count() or 1))
        # processes: each worker its own interpreter (no GIL contention) and its own backbone copy
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as local:
            return _embed_with_dask(parts, model, weights=weights, rebuildable=rebuildable, device=device,
                                    job=job, client=local)
    worker_job = _Job(**{**job.__dict__, "num_workers": 0, "progress": False})
    sha = model.weights_sha256
    if rebuildable and (_is_sha256(sha) or sha == "none"):
        source: Any = _BackboneRecipe(model.spec, weights, sha)
    else:
        source = client.scatter(model, broadcast=True, hash=False)
    futures = [client.submit(_section_task, client.scatter(part, hash=False), source, device, worker_job,
                             pure=False) for part in parts]
    return client.gather(futures)
