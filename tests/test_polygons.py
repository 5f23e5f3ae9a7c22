"""Polygons from `geoseg segment` / `geoseg vectorize` (issue 3), with a deterministic per-pixel model.

The scene is a dark raster with bright red shapes; the model's probability is > 0.5 exactly on the
shapes, so the true polygons are known in pixel space and mapped through the raster's transform.
"""

from __future__ import annotations

import json
import math

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from affine import Affine
from shapely.geometry import box

import geoseg

from .models import PerPixelFactory
from .qgis_check import qgis_available, run_qgis_check
from .rasters import write

RED = PerPixelFactory(weights=((1.0, 0.0, 0.0),), bias=(0.5,))
RED_BLUE = PerPixelFactory(weights=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)), bias=(0.5, 0.5))

# (row0, col0, row1, col1) in pixels; the first crosses the 512 seam, the second the 512x512 corner
SHAPES = [(100, 450, 160, 600), (480, 470, 560, 560), (700, 100, 720, 130), (30, 30, 90, 70)]


def shapes_scene(height=800, width=900, shapes=SHAPES, value=(230, 20, 20)):
    img = np.full((3, height, width), 25, np.uint8)
    for r0, c0, r1, c1 in shapes:
        img[:, r0:r1, c0:c1] = np.array(value, np.uint8)[:, None, None]
    return img


def truth(transform, shapes=SHAPES):
    return [shapely.affinity.affine_transform(box(c0, r0, c1, r1), transform.to_shapely())
            for r0, c0, r1, c1 in shapes]


def segment(tmp_path, src, factory=RED, prompts=("red",), name="out", client=None, **kw):
    vector = geoseg.VectorizeConfig(**kw.pop("vector", {}))
    cfg = geoseg.SegmentConfig(str(src), prompts, tmp_path / name, vector=vector, **kw)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


def read(result):
    return gpd.read_file(result.polygons, layer="segments") if result.polygons.suffix == ".gpkg" \
        else gpd.read_parquet(result.polygons)


def iou(a, b):
    return a.intersection(b).area / a.union(b).area


TRANSFORMS = {
    "north-up": Affine(0.5, 0, 500000, 0, -0.5, 4500000),
    "rotated": Affine.translation(500000, 4500000) @ Affine.rotation(25) @ Affine.scale(0.5, -0.5),
    "south-up": Affine(0.5, 0, 500000, 0, 0.5, 4400000),
}


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_polygons_match_true_shapes(tmp_path, inproc_client, kind):
    transform = TRANSFORMS[kind]
    src = write(tmp_path / "in.tif", shapes_scene(), transform=transform)
    gdf = read(segment(tmp_path, src, client=inproc_client, chunk_size=512))
    assert gdf.crs.to_epsg() == 32633
    assert len(gdf) == len(SHAPES)
    for want in truth(transform):
        got = gdf[gdf.intersects(want.centroid)]
        assert len(got) == 1
        assert iou(got.geometry.iloc[0], want) >= 0.99
        assert got.area_m2.iloc[0] == pytest.approx(want.area, rel=2e-3)  # ellipsoidal vs UTM plane
    assert (gdf.prompt == "red").all() and (gdf.mean_prob > 0.9).all() and (gdf.max_prob <= 1).all()


def test_objects_across_chunk_seams_are_one_polygon_for_any_chunk_size(tmp_path, inproc_client):
    src = write(tmp_path / "in.tif", shapes_scene(), tiled=True, blockxsize=128, blockysize=128)
    frames = [read(segment(tmp_path, src, client=inproc_client, name=f"c{c}", chunk_size=c))
              for c in (384, 512, 1024)]
    polys = [set(shapely.normalize(g).wkb for g in f.geometry) for f in frames]
    assert polys[0] == polys[1] == polys[2]
    assert len(frames[0]) == len(SHAPES)
    # chunk 512: shape 0 crosses 1 seam (2 chunks), shape 1 the corner (4 chunks)
    want = truth(TRANSFORMS["north-up"])
    for w in want[:2]:
        hit = frames[1][frames[1].intersects(w.centroid)]
        assert len(hit) == 1
        assert iou(hit.geometry.iloc[0], w) == pytest.approx(1.0)  # pixel-aligned truth: exact up to float64


