"""geoseg.export: real GeoPackage / GeoParquet / JSON files, checked by reading them back."""

from __future__ import annotations

import json
import os
import sqlite3
import xml.etree.ElementTree as ET
from contextlib import closing
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from geoseg.export import style_qml, write_json_atomic, write_vector

CRS = "EPSG:32633"
PROMPTS = ["roof", "tree", "pool"]  # "pool" never matches anything
COLUMNS = ["prompt", "prompt_index", "threshold", "mean_prob", "max_prob", "pixels", "area_m2", "perimeter_m"]


def _gdf(n_roof: int = 2, n_tree: int = 1) -> gpd.GeoDataFrame:
    geoms: list = []
    prompts: list[str] = []
    for i in range(n_roof):
        geoms.append(box(500_000 + 100 * i, 5_000_000, 500_050 + 100 * i, 5_000_050))
        prompts.append("roof")
    for i in range(n_tree):
        geoms.append(
            MultiPolygon([box(501_000 + 100 * i, 5_000_000, 501_020 + 100 * i, 5_000_020),
                          box(501_050 + 100 * i, 5_000_000, 501_070 + 100 * i, 5_000_020)])
        )
        prompts.append("tree")
    n = len(geoms)
    return gpd.GeoDataFrame(
        {
            "prompt": pd.Series(prompts, dtype=object),
            "prompt_index": np.array([PROMPTS.index(p) for p in prompts], dtype=np.int64),
            "threshold": np.full(n, 0.5),
            "mean_prob": np.linspace(0.6, 0.9, n),
            "max_prob": np.linspace(0.7, 0.99, n),
            "pixels": np.arange(1, n + 1, dtype=np.int64) * 10,
            "area_m2": [g.area for g in geoms],
            "perimeter_m": [g.length for g in geoms],
        },
        geometry=geoms,
        crs=CRS,
    )


def _styles(path: Path) -> list[dict]:
    with closing(sqlite3.connect(path)) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM layer_styles")]


def _qml_categories(qml: str) -> tuple[str, list[str], list[str]]:
    root = ET.fromstring(qml.split("\n", 1)[1])  # drop the DOCTYPE line
    r = root.find("renderer-v2")
    assert r is not None
    values = [c.get("value") for c in r.find("categories")]
    fills = []
    for sym in r.find("symbols"):
        opts = {o.get("name"): o.get("value") for o in sym.find("layer").find("Option")}
        fills.append(opts["color"])
    return r.get("type") + ":" + r.get("attr"), values, fills


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------------
# GeoPackage
# --------------------------------------------------------------------------------------------------


def test_gpkg_single_layer_schema_crs_and_count(tmp_path):
    out = write_vector(_gdf(), tmp_path / "polygons.gpkg", prompts=PROMPTS)
    assert out == tmp_path / "polygons.gpkg" and out.is_file()

    layers = {name: gtype for name, gtype in pyogrio.list_layers(out)}
    assert layers == {"segments": "MultiPolygon", "layer_styles": None}  # one data layer, not one per prompt

    info = pyogrio.read_info(out, layer="segments")
    assert info["crs"] == CRS
    assert info["features"] == 3
    assert info["geometry_type"] == "MultiPolygon"
    assert info["geometry_name"] == "geom"
    assert list(info["fields"]) == COLUMNS

    back = pyogrio.read_dataframe(out, layer="segments")
    assert back.crs.to_epsg() == 32633
    assert sorted(back["prompt"]) == ["roof", "roof", "tree"]
    assert set(back.geom_type) == {"MultiPolygon"}  # Polygons promoted
    assert back.geometry.area.sum() == pytest.approx(_gdf().geometry.area.sum())
    assert back["pixels"].dtype.kind == "i" and back["area_m2"].dtype.kind == "f"


