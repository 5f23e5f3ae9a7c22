"""Exemplar (image) prompts: polygons drawn over the raster, cut out as CLIPSeg visual prompts.

Each polygon is read through the run's own read path (``raster.read_window`` + ``to_model_rgb``:
the same bands, global stretch and masks as the tiles), then prepared as the CLIPSeg paper's best
visual prompt ("crop_blur_highlight352"): the crop is the polygon's bounding box widened by 10 %
of its size on each side and squared, resampled to 352 px, and every pixel outside the polygon is
replaced by 10 % of a Gaussian-blurred (sigma 3 px) copy: ``crop = img·m + 0.1·blur(img)·(1 − m)``.

Polygons in another CRS are reprojected to the raster's. A polygon outside the raster, or over
masked pixels only, is refused with one line naming its file and feature id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ExemplarError
from .raster import RasterInfo, bounded_gdal_cache, open_input, read_window, to_model_rgb
from .tiling import Region

#: Side of the prepared crop: CLIPSeg's input size, as for the tiles.
CROP_SIZE = 352
#: Context around the object's box, as a fraction of its size on each side (CLIPSeg paper: 0.1).
CONTEXT = 0.1
#: Background brightness outside the polygon (paper: 10 %).
BACKGROUND = 0.1
#: Background blur, Gaussian sigma in pixels of the prepared crop (paper: sigma 3).
BLUR_SIGMA = 3.0
#: At most this many exemplars per prompt: crops are held in memory (0.5 MB each) and sent to the
#: encoding task, and an average of a few dozen examples no longer changes.
MAX_PER_PROMPT = 64
#: A crop window larger than this (px per side, on the working grid) is refused: memory stays bounded;
#: coarser ``--resolution`` makes a large object fit.
MAX_WINDOW = 4096


@dataclass(frozen=True)
class ExemplarSource:
    """One exemplar file: a class per feature from ``class_field``, or one class for all (``--exemplar``)."""

    path: str
    class_field: str | None = None
    prompt: str | None = None


def parse_sources(files: Sequence[str], class_field: str, per_prompt: Sequence[str]) -> tuple[ExemplarSource, ...]:
    """``--exemplars FILE`` (class from ``class_field``) and ``--exemplar PROMPT=FILE`` values."""
    from .errors import ConfigError

    out = [ExemplarSource(str(f), class_field=class_field) for f in files]
    for spec in per_prompt:
        prompt, sep, path = spec.partition("=")
        if not sep or not prompt.strip() or not path.strip():
            raise ConfigError(f"--exemplar {spec!r}: expected PROMPT=FILE, e.g. building=roofs.gpkg")
        out.append(ExemplarSource(path.strip(), prompt=prompt.strip()))
    return tuple(out)


def _read_layer(source: ExemplarSource):
    import geopandas as gpd

    try:
        gdf = gpd.read_file(source.path, fid_as_index=True)
    except Exception as exc:  # pyogrio raises its own DataSourceError etc.
        from .errors import first_line

        raise ExemplarError(f"{source.path}: cannot read exemplar polygons: {first_line(exc)}") from exc
    if source.class_field is not None and source.class_field not in gdf.columns:
        raise ExemplarError(f"{source.path}: no field {source.class_field!r} (pass --class-field with the field "
                            f"that names each polygon's prompt; fields: {', '.join(map(str, gdf.columns))})")
    if gdf.crs is None:
        raise ExemplarError(f"{source.path}: the exemplar layer has no CRS")
    return gdf


def read_exemplars(sources: Sequence[ExemplarSource], info: RasterInfo,
                   prompts: Sequence[str]) -> tuple[tuple[np.ndarray | None, ...], tuple[tuple[str, ...], ...]]:
    """Prepared crops per prompt (``(n, 3, S, S)`` float32 or None) and their ``file:fid`` ids."""
    crops: list[list[np.ndarray]] = [[] for _ in prompts]
    ids: list[list[str]] = [[] for _ in prompts]
    with bounded_gdal_cache(), open_input(info) as src:
        for source in sources:
            gdf = _read_layer(source)
            gdf = gdf.to_crs(info.crs)
            for fid, row in gdf.iterrows():
                where = f"{source.path}: exemplar feature {fid}"
                name = source.prompt if source.prompt is not None else row[source.class_field]
                if name is None or (isinstance(name, float) and math.isnan(name)):
                    raise ExemplarError(f"{where}: empty {source.class_field!r}")
                name = str(name)
                if name not in prompts:
                    raise ExemplarError(f"{where}: class {name!r} is not a --prompt (add -p {name!r}; "
                                        f"--exemplar-weight 1 uses the exemplars only)")
                geom = row.geometry
                if geom is None or geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
                    raise ExemplarError(f"{where}: not a polygon ({'empty' if geom is None else geom.geom_type})")
                k = prompts.index(name)
                if len(crops[k]) >= MAX_PER_PROMPT:
                    raise ExemplarError(f"{where}: more than {MAX_PER_PROMPT} exemplars of {name!r}; keep the "
                                        f"clearest few dozen (their average embedding is the prompt)")
                crops[k].append(prepare_crop(src, info, geom, where))
                ids[k].append(f"{source.path}:{fid}")
    return (tuple(np.stack(c) if c else None for c in crops), tuple(tuple(i) for i in ids))


def crop_window(bounds: tuple[float, float, float, float]) -> Region:
    """The square working-grid window around a pixel-space box (minx=col, miny=row, ...) with context."""
    # to 1e-6 px: a polygon that went through a CRS round trip (1e-9 m off) gets the same window
    c0, r0, c1, r1 = (round(v, 6) for v in bounds)
    side = max(c1 - c0, r1 - r0, 1.0) * (1 + 2 * CONTEXT)
    side_px = max(1, math.ceil(side))
    col = math.floor((c0 + c1) / 2 - side_px / 2)
    row = math.floor((r0 + r1) / 2 - side_px / 2)
    return Region(row, col, side_px, side_px)


def prepare_crop(src, info: RasterInfo, geom, where: str) -> np.ndarray:
    """One exemplar polygon (in the raster's CRS) → its prepared (3, S, S) float32 0..1 crop."""
    from affine import Affine
    from rasterio.features import rasterize
    from scipy import ndimage
    from shapely import affinity, box

    inv = ~info.transform
    pix = affinity.affine_transform(geom, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
    if not pix.intersects(box(0, 0, info.width, info.height)):
        raise ExemplarError(f"{where}: lies outside the raster {info.path}")
    window = crop_window(pix.bounds)
    if window.height > MAX_WINDOW:
        raise ExemplarError(f"{where}: spans {window.height} px of the raster (more than {MAX_WINDOW}); "
                            f"draw a smaller example or run at a coarser --resolution")
    inside = window.intersection(Region(0, 0, info.height, info.width))
    assert inside is not None  # the polygon intersects the raster and lies within the window
    data, valid = read_window(src, info, inside)
    rgb, ok = to_model_rgb(data, valid, info)
    img = np.zeros((3, window.height, window.width), np.float32)
    good = np.zeros((window.height, window.width), bool)
    img[(slice(None), *inside.slices(within=window))] = rgb
    good[inside.slices(within=window)] = ok
    on_window = rasterize([pix], out_shape=good.shape,
                          transform=Affine.translation(window.col, window.row), all_touched=True)
    if not (good & (on_window > 0)).any():
        raise ExemplarError(f"{where}: covers only masked (nodata) pixels of {info.path}")

    size = CROP_SIZE
    scaled = _resize(img, size)
    to_crop = Affine.translation(window.col, window.row) @ Affine.scale(window.width / size)
    mask = rasterize([pix], out_shape=(size, size), transform=to_crop)
    if not mask.any():  # smaller than one crop pixel: take every pixel it touches
        mask = rasterize([pix], out_shape=(size, size), transform=to_crop, all_touched=True)
    m = mask.astype(np.float32)[None]
    blurred = ndimage.gaussian_filter(scaled, sigma=(0, BLUR_SIGMA, BLUR_SIGMA), mode="nearest")
    return (scaled * m + BACKGROUND * blurred * (1 - m)).astype(np.float32)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """(3, h, w) → (3, size, size), bilinear with antialiasing when shrinking (PIL, as the CLIPSeg
    image processor resamples)."""
    from PIL import Image

    if img.shape[1:] == (size, size):
        return img.copy()
    return np.stack([np.asarray(Image.fromarray(band, mode="F").resize((size, size), Image.Resampling.BILINEAR))
                     for band in img]).astype(np.float32)
