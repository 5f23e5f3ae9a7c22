"""CRS helpers shared by the raster checks and the polygon measurements."""

from __future__ import annotations

from typing import Any


def horizontal_crs(crs: Any) -> Any:
    """The horizontal part of a ``pyproj.CRS``: a bound CRS's source, a compound CRS's first member.

    Measuring and classifying (projected, geographic, ...) only make sense on the horizontal CRS; a
    raster's CRS often arrives wrapped (``+towgs84`` makes a BoundCRS, a vertical datum a CompoundCRS).
    """
    if crs.is_bound:
        crs = crs.source_crs
    if crs.is_compound:
        crs = crs.sub_crs_list[0]
    return crs