def test_gpkg_spatial_index_and_contents(tmp_path):
    out = write_vector(_gdf(), tmp_path / "p.gpkg", prompts=PROMPTS)
    with closing(sqlite3.connect(out)) as con:
        ext = con.execute(
            "SELECT extension_name FROM gpkg_extensions WHERE table_name='segments' AND column_name='geom'"
        ).fetchall()
        assert ("gpkg_rtree_index",) in ext
        assert con.execute("SELECT count(*) FROM rtree_segments_geom").fetchone()[0] == 3
        contents = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents").fetchall())
        assert contents == {"segments": "features", "layer_styles": "attributes"}
        srs = con.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name='segments'").fetchone()
        assert srs == (32633,)
        # GeoPackage 1.2 so GDAL 3.6 / QGIS 3.22 read it without "partially supported" warnings.
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_gpkg_layer_styles_default_style(tmp_path):
    out = write_vector(_gdf(), tmp_path / "p.gpkg", prompts=PROMPTS)
    rows = _styles(out)
    assert len(rows) == 1
    row = rows[0]
    assert row["f_table_catalog"] == ""
    assert row["f_table_schema"] == ""  # QGIS selects on '' (NULL does not match)
    assert row["f_table_name"] == "segments"
    assert row["f_geometry_column"] == pyogrio.read_info(out, layer="segments")["geometry_name"] == "geom"
    assert row["useAsDefault"] == 1
    assert row["styleName"] == "geoseg"
    assert row["update_time"].endswith("Z") and "." in row["update_time"]  # YYYY-MM-DDTHH:MM:SS.SSSZ
    renderer, values, fills = _qml_categories(row["styleQML"])
    assert renderer == "categorizedSymbol:prompt"
    assert values == PROMPTS  # "pool" has no polygon but still gets a category, in the given order
    assert len(set(fills)) == len(PROMPTS)  # distinct colours
    assert all(f.split(",")[3] == "102" for f in fills)  # 40 % opaque fill
    for p in PROMPTS:
        assert f"<ogc:Literal>{p}</ogc:Literal>" in row["styleSLD"]
    # GDAL sees the table as a proper (attributes) layer.
    styles = pyogrio.read_dataframe(out, layer="layer_styles")
    assert list(styles["f_table_name"]) == ["segments"]


def test_gpkg_categories_without_prompt_list_and_extra_prompts(tmp_path):
    out = write_vector(_gdf(), tmp_path / "a.gpkg")
    assert _qml_categories(_styles(out)[0]["styleQML"])[1] == ["roof", "tree"]
    out = write_vector(_gdf(), tmp_path / "b.gpkg", prompts=["pool", "roof"])
    assert _qml_categories(_styles(out)[0]["styleQML"])[1] == ["pool", "roof", "tree"]


def test_gpkg_custom_layer_name(tmp_path):
    out = write_vector(_gdf(), tmp_path / "p.gpkg", layer="masks", prompts=PROMPTS)
    assert {n for n, _ in pyogrio.list_layers(out)} == {"masks", "layer_styles"}
    assert _styles(out)[0]["f_table_name"] == "masks"


def test_gpkg_empty_with_full_schema(tmp_path):
    empty = _gdf().iloc[0:0]
    out = write_vector(empty, tmp_path / "empty.gpkg", prompts=PROMPTS)
    info = pyogrio.read_info(out, layer="segments")
    assert info["features"] == 0
    assert info["crs"] == CRS
    assert info["geometry_type"] == "MultiPolygon"
    assert list(info["fields"]) == COLUMNS
    back = pyogrio.read_dataframe(out, layer="segments")
    assert len(back) == 0 and list(back.columns) == COLUMNS + ["geometry"]
    assert back.crs.to_epsg() == 32633
    assert _qml_categories(_styles(out)[0]["styleQML"])[1] == PROMPTS


def test_gpkg_empty_geometry_only_gets_prompt_column(tmp_path):
    out = write_vector(gpd.GeoDataFrame(geometry=[], crs=CRS), tmp_path / "e.gpkg", prompts=["x"])
    info = pyogrio.read_info(out, layer="segments")
    assert info["features"] == 0 and info["crs"] == CRS and info["geometry_type"] == "MultiPolygon"
    assert list(info["fields"]) == ["prompt"]
    assert info["ogr_types"] == ["OFTString"]


def test_gpkg_empty_with_string_dtype_prompt(tmp_path):
    # pandas >= 3 infers the "str" dtype for text columns; an empty one must still be a text field.
    gdf = gpd.GeoDataFrame({"prompt": pd.Series([], dtype="str")}, geometry=[], crs=CRS)
    out = write_vector(gdf, tmp_path / "e.gpkg", prompts=["x"])
    info = pyogrio.read_info(out, layer="segments")
    assert info["ogr_types"] == ["OFTString"] and info["features"] == 0


def test_gpkg_requires_prompt_column(tmp_path):
    gdf = _gdf().drop(columns="prompt")
    with pytest.raises(ValueError, match="prompt"):
        write_vector(gdf, tmp_path / "p.gpkg")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_vector(_gdf(), tmp_path / "p.shp", fmt="shp")
    assert list(tmp_path.iterdir()) == []


