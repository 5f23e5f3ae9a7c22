"""Open and inspect the input raster, read chunk windows as model-ready RGB, write and assemble parts.

Everything that knows about GDAL files lives here. ``inspect_raster`` runs once on the client and
refuses unusable input with one clear line naming the file; the resulting :class:`RasterInfo` is a
small picklable value that every chunk task uses to open its own handle and read its own window.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, RasterioError, RasterioIOError
from rasterio.windows import Window

from .atomic import atomic_target
from .config import GDAL_CACHEMAX_MB
from .crs import horizontal_crs
from .errors import (
    ConfigError,
    GeoreferencingError,
    MissingCRSError,
    RasterOpenError,
    RasterReadError,
    UnsupportedDataError,
    first_line,
)
from .gdalcopy import create_copy
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
    #: No valid pixel at all (nodata/alpha/mask/NaN everywhere): the run is empty by construction.
    all_masked: bool = False

    @property
    def resampled(self) -> bool:
        return (self.width, self.height) != (self.native_width, self.native_height)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    def region_transform(self, region: Region) -> Affine:
        return self.transform @ Affine.translation(region.col, region.row)


def _open(path: str):
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        if not str(path).startswith("/vsi") and not Path(path).exists():
            raise RasterOpenError(f"{path}: no such file") from exc
        if not str(path).startswith("/vsi") and Path(path).is_file() and Path(path).stat().st_size == 0:
            raise RasterOpenError(f"{path}: cannot open as a raster: the file is empty (0 bytes)") from exc
        raise RasterOpenError(f"{path}: cannot open as a raster: {first_line(exc)}") from exc


def _horizontal_kind(crs) -> str:
    """'projected', 'geographic' or what else PROJ calls it (engineering, geocentric, vertical, ...)."""
    import pyproj

    c = horizontal_crs(pyproj.CRS.from_wkt(crs.to_wkt()) if not isinstance(crs, pyproj.CRS) else crs)
    if c.is_projected:
        return "projected"
    if c.is_geographic:
        return "geographic"
    name = c.type_name.lower()
    return name[:-4] if name.endswith(" crs") else name


def _check_crs(src, path: str, crs_override: str | None) -> CRS:
    """The CRS polygons are written in: ``--crs`` if given, else the raster's own.

    The raster's own CRS must be one PROJ can read and place on a body (projected or geographic,
    any planet). GDAL turns a CRS it cannot resolve (e.g. an EPSG code missing from PROJ's
    database) into a LOCAL_CS "engineering" CRS that no GIS can place; that is refused like a
    missing CRS, with ``--crs`` as the fix. ``--crs`` itself may name any CRS with horizontal axes.
    """
    if crs_override:
        try:
            crs = CRS.from_user_input(crs_override)
            kind = _horizontal_kind(crs)
        except Exception as exc:  # rasterio's or pyproj's CRSError
            raise ConfigError(f"--crs {crs_override!r} is not a CRS PROJ understands: {first_line(exc)}") from exc
        if kind in ("geocentric", "vertical", "temporal"):
            raise ConfigError(f"--crs {crs_override!r} is a {kind} CRS; give one with horizontal "
                              f"(projected or geographic) axes")
        return crs
    try:
        crs = src.crs
    except CRSError as exc:
        raise MissingCRSError(f"{path}: has a CRS PROJ cannot read ({first_line(exc)}); "
                              f"pass --crs with the right one") from exc
    if crs is None:
        raise MissingCRSError(f"{path}: the raster has no CRS; if you know it, pass --crs (e.g. --crs EPSG:32633)")
    try:
        wkt = crs.to_wkt()
        kind = _horizontal_kind(crs)
    except Exception as exc:  # rasterio CRSError or pyproj CRSError
        raise MissingCRSError(f"{path}: has a CRS PROJ cannot read ({first_line(exc)}); "
                              f"pass --crs with the right one") from exc
    if kind not in ("projected", "geographic"):
        name = wkt.split('"')[1] if '"' in wkt else wkt[:40]
        hint = (" (what GDAL makes of a CRS PROJ cannot read, e.g. an EPSG code missing from its database)"
                if kind == "engineering" else "")
        raise MissingCRSError(f"{path}: its CRS {name!r} is not a projected or geographic CRS but "
                              f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} CRS{hint}, so polygons could not "
                              f"be placed on a map; pass --crs with the right one (e.g. --crs EPSG:32633)")
    return crs


def _check_transform(src, path: str) -> Affine:
    """The full affine geotransform (rotation, shear and south-up allowed), or a clear refusal.

    A raster without a usable geotransform is refused rather than segmented in pixel
    coordinates: GCP- or RPC-only rasters must be warped first. A real geotransform wins over
    GCPs/RPCs kept alongside it (GDAL's own rule).
    """
    t = src.transform
    usable = not t.is_identity and t.determinant != 0 and all(math.isfinite(v) for v in tuple(t)[:6])
    if usable:
        return t
    gcps = src.gcps[0] if src.gcps else []
    if gcps or src.rpcs:
        kind = "ground control points (GCPs)" if gcps else "RPCs (rational polynomial coefficients)"
        raise GeoreferencingError(
            f"{path}: georeferenced only by {kind}, not an affine geotransform; warp it first, e.g. "
            f"`gdalwarp {'-rpc ' if not gcps else ''}-t_srs EPSG:XXXX {path} warped.tif`")
    what = "identity" if t.is_identity else "degenerate"
    raise GeoreferencingError(
        f"{path}: has no usable geotransform ({what}: pixel coordinates, not map coordinates); "
        f"georeference it first (a world file, gdal_translate -a_ullr, or gdalwarp)")


#: Band descriptions (lower case) taken as red/green/blue when no band has a colour interpretation.
_RGB_NAMES = (("red", "r"), ("green", "g"), ("blue", "b"))


def select_bands(src, path: str, bands: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """Model bands (1 or 3 indexes) and whether band 1 is a palette to expand.

    ``--bands`` wins. Otherwise: a paletted band 1 is expanded through its colour table; else the
    red/green/blue bands by colour interpretation, else by band description ("red", "green",
    "blue"); else 3 or 4 non-alpha bands are taken as R,G,B(,NIR) with a warning; a single
    non-alpha band is replicated to grey RGB. Five or more bands with nothing marking red, green
    and blue (multispectral) are refused: the first three of those are rarely R,G,B, so the user
    picks them with ``--bands``. Alpha bands are never model channels (they are the mask).
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
    names = [(d or "").strip().lower() for d in src.descriptions]
    by_name = [next((i + 1 for i, n in enumerate(names) if n in alias), None) for alias in _RGB_NAMES]
    if all(by_name):
        return tuple(i for i in by_name if i is not None), False
    usable = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha]
    if not usable:
        raise UnsupportedDataError(f"{path}: no band other than alpha to segment")
    if len(usable) > 4:
        described = ", ".join(f"{i}={names[i - 1]!r}" for i in usable if names[i - 1])
        raise UnsupportedDataError(
            f"{path}: {len(usable)} bands and none marked red/green/blue"
            f"{f' ({described})' if described else ''}; choose the bands the model sees as R,G,B with "
            f"--bands (e.g. --bands 4,3,2 for Landsat 8/Sentinel-2 true colour) or one band with --bands N")
    if len(usable) >= 3:
        log.warning("%s: no red/green/blue colour interpretation; using bands %s as R,G,B%s "
                    "(choose others with --bands)", path, usable[:3],
                    f" and ignoring band {usable[3]}" if len(usable) == 4 else "")
        return tuple(usable[:3]), False
    if len(usable) == 2:
        log.warning("%s: two data bands; using band %d as grey (choose with --bands)", path, usable[0])
    return (usable[0],), False


