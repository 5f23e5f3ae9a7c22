"""PNG quicklook of a finished run: the input image with probabilities or polygons and a legend.

``render_preview`` reads everything decimated (``out_shape`` reads, served from overviews where the
files have them), so a preview of a 100 000 px scene costs about as much memory as the PNG itself:

* the **base image** is the run's input read decimated and converted with
  :func:`geoseg.raster.to_model_rgb`, with the bands and the global stretch recorded in the manifest, so the
  colours are the ones the model saw (masked pixels are drawn dark grey);
* ``mode="probabilities"`` tints each pixel with every prompt's colour at an opacity proportional to
  that prompt's probability (``probability * MAX_ALPHA``, prompts composited in prompt order);
* ``mode="polygons"`` draws the outline of every polygon from ``polygons.gpkg`` / ``.parquet``,
  mapped to image pixels with the inverse of the probability raster's affine transform (rotated and
  south-up grids included; polygons written in another ``--dst-crs`` are reprojected back first);
* a **legend** strip below the map shows, per prompt, a colour swatch, the prompt and its polygon
  count. Colours come from :func:`geoseg.export.prompt_colors`, as in the GeoPackage's QGIS style.

The PNG appears under its name only when complete (:func:`geoseg.atomic.atomic_target`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_target
from .errors import ConfigError, GeosegError, NotARunError, first_line
from .export import prompt_colors
from .raster import inspect_raster, open_input, read_probabilities, to_model_rgb
from .rundir import MANIFEST, POLYGONS, PROBABILITIES, RunManifest, load_finished_run

log = logging.getLogger(__name__)

__all__ = ["render_preview", "MODES", "MAX_ALPHA"]

MODES = ("probabilities", "polygons")
#: Opacity of a prompt's colour where its probability is 1 (0 where it is 0; linear in between).
MAX_ALPHA = 0.7
#: Colour of masked (nodata) input pixels, and of the whole map when the input is gone.
MASKED_RGB = (48, 48, 48)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (20, 20, 20)
OUTLINE_WIDTH = 2
SWATCH = 14
ROW_HEIGHT = 20
PAD = 8
MIN_SIZE = 16
MAX_SIZE = 16384


def _vector_path(run_dir: Path, manifest: RunManifest) -> Path | None:
    """The run's current polygon file (``segment`` or the last ``vectorize`` records it)."""
    names = [manifest.outputs.get("polygons"), *POLYGONS.values()]
    for name in filter(None, names):
        if (run_dir / name).exists():
            return run_dir / name
    return None


def _read_vector(path: Path, geometry: bool):
    """The polygons (GeoDataFrame) or just their ``prompt`` column (DataFrame)."""
    try:
        if path.suffix == ".parquet":
            if geometry:
                import geopandas as gpd

                return gpd.read_parquet(path)
            import pandas as pd

            return pd.read_parquet(path, columns=["prompt"])
        import pyogrio

        return pyogrio.read_dataframe(path, layer="segments", columns=["prompt"], read_geometry=geometry)
    except Exception as exc:  # a damaged or foreign file: one clear line, not a traceback
        raise NotARunError(f"{path}: cannot read the polygons: {first_line(exc)}") from exc


def _feature_counts(df, prompts: Sequence[str]) -> list[int]:
    counts = df["prompt"].astype(str).value_counts() if len(df) else {}
    return [int(counts.get(p, 0)) for p in prompts]


# -- rasters -------------------------------------------------------------------------------------

def _preview_shape(height: int, width: int, size: int) -> tuple[int, int]:
    f = size / max(height, width)
    return max(1, round(height * f)), max(1, round(width * f))


