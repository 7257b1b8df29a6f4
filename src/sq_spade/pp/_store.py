"""A per-section feature store on disk (zarr): train on hundreds of slides without loading them all.

Layout of a store (a folder)::

    store.zarr/
      zarr.json                 root group; attrs["sq_spade_feature_store"]: format, backbone,
                                weights sha256, dim, dtype, genes (the panel), gene_input
      sections/<section>/       one group per section, attrs: n_spots and provenance
        features    (n, D)      float16 (or float32), chunked by rows
        expression  (n, G)      float32, normalised expression of the store's gene panel
        spot_ids    (n,)        strings (the table's obs_names)

Sections are appended one by one; each is written to a hidden temporary group beside the others
and renamed into place only once complete, so a reader (or a crash) never sees half a section.
Nothing is read until asked: :meth:`FeatureStore.iter_windows` streams in-memory windows of
whole sections (sections larger than the budget are split by rows) under a memory budget.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._serialize import to_jsonable
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_positive, get_table, section_labels
from sq_spade._version import __version__
from sq_spade.pp._features import feature_provenance
from sq_spade.pp._genes import panel_expression, panel_genes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

STORE_ATTR = K.FEATURE_STORE_ATTR


class FeatureStoreV1:
    """Format 1 of a feature store (sq_spade 0.1): the layout of the module docstring.

    The root's ``attrs["sq_spade_feature_store"]`` holds ``format`` (1), ``backbone``,
    ``weights_sha256``, ``dim``, ``dtype``, ``chunk_rows``, ``genes``, ``gene_input``,
    ``features_key`` and ``sq_spade_version``.
    """

    version = 1

    def upgrade(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The root attributes in the current layout (format 1 is the current one)."""
        return meta


#: Every feature-store format this version reads, by ``format``.
STORE_FORMATS: dict[int, FeatureStoreV1] = {1: FeatureStoreV1()}
STORE_FORMAT = FeatureStoreV1.version  # the format new stores are written in
_SECTIONS = "sections"
_NAME_OK = re.compile(r"^[^/\\\x00]+$")


def _check_section_name(section: Any) -> str:
    name = str(section)
    if not _NAME_OK.match(name) or name.startswith(".") or name in (".", ".."):
        raise ValueError(f"`section` must be a non-empty name without '/', '\\' or a leading '.', got {section!r}.")
    return name