def _working_grid(src, transform: Affine, resolution: float | None) -> tuple[int, int, Affine]:
    if resolution is None:
        return src.width, src.height, transform
    native = math.sqrt(abs(transform.determinant))
    w = max(1, round(src.width * native / resolution))
    h = max(1, round(src.height * native / resolution))
    if (w, h) == (src.width, src.height):
        return w, h, transform
    return w, h, transform @ Affine.scale(src.width / w, src.height / h)


def _decimated_shape(height: int, width: int) -> tuple[int, int]:
    f = max(1.0, max(height, width) / STATS_SIZE)
    return max(1, round(height / f)), max(1, round(width / f))


def _may_mask(src, bands: Sequence[int]) -> bool:
    """Whether any pixel can be masked: a nodata value, alpha, mask band, or a float type (NaN)."""
    if any(np.dtype(src.dtypes[b - 1]).kind == "f" for b in bands):
        return True
    return any(flags != [MaskFlags.all_valid] for flags in src.mask_flag_enums)


#: Without overviews, statistics come from this many windows per axis (one block each) ...
SAMPLE_GRID = 16
#: ... of at most this many pixels per side.
SAMPLE_WINDOW = 64


def _sample_starts(length: int, block: int) -> tuple[list[int], int]:
    """Evenly spread window starts along one axis, snapped into one block each where blocks are
    at least a window long (tiles), and the window length."""
    size = min(SAMPLE_WINDOW, length)
    starts = np.linspace(0, length - size, min(SAMPLE_GRID, length)).round().astype(int)
    if block >= size:
        starts = starts // block * block
    return sorted(set(int(s) for s in starts)), size


