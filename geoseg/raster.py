"""Open and inspect the input raster, read chunk windows as model-ready RGB, write and assemble parts.

Everything that knows about GDAL files lives here. ``inspect_raster`` runs once on the client and
refuses unusable input with one clear line naming the file; the resulting :class:`RasterInfo` is a
small picklable value that every chunk task uses to open its own handle and read its own window.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError, RasterioError, RasterioIOError
from rasterio.windows import Window

from .errors import (ConfigError, GeoreferencingError, MissingCRSError, RasterError, RasterOpenError,
                     RasterReadError, UnsupportedDataError)
from .tiling import Region

log = logging.getLogger(__name__)

#: The decimated read used for the global stretch is at most this many pixels on its long side.
STATS_SIZE = 1024
STRETCH_PERCENTILES = (2.0, 98.0)


@dataclass(frozen=True)
class RasterInfo:
    """What a chunk task needs to read the input: a picklable value, no open handles.

    ``width``/``height``/``transform`` describe the *working grid*: the native grid, or a resampled
    one when ``--resolution`` asks for another pixel size (reads then go through GDAL overviews).
    """

    path: str
    width: int
    height: int
    transform: Affine
    crs_wkt: str
    bands: tuple[int, ...]
    stretch: tuple[tuple[float, float], ...]
    scale_offset: tuple[tuple[float, float], ...]
    palette: tuple[tuple[int, int, int], ...] | None
    native_width: int
    native_height: int
    block: tuple[int, int]
    dtype: str

    @property
    def resampled(self) -> bool:
        return (self.width, self.height) != (self.native_width, self.native_height)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    def region_transform(self, region: Region) -> Affine:
        return self.transform * Affine.translation(region.col, region.row)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _open(path: str):
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        if not str(path).startswith("/vsi") and not Path(path).exists():
            raise RasterOpenError(f"{path}: no such file") from exc
        raise RasterOpenError(f"{path}: cannot open as a raster: {_first_line(exc)}") from exc


def _check_crs(src, path: str, crs_override: str | None) -> CRS:
    if crs_override:
        try:
            return CRS.from_user_input(crs_override)
        except CRSError as exc:
            raise ConfigError(f"--crs {crs_override!r} is not a CRS PROJ understands: {_first_line(exc)}") from exc
    try:
        crs = src.crs
    except CRSError as exc:
        raise RasterError(f"{path}: PROJ cannot read its CRS ({_first_line(exc)}); pass --crs") from exc
    if crs is None:
        raise MissingCRSError(f"{path}: the raster has no CRS; if you know it, pass --crs (e.g. --crs EPSG:32633)")
    try:
        crs.to_wkt()
    except CRSError as exc:
        raise RasterError(f"{path}: PROJ cannot read its CRS ({_first_line(exc)}); pass --crs") from exc
    return crs


def _check_transform(src, path: str) -> Affine:
    t = src.transform
    gcps = src.gcps[0] if src.gcps else []
    if gcps or src.rpcs:
        kind = "ground control points (GCPs)" if gcps else "RPCs"
        raise GeoreferencingError(
            f"{path}: georeferenced only by {kind}, not an affine geotransform; "
            f"warp it first, e.g. `gdalwarp -t_srs EPSG:XXXX {path} warped.tif`")
    if t.is_identity or t.determinant == 0:
        raise GeoreferencingError(
            f"{path}: has no usable geotransform ({'identity' if t.is_identity else 'degenerate'}); "
            f"polygons would be in pixel coordinates: georeference it first (gdal_translate -a_ullr / gdalwarp)")
    return t


def select_bands(src, path: str, bands: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """Model bands (1 or 3 indexes) and whether band 1 is a palette to expand.

    Default: the red/green/blue bands by colour interpretation; else the first three non-alpha
    bands (RGB+NIR files); a single non-alpha band is replicated to grey RGB.
    """
    ci = list(src.colorinterp)
    if bands:
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise ConfigError(f"{path}: --bands {list(bands)} but the raster has bands 1..{src.count}")
        return tuple(bands), len(bands) == 1 and ci[bands[0] - 1] == ColorInterp.palette
    if src.count >= 1 and ci[0] == ColorInterp.palette:
        return (1,), True
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in ci for c in rgb):
        return tuple(ci.index(c) + 1 for c in rgb), False
    usable = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha]
    if not usable:
        raise UnsupportedDataError(f"{path}: no band other than alpha to segment")
    if len(usable) >= 3:
        if len(usable) > 3:
            log.warning("%s: no red/green/blue colour interpretation among %d bands; using bands %s "
                        "(choose with --bands)", path, len(usable), usable[:3])
        return tuple(usable[:3]), False
    return (usable[0],), False


def _working_grid(src, transform: Affine, resolution: float | None) -> tuple[int, int, Affine]:
    if resolution is None:
        return src.width, src.height, transform
    native = math.sqrt(abs(transform.determinant))
    w = max(1, round(src.width * native / resolution))
    h = max(1, round(src.height * native / resolution))
    if (w, h) == (src.width, src.height):
        return w, h, transform
    return w, h, transform * Affine.scale(src.width / w, src.height / h)


def _decimated_shape(height: int, width: int) -> tuple[int, int]:
    f = max(1.0, max(height, width) / STATS_SIZE)
    return max(1, round(height / f)), max(1, round(width / f))


def global_stretch(src, bands: Sequence[int], scale_offset, palette) -> tuple[tuple[float, float], ...]:
    """Per-band (low, high) mapped to 0..1, computed ONCE per run from a decimated read.

    uint8 and paletted data keep their natural 0..255 range (the colours CLIPSeg saw in training).
    Other types get a 2–98 % percentile stretch over valid, finite pixels; GDAL serves the decimated
    read from overviews when the file has them. Per-tile stretches would make tiles disagree.
    """
    if palette is not None or src.dtypes[bands[0] - 1] == "uint8":
        return tuple((0.0, 255.0) for _ in bands)
    shape = _decimated_shape(src.height, src.width)
    data = src.read(list(bands), out_shape=(len(bands), *shape), resampling=Resampling.nearest).astype(np.float64)
    valid = src.dataset_mask(out_shape=shape) > 0
    valid &= np.isfinite(data).all(axis=0)
    out = []
    for band, (scale, offset) in zip(data, scale_offset):
        values = band[valid] * scale + offset
        if values.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = (float(v) for v in np.percentile(values, STRETCH_PERCENTILES))
        out.append((lo, hi if hi > lo else lo + 1.0))
    return tuple(out)


def inspect_raster(path: str, bands: Sequence[int] = (), crs: str | None = None,
                   resolution: float | None = None) -> RasterInfo:
    """Validate the input and gather everything the chunk tasks need; one clear error otherwise."""
    src = _open(path)
    with src:
        if src.count == 0 or src.width == 0 or src.height == 0:
            raise RasterOpenError(f"{path}: the raster is empty ({src.width}x{src.height}, {src.count} bands)")
        if any(np.dtype(d).kind == "c" for d in src.dtypes):
            raise UnsupportedDataError(f"{path}: complex data ({src.dtypes[0]}) cannot be segmented; "
                                       f"convert it to amplitude first")
        transform = _check_transform(src, path)
        crs_obj = _check_crs(src, path, crs)
        chosen, is_palette = select_bands(src, path, bands)
        palette = None
        if is_palette:
            cmap = src.colormap(chosen[0])
            palette = tuple(tuple(cmap.get(i, (0, 0, 0, 0))[:3]) for i in range(256))
        scale_offset = tuple((float(src.scales[b - 1] or 1.0), float(src.offsets[b - 1] or 0.0)) for b in chosen)
        stretch = global_stretch(src, chosen, scale_offset, palette)
        width, height, work_transform = _working_grid(src, transform, resolution)
        return RasterInfo(
            path=str(path), width=width, height=height, transform=work_transform,
            crs_wkt=crs_obj.to_wkt(), bands=chosen, stretch=stretch, scale_offset=scale_offset,
            palette=palette, native_width=src.width, native_height=src.height,
            block=tuple(src.block_shapes[0]), dtype=src.dtypes[chosen[0] - 1])


def open_input(info: RasterInfo):
    """A fresh handle for one task (rasterio handles must not be shared across threads/processes)."""
    return _open(info.path)


def read_rgb(src, info: RasterInfo, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready (3, h, w) float32 in 0..1 and the (h, w) valid mask for a working-grid region.

    Masked pixels (nodata, alpha, internal masks, NaN) are False in the mask and 0 in the image.
    """
    shape = (region.height, region.width)
    if info.resampled:
        sx, sy = info.native_width / info.width, info.native_height / info.height
        window = Window(region.col * sx, region.row * sy, region.width * sx, region.height * sy)
        down = sx > 1 or sy > 1
        kw = dict(window=window, out_shape=shape,
                  resampling=Resampling.average if down else Resampling.bilinear)
        mask_kw = dict(window=window, out_shape=shape, resampling=Resampling.nearest)
    else:
        kw = mask_kw = dict(window=Window(region.col, region.row, region.width, region.height))
    try:
        data = src.read(list(info.bands), out_shape=(len(info.bands), *shape), **kw)
        valid = src.dataset_mask(**mask_kw) > 0
    except RasterioError as exc:
        raise RasterReadError(f"{info.path}: failed to read window {region} "
                              f"(rows {region.row}..{region.row_stop}, cols {region.col}..{region.col_stop}): "
                              f"{_first_line(exc)}") from exc
    if info.palette is not None:
        lut = np.asarray(info.palette, dtype=np.float32)
        rgb = np.moveaxis(lut[data[0]], -1, 0) / 255.0
    else:
        data = data.astype(np.float32)
        valid &= np.isfinite(data).all(axis=0)
        rgb = np.empty_like(data)
        for i, ((scale, offset), (lo, hi)) in enumerate(zip(info.scale_offset, info.stretch)):
            rgb[i] = ((data[i] * scale + offset) - lo) / (hi - lo)
        np.clip(rgb, 0.0, 1.0, out=rgb)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
    rgb[:, ~valid] = 0.0
    return rgb.astype(np.float32, copy=False), valid


