"""Streaming polygons (geoseg.streaming): the file streamed chunk by chunk has exactly the features of
the old all-at-once path (merge every chunk's pieces, finalize once, write once), for any chunk
size, several prompts and many seam-crossing objects, with hole filling and class maps too; rows
come in a deterministic order; the client holds about one row of seams at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine

from geoseg.classes import class_map, exclusive
from geoseg.pieces import Pieces, chunk_components, merge_seams
from geoseg.polygons import finalize
from geoseg.streaming import (
    FINAL_SUFFIX,
    KEY_COLUMNS,
    SEAM_SUFFIX,
    PolygonOutput,
    VectorJob,
    _RowMerge,
    _SortedRows,
    part_seams,
    part_tables,
    write_chunk_polygons,
)
from geoseg.tiling import Region

SIZE = 240
PROMPTS = ("a", "b", "c")
THRESHOLDS = (0.5, 0.5, 0.6)
TRANSFORM = Affine(0.5, 0, 500000, 0, -0.5, 4500000)
CRS = "EPSG:32633"


def blobs(seed: int = 3) -> np.ndarray:
    """(3, SIZE, SIZE) probabilities: discs, rings (holes with islands inside), bars and speckle,
    placed at random so that many of them cross any chunk border; the prompts overlap."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    probs = rng.random((3, SIZE, SIZE), dtype=np.float32) * 0.3  # background below every threshold
    for p in range(3):
        for _ in range(60):
            cy, cx, r = rng.integers(0, SIZE), rng.integers(0, SIZE), rng.integers(2, 18)
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            kind = rng.integers(0, 3)
            if kind == 0:
                inside = d2 <= r * r
            elif kind == 1:  # ring with an island of the same prompt in its hole
                inside = ((d2 <= r * r) & (d2 >= (r // 2) ** 2)) | (d2 <= 1)
            else:
                inside = (np.abs(yy - cy) <= 1) & (np.abs(xx - cx) <= 3 * r)
            probs[p][inside] = 0.65 + 0.3 * rng.random(int(inside.sum()), dtype=np.float32)
        speckle = rng.random((SIZE, SIZE)) < 0.03
        probs[p][speckle] = 0.9
    return probs


def regions_of(chunk: int) -> list[Region]:
    return [Region(r, c, min(chunk, SIZE - r), min(chunk, SIZE - c))
            for r in range(0, SIZE, chunk) for c in range(0, SIZE, chunk)]


def components_of(probs, regions):
    if isinstance(probs, ClassMap):  # a class map's pieces, as segment --classes makes them
        valid = np.ones(probs.probs.shape[1:], bool)
        probs = exclusive(probs.probs, class_map(probs.probs, valid, THRESHOLDS))
    valid = np.ones(probs.shape[1:], bool)
    return [chunk_components(probs[:, r.row:r.row_stop, r.col:r.col_stop], valid[r.row:r.row_stop, r.col:r.col_stop],
                             r.row, r.col, THRESHOLDS) for r in regions]


def pieces_of(probs, regions):
    return [Pieces.concat([c.pieces() for c in comps]) for comps in components_of(probs, regions)]


def streamed(tmp: Path, probs, chunk: int, job: VectorJob, order=None, stats: dict | None = None) -> gpd.GeoDataFrame:
    """Chunk tasks' parts, then the client's streamed file (chunks added in ``order``)."""
    regions = regions_of(chunk)
    (tmp / "parts").mkdir(parents=True, exist_ok=True)
    for r, comps in zip(regions, components_of(probs, regions)):
        write_chunk_polygons(tmp, r.name, comps, r, job)
    path = tmp / f"polygons.{job.vector_format}"
    with PolygonOutput(path, regions, job) as out:
        for r in (order(regions) if order else regions):
            out.add(r.name, part_tables(tmp / "parts" / f"{r.name}{FINAL_SUFFIX}"),
                    part_seams(tmp / "parts" / f"{r.name}{SEAM_SUFFIX}"))
        n = out.finish()
    if stats is not None:
        stats["peak_pool"] = out.peak_pool
        stats["final"] = sum(len(pd.read_parquet(tmp / "parts" / f"{r.name}{FINAL_SUFFIX}")) for r in regions)
        stats["deferred"] = sum(len(part_seams(tmp / "parts" / f"{r.name}{SEAM_SUFFIX}")()[0]) for r in regions)
    gdf = gpd.read_file(path, layer="segments") if job.vector_format == "gpkg" else gpd.read_parquet(path)
    assert len(gdf) == n
    return gdf


def all_at_once(probs, chunk: int, job: VectorJob) -> gpd.GeoDataFrame:
    """The pre-streaming path: every chunk's pieces merged, finalized in one call."""
    regions = regions_of(chunk)
    merged = merge_seams(pieces_of(probs, regions), [(r.row, r.col, r.height, r.width) for r in regions])
    return job.finalize(merged)


def as_rows(gdf) -> pd.DataFrame:
    """Features as a table in their order: attributes + normalized WKB (a one-part MultiPolygon, as
    the GeoPackage stores every row, compares equal to its Polygon)."""
    geoms = np.asarray(gdf.geometry.values, dtype=object).copy()
    one = shapely.get_num_geometries(geoms) == 1
    geoms[one] = shapely.get_geometry(geoms[one], 0)
    df = pd.DataFrame(gdf.drop(columns="geometry")).astype({"prompt": object}).reset_index(drop=True)
    df["wkb"] = shapely.to_wkb(shapely.normalize(geoms))
    return df


def canonical(gdf) -> pd.DataFrame:
    """Features as a sorted table (the same features, whatever their order)."""
    return as_rows(gdf).sort_values(["prompt_index", "wkb"]).reset_index(drop=True)


def job(transform: Affine = TRANSFORM, **kw) -> VectorJob:
    return VectorJob(PROMPTS, THRESHOLDS, tuple(transform)[:6], CRS, SIZE, SIZE, **kw)


#: 0.5 m pixels turned by 30°: map-space boxes are not pixel boxes
ROTATED = Affine.translation(500000, 4500000) @ Affine.rotation(30) @ Affine.scale(0.5, -0.5)


@dataclass(frozen=True)
class ClassMap:
    """Probabilities that :func:`components_of` makes a class map (one class per pixel) of."""

    probs: np.ndarray


CLASSES = ClassMap(blobs())  # the same blobs, made a class map


@pytest.fixture(scope="module")
def probs():
    return blobs()


OPTIONS = {
    "plain": {},
    "min_area+reproject": {"min_area": 3.0, "dst_crs": "EPSG:4326"},
    "fill_holes+simplify": {"fill_holes": 40.0, "simplify": 0.6, "min_area": 1.0},
    "simplify+rotated": {"simplify": 1.5, "transform": ROTATED},  # 3 px: edges reach far
    # 6 m² = 24 px: rings of radius 6-7 fill their hole and absorb the island in it; hole_reach 50 px
    "fill_holes": {"fill_holes": 6.0, "min_area": 1.0},
    "classes": {"exclusive": True},
    "classes+fill_holes": {"exclusive": True, "fill_holes": 6.0},
    "classes+simplify": {"exclusive": True, "simplify": 1.0},
}


@pytest.mark.parametrize("fmt", ["gpkg", "parquet"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_streamed_file_has_the_all_at_once_features_for_any_chunk_size(tmp_path, probs, options, fmt):
    j = job(vector_format=fmt, **OPTIONS[options])
    if j.exclusive:
        probs = CLASSES
    whole = as_rows(all_at_once(probs, SIZE, j))  # one chunk: nothing to merge
    reference = canonical(all_at_once(probs, SIZE, j))
    seam_crossing = 0
    for chunk in (64, 100, SIZE):
        got = streamed(tmp_path / f"c{chunk}", probs, chunk, j)
        # exact: every value comes from the same functions on the same inputs (no tolerance), and
        # the rows come in the same (canonical) order whatever the chunk size
        pd.testing.assert_frame_equal(as_rows(got), whole, check_exact=True, check_dtype=False)
        pd.testing.assert_frame_equal(canonical(got), reference, check_exact=True, check_dtype=False)
        pd.testing.assert_frame_equal(canonical(all_at_once(probs, chunk, j)), reference, check_exact=True,
                                      check_dtype=False)
        if chunk == 64:
            seam_crossing = sum(len(read()[0]) for read in (
                part_seams(tmp_path / f"c{chunk}" / "parts" / f"{r.name}{SEAM_SUFFIX}")
                for r in regions_of(chunk)))
    assert len(reference) > 50
    assert seam_crossing > 100  # the case really has many seam pieces


def test_rows_come_in_canonical_order_whatever_order_chunks_finish(tmp_path, probs):
    j = job()
    forward = streamed(tmp_path / "f", probs, 64, j)
    backward = streamed(tmp_path / "b", probs, 64, j, order=lambda rs: rs[::-1])
    shuffled = streamed(tmp_path / "s", probs, 64, j, order=lambda rs: list(np.random.default_rng(1).permutation(rs)))
    for other in (backward, shuffled):
        assert list(other.geometry.to_wkb()) == list(forward.geometry.to_wkb())
        pd.testing.assert_frame_equal(other.drop(columns="geometry"), forward.drop(columns="geometry"),
                                      check_exact=True)
    # canonical order: by the top row of each polygon (its north edge), then its west edge; the
    # first rows start on the raster's first row, west to east, across several chunks
    b = forward.geometry.bounds
    key = np.stack([-b.maxy.to_numpy(), b.minx.to_numpy()], axis=1)
    assert all(tuple(key[i]) <= tuple(key[i + 1]) for i in range(len(key) - 1))
    first = b.iloc[:20]
    assert (first.maxy == TRANSFORM.f).all() and first.minx.is_monotonic_increasing
    assert first.minx.iloc[-1] > TRANSFORM.c + 64 * TRANSFORM.a  # beyond the first 64-px chunk


def test_empty_result_is_a_valid_layer_with_schema_and_crs(tmp_path):
    j = job()
    gdf = streamed(tmp_path, np.zeros((3, SIZE, SIZE), np.float32), 100, j)
    assert len(gdf) == 0 and gdf.crs.to_epsg() == 32633
    assert list(gdf.columns)[:-1] == ["prompt", "prompt_index", "threshold", "mean_prob", "max_prob", "pixels",
                                      "area_m2", "perimeter_m", "n_holes", "compactness"]


@pytest.mark.parametrize(("options", "chunk", "final_ratio", "pool_share"), [
    ({}, 60, 5, 0.5),
    ({"fill_holes": 0.5}, 80, 2, 0.6),  # hole_reach 6 px
    ({"exclusive": True}, 60, 5, 0.5),   # a class map: touching neighbours are context, not links
])
def test_chunks_finalize_most_pieces_and_the_client_holds_about_one_row_of_seams(tmp_path, probs, options, chunk,
                                                                                final_ratio, pool_share):
    """The bounded rules at work (not "defer everything"): most rows are final in their chunk, and
    the client's pool holds about one row of chunks' deferred pieces at a time, well below all of
    them."""
    stats: dict = {}
    j = job(**options)
    streamed(tmp_path, CLASSES if j.exclusive else probs, chunk, j, stats=stats)
    assert stats["final"] > final_ratio * stats["deferred"], stats
    assert stats["peak_pool"] < pool_share * stats["deferred"], stats


def test_simplify_closes_groups_row_by_row_and_keeps_the_result_exact(tmp_path):
    """Under simplify every piece goes to the client, which finalizes each group of polygons whose
    boxes chain together once no piece still to come can join it. With separate objects (discs
    on a 20 px grid, some across seams) it holds about one row of chunks' pieces, not all of them,
    and the file is the one-chunk file row for row."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    probs = np.zeros((3, SIZE, SIZE), np.float32)
    for cy in range(0, SIZE, 20):  # rows 60, 120, 180 lie on seams
        for cx in range(0, SIZE, 20):
            probs[(cy + cx) % 3][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 0.8
    stats: dict = {}
    j = job(simplify=0.6)
    got = streamed(tmp_path, probs, 60, j, stats=stats)
    assert stats["final"] == 0  # no chunk can decide alone (module docstring)
    assert stats["deferred"] > 144  # discs on seams come in pieces
    assert stats["peak_pool"] < 0.35 * stats["deferred"], stats  # 4 rows of chunks: a row and its seams
    pd.testing.assert_frame_equal(as_rows(got), as_rows(all_at_once(probs, SIZE, j)), check_exact=True,
                                  check_dtype=False)


@pytest.mark.parametrize(("tolerance", "chunk", "band"), [
    (0.3, 30, 256),  # 8 rows of chunks, each taken in whole (0.32 measured)
    (0.6, 120, 20),  # 2 rows of chunks, taken in bands of 20 rows (0.28 measured; 0.64 in whole rows)
])  # 0.6 m = 1.2 px: staircase corners go
def test_simplify_streams_dense_speckle_exactly_a_band_at_a_time(tmp_path, monkeypatch, tolerance, chunk, band):
    """Speckle (every box meets its neighbours', in a chain across the raster) under simplify: the
    client holds a band of rows' pieces and the band above it up to the top of the tallest object
    touching its lower border, not every piece, and the file is the one-chunk file row for row:
    each prefix of the coverage is simplified beside the polygons simplified before it."""
    import geoseg.streaming as streaming

    monkeypatch.setattr(streaming, "SIMPLIFY_BAND_ROWS", band)
    rng = np.random.default_rng(5)
    probs = rng.random((3, SIZE, SIZE), dtype=np.float32)
    probs[1:] *= 0.8  # three prompts, the first the densest
    stats: dict = {}
    j = job(simplify=tolerance, transform=ROTATED)
    whole = all_at_once(probs, SIZE, j)
    got = streamed(tmp_path, probs, chunk, j, stats=stats)
    assert len(whole) > 10_000
    assert stats["peak_pool"] < 0.4 * stats["deferred"], stats
    pd.testing.assert_frame_equal(as_rows(got), as_rows(whole), check_exact=True, check_dtype=False)


def test_simplify_with_fill_holes_streams_dense_speckle_exactly_in_small_batches(tmp_path, monkeypatch):
    """Speckle with small holes under fill_holes + simplify, finalized 200 polygons at a time: the
    prefix stops before any polygon whose box meets one that may still change above the frontier
    (a hole yet to be filled): GEOS simplifies this case differently without that rule (found by a
    search over seeds)."""
    import geoseg.streaming as streaming

    rng = np.random.default_rng(31)
    density = rng.uniform(0.4, 0.6)
    probs = rng.random((3, SIZE, SIZE), dtype=np.float32)
    probs[0] = np.where(rng.random((SIZE, SIZE)) < density, 0.9, 0.1)
    probs[1:] *= 0.5
    j = job(simplify=1.5, fill_holes=1.0, transform=ROTATED)
    whole = all_at_once(probs, SIZE, j)
    monkeypatch.setattr(streaming, "BATCH_ROWS", 200)
    got = streamed(tmp_path, probs, 64, j)
    assert len(whole) > 1000 and whole.n_holes.sum() < all_at_once(probs, SIZE, job()).n_holes.sum() / 2
    pd.testing.assert_frame_equal(as_rows(got), as_rows(whole), check_exact=True, check_dtype=False)


@pytest.mark.parametrize(("options", "chunk", "band", "batch", "pool_share"), [
    ({"simplify": 0.6}, 120, 20, 20_000, 0.2),  # 2 rows of chunks in bands of 20 rows: 0.13 measured
    # 4 rows of chunks, each in whole, batches of 300: 0.38 measured (a row of chunks and the rows
    # above it that a hole still to be filled may reach)
    ({"simplify": 1.5, "fill_holes": 1.0, "min_area": 0.5}, 64, 256, 300, 0.45),
])
def test_class_map_simplify_streams_a_fragmented_map_exactly_a_band_at_a_time(tmp_path, monkeypatch, options, chunk,
                                                                              band, batch, pool_share):
    """A class map of speckle (three classes and gaps, neighbours sharing edges, every box meeting
    its neighbours' across the raster) under simplify: the client holds a band's pieces, not all
    of them, and the file is the one-chunk file row for row. Each prefix of the coverage is
    simplified with the edges it shares with polygons simplified before it held as they came out,
    and the outside as a frame (geoseg.polygons._simplify_after)."""
    import geoseg.streaming as streaming

    monkeypatch.setattr(streaming, "SIMPLIFY_BAND_ROWS", band)
    monkeypatch.setattr(streaming, "BATCH_ROWS", batch)
    speckle = ClassMap(np.random.default_rng(7).random((3, SIZE, SIZE), dtype=np.float32))
    stats: dict = {}
    j = job(exclusive=True, transform=ROTATED, **options)
    whole = all_at_once(speckle, SIZE, j)
    got = streamed(tmp_path, speckle, chunk, j, stats=stats)
    assert len(whole) > 5_000 and len(set(whole.prompt)) == 3
    assert stats["peak_pool"] < pool_share * stats["deferred"], stats
    pd.testing.assert_frame_equal(as_rows(got), as_rows(whole), check_exact=True, check_dtype=False)


def test_simplify_keeps_open_what_an_object_crossing_the_frontier_may_grow_around(tmp_path):
    """An L whose bar crosses the seam y=64 and whose leg, below it, reaches left under a pixel in
    the L's notch: above the seam, its box clear of the bar's. GEOS keeps a vertex of the L that it
    removes when the pixel is not in the same coverage, so the pixel must wait for the row below,
    though its box meets nothing of the first row of chunks (found by a search over such shapes)."""
    probs = np.zeros((3, SIZE, SIZE), np.float32)
    probs[0, 58:68, 100:102] = 0.8  # the bar, across y=64
    probs[0, 64:68, 96:102] = 0.8   # the leg, in the second row of chunks
    probs[0, 62, 98] = 0.8          # the pixel: rows 62-63, cols 98-99
    j = job(simplify=1.5)           # 3 px
    whole = all_at_once(probs, SIZE, j)
    without = probs.copy()
    without[0, 62, 98] = 0
    assert len(whole) == 2
    assert not all_at_once(without, SIZE, j).geometry.iloc[0].equals(whole.geometry.iloc[0]), \
        "the pixel must change how the L simplifies"
    got = streamed(tmp_path, probs, 64, j)
    pd.testing.assert_frame_equal(as_rows(got), as_rows(whole), check_exact=True, check_dtype=False)


def holes_across_seams() -> np.ndarray:
    """Prompt 0: islands in holes of 5-6.25 m² (filled under fill_holes=7) whose rings reach a seam:

    * a ring closed across the vertical seam x=64, its island 2 px from it (the chunk must defer
      an island that touches no seam);
    * a ring closed across the horizontal seam y=64, island 1 px above it (the client must keep
      the island open until the row below arrives);
    * a bar crossing the seam x=120 with a hole and island 100 px from every seam of 120 px chunks
      (linked to the bar by its hole, not by distance)."""
    probs = np.zeros((3, SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cy, cx in ((45, 60), (61, 180)):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        probs[0][((d2 <= 49) & (d2 >= 9)) | (d2 <= 1)] = 0.8
    probs[0, 5:26, 5:126] = 0.8
    probs[0, 12:17, 10:14] = 0.0  # a 5 x 4 hole ...
    probs[0, 14, 11] = 0.8        # ... with a one-pixel island
    return probs


def test_fill_holes_absorbs_islands_across_seams_exactly(tmp_path):
    j = job(fill_holes=7.0)
    data = holes_across_seams()
    reference = canonical(all_at_once(data, SIZE, j))
    assert len(all_at_once(data, SIZE, job())) == 6  # three containers, three islands
    assert len(reference) == 3 and (reference.n_holes == 0).all()  # every island absorbed
    for chunk in (64, 120):
        got = streamed(tmp_path / f"c{chunk}", data, chunk, j)
        pd.testing.assert_frame_equal(canonical(got), reference, check_exact=True, check_dtype=False)


def test_simplify_finalizes_an_island_in_its_owners_batch(tmp_path, monkeypatch):
    """Sequential simplify one polygon at a time (BATCH_ROWS = 1): an island to be absorbed is
    finalized in its owner's batch, never alone after it."""
    import geoseg.streaming as streaming

    monkeypatch.setattr(streaming, "BATCH_ROWS", 1)
    j = job(fill_holes=7.0, simplify=0.6)
    data = holes_across_seams()
    whole = all_at_once(data, SIZE, j)
    assert len(whole) == 3 and (whole.n_holes == 0).all()
    for chunk in (64, 120):
        got = streamed(tmp_path / f"c{chunk}", data, chunk, j)
        pd.testing.assert_frame_equal(as_rows(got), as_rows(whole), check_exact=True, check_dtype=False)


def test_hole_reach_bounds_a_seam_closed_hole():
    """A ring that closes across a seam around an island: with hole filling the island must wait
    for the client (it is absorbed there), so it lies within hole_reach of the seam."""
    j = job(fill_holes=6.0)
    # 6 m² / (0.5 x 0.25 m² per pixel, halved for the margin) = 48 pixels, + 2
    assert j.hole_pixels == 48 and j.hole_reach == 50
    assert job().hole_reach == 0
    assert job(fill_holes=1e9).hole_reach == 2 * SIZE  # capped: every piece within reach
    assert job(fill_holes=1e9).hole_pixels == SIZE * SIZE  # a hole's size is not capped below the raster's
    geographic = VectorJob(PROMPTS, THRESHOLDS, (0.001, 0, 10, 0, -0.001, 60), "EPSG:4326", SIZE, SIZE,
                           fill_holes=1000.0)
    # a 0.001° pixel at 60° N is about 111 m x 55.8 m; the smallest of the sampled pixels sets the reach
    low, high = (2 * 1000 / (111.7e3 * 0.001 * 55.9e3 * 0.001), 2 * 1000 / (111.3e3 * 0.001 * 55.5e3 * 0.001) + 1)
    assert low < geographic.hole_pixels < high


@pytest.mark.parametrize("options", ["plain", "fill_holes", "classes+fill_holes"])
def test_tiny_batches_give_the_same_file(tmp_path, probs, options, monkeypatch):
    """Polygons made 5 at a time and finalized ~7 rows at a time (never cutting a group of linked
    pieces, whose island absorption and noding need each other) give the one-batch result."""
    import geoseg.pieces
    import geoseg.streaming

    j = job(**OPTIONS[options])
    data = CLASSES if j.exclusive else probs
    reference = canonical(all_at_once(data, 100, j))
    seen: list[int] = []
    real = geoseg.streaming.VectorJob.finalize
    monkeypatch.setattr(geoseg.streaming, "BATCH_ROWS", 7)
    monkeypatch.setattr(geoseg.pieces, "_SHAPES_BATCH", 5)
    monkeypatch.setattr(geoseg.streaming.VectorJob, "finalize",
                        lambda self, p, context=None: seen.append(len(p)) or real(self, p, context))
    got = streamed(tmp_path, data, 100, j)
    pd.testing.assert_frame_equal(canonical(got), reference, check_exact=True, check_dtype=False)
    assert sum(1 for n in seen if 0 < n <= 7) > 10  # the chunks really worked in small batches


def corner_closed_hole(m: np.ndarray, r0: int, c0: int, length: int) -> None:
    """Two pieces that touch only at corners around a 3 x 3 hole (with a one-pixel island) and join
    ``length`` columns away: the hole is a hole only once they merge, far from the hole."""
    m[r0 + 1:r0 + 7, c0 + 3] = m[r0 + 1, c0 + 3:c0 + length] = m[r0 + 3, c0 + 3:c0 + 7] = True  # A
    m[r0 + 4:r0 + 8, c0 + 7] = m[r0 + 7, c0 + 4:c0 + length] = m[r0 + 1:r0 + 8, c0 + length - 1] = True  # B
    m[r0 + 5, c0 + 5] = True  # the island


def test_holes_closed_at_corners_across_seams_fill_exactly(tmp_path):
    """Prompt 0: pieces joined through the next chunk close a hole far from every seam (the chunk
    must tie the island to them); prompt 1, the same transposed: joined through the row below,
    with the island near a vertical seam but far from the frontier (the client must keep it)."""
    j = job(fill_holes=3.0)  # 12 px; the 9 px hole fills; hole_reach 26 px
    m = np.zeros((3, SIZE, SIZE), bool)
    corner_closed_hole(m[0], 20, 0, 131)
    corner_closed_hole(m[1].T, 40, 0, 131)  # island at row 5, column 45
    data = np.where(m, np.float32(0.9), np.float32(0.1))
    reference = canonical(all_at_once(data, SIZE, j))
    assert len(all_at_once(data, SIZE, job())) == 4  # per prompt: the joined pieces, the island
    # the island absorbed; the long hole between the arms (over 12 px) stays
    assert list(reference.pixels) == [272, 272] and list(reference.n_holes) == [1, 1]
    for chunk in (64, 120):
        got = streamed(tmp_path / f"c{chunk}", data, chunk, j)
        pd.testing.assert_frame_equal(canonical(got), reference, check_exact=True, check_dtype=False)


def _sorted_tables(rng, n: int, sizes: list[int]) -> tuple[list, pd.DataFrame]:
    """``n`` keyed rows sorted by key, cut into tables of ``sizes`` rows (tops repeat a lot)."""
    import pyarrow as pa

    key = {k: rng.integers(0, 6 if k == "_top" else 3, n) for k in KEY_COLUMNS}
    df = pd.DataFrame(key).sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    df["row"] = rng.permutation(n)  # a payload that tells rows apart
    df = df[["row", *KEY_COLUMNS]]
    cuts = np.cumsum([0, *sizes])
    return [pa.Table.from_pandas(df.iloc[a:b], preserve_index=False) for a, b in zip(cuts[:-1], cuts[1:])], df


def test_row_merge_emits_in_key_order_up_to_each_limit():
    """The client's merge: sorted sources (tops repeating across table boundaries, so it must read
    on before it can cut) come out as one sorted stream, and only the rows above each limit."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    written: list = []
    merge = _RowMerge(written.append)
    frames, opened = [], []
    for i, sizes in enumerate(([1, 1, 1, 9], [4, 4, 4], [20], [2] * 7)):
        tables, df = _sorted_tables(rng, sum(sizes), sizes)
        frames.append(df.assign(row=df.row + 100 * i))
        tables = [t.set_column(0, "row", pa.compute.add(t["row"], 100 * i)) for t in tables]
        low = float(df["_top"].min())

        def source(tables=tables, i=i):
            opened.append(i)
            return iter(tables)
        merge.add(_SortedRows(source, low))
    merge.add(_SortedRows(lambda: opened.append("late") or iter([]), low=5))  # no row above 5: not opened yet
    everything = pd.concat(frames).sort_values(list(KEY_COLUMNS), kind="stable")
    for limit in (0, 2, 2, 5, math.inf):
        merge.emit_above(limit)
        out = pd.concat([t.to_pandas() for t in written]) if written else pd.DataFrame({"row": []})
        expected = everything[everything["_top"] < limit]
        assert sorted(out["row"]) == sorted(expected["row"])  # exactly the rows above the limit
        got_keys = everything.set_index("row").loc[out["row"], list(KEY_COLUMNS)].to_numpy()
        assert (np.diff(got_keys.astype(np.int64) @ (10 ** np.arange(len(KEY_COLUMNS)))[::-1]) >= 0).all()
        if limit == 2:
            assert "late" not in opened
    assert len(out) == len(everything) and "late" in opened
    assert all(list(t.column_names) == ["row"] for t in written)  # the key columns are dropped


def test_an_object_spanning_every_row_of_chunks_holds_rows_back_but_not_their_order(tmp_path, probs):
    """A stripe from the top edge to the bottom one stays an open seam group until the last row of
    chunks: the rows below its top wait in their parts, then come out in canonical order; the seam
    spills are removed afterwards."""
    probs = probs.copy()
    probs[0, :, 117:120] = 0.9  # one object of prompt "a", top 0, through all four rows of 64-px chunks
    j = job()
    got = streamed(tmp_path / "s", probs, 64, j)
    pd.testing.assert_frame_equal(as_rows(got), as_rows(all_at_once(probs, SIZE, j)), check_exact=True,
                                  check_dtype=False)
    tall = got[(got.prompt == "a") & (got.geometry.bounds.maxy - got.geometry.bounds.miny == SIZE * 0.5)]
    assert len(tall) == 1
    assert not [p for p in (tmp_path / "s").iterdir() if ".seams-" in p.name]


def test_finalize_can_name_each_rows_piece(probs):
    """``source_index``: the index names the piece of each row (gaps where min_area drops one),
    which the parts' keys come from; by default the index is 0..n-1 (a public GeoDataFrame)."""
    pieces = Pieces.concat(pieces_of(probs, regions_of(SIZE))[0:1])
    j = job(min_area=3.0)
    indexed = j.finalize(pieces)
    plain = finalize(pieces, TRANSFORM, CRS, PROMPTS, THRESHOLDS, min_area=3.0)
    assert list(plain.index) == list(range(len(plain))) and len(plain) == len(indexed) < len(pieces)
    src = indexed.index.to_numpy()
    assert (np.diff(src) > 0).all() and src[-1] < len(pieces)
    assert (indexed.pixels.to_numpy() == pieces.n_px[src]).all()
    assert (indexed.prompt_index.to_numpy() == pieces.prompt_index[src]).all()
