"""Polygons streamed to the output as chunks finish: memory follows the chunk and the seams, not the objects.

A chunk's pieces that touch no *seam* (a chunk border shared with another chunk; the raster's own
edge is not one) can never be merged with another chunk's piece, so with per-polygon options they
are already final. The chunk task (:func:`write_chunk_polygons`) finalizes them itself, in the
same canonical form and order :func:`geoseg.pieces.merge_seams` gives them, and saves them as an
Arrow table (``parts/<chunk>.polygons.parquet``), 20,000 polygons at a time; only the deferred
pieces (seam-touching, and those the rules below tie to them) are kept as pixel pieces
(``parts/<chunk>.seam``). The client
(:class:`PolygonOutput`) merges the deferred pieces row of chunks by row of chunks, writes the rows
in canonical order as soon as nothing still to come can precede them (below), and packs the
GeoPackage's spatial index once at the end, in bounded memory (:mod:`geoseg.gpkg_rtree`).

Which rule keeps this exact
---------------------------
``finalize`` is per polygon for the affine transform, ``min_area``, the measures, the attributes and
reprojection. Three steps look at other polygons, and a piece is final in its chunk only when no
piece it could interact with is missing from the chunk's own ``finalize`` call:

* **hole filling** (island absorption): a piece inside a hole of another. A hole that a ring
  closes across a seam touches that seam and, being smaller than ``fill_holes``, holds at most
  ``n = fill_holes / (smallest pixel area)`` pixels (:attr:`VectorJob.hole_pixels`), so every
  island it can swallow lies within ``n + 2`` pixels of the seam (:attr:`VectorJob.hole_reach`):
  pieces that close are deferred. A hole already closed inside the chunk is at most ``n`` pixels
  too, and every piece inside its box is *linked* to the hole's owner (:func:`neighbour_links`):
  linked pieces are finalized in the same call, and deferred together, transitively.
* **class-map noding** (``--classes``): a polygon takes the vertices its touching neighbours have
  on its edges. That needs the neighbours' geometry, not their company in the call: a piece is
  finalized with its neighbours as ``context`` (their vertices count, their rows are made
  elsewhere). A chunk hands the client, beside its deferred pieces, the final pieces touching them
  (``parts/<chunk>.context``); neither linking nor deferring spreads from piece to piece.
* **coverage simplification** (``--simplify``): GEOS's coverage simplifier (TPVW) takes the
  coverage's edges one after another in input order (canonical order here) and removes a vertex
  only if no vertex of the coverage, as it stands then, lies in the triangle it cuts off. So a
  polygon's result depends on the *results* of the polygons before it and on the *input* of those
  after it, wherever their vertices fall inside its box; and through them on chains of any length
  (on dense speckle, one chain crosses the raster). So the coverage (``sequential``) is simplified
  a prefix of the canonical order at a time, in batches: each batch beside the known polygons
  after it whose boxes meet its own (unsimplified; their rows are dropped) and the polygons
  simplified before it whose boxes meet one of the call's (their raw results, as simplified).
  The client keeps the raw result of every polygon a polygon still to come may meet
  (``PolygonOutput._simplified``).

  - A prompt's polygons share no edge: the earlier results go last in the simplifier's input;
    GEOS treats them only after the batch, so they stand as they stood in the whole run. A vertex
    is a node by the rings through it only, so the batch's nodes are the whole run's too (checked
    against GEOS 3.14 on 276,150 speckle polygons, 30° rotated transform, 1.4 px tolerance, 14
    batches: every row equal; without the polygons before, 7,867 differ).
  - A class map is one coverage noded across classes, whose neighbours share edges, simplified
    with the first polygon that has them: the batch loses the vertices the earlier results lost,
    so those edges are held as they came out, and the outside is given as a frame
    (:func:`geoseg.polygons._simplify_after` says how and why; checked there against whole runs).
    The batch and the polygons after it are noded against every known neighbour.

  A chunk cannot finalize anything alone: its polygons wait for the results of polygons before
  them in other chunks (and a polygon merged across seams elsewhere can reach around the chunk's
  corner), so with ``simplify`` every piece goes to the client (below).

The client applies the same rules on its side: it keeps the deferred pieces in a pool and, whenever
a whole row of chunks has arrived, merges the pool's seams and finalizes every group of linked
pieces (seam merges and hole links) that has
no member touching, or within ``hole_reach`` of, the lower border of that row (the *frontier*,
beyond which pieces are still to come). Groups that do are kept for the next row; for a class map,
what they touch is kept as their context. The pool therefore holds about one row of seams, not every
seam piece. Under sequential simplify the client finalizes the prefix of the canonical order up to
the first polygon it keeps (under ``fill_holes``, also up to the first whose box meets a kept one's:
a kept polygon may still change above the frontier). A polygon touching the frontier may still grow
below it, but a polygon before it sees only its vertices above the frontier, final already, and a
polygon after it waits anyway. Every piece of a row of chunks is deferred then, so the client reads
them from the parts on disk (saved in canonical order, with each piece's top row) as a stream, a
band of :data:`SIMPLIFY_BAND_ROWS` rows at a time, and closes each band at its lower border as it
would a row: the pool holds a band's pieces plus those from the top of the highest polygon touching
its lower border down to it, whatever the chunk size.

Row order
---------
Canonical (:func:`geoseg.pieces.canonical_order`: by each polygon's top pixel row, then its left
column, ...), over the whole file: the file is the same whatever the chunk size and however often
a run was interrupted. Each part (a chunk's final rows, and each batch of seam polygons, spilled
to a temporary parquet file) is sorted and carries every row's key (:data:`KEY_COLUMNS`); the client
merges them (:class:`_RowMerge`) and writes a band of rows once nothing still to come can precede
it: chunks below the finished rows of chunks, and groups of seam pieces still open, start no higher
than the *watermark* (what :meth:`PolygonOutput._close` returns). It reads one row group
(:data:`MERGE_ROWS`) per part of the current row of chunks and per seam spill, so its memory
follows the raster's width, not its height or the object count. An object spanning the raster
from top to bottom holds the watermark at its top: the rows then wait on disk, in their parts.

Resume
------
Chunk parts are written atomically before the chunk's done-record, so a finished chunk's polygons
are on disk. The output is written under a hidden temp name and renamed only when complete (index
and style included); a client killed mid-write leaves only that temp file, which the next run
deletes before rebuilding the output from the parts: no polygon is lost or written twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from scipy import ndimage

from .atomic import atomic_target
from .gpkg_rtree import build_rtree
from .memory import arrow_on_c_heap, release_free_memory
from .pieces import (
    FOUR_CONNECTED,
    Components,
    Pieces,
    PieceStream,
    canonical,
    canonical_order,
    components,
    merge_groups,
    read_pieces,
    seam_links,
    write_pieces,
)
from .polygons import OUTPUT_COLUMNS, Measure, Simplified, finalize
from .tiling import Region

log = logging.getLogger(__name__)

#: Rows finalized and written at a time: bounds the memory of one chunk's final polygons.
BATCH_ROWS = 20_000
#: Rows a part holds per row group: what the client buffers per part while it merges (module docstring).
MERGE_ROWS = 4096
#: Columns of the parts with each row's canonical key (:func:`geoseg.pieces.canonical_order`): the
#: client merges the parts by them and drops them before writing.
KEY_COLUMNS = ("_top", "_left", "_bottom", "_right", "_prompt", "_pixels")
#: Part layout version, in :meth:`VectorJob.key`: parts of an older layout are made again on resume.
PART_LAYOUT = 2
#: Suffixes of a chunk's vector parts in ``parts/``.
FINAL_SUFFIX = ".polygons.parquet"
SEAM_SUFFIX = ".seam"
CONTEXT_SUFFIX = ".context"


@dataclass(frozen=True)
class VectorJob:
    """Everything needed to turn one chunk's pieces into output rows; small and picklable."""

    prompts: tuple[str, ...]
    thresholds: tuple[float, ...]
    transform: tuple[float, ...]
    crs: str | None
    height: int
    width: int
    min_area: float = 0.0
    fill_holes: float = 0.0
    simplify: float = 0.0
    dst_crs: str | None = None
    vector_format: str = "gpkg"
    #: The pieces are a class map's (``--classes``): finalized as one coverage, noded across classes.
    exclusive: bool = False

    @property
    def per_polygon(self) -> bool:
        """True when every finalize step is per polygon: any slice of pieces finalizes to the same
        rows, so final pieces are finalized in batches of :data:`BATCH_ROWS`."""
        return self.fill_holes == 0 and self.simplify == 0 and not self.exclusive

    @property
    def chunk_local(self) -> bool:
        """False with ``simplify``: then no piece is final in its chunk, every piece goes to the
        client (see the module docstring)."""
        return self.simplify == 0

    @property
    def hole_reach(self) -> int:
        """Pixels from a seam within which a piece may sit in a hole that a ring closes across it:
        such a hole touches the seam and is connected, so all its pixels lie within its pixel count
        (at most :attr:`hole_pixels`) of the seam, plus one for the ring and one for rounding.
        Capped at height + width: then every piece is within reach of every seam."""
        return min(self.hole_pixels + 2, self.height + self.width) if self.fill_holes > 0 else 0

    @functools.cached_property
    def hole_pixels(self) -> int:
        """The most pixels a hole that ``fill_holes`` fills can have: ``fill_holes / (smallest
        pixel area)``, the smallest pixel area taken over 9 pixels spread over the raster (corners,
        edge middles, centre) and halved, a margin (not a proof) for the smooth variation of a
        pixel's ground area between them; at most the raster's pixel count."""
        if self.fill_holes == 0:
            return 0
        rows = np.array([0, self.height // 2, self.height - 1], float)
        cols = np.array([0, self.width // 2, self.width - 1], float)
        r, c = (a.ravel() for a in np.meshgrid(rows, cols))
        a, b, x0, d, e, y0 = self.transform
        corners = np.stack([c, r, c + 1, r, c + 1, r + 1, c, r + 1], axis=1).reshape(-1, 4, 2)
        xy = corners @ np.array([[a, d], [b, e]]) + np.array([x0, y0])
        area, _ = Measure(self.crs).area_perimeter(shapely.polygons(xy))
        smallest = 0.5 * float(np.min(area))
        limit = self.height * self.width
        if not np.isfinite(smallest) or smallest <= 0:
            return limit
        return min(limit, math.ceil(self.fill_holes / smallest))

    def key(self) -> str:
        """Hash of the options: a chunk part made with another key must be made again."""
        options = {**asdict(self), "part_layout": PART_LAYOUT}
        return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def crs_out(self) -> Any:
        """The CRS the rows are written in."""
        return self.dst_crs if self.dst_crs is not None else self.crs

    @property
    def sequential(self) -> bool:
        """Under ``simplify``: the client simplifies the coverage a prefix of the canonical order at
        a time, beside the polygons simplified before it (module docstring)."""
        return self.simplify > 0

    def coverage(self, prompt: np.ndarray) -> np.ndarray:
        """Which coverage each piece's polygon belongs to: its prompt's, or, for a class map, the one
        of all classes (they are simplified and hole-filled together)."""
        return np.zeros_like(prompt) if self.exclusive else prompt

    def finalize(self, pieces: Pieces, context: np.ndarray | None = None, **kw: Any):
        """:func:`geoseg.polygons.finalize` with these options; rows indexed by their piece. ``kw``:
        its ``simplified_before`` and ``raw_out``."""
        from affine import Affine

        return finalize(pieces, Affine(*self.transform), self.crs, self.prompts, self.thresholds,
                        min_area=self.min_area, fill_holes=self.fill_holes, simplify=self.simplify,
                        dst_crs=self.dst_crs, exclusive=self.exclusive, context=context, source_index=True, **kw)


def near_seam(bounds: np.ndarray, region: Region, height: int, width: int, reach: int = 0) -> np.ndarray:
    """Pieces (by their ``bounds``) within ``reach`` pixels of a border of ``region`` that another
    chunk shares; ``reach=0``: touching it."""
    return ((((bounds[:, 0] - region.col) <= reach) & (region.col > 0))
            | (((region.col_stop - bounds[:, 2]) <= reach) & (region.col_stop < width))
            | (((bounds[:, 1] - region.row) <= reach) & (region.row > 0))
            | (((region.row_stop - bounds[:, 3]) <= reach) & (region.row_stop < height)))


def small_holes(geoms: np.ndarray, job: VectorJob) -> tuple[np.ndarray, np.ndarray]:
    """(owner, bounds) of the holes that ``fill_holes`` may fill (at most :attr:`VectorJob.hole_pixels`
    pixels): ``owner`` indexes ``geoms`` (pixel space)."""
    with_holes = np.flatnonzero(shapely.get_num_interior_rings(geoms) > 0)
    rings, owner = shapely.get_rings(geoms[with_holes], return_index=True)
    hole = np.zeros(len(owner), bool)
    hole[1:] = owner[1:] == owner[:-1]  # each polygon's exterior comes first
    holes, owner = shapely.polygons(rings[hole]), with_holes[owner[hole]]
    small = shapely.area(holes) <= job.hole_pixels
    return owner[small], shapely.bounds(holes[small]).reshape(-1, 4)


def neighbour_links(bounds: np.ndarray, job: VectorJob, holes: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of pieces (by their ``bounds``) finalized in the same call, besides seam merges: under
    ``fill_holes``, the owner of each of ``holes`` (:func:`small_holes`) and every piece inside that
    hole's bounding box (an island it may absorb)."""
    none = np.empty(0, np.int64)
    if len(bounds) < 2 or job.fill_holes == 0 or holes is None or len(holes[0]) == 0:
        return none, none
    owner, hb = holes
    j, i = boxes_tree(bounds).query(boxes(hb), predicate="covers")
    keep = owner[j] != i
    return owner[j][keep], i[keep]


def meeting(bounds: np.ndarray, prompt: np.ndarray, tree: shapely.STRtree, tree_prompt: np.ndarray) -> np.ndarray:
    """The items of ``tree`` (:func:`boxes_tree`) whose box meets one of ``bounds`` of the same prompt
    (the same coverage), each once."""
    if len(bounds) == 0 or len(tree_prompt) == 0:
        return np.empty(0, np.int64)
    i, j = tree.query(boxes(bounds), predicate="intersects")
    return np.unique(j[prompt[i] == tree_prompt[j]])


def boxes(bounds: np.ndarray) -> np.ndarray:
    return shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])


def boxes_tree(bounds: np.ndarray) -> shapely.STRtree:
    return shapely.STRtree(boxes(bounds))


def touching(bounds: np.ndarray, job: VectorJob) -> tuple[np.ndarray, np.ndarray]:
    """For a class map: pairs ``(i, j)``, ``i != j``, of pieces whose bounding boxes meet, both
    ways: the neighbours a piece is noded against (``finalize``'s ``context``)."""
    none = np.empty(0, np.int64)
    if not job.exclusive or len(bounds) < 2:
        return none, none
    i, j = boxes_tree(bounds).query(boxes(bounds), predicate="intersects")
    keep = i != j
    return j[keep], i[keep]


def linked_to(seed: np.ndarray, u: np.ndarray, v: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """``seed`` grown to every item connected to a seeded one by the pairs ``(u, v)`` (``group``:
    their connected components, when the caller has them already)."""
    if len(u) == 0 or not seed.any() or seed.all():
        return seed
    if group is None:
        group = components(len(seed), u, v)
    return np.isin(group, group[seed])


def to_arrow(gdf, vector_format: str):
    """A finalized GeoDataFrame as an Arrow table (GeoParquet metadata; MultiPolygon for GeoPackage)."""
    from geopandas.io.arrow import _geopandas_to_arrow

    if vector_format == "gpkg" and len(gdf):
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
        if single.any():  # the old writer's promote_to_multi, done here (in parallel chunk tasks)
            geoms = geoms.copy()
            idx = np.flatnonzero(single)
            geoms[idx] = shapely.multipolygons(geoms[idx], indices=np.arange(len(idx)))
            gdf = gdf.set_geometry(geoms, crs=gdf.crs)
    table = _geopandas_to_arrow(gdf.reset_index(drop=True), index=False)
    return table.cast(_schema().with_metadata(table.schema.metadata))


def _schema() -> Any:
    """The output columns' Arrow types (fixed, so an empty chunk's table has them too)."""
    import pyarrow as pa

    types = {"prompt": pa.string(), "prompt_index": pa.int32(), "threshold": pa.float64(),
             "mean_prob": pa.float64(), "max_prob": pa.float32(), "pixels": pa.int64(),
             "area_m2": pa.float64(), "perimeter_m": pa.float64(), "n_holes": pa.int32(),
             "compactness": pa.float64()}
    return pa.schema([pa.field(c, types[c]) for c in OUTPUT_COLUMNS] + [pa.field("geometry", pa.binary())])


def with_key(table: Any, prompt: np.ndarray, bounds: np.ndarray, n_px: np.ndarray) -> Any:
    """``table`` plus its rows' :data:`KEY_COLUMNS`, from their pieces' prompt, pixel bounds and count."""
    import pyarrow as pa

    values = (bounds[:, 1], bounds[:, 0], bounds[:, 3], bounds[:, 2], prompt, n_px)
    for name, value in zip(KEY_COLUMNS, values, strict=True):
        table = table.append_column(name, pa.array(np.asarray(value, np.int64)))
    return table


def keyed_rows(gdf: Any, pieces: Pieces, bounds: np.ndarray, job: VectorJob) -> Any:
    """``gdf`` (finalized from ``pieces``, whose pixel ``bounds`` are given) as an Arrow table with
    each row's key, found through the index ``finalize`` gives (the row's piece)."""
    src = gdf.index.to_numpy()
    return with_key(to_arrow(gdf, job.vector_format), pieces.prompt_index[src], bounds[src], pieces.n_px[src])


def empty_rows(job: VectorJob) -> Any:
    """A table with no rows and every column a part has."""
    return keyed_rows(job.finalize(Pieces.empty()), Pieces.empty(), np.zeros((0, 4)), job)


def finalized_tables(pieces: Pieces, job: VectorJob, context: np.ndarray | None = None) -> Iterator[Any]:
    """``job.finalize`` over ``pieces`` in slices of :data:`BATCH_ROWS` (per-polygon options only,
    where slicing cannot change a row), as keyed Arrow tables; all at once otherwise."""
    step = BATCH_ROWS if job.per_polygon else max(len(pieces), 1)
    for start in range(0, max(len(pieces), 1), step):
        part = pieces.take(slice(start, start + step))
        gdf = job.finalize(part, context)
        if len(gdf):
            yield keyed_rows(gdf, part, shapely.bounds(part.geometry).reshape(-1, 4), job)


class ChunkPieces:
    """A chunk's components of every prompt (:class:`geoseg.pieces.Components`) seen as one
    indexed set: bounds and stats as arrays, polygons made on demand for any subset."""

    def __init__(self, comps: Sequence[Components]):
        self.comps = list(comps)
        self.offsets = np.cumsum([0] + [len(c) for c in self.comps])
        self.prompt = np.concatenate([np.full(len(c), c.prompt, np.int32) for c in self.comps]
                                     + [np.zeros(0, np.int32)])
        self.bounds = np.concatenate([c.bounds for c in self.comps] + [np.zeros((0, 4))])
        self.n_px = np.concatenate([c.n_px for c in self.comps] + [np.zeros(0, np.int64)])
        self.sum_p = np.concatenate([c.sum_p for c in self.comps] + [np.zeros(0)])
        self.max_p = np.concatenate([c.max_p for c in self.comps] + [np.zeros(0, np.float32)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pieces(self, ids: np.ndarray) -> Pieces:
        """Pieces ``ids`` in that order, polygonized prompt by prompt, batch by batch."""
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        geoms = np.empty(len(ids), dtype=object)
        for k, comp in enumerate(self.comps):
            sel = np.flatnonzero(which == k)
            if len(sel):
                geoms[sel] = comp.polygons(ids[sel] - self.offsets[k])
        return Pieces(self.prompt[ids], geoms, self.n_px[ids], self.sum_p[ids], self.max_p[ids])

    def holes(self, job: VectorJob) -> tuple[np.ndarray, np.ndarray]:
        """:func:`small_holes` of every piece with room for a hole (3 x 3 pixels), a batch at a time."""
        w, h = (self.bounds[:, 2] - self.bounds[:, 0]), (self.bounds[:, 3] - self.bounds[:, 1])
        roomy = np.flatnonzero((w >= 3) & (h >= 3))
        owners, boxes = [np.zeros(0, np.int64)], [np.zeros((0, 4))]
        for start in range(0, len(roomy), BATCH_ROWS):
            ids = roomy[start:start + BATCH_ROWS]
            owner, hb = small_holes(self.pieces(ids).geometry, job)
            owners.append(ids[owner])
            boxes.append(hb)
        return np.concatenate(owners), np.concatenate(boxes)

    def enclosure_links(self, seed: np.ndarray, job: VectorJob) -> tuple[np.ndarray, np.ndarray]:
        """Pairs tying the pieces inside a small region that deferred pieces of one prompt enclose
        (touching each other only at corners, say) to those pieces: once they merge through
        other chunks the region is a hole of the merged polygon, which may swallow them.

        Per prompt, the pixels outside its deferred pieces are labelled (4-connected); a region
        that touches no chunk border and holds at most :attr:`VectorJob.hole_pixels` pixels may
        become such a hole. Its pieces (of any prompt) are linked to every deferred piece of the
        prompt next to it (8 neighbours)."""
        none = np.empty(0, np.int64)
        u, v = [none], [none]
        fg = [(c, self.offsets[k]) for k, c in enumerate(self.comps)]
        for k, comp in enumerate(self.comps):
            local = np.zeros(len(comp) + 1, bool)
            local[1:] = seed[self.offsets[k]:self.offsets[k + 1]]
            if not local.any():
                continue
            seeded = np.where(local[comp.labels], comp.labels, 0)  # deferred pieces of this prompt
            rest, n = ndimage.label(seeded == 0, structure=FOUR_CONNECTED)
            size = np.bincount(rest.ravel(), minlength=n + 1)
            small = (size <= job.hole_pixels) & (np.arange(n + 1) > 0)
            small[np.unique(np.r_[rest[0], rest[-1], rest[:, 0], rest[:, -1]])] = False  # open regions
            if not small.any():
                continue
            pairs = []  # (region, piece inside it) and (region, deferred piece next to it)
            inside = small[rest]
            for other, off in fg:
                pairs.append((rest[inside & (other.labels > 0)], other.labels[inside & (other.labels > 0)] - 1 + off))
            h, w = rest.shape
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
                a = rest[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
                b = seeded[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
                hit = small[a] & (b > 0)
                pairs.append((a[hit], b[hit] - 1 + self.offsets[k]))
            region = np.concatenate([r for r, _ in pairs])
            piece = np.concatenate([q for _, q in pairs])
            key = np.unique(np.stack([region, piece], axis=1), axis=0)
            first = np.r_[True, key[1:, 0] != key[:-1, 0]]
            hub = key[first, 1][np.cumsum(first) - 1]  # each region's first piece: a star links them all
            u.append(hub)
            v.append(key[:, 1])
        u_, v_ = np.concatenate(u), np.concatenate(v)
        keep = u_ != v_
        return u_[keep].astype(np.int64), v_[keep].astype(np.int64)


def _batches(order: np.ndarray, group: np.ndarray | None) -> Iterator[np.ndarray]:
    """``order`` cut into runs of about :data:`BATCH_ROWS`; with ``group``, only between positions
    that no group spans (pieces that may interact are finalized in the same call)."""
    if group is None or len(order) == 0:
        for start in range(0, len(order), BATCH_ROWS):
            yield order[start:start + BATCH_ROWS]
        return
    g = group[order]
    last = np.zeros(int(g.max()) + 1, np.int64)
    np.maximum.at(last, g, np.arange(len(order)))
    cuttable = np.flatnonzero(np.maximum.accumulate(last[g]) == np.arange(len(order)))  # cut after these
    start = 0
    while start < len(order):
        k = np.searchsorted(cuttable, start + BATCH_ROWS - 1)
        stop = int(cuttable[k]) + 1 if k < len(cuttable) else len(order)
        yield order[start:stop]
        start = stop


def write_chunk_polygons(run_dir: Path | str, name: str, comps: Sequence[Components], region: Region,
                         job: VectorJob) -> int:
    """In the chunk task: decide which pieces are final (module docstring), finalize those into the
    chunk's parquet part in canonical order, a batch at a time, and keep the deferred ones as pixel
    pieces for the client, with (class maps) the final pieces touching them as their noding
    context; all atomically, the final rows last. Returns the number of final rows.

    Memory follows one batch of polygons plus the deferred pieces, not the chunk's object count."""
    import pyarrow.parquet as pq

    from .rundir import part_path

    arrow_on_c_heap()
    cp = ChunkPieces(comps)
    n = len(cp)
    group = None
    u = v = np.empty(0, np.int64)
    if not job.chunk_local:
        deferred = np.ones(n, bool)
    else:
        seed = near_seam(cp.bounds, region, job.height, job.width, job.hole_reach)
        if job.fill_holes > 0:
            u, v = neighbour_links(cp.bounds, job, cp.holes(job))
            eu, ev = cp.enclosure_links(near_seam(cp.bounds, region, job.height, job.width), job)
            u, v = np.r_[u, eu], np.r_[v, ev]
        group = components(n, u, v) if len(u) else None
        deferred = linked_to(seed, u, v, group)
    if job.chunk_local and job.exclusive:
        ti, tj = touching(cp.bounds, job)
    else:  # no class map, or everything deferred: no context
        ti = tj = np.empty(0, np.int64)
    kept = np.flatnonzero(deferred)
    kept = kept[canonical_order(cp.prompt[kept], cp.bounds[kept], cp.n_px[kept])]
    at = np.full(n, -1, np.int64)
    at[kept] = np.arange(len(kept))
    both = deferred[u] & deferred[v] if len(u) else np.zeros(0, bool)  # links the client must keep
    write_companions(part_path(run_dir, name, CONTEXT_SUFFIX),
                     cp.pieces(np.unique(tj[deferred[ti] & ~deferred[tj]])),  # final pieces touching deferred ones
                     at[u[both]], at[v[both]])
    write_pieces(part_path(run_dir, name, SEAM_SUFFIX),  # polygons made a batch at a time
                 (cp.pieces(kept[i:i + BATCH_ROWS]) for i in range(0, len(kept), BATCH_ROWS)))
    final = np.flatnonzero(~deferred)
    order = final[canonical_order(cp.prompt[final], cp.bounds[final], cp.n_px[final])]
    rows = 0
    with atomic_target(part_path(run_dir, name, FINAL_SUFFIX)) as tmp:
        writer = None
        for ids in _batches(order, None if job.per_polygon else group):
            around = None
            if len(ti):  # the batch's neighbours outside it, for noding
                near = np.setdiff1d(tj[np.isin(ti, ids)], ids)
                around = cp.pieces(near).geometry
            pieces = cp.pieces(ids)
            gdf = job.finalize(pieces, around)  # canonical: normalized polygons in canonical order
            if len(gdf) == 0:
                continue
            table = keyed_rows(gdf, pieces, cp.bounds[ids], job)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=MERGE_ROWS)
            rows += table.num_rows
        if writer is None:
            pq.write_table(empty_rows(job), tmp)
        else:
            writer.close()
    release_free_memory()  # the polygons' heap, freed: else the process's next chunk peaks higher
    return rows


# -- the output file ----------------------------------------------------------------------------


class _GpkgStream:
    """One GDAL write session fed batch by batch: ``pyogrio.write_arrow`` reads a RecordBatchReader
    whose batches a background thread takes from a queue. One session lets GDAL insert in large
    transactions. It writes no spatial index: :func:`.gpkg_rtree.build_rtree` packs that after the
    session in bounded memory (GDAL's grows with the row count)."""

    def __init__(self, path: Path, schema: Any, layer: str, crs: Any):
        import pyarrow as pa
        import pyogrio

        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        schema = schema.remove_metadata()

        def batches():
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item.cast(schema).to_batches()

        def run():
            try:
                pyogrio.write_arrow(
                    pa.RecordBatchReader.from_batches(schema, batches()), path, layer=layer, driver="GPKG",
                    geometry_name="geometry", geometry_type="MultiPolygon", crs=crs,
                    layer_options={"SPATIAL_INDEX": "NO", "GEOMETRY_NAME": "geom", "FID": "fid"},
                    # GeoPackage 1.2, as write_vector writes (QGIS 3.22 / GDAL 3.6 read it cleanly)
                    dataset_options={"VERSION": "1.2"})
            except BaseException as exc:  # re-raised in the client thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="geoseg-gpkg-writer", daemon=True)
        self._thread.start()

    def write(self, table: Any) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(table, timeout=0.5)
                return
            except queue.Full:
                continue
        self._raise()

    def close(self, abort: bool = False) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(RuntimeError("aborted") if abort else None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        if not abort:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _ParquetStream:
    """GeoParquet (``pyarrow.parquet.ParquetWriter``), in row groups of :data:`BATCH_ROWS`: the
    merge hands over smaller tables, which would make a file of many small row groups."""

    def __init__(self, path: Path, schema: Any):
        import pyarrow.parquet as pq

        meta = dict(schema.metadata or {})
        geo = json.loads(meta.get(b"geo", b"{}"))
        for col in geo.get("columns", {}).values():
            col.pop("bbox", None)  # the first batch's bbox would be wrong for the file
        meta[b"geo"] = json.dumps(geo).encode()
        self.schema = schema.with_metadata(meta)
        self._writer = pq.ParquetWriter(path, self.schema)
        self._held: list[Any] = []

    def write(self, table: Any) -> None:
        self._held.append(table.cast(self.schema))
        if sum(t.num_rows for t in self._held) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._held:
            self._writer.write_table(pa.concat_tables(self._held), row_group_size=BATCH_ROWS)
            self._held = []

    def close(self, abort: bool = False) -> None:
        if not abort:
            self._flush()
        self._writer.close()


@contextlib.contextmanager
def ticking(desc: str, enabled: bool, size_of: Callable[[], int] | None = None) -> Iterator[None]:
    """A progress line that ticks (elapsed time, bytes written so far) while a long step with no
    progress report of its own runs: the seam merge, the COG copy where GDAL's callback is out of
    reach (:mod:`geoseg.gdalcopy`). Never silent for minutes."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(total=None, desc=desc, unit="s", bar_format="{desc}: {elapsed} {postfix}")

    def tick():
        while not stop.wait(1.0):
            if size_of is not None:
                bar.set_postfix_str(f"{size_of() / 2**20:.0f} MiB written", refresh=False)
            bar.update(1)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed writer of ``path`` left (``atomic_target`` names them
    ``.<stem>.tmp-<pid>-<id><suffix>``, plus SQLite's -journal/-wal/-shm)."""
    for stale in path.parent.glob(f".{path.stem}.tmp-*"):
        stale.unlink(missing_ok=True)


TableSource = Callable[[], Iterable[Any]]


def part_tables(path: Path) -> TableSource:
    """A part's rows, one row group (:data:`MERGE_ROWS`) at a time (bounded memory)."""
    def read() -> Iterator[Any]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i)
    return read


def write_companions(path: Path, context: Pieces, link_u: np.ndarray, link_v: np.ndarray) -> None:
    """What the client needs beside a chunk's deferred pieces, atomically: their noding context
    (class maps) and the links between them (indices into the chunk's deferred pieces)."""
    with atomic_target(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, allow_pickle=False, link_u=link_u, link_v=link_v, **context.to_arrays())


class SeamPart:
    """A chunk part's deferred pieces, their context and the links between them (called), or its
    pieces a band of rows at a time (:meth:`band`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stream: PieceStream | None = None

    def __call__(self) -> tuple[Pieces, Pieces, np.ndarray, np.ndarray]:
        with np.load(self.path.with_suffix(CONTEXT_SUFFIX), allow_pickle=False) as data:
            context = Pieces.from_arrays(data)
            link_u, link_v = data["link_u"], data["link_v"]
        return read_pieces(self.path), context, link_u, link_v

    def band(self, stop: float) -> Pieces:
        """The pieces whose top row is above ``stop`` not taken yet (they are saved in canonical
        order, by top row first): only those are read. For a part with no links or context."""
        if self._stream is None:
            self._stream = PieceStream(self.path)
        return self._stream.until(stop)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


#: What :meth:`PolygonOutput.add` takes for a chunk's deferred pieces.
SeamSource = SeamPart


def part_seams(path: Path) -> SeamSource:
    """The deferred pieces of the chunk part at ``path``."""
    return SeamPart(path)


class _SortedRows:
    """Rows sorted by :data:`KEY_COLUMNS` from a table source, buffered a table at a time.

    ``low``: no row has a smaller ``_top`` (the source is not opened before rows that high are
    wanted). ``cleanup`` runs once the source is used up (a spill file deletes itself)."""

    def __init__(self, source: TableSource, low: float, cleanup: Callable[[], None] | None = None):
        self._source = source
        self._tables: Iterator[Any] | None = None
        self.low = low
        self.buf: Any = None
        self.done = False
        self._cleanup = cleanup

    def fill(self) -> None:
        """Append the source's next table to the buffer (or mark the source used up)."""
        import pyarrow as pa

        if self._tables is None:
            self._tables = iter(self._source())
        table = next(self._tables, None)
        if table is None:
            self.done = True
            if self._cleanup is not None:
                self._cleanup()
            return
        self.buf = table if self.buf is None else pa.concat_tables([self.buf, table])

    @property
    def rows(self) -> int:
        return 0 if self.buf is None else self.buf.num_rows

    @property
    def last_top(self) -> float:
        """The top of the last buffered row: every row still unread lies at or below it."""
        return math.inf if self.done else float(self.buf["_top"][-1].as_py())

    def pop_below(self, top: float) -> Any:
        """The buffered rows whose ``_top`` is above ``top``, removed from the buffer."""
        n = int(np.searchsorted(self.buf["_top"].to_numpy(), top, side="left"))
        out, self.buf = self.buf.slice(0, n), self.buf.slice(n)
        if self.buf.num_rows:
            self.low = float(self.buf["_top"][0].as_py())
        return out


class _RowMerge:
    """Sorted sources merged into one stream in key order, emitted up to a given top."""

    def __init__(self, write: Callable[[Any], None]):
        self._write = write
        self._sources: list[_SortedRows] = []

    def add(self, source: _SortedRows) -> None:
        self._sources.append(source)

    def emit_above(self, limit: float) -> None:
        """Write, in key order, every row whose ``_top`` is above ``limit`` (the caller knows no
        row still to come lies above it). Holds about one table per source that reaches above it."""
        import pyarrow as pa

        while True:
            live = [c for c in self._sources if c.low < limit]
            for c in live:
                while c.rows == 0 and not c.done:  # an empty row group is no reason to stop reading
                    c.fill()
            live = [c for c in live if c.rows]
            self._sources = [c for c in self._sources if c.rows or not c.done]
            if not live:
                return
            bound = min([limit] + [c.last_top for c in live])
            taken = [t for t in (c.pop_below(bound) for c in live) if t.num_rows]
            if taken:
                rows = pa.concat_tables(taken).sort_by([(k, "ascending") for k in KEY_COLUMNS])
                self._write(rows.drop_columns(list(KEY_COLUMNS)))
            elif bound >= limit:
                return
            else:  # every buffered row lies at ``bound``: read further where the buffer ends there
                for c in live:
                    if c.last_top == bound:
                        c.fill()


#: Sequential simplify: rows of pixels the client takes in and closes at a time (every piece of a
#: row of chunks is deferred; the pool follows this band times the raster's width).
SIMPLIFY_BAND_ROWS = 256


class PolygonOutput:
    """The output being built: each chunk's rows and the seam polygons merged by each row of chunks,
    merged into canonical order and written a band of rows at a time once nothing still to come can
    precede them; then the spatial index and the default style. Renamed into place only when complete.

    Use as a context manager; call :meth:`add` once per chunk (any order) and :meth:`finish`.
    """

    def __init__(self, path: Path, regions: Sequence[Region], job: VectorJob, progress: bool = False):
        self.path = Path(path)
        self.regions = list(regions)
        self.job = job
        self.progress = progress
        self.features = 0
        self._order = [r.name for r in self.regions]
        self._next = 0
        self._ready: dict[str, tuple[TableSource, SeamSource]] = {}
        self._reg = np.array([(r.row, r.col, r.height, r.width) for r in self.regions], np.int64).reshape(-1, 4)
        self._pool = Pieces.empty()  # deferred pieces not yet closed, and the chunk index of each
        self._pool_chunk = np.zeros(0, np.int64)
        self._links = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # pool pieces finalized together
        self._context = Pieces.empty()  # class maps: neighbours the pool's pieces are noded against
        self._row_parts: list[tuple[int, SeamSource]] = []  # sequential simplify: the row's parts, not read yet
        #: Sequential simplify: polygons simplified already that a polygon still to come may meet,
        #: and their pixel bounds.
        self._simplified = Simplified.empty()
        self._simplified_bounds = np.zeros((0, 4))
        self._merge = _RowMerge(self._write)
        self._bands = sorted({r.row_stop for r in self.regions})  # where the rows of chunks end
        self._written_to: float = 0  # every row above this top is written
        self._spills = 0
        #: The most deferred pieces held at once (what the client's memory follows; tests, benchmarks).
        self.peak_pool = 0

    def __enter__(self) -> PolygonOutput:
        arrow_on_c_heap()
        remove_stale_temps(self.path)
        self._target = atomic_target(self.path)
        self._tmp = self._target.__enter__()
        schema = to_arrow(self.job.finalize(Pieces.empty()), self.job.vector_format).schema
        if self.job.vector_format == "gpkg":
            self._writer: Any = _GpkgStream(self._tmp, schema, "segments", self.job.crs_out)
        else:
            self._writer = _ParquetStream(self._tmp, schema)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._writer.close(abort=True)
        for k in range(self._spills):
            self._spill_path(k).unlink(missing_ok=True)
        self._target.__exit__(exc_type, exc, tb)

    def add(self, name: str, tables: TableSource, seams: SeamSource) -> None:
        """Chunk ``name`` is finished: take it, and any chunks after it that were waiting, in chunk
        order; after the last chunk of a row of chunks, merge the seams that row closed and write
        the rows nothing still to come can precede (under sequential simplify, a band of
        :data:`SIMPLIFY_BAND_ROWS` rows at a time)."""
        self._ready[name] = (tables, seams)
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            tables, seams = self._ready.pop(self._order[self._next])
            region = self.regions[self._next]
            self._merge.add(_SortedRows(tables, region.row))
            if self.job.sequential:
                self._row_parts.append((self._next, seams))
            else:
                deferred, context, link_u, link_v = seams()
                n = len(self._pool)
                self._links = (np.r_[self._links[0], link_u + n], np.r_[self._links[1], link_v + n])
                self._context = Pieces.concat([self._context, context])
                self._take_in(deferred, self._next)
            self._next += 1
            if self._next < len(self.regions) and self.regions[self._next].row != region.row:
                self._close_row(region.row, region.row_stop)  # a row of chunks is complete

    def _take_in(self, deferred: Pieces, chunk: int) -> None:
        """Chunk ``chunk``'s ``deferred`` pieces into the pool."""
        self._pool = Pieces.concat([self._pool, deferred])
        self._pool_chunk = np.r_[self._pool_chunk, np.full(len(deferred), chunk, np.int64)]
        self.peak_pool = max(self.peak_pool, len(self._pool))

    def _close_row(self, row: int, row_stop: int) -> None:
        """A row of chunks has arrived: close it and write what nothing still to come can precede.
        Under sequential simplify every piece of the row is deferred, so its pieces come into the
        pool (from the parts on disk) a band of rows at a time, each band closed at its lower
        border as at a row's: the pool follows a band of the row, not the row."""
        if not self.job.sequential:
            self._emit(self._close(frontier=row_stop))
            return
        for stop in [*range(row + SIMPLIFY_BAND_ROWS, row_stop, SIMPLIFY_BAND_ROWS), row_stop]:
            for chunk, part in self._row_parts:
                self._take_in(part.band(stop), chunk)
            self._emit(self._close(frontier=stop))
        for _, part in self._row_parts:
            part.close()
        self._row_parts = []

    def _write(self, table: Any) -> None:
        self._writer.write(table)
        self.features += table.num_rows

    def _spill_path(self, k: int) -> Path:
        return self._tmp.with_name(f"{self._tmp.name}.seams-{k}.parquet")  # matched by remove_stale_temps

    def _spill(self, tables: Iterable[Any]) -> None:
        """Seam rows (sorted) to a temporary parquet file, merged from there like a chunk's part."""
        import pyarrow.parquet as pq

        path, writer, low = self._spill_path(self._spills), None, math.inf
        self._spills += 1  # counted first: __exit__ removes it even if this fails half-way
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema)
                    low = float(table["_top"][0].as_py())
                writer.write_table(table, row_group_size=MERGE_ROWS)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            self._merge.add(_SortedRows(part_tables(path), low, cleanup=lambda: path.unlink(missing_ok=True)))

    def _emit(self, limit: float) -> None:
        """Write every row above ``limit``, a row of chunks at a time (the merge then holds one
        table per chunk of one row, plus the seam spills)."""
        for stop in [b for b in self._bands if self._written_to < b < limit] + [limit]:
            self._merge.emit_above(stop)
        self._written_to = max(self._written_to, limit)
        release_free_memory()  # the merged tables' buffers, freed: keeps the client flat row after row

    def _close(self, frontier: int) -> float:
        """Merge the pool's seams and finalize and spill every merged polygon that nothing below
        ``frontier`` can join or interact with; keep the pieces of the others. For a class map, the
        finalized polygons are noded against every neighbour still known (the open pieces, the
        context), and the ones an open piece touches stay as context for it. Under sequential
        simplify, what is finalized is a prefix of the canonical order, simplified in order.

        Returns the *watermark*: no row still to come lies above it. Chunks below ``frontier``
        start there, and a group kept open starts no higher than its highest piece."""
        pool, chunk = self._pool, self._pool_chunk
        if len(pool) == 0:
            return frontier
        below = frontier < self.job.height  # pieces are still to come below the frontier
        u, v = seam_links(pool, self._reg[chunk], chunk)
        group = components(len(pool), u, v) if len(u) else np.arange(len(pool))
        merged = merge_groups(pool, group)
        bounds = shapely.bounds(merged.geometry)
        holes = small_holes(merged.geometry, self.job) if self.job.fill_holes > 0 else None
        hu, hv = neighbour_links(bounds, self.job, holes)
        lu, lv = np.r_[hu, group[self._links[0]]], np.r_[hv, group[self._links[1]]]
        kept = linked_to(below & (bounds[:, 3] >= frontier - self.job.hole_reach), lu, lv)
        if self.job.sequential:
            order, tree = canonical_order(merged.prompt_index, bounds, merged.n_px), boxes_tree(bounds)
            kept = self._after_first_kept(kept, self.job.coverage(merged.prompt_index), bounds, order, tree, lu, lv)
            if not kept.all():
                self._spill(self._simplified_in_order(merged, bounds, order[~kept[order]], tree, lu, lv))
            low = bounds[kept, 1].min() if kept.any() else frontier
            keep = self._simplified_bounds[:, 3] >= min(low, frontier)  # what a polygon still to come may meet
            self._simplified, self._simplified_bounds = self._simplified.take(keep), self._simplified_bounds[keep]
        elif not kept.all():
            context = np.concatenate([merged.geometry[kept], self._context.geometry]) if self.job.exclusive else None
            self._spill(finalized_tables(canonical(merged.take(~kept)), self.job, context))
        if self.job.exclusive:  # keep as context what an open piece touches
            known = Pieces.concat([self._context, merged.take(~kept)])
            near = np.zeros(len(known), bool)
            if kept.any() and len(known):
                near[boxes_tree(bounds[kept]).query(boxes(shapely.bounds(known.geometry)),
                                                    predicate="intersects")[0]] = True
            self._context = known.take(near)
        stay = kept[group]
        at = np.cumsum(stay) - 1
        lu, lv = self._links
        both = stay[lu] & stay[lv]
        self._links = (at[lu[both]], at[lv[both]])
        self._pool, self._pool_chunk = pool.take(stay), chunk[stay]
        return min(frontier, float(bounds[kept, 1].min())) if kept.any() else frontier

    def _after_first_kept(self, kept: np.ndarray, prompt: np.ndarray, bounds: np.ndarray, order: np.ndarray,
                          tree: shapely.STRtree, lu: np.ndarray, lv: np.ndarray) -> np.ndarray:
        """Sequential simplify: ``kept`` grown to every polygon from the first kept one in canonical
        ``order`` on, and to what is finalized with those (``lu``, ``lv``). What is left is a prefix
        of the coverage that nothing still open can change. Under ``fill_holes`` a kept polygon may
        still change above the frontier (a hole filled, absorbed as an island): the prefix then
        also stops at the first polygon whose box meets a kept one's (``tree``: every box)."""
        if not kept.any():
            return kept
        pos = np.empty(len(kept), np.int64)
        pos[order] = np.arange(len(kept))
        cut = pos[kept].min()
        if self.job.fill_holes > 0:
            near = meeting(bounds[kept], prompt[kept], tree, prompt)
            cut = min(cut, pos[near].min())
        while True:  # pulling in an island's owner moves the cut up; a few rounds at most
            after = pos >= cut
            grown = linked_to(after, lu, lv)
            if (grown == after).all():
                return after
            cut = pos[grown].min()

    def _simplified_in_order(self, merged: Pieces, bounds: np.ndarray, ids: np.ndarray, tree: shapely.STRtree,
                             lu: np.ndarray, lv: np.ndarray) -> Iterator[Any]:
        """Sequential simplify: the rows of the pieces ``ids`` (a prefix of the coverage, in canonical
        order), a batch at a time. Each batch is simplified beside the pieces to come whose boxes
        meet its own (``tree``: every box; their rows are dropped) and the polygons simplified
        before whose boxes meet one of these (``self._simplified``, appended to): the rows the
        whole coverage gives."""
        coverage = self.job.coverage(merged.prompt_index)
        pending = np.ones(len(merged), bool)  # not simplified yet
        group = components(len(merged), lu, lv) if len(lu) else None
        for batch in _batches(ids, group):
            pending[batch] = False
            near = meeting(bounds[batch], coverage[batch], tree, coverage)
            sel = np.r_[batch, near[pending[near]]]
            part = merged.take(sel)
            part = Pieces(part.prompt_index, shapely.normalize(part.geometry), part.n_px, part.sum_p, part.max_p)
            done = self._simplified
            before = meeting(bounds[sel], coverage[sel], boxes_tree(self._simplified_bounds), done.coverage)
            raw: list[Simplified] = []
            gdf = self.job.finalize(part, self._noding_context(merged, bounds, sel, tree),
                                    simplified_before=done.take(before), raw_out=raw)
            mine = gdf.index.to_numpy() < len(batch)
            gdf, src = gdf[mine], gdf.index.to_numpy()[mine]
            if raw:
                self._simplified = Simplified.concat([done, raw[0].take(mine)])
                self._simplified_bounds = np.concatenate([self._simplified_bounds, bounds[sel[src]]])
            if len(gdf):
                yield keyed_rows(gdf, part, bounds[sel], self.job)

    def _noding_context(self, merged: Pieces, bounds: np.ndarray, sel: np.ndarray,
                        tree: shapely.STRtree) -> np.ndarray | None:
        """A class map: the known neighbours of the pieces ``sel`` outside them (pool pieces, and
        finalized ones kept as context), for noding (see :func:`geoseg.polygons.finalize`)."""
        if not self.job.exclusive:
            return None
        coverage = self.job.coverage(merged.prompt_index)
        near = np.setdiff1d(meeting(bounds[sel], coverage[sel], tree, coverage), sel)
        return np.concatenate([merged.geometry[near], self._context.geometry])

    def finish(self) -> int:
        """Append the remaining deferred pieces, build the index and style; returns the row count."""
        if self._next != len(self._order):
            missing = self._order[self._next]
            raise RuntimeError(f"internal error: chunk {missing} was never added to the polygon output")
        with ticking("seam polygons", self.progress):
            if self._row_parts:
                self._close_row(self.regions[-1].row, self.job.height)
            self._close(frontier=self.job.height)
            self._emit(math.inf)
        self._writer.close()
        if self.job.vector_format == "gpkg":
            from .export import _write_layer_styles

            build_rtree(self._tmp, "segments", progress=self.progress)
            _write_layer_styles(self._tmp, "segments", "geom", list(self.job.prompts))
        return self.features
