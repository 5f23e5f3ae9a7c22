"""Generators for test rasters (kept with the tests, seeded, written with rasterio) and outcome checks.

Two halves:

* generators: ``scene`` and ``write`` (small seeded GeoTIFFs), then one ``make_*`` function per input
  class geoseg must handle (``SEGMENT_CASES``) or refuse (``REFUSE_CASES``). Each returns a
  :class:`Case` carrying the path, the options a user would pass, and the ground truth the checks
  need (which pixels are valid, which CRS the polygons must be in).
* checks: :func:`check_segmented` asserts a finished run's outcome (CRS, footprint, no polygon over
  masked pixels, polygons exactly where the probabilities reach the threshold) and
  :func:`check_refused` asserts a refusal's (exact error class, one line naming the file, nothing
  left in the output directory that looks finished).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS

UTM33 = "EPSG:32633"
NORTH_UP = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0)
RED = (200, 60, 50)
BLUE = (40, 90, 220)

#: A transverse Mercator CRS with an unnamed datum and no authority code anywhere.
CUSTOM_WKT = (
    'PROJCS["unnamed TM",GEOGCS["unnamed",DATUM["unnamed datum",SPHEROID["unnamed",6378388,297]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
    'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",129],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1],'
    'AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
#: Mars, geographic (planetocentric sphere) and an equirectangular projection of it.
MARS_GEOGRAPHIC = "IAU_2015:49900"
MARS_PROJECTED = "IAU_2015:49910"


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB (3, H, W): noisy green ground with red rectangles and blue discs."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, height, width), np.uint8)
    img[0] = rng.integers(20, 80, (height, width))
    img[1] = rng.integers(90, 160, (height, width))
    img[2] = rng.integers(20, 80, (height, width))
    for _ in range(max(1, height * width // 20000)):
        h, w = rng.integers(6, 40, 2)
        r, c = rng.integers(0, max(1, height - h)), rng.integers(0, max(1, width - w))
        img[:, r:r + h, c:c + w] = np.array(RED, np.uint8)[:, None, None]
    yy, xx = np.mgrid[:height, :width]
    for _ in range(max(1, height * width // 40000)):
        cy, cx, rad = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 20)
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = np.array(BLUE, np.uint8)[:, None]
    return img


def write(path: Path, data: np.ndarray, crs=UTM33, transform: Affine = NORTH_UP, **profile) -> Path:
    """Write (bands, H, W) ``data`` as a GeoTIFF; extra creation options/profile keys pass through."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    kw = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
              dtype=data.dtype, crs=crs, transform=transform)
    kw.update(profile)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return Path(path)


# -- cases ----------------------------------------------------------------------------------------

@dataclass
class Case:
    """One input file and what a correct run (or refusal) looks like.

    ``options``: SegmentConfig keyword arguments a user would pass (bands, crs, resolution, vector).
    ``valid``: ground-truth valid pixels of the native grid (None: all valid).
    ``crs``: the CRS the polygons must be in (None: the raster's own).
    ``features``: whether the scene must give at least one polygon.
    ``error``/``match``: for refusals, the exact geoseg error class name and a message regex.
    """

    path: Path | str
    options: dict = field(default_factory=dict)
    valid: np.ndarray | None = None
    crs: str | None = None
    features: bool = True
    error: str | None = None
    match: str = ""
    names_file: bool = True