def test_min_area_applies_after_merge(tmp_path, inproc_client):
    # a 60x60 px (900 m²) object split by the 384-px chunk corner into four 30x30 px (225 m²) pieces
    shapes = [(354, 354, 414, 414), (10, 10, 20, 20)]  # the small one is 25 m²
    src = write(tmp_path / "in.tif", shapes_scene(600, 600, shapes), tiled=True, blockxsize=128, blockysize=128)
    result = segment(tmp_path, src, client=inproc_client, chunk_size=352, vector={"min_area": 500})
    assert result.chunks_run == 4
    gdf = read(result)
    assert len(gdf) == 1
    assert gdf.area_m2.iloc[0] == pytest.approx(900, rel=2e-3)  # ellipsoidal vs UTM plane (scale error)


def test_vectorize_equals_fresh_segment(tmp_path, inproc_client):
    img = shapes_scene()
    img[0, 300:400, 600:800] = 140  # a dimmer object: p = sigmoid(12 * (0.55 - 0.5)) ≈ 0.65
    src = write(tmp_path / "in.tif", img)
    first = segment(tmp_path, src, client=inproc_client, name="a", chunk_size=512)
    assert len(read(first)) == len(SHAPES) + 1
    path, n = geoseg.vectorize(first.run_dir, geoseg.VectorizeConfig(threshold=0.8, simplify=0.0))
    fresh = segment(tmp_path, src, client=inproc_client, name="b", chunk_size=512, vector={"threshold": 0.8})
    a, b = gpd.read_file(path, layer="segments"), read(fresh)
    assert n == len(b) == len(SHAPES)
    assert list(a.geometry.normalize().to_wkb()) == list(b.geometry.normalize().to_wkb())  # same rows, same order
    # mean of the same float32 COG pixels, summed in float64 in a per-chunk order: ~1e-15 relative
    assert np.allclose(a.mean_prob, b.mean_prob)
    runs = json.loads((first.run_dir / "manifest.json").read_text())["vectorize_runs"]
    assert runs[-1]["threshold"] == [0.8] and runs[-1]["features"] == n


def test_vectorize_in_worker_processes_writes_the_same_file(tmp_path, inproc_client):
    """Chunks polygonized by 2 worker processes give the file of 1 (same rows, same order); a
    temporary parts folder a killed vectorize left behind is removed, and none is left."""
    src = write(tmp_path / "in.tif", shapes_scene())
    run = segment(tmp_path, src, client=inproc_client, chunk_size=352).run_dir
    (run / ".vectorize-killed").mkdir()
    files = {}
    for workers in (1, 2):
        path, n = geoseg.vectorize(run, geoseg.VectorizeConfig(threshold=0.4, fill_holes=50.0), workers=workers)
        files[workers] = gpd.read_file(path, layer="segments")
        assert n == len(files[workers]) > 0
    assert list(files[1].geometry.to_wkb()) == list(files[2].geometry.to_wkb())
    attributes = [f.drop(columns="geometry") for f in files.values()]
    pd.testing.assert_frame_equal(*attributes, check_exact=True)
    assert not list(run.glob(".vectorize-*"))


def test_vectorize_cuts_a_one_chunk_run_for_its_workers_and_writes_the_same_file(tmp_path, inproc_client):
    """A run of one chunk, vectorized by 2 processes, is cut into 4 chunks (objects now cross their
    seams); the file equals the 1-process one row for row: canonical order does not follow the grid."""
    from geoseg.pipeline import vectorize_regions

    # objects across the cut seams, and one (top 990) that must come after one crossing (top 950)
    crossing = [(1000, 1000, 1100, 1100), (100, 900, 200, 1200), (950, 50, 1050, 150), (1300, 1010, 1310, 1400),
                (990, 300, 1010, 340)]
    src = write(tmp_path / "in.tif", shapes_scene(1400, 1500, SHAPES + crossing))
    run = segment(tmp_path, src, client=inproc_client, chunk_size=1536).run_dir
    regions = geoseg.rundir.RunManifest.load(run).regions()
    assert len(regions) == 1
    cut = vectorize_regions(regions, 1400, 1500, 2)
    assert [(r.row, r.col, r.height, r.width) for r in cut] == [
        (0, 0, 1024, 1024), (0, 1024, 1024, 476), (1024, 0, 376, 1024), (1024, 1024, 376, 476)]
    files = []
    for workers in (1, 2):
        path, n = geoseg.vectorize(run, geoseg.VectorizeConfig(threshold=0.4), workers=workers)
        files.append(gpd.read_file(path, layer="segments"))
        assert n == len(files[-1]) == len(SHAPES) + len(crossing)
    assert list(files[0].geometry.to_wkb()) == list(files[1].geometry.to_wkb())
    pd.testing.assert_frame_equal(files[0].drop(columns="geometry"), files[1].drop(columns="geometry"),
                                  check_exact=False, rtol=1e-12)  # mean_prob: float64 sums in another order


