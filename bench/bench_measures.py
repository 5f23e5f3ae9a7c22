"""Accuracy and speed of the scale-factor measure (projected CRSs) against the geodesic path.

For each CRS and place, staircase polygons (pixel-edged, like geoseg's, with a hole) of a given
extent are measured twice: with the projection's scale factors (``_Measure._by_scale_factors``,
forced: no fallback) and by unprojecting every vertex and measuring on the ellipsoid
(``_Measure._geodesic``, the path geoseg used before). Printed: the largest relative difference of
area and perimeter, and which path geoseg picks automatically (``fast`` when its error estimate is
below 2e-7). A speed row times both on 1 M one-pixel-ish polygons.

Usage: ``python bench/bench_measures.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyproj
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoseg.polygons import _Measure  # noqa: E402

CASES = [  # (label, CRS, lon, lat)
    ("UTM 33N, central meridian, 45N", "EPSG:32633", 15.0, 45.0),
    ("UTM 33N, zone edge, 45N", "EPSG:32633", 18.0, 45.0),
    ("UTM 33N, zone edge, 70N", "EPSG:32633", 18.0, 70.0),
    ("Web Mercator, 0N", "EPSG:3857", 10.0, 0.5),
    ("Web Mercator, 45N", "EPSG:3857", 10.0, 45.0),
    ("Web Mercator, 70N", "EPSG:3857", 10.0, 70.0),
    ("NY Long Island state plane, US ft", "EPSG:2263", -73.5, 40.8),
    ("Polar stereographic (3413), 75N", "EPSG:3413", -45.0, 75.0),
    ("Polar stereographic (3413), 89N", "EPSG:3413", 30.0, 89.0),
]
EXTENTS_M = [1, 10, 100, 1000, 10000]


def staircase(x0: float, y0: float, size: float, n: int = 60, seed: int = 0) -> np.ndarray:
    """``n`` rectilinear polygons of about ``size`` (CRS units) with a hole, scattered over ~20 sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cx, cy = x0 + rng.uniform(-10, 10) * size, y0 + rng.uniform(-10, 10) * size
        s = size / 4
        shell = [(0, 0), (4, 0), (4, 1), (3, 1), (3, 3), (4, 3), (4, 4), (1, 4), (1, 2), (0, 2)]
        hole = [(1.5, 0.5), (2.5, 0.5), (2.5, 1.5), (1.5, 1.5)]
        out.append(shapely.Polygon([(cx + s * a, cy + s * b) for a, b in shell],
                                   [[(cx + s * a, cy + s * b) for a, b in hole]]))
    return shapely.orient_polygons(np.array(out, dtype=object), exterior_cw=False)


def main() -> None:
    print("| CRS, place | extent | area rel. error | perimeter rel. error | geoseg uses |")
    print("|---|---|---|---|---|")
    for label, crs, lon, lat in CASES:
        m = _Measure(crs)
        c = pyproj.CRS(crs)
        x0, y0 = pyproj.Transformer.from_crs(c.geodetic_crs, c, always_xy=True).transform(lon, lat)
        unit = c.axis_info[0].unit_conversion_factor
        for ext in EXTENTS_M:
            geoms = staircase(x0, y0, ext / unit)
            fa, fp, ok = m._by_scale_factors(geoms)
            ga, gp = m._geodesic(geoms)
            ea = np.max(np.abs(fa / ga - 1))
            ep = np.max(np.abs(fp / gp - 1))
            uses = "fast" if ok.all() else ("geodesic" if not ok.any() else f"fast {ok.mean():.0%}")
            print(f"| {label} | {ext:,} m | {ea:.1e} | {ep:.1e} | {uses} |", flush=True)

    m = _Measure("EPSG:32633")
    rng = np.random.default_rng(1)
    xy = rng.uniform([500000, 4980000], [502048, 4982048], (1_000_000, 2)).round()
    geoms = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + 0.5 * rng.integers(1, 4, len(xy)), xy[:, 1] + 0.5)
    t = time.perf_counter()
    m.area_perimeter(geoms)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    m._geodesic(geoms)
    slow = time.perf_counter() - t
    print(f"\n1,000,000 polygons (UTM 33N): scale factors {fast:.1f} s, geodesic {slow:.1f} s "
          f"({slow / fast:.1f}x)")


if __name__ == "__main__":
    main()
