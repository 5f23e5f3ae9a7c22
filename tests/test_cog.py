"""The probability raster is a valid Cloud Optimized GeoTIFF, checked without QGIS (rio-cogeo's
port of GDAL's validate_cloud_optimized_geotiff.py, and GDAL's own LAYOUT=COG metadata)."""

from __future__ import annotations

import rasterio
from rio_cogeo.cogeo import cog_validate

import geoseg

from .rasters import scene, write


def test_probabilities_are_a_valid_cog(tmp_path, inproc_client, perpixel):
    # several chunk parts (512 px) assembled through the VRT, big enough for internal tiles and overviews
    src = write(tmp_path / "in.tif", scene(1100, 1300, seed=21))
    cfg = geoseg.SegmentConfig(str(src), ("red roof", "blue pool"), tmp_path / "out", chunk_size=512)
    result = geoseg.segment(cfg, client=inproc_client, segmenter_factory=perpixel)
    assert result.chunks_run == 9
    is_valid, errors, warnings = cog_validate(result.probabilities, quiet=True)
    assert (is_valid, errors, warnings) == (True, [], [])
    with rasterio.open(result.probabilities) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.profile["tiled"] and ds.block_shapes[0][0] < ds.height
        assert ds.overviews(1), "overviews make it cloud-optimized for zoomed-out reads"