def _valid_collar(h: int, w: int) -> np.ndarray:
    """An irregular valid region: a rotated-scene-like collar of invalid pixels around it."""
    yy, xx = np.mgrid[:h, :w]
    return (xx + yy > min(h, w) // 4) & (xx - yy < w - min(h, w) // 5) & (yy > 3)


def make_rgb(d: Path) -> Case:
    return Case(write(d / "rgb.tif", scene(230, 260, seed=10)))


def make_rgba(d: Path) -> Case:
    """RGBA: alpha=0 collar over bright RED pixels (the model must never see them, nor alpha as a band)."""
    img = scene(240, 250, seed=11)
    valid = _valid_collar(240, 250)
    img[:, ~valid] = np.array(RED, np.uint8)[:, None]
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    path = write(d / "rgba.tif", np.concatenate([img, alpha[None]]), photometric="RGB", alpha="YES")
    with rasterio.open(path) as src:
        assert src.colorinterp[3].name == "alpha"
    return Case(path, valid=valid)


def make_rgbn(d: Path) -> Case:
    """R,G,B + NIR (band 4 undefined, not alpha): every pixel valid, bands 1-3 used."""
    img = scene(220, 230, seed=12)
    nir = np.zeros((1, 220, 230), np.uint8)  # an alpha-like band of zeros must not mask anything
    path = write(d / "rgbn.tif", np.concatenate([img, nir]), photometric="RGB", alpha="NO")
    with rasterio.open(path) as src:
        assert [c.name for c in src.colorinterp] == ["red", "green", "blue", "undefined"]
    return Case(path)


def make_rgbn_minisblack(d: Path) -> Case:
    """Four bands with no colour interpretation at all: the first three are taken as R,G,B."""
    img = scene(200, 210, seed=13)
    nir = np.full((1, 200, 210), 250, np.uint8)
    return Case(write(d / "rgbn_gray.tif", np.concatenate([img, nir]), photometric="MINISBLACK"))


def _multispectral(d: Path, name: str, descriptions=None) -> Path:
    """Six uint16 bands, Landsat-like order: coastal, blue, green, red, nir, swir."""
    img = scene(200, 220, seed=14).astype(np.uint16) * 100 + 1000
    rng = np.random.default_rng(14)
    bands = [img[2] // 2 + 500, img[2], img[1], img[0], rng.integers(3000, 9000, img[0].shape),
             rng.integers(1000, 4000, img[0].shape)]
    path = write(d / name, np.stack(bands).astype(np.uint16), photometric="MINISBLACK")
    if descriptions:
        with rasterio.open(path, "r+") as dst:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, text)
    return path


def make_multispectral_bands(d: Path) -> Case:
    return Case(_multispectral(d, "ms6.tif"), options=dict(bands=(4, 3, 2)))


def make_multispectral_described(d: Path) -> Case:
    names = ("coastal", "blue", "green", "red", "nir", "swir")
    return Case(_multispectral(d, "ms6_named.tif", names))


def make_multispectral_one_band(d: Path) -> Case:
    return Case(_multispectral(d, "ms6_nir.tif"), options=dict(bands=(5,)), features=False)