def test_vectorize_polygonizes_at_most_2048_px_chunks_whatever_the_run_grid():
    """A run of 4096² chunks is vectorized as 2048² ones (a process's memory follows its chunk, so
    vectorize's peak does not depend on the raster or the run's --chunk-size); edge chunks stay
    clipped to the raster, and a run already finer keeps its grid."""
    from geoseg.pipeline import vectorize_regions
    from geoseg.tiling import chunk_regions

    cut = vectorize_regions(chunk_regions(8192, 5000, 4096, 4096), 8192, 5000, 2)
    assert {(r.height, r.width) for r in cut} == {(2048, 2048), (2048, 904)}
    assert len(cut) == 12 and sum(r.height * r.width for r in cut) == 8192 * 5000
    fine = chunk_regions(8192, 5000, 1024, 1024)
    assert vectorize_regions(fine, 8192, 5000, 2) == fine


def test_empty_result_writes_valid_empty_layer(tmp_path, inproc_client, caplog):
    src = write(tmp_path / "in.tif", shapes_scene(shapes=[]))
    result = segment(tmp_path, src, client=inproc_client)
    assert result.features == 0
    info = pyogrio.read_info(result.polygons, layer="segments")
    assert info["features"] == 0 and info["geometry_type"] == "MultiPolygon"
    assert "prompt" in list(info["fields"])
    assert "empty layer" in caplog.text


def test_geoparquet_and_dst_crs(tmp_path, inproc_client):
    src = write(tmp_path / "in.tif", shapes_scene())
    result = segment(tmp_path, src, client=inproc_client, vector={"vector_format": "parquet", "dst_crs": "EPSG:4326"})
    gdf = read(result)
    assert result.polygons.name == "polygons.parquet" and gdf.crs.to_epsg() == 4326
    want = gpd.GeoSeries(truth(TRANSFORMS["north-up"]), crs=32633).to_crs(4326)
    for w in want:
        assert max(iou(g, w) for g in gdf.geometry) > 0.99


def test_simplify_keeps_touching_polygons_together(tmp_path, inproc_client):
    # a red and a blue square sharing an edge: two prompts, each simplified coverage-safely
    img = np.full((3, 400, 400), 25, np.uint8)
    yy, xx = np.mgrid[:400, :400]
    disc = (yy - 200) ** 2 + (xx - 200) ** 2 < 120 ** 2
    img[0][disc & (xx < 200)] = 230
    img[0][disc & (xx >= 200)] = 231
    src = write(tmp_path / "in.tif", img)
    gdf = read(segment(tmp_path, src, client=inproc_client, chunk_size=352, tile_size=256, stride=192,
                       vector={"simplify": 2.0}))
    assert len(gdf) == 1  # one object across chunk seams, simplified
    g = gdf.geometry.iloc[0]
    assert g.is_valid and len(shapely.get_coordinates(g)) < 200
    assert g.area == pytest.approx(math.pi * 60 ** 2, rel=0.02)  # a pixelated, simplified disc, not rounding


