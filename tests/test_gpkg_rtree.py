"""geoseg.gpkg_rtree: the bulk-built R-tree, checked by SQLite's own ``rtreecheck``, by queries
against brute force, against the index GDAL builds for the same rows, and by GDAL writing to the
layer afterwards (its triggers keep the tree valid)."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from geoseg import gpkg_rtree
from geoseg.gpkg_rtree import build_rtree, float32_box

from .qgis_check import qgis_available, run_qgis_check

CRS = "EPSG:32633"


def _boxes(n: int, seed: int = 0, exact: bool = True) -> np.ndarray:
    """``n`` boxes (x0, y0, x1, y1) on a 300 x 300 grid of cells; integers (exact in float32) or
    UTM-sized coordinates that float32 cannot hold."""
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, 3000, n).astype(float)
    y0 = rng.integers(0, 3000, n).astype(float)
    w, h = rng.integers(1, 40, n), rng.integers(1, 40, n)
    b = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    if not exact:
        b = b * 0.3 + [500_000.1234567, 5_000_000.7654321, 500_000.1234567, 5_000_000.7654321]
    return b


def _write(path, bounds: np.ndarray, index: bool, version: str = "1.2", fid: str = "fid") -> None:
    geoms = shapely.box(*bounds.T) if len(bounds) else np.array([], object)
    gdf = gpd.GeoDataFrame({"k": np.arange(len(bounds))}, geometry=list(geoms), crs=CRS)
    pyogrio.write_dataframe(gdf, path, layer="p", driver="GPKG", geometry_type="MultiPolygon",
                            promote_to_multi=True, dataset_options={"VERSION": version},
                            layer_options={"SPATIAL_INDEX": "YES" if index else "NO", "GEOMETRY_NAME": "geom",
                                           "FID": fid})


def _rtree(path) -> tuple[np.ndarray, np.ndarray]:
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("SELECT rtreecheck('rtree_p_geom')").fetchone()[0] == "ok"
        rows = con.execute("SELECT id, minx, maxx, miny, maxy FROM rtree_p_geom ORDER BY id").fetchall()
    arr = np.array(rows, float).reshape(-1, 5)
    return arr[:, 0].astype(np.int64), arr[:, 1:]


def _query(path, window) -> list[int]:
    x0, y0, x1, y1 = window
    with closing(sqlite3.connect(path)) as con:
        return sorted(r[0] for r in con.execute(
            "SELECT id FROM rtree_p_geom WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?",
            (x1, x0, y1, y0)))


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(gpkg_rtree, "WINDOW", 97)  # many windows, partial leaves in each


@pytest.mark.parametrize("n", [0, 1, 51, 52, 2601, 2602, 6000])
def test_tree_is_valid_and_answers_queries_exactly(tmp_path, small_windows, n):
    """Every row is in the tree with its exact box (integers: exact in float32); sizes around the
    node capacity (51) and its square, in windows of 97 rows, give trees of depth 1 to 3; a window
    query returns exactly the rows whose boxes meet it."""
    bounds = _boxes(n)
    path = tmp_path / "p.gpkg"
    _write(path, bounds, index=False)
    assert build_rtree(path, "p") == n
    ids, boxes = _rtree(path)
    assert ids.tolist() == list(range(1, n + 1))  # fid = row + 1
    np.testing.assert_array_equal(boxes, bounds[:, [0, 2, 1, 3]])
    rng = np.random.default_rng(1)
    for _ in range(40):
        x, y = rng.uniform(-50, 3050, 2)
        s = rng.uniform(1, 400)
        window = (x, y, x + s, y + s)
        truth = np.flatnonzero((bounds[:, 0] <= window[2]) & (bounds[:, 2] >= window[0])
                               & (bounds[:, 1] <= window[3]) & (bounds[:, 3] >= window[1])) + 1
        assert _query(path, window) == truth.tolist()


def test_float32_boxes_contain_the_geometry(tmp_path, small_windows):
    """UTM coordinates do not fit float32: each stored box still contains its polygon (minima
    rounded down, maxima up), and is the tightest float32 box that does."""
    bounds = _boxes(500, exact=False)
    path = tmp_path / "p.gpkg"
    _write(path, bounds, index=False)
    build_rtree(path, "p")
    _, boxes = _rtree(path)
    lo, hi = boxes[:, [0, 2]], boxes[:, [1, 3]]
    assert (lo <= bounds[:, :2]).all() and (hi >= bounds[:, 2:]).all()
    assert (lo < bounds[:, :2]).any()  # rounding happened
    up = np.nextafter(lo.astype(np.float32), np.float32(np.inf)).astype(float)
    down = np.nextafter(hi.astype(np.float32), np.float32(-np.inf)).astype(float)
    assert (up > bounds[:, :2]).all() and (down < bounds[:, 2:]).all()  # tightest


def test_float32_boxes_beyond_float32_range():
    env = np.array([[-1e39, 1e39, -3.5e38, 3.5e38], [-0.0, 0.0, -1e-300, 1e-300]])
    box = float32_box(env)
    assert (box[:, [0, 2]] <= env[:, [0, 2]]).all() and (box[:, [1, 3]] >= env[:, [1, 3]]).all()
    assert np.isinf(box[0]).all() and box[1, 3] > 0 > box[1, 2]


@pytest.mark.parametrize("n", [1, 5, 51, 52, 2602])
def test_sqlite_edits_the_tree_afterwards(tmp_path, small_windows, n):
    """SQLite's own insert, update and delete code works on the packed tree (a one-leaf layer is a
    root leaf, as SQLite makes it), including a delete through GDAL's trigger."""
    bounds = _boxes(n)
    path = tmp_path / "p.gpkg"
    _write(path, bounds, index=False)
    build_rtree(path, "p")
    rng = np.random.default_rng(n)
    with closing(sqlite3.connect(path)) as con:
        con.execute("DELETE FROM p WHERE fid = 1")  # the GeoPackage delete trigger (plain SQL)
        gone = rng.choice(np.arange(2, n + 1), size=(n - 1) * 2 // 3, replace=False) if n > 1 else []
        for fid in gone:
            con.execute("DELETE FROM rtree_p_geom WHERE id = ?", (int(fid),))
        for fid in range(2, n + 1, 3):
            if fid not in set(gone):
                con.execute("UPDATE rtree_p_geom SET minx = minx - 5 WHERE id = ?", (fid,))
        for fid in range(n + 1, n + 60):
            con.execute("INSERT INTO rtree_p_geom VALUES (?, ?, ?, ?, ?)", (fid, fid, fid + 1, 0, 1))
        con.commit()
        assert con.execute("SELECT rtreecheck('rtree_p_geom')").fetchone()[0] == "ok"
        left = {r[0] for r in con.execute("SELECT id FROM rtree_p_geom")}
        assert left == (set(range(2, n + 60)) - {int(f) for f in gone})
        hits = {r[0] for r in con.execute("SELECT id FROM rtree_p_geom WHERE minx <= ? AND maxx >= ?",
                                          (n + 10.5, n + 10.5))}
        assert {n + 10} <= hits


@pytest.mark.parametrize("version, fid", [("1.2", "fid"), ("1.4", "ogc_fid")])
def test_same_schema_and_answers_as_gdal(tmp_path, version, fid):
    """The R-tree table, its triggers (which differ between GeoPackage 1.2 and 1.4 and name the
    id column) and the gpkg_extensions row are what GDAL writes; GDAL reports the index and answers
    a bbox read as it does with the index it builds itself."""
    bounds = _boxes(3000, exact=False)
    ours, gdal = tmp_path / "ours.gpkg", tmp_path / "gdal.gpkg"
    _write(ours, bounds, index=False, version=version, fid=fid)
    build_rtree(ours, "p")
    _write(gdal, bounds, index=True, version=version, fid=fid)

    def schema(path):
        with closing(sqlite3.connect(path)) as con:
            objs = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'rtree%' "
                               "ORDER BY name").fetchall()
            ext = con.execute("SELECT * FROM gpkg_extensions").fetchall()
        return objs, ext

    assert schema(ours) == schema(gdal)
    for path in (ours, gdal):
        assert pyogrio.read_info(path, layer="p")["capabilities"]["fast_spatial_filter"]
        has = pyogrio.read_dataframe(path, sql="SELECT HasSpatialIndex('p', 'geom')")
        assert has.iloc[:, 0].tolist() == [1]
    window = (500_100.0, 5_000_100.0, 500_400.0, 5_000_500.0)
    a = pyogrio.read_dataframe(ours, layer="p", bbox=window)
    b = pyogrio.read_dataframe(gdal, layer="p", bbox=window)
    assert len(a) > 50 and sorted(a["k"]) == sorted(b["k"])


