"""geoseg outputs open in a real QGIS (3.22, Debian's python3-qgis) with the default style applied.

Runs ``tests/qgis_check.py`` under ``/usr/bin/python3`` in a subprocess (QGIS bindings live there,
not in the venv). Skipped -- with the reason -- only when that interpreter cannot import
``qgis.core``; install QGIS with ``.ci/install_qgis.sh``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from shapely.geometry import MultiPolygon, box

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qgis_check import qgis_available, run_qgis_check  # noqa: E402

from geoseg.export import write_vector  # noqa: E402

_AVAILABLE, _WHY = qgis_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"QGIS not available: {_WHY}")

EPSG = 32633
PROMPTS = ["building", "water"]  # "water" has no polygon at all
X0, Y0, RES = 500_000.0, 5_000_000.0, 10.0


def _segments() -> gpd.GeoDataFrame:
    geoms = [
        box(X0 + 10, Y0 - 100, X0 + 60, Y0 - 50),
        MultiPolygon([box(X0 + 100, Y0 - 200, X0 + 150, Y0 - 150), box(X0 + 200, Y0 - 300, X0 + 250, Y0 - 250)]),
        box(X0 + 300, Y0 - 400, X0 + 320, Y0 - 380),
    ]
    n = len(geoms)
    return gpd.GeoDataFrame(
        {
            "prompt": ["building"] * n,
            "prompt_index": [0] * n,
            "threshold": [0.5] * n,
            "mean_prob": [0.7, 0.8, 0.9],
            "max_prob": [0.9, 0.95, 0.99],
            "pixels": [25, 50, 4],
            "area_m2": [g.area for g in geoms],
            "perimeter_m": [g.length for g in geoms],
        },
        geometry=geoms,
        crs=f"EPSG:{EPSG}",
    )


def _cog(path: Path, prompts: list[str]) -> Path:
    """A small float32 probability COG, one band per prompt, band description = prompt, nodata NaN."""
    h = w = 64
    data = np.random.default_rng(0).random((len(prompts), h, w), dtype=np.float32)
    data[:, :4, :4] = np.nan
    tmp = path.with_name("plain.tif")
    profile = dict(
        driver="GTiff", width=w, height=h, count=len(prompts), dtype="float32", crs=f"EPSG:{EPSG}",
        transform=Affine(RES, 0.0, X0, 0.0, -RES, Y0), nodata=float("nan"), tiled=True, blockxsize=32, blockysize=32,
    )
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        for i, p in enumerate(prompts, start=1):
            dst.set_band_description(i, p)
    rasterio.shutil.copy(tmp, path, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    tmp.unlink()
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("qgis")
    gpkg = write_vector(_segments(), d / "segments.gpkg", prompts=PROMPTS)
    cog = _cog(d / "probabilities.tif", PROMPTS)
    with rasterio.open(cog) as src:  # sanity: the fixture really is what geoseg writes
        assert src.descriptions == tuple(PROMPTS)
    return run_qgis_check(gpkg, cog, f"EPSG:{EPSG}", 3, timeout=180)


def test_qgis_report_ok(report):
    assert report["ok"], report["problems"]
    assert report["qgis_version"].startswith("3.")


def test_vector_layer(report):
    v = report["vector"]
    assert v["valid"] is True
    assert v["provider"] == "ogr"
    assert v["crs_authid"] == f"EPSG:{EPSG}" and v["crs_matches"]
    assert v["feature_count"] == 3 and v["count_matches"]
    assert v["wkb_type"] == "MultiPolygon"
    assert "prompt" in v["fields"]


def test_default_style_applied_on_open(report):
    v = report["vector"]
    # Applied by the plain QgsVectorLayer(uri, name, "ogr") constructor, without any explicit call.
    assert v["renderer_on_open"] == "categorizedSymbol"
    assert v["renderer_attr"] == "prompt"
    cats = v["categories"]
    assert [c["value"] for c in cats] == PROMPTS  # includes the prompt without polygons
    assert [c["label"] for c in cats] == PROMPTS
    assert len({c["fill"] for c in cats}) == len(cats)  # distinct colours
    for c in cats:
        assert 90 <= c["fill_alpha"] <= 115  # ~40 % opaque fill
        assert c["stroke_alpha"] == 255  # solid outline
    assert v["styles_in_database"]["names"] == ["geoseg"]
    explicit = v["explicit_load_default_style"]
    assert explicit["renderer_before"] == "singleSymbol"
    assert explicit["loaded"] and explicit["renderer_after"] == "categorizedSymbol"


def test_raster_layer(report):
    r = report["raster"]
    assert r["valid"] is True
    assert r["crs_authid"] == f"EPSG:{EPSG}" and r["crs_matches"]
    assert r["band_count"] == len(PROMPTS)
    assert r["gdal_band_descriptions"] == PROMPTS
    # QGIS 3.22 shows the description in the band name ("Band 1: building").
    for name, prompt in zip(r["band_names"], PROMPTS):
        assert prompt in name
    assert r["gdal_layout"] == "COG"
    assert all(n is not None and n.lower() == "nan" for n in r["nodata"])


def test_empty_layer_opens_in_qgis(tmp_path):
    empty = _segments().iloc[0:0]
    gpkg = write_vector(empty, tmp_path / "empty.gpkg", prompts=PROMPTS)
    cog = _cog(tmp_path / "probabilities.tif", PROMPTS)
    rep = run_qgis_check(gpkg, cog, EPSG, 0, timeout=180)
    assert rep["ok"], rep["problems"]
    assert rep["vector"]["feature_count"] == 0
    assert rep["vector"]["wkb_type"] == "MultiPolygon"
    assert [c["value"] for c in rep["vector"]["categories"]] == PROMPTS
