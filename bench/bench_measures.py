"""Experiment: area/perimeter of projected-CRS polygons from the projection's scale factors.

NOT used by geoseg (see bench/README.md, "Cheaper exact measures"): the grid the Jacobian is
interpolated from spans each batch's extent, so values changed in the last bits with the chunking;
a fixed, CRS-anchored grid would fix that. Kept here with its measurements.

For each CRS and place, staircase polygons (pixel-edged, like geoseg's, with a hole) of a given
extent are measured three ways: with the projection's scale factors (:class:`FactorMeasure`,
forced: no fallback), with geoseg's geodesic path (unproject every vertex; area in the ellipsoid's
cylindrical equal-area projection, perimeter from ``Geod.inv``), and as the truth, the polygon
densified to 1/500 of its size in the source CRS and measured by ``Geod.geometry_area_perimeter``.
Printed: the largest relative errors, and which path the error estimate would pick (``fast``
below 2e-7). A speed row times both on 1 M small polygons.

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

import math  # noqa: E402

from geoseg.polygons import _Measure  # noqa: E402

FACTOR_MAX_ERROR = 2e-7
_FACTOR_GRID = 33


class FactorMeasure(_Measure):
    """geoseg's measure plus the scale-factor path (projected CRSs only)."""

    def __init__(self, crs):
        super().__init__(crs)
        c = pyproj.CRS(crs)
        self.crs = c
        self.unit = float(c.axis_info[0].unit_conversion_factor)

    def _geodesic(self, geoms):
        return self.area_perimeter(geoms)

    def _jacobian(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, 2, 2): ground metres on the ellipsoid per CRS unit, (east, north) from (dx, dy).

        From ``Proj.get_factors``' partial derivatives (in units of the semi-major axis per radian,
        whatever the CRS's unit) and the ellipsoid's meridional (M) and prime-vertical (N) radii.
        NaN where the projection cannot be evaluated.
        """
        import pyproj

        lon, lat = self.to_geographic.transform(x, y)
        f = pyproj.Proj(self.crs).get_factors(lon, lat, errcheck=False)
        a, b = self.geod.a, self.geod.b
        e2 = 1 - (b / a) ** 2
        phi = np.radians(np.asarray(lat, dtype=np.float64))
        w = np.sqrt(1 - e2 * np.sin(phi) ** 2)
        n_cos = a / w * np.cos(phi)           # N cos φ: metres per radian of longitude
        m = a * (1 - e2) / w**3               # M: metres per radian of latitude
        # A: projected metres per ground metre; (x, y) = A (east, north)
        A = np.empty((len(phi), 2, 2))
        A[:, 0, 0] = np.asarray(f.dx_dlam) * a / n_cos
        A[:, 0, 1] = np.asarray(f.dx_dphi) * a / m
        A[:, 1, 0] = np.asarray(f.dy_dlam) * a / n_cos
        A[:, 1, 1] = np.asarray(f.dy_dphi) * a / m
        with np.errstate(all="ignore"):
            return np.linalg.inv(A) * self.unit

    def _by_scale_factors(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Area and perimeter from the projection's local scale, and where that is exact enough.

        The Jacobian G (ground metres per CRS unit) is evaluated on a 33 x 33 grid over the
        geometries' extent and interpolated bilinearly: area = planar area × |det G| at the
        centroid (exact for a linearly varying scale, the first-order term cancels about the
        centroid), perimeter = Σ |G v| over edges v with G at each edge's midpoint. What is left is
        second order in the object's size L and the grid step g: it is estimated from the grid itself
        (G at the cell centres vs the interpolation) as ``err_grid × (1 + (L/g)²)``; polygons
        above :data:`FACTOR_MAX_ERROR` go to the geodesic path. A numerical check of G at the
        grid's centre against an unprojection guards against axis-order or unit surprises.
        Measured against the geodesic path in bench/bench_measures.py.
        """
        n_geoms = len(geoms)
        fail = (np.full(n_geoms, np.nan), np.full(n_geoms, np.nan), np.zeros(n_geoms, bool))
        bounds = shapely.bounds(geoms)
        x0, y0 = np.nanmin(bounds[:, 0]), np.nanmin(bounds[:, 1])
        x1, y1 = np.nanmax(bounds[:, 2]), np.nanmax(bounds[:, 3])
        if not np.isfinite([x0, y0, x1, y1]).all():
            return fail
        k = _FACTOR_GRID
        sx, sy = max(x1 - x0, 1e-9) / (k - 1), max(y1 - y0, 1e-9) / (k - 1)
        gx, gy = x0 + sx * np.arange(k), y0 + sy * np.arange(k)
        nodes = self._jacobian(np.repeat(gx, k), np.tile(gy, k)).reshape(k, k, 4)  # [ix, iy]
        cx, cy = gx[:-1] + sx / 2, gy[:-1] + sy / 2
        centres = self._jacobian(np.repeat(cx, k - 1), np.tile(cy, k - 1)).reshape(k - 1, k - 1, 4)
        interp = (nodes[:-1, :-1] + nodes[1:, :-1] + nodes[:-1, 1:] + nodes[1:, 1:]) / 4
        scale = np.abs(centres).max(axis=2)
        with np.errstate(all="ignore"):
            err_grid = float(np.max(np.abs(centres - interp).max(axis=2) / scale))
        if not np.isfinite(nodes).all() or not np.isfinite(err_grid) or not self._check(nodes, gx, gy, k):
            return fail

        def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            fx = np.clip((x - x0) / sx, 0, k - 1 - 1e-9)
            fy = np.clip((y - y0) / sy, 0, k - 1 - 1e-9)
            ix, iy = fx.astype(np.int64), fy.astype(np.int64)
            tx, ty = (fx - ix)[:, None], (fy - iy)[:, None]
            return ((1 - tx) * (1 - ty) * nodes[ix, iy] + tx * (1 - ty) * nodes[ix + 1, iy]
                    + (1 - tx) * ty * nodes[ix, iy + 1] + tx * ty * nodes[ix + 1, iy + 1])

        c = shapely.get_coordinates(shapely.centroid(geoms))
        gc = at(c[:, 0], c[:, 1])
        area = shapely.area(geoms) * np.abs(gc[:, 0] * gc[:, 3] - gc[:, 1] * gc[:, 2])
        parts, part_of = shapely.get_parts(geoms, return_index=True)
        rings, ring_part = shapely.get_rings(parts, return_index=True)
        pts, ring_of = shapely.get_coordinates(rings, return_index=True)
        edge = ring_of[:-1] == ring_of[1:]
        v = (pts[1:] - pts[:-1])[edge]
        mid = ((pts[1:] + pts[:-1]) / 2)[edge]
        g = at(mid[:, 0], mid[:, 1])
        length = np.hypot(g[:, 0] * v[:, 0] + g[:, 1] * v[:, 1], g[:, 2] * v[:, 0] + g[:, 3] * v[:, 1])
        perim = np.bincount(part_of[ring_part[ring_of[:-1][edge]]], weights=length, minlength=n_geoms)
        size = np.hypot(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
        err = err_grid * (1 + (size / np.hypot(sx, sy)) ** 2)
        ok = (err < FACTOR_MAX_ERROR) & np.isfinite(area) & np.isfinite(perim)
        return area, perim, ok

    def _check(self, nodes: np.ndarray, gx: np.ndarray, gy: np.ndarray, k: int) -> bool:
        """G at the grid's centre node agrees with a finite-difference unprojection (1e-6)."""
        i = k // 2
        x, y = gx[i], gy[i]
        h = max(abs(gx[-1] - gx[0]) * 1e-4, abs(gy[-1] - gy[0]) * 1e-4, 1.0)  # CRS units; roundoff-safe
        lon, lat = self.to_geographic.transform(np.array([x - h, x + h, x, x]), np.array([y, y, y - h, y + h]))
        a, b = self.geod.a, self.geod.b
        e2 = 1 - (b / a) ** 2
        phi = math.radians(float(np.mean(lat)))
        w = math.sqrt(1 - e2 * math.sin(phi) ** 2)
        n_cos, m = a / w * math.cos(phi), a * (1 - e2) / w**3
        dlon = (np.asarray(lon) + 540.0) % 360.0 - 180.0
        east = np.radians(dlon) * n_cos
        north = np.radians(np.asarray(lat)) * m
        num = np.array([[east[1] - east[0], east[3] - east[2]], [north[1] - north[0], north[3] - north[2]]]) / (2 * h)
        got = nodes[i, i].reshape(2, 2)
        return bool(np.all(np.abs(num - got) <= 1e-6 * np.abs(got).max()))



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


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) / np.asarray(b) - 1)))