def _read_rgb_decimated(src, info, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(3, h, w) 0..1 RGB and (h, w) valid mask of the whole raster at ``shape``.

    The same band choice, palette, scale/offset and global stretch as
    :func:`geoseg.raster.read_rgb` (via ``to_model_rgb``), over the whole extent read with ``out_shape`` (GDAL serves it
    from overviews): averaged when shrinking, nearest for palette indexes and the mask.
    """
    from rasterio.enums import Resampling

    down = shape[0] < src.height or shape[1] < src.width
    smooth = Resampling.average if down else Resampling.bilinear
    data = src.read(list(info.bands), out_shape=(len(info.bands), *shape),
                    resampling=Resampling.nearest if info.palette is not None else smooth)
    valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    return to_model_rgb(data, valid, info)


def _base_image(run_dir: Path, manifest: RunManifest, shape: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """(h, w, 3) uint8 input image on the preview grid, and a note when it could not be read."""
    import rasterio

    h, w = shape
    raster, options = manifest.raster, manifest.options
    path = manifest.input_path(run_dir)
    try:
        info = inspect_raster(path, raster.bands or tuple(options.get("bands") or ()),
                              options.get("crs"), options.get("resolution"))
    except (GeosegError, TypeError) as exc:
        log.warning("preview: cannot read the input image (%s); drawing on grey", exc)
        return np.full((h, w, 3), MASKED_RGB, np.uint8), "input image not readable"
    if raster.stretch:  # the stretch the run used (the file may have been touched since)
        info = dataclasses.replace(info, stretch=raster.stretch)
    if (info.width, info.height) != (raster.width, raster.height):
        log.warning("preview: %s no longer has the run's grid; the overlay may not line up", path)
    try:
        with open_input(info) as src:
            rgb, valid = _read_rgb_decimated(src, info, shape)
    except (GeosegError, rasterio.errors.RasterioError) as exc:
        log.warning("preview: cannot read the input image (%s); drawing on grey", exc)
        return np.full((h, w, 3), MASKED_RGB, np.uint8), "input image not readable"
    img = np.moveaxis(np.rint(rgb * 255.0), 0, -1).astype(np.uint8)
    img[~valid] = MASKED_RGB
    return img, None


def _probabilities(path: Path, shape: tuple[int, int]):
    """(P, h, w) float32 probabilities (NaN = nodata) on the preview grid, and the raster's transform/crs."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        down = src.height > shape[0] or src.width > shape[1]
        probs = read_probabilities(src, out_shape=shape,
                                   resampling=Resampling.average if down else Resampling.nearest)
        return probs, src.transform, src.crs, (src.height, src.width)


def _tint(base: np.ndarray, probs: np.ndarray, colors) -> np.ndarray:
    out = base.astype(np.float32)
    for p, rgb in zip(probs, colors):
        alpha = np.nan_to_num(np.clip(p, 0.0, 1.0), nan=0.0)[..., None] * MAX_ALPHA
        out = out * (1.0 - alpha) + np.asarray(rgb, np.float32) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# -- polygons ------------------------------------------------------------------------------------

def _draw_outlines(img, gdf, prompts: Sequence[str], colors, transform, crs, grid: tuple[int, int]) -> None:
    """Draw polygon rings onto the PIL image, world → pixel by the inverse affine transform."""
    import shapely
    from PIL import ImageDraw

    if len(gdf) == 0:
        return
    if crs is not None and gdf.crs is not None and not gdf.crs.equals(crs):
        gdf = gdf.to_crs(crs)
    sy, sx = img.height / grid[0], img.width / grid[1]
    inv = ~transform
    # world (x, y) -> full-resolution (col, row) by the inverse affine (rotation included) -> preview px
    linear = np.array([[inv.a * sx, inv.b * sx], [inv.d * sy, inv.e * sy]])
    offset = np.array([inv.c * sx, inv.f * sy])
    pixel = shapely.transform(np.asarray(gdf.geometry.values, dtype=object),
                              lambda xy: xy @ linear.T + offset)
    draw = ImageDraw.Draw(img)
    index = {p: i for i, p in enumerate(prompts)}
    labels = gdf["prompt"].astype(str).to_numpy()
    # Draw prompt by prompt in reverse order, so the first prompt ends up on top (as in the legend).
    for k in sorted(set(index.get(lab, -1) for lab in labels), reverse=True):
        if k < 0:
            continue
        rgb = tuple(colors[k])
        for geom in pixel[labels == prompts[k]]:
            if geom is None or geom.is_empty:
                continue
            for part in getattr(geom, "geoms", [geom]):
                for ring in (part.exterior, *part.interiors):
                    # round: a vertex on a pixel edge (50.0 vs 49.9999999 after a rotated inverse
                    # transform) must not land one pixel off
                    xy = [tuple(c) for c in np.round(np.asarray(ring.coords)[:, :2], 6)]
                    if len(xy) >= 2:
                        draw.line(xy, fill=rgb, width=OUTLINE_WIDTH, joint="curve")


# -- legend --------------------------------------------------------------------------------------

def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap default font has a fixed size
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _safe_text(draw, text: str, font) -> str:
    """``text`` if the font can draw it, else with undrawable characters replaced by '?'."""
    try:
        draw.textlength(text, font=font)
        return text
    except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
        return text.encode("latin-1", "replace").decode("latin-1")


def _fit(draw, text: str, font, width: float) -> str:
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _legend_entries(prompts, counts) -> list[str]:
    def n(c):
        if c is None:
            return "polygons: n/a"
        return f"{c} polygon{'s' if c != 1 else ''}"
    return [f"{p}  ({n(c)})" for p, c in zip(prompts, counts)]


def _legend_layout(prompts, counts, title: str, min_width: int):
    """(canvas width, legend height, columns, column width, entries) for the legend strip."""
    from PIL import Image, ImageDraw

    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [_safe_text(draw, e, font) for e in _legend_entries(prompts, counts)]
    natural = max([_text_width(draw, e, font) for e in entries] + [0]) + SWATCH + 3 * PAD
    col_w = int(min(natural, max(min_width, 320)))
    width = max(min_width, col_w + PAD)  # a long title is shortened with "…", never widens the PNG
    cols = max(1, (width - PAD) // col_w)
    rows = -(-len(entries) // cols)
    height = PAD + ROW_HEIGHT * (rows + 1) + PAD
    return width, height, cols, col_w, entries, font


def _draw_legend(img, top: int, title: str, entries, colors, cols: int, col_w: int, font) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    draw.line([(0, top), (img.width, top)], fill=(200, 200, 200), width=1)
    title = _fit(draw, _safe_text(draw, title, font), font, img.width - 2 * PAD)
    draw.text((PAD, top + PAD), title, fill=TEXT_RGB, font=font)
    for i, (text, rgb) in enumerate(zip(entries, colors)):
        row, col = divmod(i, cols)
        x = PAD + col * col_w
        y = top + PAD + ROW_HEIGHT * (row + 1)
        draw.rectangle([x, y + 2, x + SWATCH - 1, y + 2 + SWATCH - 1], fill=tuple(rgb), outline=(90, 90, 90))
        room = col_w - SWATCH - 2 * PAD
        draw.text((x + SWATCH + PAD // 2 + 2, y + 2), _fit(draw, text, font, room), fill=TEXT_RGB, font=font)


# -- entry point -------------------------------------------------------------------------------

def render_preview(run_dir: Path | str, output: Path | str, size: int = 1024,
                   mode: str = "probabilities") -> Path:
    """Render a PNG quicklook of the finished run in ``run_dir`` to ``output``; returns ``output``.

    ``size``: longest side of the map in pixels (the legend strip is added below it).
    ``mode``: ``"probabilities"`` (colour per prompt, opacity ∝ probability) or ``"polygons"``
    (outlines of the run's polygons). Raises :class:`NotARunError` (a :class:`GeosegError`) when
    ``run_dir`` is not a finished run, :class:`ConfigError` for a bad ``size`` or ``mode``.
    """
    from PIL import Image

    if mode not in MODES:
        raise ConfigError(f"preview mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"preview size must be {MIN_SIZE}..{MAX_SIZE} px, got {size!r}")
    run_dir, output = Path(run_dir), Path(output)
    manifest = load_finished_run(run_dir)
    prompts = list(manifest.prompts)
    colors = prompt_colors(len(prompts))

    vector = _vector_path(run_dir, manifest)
    if mode == "polygons" and vector is None:
        raise NotARunError(f"{run_dir}: no polygons.gpkg or polygons.parquet; run `geoseg vectorize {run_dir}`")
    gdf = _read_vector(vector, geometry=mode == "polygons") if vector is not None else None
    counts = _feature_counts(gdf, prompts) if gdf is not None else [None] * len(prompts)

    import rasterio

    prob_path = run_dir / PROBABILITIES
    try:
        with rasterio.open(prob_path) as src:
            grid = (src.height, src.width)
            if src.count != len(prompts):
                raise NotARunError(f"{prob_path}: {src.count} bands for {len(prompts)} prompts in {MANIFEST}")
    except rasterio.errors.RasterioIOError as exc:
        raise NotARunError(f"{prob_path}: cannot open: {first_line(exc)}") from exc
    shape = _preview_shape(*grid, size)
    base, note = _base_image(run_dir, manifest, shape)
    if mode == "probabilities":
        probs, transform, crs, _ = _probabilities(prob_path, shape)
        mapimg = Image.fromarray(_tint(base, probs, colors))
    else:
        with rasterio.open(prob_path) as src:
            transform, crs = src.transform, src.crs
        mapimg = Image.fromarray(base)
        _draw_outlines(mapimg, gdf, prompts, colors, transform, crs, grid)

    what = "probabilities (opacity = p)" if mode == "probabilities" else "polygon outlines"
    name = Path(manifest.input).name or run_dir.name
    title = f"{name}: {what}" + (f" [{note}]" if note else "")
    width, legend_h, cols, col_w, entries, font = _legend_layout(prompts, counts, title, mapimg.width)
    canvas = Image.new("RGB", (width, mapimg.height + legend_h), BACKGROUND_RGB)
    canvas.paste(mapimg, (0, 0))
    _draw_legend(canvas, mapimg.height, title, entries, colors, cols, col_w, font)

    try:
        with atomic_target(output) as tmp:
            canvas.save(tmp, format="PNG")
    except OSError as exc:
        raise GeosegError(f"{output}: cannot write the preview: {exc.strerror or exc}") from exc
    return output
