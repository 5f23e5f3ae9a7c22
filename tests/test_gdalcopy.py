"""``geoseg.gdalcopy``: GDALCreateCopy with GDAL's progress callback, in rasterio's own libgdal."""

from __future__ import annotations

import ctypes

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

from geoseg import gdalcopy
from geoseg.errors import GeosegError
from geoseg.raster import COG_OPTIONS, write_cog

needs_lib = pytest.mark.skipif(not gdalcopy.reports_progress(), reason="rasterio's libgdal is not reachable")


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "src.tif"
    with rasterio.open(path, "w", driver="GTiff", width=1500, height=1100, count=2, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 0.5, 0.5), tiled=True,
                       nodata=255) as dst:
        dst.write(rng.integers(0, 255, (2, 1100, 1500), dtype=np.uint8))
        dst.set_band_description(1, "tree")
    return path


@needs_lib
def test_same_library_as_rasterio():
    """A config option set through rasterio.Env is seen by the bound library: one GDAL, not two,
    although pyogrio's wheel loads a second libgdal into the process."""
    pyogrio.list_drivers()
    lib = gdalcopy._libgdal()
    with rasterio.Env(GEOSEG_TEST_OPTION="seen"):
        assert lib.CPLGetConfigOption(b"GEOSEG_TEST_OPTION", None) == b"seen"
    assert lib.CPLGetConfigOption(b"GEOSEG_TEST_OPTION", None) is None
    others = [c for c in gdalcopy._candidates() if "pyogrio" in c]
    if others:  # pyogrio's wheel bundles its own libgdal: it is a candidate, and rejected
        assert "pyogrio" not in lib._name and gdalcopy._candidates().index(others[0]) == 0


@needs_lib
def test_cog_equals_rasterios_copy_and_reports_rising_fractions(tmp_path, source):
    seen: list[float] = []
    write_cog(source, tmp_path / "ours.tif", seen.append)
    rasterio.shutil.copy(source, tmp_path / "ref.tif", driver="COG", **COG_OPTIONS)
    with rasterio.open(tmp_path / "ours.tif") as ours, rasterio.open(tmp_path / "ref.tif") as ref:
        assert ours.profile == ref.profile and ours.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ours.descriptions == ("tree", None) and ours.nodata == 255
        assert np.array_equal(ours.read(), ref.read())
        assert ours.overviews(1) == ref.overviews(1) == [2, 4]
        assert np.array_equal(ours.read(out_shape=(2, 275, 375)), ref.read(out_shape=(2, 275, 375)))
    assert len(seen) > 10 and seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.tif", "ref.tif", "src.tif"]  # no temp left


@needs_lib
def test_exception_in_callback_cancels_and_leaves_nothing(tmp_path, source):
    calls = []

    def interrupt(fraction):
        calls.append(fraction)
        if fraction > 0.2:
            raise KeyboardInterrupt  # what Ctrl-C looks like inside the callback

    with pytest.raises(KeyboardInterrupt):
        write_cog(source, tmp_path / "out.tif", interrupt)
    assert calls[-1] > 0.2 and calls[-1] < 1.0  # GDAL stopped at the first refusal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.tif"]  # no partial COG, no temp


@needs_lib
def test_failure_is_one_geoseg_error_naming_the_file(tmp_path, source, capfd):
    dst = tmp_path / "missing-dir" / "out.tif"
    with pytest.raises(GeosegError) as exc:
        gdalcopy.create_copy(source, dst, "COG", COG_OPTIONS, lambda f: None)
    msg = str(exc.value)
    assert str(dst) in msg and "No such file or directory" in msg and "\n" not in msg
    assert "ERROR" not in capfd.readouterr().err  # GDAL's reason is in the message, not also on stderr
    with pytest.raises(GeosegError, match="cannot open"):
        gdalcopy.create_copy(tmp_path / "nope.tif", tmp_path / "x.tif", "COG", COG_OPTIONS, lambda f: None)


@needs_lib
def test_error_handler_is_restored(tmp_path, source, capfd):
    """The quiet handler is popped again: GDAL errors after the copy are reported as before."""
    with pytest.raises(GeosegError):
        gdalcopy.create_copy(source, tmp_path / "no" / "x.tif", "COG", COG_OPTIONS, lambda f: None)
    lib = gdalcopy._libgdal()
    lib.CPLError.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
    lib.CPLError(2, 1, b"geoseg-test-warning")
    assert "geoseg-test-warning" in capfd.readouterr().err


def test_without_the_library_falls_back_to_rasterio(tmp_path, source, monkeypatch):
    monkeypatch.setattr(gdalcopy, "_libgdal", lambda: None)
    seen: list[float] = []
    write_cog(source, tmp_path / "out.tif", seen.append)
    assert seen == [] and not gdalcopy.reports_progress()
    with rasterio.open(tmp_path / "out.tif") as out, rasterio.open(source) as src:
        assert np.array_equal(out.read(), src.read()) and out.overviews(1) == [2, 4]