def truth(m, geoms, size):
    """Densified in the source CRS (edges follow its straight lines), then measured on the ellipsoid:
    ``Geod.geometry_area_perimeter`` for the area, ``Geod.geometry_length`` of every ring for the
    perimeter (holes included, as geoseg counts them)."""
    geod = m.geod
    areas, perims = [], []
    for g in geoms[:8]:
        ll = shapely.orient_polygons(shapely.transform(
            shapely.segmentize(g, size / 500),
            lambda xy: np.column_stack(m.to_geographic.transform(xy[:, 0], xy[:, 1]))))
        areas.append(abs(geod.geometry_area_perimeter(ll)[0]))
        perims.append(sum(geod.geometry_length(r) for r in shapely.get_rings(ll)))
    return np.array(areas), np.array(perims)


def main() -> None:
    print("| CRS, place | extent | factors: area | factors: perimeter | geodesic path: area | "
          "geodesic path: perimeter | estimate picks |")
    print("|---|---|---|---|---|---|---|")
    for label, crs, lon, lat in CASES:
        m = FactorMeasure(crs)
        c = pyproj.CRS(crs)
        x0, y0 = pyproj.Transformer.from_crs(c.geodetic_crs, c, always_xy=True).transform(lon, lat)
        unit = c.axis_info[0].unit_conversion_factor
        for ext in EXTENTS_M:
            geoms = staircase(x0, y0, ext / unit, n=8)
            fa, fp, ok = m._by_scale_factors(geoms)
            ga, gp = m._geodesic(geoms)
            ta, tp = truth(m, geoms, ext / unit)
            uses = "fast" if ok.all() else ("geodesic" if not ok.any() else f"fast {ok.mean():.0%}")
            print(f"| {label} | {ext:,} m | {rel(fa, ta):.1e} | {rel(fp, tp):.1e} | {rel(ga, ta):.1e} | "
                  f"{rel(gp, tp):.1e} | {uses} |", flush=True)

    m = FactorMeasure("EPSG:32633")
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