def test_gpkg_replaces_existing_file_atomically(tmp_path, monkeypatch):
    target = tmp_path / "polygons.gpkg"
    write_vector(_gdf(n_roof=5, n_tree=0), target, prompts=PROMPTS)
    first_inode = target.stat().st_ino

    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        # At the moment of the rename the temp file is complete and the target still the old one.
        assert Path(src).parent == target.parent and Path(src).name != target.name
        assert pyogrio.read_info(src, layer="segments")["features"] == 3
        assert len(_styles(Path(src))) == 1
        assert pyogrio.read_info(dst, layer="segments")["features"] == 5
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_vector(_gdf(), target, prompts=PROMPTS)
    assert len(replaced) == 1 and replaced[0][1] == str(target)
    assert target.stat().st_ino != first_inode  # a new file renamed over, not rewritten in place
    assert pyogrio.read_info(target, layer="segments")["features"] == 3
    assert len(_styles(target)) == 1  # not appended to the old table
    assert _leftovers(tmp_path, {"polygons.gpkg"}) == []


def test_gpkg_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "polygons.gpkg"
    write_vector(_gdf(n_roof=4, n_tree=0), target, prompts=PROMPTS)
    before = target.read_bytes()

    import geoseg.export as export

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export, "_write_layer_styles", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_vector(_gdf(), target, prompts=PROMPTS)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, {"polygons.gpkg"}) == []


def test_no_temp_files_left(tmp_path):
    write_vector(_gdf(), tmp_path / "a.gpkg", prompts=PROMPTS)
    write_vector(_gdf(), tmp_path / "a.gpkg", prompts=PROMPTS)
    write_vector(_gdf(), tmp_path / "b.parquet", fmt="parquet")
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gpkg", "b.parquet", "m.json"]


def test_creates_parent_directory(tmp_path):
    out = write_vector(_gdf(), tmp_path / "run" / "vec" / "p.gpkg", prompts=PROMPTS)
    assert pyogrio.read_info(out, layer="segments")["features"] == 3


# --------------------------------------------------------------------------------------------------
# GeoParquet
# --------------------------------------------------------------------------------------------------


def test_parquet_round_trip(tmp_path):
    gdf = _gdf()
    out = write_vector(gdf, tmp_path / "polygons.parquet", fmt="parquet")
    back = gpd.read_parquet(out)
    assert back.crs.to_epsg() == 32633
    assert list(back.columns) == COLUMNS + ["geometry"]
    assert len(back) == 3
    assert back["prompt"].tolist() == gdf["prompt"].tolist()  # dtype may come back as pandas' str
    rest = COLUMNS[1:]
    pd.testing.assert_frame_equal(pd.DataFrame(back[rest]), pd.DataFrame(gdf[rest]))
    assert all(a.equals(b) for a, b in zip(back.geometry, gdf.geometry))
    import pyarrow.parquet as pq

    assert b"geo" in pq.read_schema(out).metadata  # GeoParquet metadata present


def test_parquet_empty_and_replace(tmp_path):
    out = tmp_path / "p.parquet"
    write_vector(_gdf(), out, fmt="parquet")
    write_vector(_gdf().iloc[0:0], out, fmt="parquet")
    back = gpd.read_parquet(out)
    assert len(back) == 0 and list(back.columns) == COLUMNS + ["geometry"] and back.crs.to_epsg() == 32633
    assert _leftovers(tmp_path, {"p.parquet"}) == []


# --------------------------------------------------------------------------------------------------
# JSON + style helpers
# --------------------------------------------------------------------------------------------------


def test_write_json_atomic(tmp_path):
    p = tmp_path / "manifest.json"
    write_json_atomic(p, {"v": 1})
    write_json_atomic(p, {"v": 2, "path": tmp_path, "n": np.int64(3), "x": np.float32(0.5), "arr": np.arange(2)})
    assert json.loads(p.read_text()) == {"v": 2, "path": str(tmp_path), "n": 3, "x": 0.5, "arr": [0, 1]}
    assert _leftovers(tmp_path, {"manifest.json"}) == []


def test_write_json_atomic_unserialisable_keeps_old(tmp_path):
    p = tmp_path / "manifest.json"
    write_json_atomic(p, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {object(): 1})  # bad key: fails before anything is written
    assert json.loads(p.read_text()) == {"v": 1}
    assert _leftovers(tmp_path, {"manifest.json"}) == []


def test_style_qml_escapes_and_many_prompts():
    prompts = [f"p{i}" for i in range(25)] + ['a "quoted" <prompt> & more']
    renderer, values, fills = _qml_categories(style_qml(prompts))
    assert renderer == "categorizedSymbol:prompt"
    assert values == prompts
    assert len(set(fills)) == len(prompts)


def test_polygon_input_promoted(tmp_path):
    gdf = gpd.GeoDataFrame({"prompt": ["a"]}, geometry=[Polygon([(0, 0), (1, 0), (1, 1)])], crs=CRS)
    out = write_vector(gdf, tmp_path / "p.gpkg")
    assert pyogrio.read_dataframe(out, layer="segments").geom_type.tolist() == ["MultiPolygon"]
