"""Patches around spots, defined physically (um and um/px) and served lazily.

A patch is the square of side ``patch_size_um`` micrometres centred on a spot, resampled to
``patch_px`` pixels (so its resolution is ``patch_size_um / patch_px`` um/px). It is read from
the coarsest pyramid level that is at least as fine as that resolution; pixels outside the
image take the value ``fill`` (255, slide-glass white, by default). ``patch_px`` alone (no
``patch_size_um``) asks for native-pixel crops of the finest level, as mclSTExp uses.

:class:`Patches` holds, per section, one pyramid level as a numpy array (or, when the level is
larger than ``settings.memory_budget_bytes``, the lazy dask array, read window by window) and
the spot centres in that level's pixels. It is a map-style dataset: ``patches[i]`` is the
``(patch_px, patch_px, 3)`` uint8 patch of table row ``i``; a torch DataLoader can iterate it
directly, with workers (numpy levels are shared copy-on-write; dask reads use the synchronous
scheduler inside workers, which avoids the fork deadlock of threaded dask).

Memory bound, whatever the slide's size: a section's level of at most
``settings.memory_budget_bytes`` is held in memory (one copy, filled block by block, and only in
the storage blocks that some patch touches: a slide's glass is never read); a larger one is
never loaded: each patch reads its window (plus the storage chunks it touches, while they are
decoded). So patch reading holds at most ``settings.memory_budget_bytes`` of image per section
kept in memory plus one window and its chunks, independent of the slide's side. For zarr-backed
images windows come straight from the zarr array (no dask graph work per patch, which would grow
with the number of chunks): write big in-memory SpatialData objects to zarr and read them back.
``benchmarks/bench_big_slide.py`` measures peak RSS and patches/s on 10,000 and 40,000 px slides.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._settings import settings
from sq_spade._utils import progress
from sq_spade._validation import check_positive, get_table, is_spatialdata
from sq_spade.io._sections import (
    affine_to,
    get_sections,
    image_levels,
    microns_per_pixel,
    spot_centers_um,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

DEFAULT_PATCH_UM = 112.0
DEFAULT_MPP = 0.5
DEFAULT_FILL = 255
#: A pixel is tissue when its channels spread by at least this much (glass and masked
#: backgrounds are grey, white or black; H&E stains are saturated).
TISSUE_CHROMA = 15


@dataclass
class PatchGeometry:
    """How patches are cut; stored in ``uns['sq_spade_patches']`` by :func:`extract_patches`."""

    patch_size_um: float
    mpp: float
    patch_px: int
    fill: int = DEFAULT_FILL
    mode: str = "physical"  # or "native"
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_geometry(patch_size_um: float | None, mpp: float | None, patch_px: int | None) -> tuple[str, float | None, float | None, int | None]:
    if patch_px is not None:
        check_positive(patch_px, "patch_px", integer=True)
    if patch_size_um is not None:
        check_positive(patch_size_um, "patch_size_um")
    if mpp is not None:
        check_positive(mpp, "mpp")
    if patch_px is not None and patch_size_um is None and mpp is None:
        return "native", None, None, int(patch_px)
    if patch_size_um is None and mpp is None:
        patch_size_um, mpp = DEFAULT_PATCH_UM, DEFAULT_MPP
    if patch_size_um is None:
        if patch_px is None:
            raise ValueError("Give `patch_size_um` with `mpp`, or `patch_px` with one of them.")
        patch_size_um = patch_px * mpp
    if mpp is None:
        mpp = patch_size_um / patch_px if patch_px is not None else DEFAULT_MPP
    out = int(round(patch_size_um / mpp)) if patch_px is None else int(patch_px)
    if patch_px is not None and not math.isclose(patch_px * mpp, patch_size_um, rel_tol=1e-3):
        raise ValueError(f"`patch_px * mpp` ({patch_px} * {mpp}) must equal `patch_size_um` ({patch_size_um}).")
    return "physical", float(patch_size_um), float(mpp), out


class _Level:
    """One pyramid level of one image: (c, y, x) numpy (``in_memory``) or lazy dask array.

    A lazy level is read window by window: straight from its stored array (zarr, TIFF) when it
    is a plain ``from_zarr``/``from_array`` dask array, so only the chunks a window touches are
    decoded and no dask graph work (which grows with the number of chunks) is done per patch;
    through a synchronous dask compute otherwise.
    """

    def __init__(self, data: Any, in_memory: bool):
        self.data = data
        self.in_memory = in_memory
        self.height, self.width = int(data.shape[1]), int(data.shape[2])
        self.nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
        self._source = None if in_memory else _source_array(data)
        # a level loaded only where patches fall (see `resolved`): the lazy array, and which of
        # its storage blocks (row bounds, column bounds) hold pixels in `data`
        self._lazy: Any = None
        self._loaded: np.ndarray | None = None
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None

    def resolved(self, memory_budget_bytes: int, windows: np.ndarray | None = None) -> _Level:
        """The level held in memory when it fits ``memory_budget_bytes``, else as it is (windowed).

        With ``windows`` (``(n, 4)`` boxes ``y0, y1, x0, x1`` in this level's pixels: the windows
        the patches will read), only the storage blocks that some window touches are read, so a
        slide's glass, which tiles and spots leave out, is never decoded; the other pixels stay
        unallocated (zero pages) and a window reaching them is read from storage.
        """
        if self.in_memory or self.nbytes > memory_budget_bytes:
            return self
        bounds = _block_bounds(self.data)
        if windows is None or bounds is None:
            return _Level(_materialise(self.data), True)
        ys, xs = bounds
        needed = _blocks_touched(np.asarray(windows, np.int64).reshape(-1, 4), ys, xs)
        out = _Level(np.zeros(self.data.shape, self.data.dtype), True)  # calloc: untouched pages cost nothing
        for r in np.flatnonzero(needed.any(axis=1)):
            cols = np.flatnonzero(needed[r])
            # runs of consecutive blocks of this block row: one read each (zarr decodes its chunks in one call)
            for run in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1):
                y0, y1, x0, x1 = int(ys[r]), int(ys[r + 1]), int(xs[run[0]]), int(xs[run[-1] + 1])
                out.data[:, y0:y1, x0:x1] = self._fetch(y0, y1, x0, x1)
        out._lazy, out._loaded, out._bounds = self, needed, (ys, xs)
        return out

    def _covered(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether an in-bounds region lies in loaded blocks (always, for a level loaded whole)."""
        if self._loaded is None or self._bounds is None:
            return True
        ys, xs = self._bounds
        r0, r1 = np.searchsorted(ys, y0, "right") - 1, np.searchsorted(ys, y1 - 1, "right") - 1
        c0, c1 = np.searchsorted(xs, x0, "right") - 1, np.searchsorted(xs, x1 - 1, "right") - 1
        return bool(self._loaded[r0: r1 + 1, c0: c1 + 1].all())

    def _fetch(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(c, h, w) pixels of an in-bounds region of a lazy level, read from storage."""
        return _read_array(self.data, (slice(None), slice(y0, y1), slice(x0, x1)), self._source)

    def read(self, y0: int, y1: int, x0: int, x1: int, fill: int) -> np.ndarray:
        """Window [y0, y1) x [x0, x1) as (h, w, 3) uint8, padded with ``fill`` outside the level."""
        h, w = y1 - y0, x1 - x0
        cy0, cy1 = max(y0, 0), min(y1, self.height)
        cx0, cx1 = max(x0, 0), min(x1, self.width)
        if cy0 >= cy1 or cx0 >= cx1:
            return np.full((h, w, 3), fill, np.uint8)
        if not self.in_memory:
            win = self._fetch(cy0, cy1, cx0, cx1)
        elif self._lazy is not None and not self._covered(cy0, cy1, cx0, cx1):
            win = self._lazy._fetch(cy0, cy1, cx0, cx1)  # outside the blocks loaded for the patches
        else:
            win = self.data[:, cy0:cy1, cx0:cx1]
        win = np.moveaxis(np.asarray(win), 0, -1)
        if (cy0, cy1, cx0, cx1) == (y0, y1, x0, x1):
            return np.ascontiguousarray(win)
        out = np.full((h, w, 3), fill, np.uint8)
        out[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0] = win
        return out


class Patches:
    """Patches of every table row, served on demand (a map-style, torch-compatible dataset).

    Build it with :func:`sq_spade.pp.extract_patches` or :func:`sq_spade.pp.patches`.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> p = sqs.pp.patches(sd, patch_size_um=32, microns_per_pixel=1.0)
    >>> p[0].shape
    (32, 32, 3)
    """

    def __init__(self, levels: list[_Level], level_of_row: np.ndarray, centers: np.ndarray,
                 windows: np.ndarray, patch_px: int, fill: int, geometry: PatchGeometry, obs_names: Sequence[str],
                 rows: np.ndarray):
        self._levels = levels
        self._level_of_row = level_of_row
        self._centers = centers  # (n, 2) x, y in continuous level pixels
        self._windows = windows  # (n,) window side in level pixels
        self.patch_px = patch_px
        self.fill = fill
        self.geometry = geometry
        self.obs_names = np.asarray(obs_names)
        #: table row (integer position) of each patch
        self.rows = np.asarray(rows)

    def __len__(self) -> int:
        return len(self._level_of_row)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"patch index {i} out of range for {len(self)} patches")
        i = int(i) % len(self)
        level = self._levels[self._level_of_row[i]]
        cx, cy = self._centers[i]
        w = self._windows[i]
        out = self.patch_px
        if abs(w - out) < 1e-6:
            # native resolution: exact pixels, no resampling
            x0 = int(math.floor(cx - out / 2 + 0.5))
            y0 = int(math.floor(cy - out / 2 + 0.5))
            return level.read(y0, y0 + out, x0, x0 + out, self.fill)
        from PIL import Image

        bx0, by0 = cx - w / 2, cy - w / 2
        ix0, iy0 = int(math.floor(bx0)) - 1, int(math.floor(by0)) - 1
        ix1, iy1 = int(math.ceil(bx0 + w)) + 1, int(math.ceil(by0 + w)) + 1
        win = level.read(iy0, iy1, ix0, ix1, self.fill)
        box = (bx0 - ix0, by0 - iy0, bx0 - ix0 + w, by0 - iy0 + w)
        return np.array(Image.fromarray(win).resize((out, out), Image.BILINEAR, box=box))

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """Stack the patches of ``indices`` into ``(B, patch_px, patch_px, 3)`` uint8."""
        out = np.empty((len(indices), self.patch_px, self.patch_px, 3), np.uint8)
        for j, i in enumerate(indices):
            out[j] = self[i]
        return out

    def iter_batches(self, batch_size: int = 64, indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 batches (in table order unless ``indices`` is given)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        for s in range(0, len(idx), batch_size):
            yield self.batch(idx[s: s + batch_size])

    def resolved(self, memory_budget_bytes: int | None = None) -> Patches:
        """These patches with every lazy level loaded when it fits ``memory_budget_bytes``.

        Levels larger than the budget (default ``settings.memory_budget_bytes``) stay lazy and
        are read window by window.
        """
        budget = settings.memory_budget_bytes if memory_budget_bytes is None else int(memory_budget_bytes)
        boxes = _window_boxes(self._centers, self._windows)
        levels = [lv.resolved(budget, boxes[self._level_of_row == j]) for j, lv in enumerate(self._levels)]
        return Patches(levels, self._level_of_row, self._centers, self._windows, self.patch_px, self.fill,
                       self.geometry, self.obs_names, self.rows)

    def by_section(self) -> list[Patches]:
        """One :class:`Patches` per section (per image level), in the order of the sections.

        Each holds only its own level (lazy levels stay lazy), so it pickles small when its
        image is zarr-backed: the unit of work of :func:`~sq_spade.pp.compute_features` with
        ``parallel="dask"``.
        """
        names = list(self.geometry.sections)
        out = []
        for j, lv in enumerate(self._levels):
            sel = np.flatnonzero(self._level_of_row == j)
            geometry = PatchGeometry(**{**self.geometry.to_dict(), "sections": {}})
            if j < len(names):
                geometry.sections[names[j]] = dict(self.geometry.sections[names[j]])
            out.append(Patches([lv], np.zeros(len(sel), np.int64), self._centers[sel], self._windows[sel],
                               self.patch_px, self.fill, geometry, self.obs_names[sel], self.rows[sel]))
        return out

    def padded_fraction(self) -> np.ndarray:
        """Fraction of each patch's window that lies outside its image."""
        out = np.empty(len(self))
        for i in range(len(self)):
            level = self._levels[self._level_of_row[i]]
            cx, cy = self._centers[i]
            w = self._windows[i]
            ox = max(0.0, min(cx + w / 2, level.width) - max(cx - w / 2, 0.0))
            oy = max(0.0, min(cy + w / 2, level.height) - max(cy - w / 2, 0.0))
            out[i] = 1.0 - ox * oy / (w * w)
        return out


def _materialise(arr: Any) -> np.ndarray:
    """Load a level into one preallocated array: chunk by chunk, never two copies at once."""
    if isinstance(arr, np.ndarray):
        return arr
    import dask.array as da
    from dask.local import get_sync

    out = np.empty(arr.shape, dtype=arr.dtype)
    # synchronous: threads would keep several source blocks alive at once and raise the peak
    da.store(arr, out, lock=False, scheduler=get_sync)
    return out


def _read_array(arr: Any, index: tuple[slice, ...], source: Any = None) -> np.ndarray:
    """``arr[index]`` as a numpy array: from the stored array under a plain dask array, else a synchronous compute.

    ``source`` is ``_source_array(arr)`` when already known. The synchronous scheduler is passed
    as a function: named by a string (even ``"synchronous"``), dask's first compute in a process
    imports ``distributed`` to look for a client (half a second).
    """
    if isinstance(arr, np.ndarray):
        return arr[index]
    src = _source_array(arr) if source is None else source
    if src is not None:
        return np.asarray(src[index])
    from dask.local import get_sync

    return np.asarray(arr[index].compute(scheduler=get_sync))


def _window_boxes(centers: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """``(n, 4)`` int64 boxes ``y0, y1, x0, x1`` holding every pixel that :meth:`Patches.__getitem__` reads."""
    half = np.asarray(windows, float) / 2
    cx, cy = np.asarray(centers, float).reshape(-1, 2).T
    return np.column_stack([np.floor(cy - half) - 1, np.ceil(cy + half) + 1,
                            np.floor(cx - half) - 1, np.ceil(cx + half) + 1]).astype(np.int64)


def _block_bounds(arr: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column bounds of a lazy ``(c, y, x)`` array's storage blocks (``None`` when unknown)."""
    chunks = getattr(arr, "chunks", None)
    if not isinstance(chunks, tuple) or len(chunks) != 3:
        return None
    return (np.concatenate([[0], np.cumsum(chunks[1])]).astype(np.int64),
            np.concatenate([[0], np.cumsum(chunks[2])]).astype(np.int64))


def _blocks_touched(boxes: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean grid of the blocks (bounds ``ys``, ``xs``) that boxes ``y0, y1, x0, x1`` overlap (clipped)."""
    ny, nx = len(ys) - 1, len(xs) - 1
    h, w = int(ys[-1]), int(xs[-1])
    y0, y1 = np.clip(boxes[:, 0], 0, h), np.clip(boxes[:, 1], 0, h)
    x0, x1 = np.clip(boxes[:, 2], 0, w), np.clip(boxes[:, 3], 0, w)
    ok = (y1 > y0) & (x1 > x0)  # boxes wholly outside the level read only fill
    r0, r1 = np.searchsorted(ys, y0[ok], "right") - 1, np.searchsorted(ys, y1[ok] - 1, "right") - 1
    c0, c1 = np.searchsorted(xs, x0[ok], "right") - 1, np.searchsorted(xs, x1[ok] - 1, "right") - 1
    # 2-d difference array: +1 / -1 at each box's corners, summed up = boxes over each block
    diff = np.zeros((ny + 1, nx + 1), np.int64)
    np.add.at(diff, (r0, c0), 1)
    np.add.at(diff, (r0, c1 + 1), -1)
    np.add.at(diff, (r1 + 1, c0), -1)
    np.add.at(diff, (r1 + 1, c1 + 1), 1)
    return diff.cumsum(0).cumsum(1)[:ny, :nx] > 0


def _source_array(arr: Any) -> Any:
    """The stored array under a plain ``da.from_zarr`` / ``da.from_array`` dask array, else ``None``.

    Slicing it directly (zarr decodes only the chunks a window touches) avoids dask's per-call
    graph work, which grows with the number of chunks, i.e. with the slide.
    """
    graph = getattr(arr, "dask", None)
    layers = getattr(graph, "layers", None)
    if layers is None or len(layers) != 2:
        return None
    originals = [layer for name, layer in layers.items() if str(name).startswith("original-")]
    if len(originals) != 1 or len(originals[0]) != 1:
        return None
    src = next(iter(originals[0].values()))
    ok = (hasattr(src, "__getitem__") and tuple(getattr(src, "shape", ())) == tuple(arr.shape)
          and np.dtype(getattr(src, "dtype", None) or "V") == arr.dtype)
    return src if ok else None


def tissue_fraction(patch: np.ndarray) -> float:
    """Fraction of a patch's pixels that look stained (channel spread >= ``TISSUE_CHROMA``)."""
    p = patch.astype(np.int16)
    chroma = p.max(-1) - p.min(-1)
    return float((chroma >= TISSUE_CHROMA).mean())


def _image_levels_checked(sdata: SpatialData, image_key: str) -> list[Any]:
    levels = image_levels(sdata.images[image_key])
    lv0 = levels[0]
    c = lv0.sizes.get("c", 0)
    if c != 3:
        kind = {1: "grayscale", 4: "RGBA"}.get(c, f"{c}-channel")
        raise ValueError(f"`image_key={image_key!r}` is a {kind} image; patches need 8-bit RGB (3 channels).")
    if lv0.dtype != np.uint8:
        raise ValueError(f"`image_key={image_key!r}` has dtype {lv0.dtype}; patches need 8-bit RGB (uint8). "
                         "Rescale it to 0..255 first.")
    return levels


@renamed_arguments(mpp="microns_per_pixel")
def patches(
    sdata: SpatialData,
    *,
    table_key: str = K.TABLES.DEFAULT,
    image_key: str | None = None,
    shapes_key: str | None = None,
    patch_size_um: float | None = None,
    microns_per_pixel: float | None = None,
    patch_px: int | None = None,
    fill: int = DEFAULT_FILL,
    level: int | None = None,
) -> Patches:
    """Build the lazy patch source of every table row without writing anything.

    Parameters are those of :func:`extract_patches`; with none of ``patch_size_um``, ``microns_per_pixel``
    and ``patch_px`` the geometry recorded by the last :func:`extract_patches` call is reused,
    or else SPADE's default (112 um at 0.5 um/px, 224 px).
    """
    return _build_patches(sdata, table_key=table_key, image_key=image_key, shapes_key=shapes_key,
                          patch_size_um=patch_size_um, mpp=microns_per_pixel, patch_px=patch_px, fill=fill, level=level,
                          load=True)


def _build_patches(sdata: SpatialData, *, table_key: str, image_key: str | None, shapes_key: str | None,
                   patch_size_um: float | None, mpp: float | None, patch_px: int | None, fill: int,
                   level: int | None, load: bool) -> Patches:
    """:func:`patches`; ``load=False`` leaves every level lazy (see :meth:`Patches.resolved`)."""
    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image, got {type(sdata).__name__}.")

    table = get_table(sdata, table_key)
    if patch_size_um is None and mpp is None and patch_px is None and K.UNS.PATCHES in table.uns:
        g = table.uns[K.UNS.PATCHES]
        if g.get("mode") == "native":
            patch_px = int(g["patch_px"])
        else:
            patch_size_um, mpp, patch_px = float(g["patch_size_um"]), float(g["mpp"]), int(g["patch_px"])
        fill = int(g.get("fill", fill))
    mode, size_um, target_mpp, out = _resolve_geometry(patch_size_um, mpp, patch_px)
    if not (isinstance(fill, (int, np.integer)) and 0 <= fill <= 255):
        raise ValueError(f"`fill` must be an integer in 0..255, got {fill!r}.")
    # a batch of 64 patches (3 x out x out bytes each) must fit the memory budget (at least 1 GiB:
    # the budget bounds resident image levels, and may be set tiny to force window reads)
    budget = max(int(settings.memory_budget_bytes), 2**30)
    if 3 * out * out * 64 > budget:
        arg = "patch_px" if patch_px is not None else "patch_size_um"
        raise ValueError(f"`{arg}` gives patches of {out} x {out} px ({3 * out * out / 2**20:.3g} MiB each); a batch "
                         f"of 64 exceeds the memory budget ({budget / 2**30:.3g} GiB, "
                         f"sqs.settings.memory_budget_bytes). Patches are a few hundred um: check the units "
                         f"(`patch_size_um` is in micrometres, `mpp` in um per pixel).")
    if level is not None:
        check_positive(level, "level", integer=True, allow_zero=True)
    sections = get_sections(sdata, table_key=table_key, image_key=image_key, shapes_key=shapes_key)
    n = table.n_obs
    level_of_row = np.full(n, -1, np.int64)
    centers = np.zeros((n, 2))
    windows = np.zeros(n)
    levels: list[_Level] = []
    geometry = PatchGeometry(patch_size_um=size_um or float("nan"), mpp=target_mpp or float("nan"),
                             patch_px=out, fill=int(fill), mode=mode)
    upsampled: dict[str, float] = {}  # section -> finest um/px, when coarser than the patches'
    for sec in sections:
        if sec.image_key is None:
            raise ValueError(f"Section {sec.section!r} has no image with a transformation to {sec.coordinate_system!r}; "
                             "pass `image_key`.")
        arrays = _image_levels_checked(sdata, sec.image_key)
        img_aff = affine_to(sdata.images[sec.image_key], sec.coordinate_system)
        mpp0 = microns_per_pixel(img_aff, what=f"image {sec.image_key!r}")
        w0 = arrays[0].sizes["x"]
        level_mpps = [mpp0 * w0 / a.sizes["x"] for a in arrays]
        if mode == "native":
            chosen, sec_mpp, sec_size = 0, level_mpps[0], out * level_mpps[0]
        else:
            sec_mpp, sec_size = target_mpp, size_um
            ok = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + 1e-3)]
            chosen = max(ok) if ok else 0
            if not ok:
                upsampled[sec.section] = level_mpps[0]
        if level is not None:
            if level >= len(arrays):
                raise ValueError(f"`level={level}` but image {sec.image_key!r} has {len(arrays)} levels.")
            chosen = level
        data = arrays[chosen].data
        lmpp = level_mpps[chosen]
        side_um = max(int(arrays[0].sizes["x"]), int(arrays[0].sizes["y"])) * level_mpps[0]
        if sec_size > side_um:
            raise ValueError(f"`patch_size_um` ({sec_size:g} um) exceeds image {sec.image_key!r} of section "
                             f"{sec.section!r} ({side_um:.6g} um across): a patch must fit in the image "
                             f"(`patch_size_um` is in micrometres).")
        xy_um, _ = spot_centers_um(sdata, sec, table_key=table_key)
        inv = np.linalg.inv(img_aff)
        xy0 = xy_um @ inv[:2, :2].T + inv[:2, 2]  # level-0 pixels (continuous)
        factor = level_mpps[chosen] / level_mpps[0]
        level_of_row[sec.rows] = len(levels)
        centers[sec.rows] = xy0 / factor
        windows[sec.rows] = sec_size / lmpp
        lazy = _Level(data, isinstance(data, np.ndarray))
        # loaded where this section's patches fall only (a slide's glass is never read)
        levels.append(lazy.resolved(settings.memory_budget_bytes, _window_boxes(centers[sec.rows], windows[sec.rows]))
                      if load else lazy)
        geometry.sections[sec.section] = {
            "image_key": sec.image_key, "shapes_key": sec.shapes_key, "level": int(chosen),
            "level_microns_per_pixel": float(lmpp), "patch_microns_per_pixel": float(sec_mpp) if mode == "physical" else float(lmpp),
            "patch_size_um": float(sec_size), "upsampled": bool(lmpp > sec_size / out * (1 + 1e-3)),
        }
    if upsampled:
        _warn_upsampled(upsampled, float(target_mpp))
    rows = np.flatnonzero(level_of_row >= 0)
    return Patches(levels, level_of_row[rows], centers[rows], windows[rows], out, int(fill), geometry,
                   table.obs_names[rows], rows)


def _warn_upsampled(upsampled: dict[str, float], target_mpp: float) -> None:
    """One warning for the sections whose finest image is coarser than the patches: does it matter, what to do."""
    factor = max(upsampled.values()) / target_mpp
    names = ", ".join(f"{s!r} ({m:.3g} um/px)" for s, m in upsampled.items())
    coarsest = max(upsampled.values())
    if factor <= 2:
        matters = (f"At {factor:.2g}x this matters little when the training and query sections are upsampled "
                   "alike (her2st's 0.69 um/px sections are); it costs accuracy when only some sections are.")
    else:
        matters = (f"At {factor:.2g}x the patches are much blurrier than images at {target_mpp:g} um/px, which "
                   "costs accuracy when the model is trained or compared on sharper sections.")
    warnings.warn(f"Section(s) {names}: the finest image is coarser than the requested {target_mpp:g} um/px, so "
                  f"patches are upsampled. {matters} To avoid it, cut every section's patches at the coarsest "
                  f"resolution with `microns_per_pixel={coarsest:.3g}` (in compute_features / extract_patches, for "
                  "training and query alike), or read a finer image.", UserWarning, stacklevel=4)


@renamed_arguments(mpp="microns_per_pixel")
def extract_patches(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    patch_size_um: float | None = None,
    microns_per_pixel: float | None = None,
    patch_px: int | None = None,
    fill: int = DEFAULT_FILL,
    level: int | None = None,
    tissue: bool = True,
) -> Patches:
    """Define the patch around every spot, record its geometry, and return the lazy patches.

    Parameters
    ----------
    sdata
        A SpatialData from :mod:`sq_spade.io` (one or several sections).
    image_key
        Image to cut from; by default each section's finest image.
    shapes_key
        Restrict to one section's spots (default: every region of the table).
    table_key
        The table whose rows are the spots.
    patch_size_um
        Side of the patch in micrometres (default 112 um, SPADE's and HEST's).
    microns_per_pixel
        Resolution of the patch in um/px (default 0.5, so 224 px).
    patch_px
        Side in pixels. Alone, it asks for native-pixel crops of the finest level (mclSTExp:
        ``patch_px=224``).
    fill
        Value of pixels outside the image (255: white, like bare glass).
    level
        Force a pyramid level (testing and debugging); by default the coarsest level at
        least as fine as ``microns_per_pixel``.
    tissue
        Read every patch once to record ``obs['patch_tissue_fraction']`` (the share of
        stained pixels).

    Returns
    -------
    :class:`Patches`, a map-style dataset of ``(patch_px, patch_px, 3)`` uint8 patches in
    table row order. The table gains ``obs['patch_tissue_fraction']``,
    ``obs['patch_padded_fraction']`` and ``uns['sq_spade_patches']`` (the geometry, per
    section the image, level and um/px). Nothing is written if an error is raised.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> p = sqs.pp.extract_patches(sd, patch_size_um=32, microns_per_pixel=1.0)
    >>> len(p), p[0].shape
    (64, (32, 32, 3))
    >>> float(sd.tables["table"].obs["patch_tissue_fraction"].min()) > 0.5
    True
    """
    p = patches(sdata, table_key=table_key, image_key=image_key, shapes_key=shapes_key,
                patch_size_um=patch_size_um, microns_per_pixel=microns_per_pixel, patch_px=patch_px, fill=fill, level=level)
    padded = p.padded_fraction()
    tissue_frac = None
    if tissue:
        tissue_frac = np.array([tissue_fraction(p[i]) for i in progress(range(len(p)), total=len(p), desc="patches")])
    table = get_table(sdata, table_key)
    for key, values in ((K.OBS.PATCH_TISSUE, tissue_frac), (K.OBS.PATCH_PADDED, padded)):
        if values is not None:
            col = np.full(table.n_obs, np.nan)
            col[p.rows] = values
            table.obs[key] = col
    table.uns[K.UNS.PATCHES] = p.geometry.to_dict()
    return p
