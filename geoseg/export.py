"""Write geoseg's vector results (GeoPackage or GeoParquet, with QGIS/SLD styles) to disk, atomically.

:func:`write_vector` writes a GeoDataFrame in one go. A run's polygons are instead streamed
(:mod:`geoseg.streaming`): one GDAL write session into a temporary file, its spatial index packed at
the end (:mod:`geoseg.gpkg_rtree`), then the style below. Appending to a GeoPackage with separate
GDAL sessions is what neither does: a crash leaves a file that looks complete but is not, and the
spatial index goes through its triggers row by row.

Every writer here produces its file under a temporary name *in the same directory* as the target
and then calls :func:`os.replace`. The rename is atomic on POSIX and Windows when source and target
share a file system (which is why the temp file is not put in ``/tmp``), so a reader -- QGIS, a
later resume of the run, a user's script -- either sees the previous complete file or the new
complete file, never a half-written one under the final name.

GeoPackage layout
-----------------
All prompts go into **one** layer (``segments``) with a ``prompt`` column rather than one layer per
prompt, because:

* one QGIS style (a categorised renderer on ``prompt``) colours every prompt, and it can be stored
  once as the layer's default style (see below);
* users filter with an attribute expression (``"prompt" = 'roof'``) instead of juggling layers;
* there is one R-tree spatial index and one ``gpkg_contents`` row to keep correct;
* a run with 50 prompts does not explode into 50 layers (and 50 empty ones when nothing matched);
* the schema is identical for every prompt, so it is a textbook attribute, not a table name.

The geometry type is declared ``MultiPolygon`` even when the layer is empty (a vectorised mask is a
polygon or several; promoting keeps one type per layer, which GIS software expects), the spatial
index is created, and the CRS is written even for an empty layer, so an empty result is still a
valid, self-describing layer.

Default style (``layer_styles``)
--------------------------------
QGIS (and other OGC-minded clients) look for a ``layer_styles`` table in a GeoPackage and, when a
layer is opened, apply the row whose ``f_table_name`` is the layer name, ``f_table_schema`` is
``''`` and ``f_geometry_column`` is the layer's geometry column (``geom`` as written by GDAL),
preferring ``useAsDefault`` = true. We store a QML categorised renderer on ``prompt`` with one
category per prompt -- including prompts that found nothing, so the legend is complete and stable
between runs -- with distinct colours, a ~40 % opaque fill and an opaque outline. The table is created
through GDAL (a non-spatial layer), so it is registered in ``gpkg_contents`` as ``attributes``
exactly as QGIS itself does when it saves a style.
"""

from __future__ import annotations

import colorsys
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import geopandas as gpd
import pandas as pd

from .atomic import atomic_target, write_json_atomic

__all__ = ["write_vector", "write_json_atomic", "style_qml", "style_sld", "prompt_colors"]


#: GeoPackage table holding layer styles (QGIS / OGC convention).
LAYER_STYLES_TABLE = "layer_styles"
#: Name given to the style row; shows up in QGIS' "Style > Load Style > From database" dialog.
STYLE_NAME = "geoseg"
#: Fill opacity (0..1) of every category; the outline stays opaque so touching polygons stay legible.
FILL_OPACITY = 0.4

# Qualitative palette (Tableau 10): distinct hues that stay distinct when 40 % transparent.
_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


# --------------------------------------------------------------------------------------------------
# atomic file helpers
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# styles
# --------------------------------------------------------------------------------------------------


