"""``--dtype uint8``: probabilities stored as round(p * 254), 255 = nodata, read back by one function."""

from __future__ import annotations

import json

import numpy as np
import rasterio
from rasterio.enums import Resampling

import geoseg
from geoseg.raster import dequantise, quantise, read_probabilities
from geoseg.rundir import fingerprint

from .rasters import _valid_collar, scene, write


def test_quantise_round_trip_error_is_at_most_1_over_508():
    p = np.concatenate([np.linspace(0, 1, 100001, dtype=np.float32), [np.nan]]).astype(np.float32)
    q = quantise(p)
    assert q.dtype == np.uint8 and q[-1] == 255 and q[:-1].max() == 254 and q[0] == 0
    back = dequantise(q)
    assert np.isnan(back[-1]) and np.isfinite(back[:-1]).all()
    # float32 arithmetic adds a few ulps (~1e-7) to the exact bound 0.5 / 254
    assert np.abs(back[:-1] - p[:-1]).max() <= 1 / 508 + 1e-6


def run(tmp_path, src, client, factory, name, **kw):
    cfg = geoseg.SegmentConfig(str(src), ("red roof", "blue pool"), tmp_path / name, chunk_size=400, **kw)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


def test_uint8_run_stores_quantised_probabilities_and_vectorizes_the_same(tmp_path, inproc_client, perpixel):
    data = scene(500, 600, seed=7)
    valid = _valid_collar(500, 600)
    data[:, ~valid] = 0
    src = write(tmp_path / "in.tif", data, nodata=0)
    f32 = run(tmp_path, src, inproc_client, perpixel, "f32")
    u8 = run(tmp_path, src, inproc_client, perpixel, "u8", dtype="uint8")
    with rasterio.open(u8.probabilities) as ds:
        assert ds.dtypes == ("uint8", "uint8") and ds.nodata == 255 and ds.overviews(1)
        raw = ds.read()
        got = read_probabilities(ds)
        half = read_probabilities(ds, out_shape=(250, 300), resampling=Resampling.average)
    with rasterio.open(f32.probabilities) as ds:
        want = read_probabilities(ds)
    assert raw.max() <= 255 and (raw[:, ~valid] == 255).all() and (raw[:, valid] <= 254).all()
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[:, ~valid]).all()
    assert np.nanmax(np.abs(got - want)) <= 1 / 508 + 1e-6  # see the round-trip test
    assert np.nanmin(got) >= 0 and np.nanmax(got) <= 1 and np.nanmax(half) <= 1
    # segment polygonizes the stored values, so vectorize on the uint8 COG finds the same polygons
    manifest = json.loads((u8.run_dir / "manifest.json").read_text())
    assert manifest["options"]["dtype"] == "uint8"
    path, n = geoseg.vectorize(u8.run_dir, geoseg.VectorizeConfig(threshold=0.5))
    assert n == u8.features > 0


def test_dtype_is_part_of_the_fingerprint(tmp_path):
    src = write(tmp_path / "in.tif", scene(50, 50))
    from geoseg.raster import inspect_raster

    info = inspect_raster(str(src))
    cfg = geoseg.SegmentConfig(str(src), ("x",), tmp_path / "o")
    assert fingerprint(cfg, info) != fingerprint(cfg.replace(dtype="uint8"), info)