def make_grey(d: Path) -> Case:
    return Case(write(d / "grey.tif", scene(210, 200, seed=15)[0] * 3 // 2 + 20))


def make_grey_alpha(d: Path) -> Case:
    grey = scene(200, 200, seed=16)[0] * 3 // 2 + 20
    valid = _valid_collar(200, 200)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    grey[~valid] = 255
    return Case(write(d / "grey_alpha.tif", np.stack([grey, alpha]), photometric="MINISBLACK", alpha="YES"),
                valid=valid)


def make_paletted(d: Path) -> Case:
    """Index image: 0 = nodata, 1 = grass, 2 = red roof, 3 = blue pool; palette expanded to RGB."""
    img = scene(200, 230, seed=17)
    idx = np.ones((200, 230), np.uint8)
    idx[(img[0] == RED[0]) & (img[2] == RED[2])] = 2
    idx[(img[2] == BLUE[2]) & (img[0] == BLUE[0])] = 3
    valid = _valid_collar(200, 230)
    idx[~valid] = 0
    path = write(d / "palette.tif", idx, photometric="PALETTE", nodata=0)
    with rasterio.open(path, "r+") as dst:
        dst.write_colormap(1, {0: (0, 0, 0, 0), 1: (60, 130, 50, 255), 2: (*RED, 255), 3: (*BLUE, 255)})
    with rasterio.open(path) as src:
        assert src.colorinterp[0].name == "palette"
    return Case(path, valid=valid)


def make_uint16(d: Path) -> Case:
    return Case(write(d / "u16.tif", scene(210, 220, seed=18).astype(np.uint16) * 120 + 6000))


def make_int16_negative(d: Path) -> Case:
    img = scene(220, 200, seed=19).astype(np.int16) * 8 - 900
    valid = _valid_collar(220, 200)
    img[:, ~valid] = -1000
    return Case(write(d / "i16.tif", img, nodata=-1000), valid=valid)


def make_float32_nan_undeclared(d: Path) -> Case:
    """float32 reflectance with NaN holes and NO nodata declared: NaN must still be masked."""
    img = scene(200, 210, seed=20).astype(np.float32) / 300.0
    valid = _valid_collar(200, 210)
    valid[50:60, 100:140] = False
    img[:, ~valid] = np.nan
    img[1, 120, 10] = np.nan  # one band NaN only: the pixel is invalid
    valid[120, 10] = False
    return Case(write(d / "f32_nan.tif", img), valid=valid)


def make_float64_nan_nodata(d: Path) -> Case:
    img = scene(200, 200, seed=21).astype(np.float64) * 1e3 - 5e4
    valid = _valid_collar(200, 200)
    img[:, ~valid] = np.nan
    return Case(write(d / "f64_nan.tif", img, nodata=float("nan")), valid=valid)


def make_scale_offset(d: Path) -> Case:
    img = scene(200, 200, seed=22).astype(np.uint16) * 40
    path = write(d / "scaled.tif", img)
    with rasterio.open(path, "r+") as dst:
        dst.scales = (0.0001,) * 3
        dst.offsets = (-0.1,) * 3
    return Case(path)


def make_uint8_scale_offset(d: Path) -> Case:
    path = write(d / "u8_scaled.tif", scene(200, 200, seed=23))
    with rasterio.open(path, "r+") as dst:
        dst.scales = (0.01,) * 3
        dst.offsets = (5.0,) * 3
    return Case(path)


def make_nodata(d: Path) -> Case:
    img = scene(230, 240, seed=24)
    valid = _valid_collar(230, 240)
    img[:, ~valid] = 0
    return Case(write(d / "nodata0.tif", img, nodata=0), valid=valid)


def _masked(d: Path, name: str, internal: bool) -> Case:
    img = scene(220, 220, seed=25)
    valid = _valid_collar(220, 220)
    img[:, ~valid] = np.array(RED, np.uint8)[:, None]  # bright red under the mask: must stay unseen
    mask = np.where(valid, 255, 0).astype(np.uint8)
    path = write(d / name, img, photometric="RGB")
    if internal:
        with rasterio.open(path, "r+") as dst:
            dst.write_mask(mask)
    else:  # a GDAL .msk sidecar: one band, flags saying it is the mask of every band (GMF_PER_DATASET)
        with rasterio.open(str(path) + ".msk", "w", driver="GTiff", width=220, height=220, count=1,
                           dtype="uint8", compress="deflate") as dst:
            dst.write(mask[None])
            dst.update_tags(**{f"INTERNAL_MASK_FLAGS_{i}": "2" for i in (1, 2, 3)})
    with rasterio.open(path) as src:
        assert all(f == [rasterio.enums.MaskFlags.per_dataset] for f in src.mask_flag_enums)
    return Case(path, valid=valid)


def make_internal_mask(d: Path) -> Case:
    return _masked(d, "internal_mask.tif", internal=True)


def make_msk_sidecar(d: Path) -> Case:
    return _masked(d, "msk_sidecar.tif", internal=False)


def _crs_case(d: Path, name: str, crs, transform: Affine, **kw) -> Case:
    return Case(write(d / name, scene(200, 220, seed=26), crs=crs, transform=transform), **kw)


def make_epsg4326(d: Path) -> Case:
    return _crs_case(d, "wgs84.tif", "EPSG:4326", Affine(1e-5, 0, 12.5, 0, -1e-5, 41.9))


def make_us_feet(d: Path) -> Case:
    return _crs_case(d, "ftus.tif", "EPSG:2263", Affine(2.0, 0, 985000.0, 0, -2.0, 205000.0))


def make_custom_wkt(d: Path) -> Case:
    case = _crs_case(d, "custom_wkt.tif", CRS.from_wkt(CUSTOM_WKT), Affine(0.5, 0, 320000, 0, -0.5, 4150000))
    with rasterio.open(case.path) as src:
        assert src.crs.to_epsg() is None
    return case


def make_mars(d: Path) -> Case:
    return _crs_case(d, "mars.tif", MARS_GEOGRAPHIC, Affine(1e-4, 0, 137.4, 0, -1e-4, -4.6))


def make_mars_projected(d: Path) -> Case:
    return _crs_case(d, "mars_eqc.tif", MARS_PROJECTED, Affine(6.0, 0, 8.1e6, 0, -6.0, -2.7e5))


def rotated(angle_deg: float, px: float = 0.5, x0: float = 500000.0, y0: float = 4500000.0) -> Affine:
    return Affine.translation(x0, y0) @ Affine.rotation(angle_deg) @ Affine.scale(px, -px)


def make_rotated(d: Path) -> Case:
    return _crs_case(d, "rotated.tif", UTM33, rotated(30.0))


def make_sheared(d: Path) -> Case:
    return _crs_case(d, "sheared.tif", UTM33, Affine(0.5, 0.2, 500000, 0.1, -0.6, 4500000))


def make_south_up(d: Path) -> Case:
    return _crs_case(d, "south_up.tif", UTM33, Affine(0.5, 0, 500000, 0, 0.5, 4400000))


def make_flipped_x(d: Path) -> Case:
    return _crs_case(d, "flip_x.tif", UTM33, Affine(-0.5, 0, 500200, 0, -0.5, 4500000))


def make_antimeridian_native(d: Path) -> Case:
    """EPSG:4326 raster from 179.99° to 180.01°: polygons stay in the native CRS, beyond 180 too."""
    return _crs_case(d, "am_4326.tif", "EPSG:4326", Affine(1e-4, 0, 179.989, 0, -1e-4, -16.5))


def make_antimeridian_utm(d: Path) -> Case:
    """UTM 60S (central meridian 177°E), 600 m pixels spanning about 179.4°E .. 179.3°W, with red
    rectangles painted across the 180° meridian (so polygons cross it)."""
    from pyproj import Transformer

    transform = Affine(600.0, 0, 760000.0, 0, -600.0, 8200000.0)
    to_geo = Transformer.from_crs("EPSG:32760", "EPSG:4326", always_xy=True)
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True)
    img = scene(200, 220, seed=26)
    for row0, row1 in ((20, 60), (120, 170)):
        lat = to_geo.transform(*(transform @ (110, (row0 + row1) / 2)))[1]
        col = int((~transform @ to_utm.transform(180.0, lat))[0])
        assert 20 < col < 200
        img[:, row0:row1, col - 12:col + 12] = np.array(RED, np.uint8)[:, None, None]
    return Case(write(d / "am_utm60s.tif", img, crs="EPSG:32760", transform=transform))


def make_tiled(d: Path) -> Case:
    return Case(write(d / "tiled.tif", scene(300, 310, seed=27), tiled=True, blockxsize=64, blockysize=64))


def make_striped_1row(d: Path) -> Case:
    return Case(write(d / "strip1.tif", scene(200, 230, seed=28), blockysize=1))


def make_big_endian(d: Path) -> Case:
    img = scene(200, 200, seed=29).astype(np.uint16) * 200
    path = write(d / "big_endian.tif", img, endianness="BIG", tiled=True, blockxsize=64, blockysize=64)
    assert Path(path).read_bytes()[:2] == b"MM"
    return Case(path)


def make_bigtiff(d: Path) -> Case:
    path = write(d / "bigtiff.tif", scene(200, 200, seed=30), BIGTIFF="YES", compress="deflate")
    assert Path(path).read_bytes()[:4] == b"II+\x00", "BigTIFF header"
    return Case(path)


def make_cog(d: Path) -> Case:
    src = write(d / "cog_src.tif", scene(600, 640, seed=31))
    path = d / "cog.tif"
    rasterio.shutil.copy(src, path, driver="COG", BLOCKSIZE=256, OVERVIEW_COUNT=2, COMPRESS="DEFLATE")
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4]
    return Case(path)


