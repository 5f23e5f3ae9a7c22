"""Pixel space: one chunk's polygons (:class:`Pieces`), their persistence, and the seam merge.

1. :func:`chunk_components` / :func:`polygonize_chunk` — inside a chunk task: threshold, label
   (4-connectivity), compute exact per-piece statistics and polygonize, batch by batch. Geometry
   stays in **global pixel coordinates** (x = column, y = row) so every vertex is an exact
   integer; nothing about the map (CRS, rotation) is needed yet.
2. :func:`write_pieces` / :func:`read_pieces` — persist one chunk's result atomically, so a crashed
   or retried run can resume without recomputing finished chunks.
3. :func:`merge_seams` — join the pieces that a chunk border cut apart. Because coordinates are
   integers, the seam test and the union are exact, and the result does not depend on how the
   raster was chunked.

Map space (CRS, areas, simplification, reprojection) is :mod:`geoseg.polygons`' business. The
intermediate representation is :class:`Pieces`: flat numpy arrays plus a shapely geometry array,
which pickles (for Dask) and saves (for resume) as a few contiguous buffers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio import features as _features
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely import GeometryType

from .atomic import atomic_target
from .config import check_thresholds
from .errors import ConfigError

__all__ = ["Pieces", "Components", "chunk_components", "polygonize_chunk", "write_pieces", "read_pieces",
           "merge_seams", "components", "prompt_thresholds"]

_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# The piece container
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pieces:
    """Polygons of thresholded probability, one row per connected piece, in global pixel coordinates.

    Columns are parallel 1-D arrays (a struct of arrays rather than a list of objects) so that a
    chunk's result pickles to Dask and saves to disk as a handful of buffers, and stats can be
    combined with vectorized numpy.

    Attributes:
        prompt_index: int32, index of the prompt the piece belongs to.
        geometry: object array of shapely ``Polygon``; x = column, y = row of the full raster, pixel
            corners at integer coordinates (so ``area`` is the pixel count).
        n_px: int64, number of mask pixels in the piece.
        sum_p: float64, sum of the probabilities of those pixels (``sum_p / n_px`` is the mean).
        max_p: float32, highest probability in the piece.
    """

    prompt_index: np.ndarray
    geometry: np.ndarray
    n_px: np.ndarray
    sum_p: np.ndarray
    max_p: np.ndarray

    def __post_init__(self) -> None:
        self.prompt_index = np.asarray(self.prompt_index, dtype=np.int32).reshape(-1)
        geoms = np.empty(len(self.geometry), dtype=object)
        geoms[:] = list(self.geometry)
        self.geometry = geoms
        self.n_px = np.asarray(self.n_px, dtype=np.int64).reshape(-1)
        self.sum_p = np.asarray(self.sum_p, dtype=np.float64).reshape(-1)
        self.max_p = np.asarray(self.max_p, dtype=np.float32).reshape(-1)
        n = len(self.prompt_index)
        if not all(len(a) == n for a in (self.geometry, self.n_px, self.sum_p, self.max_p)):
            raise ValueError("Pieces columns must all have the same length")

    def __len__(self) -> int:
        return len(self.prompt_index)

    def take(self, sel: np.ndarray | slice) -> Pieces:
        """The pieces ``sel`` (indices, a mask or a slice) selects, in that order."""
        return Pieces(self.prompt_index[sel], self.geometry[sel], self.n_px[sel], self.sum_p[sel], self.max_p[sel])

    @classmethod
    def empty(cls) -> Pieces:
        """A Pieces with no rows (a chunk with nothing above threshold)."""
        return cls(np.empty(0, np.int32), np.empty(0, object), np.empty(0, np.int64),
                   np.empty(0, np.float64), np.empty(0, np.float32))

    @classmethod
    def concat(cls, items: Iterable[Pieces]) -> Pieces:
        """Stack several Pieces (e.g. every chunk's) into one, keeping order."""
        items = [p for p in items if p is not None]
        if not items:
            return cls.empty()
        return cls(
            np.concatenate([p.prompt_index for p in items]),
            np.concatenate([p.geometry for p in items]),
            np.concatenate([p.n_px for p in items]),
            np.concatenate([p.sum_p for p in items]),
            np.concatenate([p.max_p for p in items]),
        )

    # Pickle as flat arrays (coordinates + offsets) instead of one WKB blob per polygon: much smaller
    # pickles and far fewer Python objects when Dask moves a chunk's result between processes.
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The pieces as a dict of plain numpy arrays (the on-disk and pickle layout)."""
        out = {
            "version": np.array(_FORMAT_VERSION, np.int32),
            "prompt_index": self.prompt_index,
            "n_px": self.n_px,
            "sum_p": self.sum_p,
            "max_p": self.max_p,
        }
        out.update(_encode_geometry(self.geometry))
        return out

    @classmethod
    def from_arrays(cls, arrays: Any) -> Pieces:
        """Inverse of :meth:`to_arrays` (accepts a dict or an ``np.load`` result)."""
        version = int(arrays["version"])
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported pieces format version {version}")
        return cls(arrays["prompt_index"], _decode_geometry(arrays), arrays["n_px"],
                   arrays["sum_p"], arrays["max_p"])

    def __getstate__(self) -> dict[str, np.ndarray]:
        return self.to_arrays()

    def __setstate__(self, state: dict[str, np.ndarray]) -> None:
        other = Pieces.from_arrays(state)
        self.__dict__.update(other.__dict__)


def _encode_geometry(geoms: np.ndarray) -> dict[str, np.ndarray]:
    """Geometry array → coordinates + offsets (shapely's ragged layout).

    Pixel coordinates are integers, so they are stored as int32 when they fit (half the bytes of
    float64, still exact); anything else falls back to float64.
    """
    if len(geoms) == 0:
        return {"geom_type": np.array(-1, np.int8)}
    types = shapely.get_type_id(geoms)
    if np.all(types == GeometryType.POLYGON):
        gtype, (coords, offsets) = GeometryType.POLYGON, shapely.to_ragged_array(geoms)[1:]
    else:  # never produced by this module, but keep arbitrary (multi)polygons round-tripping
        gtype, coords, offsets = shapely.to_ragged_array(geoms)
    if coords.size and np.array_equal(coords, np.round(coords)) and np.abs(coords).max() < 2**31 - 1:
        coords = coords.astype(np.int32)
    out = {"geom_type": np.array(int(gtype), np.int8), "coords": coords}
    for i, off in enumerate(offsets):
        out[f"offsets{i}"] = off.astype(np.int64)
    return out


def _decode_geometry(arrays: Any) -> np.ndarray:
    gtype = int(arrays["geom_type"])
    if gtype < 0:
        return np.empty(0, dtype=object)
    offsets = []
    i = 0
    while f"offsets{i}" in arrays:
        offsets.append(np.asarray(arrays[f"offsets{i}"]))
        i += 1
    coords = np.asarray(arrays["coords"], dtype=np.float64)
    return shapely.from_ragged_array(GeometryType(gtype), coords, tuple(offsets))


# --------------------------------------------------------------------------------------------------
# Stage 1: polygonize one chunk
# --------------------------------------------------------------------------------------------------


def prompt_thresholds(thresholds: Sequence[float], n_prompts: int) -> np.ndarray:
    """One threshold per prompt as float64, each in the range :func:`geoseg.config.check_thresholds` owns."""
    t = np.asarray(check_thresholds(tuple(np.asarray(thresholds, dtype=np.float64).reshape(-1))), np.float64)
    if len(t) != n_prompts:
        raise ConfigError(f"got {len(t)} thresholds for {n_prompts} prompts; give one per prompt")
    return t


#: 4-connectivity (edge neighbours), the rule of every piece and of the seam merge.
FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _shapes_to_polygons(shapes: list[dict]) -> np.ndarray:
    """GeoJSON-like polygons from ``rasterio.features.shapes`` → shapely array in one vectorized call.

    Going through flat coordinate arrays is several times faster than ``shapely.geometry.shape``
    per polygon when a chunk has thousands of pieces.
    """
    ring_lens: list[int] = []
    n_rings: list[int] = []
    flat: list = []
    for geom in shapes:
        rings = geom["coordinates"]
        n_rings.append(len(rings))
        for ring in rings:
            ring_lens.append(len(ring))
            flat.extend(ring)
    # fromiter over the flattened (x, y) tuples: 2-3x faster than np.array on a list of tuples
    coords = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.float64, count=2 * len(flat)).reshape(-1, 2)
    ring_off = np.zeros(len(ring_lens) + 1, np.int64)
    np.cumsum(ring_lens, out=ring_off[1:])
    geom_off = np.zeros(len(n_rings) + 1, np.int64)
    np.cumsum(n_rings, out=geom_off[1:])
    return shapely.from_ragged_array(GeometryType.POLYGON, coords, (ring_off, geom_off))


#: Components polygonized at a time. ``rasterio.features.shapes`` builds every polygon of its input
#: in an in-memory OGR layer before yielding the first (~1 KB each) and the GeoJSON dicts cost as
#: much again, so a speckle chunk of 1 M components polygonized at once peaked at 1.8 GB; in
#: batches the peak follows the batch.
_SHAPES_BATCH = 20_000
#: Rows of a chunk whose component statistics are gathered at a time.
_STATS_ROWS = 512


@dataclass(frozen=True)
class Components:
    """One prompt's 4-connected components in a chunk: the label image and exact statistics per
    component, with the polygons made on demand, batch by batch.

    Everything the streaming rules decide on (bounding boxes, pixel counts, the canonical order)
    is known from the labels alone, so a chunk task never needs all of its polygons at once: a
    chunk of a million objects holds its labels (4 bytes a pixel) and one batch of polygons, not a
    gigabyte of shapely objects.
    """

    prompt: int
    labels: np.ndarray  # (h, w) int32: component id + 1, 0 = none
    row_off: int
    col_off: int
    n_px: np.ndarray    # (n,) int64
    sum_p: np.ndarray   # (n,) float64
    max_p: np.ndarray   # (n,) float32
    bounds: np.ndarray  # (n, 4) float64 (minx, miny, maxx, maxy) in global pixels: the polygon's bounds

    def __len__(self) -> int:
        return len(self.n_px)

    def polygons(self, ids: np.ndarray) -> np.ndarray:
        """Normalized polygons of components ``ids`` (0-based), in that order.

        ``ids`` are polygonized :data:`_SHAPES_BATCH` at a time, each batch from the rows its
        components span with every other component masked out: a component is always polygonized
        whole, so the polygon is the same whatever the batch."""
        ids = np.asarray(ids, np.int64)
        out = np.empty(len(ids), dtype=object)
        chosen = np.zeros(len(self) + 1, bool)
        where = np.zeros(len(self) + 1, np.int64)
        for start in range(0, len(ids), _SHAPES_BATCH):
            batch = ids[start:start + _SHAPES_BATCH]
            r0 = int(self.bounds[batch, 1].min()) - self.row_off
            r1 = int(self.bounds[batch, 3].max()) - self.row_off
            chosen[batch + 1] = True
            where[batch + 1] = np.arange(start, start + len(batch))
            band = self.labels[r0:r1]
            shapes, values = [], []
            for geom, value in _features.shapes(band, mask=chosen[band], connectivity=4,
                                                transform=Affine.translation(self.col_off, self.row_off + r0)):
                shapes.append(geom)
                values.append(value)
            chosen[batch + 1] = False
            # a 4-connected component is exactly one polygon (holes included)
            if len(values) != len(batch):
                raise RuntimeError(f"internal error: {len(values)} polygons for {len(batch)} components")
            out[where[np.asarray(values, dtype=np.int64)]] = shapely.normalize(_shapes_to_polygons(shapes))
        return out

    def pieces(self, ids: np.ndarray | None = None) -> Pieces:
        """Components ``ids`` (default all, in label order) as :class:`Pieces`."""
        ids = np.arange(len(self)) if ids is None else np.asarray(ids, np.int64)
        return Pieces(np.full(len(ids), self.prompt, np.int32), self.polygons(ids), self.n_px[ids],
                      self.sum_p[ids], self.max_p[ids])


def chunk_components(probs: np.ndarray, valid: np.ndarray, row_off: int, col_off: int,
                     thresholds: Sequence[float]) -> list[Components]:
    """Threshold one chunk's blended probabilities and label each prompt's mask (no polygons yet).

    Args:
        probs: float32 ``(P, h, w)`` probabilities of the chunk's own region; NaN = nodata.
        valid: bool ``(h, w)``; False pixels (nodata, outside the footprint) never join a piece.
        row_off, col_off: global pixel offset of the region's top-left pixel.
        thresholds: one value per prompt in 0..1; a pixel is in the mask when ``prob >= threshold``.

    Returns one :class:`Components` per prompt with at least one pixel in its mask. Components are
    4-connected (edge neighbours), the same rule :func:`merge_seams` uses across chunk borders, so
    chunking cannot change results. Stats are exact: components are labelled
    (``scipy.ndimage.label``) and counted with ``bincount``; each label becomes one polygon.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ConfigError(f"probs must have shape (P, h, w), got {probs.shape}")
    n_prompts, h, w = probs.shape
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (h, w):
        raise ConfigError(f"valid has shape {valid.shape}, expected {(h, w)} to match probs")
    t = prompt_thresholds(thresholds, n_prompts)
    row_off, col_off = int(row_off), int(col_off)

    out = []
    for p in range(n_prompts):
        prob = probs[p]
        with np.errstate(invalid="ignore"):
            mask = valid & (prob >= t[p])  # NaN compares False: nodata never enters a piece
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=FOUR_CONNECTED)
        n_px = np.zeros(n + 1, np.int64)
        sum_p = np.zeros(n + 1)
        max_p = np.full(n + 1, -np.inf, dtype=np.float32)
        lo_r, lo_c = np.full(n + 1, h, np.int64), np.full(n + 1, w, np.int64)
        hi_r, hi_c = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
        for r0 in range(0, h, _STATS_ROWS):  # in row blocks: the temporaries follow the block
            m = mask[r0:r0 + _STATS_ROWS]
            lab, vals = labels[r0:r0 + _STATS_ROWS][m], prob[r0:r0 + _STATS_ROWS][m]
            n_px += np.bincount(lab, minlength=n + 1)
            sum_p += np.bincount(lab, weights=vals.astype(np.float64), minlength=n + 1)
            np.maximum.at(max_p, lab, vals.astype(np.float32))  # 200x faster than ndimage.maximum here
            rows, cols = np.nonzero(m)
            np.minimum.at(lo_r, lab, rows + r0)
            np.maximum.at(hi_r, lab, rows + r0)
            np.minimum.at(lo_c, lab, cols)
            np.maximum.at(hi_c, lab, cols)
        del mask
        bounds = np.stack([lo_c[1:] + col_off, lo_r[1:] + row_off, hi_c[1:] + 1 + col_off, hi_r[1:] + 1 + row_off],
                          axis=1).astype(np.float64)
        n_px, sum_p = n_px[1:], sum_p[1:]
        out.append(Components(p, labels, row_off, col_off, n_px, sum_p, max_p[1:], bounds))
    return out


def polygonize_chunk(probs: np.ndarray, valid: np.ndarray, row_off: int, col_off: int,
                     thresholds: Sequence[float]) -> Pieces:
    """Every component of :func:`chunk_components` as a polygon, in prompt and label order.

    Returns :class:`Pieces` in global pixel coordinates, geometry normalized.

    Why global *pixel* coordinates: vertices are exact integers, so the seam merge can compare and
    union geometry exactly; the (possibly rotated) map transform is applied once, in :func:`finalize`.
    Polygons come from the label image (one polygon per label), so the stats stay exact: burning
    80,000 polygons back with ``rasterize`` instead took 60 s per 4096² chunk.
    """
    return Pieces.concat([c.pieces() for c in chunk_components(probs, valid, row_off, col_off, thresholds)])


# --------------------------------------------------------------------------------------------------
# Stage 2: persistence
# --------------------------------------------------------------------------------------------------


def write_pieces(path: str | os.PathLike, pieces: Pieces | Iterable[Pieces]) -> None:
    """Save one chunk's pieces to ``path`` (an uncompressed ``.npz``), atomically.

    A reader (or a resumed run) sees the complete old file, the complete new file, or no file —
    never a truncated one (:mod:`geoseg.atomic`). ``.npz`` with ``allow_pickle=False`` is fast, dependency-free and
    cannot execute code when read back. ``pieces`` may come in batches, each encoded as it comes:
    a chunk's decoded polygons take hundreds of bytes each, their arrays a few bytes a vertex.
    """
    batches = [_with_top(pieces)] if isinstance(pieces, Pieces) else [_with_top(b) for b in pieces]
    with atomic_target(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, allow_pickle=False, **_concat_arrays(batches))


def _with_top(pieces: Pieces) -> dict[str, np.ndarray]:
    """:meth:`Pieces.to_arrays` plus each piece's top row, which :class:`PieceStream` reads ahead."""
    return {**pieces.to_arrays(), "top": shapely.bounds(pieces.geometry).reshape(-1, 4)[:, 1]}


def _concat_arrays(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several :meth:`Pieces.to_arrays` results as one (polygon layout; anything else decoded and
    encoded again)."""
    batches = [b for b in batches if int(b["geom_type"]) >= 0]  # an empty batch has no geometry arrays
    if not batches:
        return _with_top(Pieces.empty())
    if len(batches) == 1:
        return batches[0]
    if any(int(b["geom_type"]) != GeometryType.POLYGON for b in batches):
        return _with_top(Pieces.concat(Pieces.from_arrays(b) for b in batches))
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("prompt_index", "n_px", "sum_p", "max_p", "top")}
    coords = [b["coords"] for b in batches]
    if any(c.dtype != np.int32 for c in coords):
        coords = [c.astype(np.float64) for c in coords]
    rings, polys = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
    n_coords = n_rings = 0
    for b in batches:  # shapely's ragged offsets, each batch's shifted past the ones before
        rings.append(b["offsets0"][1:] + n_coords)
        polys.append(b["offsets1"][1:] + n_rings)
        n_coords += len(b["coords"])
        n_rings += len(b["offsets0"]) - 1
    return {"version": batches[0]["version"], **out, "geom_type": batches[0]["geom_type"],
            "coords": np.concatenate(coords), "offsets0": np.concatenate(rings), "offsets1": np.concatenate(polys)}


def read_pieces(path: str | os.PathLike) -> Pieces:
    """Load pieces saved by :func:`write_pieces`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return Pieces.from_arrays({k: data[k] for k in data.files})


class PieceStream:
    """Pieces saved by :func:`write_pieces`, read front to back a band of rows at a time: only the
    band's bytes are read and decoded (``np.savez`` stores each array uncompressed, so each is read
    as a stream), where the whole file's polygons would take hundreds of bytes each. Files without
    top rows, or of other geometry types, are read whole and sliced."""

    def __init__(self, path: str | os.PathLike):
        self._npz = np.load(os.fspath(path), allow_pickle=False)
        files = set(self._npz.files)
        self._streams: dict[str, Any] = {}
        self._whole: Pieces | None = None
        self._taken = 0
        if "top" not in files or int(self._npz["geom_type"]) != GeometryType.POLYGON:
            self._whole = Pieces.from_arrays(self._npz)
            self._tops = shapely.bounds(self._whole.geometry).reshape(-1, 4)[:, 1]
            return
        for key in ("top", "prompt_index", "n_px", "sum_p", "max_p", "coords", "offsets0", "offsets1"):
            self._streams[key] = _ArrayStream(self._npz.zip.open(f"{key}.npy"))
        self._tops = np.zeros(0)
        self._last_ring = int(self._streams["offsets1"].read(1)[0])  # 0: where the next piece's rings start
        self._last_coord = int(self._streams["offsets0"].read(1)[0])

    def until(self, stop: float) -> Pieces:
        """The pieces not read yet whose top row is above ``stop`` (the file is in canonical order,
        top row first)."""
        if self._whole is not None:
            start, self._taken = self._taken, max(self._taken, int(np.searchsorted(self._tops, stop)))
            return self._whole.take(slice(start, self._taken))
        top = self._streams["top"]
        while (len(self._tops) == 0 or self._tops[-1] < stop) and top.left:
            self._tops = np.r_[self._tops, top.read(4096)]
        n = int(np.searchsorted(self._tops, stop))
        self._tops = self._tops[n:]
        return self._next(n)

    def _next(self, n: int) -> Pieces:
        s = self._streams
        polys = s["offsets1"].read(n)
        rings = s["offsets0"].read(int(polys[-1]) - self._last_ring if n else 0)
        coords = s["coords"].read(int(rings[-1]) - self._last_coord if len(rings) else 0)
        ring_off = np.r_[self._last_coord, rings] - self._last_coord
        poly_off = np.r_[self._last_ring, polys] - self._last_ring
        geoms = shapely.from_ragged_array(GeometryType.POLYGON, coords.astype(np.float64), (ring_off, poly_off))
        self._last_ring += int(poly_off[-1])
        self._last_coord += int(ring_off[-1])
        return Pieces(s["prompt_index"].read(n), geoms, s["n_px"].read(n), s["sum_p"].read(n), s["max_p"].read(n))

    def close(self) -> None:
        self._npz.close()


class _ArrayStream:
    """One ``.npy`` member of an uncompressed ``.npz``, read a few rows at a time."""

    def __init__(self, fh: Any):
        self._fh = fh
        version = np.lib.format.read_magic(fh)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, self.dtype = header(fh)
        self.left = shape[0] if shape else 0
        self._row_shape = tuple(shape[1:])
        self._row_bytes = self.dtype.itemsize * int(np.prod(self._row_shape, dtype=np.int64))

    def read(self, n: int) -> np.ndarray:
        n = min(n, self.left)
        self.left -= n
        data = self._fh.read(n * self._row_bytes)
        return np.frombuffer(data, self.dtype).reshape((n, *self._row_shape)).copy()


# --------------------------------------------------------------------------------------------------
# Stage 3: merge across chunk seams
# --------------------------------------------------------------------------------------------------


def _region_tuple(region: Any) -> tuple[int, int, int, int]:
    """``(row_off, col_off, height, width)`` from a 4-tuple in that order or a rasterio ``Window``."""
    if hasattr(region, "row_off"):
        return int(region.row_off), int(region.col_off), int(region.height), int(region.width)
    try:
        r, c, h, w = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ConfigError(f"chunk region {region!r} is not (row_off, col_off, height, width)") from None
    return r, c, h, w


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Group label of each of ``n`` items linked by the pairs ``(u[k], v[k])``."""
    graph = coo_matrix((np.ones(len(u)), (u, v)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _seam_segments(geoms: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, ...]:
    """Exterior-ring segments of each polygon that lie on its own chunk's border.

    Only exterior rings can touch a chunk border (a hole is enclosed by piece pixels inside the
    chunk). Returns seven parallel arrays ``(owner, vertical, line, lo, hi, a, b)``, one row per
    segment: ``owner`` indexes ``geoms``; the segment lies on the line ``x = line`` (``vertical``) or
    ``y = line`` and spans ``[lo, hi]`` along it; ``a`` and ``b`` are its end points, (n, 2) each
    (for the STRtree of segments).
    """
    rings = shapely.get_exterior_ring(geoms)
    coords, idx = shapely.get_coordinates(rings, return_index=True)
    same = idx[:-1] == idx[1:]
    a, b, owner = coords[:-1][same], coords[1:][same], idx[:-1][same]
    reg = regions[owner]
    y0, x0 = reg[:, 0], reg[:, 1]
    y1, x1 = y0 + reg[:, 2], x0 + reg[:, 3]
    vert = (a[:, 0] == b[:, 0]) & ((a[:, 0] == x0) | (a[:, 0] == x1))
    horz = (a[:, 1] == b[:, 1]) & ((a[:, 1] == y0) | (a[:, 1] == y1))
    keep = vert | horz
    a, b, owner, vert = a[keep], b[keep], owner[keep], vert[keep]
    line = np.where(vert, a[:, 0], a[:, 1])
    along_a = np.where(vert, a[:, 1], a[:, 0])
    along_b = np.where(vert, b[:, 1], b[:, 0])
    return owner, vert, line, np.minimum(along_a, along_b), np.maximum(along_a, along_b), a, b


def _drop_collinear(geoms: np.ndarray) -> np.ndarray:
    """Remove vertices in the middle of straight axis-parallel runs (left on seams by ``union_all``).

    With them gone (and after ``normalize``) a merged polygon has exactly the vertices the same
    region polygonized in one piece would have, so outputs are identical whatever the chunking.
    """
    if len(geoms) == 0:
        return geoms
    _, coords, (ring_off, geom_off) = shapely.to_ragged_array(geoms)
    starts, ends = ring_off[:-1], ring_off[1:] - 1  # drop each ring's closing vertex
    lens = ends - starts
    n = int(lens.sum())
    ring_of = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
    cur = np.repeat(starts, lens) + pos
    prev = np.repeat(starts, lens) + (pos - 1) % np.repeat(lens, lens)
    nxt = np.repeat(starts, lens) + (pos + 1) % np.repeat(lens, lens)
    c, p, q = coords[cur], coords[prev], coords[nxt]
    redundant = ((p[:, 0] == c[:, 0]) & (c[:, 0] == q[:, 0])) | ((p[:, 1] == c[:, 1]) & (c[:, 1] == q[:, 1]))
    keep_idx = cur[~redundant]
    keep_ring = ring_of[~redundant]
    new_lens = np.bincount(keep_ring, minlength=len(lens))
    if np.any(new_lens < 3):  # degenerate input; leave the geometry as it was
        return geoms
    # re-close every ring by repeating its first kept vertex
    first = np.cumsum(new_lens) - new_lens
    out_coords = np.empty((n - int(redundant.sum()) + len(lens), 2))
    new_off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(new_lens + 1, out=new_off[1:])
    dest = np.arange(len(keep_idx)) + np.repeat(np.arange(len(lens)), new_lens)
    out_coords[dest] = coords[keep_idx]
    out_coords[new_off[1:] - 1] = coords[keep_idx[first]]
    return shapely.from_ragged_array(GeometryType.POLYGON, out_coords, (new_off, geom_off))


def seam_links(pieces: Pieces, reg: np.ndarray, chunk_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(u, v)`` of pieces that :func:`merge_seams` joins: same prompt, different chunks,
    sharing a piece of chunk border of positive length.

    ``reg`` is each piece's own chunk region as ``(row_off, col_off, height, width)`` rows, ``chunk_of``
    its chunk's id. Only pieces whose bounding box reaches their chunk's border are considered, and
    for them only the exterior-ring segments lying on that border; candidate pairs come from a
    ``shapely.STRtree`` of those segments and are confirmed with an exact integer interval test.
    """
    none = np.empty(0, np.int64)
    if len(pieces) < 2:
        return none, none
    bounds = shapely.bounds(pieces.geometry)
    on_border = ((bounds[:, 0] == reg[:, 1]) | (bounds[:, 2] == reg[:, 1] + reg[:, 3])
                 | (bounds[:, 1] == reg[:, 0]) | (bounds[:, 3] == reg[:, 0] + reg[:, 2]))
    cand = np.flatnonzero(on_border)
    if len(cand) < 2:
        return none, none
    owner, vert, line, lo, hi, a, b = _seam_segments(pieces.geometry[cand], reg[cand])
    owner = cand[owner]
    if len(owner) < 2:
        return none, none
    segs = shapely.linestrings(np.stack([a, b], axis=1))
    i, j = shapely.STRtree(segs).query(segs)  # envelope hits; refined exactly below
    sel = i < j
    i, j = i[sel], j[sel]
    ok = ((vert[i] == vert[j]) & (line[i] == line[j])
          & (np.maximum(lo[i], lo[j]) < np.minimum(hi[i], hi[j]))  # positive length
          & (chunk_of[owner[i]] != chunk_of[owner[j]])
          & (pieces.prompt_index[owner[i]] == pieces.prompt_index[owner[j]]))
    return owner[i[ok]], owner[j[ok]]


def merge_seams(pieces_list: Sequence[Pieces], chunk_regions: Sequence[Any]) -> Pieces:
    """Concatenate every chunk's pieces and join those that a chunk border split apart.

    Args:
        pieces_list: one :class:`Pieces` per chunk (e.g. :func:`polygonize_chunk`'s).
        chunk_regions: the matching chunk regions, each ``(row_off, col_off, height, width)`` or a
            rasterio ``Window``; regions must not overlap (each chunk's *own* region).

    Two pieces merge when they have the same prompt, come from different chunks and share a piece
    of chunk border of positive length — the cross-chunk twin of 4-connectivity, so a diagonal
    point-touch across a seam stays two pieces, exactly as it would inside a chunk.

    The pairs come from :func:`seam_links`; they are grouped as connected components, and each
    group becomes ``shapely.union_all`` of its members (exact: integer coordinates). n_px and sum_p
    add up, max_p is the max. Output geometry is normalised and sorted canonically, so the result
    is identical for any chunk layout of the same mask.
    """
    if len(pieces_list) != len(chunk_regions):
        raise ConfigError(f"got {len(pieces_list)} piece sets for {len(chunk_regions)} chunk regions")
    regions = np.array([_region_tuple(r) for r in chunk_regions], dtype=np.int64).reshape(-1, 4)
    items = [p if p is not None else Pieces.empty() for p in pieces_list]
    allp = Pieces.concat(items)
    n = len(allp)
    if n == 0:
        return allp
    chunk_of = np.repeat(np.arange(len(items)), [len(p) for p in items])
    u, v = seam_links(allp, regions[chunk_of], chunk_of)
    return canonical(merge_groups(allp, components(n, u, v)) if len(u) else allp)


def merge_groups(pieces: Pieces, group: np.ndarray) -> Pieces:
    """One piece per ``group`` label (0..k-1): the union of its members' geometry, their pixel
    counts and probability sums added, the max of their maxima. Each group must form one polygon."""
    k = int(group.max()) + 1 if len(group) else 0
    sizes = np.bincount(group, minlength=k)
    geoms = np.empty(k, dtype=object)
    single = sizes == 1
    geoms[group[single[group]]] = pieces.geometry[single[group]]
    multi_groups = np.flatnonzero(~single)
    order = np.argsort(group, kind="stable")
    starts = np.cumsum(sizes) - sizes
    unioned = np.empty(len(multi_groups), dtype=object)
    for t, g in enumerate(multi_groups):
        members = order[starts[g]:starts[g] + sizes[g]]
        unioned[t] = shapely.union_all(pieces.geometry[members])
    if np.any(shapely.get_type_id(unioned) != GeometryType.POLYGON):
        raise RuntimeError("internal error: a seam-merged group is not a single polygon")
    geoms[multi_groups] = _drop_collinear(unioned)
    prompt = np.zeros(k, np.int32)
    prompt[group] = pieces.prompt_index
    max_p = np.full(k, -np.inf, np.float32)
    np.maximum.at(max_p, group, pieces.max_p)
    return Pieces(prompt, geoms, np.bincount(group, weights=pieces.n_px, minlength=k).astype(np.int64),
                  np.bincount(group, weights=pieces.sum_p, minlength=k), max_p)


def canonical_order(prompt: np.ndarray, bounds: np.ndarray, n_px: np.ndarray) -> np.ndarray:
    """The canonical order of pieces: top, left, bottom, right (pixel bounds), prompt, pixel count.

    Rows first, so that the output can be streamed in this order a band of rows at a time (see
    :mod:`geoseg.streaming`); unique, since two objects of one prompt cannot share bounds (4-connected
    paths spanning one box cross), and the prompt tells other prompts' apart."""
    return np.lexsort((n_px, prompt, bounds[:, 2], bounds[:, 3], bounds[:, 0], bounds[:, 1]))


def canonical(pieces: Pieces, normalized: bool = False) -> Pieces:
    """Normalized geometry in :func:`canonical_order`: the same mask gives the same pieces in the
    same order, whatever the chunk layout. ``normalized``: the geometry is normalized already
    (:meth:`Components.polygons`' is), saving a copy of it."""
    geoms = pieces.geometry if normalized else shapely.normalize(pieces.geometry)
    order = canonical_order(pieces.prompt_index, shapely.bounds(geoms).reshape(-1, 4), pieces.n_px)
    return Pieces(pieces.prompt_index[order], geoms[order], pieces.n_px[order], pieces.sum_p[order],
                  pieces.max_p[order])
