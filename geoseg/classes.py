"""The exclusive class map (``--classes``): one uint8 label per pixel from the blended probabilities.

Rule: the class of a valid pixel is ``1 + argmax_k p_k`` over the positive prompts (ties go to the
first prompt), or 0 (none) when the winning probability is below that prompt's threshold. Masked
pixels are 255, the file's nodata value (so 0 stays a real answer, "nothing found here"). It is
computed per pixel from the blended probabilities, so it is as chunk-size invariant as they are.

``classes.tif`` is a COG with a colour table (the prompts' polygon colours), the band description
``classes`` and GDAL category names (``none``, then the prompts) in ``classes.tif.aux.xml``; a
``classes.qml`` beside it is QGIS's default style for the file: a paletted renderer listing only the
prompts (QGIS 3.22 would otherwise list all 256 colour-table entries), with "none" transparent.

Class polygons come from the same labels: :func:`exclusive` zeroes every prompt's probability
outside its own class, so thresholding it gives exactly the class regions. Regions of different
classes share pixel edges and never overlap: the polygons form a valid coverage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from .atomic import atomic_target
from .errors import ConfigError

NONE = 0
NODATA = 255
#: Labels 1..254 name prompts; 0 is none and 255 nodata.
MAX_CLASSES = 254


def check_classes(n_prompts: int) -> None:
    if n_prompts > MAX_CLASSES:
        raise ConfigError(f"--classes holds at most {MAX_CLASSES} prompts in a uint8 map, got {n_prompts}")


def class_map(probs: np.ndarray, valid: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(P, h, w) blended probabilities → (h, w) uint8 labels (module docstring)."""
    t = np.asarray(thresholds, np.float64)
    filled = np.where(valid[None], probs, -np.inf)
    winner = np.argmax(filled, axis=0)
    best = np.take_along_axis(filled, winner[None], axis=0)[0]
    # the same comparison chunk_components makes (float32 probability >= float64 threshold)
    labels = np.where(best >= t[winner], winner + 1, NONE).astype(np.uint8)
    labels[~valid] = NODATA
    return labels


def exclusive(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each prompt's probability inside its own class, 0 elsewhere (NaN kept where masked).

    Thresholds are > 0, so ``exclusive(...)[k] >= t_k`` holds exactly where ``labels == k + 1``.
    """
    own = labels[None] == np.arange(1, probs.shape[0] + 1, dtype=np.uint8)[:, None, None]
    return np.where(own | np.isnan(probs), probs, np.float32(0)).astype(np.float32, copy=False)


def colour_table(n_prompts: int) -> dict[int, tuple[int, int, int, int]]:
    from .export import prompt_colors

    table = {NONE: (0, 0, 0, 0)}
    for k, rgb in enumerate(prompt_colors(n_prompts), start=1):
        table[k] = (*rgb, 255)
    table[NODATA] = (0, 0, 0, 0)
    return table


def write_class_part(path: Path, labels: np.ndarray, info, region) -> None:
    """One chunk's labels as a tiled uint8 GeoTIFF, atomically."""
    import rasterio

    profile = dict(driver="GTiff", width=region.width, height=region.height, count=1, dtype="uint8",
                   crs=info.crs, transform=info.region_transform(region), nodata=NODATA, tiled=True,
                   blockxsize=256, blockysize=256, compress="zstd", zstd_level=1)
    with atomic_target(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(labels, 1)


def _vrt(parts: Sequence[tuple], info, n_prompts: int) -> str:
    sources = "".join(
        f'<SimpleSource><SourceFilename relativeToVRT="1">{escape(name)}</SourceFilename>'
        f"<SourceBand>1</SourceBand>"
        f'<SrcRect xOff="0" yOff="0" xSize="{r.width}" ySize="{r.height}"/>'
        f'<DstRect xOff="{r.col}" yOff="{r.row}" xSize="{r.width}" ySize="{r.height}"/></SimpleSource>'
        for r, name in parts)
    table = colour_table(n_prompts)
    entries = "".join('<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*table.get(v, (0, 0, 0, 0)))
                      for v in range(256))
    gt = ", ".join(repr(v) for v in info.transform.to_gdal())
    return (f'<VRTDataset rasterXSize="{info.width}" rasterYSize="{info.height}">'
            f"<SRS>{escape(info.crs_wkt)}</SRS><GeoTransform>{gt}</GeoTransform>"
            f'<VRTRasterBand dataType="Byte" band="1"><Description>classes</Description>'
            f"<NoDataValue>{NODATA}</NoDataValue><ColorInterp>Palette</ColorInterp>"
            f"<ColorTable>{entries}</ColorTable>{sources}</VRTRasterBand></VRTDataset>")


def pam_xml(prompts: Sequence[str]) -> str:
    """GDAL's ``.aux.xml`` with the category names (value = position: none, then the prompts)."""
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in ("none", *prompts))
    return (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <Description>classes</Description>\n'
            f"    <CategoryNames>{cats}</CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")


def style_qml(prompts: Sequence[str]) -> str:
    """QGIS paletted-renderer style listing the prompts (values 1..P) in their polygon colours."""
    table = colour_table(len(prompts))
    entries = "\n".join(
        f'        <paletteEntry value="{k}" label={quoteattr(p)} alpha="255" '
        f'color="#{table[k][0]:02x}{table[k][1]:02x}{table[k][2]:02x}"/>'
        for k, p in enumerate(prompts, start=1))
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.22.0" styleCategories="AllStyleCategories">\n  <pipe>\n'
            '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
            f"      <colorPalette>\n{entries}\n      </colorPalette>\n"
            "    </rasterrenderer>\n  </pipe>\n  <blendMode>0</blendMode>\n</qgis>\n")


def write_classes(run_dir: Path, parts: Sequence[tuple], info, prompts: Sequence[str]) -> Path:
    """VRT of the class parts → ``classes.tif`` COG (mode overviews), its category names and QGIS style."""
    import rasterio.shutil

    from .raster import bounded_gdal_cache
    from .rundir import CLASSES_FILES

    tif, aux, qml, vrt_name = CLASSES_FILES
    vrt = run_dir / vrt_name
    vrt.write_text(_vrt(parts, info, len(prompts)))
    out = run_dir / tif
    with atomic_target(run_dir / aux) as tmp:
        tmp.write_text(pam_xml(prompts))
    with atomic_target(run_dir / qml) as tmp:
        tmp.write_text(style_qml(prompts))
    with bounded_gdal_cache(), atomic_target(out) as tmp:
        # MODE: an overview pixel shows the class most of its pixels have, never an average of labels
        rasterio.shutil.copy(vrt, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                             OVERVIEW_RESAMPLING="MODE", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")
    vrt.unlink()
    return out