# -- output parts and assembly ---------------------------------------------------------------

def write_part(path: Path, probs: np.ndarray, info: RasterInfo, region: Region,
               prompts: Sequence[str]) -> None:
    """Write one chunk's probabilities as a tiled GeoTIFF, atomically (temp name + os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    profile = dict(driver="GTiff", width=region.width, height=region.height, count=len(prompts),
                   dtype="float32", crs=info.crs, transform=info.region_transform(region),
                   nodata=float("nan"), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", predictor=3)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(probs)
        for i, prompt in enumerate(prompts, start=1):
            dst.set_band_description(i, prompt)
    os.replace(tmp, path)


def write_vrt(path: Path, parts: Sequence[tuple[Region, str]], info: RasterInfo,
              prompts: Sequence[str]) -> None:
    """A VRT mosaic of the chunk parts (paths relative to the VRT), the input's grid and CRS."""
    bands = []
    for b, prompt in enumerate(prompts, start=1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{escape(name)}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{r.width}" ySize="{r.height}"/>'
            f'<DstRect xOff="{r.col}" yOff="{r.row}" xSize="{r.width}" ySize="{r.height}"/></SimpleSource>'
            for r, name in parts)
        bands.append(f'<VRTRasterBand dataType="Float32" band="{b}"><Description>{escape(prompt)}'
                     f"</Description><NoDataValue>nan</NoDataValue>{sources}</VRTRasterBand>")
    gt = ", ".join(repr(v) for v in info.transform.to_gdal())
    xml = (f'<VRTDataset rasterXSize="{info.width}" rasterYSize="{info.height}">'
           f"<SRS>{escape(info.crs_wkt)}</SRS><GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
    path.write_text(xml)


def write_cog(vrt: Path, dst: Path) -> None:
    """Copy the VRT to a Cloud-Optimized GeoTIFF with overviews, atomically.

    CreateCopy from the VRT streams block by block; the COG driver is never opened for writing
    (it would buffer the whole raster).
    """
    tmp = dst.with_name(dst.name + ".tmp")
    rasterio.shutil.copy(vrt, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=512,
                         OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")
    os.replace(tmp, dst)