def _sample_windows(src) -> list[Window]:
    """Up to SAMPLE_GRID² small windows spread evenly over the raster (one block each when tiled)."""
    bh, bw = src.block_shapes[0]
    rows, h = _sample_starts(src.height, bh)
    cols, w = _sample_starts(src.width, bw)
    return [Window(c, r, w, h) for r in rows for c in cols]


def _sample(src, path: str, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pixels for statistics: ``(bands, N)`` float64 values, ``(N,)`` valid flags, and whether
    that was every pixel.

    Small rasters are read whole. Larger ones are read decimated (at most STATS_SIZE px on the
    long side) when they have overviews, which GDAL then serves cheaply; without overviews a
    decimated read would decode every block of the file, so a grid of small windows (one block
    each, SAMPLE_GRID² at most) is read instead. Memory is bounded either way.
    """
    shape = _decimated_shape(src.height, src.width)
    exact = shape == (src.height, src.width)
    try:
        if exact or src.overviews(bands[0]):
            data = src.read(list(bands), out_shape=(len(bands), *shape), resampling=Resampling.nearest)
            valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
            data, valid = data.reshape(len(bands), -1), valid.reshape(-1)
        else:
            parts = [(src.read(list(bands), window=w).reshape(len(bands), -1),
                      (src.dataset_mask(window=w) > 0).reshape(-1)) for w in _sample_windows(src)]
            data = np.concatenate([p[0] for p in parts], axis=1)
            valid = np.concatenate([p[1] for p in parts])
    except RasterioError as exc:
        raise RasterReadError(f"{path}: failed to read a sample of the raster (for statistics): "
                              f"{first_line(exc)}") from exc
    data = data.astype(np.float64)
    valid &= np.isfinite(data).all(axis=0)
    return data, valid, exact


def _natural_range(src, band: int) -> float:
    """The largest value of an unsigned 8-bit band: 255, or 2**NBITS - 1 for 1..7-bit data."""
    try:
        nbits = int(src.tags(band, ns="IMAGE_STRUCTURE").get("NBITS", 8))
    except (ValueError, TypeError):
        nbits = 8
    return float(2 ** nbits - 1) if 1 <= nbits < 8 else 255.0


def global_stretch(src, bands: Sequence[int], scale_offset, palette,
                   sample: tuple[np.ndarray, np.ndarray, bool] | None = None) -> tuple[tuple[float, float], ...]:
    """Per-band (low, high) mapped to 0..1, computed ONCE per run from a decimated read.

    uint8 and paletted data keep their natural 0..255 range (the colours CLIPSeg saw in training),
    mapped through the band's scale/offset so the model sees the same image with or without those
    tags (1..7-bit data: 0..2**NBITS-1). Other types get a 2–98 % percentile stretch of the scaled
    values over valid, finite pixels (negative values, NaN and nodata handled); GDAL serves the
    decimated read from overviews when the file has them. Per-tile stretches would make tiles
    disagree.
    """
    if palette is not None:
        return tuple((0.0, 255.0) for _ in bands)
    if src.dtypes[bands[0] - 1] == "uint8":
        out = []
        for b, (scale, offset) in zip(bands, scale_offset):
            top = _natural_range(src, b)
            out.append((offset, top * scale + offset))
        return tuple(out)
    data, valid, _ = sample if sample is not None else _sample(src, str(src.name), bands)
    out = []
    for band, (scale, offset) in zip(data, scale_offset):
        values = band[valid] * scale + offset
        if values.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = (float(v) for v in np.percentile(values, STRETCH_PERCENTILES))
        out.append((lo, hi if hi > lo else lo + 1.0))
    return tuple(out)


def _all_masked(src, path: str, bands: Sequence[int], sample: tuple[np.ndarray, np.ndarray, bool]) -> bool:
    """True when no pixel is valid. Exact: a sample with no valid pixel is confirmed by a scan of
    the mask in row strips (bounded memory) unless the sample was the full raster."""
    _, sample_valid, exact = sample
    if sample_valid.any():
        return False
    if exact:
        return True
    floats = any(np.dtype(src.dtypes[b - 1]).kind == "f" for b in bands)
    rows = max(1, (1 << 22) // max(1, src.width))  # ~4 Mpx per strip
    for row in range(0, src.height, rows):
        window = Window(0, row, src.width, min(rows, src.height - row))
        try:
            valid = src.dataset_mask(window=window) > 0
            if valid.any() and floats:
                valid &= np.isfinite(src.read(list(bands), window=window)).all(axis=0)
        except RasterioError as exc:
            raise RasterReadError(f"{path}: failed to read rows {row}..{row + window.height}: "
                                  f"{first_line(exc)}") from exc
        if valid.any():
            return False
    return True


def _palette(src, band: int) -> tuple[tuple[int, int, int], ...]:
    cmap = src.colormap(band)
    size = max(256, max(cmap, default=0) + 1)
    return tuple(tuple(cmap.get(i, (0, 0, 0, 0))[:3]) for i in range(size))


def inspect_raster(path: str, bands: Sequence[int] = (), crs: str | None = None,
                   resolution: float | None = None) -> RasterInfo:
    """Validate the input and gather everything the chunk tasks need; one clear error otherwise.

    Refuses (a :class:`~geoseg.errors.RasterError` subclass, one line naming the file): files GDAL
    cannot open, empty rasters, complex data, rasters without a usable affine geotransform (GCP/RPC
    only, identity), and rasters without a CRS PROJ can place. Logs a warning when every pixel is
    masked (the run then writes empty outputs without calling the model).
    """
    src = _open(path)
    with src:
        if src.count == 0 or src.width == 0 or src.height == 0:
            raise RasterOpenError(f"{path}: the raster is empty ({src.width}x{src.height}, {src.count} bands)")
        complex_types = sorted({d for d in src.dtypes if "complex" in d})
        if complex_types:
            raise UnsupportedDataError(f"{path}: complex data ({', '.join(complex_types)}) cannot be segmented; "
                                       f"convert it to amplitude first (e.g. gdal_calc.py --calc 'abs(A)')")
        transform = _check_transform(src, path)
        crs_obj = _check_crs(src, path, crs)
        chosen, is_palette = select_bands(src, path, bands)
        palette = _palette(src, chosen[0]) if is_palette else None
        scale_offset = tuple((float(src.scales[b - 1] or 1.0), float(src.offsets[b - 1] or 0.0)) for b in chosen)
        needs_sample = _may_mask(src, chosen) or (palette is None and src.dtypes[chosen[0] - 1] != "uint8")
        sample = _sample(src, path, chosen) if needs_sample else None
        stretch = global_stretch(src, chosen, scale_offset, palette, sample)
        empty = sample is not None and _all_masked(src, path, chosen, sample)
        if empty:
            log.warning("%s: every pixel is masked (nodata, alpha, mask band or NaN): nothing to segment; "
                        "the model will not run and the outputs will be empty", path)
        width, height, work_transform = _working_grid(src, transform, resolution)
        return RasterInfo(
            path=str(path), width=width, height=height, transform=work_transform,
            crs_wkt=crs_obj.to_wkt(), bands=chosen, stretch=stretch, scale_offset=scale_offset,
            palette=palette, native_width=src.width, native_height=src.height,
            block=tuple(src.block_shapes[0]), dtype=src.dtypes[chosen[0] - 1], all_masked=empty)


def bounded_gdal_cache() -> rasterio.Env:
    """A GDAL environment whose block cache is capped (see ``config.GDAL_CACHEMAX_MB``).

    rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, which counts bytes (not MB
    as the config-option string would): so the cap is given in bytes.
    """
    if "GDAL_CACHEMAX" in os.environ:
        return rasterio.Env()
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB * 1024 * 1024)


def open_input(info: RasterInfo):
    """A fresh handle for one task (rasterio handles must not be shared across threads/processes)."""
    return _open(info.path)


@functools.lru_cache(maxsize=16)
def _stretch_lut(dtype: str, scale_offset: tuple[float, float], stretch: tuple[float, float]) -> np.ndarray:
    """0..1 float32 for every value of an 8/16-bit integer type, indexed by its unsigned bit pattern."""
    dt = np.dtype(dtype)
    bits = np.arange(2 ** (8 * dt.itemsize), dtype=np.uint8 if dt.itemsize == 1 else np.uint16)
    values = bits.view(dt).astype(np.float64) * scale_offset[0] + scale_offset[1]
    lo, hi = stretch
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def read_rgb(src, info: RasterInfo, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready (3, h, w) float32 in 0..1 and the (h, w) valid mask for a working-grid region.

    Masked pixels (nodata, alpha, internal masks, NaN) are False in the mask and 0 in the image.
    """
    return to_model_rgb(*read_window(src, info, region), info)


def read_window(src, info: RasterInfo, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Raw model bands (B, h, w) in the file's data type and the (h, w) valid mask of a working-grid
    region (nodata, alpha, internal masks and NaN are invalid). Raw values are 4x smaller than the
    float image when they are bytes: chunk tasks keep these and convert tile by tile."""
    shape = (region.height, region.width)
    if info.resampled:
        sx, sy = info.native_width / info.width, info.native_height / info.height
        window = Window(region.col * sx, region.row * sy, region.width * sx, region.height * sy)
        down = sx > 1 or sy > 1
        smooth = Resampling.average if down else Resampling.bilinear
        kw = dict(window=window, resampling=Resampling.nearest if info.palette is not None else smooth)
        mask_kw = dict(window=window, out_shape=shape, resampling=Resampling.nearest)
    else:
        kw = mask_kw = dict(window=Window(region.col, region.row, region.width, region.height))
    try:
        data = src.read(list(info.bands), out_shape=(len(info.bands), *shape), **kw)
        valid = src.dataset_mask(**mask_kw) > 0
    except RasterioError as exc:
        raise RasterReadError(f"{info.path}: failed to read window {region} "
                              f"(rows {region.row}..{region.row_stop}, cols {region.col}..{region.col_stop}): "
                              f"{first_line(exc)}") from exc
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def stretch_table(info: RasterInfo, dtype) -> np.ndarray | None:
    """The run's whole stretch as a look-up table, or None where values need arithmetic (floats,
    32/64-bit integers).

    Palette: (3, K) float32 0..1, indexed by ``clip(value, 0, K - 1)`` of band 1. 8/16-bit
    integers: (B, 2**bits) float32 0..1, indexed per band by the value's unsigned bit pattern.
    :func:`to_model_rgb` and the device chunk path both index this one table, so they give the
    same model input bit for bit.
    """
    dt = np.dtype(dtype)
    if info.palette is not None:
        return _palette_table(info.palette)
    if dt.itemsize <= 2 and dt.kind in "ui":
        return np.stack([_stretch_lut(dt.str, so, st) for so, st in zip(info.scale_offset, info.stretch)])
    return None


@functools.lru_cache(maxsize=4)
def _palette_table(palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    table = np.ascontiguousarray((np.asarray(palette, dtype=np.float32) / 255.0).T)
    table.setflags(write=False)
    return table


def to_model_rgb(data: np.ndarray, valid: np.ndarray, info: RasterInfo) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands (B, h, w) → (3, h, w) float32 0..1 through the palette or the run's global stretch.

    NaN pixels are cleared from ``valid``; masked pixels are 0 in the image.
    """
    table = stretch_table(info, data.dtype)
    if info.palette is not None:
        palette = _palette_table(info.palette)
        rgb = palette[:, np.clip(data[0], 0, palette.shape[1] - 1)]
    elif table is not None:
        # 8/16-bit integers: one table look-up per pixel instead of five float passes (3x faster)
        index = data.view(np.uint8 if data.dtype.itemsize == 1 else np.uint16)
        rgb = np.stack([t[band] for t, band in zip(table, index)])
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
    else:
        data = data.astype(np.float64 if data.dtype == np.float64 else np.float32)
        valid = valid & np.isfinite(data).all(axis=0)
        rgb = np.empty_like(data)
        for i, ((scale, offset), (lo, hi)) in enumerate(zip(info.scale_offset, info.stretch)):
            rgb[i] = ((data[i] * scale + offset) - lo) / (hi - lo)
        np.clip(rgb, 0.0, 1.0, out=rgb)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
    rgb[:, ~valid] = 0.0
    return rgb.astype(np.float32, copy=False), valid


# -- output parts and assembly ---------------------------------------------------------------

#: ``--dtype uint8`` stores round(p * 254): 0..254 are probabilities, 255 is nodata. Rounding to
#: the nearest step moves a probability by at most 1 / 508, so a threshold on the stored values
#: decides differently from the float32 probabilities only within 1/508 of it.
UINT8_SCALE = 254
UINT8_NODATA = 255
PROBABILITY_DTYPES = ("float32", "uint8")


def quantise(probs: np.ndarray) -> np.ndarray:
    """Float32 probabilities (NaN = nodata) → uint8 ``round(p * 254)``, 255 where NaN."""
    q = np.rint(np.nan_to_num(probs, nan=0.0) * np.float32(UINT8_SCALE)).astype(np.uint8)
    q[np.isnan(probs)] = UINT8_NODATA
    return q


def dequantise(q: np.ndarray) -> np.ndarray:
    """uint8 stored probabilities → float32 ``q / 254``, NaN where 255 (the inverse of :func:`quantise`
    up to its rounding; every reader of a uint8 run goes through this one function)."""
    out = q.astype(np.float32) / np.float32(UINT8_SCALE)
    out[q == UINT8_NODATA] = np.nan
    return out


def read_probabilities(src, window=None, out_shape: tuple[int, int] | None = None,
                       resampling: Resampling = Resampling.nearest) -> np.ndarray:
    """(P, h, w) float32 probabilities with NaN as nodata from an open probability raster of either
    dtype (float32 with NaN nodata, or uint8 ``round(p * 254)`` with 255 nodata).

    ``window``/``out_shape``/``resampling`` are passed to ``src.read`` (a decimated read is served
    from the COG's overviews). The one reader for vectorize, preview and evaluation.
    """
    kw: dict = dict(window=window, masked=True, resampling=resampling)
    if out_shape is not None:
        kw["out_shape"] = (src.count, *out_shape)
    if src.dtypes[0] == "uint8":
        if resampling == Resampling.nearest:  # exact stored values: the same dequantise as segment
            data = src.read(**kw)
            return dequantise(data.filled(UINT8_NODATA))
        data = src.read(out_dtype="float32", **kw)  # averaged steps (overviews): scale the mean
        return (data / np.float32(UINT8_SCALE)).filled(np.nan).astype(np.float32, copy=False)
    return src.read(out_dtype="float32", **kw).filled(np.nan)


def write_part(path: Path, probs: np.ndarray, info: RasterInfo, region: Region,
               prompts: Sequence[str]) -> None:
    """Write one chunk's probabilities (float32 with NaN, or uint8 from :func:`quantise`) as a tiled
    GeoTIFF, atomically (temp name + os.replace)."""
    byte = probs.dtype == np.uint8
    profile = dict(driver="GTiff", width=region.width, height=region.height, count=len(prompts),
                   dtype="uint8" if byte else "float32", crs=info.crs, transform=info.region_transform(region),
                   nodata=UINT8_NODATA if byte else float("nan"), tiled=True, blockxsize=256, blockysize=256,
                   compress="zstd", zstd_level=1, predictor=2 if byte else 3)  # an intermediate: fast beats small
    with atomic_target(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(probs)
        for i, prompt in enumerate(prompts, start=1):
            dst.set_band_description(i, prompt)


def write_vrt(path: Path, parts: Sequence[tuple[Region, str]], info: RasterInfo,
              prompts: Sequence[str], dtype: str = "float32") -> None:
    """A VRT mosaic of the chunk parts (paths relative to the VRT), the input's grid and CRS."""
    gdal_type, nodata = ("Byte", str(UINT8_NODATA)) if dtype == "uint8" else ("Float32", "nan")
    bands = []
    for b, prompt in enumerate(prompts, start=1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{escape(name)}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{r.width}" ySize="{r.height}"/>'
            f'<DstRect xOff="{r.col}" yOff="{r.row}" xSize="{r.width}" ySize="{r.height}"/></SimpleSource>'
            for r, name in parts)
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}"><Description>{escape(prompt)}'
                     f"</Description><NoDataValue>{nodata}</NoDataValue>{sources}</VRTRasterBand>")
    gt = ", ".join(repr(v) for v in info.transform.to_gdal())
    xml = (f'<VRTDataset rasterXSize="{info.width}" rasterYSize="{info.height}">'
           f"<SRS>{escape(info.crs_wkt)}</SRS><GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
    path.write_text(xml)


#: Creation options of the probabilities COG.
COG_OPTIONS = {"COMPRESS": "DEFLATE", "PREDICTOR": "YES", "BLOCKSIZE": "512", "OVERVIEW_RESAMPLING": "AVERAGE",
               "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS"}


def write_cog(vrt: Path, dst: Path, on_progress: Callable[[float], None] | None = None) -> None:
    """Copy the VRT to a Cloud-Optimized GeoTIFF with overviews, atomically; ``on_progress(fraction)``
    as GDAL reports it (see :mod:`geoseg.gdalcopy` for when it cannot).

    CreateCopy from the VRT streams block by block; the COG driver is never opened for writing
    (it would buffer the whole raster).
    """
    with atomic_target(dst) as tmp:
        create_copy(vrt, tmp, "COG", COG_OPTIONS, on_progress)