def test_gdal_appends_through_the_copied_triggers(tmp_path, small_windows):
    """GDAL appending to the indexed layer goes through the triggers and SQLite's insert code on
    our tree: the tree stays valid and holds the new rows too."""
    bounds = _boxes(3000)
    path = tmp_path / "p.gpkg"
    _write(path, bounds, index=False)
    build_rtree(path, "p")
    more = _boxes(200, seed=5)
    gdf = gpd.GeoDataFrame({"k": np.arange(200)}, geometry=list(shapely.box(*more.T)), crs=CRS)
    pyogrio.write_dataframe(gdf, path, layer="p", driver="GPKG", append=True, promote_to_multi=True)
    ids, boxes = _rtree(path)
    assert ids.tolist() == list(range(1, 3201))
    np.testing.assert_array_equal(boxes[3000:], more[:, [0, 2, 1, 3]])


def test_null_and_empty_geometries_are_not_indexed(tmp_path):
    """As GeoPackage's triggers do: NULL and empty geometries have no entry."""
    gdf = gpd.GeoDataFrame({"k": [0, 1, 2, 3]},
                           geometry=[shapely.box(0, 0, 1, 1), None, shapely.Polygon(), shapely.box(5, 5, 7, 8)],
                           crs=CRS)
    path = tmp_path / "p.gpkg"
    pyogrio.write_dataframe(gdf, path, layer="p", driver="GPKG", geometry_type="Polygon",
                            layer_options={"SPATIAL_INDEX": "NO", "FID": "fid", "GEOMETRY_NAME": "geom"})
    assert build_rtree(path, "p") == 2
    ids, boxes = _rtree(path)
    assert ids.tolist() == [1, 4]
    np.testing.assert_array_equal(boxes, [[0, 1, 0, 1], [5, 7, 5, 8]])


