"""The GDAL block cache bound is really in force (a bound given in the wrong unit went unnoticed once:
rasterio passes an integer GDAL_CACHEMAX to GDALSetCacheMax64 as bytes, so 256 meant 256 bytes)."""

from __future__ import annotations

import ctypes
import glob
import os

import pytest
import rasterio

from geoseg.config import GDAL_CACHEMAX_MB
from geoseg.raster import bounded_gdal_cache


def _gdal_cache_max():
    """GDALGetCacheMax64 of the libgdal that rasterio loaded (its wheel ships one in rasterio.libs)."""
    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*"))
    if not libs:
        pytest.skip("rasterio is not a wheel with a bundled libgdal; cannot query the cache from here")
    lib = ctypes.CDLL(libs[0])
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return lib.GDALGetCacheMax64


def test_bounded_cache_is_the_documented_number_of_megabytes(monkeypatch):
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    get = _gdal_cache_max()
    with bounded_gdal_cache():
        assert get() == GDAL_CACHEMAX_MB * 1024 * 1024