@pytest.mark.skipif(not qgis_available()[0], reason="QGIS (python3-qgis) not installed")
def test_real_run_opens_styled_in_qgis(tmp_path, inproc_client):
    img = shapes_scene(shapes=SHAPES[:2], value=(230, 20, 20))
    img[:, 600:650, 600:700] = np.array([20, 20, 230], np.uint8)[:, None, None]
    src = write(tmp_path / "in.tif", img, crs="EPSG:32618")
    result = segment(tmp_path, src, factory=RED_BLUE, prompts=("building", "swimming pool"),
                     client=inproc_client, chunk_size=512)
    assert result.features == 3
    report = run_qgis_check(result.polygons, result.probabilities, "EPSG:32618", 3)
    assert report["ok"], report
    assert report["vector"]["renderer_on_open"] == "categorizedSymbol"
    assert report["vector"]["renderer_attr"] == "prompt"
    assert report["vector"]["spatial_index"] is True  # built by gpkg_rtree after the streamed write
    assert [c["value"] for c in report["vector"]["categories"]] == ["building", "swimming pool"]
    assert all(0 < c["fill_alpha"] < 255 for c in report["vector"]["categories"])
    assert report["raster"]["band_count"] == 2
    assert report["raster"]["gdal_band_descriptions"] == ["building", "swimming pool"]
    assert report["raster"]["gdal_layout"] == "COG"


def _random_class_map(seed: int, n: int, smooth: float, gaps: float) -> np.ndarray:
    """Pixel-space polygons of a class map: four classes of smoothed noise and gaps (no class)."""
    from rasterio.features import shapes
    from scipy import ndimage

    from geoseg.pieces import _shapes_to_polygons

    rng = np.random.default_rng(seed)
    labels = ndimage.gaussian_filter(rng.random((4, n, n)), (0, smooth, smooth)).argmax(0).astype(np.int32)
    noise = ndimage.gaussian_filter(rng.random((n, n)), smooth)
    labels[noise < np.quantile(noise, gaps)] = -1
    return _shapes_to_polygons([g for g, _ in shapes(labels, mask=labels >= 0, connectivity=4)])


@pytest.mark.parametrize(("seed", "angle", "tolerance", "batch", "smooth", "gaps"), [
    (0, 30, 1.3, 7, 1.5, 0.1),
    (1, 0, 0.8, 1, 1.5, 0.1),     # axis-aligned staircases, one polygon at a time
    (2, 30, 5.0, 3, 0.8, 0.3),    # coarse tolerance, many gaps
    (3, 0, 1.0, 40, 0.5, 0.05),   # fragmented
])
def test_class_map_simplified_a_part_at_a_time_equals_one_coverage(seed, angle, tolerance, batch, smooth, gaps):
    """The invariant streaming relies on for ``--classes --simplify``: simplifying a class map's
    coverage a prefix at a time, each part beside the known polygons after it and the results of
    the polygons before it that meet them (``Simplified``: raw results and removed vertices), gives
    every polygon exactly as one ``coverage_simplify`` of the whole coverage does."""
    from geoseg.polygons import Simplified, _apply_affine, _coverage_simplify, _node_coverage

    geoms = _apply_affine(_node_coverage(_random_class_map(seed, 90, smooth, gaps)),
                          Affine.rotation(angle) * Affine(1, 0, 500, 0, -1, 900))
    bounds = shapely.bounds(geoms)
    order = np.lexsort((bounds[:, 0], -bounds[:, 3]))  # any order works: the parts are prefixes of it
    geoms, bounds = geoms[order], bounds[order]
    coverage = np.zeros(len(geoms), np.int64)
    whole, _ = _coverage_simplify(geoms, coverage, tolerance, shared_edges=True)
    tree = shapely.STRtree(shapely.box(*bounds.T))
    done, done_ids = Simplified.empty(), np.empty(0, np.int64)
    parts = np.empty(len(geoms), object)
    for start in range(0, len(geoms), batch):
        ids = np.arange(start, min(start + batch, len(geoms)))
        near = np.unique(tree.query(shapely.box(*bounds[ids].T))[1])
        sel = np.r_[ids, near[near > ids[-1]]]
        meets = np.unique(tree.query(shapely.box(*bounds[sel].T))[1])
        out, raw = _coverage_simplify(geoms[sel], coverage[sel], tolerance, done.take(np.isin(done_ids, meets)),
                                      shared_edges=True)
        parts[ids] = out[:len(ids)]
        done, done_ids = Simplified.concat([done, raw.take(np.arange(len(ids)))]), np.r_[done_ids, ids]
    assert len(geoms) > 300
    assert shapely.get_num_coordinates(whole).sum() < 0.9 * shapely.get_num_coordinates(geoms).sum()
    assert shapely.equals_exact(parts, whole, tolerance=0).all()