def test_refuses_a_layer_with_an_index(tmp_path):
    path = tmp_path / "p.gpkg"
    _write(path, _boxes(10), index=True)
    with pytest.raises(ValueError, match="has a spatial index already"):
        build_rtree(path, "p")


@pytest.mark.skipif(not qgis_available()[0], reason="QGIS (python3-qgis) not installed")
def test_qgis_queries_through_the_tree(tmp_path, small_windows):
    """QGIS (its own GDAL and SQLite) finds the index and a rectangle query through it returns
    every feature meeting the rectangle, on a tree of depth 3."""
    bounds = _boxes(6000, exact=False)
    path = tmp_path / "segments.gpkg"
    gdf = gpd.GeoDataFrame({"k": np.arange(6000)}, geometry=list(shapely.box(*bounds.T)), crs=CRS)
    pyogrio.write_dataframe(gdf, path, layer="segments", driver="GPKG", promote_to_multi=True,
                            layer_options={"SPATIAL_INDEX": "NO", "GEOMETRY_NAME": "geom", "FID": "fid"})
    build_rtree(path, "segments")
    cog = tmp_path / "p.tif"
    with rasterio.open(cog, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32", crs=CRS,
                       transform=rasterio.Affine(1, 0, 500_000, 0, -1, 5_001_000)) as dst:
        dst.write(np.zeros((1, 8, 8), np.float32))
    v = run_qgis_check(path, cog, CRS, 6000)["vector"]
    assert v["feature_count"] == 6000
    assert v["spatial_index"] is True
    assert v["filter_rect_ok"], v["filter_rect"]
    assert all(c["intersecting"] > 1000 for c in v["filter_rect"]), v["filter_rect"]


def test_refuses_a_geopackage_older_than_1_2(tmp_path):
    path = tmp_path / "p.gpkg"
    _write(path, _boxes(10), index=False, version="1.1")
    with pytest.raises(ValueError, match="older than 1.2"):
        build_rtree(path, "p")