def make_vrt(d: Path) -> Case:
    src = write(d / "vrt_src.tif", scene(210, 230, seed=32), nodata=0)
    path = d / "mosaic.vrt"
    rasterio.shutil.copy(src, path, driver="VRT")
    return Case(path)


def _world_file(path: Path, transform: Affine) -> None:
    a, b, c, d_, e, f = tuple(transform)[:6]
    centre = transform @ (0.5, 0.5)
    path.write_text("\n".join(repr(v) for v in (a, d_, b, e, centre[0], centre[1])) + "\n")


def _image_with_world_file(d: Path, name: str, driver: str, world_ext: str, **opts) -> Path:
    img = scene(200, 220, seed=33)
    path = d / name
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(path, "w", driver=driver, width=220, height=200, count=3, dtype="uint8", **opts) as dst:
            dst.write(img)
    for junk in d.glob(name + ".aux.xml"):
        junk.unlink()
    _world_file(path.with_suffix(world_ext), NORTH_UP)
    return path


def make_png_world_file(d: Path) -> Case:
    return Case(_image_with_world_file(d, "photo.png", "PNG", ".pgw"), options=dict(crs=UTM33))


def make_jpeg_world_file(d: Path) -> Case:
    return Case(_image_with_world_file(d, "photo.jpg", "JPEG", ".jgw", quality=95), options=dict(crs=UTM33))


def make_png_named_tif(d: Path) -> Case:
    """A PNG (with world file) whose name says GeoTIFF: GDAL goes by content."""
    png = _image_with_world_file(d, "liar.png", "PNG", ".wld")
    path = d / "liar.tif"
    png.rename(path)
    (d / "liar.wld").rename(d / "liar.tfw")
    assert path.read_bytes()[:4] == b"\x89PNG"
    return Case(path, options=dict(crs=UTM33))