@dataclass
class FeatureWindow:
    """Rows of one or more sections, in memory (float32), as yielded by :meth:`FeatureStore.iter_windows`.

    Attributes
    ----------
    features
        ``(n, D)`` float32.
    expression
        ``(n, G)`` float32, columns in the order of :attr:`FeatureStore.genes`.
    spot_ids
        ``(n,)`` object array of str.
    section
        ``(n,)`` section of each row (object array of str).
    parts
        ``(section, start, stop)`` row ranges of the sections in this window, in row order.
    """

    features: np.ndarray
    expression: np.ndarray
    spot_ids: np.ndarray
    section: np.ndarray
    parts: list[tuple[str, int, int]]

    @property
    def n_spots(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 arrays and the id arrays' references."""
        return int(self.features.nbytes + self.expression.nbytes + self.spot_ids.nbytes + self.section.nbytes)


class StoredSection:
    """One section of a :class:`FeatureStore`, opened lazily (zarr arrays, nothing read yet).

    Attributes
    ----------
    name
        Section id.
    features, expression
        The zarr arrays ``(n, D)`` and ``(n, G)``; slice them to read rows.
    attrs
        The section's attributes (``n_spots``, ``provenance``).
    """

    def __init__(self, group: Any, name: str):
        self.name = name
        self._group = group
        self.features = group["features"]
        self.expression = group["expression"]
        self.attrs = dict(group.attrs)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return int(self.features.shape[0])

    @property
    def provenance(self) -> dict[str, Any]:
        """What computed the features (backbone, weights sha256, patch geometry...) and the expression."""
        return dict(self.attrs.get("provenance", {}))

    def spot_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Spot ids of rows ``start:stop`` (an object array of str)."""
        return np.asarray(self._group["spot_ids"][start:stop]).astype(object)

    def load(self, start: int = 0, stop: int | None = None) -> FeatureWindow:
        """Rows ``start:stop`` in memory, as float32 (read chunk by chunk into the output)."""
        stop = self.n_spots if stop is None else min(int(stop), self.n_spots)
        n = max(0, stop - int(start))
        feats = np.empty((n, self.features.shape[1]), np.float32)
        expr = np.empty((n, self.expression.shape[1]), np.float32)
        _read_rows(self.features, start, stop, feats)
        _read_rows(self.expression, start, stop, expr)
        ids = self.spot_ids(start, stop)
        return FeatureWindow(feats, expr, ids, np.full(n, self.name, dtype=object), [(self.name, int(start), stop)])

    def __repr__(self) -> str:
        return f"StoredSection({self.name!r}, n_spots={self.n_spots})"


def _read_rows(arr: Any, start: int, stop: int, out: np.ndarray) -> None:
    """``out[:] = arr[start:stop]`` one row chunk at a time: the float16 copy never exists whole."""
    step = int(arr.chunks[0])
    for a in range(start, stop, step):
        b = min(a + step, stop)
        out[a - start: b - start] = arr[a:b]


class FeatureStore:
    """Per-section frozen features and panel expression on disk, for training at HEST-1k scale.

    Open an existing store with ``FeatureStore(path)``; make one with :meth:`create` or
    :func:`write_feature_store`. One zarr group per section holds its features (float16 by
    default, chunked by rows), the normalised expression of the store's gene panel (float32)
    and its spot ids; the root records the backbone, its weights' sha256, the feature dimension
    and the panel, which every section must share. Sections are written atomically
    (:meth:`write_section`) and read lazily (``store[section]``, :meth:`iter_windows`).

    Parameters
    ----------
    path
        Folder of the store.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    >>> sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    'X_dummy'
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "feats.zarr"
    >>> store = sqs.pp.write_feature_store(sd, path)
    >>> store.sections, store["synth"].n_spots
    (['synth'], 9)
    >>> [(w.features.shape, w.expression.shape) for w in sqs.pp.FeatureStore(path).iter_windows(2**30)]
    [((9, 64), (9, 50))]
    """

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"`path` {str(self.path)!r} is not a feature store (no zarr.json); "
                                    "create one with FeatureStore.create or sqs.pp.write_feature_store.")
        root = zarr.open_group(self.path, mode="r")
        meta = root.attrs.get(STORE_ATTR)
        if not isinstance(meta, Mapping):
            raise ValueError(f"`path` {str(self.path)!r} is a zarr group but not an sq_spade feature store.")
        fmt = STORE_FORMATS.get(int(meta.get("format", -1)))
        if fmt is None:
            raise ValueError(f"feature store {str(self.path)!r} has format {meta.get('format')!r}; this version "
                             f"reads format {STORE_FORMAT}.")
        self.attrs: dict[str, Any] = fmt.upgrade(dict(meta))

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, *, genes: Sequence[str], dim: int, backbone: str,
               weights_sha256: str, features_key: str | None = None, gene_input: K.GeneInput = "log1p_cp10k",
               dtype: K.StoreDtype = "float16", chunk_rows: int = 4096, exist_ok: bool = False) -> FeatureStore:
        """Create an empty store (atomically: a temporary folder renamed into place).

        Parameters
        ----------
        path
            Folder to create.
        genes
            The gene panel: the columns of every section's expression.
        dim
            Feature dimension ``D``.
        backbone, weights_sha256
            What computes the features; every section must match.
        features_key
            The ``obsm`` key the features came from (informative).
        gene_input
            How expression was normalised (``"log1p_cp10k"`` or ``"raw"``).
        dtype
            ``"float16"`` (half the disk and I/O; features keep about 3 significant digits) or
            ``"float32"``.
        chunk_rows
            Rows per chunk of every array.
        exist_ok
            Open an existing store at ``path`` instead of refusing, if it matches.

        Returns
        -------
        The opened store.
        """
        import zarr

        genes = [str(g) for g in genes]
        if not genes or len(set(genes)) != len(genes):
            raise ValueError("`genes` must be a non-empty list of unique gene names.")
        check_positive(dim, "dim", integer=True)
        check_positive(chunk_rows, "chunk_rows", integer=True)
        check_choice(dtype, "dtype", K.STORE_DTYPES)
        check_choice(gene_input, "gene_input", K.GENE_INPUTS)
        meta = {"format": STORE_FORMAT, "backbone": str(backbone), "weights_sha256": str(weights_sha256),
                "dim": int(dim), "dtype": dtype, "chunk_rows": int(chunk_rows), "genes": genes,
                "gene_input": gene_input, "features_key": features_key,
                "sq_spade_version": __version__}
        path = Path(path)
        if path.exists():
            if not exist_ok:
                raise FileExistsError(f"`path` {str(path)!r} exists; open it with FeatureStore(path) or pass "
                                      "exist_ok=True.")
            store = cls(path)
            store._check_compatible(genes=genes, dim=int(dim), backbone=str(backbone),
                                    weights_sha256=str(weights_sha256))
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            root = zarr.open_group(tmp, mode="w")
            root.attrs[STORE_ATTR] = meta
            root.create_group(_SECTIONS)
            os.rename(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return cls(path)

    def _check_compatible(self, *, genes: Sequence[str], dim: int, backbone: str, weights_sha256: str) -> None:
        if list(genes) != self.genes:
            raise ValueError(f"the genes differ from the store's panel of {len(self.genes)} genes "
                             f"({self.genes[:3]}...): a store holds one panel.")
        if dim != self.dim:
            raise ValueError(f"features have {dim} columns, the store holds {self.dim}-d features.")
        if (backbone, weights_sha256) != (self.backbone, self.weights_sha256):
            raise ValueError(f"features of backbone {backbone!r} (weights {weights_sha256[:12]}...) cannot join a "
                             f"store of {self.backbone!r} (weights {self.weights_sha256[:12]}...).")

    # --- description ---------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The gene panel (columns of ``expression``)."""
        return list(self.attrs["genes"])

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.attrs["dim"])

    @property
    def backbone(self) -> str:
        """Backbone name of every section's features."""
        return str(self.attrs["backbone"])

    @property
    def weights_sha256(self) -> str:
        """sha256 of that backbone's weights."""
        return str(self.attrs["weights_sha256"])

    @property
    def sections(self) -> list[str]:
        """Complete sections, sorted by name (temporary and half-written groups are never listed)."""
        d = self.path / _SECTIONS
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if not p.name.startswith(".") and (p / "zarr.json").is_file())

    def __len__(self) -> int:
        return len(self.sections)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sections)

    def __contains__(self, section: object) -> bool:
        return isinstance(section, str) and not section.startswith(".") and \
            (self.path / _SECTIONS / section / "zarr.json").is_file()

    def __getitem__(self, section: str) -> StoredSection:
        import zarr

        name = _check_section_name(section)
        if name not in self:
            raise KeyError(f"section {section!r} is not in the store; it holds {self.sections[:10]}"
                           f"{'...' if len(self) > 10 else ''}.")
        return StoredSection(zarr.open_group(self.path / _SECTIONS / name, mode="r"), name)

    def n_spots(self, sections: Sequence[str] | None = None) -> dict[str, int]:
        """Spots per section (reads only the arrays' metadata)."""
        return {s: self[s].n_spots for s in (self.sections if sections is None else sections)}

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}: {len(self)} sections, {self.backbone} {self.dim}-d "
                f"{self.attrs['dtype']}, {len(self.genes)} genes)")

    # --- writing -------------------------------------------------------------------------------
    def write_section(self, section: str, features: Any, expression: Any, spot_ids: Sequence[str], *,
                      provenance: Mapping[str, Any] | None = None, overwrite: bool = False) -> StoredSection:
        """Write one section atomically: a hidden temporary group, renamed into place when complete.

        Parameters
        ----------
        section
            Section id (a folder name: no ``/`` and no leading ``.``).
        features
            ``(n, D)`` finite features (converted to the store's dtype).
        expression
            ``(n, G)`` expression of the store's genes, in their order.
        spot_ids
            ``n`` unique spot ids.
        provenance
            JSON-like record of how the features and expression were made.
        overwrite
            Replace an existing section of that name instead of refusing.

        Returns
        -------
        The written section, opened.
        """
        import zarr

        name = _check_section_name(section)
        target = self.path / _SECTIONS / name
        if target.exists() and not overwrite:
            raise FileExistsError(f"section {name!r} is already in the store; pass overwrite=True to replace it.")
        dtype = np.dtype(self.attrs["dtype"])
        feats = np.asarray(features)
        expr = np.asarray(expression, dtype=np.float32)
        ids = np.asarray([str(s) for s in spot_ids], dtype=str)
        n = feats.shape[0] if feats.ndim == 2 else -1
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"`features` must have shape (n_spots, {self.dim}), got {feats.shape}.")
        if n == 0:
            raise ValueError(f"section {name!r} has no spots.")
        if expr.shape != (n, len(self.genes)):
            raise ValueError(f"`expression` must have shape ({n}, {len(self.genes)}) (the store's genes), "
                             f"got {expr.shape}.")
        if ids.shape != (n,) or len(np.unique(ids)) != n:
            raise ValueError(f"`spot_ids` must be {n} unique ids, got {ids.shape[0]} ({n - len(np.unique(ids))} "
                             "duplicated)." if ids.ndim == 1 else f"`spot_ids` must be 1-d, got {ids.shape}.")
        with np.errstate(over="ignore"):  # overflow to inf is reported below
            stored = feats.astype(dtype, copy=False)
        if not np.isfinite(stored).all():
            what = "non-finite (NaN or inf)" if not np.isfinite(feats).all() else f"too large for {dtype}"
            raise ValueError(f"`features` of section {name!r} are {what}; compute them for every spot"
                             + ("" if np.isfinite(feats).all() else " first") + ".")
        if not np.isfinite(expr).all():
            raise ValueError(f"`expression` of section {name!r} is not finite.")
        chunk = int(self.attrs["chunk_rows"])
        tmp = self.path / _SECTIONS / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        old = None
        try:
            g = zarr.open_group(tmp, mode="w")
            g.create_array("features", data=stored, chunks=(min(chunk, n), self.dim),
                           compressors=None)  # features barely compress; raw reads are fastest
            g.create_array("expression", data=expr, chunks=(min(chunk, n), len(self.genes)))
            g.create_array("spot_ids", shape=(n,), dtype=str, chunks=(min(chunk, n),))[:] = ids
            g.attrs["n_spots"] = int(n)
            g.attrs["provenance"] = to_jsonable(dict(provenance or {}), nonfinite="null")
            if target.exists():
                old = target.parent / f".{name}.{uuid.uuid4().hex[:8]}.old"
                os.rename(target, old)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
            if old is not None and old.exists():
                if target.exists():
                    shutil.rmtree(old)
                else:  # the new section failed to land: put the old one back
                    os.rename(old, target)
        return self[name]

    def remove_section(self, section: str) -> None:
        """Delete a section (renamed out of sight first, then removed)."""
        name = _check_section_name(section)
        if name not in self:
            raise KeyError(f"section {section!r} is not in the store.")
        trash = self.path / _SECTIONS / f".{name}.{uuid.uuid4().hex[:8]}.del"
        os.rename(self.path / _SECTIONS / name, trash)
        shutil.rmtree(trash)

    # --- streaming -----------------------------------------------------------------------------
    def plan_windows(self, window_bytes: int, *, sections: Sequence[str] | None = None,
                     shuffle: bool = False, seed: int = 0) -> list[list[tuple[str, int, int]]]:
        """Windows of at most ``window_bytes`` each: lists of ``(section, start, stop)``.

        Whole sections are packed greedily, in order (shuffled with ``seed`` when ``shuffle``),
        while a window's rows (:attr:`row_bytes` each) fit ``window_bytes``; a section larger
        than that alone is split into row ranges. :meth:`iter_windows` loads these windows with
        :meth:`window_bytes` each.
        """
        budget = window_bytes
        check_positive(budget, "window_bytes", integer=True)
        names = self.sections if sections is None else [str(s) for s in sections]
        missing = [s for s in names if s not in self]
        if missing:
            raise KeyError(f"`sections` not in the store: {missing[:5]}.")
        if shuffle:
            names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
        row_bytes = self.row_bytes
        rows_max = int(budget // row_bytes)
        if rows_max < 1:
            raise ValueError(f"a window of {budget} bytes is smaller than one row ({row_bytes} bytes): raise "
                             "`memory_budget_bytes`.")
        windows: list[list[tuple[str, int, int]]] = []
        cur: list[tuple[str, int, int]] = []
        used = 0
        for s in names:
            n = self[s].n_spots
            if used + n <= rows_max:
                cur.append((s, 0, n))
                used += n
                continue
            if cur:
                windows.append(cur)
                cur, used = [], 0
            start = 0
            while n - start > rows_max:  # a section alone over the budget: split it
                windows.append([(s, start, start + rows_max)])
                start += rows_max
            cur, used = [(s, start, n)], n - start
        if cur:
            windows.append(cur)
        return windows

    def window_bytes(self, memory_budget_bytes: int | None = None) -> int:
        """Bytes of one window of :meth:`iter_windows` under ``memory_budget_bytes``.

        Two windows may be alive at once (the one the caller holds while the next is read), and
        reading needs a few chunks of buffers: each window gets half of the budget less four
        chunks' worth of rows (at most a quarter of the budget).
        """
        budget = settings.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes
        check_positive(budget, "memory_budget_bytes", integer=True)
        reserve = min(budget // 4, 4 * int(self.attrs["chunk_rows"]) * self.row_bytes)
        return max(1, int(budget - reserve) // 2)

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes in a window: float32 features and expression, its id (about 64 bytes)."""
        return 4 * (self.dim + len(self.genes)) + 2 * np.dtype(object).itemsize + 64

    def iter_windows(self, memory_budget_bytes: int | None = None, *, sections: Sequence[str] | None = None,
                     shuffle: bool = False, seed: int = 0, prefetch: bool = False) -> Iterator[FeatureWindow]:
        """Stream the store as in-memory windows of whole sections under a memory budget.

        Parameters
        ----------
        memory_budget_bytes
            Most bytes in memory at once (default ``settings.memory_budget_bytes``): two
            windows of :meth:`window_bytes` (the one the caller holds while the next is read)
            and the read buffers.
        sections
            Sections to stream (default: all), in this order unless ``shuffle``.
        shuffle
            Shuffle the order of the sections with ``seed`` (pass the epoch as ``seed`` for a new
            order each epoch). Rows inside a window keep their stored order.
        seed
            Seed of the shuffle.
        prefetch
            Read the next window in a background thread while the caller works on this one
            (same memory bound: that is the second window).

        Yields
        ------
        :class:`FeatureWindow` objects; together they cover every row of ``sections`` once.

        Examples
        --------
        >>> for epoch in range(n_epochs):  # doctest: +SKIP
        ...     for w in store.iter_windows(2**30, shuffle=True, seed=epoch, prefetch=True):
        ...         train_on(w.features, w.expression)
        """
        plan = self.plan_windows(self.window_bytes(memory_budget_bytes), sections=sections, shuffle=shuffle,
                                 seed=seed)
        if not prefetch:
            for parts in plan:
                yield self._load(parts)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(self._load, plan[0]) if plan else None
            for i in range(len(plan)):
                assert nxt is not None
                window = nxt.result()
                nxt = pool.submit(self._load, plan[i + 1]) if i + 1 < len(plan) else None
                yield window
                del window

    def training_windows(self, expert: Mapping[str, Any], *, n_experts: int,
                         memory_budget_bytes: int | None = None,
                         sections: Sequence[str] | None = None) -> dict[str, Any]:
        """Windows for training from the store: loaders and expert counts, nothing read yet.

        The result holds the fields of ``sq_spade.train.TrainingWindows`` (``loaders``,
        ``expert_counts``, ``dim``, ``n_genes``, ``key``): each loader returns one window's
        ``(features (n, D) float32, expression (n, G) float32, expert (n,) int64)``; windows
        are those of :meth:`iter_windows` under ``memory_budget_bytes`` (two may be alive at
        once), in section order (the trainer shuffles their order each epoch).

        Parameters
        ----------
        expert
            Expert of every spot, per section: ``{section: (n_spots,) ints in [0, n_experts)}``
            in the store's row order (e.g. from clustering the stored expression).
        n_experts
            Number of experts.
        memory_budget_bytes
            Memory budget (default ``settings.memory_budget_bytes``).
        sections
            Sections to train on (default: every section of ``expert``).

        Returns
        -------
        A dict of ``loaders``, ``expert_counts`` ``(n_windows, n_experts)``, ``dim``,
        ``n_genes`` and ``key`` (the store's path, backbone weights and sections' sizes, to
        tell checkpoints of other data apart).

        Examples
        --------
        >>> windows = TrainingWindows(**store.training_windows(labels, n_experts=16))  # doctest: +SKIP
        >>> fit_experts(windows, None, None, n_experts=16)  # doctest: +SKIP
        """
        import hashlib
        import json

        check_positive(n_experts, "n_experts", integer=True)
        names = list(expert) if sections is None else [str(s) for s in sections]
        labels: dict[str, np.ndarray] = {}
        for s in names:
            if s not in expert:
                raise KeyError(f"`expert` has no labels for section {s!r}.")
            if s not in self:
                raise KeyError(f"section {s!r} of `expert` is not in the store.")
            lab = np.asarray(expert[s])
            n = self[s].n_spots
            if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer) or (lab < 0).any() \
                    or (lab >= n_experts).any():
                raise ValueError(f"`expert[{s!r}]` must be {n} integers in [0, {n_experts}), got shape "
                                 f"{lab.shape} and dtype {lab.dtype}.")
            labels[s] = lab.astype(np.int64)
        plan = self.plan_windows(self.window_bytes(memory_budget_bytes), sections=names)
        counts = np.zeros((len(plan), n_experts), np.int64)
        for w, parts in enumerate(plan):
            for s, a, b in parts:
                counts[w] += np.bincount(labels[s][a:b], minlength=n_experts)

        def loader(parts: list[tuple[str, int, int]]) -> Any:
            def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                win = self._load(parts)
                return win.features, win.expression, np.concatenate([labels[s][a:b] for s, a, b in parts])
            return load

        sizes = [(s, self[s].n_spots) for s in names]
        key = hashlib.sha256(json.dumps([str(self.path.resolve()), self.weights_sha256, sizes]).encode()).hexdigest()
        return {"loaders": [loader(parts) for parts in plan], "expert_counts": counts, "dim": self.dim,
                "n_genes": len(self.genes), "key": f"feature_store:{key[:32]}"}

    def _load(self, parts: list[tuple[str, int, int]]) -> FeatureWindow:
        n = sum(b - a for _, a, b in parts)
        feats = np.empty((n, self.dim), np.float32)
        expr = np.empty((n, len(self.genes)), np.float32)
        ids, secs, out_parts = [], [], []
        at = 0
        for s, a, b in parts:
            sec = self[s]
            _read_rows(sec.features, a, b, feats[at: at + b - a])
            _read_rows(sec.expression, a, b, expr[at: at + b - a])
            ids.append(sec.spot_ids(a, b))
            secs.append(np.full(b - a, s, dtype=object))
            out_parts.append((s, a, b))
            at += b - a
        return FeatureWindow(feats, expr, np.concatenate(ids), np.concatenate(secs), out_parts)


@renamed_arguments(data="sdata")
@inject_docs
def write_feature_store(
    sdata: AnnData | SpatialData,
    path: str | os.PathLike,
    *,
    features_key: str | None = None,
    panel: str | Sequence[str] | None = None,
    gene_input: K.GeneInput = "log1p_cp10k",
    counts_layer: str | None = None,
    sections: Sequence[str] | None = None,
    table_key: str = K.TABLES.DEFAULT,
    dtype: K.StoreDtype = "float16",
    chunk_rows: int = 4096,
    overwrite: bool = False,
) -> FeatureStore:
    """Append the sections of a table to a feature store (created if absent), one atomic write each.

    Call it once per loaded batch of sections (e.g. one HEST slide at a time) to build a store
    of any number of slides without holding them together in memory.

    Parameters
    ----------
    sdata
        AnnData or SpatialData whose table has features in ``obsm`` (from
        :func:`sq_spade.pp.compute_features`) and raw counts.
    path
        Store folder.
    features_key
        ``obsm`` key of the features; default: the only ``obsm`` key with feature provenance.
    panel
        Genes of the expression columns: a list, a boolean ``var`` column, or ``None`` for the
        panel of :func:`sq_spade.pp.select_genes` (all genes when none was chosen). An existing
        store's panel must match.
    gene_input
        ``"log1p_cp10k"`` (library size over the panel genes, scaled to 1e4, then log1p: the
        training targets) or ``"raw"`` counts.
    counts_layer
        Layer of raw counts (default ``X``).
    sections
        Sections to write (default: every section of the table).
    %(table_key)s
    dtype
        Feature dtype of a new store: ``"float16"`` or ``"float32"``.
    chunk_rows
        Rows per chunk of a new store.
    overwrite
        Replace sections already in the store instead of refusing.

    Returns
    -------
    The :class:`FeatureStore`.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    >>> _ = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "feats.zarr"
    >>> store = sqs.pp.write_feature_store(sd, path, panel=["gene0", "gene1"])
    >>> store["synth"].load().expression.shape
    (9, 2)
    """
    table = get_table(sdata, table_key)
    if features_key is None:
        known = [k for k in table.obsm if feature_provenance(table, k) is not None]
        if len(known) != 1:
            raise ValueError(f"`features_key` must be given: the table has {len(known)} features with provenance "
                             f"({known}); obsm keys: {sorted(table.obsm)}.")
        features_key = known[0]
    if features_key not in table.obsm:
        raise KeyError(f"`features_key={features_key!r}` is not in `obsm`; available keys: {sorted(table.obsm)}.")
    feats = table.obsm[features_key]  # sliced per section below: no copy of the whole matrix
    if np.ndim(feats) != 2 or np.shape(feats)[0] != table.n_obs:
        raise ValueError(f"`obsm[{features_key!r}]` must be (n_obs, D), got shape {np.shape(feats)}.")
    prov = dict(feature_provenance(table, features_key) or {})
    backbone = str(prov.get("backbone", "unknown"))
    sha = str(prov.get("weights_sha256", "unknown"))
    genes = panel_genes(table, panel)
    labels = np.asarray(section_labels(table)).astype(str)
    names = list(dict.fromkeys(labels)) if sections is None else [str(s) for s in sections]
    absent = [s for s in names if s not in set(labels)]
    if absent:
        raise KeyError(f"`sections` not in the table: {absent[:5]}.")
    for s in names:
        _check_section_name(s)
    # check everything that can fail before the first write
    rows = {s: np.flatnonzero(labels == s) for s in names}
    for s, r in rows.items():
        if not np.isfinite(np.asarray(feats[r], dtype=np.float32)).all():
            raise ValueError(f"`obsm[{features_key!r}]` has non-finite rows in section {s!r}; compute features "
                             "for every spot first.")
    path = Path(path)
    store = FeatureStore.create(path, genes=genes, dim=feats.shape[1], backbone=backbone, weights_sha256=sha,
                                features_key=features_key, gene_input=gene_input, dtype=dtype,
                                chunk_rows=chunk_rows, exist_ok=True)
    clash = [s for s in names if s in store]
    if clash and not overwrite:
        raise FileExistsError(f"sections {clash[:5]} are already in the store; pass overwrite=True to replace them.")
    norm = {"gene_input": gene_input, "counts": counts_layer or "X", "n_genes": len(genes)}
    for s in names:
        sub = table[rows[s]]
        expr, _ = panel_expression(sub, genes, gene_input=gene_input, counts_layer=counts_layer)
        store.write_section(s, np.asarray(feats[rows[s]], dtype=np.float32), expr, sub.obs_names, overwrite=overwrite,
                            provenance={"features": {**prov, "obsm_key": features_key}, "expression": norm})
    log_info("wrote %d sections (%d genes, features %r) to the feature store %s", len(names), len(genes),
             features_key, str(path))
    return store