def prompt_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours: the Tableau 10 palette, then golden-ratio hues beyond ten."""
    colors = list(_PALETTE[:n])
    hue = 0.13
    while len(colors) < n:
        hue = (hue + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.85)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def _darker(rgb: tuple[int, int, int], factor: float = 0.7) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in rgb)  # type: ignore[return-value]


def _fill_symbol_xml(name: str, rgb: tuple[int, int, int], indent: str) -> str:
    """A QGIS ``SimpleFill`` symbol: translucent fill, opaque darker solid outline."""
    fill = f"{rgb[0]},{rgb[1]},{rgb[2]},{round(FILL_OPACITY * 255)}"
    line = "{},{},{},255".format(*_darker(rgb))
    props = {
        "border_width_map_unit_scale": "3x:0,0,0,0,0,0",
        "color": fill,
        "joinstyle": "bevel",
        "offset": "0,0",
        "offset_map_unit_scale": "3x:0,0,0,0,0,0",
        "offset_unit": "MM",
        "outline_color": line,
        "outline_style": "solid",
        "outline_width": "0.4",
        "outline_width_unit": "MM",
        "style": "solid",
    }
    options = "".join(
        f'\n{indent}      <Option type="QString" name={quoteattr(k)} value={quoteattr(v)}/>' for k, v in props.items()
    )
    # Both the 3.x ``<Option>`` map and the legacy ``<prop>`` list, so old and new QGIS read it.
    legacy = "".join(f"\n{indent}    <prop k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in props.items())
    return (
        f'{indent}<symbol type="fill" name={quoteattr(name)} alpha="1" clip_to_extent="1" force_rhr="0">\n'
        f'{indent}  <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n'
        f'{indent}    <Option type="Map">{options}\n{indent}    </Option>{legacy}\n'
        f"{indent}  </layer>\n"
        f"{indent}</symbol>"
    )


def style_qml(prompts: Sequence[str], column: str = "prompt") -> str:
    """QML document: a categorised renderer on ``column`` with one category per prompt.

    Category order (and so colour) follows ``prompts``, i.e. the order the user gave, so a prompt
    keeps its colour across runs with the same prompt list.
    """
    colors = prompt_colors(len(prompts))
    cats = "\n".join(
        f'      <category render="true" symbol="{i}" value={quoteattr(p)} label={quoteattr(p)} type="string"/>'
        for i, p in enumerate(prompts)
    )
    symbols = "\n".join(_fill_symbol_xml(str(i), rgb, "      ") for i, rgb in enumerate(colors))
    source = _fill_symbol_xml("0", (127, 127, 127), "      ")
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22.0" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(column)} symbollevels="0" '
        'enableorderby="0" forceraster="0" referencescale="-1">\n'
        f"    <categories>\n{cats}\n    </categories>\n"
        f"    <symbols>\n{symbols}\n    </symbols>\n"
        f"    <source-symbol>\n{source}\n    </source-symbol>\n"
        "    <rotation/>\n    <sizescale/>\n"
        "  </renderer-v2>\n"
        "  <blendMode>0</blendMode>\n  <featureBlendMode>0</featureBlendMode>\n"
        "  <layerGeometryType>2</layerGeometryType>\n"
        "</qgis>\n"
    )


def style_sld(prompts: Sequence[str], layer: str = "segments", column: str = "prompt") -> str:
    """The same style as SLD 1.1 (for clients that read ``styleSLD`` rather than QML)."""
    colors = prompt_colors(len(prompts))
    rules = []
    for p, rgb in zip(prompts, colors):
        fill = "#{:02x}{:02x}{:02x}".format(*rgb)
        line = "#{:02x}{:02x}{:02x}".format(*_darker(rgb))
        rules.append(
            "        <se:Rule>\n"
            f"          <se:Name>{escape(p)}</se:Name>\n"
            f"          <se:Description><se:Title>{escape(p)}</se:Title></se:Description>\n"
            '          <ogc:Filter xmlns:ogc="http://www.opengis.net/ogc"><ogc:PropertyIsEqualTo>'
            f"<ogc:PropertyName>{escape(column)}</ogc:PropertyName><ogc:Literal>{escape(p)}</ogc:Literal>"
            "</ogc:PropertyIsEqualTo></ogc:Filter>\n"
            "          <se:PolygonSymbolizer>\n"
            f'            <se:Fill><se:SvgParameter name="fill">{fill}</se:SvgParameter>'
            f'<se:SvgParameter name="fill-opacity">{FILL_OPACITY}</se:SvgParameter></se:Fill>\n'
            f'            <se:Stroke><se:SvgParameter name="stroke">{line}</se:SvgParameter>'
            '<se:SvgParameter name="stroke-width">1</se:SvgParameter></se:Stroke>\n'
            "          </se:PolygonSymbolizer>\n"
            "        </se:Rule>"
        )
    body = "\n".join(rules)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc" '
        'xmlns:se="http://www.opengis.net/se" xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1.0" '
        'xsi:schemaLocation="http://www.opengis.net/sld http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd">\n'
        "  <NamedLayer>\n"
        f"    <se:Name>{escape(layer)}</se:Name>\n"
        "    <UserStyle>\n"
        f"      <se:Name>{escape(layer)}</se:Name>\n"
        "      <se:FeatureTypeStyle>\n"
        f"{body}\n"
        "      </se:FeatureTypeStyle>\n"
        "    </UserStyle>\n"
        "  </NamedLayer>\n"
        "</StyledLayerDescriptor>\n"
    )


def _write_layer_styles(path: Path, layer: str, geometry_column: str, prompts: Sequence[str]) -> None:
    """Append the ``layer_styles`` table (one default-style row for ``layer``) to the GeoPackage.

    Written through GDAL as a non-spatial layer so it is registered in ``gpkg_contents`` with
    ``data_type = 'attributes'`` (GDAL and QGIS list such tables; a bare SQLite table would be
    invisible to them). The column set and the ``id`` primary key match what QGIS creates itself.
    ``f_table_schema`` must be ``''`` (not NULL): QGIS' OGR provider selects on
    ``f_table_schema='' AND f_table_name=<layer> AND f_geometry_column=<geom column>``.
    """
    import pyogrio

    row = {
        "f_table_catalog": "",
        "f_table_schema": "",
        "f_table_name": layer,
        "f_geometry_column": geometry_column,
        "styleName": STYLE_NAME,
        "styleQML": style_qml(prompts),
        "styleSLD": style_sld(prompts, layer=layer),
        "useAsDefault": True,
        "description": "geoseg default style: one category per prompt",
        "owner": "",
        "ui": "",
        "update_time": pd.Timestamp(datetime.now(UTC)),  # DATETIME column; rewritten below
    }
    df = pd.DataFrame([row])
    df["useAsDefault"] = df["useAsDefault"].astype(bool)  # -> OFTInteger / OFSTBoolean, as QGIS does
    pyogrio.write_dataframe(
        df,
        path,
        layer=LAYER_STYLES_TABLE,
        driver="GPKG",
        append=False,
        layer_options={"FID": "id", "ASPATIAL_VARIANT": "GPKG_ATTRIBUTES"},
    )
    # GDAL >= 3.7 writes whole-second datetimes as 'YYYY-MM-DDTHH:MM:SSZ'; GDAL 3.6 (QGIS 3.22 on
    # Debian 12) warns "Non-conformant content" for anything but the spec's 'YYYY-MM-DDTHH:MM:SS.SSSZ'.
    with closing(sqlite3.connect(path)) as con, con:
        con.execute(
            f"UPDATE {LAYER_STYLES_TABLE} SET update_time = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
        )


# --------------------------------------------------------------------------------------------------
# vector output
# --------------------------------------------------------------------------------------------------


def _prompt_list(gdf: gpd.GeoDataFrame, prompts: Sequence[str] | None) -> list[str]:
    """Prompts for the style: the given ones (order kept), then any extra found in the data."""
    out: list[str] = [str(p) for p in prompts] if prompts is not None else []
    seen = set(out)
    if "prompt" in gdf.columns:
        for p in pd.unique(gdf["prompt"].dropna().astype(str)):
            if p not in seen:
                out.append(p)
                seen.add(p)
    return out


def write_vector(
    gdf: gpd.GeoDataFrame,
    path: Path | str,
    fmt: str = "gpkg",
    layer: str = "segments",
    *,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Write all polygons of a run once, atomically, and return ``path``.

    ``fmt="gpkg"``: one GeoPackage layer ``layer`` (default ``segments``) with a ``prompt`` column,
    ``MultiPolygon`` geometry (declared even when empty), a spatial index, the CRS of ``gdf``, and a
    default QGIS style in ``layer_styles`` with one category per prompt. Pass ``prompts`` (the
    run's full prompt list) so prompts without any polygon still get a legend entry and every prompt
    keeps the same colour from run to run; prompts present in the data but not in the list are
    appended.

    ``fmt="parquet"``: GeoParquet via :meth:`GeoDataFrame.to_parquet` (no style: the format has no
    place for one).

    Only ``geometry`` and ``prompt`` are required; other columns are written as they are. An empty
    ``gdf`` yields a valid empty layer with the full schema and the CRS (a missing ``prompt``
    column is added as an empty string column). The file appears under ``path`` only when complete
    (temp file in the same directory + :func:`os.replace`); an existing file is replaced.
    """
    path = Path(path)
    fmt = fmt.lower().lstrip(".")
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise TypeError(f"write_vector needs a GeoDataFrame, got {type(gdf).__name__}")
    if "prompt" not in gdf.columns:
        if len(gdf):
            raise ValueError(f"cannot write {path}: the GeoDataFrame has no 'prompt' column")
        gdf = gdf.assign(prompt=pd.Series([], dtype=object, index=gdf.index))
    gdf = gdf.reset_index(drop=True)

    if fmt in ("parquet", "geoparquet"):
        with atomic_target(path) as tmp:
            gdf.to_parquet(tmp, index=False)
        return path
    if fmt not in ("gpkg", "geopackage"):
        raise ValueError(f"unknown vector format {fmt!r}: use 'gpkg' or 'parquet'")

    import pyogrio

    style_prompts = _prompt_list(gdf, prompts)
    with atomic_target(path) as tmp:
        pyogrio.write_dataframe(
            gdf,
            tmp,
            layer=layer,
            driver="GPKG",
            geometry_type="MultiPolygon",
            promote_to_multi=True,
            layer_options={"SPATIAL_INDEX": "YES", "GEOMETRY_NAME": "geom", "FID": "fid"},
            # GeoPackage 1.2 (GDAL < 3.7.1's default): GDAL >= 3.7.1 writes 1.4, which GDAL 3.6 --
            # i.e. QGIS 3.22 on Debian 12 -- opens with "may only be partially supported" warnings.
            # Nothing we write needs 1.3/1.4 features.
            dataset_options={"VERSION": "1.2"},
        )
        geometry_column = pyogrio.read_info(tmp, layer=layer)["geometry_name"] or "geom"
        _write_layer_styles(tmp, layer, geometry_column, style_prompts)
    return path