def make_tif_named_jpg(d: Path) -> Case:
    path = write(d / "liar.jpg", scene(200, 200, seed=34), compress="lzw")
    return Case(path)


def _tiny(d: Path, h: int, w: int) -> Case:
    img = scene(h, w, seed=35)
    img[:, : max(1, h // 2), : max(1, w // 2)] = np.array(RED, np.uint8)[:, None, None]
    return Case(write(d / f"tiny_{h}x{w}.tif", img))


def make_tiny_1xn(d: Path) -> Case:
    return _tiny(d, 1, 300)


def make_tiny_nx1(d: Path) -> Case:
    return _tiny(d, 250, 1)


def make_tiny_1x1(d: Path) -> Case:
    return _tiny(d, 1, 1)


def make_tiny_5x7(d: Path) -> Case:
    return _tiny(d, 5, 7)


SEGMENT_CASES: dict[str, Callable[[Path], Case]] = {
    "uint8_rgb": make_rgb, "rgba_alpha": make_rgba, "rgb_nir": make_rgbn,
    "rgbn_no_colorinterp": make_rgbn_minisblack, "multispectral_bands": make_multispectral_bands,
    "multispectral_described": make_multispectral_described, "multispectral_one_band": make_multispectral_one_band,
    "grey": make_grey, "grey_alpha": make_grey_alpha, "paletted": make_paletted, "uint16": make_uint16,
    "int16_negative_nodata": make_int16_negative, "float32_nan_undeclared": make_float32_nan_undeclared,
    "float64_nan_nodata": make_float64_nan_nodata, "uint16_scale_offset": make_scale_offset,
    "uint8_scale_offset": make_uint8_scale_offset, "nodata_value": make_nodata,
    "internal_mask": make_internal_mask, "msk_sidecar": make_msk_sidecar, "epsg4326": make_epsg4326,
    "us_survey_feet": make_us_feet, "custom_wkt": make_custom_wkt, "mars_geographic": make_mars,
    "mars_projected": make_mars_projected, "rotated": make_rotated, "sheared": make_sheared,
    "south_up": make_south_up, "flipped_x": make_flipped_x, "antimeridian_4326": make_antimeridian_native,
    "antimeridian_utm": make_antimeridian_utm, "tiled_64": make_tiled, "striped_1row": make_striped_1row,
    "big_endian": make_big_endian, "bigtiff": make_bigtiff, "cog_overviews": make_cog, "vrt": make_vrt,
    "png_world_file_crs": make_png_world_file, "jpeg_world_file_crs": make_jpeg_world_file,
    "png_named_tif": make_png_named_tif, "tif_named_jpg": make_tif_named_jpg, "tiny_1xN": make_tiny_1xn,
    "tiny_Nx1": make_tiny_nx1, "tiny_1x1": make_tiny_1x1, "tiny_5x7": make_tiny_5x7,
}

#: GTiff compressions to try (those this GDAL build lacks are skipped by the test).
COMPRESSIONS = ("NONE", "DEFLATE", "LZW", "PACKBITS", "ZSTD", "LZMA", "LERC", "LERC_DEFLATE", "LERC_ZSTD",
                "JPEG", "WEBP", "JXL")


def make_compressed(d: Path, compress: str) -> Path:
    """A tiled RGB GeoTIFF with ``compress`` (raises if this GDAL cannot write it)."""
    opts = dict(tiled=True, blockxsize=64, blockysize=64, compress=compress)
    if compress == "JPEG":
        opts["photometric"] = "YCBCR"
    return write(d / f"c_{compress.lower()}.tif", scene(200, 230, seed=36), **opts)


# -- refusals -------------------------------------------------------------------------------------

def make_empty_file(d: Path) -> Case:
    path = d / "empty.tif"
    path.write_bytes(b"")
    return Case(path, error="RasterOpenError", match="empty")


def make_text_file(d: Path) -> Case:
    path = d / "notes.tif"
    path.write_text("this is not a raster, just text in a file named .tif\n")
    return Case(path, error="RasterOpenError", match="cannot open as a raster")


def make_vector_file(d: Path) -> Case:
    path = d / "points.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1, 2]}}]}))
    return Case(path, error="RasterOpenError", match="cannot open as a raster")


def make_truncated_header(d: Path) -> Case:
    """A GeoTIFF cut after its first bytes: the image file directory is gone, GDAL cannot open it."""
    src = write(d / "whole.tif", scene(200, 200, seed=40))
    path = d / "truncated_header.tif"
    path.write_bytes(src.read_bytes()[:64])
    return Case(path, error="RasterOpenError", match="cannot open as a raster")


def make_truncated(d: Path) -> Case:
    """A GeoTIFF cut in half: it opens (the directory comes first) but half its strips are gone."""
    src = write(d / "whole.tif", scene(400, 300, seed=40))
    data = src.read_bytes()
    path = d / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    return Case(path, error="RasterReadError", match=r"failed to read window")


def make_truncated_cog(d: Path) -> Case:
    """A COG cut short: the header and directory (written first) survive, the tiles do not."""
    src = write(d / "whole_cog_src.tif", scene(400, 400, seed=41))
    full = d / "whole_cog.tif"
    rasterio.shutil.copy(src, full, driver="COG", BLOCKSIZE=256, OVERVIEWS="NONE", COMPRESS="DEFLATE")
    data = full.read_bytes()
    path = d / "truncated_cog.tif"
    path.write_bytes(data[: len(data) // 3])
    return Case(path, error="RasterReadError", match=r"failed to read window")


def make_missing_file(d: Path) -> Case:
    return Case(d / "does_not_exist.tif", error="RasterOpenError", match="no such file")


def make_zero_bands(d: Path) -> Case:
    path = d / "no_bands.vrt"
    path.write_text('<VRTDataset rasterXSize="20" rasterYSize="10"><SRS>EPSG:32633</SRS>'
                    '<GeoTransform>500000, 0.5, 0, 4500000, 0, -0.5</GeoTransform></VRTDataset>')
    return Case(path, error="RasterOpenError", match="cannot open as a raster|empty")


def _complex(d: Path, dtype: str) -> Case:
    rng = np.random.default_rng(42)
    data = (rng.normal(size=(1, 30, 40)) + 1j * rng.normal(size=(1, 30, 40))) * 100
    if dtype == "complex_int16":
        path = d / "cint16.tif"
        with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=1, dtype="complex_int16",
                           crs=UTM33, transform=NORTH_UP) as dst:
            dst.write(data.astype(np.complex64))
    else:
        path = write(d / f"{dtype}.tif", data.astype(dtype))
    return Case(path, error="UnsupportedDataError", match="complex")


def make_complex64(d: Path) -> Case:
    return _complex(d, "complex64")


def make_complex_int16(d: Path) -> Case:
    return _complex(d, "complex_int16")


def make_no_crs(d: Path) -> Case:
    return Case(write(d / "no_crs.tif", scene(50, 60, seed=43), crs=None), error="MissingCRSError",
                match="no CRS.*--crs")


def patch_geokey(path: Path, key: int, old: int, new: int) -> Path:
    """Rewrite one SHORT GeoKey value in place (little-endian TIFF written by GDAL)."""
    data = bytearray(path.read_bytes())
    pattern = struct.pack("<4H", key, 0, 1, old)
    i = data.find(pattern)
    assert i > 0, f"GeoKey {key}={old} not found in {path}"
    data[i:i + 8] = struct.pack("<4H", key, 0, 1, new)
    path.write_bytes(bytes(data))
    return path


def make_unknown_epsg(d: Path) -> Case:
    """ProjectedCSTypeGeoKey = 32200, a code PROJ's database lacks: GDAL falls back to a LOCAL_CS."""
    path = patch_geokey(write(d / "unknown_epsg.tif", scene(50, 60, seed=44)), 3072, 32633, 32200)
    with rasterio.open(path) as src:
        assert "LOCAL_CS" in src.crs.to_wkt()
    return Case(path, error="MissingCRSError", match="engineering CRS.*--crs")


def make_geocentric_crs(d: Path) -> Case:
    path = patch_geokey(write(d / "geocentric.tif", scene(50, 60, seed=45)), 3072, 32633, 4978)
    return Case(path, error="MissingCRSError", match="geocentric CRS.*--crs")


def make_gcps_only(d: Path) -> Case:
    from rasterio.control import GroundControlPoint

    path = d / "gcps.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=50, count=3, dtype="uint8") as dst:
        dst.write(scene(50, 60, seed=46))
        dst.gcps = ([GroundControlPoint(0, 0, 500000, 4500000), GroundControlPoint(50, 0, 500000, 4499975),
                     GroundControlPoint(0, 60, 500030, 4500000)], CRS.from_string(UTM33))
    return Case(path, error="GeoreferencingError", match="GCPs.*gdalwarp")


def make_rpcs_only(d: Path) -> Case:
    from rasterio.rpc import RPC

    rpc = RPC(height_off=100, height_scale=500, lat_off=45.0, lat_scale=0.05, long_off=15.0, long_scale=0.05,
              line_off=25, line_scale=25, samp_off=30, samp_scale=30,
              line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
              samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19)
    path = d / "rpcs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=50, count=3, dtype="uint8") as dst:
        dst.write(scene(50, 60, seed=47))
        dst.rpcs = rpc
    return Case(path, error="GeoreferencingError", match="RPCs.*gdalwarp")


def make_identity_with_crs(d: Path) -> Case:
    path = d / "identity.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=50, count=3, dtype="uint8", crs=UTM33) as dst:
        dst.write(scene(50, 60, seed=48))
    with rasterio.open(path) as src:
        assert src.transform.is_identity and src.crs is not None
    return Case(path, error="GeoreferencingError", match="no usable geotransform")


def make_png_without_world_file(d: Path) -> Case:
    path = _image_with_world_file(d, "bare.png", "PNG", ".pgw")
    path.with_suffix(".pgw").unlink()
    return Case(path, options=dict(crs=UTM33), error="GeoreferencingError", match="no usable geotransform")


def make_png_world_file_no_crs(d: Path) -> Case:
    return Case(_image_with_world_file(d, "nocrs.png", "PNG", ".pgw"), error="MissingCRSError", match="--crs")


def make_multispectral_no_bands(d: Path) -> Case:
    return Case(_multispectral(d, "ms6_nobands.tif"), error="UnsupportedDataError", match="--bands")


def make_bands_out_of_range(d: Path) -> Case:
    return Case(write(d / "rgb_small.tif", scene(50, 60, seed=49)), options=dict(bands=(4, 3, 2)),
                error="ConfigError", match=r"--bands \[4, 3, 2\].*1\.\.3")


def make_alpha_only(d: Path) -> Case:
    path = write(d / "alpha_only.tif", np.full((1, 30, 40), 255, np.uint8), photometric="MINISBLACK")
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [rasterio.enums.ColorInterp.alpha]
    return Case(path, error="UnsupportedDataError", match="alpha")


def make_bad_crs_option(d: Path) -> Case:
    return Case(write(d / "rgb_crs_opt.tif", scene(50, 60, seed=50), crs=None), options=dict(crs="EPSG:nonsense"),
                error="ConfigError", match="--crs", names_file=False)


REFUSE_CASES: dict[str, Callable[[Path], Case]] = {
    "empty_file": make_empty_file, "text_file": make_text_file, "vector_file": make_vector_file,
    "truncated_header": make_truncated_header, "missing_file": make_missing_file, "zero_bands": make_zero_bands,
    "complex64": make_complex64, "complex_int16": make_complex_int16, "no_crs": make_no_crs,
    "unknown_epsg_code": make_unknown_epsg, "geocentric_crs": make_geocentric_crs, "gcps_only": make_gcps_only,
    "rpcs_only": make_rpcs_only, "identity_transform_with_crs": make_identity_with_crs,
    "png_without_world_file": make_png_without_world_file, "png_world_file_no_crs": make_png_world_file_no_crs,
    "multispectral_without_bands": make_multispectral_no_bands, "bands_out_of_range": make_bands_out_of_range,
    "alpha_only": make_alpha_only, "bad_crs_option": make_bad_crs_option,
}


def corrupt_tile(path: Path, row: int, col: int) -> tuple[int, int]:
    """Overwrite the middle of block (row, col) of band 1 with garbage; returns its (offset, size)."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset + 2: offset + size - 2] = bytes((i * 97 + 13) % 251 for i in range(size - 4))
    path.write_bytes(bytes(data))
    return offset, size


# -- outcome checks -------------------------------------------------------------------------------

def read_polygons(path: Path):
    import geopandas as gpd

    return gpd.read_file(path, layer="segments")


def footprint(transform: Affine, width: int, height: int):
    """The raster's footprint polygon (full affine: rotated/sheared/flipped grids included)."""
    import shapely

    corners = [transform @ xy for xy in ((0, 0), (width, 0), (width, height), (0, height))]
    return shapely.Polygon(corners)


def burn(geoms, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Rasterize map-coordinate polygons back onto the grid (pixel-centre rule) via the inverse affine."""
    import shapely
    from rasterio import features

    if len(geoms) == 0:
        return np.zeros(shape, bool)
    inv = ~transform
    a, b, c, d, e, f = tuple(inv)[:6]
    m = np.array([[a, d], [b, e]])
    px = shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy @ m + np.array([c, f]))
    out = features.rasterize(((g, 1) for g in px), out_shape=shape, transform=Affine.identity(), fill=0,
                             dtype=np.uint8)
    return out.astype(bool)


def same_crs(a, b) -> bool:
    import pyproj

    ca, cb = pyproj.CRS.from_user_input(a), pyproj.CRS.from_user_input(b)
    return ca.equals(cb, ignore_axis_order=True) or ca.to_wkt("WKT2_2019") == cb.to_wkt("WKT2_2019")


def check_segmented(result, case: Case, threshold: float = 0.5, reference: np.ndarray | None = None):
    """Assert a finished run's outcome; returns the polygons (GeoDataFrame).

    * the manifest says complete; probabilities.tif is a float32 COG on the working grid;
    * polygons are in the expected CRS and inside the raster footprint;
    * per prompt, the polygons burnt back onto the grid are EXACTLY the pixels whose probability
      reaches the threshold (so they sit where the model said, with the full affine);
    * masked pixels (ground truth ``case.valid``) are NaN in the probabilities and under no polygon;
    * ``reference`` (a whole-image per-pixel model result), if given, matches the probabilities.
    """
    import shapely

    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    with rasterio.open(result.probabilities) as ds:
        probs, transform, prob_crs = ds.read(), ds.transform, ds.crs
        assert ds.dtypes[0] == "float32" and math.isnan(ds.nodata)
    n_prompts, height, width = probs.shape
    with rasterio.open(case.path) as src:
        native_crs = src.crs
    expected_crs = case.crs or case.options.get("crs") or native_crs
    assert same_crs(prob_crs, case.options.get("crs") or native_crs)
    gdf = read_polygons(result.polygons)
    assert gdf.crs is not None and same_crs(gdf.crs, expected_crs), (gdf.crs, expected_crs)
    dst_crs = case.options.get("vector") and case.options["vector"].dst_crs
    if case.features:
        assert len(gdf) > 0, "the scene has objects both prompts respond to"
    if dst_crs:
        return gdf  # geometry checks in the destination CRS are the caller's
    # inside the footprint (a tolerance of 1e-6 px for floating point)
    pixel = math.sqrt(abs(transform.determinant))
    foot = footprint(transform, width, height).buffer(1e-6 * pixel)
    assert shapely.covered_by(gdf.geometry.values, foot).all(), "a polygon leaves the raster footprint"
    if case.valid is not None and (width, height) == case.valid.shape[::-1]:
        assert np.isnan(probs[:, ~case.valid]).all(), "masked pixels must be NaN in probabilities.tif"
        assert np.isfinite(probs[:, case.valid]).all(), "valid pixels must have a probability"
    else:
        assert np.isfinite(probs).all() or case.valid is not None
    for k, prompt in enumerate(manifest["prompts"]):
        burnt = burn(gdf.geometry.values[(gdf["prompt"] == prompt).to_numpy()], transform, (height, width))
        with np.errstate(invalid="ignore"):
            expected = probs[k] >= threshold
        assert np.array_equal(burnt, expected), (
            f"prompt {prompt!r}: {np.sum(burnt != expected)} pixels where polygons and probabilities disagree")
        if case.valid is not None and case.valid.shape == burnt.shape:
            assert not (burnt & ~case.valid).any(), "a polygon covers masked pixels"
    if reference is not None:
        assert reference.shape == probs.shape
        assert np.array_equal(np.isnan(reference), np.isnan(probs))
        assert np.nanmax(np.abs(reference - probs), initial=0.0) <= 1e-6
    return gdf


def check_refused(exc_info, case: Case, out: Path) -> None:
    """Exact error class, one line naming the file, a geoseg error, and no output directory content."""
    import geoseg

    err = exc_info.value
    assert isinstance(err, geoseg.GeosegError)
    assert type(err).__name__ == case.error, f"expected {case.error}, got {type(err).__name__}: {err}"
    text = str(err)
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    if case.names_file:
        assert str(case.path) in text, f"the message does not name the file: {text!r}"
    no_output(out)


def no_output(out: Path) -> None:
    """Nothing that looks finished: no probabilities/polygons, no manifest saying complete."""
    assert not (out / "probabilities.tif").exists()
    assert not (out / "polygons.gpkg").exists() and not (out / "polygons.parquet").exists()
    manifest = out / "manifest.json"
    if manifest.exists():
        assert json.loads(manifest.read_text()).get("status") != "complete"


def env_without_proxies() -> dict:
    """Environment entries that keep GDAL's curl away from any proxy for 127.0.0.1."""
    return {k: "" for k in os.environ if k.lower() in ("http_proxy", "https_proxy", "all_proxy")}
