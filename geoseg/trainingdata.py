"""Training data for ``geoseg train``: labels, the training area, the spatial split, and tiles.

Tiles reach the model through the SAME read path as ``segment`` (:func:`read_tile` is what
``pipeline.ChunkTiles.batches`` does for one global-grid tile: ``read_window`` of the tile's part
inside the raster, ``to_model_rgb`` with the run's global stretch, zero padding beyond the raster
and at masked pixels), so the model sees at training time exactly what it sees at inference.

Per tile, three arrays:

* ``target`` (P, T, T) uint8: 1 where a label polygon of class k covers the pixel centre, rasterised
  with the tile's full affine transform (rotation and south-up included);
* ``weight`` (T, T) bool: pixels that count in the loss. A pixel counts when it is valid (not
  nodata/alpha/mask/NaN, inside the raster), inside the training area, and in a block of the
  tile's split. Everything else (masked pixels, pixels outside the area, pixels of the other split)
  has weight 0: it is neither positive nor negative.

The training area is the AOI when one is given, else the bounding box of the labels (the user
labelled what is inside that box; pixels beyond it may hold unlabelled objects), always clipped
to the raster. Inside it, pixels outside every label are negatives.

Validation is a spatial hold-out: the raster's pixel grid is cut into square blocks and whole
blocks go to validation, never random tiles (neighbouring tiles overlap and leak). A tile may
straddle a block border; it then serves both splits, each with a weight mask that keeps only the
pixels of its own blocks, so no validation label ever enters the training loss.

Memory is bounded by one block or one tile at a time; nothing here holds the raster or the labels
rasterised whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from .errors import ReferenceDataError, first_line
from .raster import RasterInfo, read_window, to_model_rgb
from .tiling import Region, tile_starts

log = logging.getLogger(__name__)

TRAIN, VAL = 0, 1
#: Block sides tried, largest first, when --block-size is not given: the largest that cuts the
#: training area into at least MIN_BLOCKS blocks (big blocks leak less across the split border).
BLOCK_CHOICES = (2048, 1024, 704, 352, 176)
MIN_BLOCKS = 10
#: Seeded shuffles tried to find a split where every class has pixels in both splits.
SPLIT_TRIES = 64


# -- labels and the training area ------------------------------------------------------------

def _read_vector(path: str | Path, what: str):
    import geopandas as gpd

    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio's DataSourceError, OSError, ...
        raise ReferenceDataError(f"{path}: cannot read the {what} as vector data: {first_line(exc)}") from exc
    if gdf.crs is None:
        raise ReferenceDataError(f"{path}: the {what} have no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if gdf.empty:
        raise ReferenceDataError(f"{path}: the {what} hold no geometry")
    kinds = set(gdf.geometry.geom_type)
    if not kinds <= {"Polygon", "MultiPolygon"}:
        other = ", ".join(sorted(kinds - {"Polygon", "MultiPolygon"}))
        raise ReferenceDataError(f"{path}: the {what} must be polygons, found {other}")
    return gdf


@dataclass(frozen=True)
class Labels:
    """Label polygons in the raster's CRS and their class values (as text, sorted)."""

    path: str
    geometries: tuple          # shapely geometries, raster CRS
    classes_of: tuple[str, ...]  # class value of each geometry
    classes: tuple[str, ...]
    class_field: str | None
    reprojected_from: str | None

    def of_class(self, cls: str) -> list:
        return [g for g, c in zip(self.geometries, self.classes_of) if c == cls]


def load_labels(path: str | Path, class_field: str | None, crs, single_class: str | None = None) -> Labels:
    """Read label polygons, keep those with a class, reproject them to the raster's ``crs``.

    ``class_field`` None means one class for every polygon, named ``single_class``.
    """
    gdf = _read_vector(path, "labels")
    if class_field is not None:
        if class_field not in gdf.columns:
            fields = ", ".join(c for c in gdf.columns if c != gdf.geometry.name) or "none"
            raise ReferenceDataError(f"{path}: no field {class_field!r} for --class-field (fields: {fields})")
        values = gdf[class_field]
        missing = int(values.isna().sum())
        if missing:
            log.warning("%s: %d polygons have no %r value and are ignored", path, missing, class_field)
        gdf = gdf[values.notna()]
        if gdf.empty:
            raise ReferenceDataError(f"{path}: no polygon has a value in field {class_field!r}")
        classes_of = tuple(str(v) for v in gdf[class_field])
    else:
        classes_of = (str(single_class),) * len(gdf)
    reprojected = None
    if not gdf.crs.equals(crs):
        reprojected = gdf.crs.to_string()
        log.info("%s: reprojecting labels from %s to the raster's CRS", path, reprojected)
        gdf = gdf.to_crs(crs)
    geoms = tuple(g.buffer(0) if not g.is_valid else g for g in gdf.geometry)
    return Labels(str(path), geoms, classes_of, tuple(sorted(set(classes_of))), class_field, reprojected)


