"""Real rasters written by others (../shared/rasters, see its MANIFEST.md): each SEGMENT file runs and
gives a checked outcome, each REJECT file fails cleanly. Skipped where ../shared is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

import geoseg

from .conftest import RASTERS
from .models import PerPixelSegmenter
from .rasters import Case, check_refused, check_segmented
from .test_inputs import reference

pytestmark = pytest.mark.skipif(not RASTERS.is_dir(), reason=f"{RASTERS} is absent")

PROMPTS = ("red roof", "blue pool")

#: file -> (EPSG code or None for the custom WKT, bands the model must see)
SEGMENT = {
    "aerial_rgb_hro_015m_cog_jpeg.tif": (26913, [1, 2, 3]),
    "drone_rgba_alpha_pix4d_utm50s_lzw.tif": (32750, [1, 2, 3]),
    "RGB.byte.tif": (32618, [1, 2, 3]),
    "landsat8_rgb_uint16_lzw_tiled32.tif": (32620, [1, 2, 3]),
    "naip_rgbn_uint8_300px.tif": (26917, [1, 2, 3]),
    "int16_negative_nodata_scale_cog.tif": (None, [1]),
    "s1_rtc_float32_nan_nodata0.tif": (32610, [1]),
    "aerial_rgb_cog_jpeg_overviews_3857.tif": (3857, [1, 2, 3]),
}

#: file -> (error class, message regex)
REJECT = {
    "bad_empty.tif": ("RasterOpenError", "empty"),
    "bad_text_renamed.tif": ("RasterOpenError", "not recognized as being in a supported file format"),
    "rgba_no_crs_with_geotransform.tif": ("MissingCRSError", "no CRS.*--crs"),
}


def _path(name):
    path = RASTERS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def ground_truth_valid(path, bands) -> np.ndarray:
    """Valid pixels straight from GDAL: the dataset mask (nodata/alpha/mask) and finite values."""
    with rasterio.open(path) as src:
        valid = src.dataset_mask() > 0
        valid &= np.isfinite(src.read(bands)).all(axis=0)
    return valid


def run(case, out, client, factory, **extra):
    cfg = geoseg.SegmentConfig(str(case.path), PROMPTS, out, chunk_size=1024, **{**case.options, **extra})
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


@pytest.mark.parametrize("name", list(SEGMENT))
def test_real_raster_segments(name, tmp_path, inproc_client, perpixel):
    path = _path(name)
    epsg, bands = SEGMENT[name]
    case = Case(path, valid=ground_truth_valid(path, bands), features=False)
    result = run(case, tmp_path / "out", inproc_client, perpixel)
    assert PerPixelSegmenter.calls == result.model_tiles > 0
    gdf = check_segmented(result, case, reference=reference(case, perpixel))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["raster"]["bands"] == bands
    with rasterio.open(path) as src, rasterio.open(result.probabilities) as probs:
        assert (probs.width, probs.height) == (src.width, src.height), "full resolution, undersized padded"
        assert probs.transform == src.transform
        native_crs = src.crs
    if epsg is None:
        assert native_crs.to_epsg() is None and gdf.crs.to_epsg() is None
    else:
        assert gdf.crs.to_epsg() == epsg


def test_alpha_collar_and_nodata_collar_are_masked(tmp_path):
    """The manifest's masked areas are really there (so the test above checks something)."""
    for name, bands, share in (("drone_rgba_alpha_pix4d_utm50s_lzw.tif", [1, 2, 3], 0.12),
                               ("RGB.byte.tif", [1, 2, 3], 0.3), ("s1_rtc_float32_nan_nodata0.tif", [1], 0.5)):
        valid = ground_truth_valid(_path(name), bands)
        assert (~valid).mean() > share, name


@pytest.mark.parametrize("name", list(REJECT))
def test_real_broken_raster_is_refused(name, tmp_path, inproc_client, perpixel):
    path = _path(name)
    error, match = REJECT[name]
    case = Case(path, error=error, match=match)
    out = tmp_path / "out"
    with pytest.raises(geoseg.GeosegError) as exc_info:
        run(case, out, inproc_client, perpixel)
    assert exc_info.match(match)
    check_refused(exc_info, case, out)
    assert not out.exists()


def test_no_crs_raster_segments_once_crs_is_given(tmp_path, inproc_client, perpixel):
    path = _path("rgba_no_crs_with_geotransform.tif")
    case = Case(path, options=dict(crs="EPSG:3857"), valid=ground_truth_valid(path, [1, 2, 3]), features=False)
    result = run(case, tmp_path / "out", inproc_client, perpixel)
    gdf = check_segmented(result, case)
    assert gdf.crs.to_epsg() == 3857