def footprint(info: RasterInfo):
    """The raster's outline in its CRS (a parallelogram for rotated grids)."""
    from shapely.geometry import Polygon

    t = info.transform
    corners = [(0, 0), (info.width, 0), (info.width, info.height), (0, info.height)]
    return Polygon([t @ c for c in corners])


def training_area(info: RasterInfo, labels: Labels, aoi_path: str | Path | None, raster_name: str):
    """The area whose unlabelled pixels are negatives: the AOI, else the labels' bounding box,
    clipped to the raster. Refuses labels (or an AOI) that miss the raster."""
    from shapely import box, union_all

    fp = footprint(info)
    labelled = union_all(labels.geometries)
    if not labelled.intersects(fp):
        lb = ", ".join(f"{v:.6g}" for v in labelled.bounds)
        rb = ", ".join(f"{v:.6g}" for v in fp.bounds)
        raise ReferenceDataError(f"{labels.path}: no label polygon overlaps the raster {raster_name} "
                          f"(labels' bounds {lb}, raster's {rb}, in the raster's CRS)")
    if aoi_path is not None:
        gdf = _read_vector(aoi_path, "AOI polygons")
        if not gdf.crs.equals(info.crs):
            gdf = gdf.to_crs(info.crs)
        area = union_all(list(gdf.geometry))
        if not area.intersects(fp):
            raise ReferenceDataError(f"{aoi_path}: the AOI does not overlap the raster {raster_name}")
    else:
        area = box(*labelled.bounds)
    return area.intersection(fp)


def pixel_window(info: RasterInfo, geom) -> Region:
    """The working-grid pixel rectangle covering ``geom``, clipped to the raster."""
    inv = ~info.transform
    x0, y0, x1, y1 = geom.bounds
    cols, rows = zip(*(inv @ (x, y) for x in (x0, x1) for y in (y0, y1)))
    r0, c0 = max(0, math.floor(min(rows))), max(0, math.floor(min(cols)))
    r1, c1 = min(info.height, math.ceil(max(rows))), min(info.width, math.ceil(max(cols)))
    return Region(r0, c0, max(0, r1 - r0), max(0, c1 - c0))


# -- rasterising ----------------------------------------------------------------------------

def _transform(info: RasterInfo, region: Region) -> Affine:
    return info.region_transform(region)


def rasterize_mask(geoms: Sequence, info: RasterInfo, region: Region) -> np.ndarray:
    """(h, w) bool: pixel centres inside any of ``geoms``, with the region's full affine transform."""
    from rasterio.features import rasterize

    shape = (region.height, region.width)
    if not geoms:
        return np.zeros(shape, bool)
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=_transform(info, region),
                     fill=0, dtype="uint8").astype(bool)


class LabelIndex:
    """Labels with a spatial index, so each tile or block rasterises only the polygons near it."""

    def __init__(self, labels: Labels, info: RasterInfo):
        from shapely import STRtree

        self.labels, self.info = labels, info
        self.tree = STRtree(list(labels.geometries))
        self.class_index = np.array([labels.classes.index(c) for c in labels.classes_of])

    def targets(self, region: Region) -> np.ndarray:
        """(P, h, w) uint8: 1 where a polygon of class k covers the pixel."""
        from shapely import box

        out = np.zeros((len(self.labels.classes), region.height, region.width), np.uint8)
        t = _transform(self.info, region)
        corners = [t @ (c, r) for c in (0, region.width) for r in (0, region.height)]
        xs, ys = zip(*corners)
        near = self.tree.query(box(min(xs), min(ys), max(xs), max(ys)))
        for k in range(len(self.labels.classes)):
            geoms = [self.labels.geometries[i] for i in near if self.class_index[i] == k]
            out[k] = rasterize_mask(geoms, self.info, region)
        return out


# -- the spatial split -----------------------------------------------------------------------

def pick_block_size(window: Region, block_size: int | None) -> int:
    if block_size:
        return block_size
    for size in BLOCK_CHOICES:
        if math.ceil(window.height / size) * math.ceil(window.width / size) >= MIN_BLOCKS:
            return size
    return BLOCK_CHOICES[-1]


@dataclass(frozen=True)
class Split:
    """Which blocks of the raster's block grid are validation blocks, and the per-split pixel counts."""

    block_size: int
    val_blocks: frozenset[tuple[int, int]]
    blocks: int                           # blocks with training-area pixels
    area_pixels: tuple[int, int]          # (train, val) training-area pixels
    class_pixels: tuple[tuple[int, int], ...]  # per class: (train, val) label pixels in the area

    def split_map(self, region: Region) -> np.ndarray:
        """(h, w) uint8: TRAIN or VAL for every pixel of ``region``."""
        b = self.block_size
        rows = np.arange(region.row, region.row_stop) // b
        cols = np.arange(region.col, region.col_stop) // b
        out = np.zeros((region.height, region.width), np.uint8)
        for (br, bc) in self.val_blocks:
            out[np.ix_(rows == br, cols == bc)] = VAL
        return out


def block_stats(info: RasterInfo, area, index: LabelIndex, window: Region, block: int):
    """Per block of the grid meeting ``window``: (block, area pixels, label pixels per class in the area).

    One block rasterised at a time (bounded memory)."""
    out = []
    for r in range(window.row // block * block, window.row_stop, block):
        for c in range(window.col // block * block, window.col_stop, block):
            reg = Region(r, c, min(block, info.height - r), min(block, info.width - c))
            inside = rasterize_mask([area], info, reg)
            n = int(inside.sum())
            if n:
                counts = [int((t.astype(bool) & inside).sum()) for t in index.targets(reg)]
                out.append(((r // block, c // block), n, counts))
    return out


def split_blocks(stats, classes: Sequence[str], val_fraction: float, seed: int, block: int) -> Split:
    """Assign whole blocks to validation until ``val_fraction`` of the area's pixels are held out.

    Seeded shuffles are tried until one gives every class pixels on both sides; if none does, the
    first is kept with a warning (validation IoU of that class is then undefined or pessimistic).
    """
    n_classes = len(classes)
    total = sum(s[1] for s in stats)
    pick = None
    if val_fraction > 0:
        rng = np.random.default_rng(seed)
        first = None
        for _ in range(SPLIT_TRIES):
            order = rng.permutation(len(stats))
            chosen: list[int] = []
            held = 0
            for i in order:
                if held >= val_fraction * total or len(chosen) == len(stats) - 1:
                    break
                chosen.append(int(i))
                held += stats[i][1]
            chosen_set = set(chosen)
            both = all(any(stats[i][2][k] for i in chosen_set) and
                       any(stats[i][2][k] for i in range(len(stats)) if i not in chosen_set)
                       for k in range(n_classes))
            first = first or chosen_set
            if both:
                pick = chosen_set
                break
        if pick is None:
            pick = first or set()
            log.warning("no block split gives every class pixels in both training and validation "
                        "(%d blocks of %d px); validation IoU of some class is not meaningful", len(stats), block)
    pick = pick or set()
    area = (sum(s[1] for i, s in enumerate(stats) if i not in pick), sum(stats[i][1] for i in pick))
    per_class = tuple((sum(s[2][k] for i, s in enumerate(stats) if i not in pick),
                       sum(stats[i][2][k] for i in pick)) for k in range(n_classes))
    return Split(block, frozenset(stats[i][0] for i in pick), len(stats), area, per_class)


# -- tiles -----------------------------------------------------------------------------------

def tile_grid(window: Region, tile: int, stride: int) -> list[Region]:
    """Tiles of side ``tile`` every ``stride`` px over ``window`` (the last flush with its edge);
    a window smaller than a tile gets one tile at its origin (padded where it leaves the raster)."""
    rows = [window.row + s for s in tile_starts(window.height, tile, stride)]
    cols = [window.col + s for s in tile_starts(window.width, tile, stride)]
    return [Region(r, c, tile, tile) for r in rows for c in cols]


def raster_region(info: RasterInfo) -> Region:
    return Region(0, 0, info.height, info.width)


def read_tile(src, info: RasterInfo, tile: Region) -> tuple[np.ndarray, np.ndarray]:
    """(3, T, T) float32 model input and (T, T) valid mask of one tile, exactly as ``segment``
    feeds it: the part inside the raster through ``read_window`` + ``to_model_rgb`` (global
    stretch, bands, palette, masks), zeros beyond the raster and at masked pixels."""
    rgb = np.zeros((3, tile.height, tile.width), np.float32)
    valid = np.zeros((tile.height, tile.width), bool)
    inside = tile.intersection(raster_region(info))
    if inside is not None:
        data, ok = read_window(src, info, inside)
        part, ok = to_model_rgb(data, ok, info)
        where = inside.slices(within=tile)
        rgb[(slice(None), *where)] = part
        valid[where] = ok
    return rgb, valid


@dataclass(frozen=True)
class TileSet:
    """Everything to produce a tile's input, targets and weights on demand (no pixels held)."""

    info: RasterInfo
    area: object            # shapely geometry, raster CRS
    index: LabelIndex
    split: Split

    def weights_and_targets(self, tile: Region, valid: np.ndarray, which: int) -> tuple[np.ndarray, np.ndarray]:
        """(P, T, T) uint8 targets and (T, T) bool weight of ``tile`` for split ``which``."""
        weight = valid & rasterize_mask([self.area], self.info, tile)
        weight &= self.split.split_map(tile) == which
        return self.index.targets(tile), weight

    def has_pixels(self, tile: Region, which: int) -> bool:
        """Whether ``tile`` has training-area pixels of split ``which`` inside the raster (masks not read)."""
        inside = tile.intersection(raster_region(self.info))
        if inside is None:
            return False
        w = rasterize_mask([self.area], self.info, inside) & (self.split.split_map(inside) == which)
        return bool(w.any())

    def sample(self, src, tile: Region, which: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb, targets, weight) of one tile for split ``which``."""
        rgb, valid = read_tile(src, self.info, tile)
        targets, weight = self.weights_and_targets(tile, valid, which)
        return rgb, targets, weight
