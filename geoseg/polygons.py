"""Map space: merged pixel-space pieces become a map-ready GeoDataFrame (:func:`finalize`).

Everything here runs on whole, merged pieces (after :func:`geoseg.pieces.merge_seams`), in chunk
tasks for the pieces no other chunk can touch and at the client for the rest
(:mod:`geoseg.streaming` says which), so no chunk border can influence it: the affine transform to
map coordinates, area/perimeter measurement (geodesic where the CRS allows), hole filling with
island absorption, the area filter, coverage-safe simplification, the attribute columns, and
reprojection with antimeridian splitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine

from .config import check_nonneg
from .crs import horizontal_crs
from .errors import ConfigError
from .pieces import Pieces, components, prompt_thresholds

__all__ = ["finalize", "OUTPUT_COLUMNS", "Simplified"]

#: Attribute columns of :func:`finalize`'s GeoDataFrame, in order (``geometry`` comes last).
OUTPUT_COLUMNS = (
    "prompt",
    "prompt_index",
    "threshold",
    "mean_prob",
    "max_prob",
    "pixels",
    "area_m2",
    "perimeter_m",
    "n_holes",
    "compactness",
)


#: The measures' error bar (relative, area and perimeter) against the ellipsoidal truth.
MEASURE_MAX_ERROR = 1e-6
#: Fast-path error estimates must stay this many times below :data:`MEASURE_MAX_ERROR`.
_ESTIMATE_MARGIN = 10.0
#: Ground size (m: bbox diagonal × the largest local linear distortion, max(σ₁, 1/σ₂)) below which
#: a polygon takes the Jacobian path with no error estimate. Conformal projections: the error is
#: second order, ~(L·k/R)², measured ≤ 2.4e-9 at 1 km (bench/bench_measures.py: UTM, state plane,
#: polar stereographic to 89° N), 400x under the bar.
_SMALL_POLYGON_M = 1000.0
#: The same for non-conformal projections (Albers; Web Mercator, which is not conformal on the
#: ellipsoid): their perimeter keeps a first-order anisotropic term, linear in the size (Albers 5070
#: at 47° N: 2e-8 at 100 m, 2e-7 at 1 km), so 10x smaller. Larger polygons take the perimeter with
#: the metric linear over their box (:func:`_linear_perimeter`), which removes that term.
_SMALL_POLYGON_NONCONFORMAL_M = 100.0


class Measure:
    """How to turn geometry in CRS units into metres and square metres.

    * geographic CRS: geodesic area/perimeter on the CRS's own ellipsoid (``pyproj.Geod``).
    * projected CRS on a known ellipsoid: ellipsoidal too, so a Web Mercator scene at 60° N does not
      report areas 4× too large (QGIS measures ellipsoidally the same way): from the projection's
      local Jacobian at each polygon (:meth:`_by_jacobian`), or, for polygons too large for that to
      be within :data:`MEASURE_MAX_ERROR`, geodesically after unprojecting (:meth:`_unprojected`).
    * other linear CRSs (engineering, no ellipsoid): planar area/length × the axis unit's
      metres-per-unit (e.g. US survey feet → 0.3048006…).
    * no CRS / unknown units: not measurable — ``area_m2`` is NaN and area options use CRS units².

    Every polygon is measured on its own (no batch-wide grid or offset), so the values are the same
    bit for bit however the polygons are batched or chunked.
    """

    def __init__(self, crs: Any) -> None:
        self.kind = "none"
        self.factor = 1.0
        self.geod = None
        self.jacobian_ok = False
        self.small_m = _SMALL_POLYGON_NONCONFORMAL_M
        if crs is None:
            return
        import pyproj

        try:
            c = pyproj.CRS.from_user_input(crs)
        except pyproj.exceptions.CRSError as exc:
            raise ConfigError(f"cannot interpret CRS {crs!r}: {exc}") from None
        c = horizontal_crs(c)
        axis = c.axis_info[0] if c.axis_info else None
        if axis is None or not axis.unit_conversion_factor:
            return
        if c.is_geographic:
            geod = c.get_geod()
            if geod is not None:
                self.kind, self.geod = "geodesic", geod
                self.factor = math.degrees(axis.unit_conversion_factor)  # CRS unit → degrees
        elif c.is_projected and c.geodetic_crs is not None and c.get_geod() is not None:
            self.kind, self.geod = "projected", c.get_geod()
            self.factor = float(axis.unit_conversion_factor)
            self.to_geographic = pyproj.Transformer.from_crs(c, c.geodetic_crs, always_xy=True)
            try:
                self.proj = pyproj.Proj(c)
                self.jacobian_ok = self._jacobian_agrees(c)
                if self.jacobian_ok and self._conformal(c):
                    self.small_m = _SMALL_POLYGON_M
            except pyproj.exceptions.CRSError:
                self.jacobian_ok = False
        elif c.is_projected or (getattr(c, "is_engineering", False) and axis.unit_name.lower() in
                                ("metre", "meter", "foot", "us survey foot", "kilometre")):
            self.kind, self.factor = "planar", float(axis.unit_conversion_factor)

    @property
    def measurable(self) -> bool:
        return self.kind != "none"

    def area_perimeter(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Area (m², or CRS units² when not measurable) and perimeter (m, or CRS units)."""
        if self.kind == "projected":
            return self._projected(geoms)
        if self.kind == "geodesic":
            g = geoms if self.factor == 1.0 else shapely.transform(geoms, lambda xy: xy * self.factor)
            return self._ellipsoidal(g)
        f = self.factor
        return shapely.area(geoms) * f * f, shapely.length(geoms) * f

    def _projected(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Jacobian path where it is exact enough, the unprojected geodesic path elsewhere."""
        geoms = np.asarray(geoms, dtype=object)
        if self.jacobian_ok:
            area, perim, fast = self._by_jacobian(geoms)
        else:
            area, perim, fast = np.zeros(len(geoms)), np.zeros(len(geoms)), np.zeros(len(geoms), bool)
        slow = np.flatnonzero(~fast)
        if len(slow):
            area[slow], perim[slow] = self._unprojected(geoms[slow])
        return area, perim

    def _jacobian(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, 4): G = ground metres (east, north) per CRS unit (dx, dy), row-major; NaN where the
        projection cannot be evaluated.

        From ``Proj.get_factors``' partial derivatives of the forward projection (x, y per radian
        of λ, φ, in units of the semi-major axis) and the ellipsoid's prime-vertical (N) and
        meridional (M) radii: the forward map's matrix A (projected metres per ground metre) is
        inverted, then scaled by the axis unit (feet → metres). Works for conformal and
        non-conformal projections alike.
        """
        lon, lat = self.to_geographic.transform(x, y, errcheck=False)
        f = self.proj.get_factors(lon, lat, errcheck=False)
        geod = self.geod
        assert geod is not None
        e2 = geod.es
        with np.errstate(all="ignore"):
            phi = np.radians(np.asarray(lat, dtype=np.float64))
            w = np.sqrt(1 - e2 * np.sin(phi) ** 2)
            per_lam = w / np.cos(phi)  # a / (N cos φ), N = a / w
            per_phi = w**3 / (1 - e2)  # a / M, M = a (1 - e²) / w³
            a00 = np.asarray(f.dx_dlam, dtype=np.float64) * per_lam
            a01 = np.asarray(f.dx_dphi, dtype=np.float64) * per_phi
            a10 = np.asarray(f.dy_dlam, dtype=np.float64) * per_lam
            a11 = np.asarray(f.dy_dphi, dtype=np.float64) * per_phi
            scale = self.factor / (a00 * a11 - a01 * a10)
            return np.column_stack([a11 * scale, -a01 * scale, -a10 * scale, a00 * scale])

    def _jacobian_agrees(self, crs: Any) -> bool:
        """G from the factors matches a central difference of the unprojection (1e-6) at the CRS's
        area of use: guards the fast path against axis-order, sign or unit surprises."""
        import pyproj

        aou = crs.area_of_use
        lon, lat = ((aou.west + aou.east) / 2, (aou.south + aou.north) / 2) if aou else (0.0, 0.0)
        if aou and aou.west > aou.east:
            lon = lon + 180.0
        to_crs = pyproj.Transformer.from_crs(crs.geodetic_crs, crs, always_xy=True)
        x, y = to_crs.transform(lon, lat, errcheck=False)
        if not (math.isfinite(x) and math.isfinite(y)):
            return False
        g = self._jacobian(np.array([x]), np.array([y]))[0]
        h = 10.0 / self.factor  # 10 m: truncation ~(h/R)² ≈ 3e-12, roundoff ~1e-10
        px = np.array([x + h, x - h, x, x])
        py = np.array([y, y, y + h, y - h])
        plon, plat = self.to_geographic.transform(px, py)
        geod = self.geod
        assert geod is not None
        phi = math.radians(lat)
        w = math.sqrt(1 - geod.es * math.sin(phi) ** 2)
        east = np.radians((np.asarray(plon) - lon + 540.0) % 360.0 - 180.0) * geod.a / w * math.cos(phi)
        north = np.radians(np.asarray(plat) - lat) * geod.a * (1 - geod.es) / w**3
        num = np.array([east[0] - east[1], east[2] - east[3], north[0] - north[1], north[2] - north[3]]) / (2 * h)
        return bool(np.all(np.isfinite(g)) and np.all(np.abs(num - g) <= 1e-6 * np.abs(g).max()))

    def _conformal(self, crs: Any) -> bool:
        """The projection keeps angles (σ₁ = σ₂ within 1e-7) on a 5 × 5 grid over its area of use."""
        import pyproj

        aou = crs.area_of_use
        if aou is None or aou.west > aou.east:
            return False
        lon, lat = np.meshgrid(np.linspace(aou.west, aou.east, 5), np.linspace(aou.south, aou.north, 5))
        lat = np.clip(lat, -89.0, 89.0)
        to_crs = pyproj.Transformer.from_crs(crs.geodetic_crs, crs, always_xy=True)
        x, y = to_crs.transform(lon.ravel(), lat.ravel(), errcheck=False)
        big, small = _singular_values(self._jacobian(np.asarray(x), np.asarray(y)))
        ok = np.isfinite(big) & np.isfinite(small)
        return bool(ok.any() and np.all(big[ok] / small[ok] - 1 < 1e-7))

    def _by_jacobian(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Area, perimeter and where they are within the bar, from the local Jacobian G.

        Area = planar area (GEOS, precise: it offsets by the first vertex) × |det G| at the
        polygon's area centroid: |det G| is the exact area element, and about the centroid its
        first-order variation integrates to zero, so what is left is second order in the size.
        Perimeter = Σ |G v| over edge vectors v, with G at the boundary's length-weighted centroid
        (the first-order term cancels there too; for non-conformal projections an anisotropic
        first-order term remains, bounded by the size threshold, and removed for larger polygons
        by :func:`_linear_perimeter`). Polygons whose ground size × local
        distortion is under ``self.small_m`` (:data:`_SMALL_POLYGON_M`, or the non-conformal
        one) are exact enough as they are; larger ones get :meth:`_error_estimate` and go to the
        geodesic path above the bar / margin, as do polygons where the projection cannot be
        evaluated (NaN) or that are not polygons.
        """
        n = len(geoms)
        area, perim, fast = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool)
        kind = shapely.get_type_id(geoms)
        use = np.flatnonzero(((kind == 3) | (kind == 6)) & ~shapely.is_empty(geoms))
        if len(use) == 0:
            return area, perim, fast
        g = geoms[use]
        m = len(g)
        _, xy, offsets = shapely.to_ragged_array(g)
        ring_geom = _ring_owner(offsets, m)
        vert_ring = np.repeat(np.arange(len(offsets[0]) - 1), np.diff(offsets[0]))
        edge = vert_ring[:-1] == vert_ring[1:]  # never joins one ring's last vertex to the next's first
        v = (xy[1:] - xy[:-1])[edge]
        mid = ((xy[1:] + xy[:-1]) * 0.5)[edge]
        owner = ring_geom[vert_ring[:-1][edge]]
        length = np.hypot(v[:, 0], v[:, 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            total = np.bincount(owner, length, minlength=m)
            bx = np.bincount(owner, length * mid[:, 0], minlength=m) / total
            by = np.bincount(owner, length * mid[:, 1], minlength=m) / total
        c = shapely.get_coordinates(shapely.centroid(g))
        jac = self._jacobian(np.concatenate([c[:, 0], bx]), np.concatenate([c[:, 1], by]))
        ga, gb = jac[:m], jac[m:]
        det = np.abs(ga[:, 0] * ga[:, 3] - ga[:, 1] * ga[:, 2])
        a = shapely.area(g) * det
        ge = gb[owner]
        ground = np.hypot(ge[:, 0] * v[:, 0] + ge[:, 1] * v[:, 1], ge[:, 2] * v[:, 0] + ge[:, 3] * v[:, 1])
        p = np.bincount(owner, ground, minlength=m)
        bounds = shapely.bounds(g)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.sqrt(det)  # ground metres per CRS unit (geometric mean)
            sigma_max, sigma_min = _singular_values(ga / self.factor)  # ground m per map m
            distortion = np.maximum(1 / sigma_min, sigma_max)
            size = np.hypot(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]) * s * distortion
        ok = np.isfinite(a) & np.isfinite(p) & np.isfinite(size)
        big = np.flatnonzero(ok & (size > self.small_m))
        if len(big):
            error, centre, grad_x, grad_y = self._error_estimate(bounds[big])
            ok[big] = error * _ESTIMATE_MARGIN <= MEASURE_MAX_ERROR
            p[big] = _linear_perimeter(big, owner, v, mid, bounds[big], centre, grad_x, grad_y, m)
        area[use], perim[use], fast[use] = a, p, ok
        return area, perim, fast

    def _error_estimate(self, bounds: np.ndarray) -> tuple[np.ndarray, ...]:
        """Relative error bound of :meth:`_by_jacobian` per bounding box (NaN: not evaluable), and
        the metric GᵀG at the box's centre with its x and y gradients (for :func:`_linear_perimeter`).

        From G at the box's centre and 4 corners: for the area element |det G| and the ground
        length |G d| of four edge directions d, the second differences along both diagonals (the
        second-order term; ×2 since the centroid may sit anywhere in the box). The perimeter of
        these polygons is taken with the metric linear over the box, so the first-order anisotropic term of
        non-conformal projections (which does not cancel about the centroid) is gone too.
        """
        x0, y0, x1, y1 = bounds.T
        cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
        k = len(bounds)
        g = self._jacobian(np.concatenate([cx, x1, x0, x0, x1]),
                           np.concatenate([cy, y1, y1, y0, y0])).reshape(5, k, 4)  # centre, NE, NW, SW, SE
        det = np.abs(g[..., 0] * g[..., 3] - g[..., 1] * g[..., 2])
        dirs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]) / np.array([1, 1, 2**0.5, 2**0.5])[:, None]
        ground = np.hypot(g[..., None, 0] * dirs[:, 0] + g[..., None, 1] * dirs[:, 1],
                          g[..., None, 2] * dirs[:, 0] + g[..., None, 3] * dirs[:, 1])  # (5, k, 4 dirs)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.concatenate([det[..., None], ground], axis=2) / np.concatenate([det[0, :, None], ground[0]], axis=1)
            second = np.maximum(np.abs(f[1] + f[3] - 2), np.abs(f[2] + f[4] - 2)).max(axis=1)
            metric = _metric(g)
            grad_x = (metric[1] - metric[2] + metric[4] - metric[3]) / (2 * (x1 - x0))[:, None]
            grad_y = (metric[1] - metric[4] + metric[2] - metric[3]) / (2 * (y1 - y0))[:, None]
        return 2 * second, metric[0], grad_x, grad_y

    def _unprojected(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geodesic path: densify in the source CRS, unproject every vertex, measure on the ellipsoid.

        Pixel edges are straight in the source CRS, not in lon/lat or the cylindrical equal-area
        projection :meth:`_ellipsoidal` takes the area in; a long edge bows between the two (1e-4
        of the area of a 10 km UTM polygon). Densifying to :func:`_densify_step` first bounds that.
        """
        bounds = shapely.bounds(geoms)
        size = np.hypot(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
        step = _densify_step(size * self.factor) / self.factor
        finite = np.isfinite(step) & (step > 0)
        dense = geoms.copy()
        dense[finite] = shapely.segmentize(geoms[finite], step[finite])
        to_geo = self.to_geographic
        lonlat = shapely.transform(dense, lambda xy: np.column_stack(to_geo.transform(xy[:, 0], xy[:, 1])))
        return self._ellipsoidal(lonlat)

    def _ellipsoidal(self, lonlat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Area and perimeter on the ellipsoid of lon/lat polygons, vectorized.

        Area: planar area in the cylindrical equal-area projection of the same ellipsoid (area
        preserving, so exact for pixel-sized edges); perimeter: the sum of every edge's geodesic
        length from one vectorized ``Geod.inv``. Longitudes are unwrapped per polygon first, so a
        polygon across ±180° is measured whole. A ``Geod.geometry_area_perimeter`` loop took 13 s
        for 315,000 polygons; this takes well under one.
        """
        import pyproj

        xy, owner = shapely.get_coordinates(lonlat, return_index=True)
        if len(xy) == 0:
            return np.zeros(len(lonlat)), np.zeros(len(lonlat))
        first = np.searchsorted(owner, owner)  # index of each vertex's polygon's first vertex
        xy[:, 0] = xy[first, 0] + (xy[:, 0] - xy[first, 0] + 180.0) % 360.0 - 180.0
        lonlat = shapely.set_coordinates(lonlat.copy(), xy)
        geod = self.geod
        if geod is None:
            raise RuntimeError("internal error: ellipsoidal measure without an ellipsoid")
        cea = pyproj.Proj(proj="cea", lon_0=0, a=geod.a, b=geod.b, over=True)
        flat = np.column_stack(cea(xy[:, 0], xy[:, 1]))
        flat -= flat[first]  # each polygon about its own first vertex: no precision lost to 1e6 m offsets
        area = shapely.area(shapely.set_coordinates(lonlat.copy(), flat))
        parts, part_of = shapely.get_parts(lonlat, return_index=True)
        rings, ring_part = shapely.get_rings(parts, return_index=True)
        pts, ring_of = shapely.get_coordinates(rings, return_index=True)
        edge = ring_of[:-1] == ring_of[1:]
        _, _, length = geod.inv(pts[:-1, 0][edge], pts[:-1, 1][edge], pts[1:, 0][edge], pts[1:, 1][edge])
        perimeter = np.bincount(part_of[ring_part[ring_of[:-1][edge]]], weights=length, minlength=len(lonlat))
        return area, perimeter


def _singular_values(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest singular values of (n, 4) row-major 2 × 2 matrices (closed form)."""
    fro = (g * g).sum(axis=1)
    det = np.abs(g[:, 0] * g[:, 3] - g[:, 1] * g[:, 2])
    root = np.sqrt(np.maximum(fro * fro - 4 * det * det, 0))
    return np.sqrt((fro + root) / 2), np.sqrt(np.maximum(fro - root, 0) / 2)


def _metric(g: np.ndarray) -> np.ndarray:
    """(..., 3): the metric GᵀG (xx, xy, yy) of row-major 2 × 2 Jacobians G: |G v|² = vᵀ GᵀG v.

    Unlike G it does not rotate with the local north (which turns fast near a pole), so it can be
    interpolated linearly without a second-order length error of its own."""
    return np.stack([g[..., 0] ** 2 + g[..., 2] ** 2, g[..., 0] * g[..., 1] + g[..., 2] * g[..., 3],
                     g[..., 1] ** 2 + g[..., 3] ** 2], axis=-1)


def _linear_perimeter(which: np.ndarray, owner: np.ndarray, v: np.ndarray, mid: np.ndarray,
                      bounds: np.ndarray, centre: np.ndarray, grad_x: np.ndarray, grad_y: np.ndarray,
                      n: int) -> np.ndarray:
    """Perimeter of polygons ``which`` with the metric (:func:`_metric`) linear over each one's
    bounding box: Σ √(vᵀ M(midpoint) v).

    Exact to second order for any projection (a conformal one's first-order term already cancels
    about the boundary centroid; a non-conformal one's anisotropic term does not). ``owner``,
    ``v``, ``mid``: every edge's polygon, vector and midpoint; ``n`` polygons in all; ``centre``,
    ``grad_x``, ``grad_y``: the metric at each box's centre and its gradients.
    """
    slot = np.full(n, -1)
    slot[which] = np.arange(len(which))
    sel = np.flatnonzero(slot[owner] >= 0)
    j = slot[owner[sel]]
    dx = mid[sel, 0] - (bounds[j, 0] + bounds[j, 2]) * 0.5
    dy = mid[sel, 1] - (bounds[j, 1] + bounds[j, 3]) * 0.5
    g = centre[j] + grad_x[j] * dx[:, None] + grad_y[j] * dy[:, None]
    vx, vy = v[sel, 0], v[sel, 1]
    ground = np.sqrt(g[:, 0] * vx * vx + 2 * g[:, 1] * vx * vy + g[:, 2] * vy * vy)
    return np.bincount(j, ground, minlength=len(which))


def _ring_owner(offsets: tuple[np.ndarray, ...], n: int) -> np.ndarray:
    """Index of the geometry each ring belongs to, from ``shapely.to_ragged_array``'s offsets
    (polygons: ring, polygon; multipolygons: ring, part, multipolygon)."""
    if len(offsets) == 2:
        return np.repeat(np.arange(n), np.diff(offsets[1]))
    part_geom = np.repeat(np.arange(n), np.diff(offsets[2]))
    return part_geom[np.repeat(np.arange(len(offsets[1]) - 1), np.diff(offsets[1]))]


#: Densification of the geodesic path: step (m) = sqrt(size (m) × this). The area's bowing error
#: ~ κ s² / L for step s and size L; measured (bench/bench_measures.py) ≤ 1.4e-7 with this, from
#: 10 to 100 km, up to 89° N (without: 1e-4 at 10 km in UTM, 7e-3 at 89° N).
_DENSIFY_M = 1.0


def _densify_step(size_m: np.ndarray) -> np.ndarray:
    """Densification step (m) of a polygon of ``size_m`` for the geodesic path (see ``_DENSIFY_M``)."""
    return np.sqrt(np.asarray(size_m, dtype=np.float64) * _DENSIFY_M)


def _apply_affine(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel (col, row) → map (x, y) with the full 6-term affine, then orient rings.

    A north-up raster (negative ``e``) or any other negative-determinant transform is a reflection,
    which reverses ring winding; rings are re-oriented (exterior counter-clockwise, holes clockwise,
    the OGC/GeoJSON convention) so writers and geodesic area see consistent orientation.
    """
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    m = np.array([[a, d], [b, e]])
    off = np.array([c, f])
    out = shapely.transform(geoms, lambda xy: xy @ m + off)
    return shapely.orient_polygons(out, exterior_cw=False)


def _fill_holes(geoms: np.ndarray, measure: Measure, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop interior rings with area < ``limit``; returns new geometry and a "changed" flag."""
    changed = np.zeros(len(geoms), bool)
    nh = shapely.get_num_interior_rings(geoms)
    idx = np.flatnonzero(nh > 0)
    if len(idx) == 0:
        return geoms, changed
    rings, owner = shapely.get_rings(geoms[idx], return_index=True)
    # get_rings lists each polygon's exterior first, then its holes
    is_hole = np.ones(len(rings), bool)
    first = np.r_[0, np.flatnonzero(np.diff(owner)) + 1]
    is_hole[first] = False
    hole_area, _ = measure.area_perimeter(shapely.polygons(rings[is_hole]))
    small = np.zeros(len(rings), bool)
    small[is_hole] = hole_area < limit
    out = geoms.copy()
    for k in np.unique(owner[small]):
        sel = owner == k
        shell = rings[sel][0]
        holes = [r for r, s in zip(rings[sel][1:], small[sel][1:]) if not s]
        out[idx[k]] = shapely.polygons(shell, holes=holes if holes else None)
        changed[idx[k]] = True
    return out, changed


def _absorb_islands(geoms: np.ndarray, prompt: np.ndarray, changed: np.ndarray,
                    any_prompt: bool = False) -> np.ndarray:
    """After hole filling, map each polygon lying inside a filled hole to its container (same prompt).

    Keeps the output a coverage (no overlaps within a prompt), which coverage simplification
    requires and a GIS user expects. Returns ``target`` with ``target[i] = i`` for survivors.
    ``any_prompt`` (a class map): polygons of every prompt inside a filled hole are absorbed, so
    classes stay exclusive (a small enclosed patch takes the class around it).
    """
    target = np.arange(len(geoms))
    if not changed.any():
        return target
    tree = shapely.STRtree(geoms)
    cont = np.flatnonzero(changed)
    i, j = tree.query(geoms[cont], predicate="contains")
    i = cont[i]
    sel = (i != j) & ((prompt[i] == prompt[j]) | any_prompt)
    group = components(len(geoms), i[sel], j[sel])
    # a group's largest polygon contains all the others: it is their target
    order = np.lexsort((-shapely.area(geoms), group))
    first = order[np.r_[True, group[order][1:] != group[order][:-1]]]
    biggest = np.empty(int(group.max()) + 1, np.int64)
    biggest[group[first]] = first
    return biggest[group]


def _node_coverage(geoms: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """Add to each polygon the vertices of its neighbours that lie on its edges, so touching
    polygons share identical edges (a valid coverage in GEOS's sense, which simplification keeps).

    Class-map polygons share pixel edges, but each polygon is built with only its own corners: an
    edge of one may span several vertices of the other. Runs in pixel space, where every vertex is
    an integer, so snapping with a tiny tolerance only cracks edges at existing vertices.
    ``context``: more neighbours (their vertices count, they are not returned), so a polygon can
    be noded where only some of its neighbours are finalized (a chunk task, the streaming client).
    Each polygon's reference points are its neighbours' vertices sorted and deduplicated: the result
    does not depend on which call, or in which order, the neighbours came.
    """
    pool = geoms if context is None or len(context) == 0 else np.concatenate([geoms, context])
    i, j = shapely.STRtree(pool).query(geoms, predicate="intersects")
    keep = i != j
    i, j = i[keep], j[keep]
    if not len(i):
        return geoms
    coords, owner = shapely.get_coordinates(pool, return_index=True)
    count = np.bincount(owner, minlength=len(pool))
    start = np.r_[0, np.cumsum(count)[:-1]]
    reps = count[j]
    pair = np.repeat(np.arange(len(i)), reps)
    offset = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    points = coords[start[j][pair] + offset]
    target = i[pair]
    order = np.lexsort((points[:, 1], points[:, 0], target))
    target, points = target[order], points[order]
    fresh = np.r_[True, (target[1:] != target[:-1]) | np.any(points[1:] != points[:-1], axis=1)]
    target, points = target[fresh], points[fresh]
    targets, which = np.unique(target, return_inverse=True)
    reference = _vertex_sets(points, which)
    out = geoms.copy()
    out[targets] = shapely.snap(geoms[targets], reference, tolerance=1e-6)
    return out


@dataclass(frozen=True)
class Simplified:
    """Polygons of a coverage simplified already, as the rest of their coverage needs them when it
    is simplified a part at a time (:mod:`geoseg.streaming`): the raw result (before repair,
    orientation and reprojection), the coverage it belongs to (prompt index; 0 for a class map),
    and, for a class map, the vertices its simplification removed (a point set or None). A class
    map's neighbours share edges, simplified once with the first polygon that has them: a polygon
    still to come loses the same vertices (see :func:`_simplify_after`)."""

    geometry: np.ndarray
    coverage: np.ndarray
    removed: np.ndarray

    @staticmethod
    def empty() -> Simplified:
        return Simplified(np.empty(0, object), np.empty(0, np.int64), np.empty(0, object))

    def __len__(self) -> int:
        return len(self.geometry)

    def take(self, sel: np.ndarray) -> Simplified:
        return Simplified(self.geometry[sel], self.coverage[sel], self.removed[sel])

    @staticmethod
    def concat(items: Sequence[Simplified]) -> Simplified:
        return Simplified(*(np.concatenate([getattr(x, f) for x in items])
                            for f in ("geometry", "coverage", "removed")))


def _coverage_simplify(geoms: np.ndarray, coverage: np.ndarray, tolerance: float,
                       before: Simplified | None = None, shared_edges: bool = False
                       ) -> tuple[np.ndarray, Simplified]:
    """Simplify each coverage's polygons (``coverage``: prompt index) as one coverage so shared
    edges stay shared (no gaps/overlaps).

    GEOS simplifies the coverage's edges one after another in input order, each beside the current
    state of the others, so a polygon's result depends on the results of the polygons before it.
    ``before``: polygons before these ones, simplified already. Polygons of one prompt share no
    edge: the earlier ones go last in the input, where the simplifier treats them only after these.
    ``shared_edges`` (a class map: neighbours share edges) needs more, see :func:`_simplify_after`.

    Returns (repaired, raw): the raw result (:class:`Simplified`) is what a later call takes as
    ``before``."""
    raw = geoms.copy()
    removed = np.full(len(geoms), None, object)
    for c in np.unique(coverage):
        sel = np.flatnonzero(coverage == c)
        earlier = before.take(before.coverage == c) if before is not None else Simplified.empty()
        if shared_edges and len(earlier):
            raw[sel], removed[sel] = _simplify_after(geoms[sel], earlier, tolerance)
            continue
        raw[sel] = shapely.coverage_simplify(np.concatenate([geoms[sel], earlier.geometry]), tolerance,
                                             simplify_boundary=True)[:len(sel)]
        if shared_edges:
            removed[sel] = _removed(geoms[sel], raw[sel])
    out = raw.copy()
    bad = ~shapely.is_valid(out)
    if bad.any():
        out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    if shared_edges:  # where a ring starts follows which ring an edge came from first: made canonical
        out = shapely.normalize(out)
    return out, Simplified(raw, coverage.copy(), removed)


def _simplify_after(geoms: np.ndarray, earlier: Simplified, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """A class map's polygons simplified as the whole coverage simplifies them, after ``earlier``
    (the simplified polygons before them whose boxes meet theirs).

    GEOS (3.14, ``CoverageSimplifier``/``TPVWSimplifier``) cuts the coverage's rings into edges at
    its nodes, keeps each shared edge once, on the first ring that has it, and simplifies the edges
    in that order, removing a vertex only if no vertex of the coverage as it stands then lies in
    the triangle it cuts off. So an edge shared with an earlier polygon is final already: it must
    be held, not simplified again (simplifying a result once more can remove more vertices). GEOS
    holds only its *constraint* edges, the edges of one ring under ``simplify_boundary=False``. So:

    * each polygon here loses the vertices ``earlier`` lost (its shared edges become their
      results) and, those edges now being on its ring alone, GEOS holds them;
    * the *frame*, the outside of these and the earlier polygons together, shares their outer
      edges, which GEOS then simplifies as it does the coverage's boundary under
      ``simplify_boundary=True``. Its vertices are theirs, and four far corners.

    The earlier polygons themselves are not needed (and given beside, they would share the held
    edges). Only whether *some* vertex lies in a corner's triangle counts, and whenever an earlier
    polygon's vertex does, so does one on these rings or on the frame: the triangle's two sides
    from its corner are this ring's, which nothing crosses, so the earlier polygons reaching into
    it do so across its base or lie inside it; either way the boundary of their union has a
    vertex inside it, and that boundary runs along these polygons or the outside. And a vertex is
    a node where three rings meet or a ring passes from a held edge to a free one, so the nodes
    of these polygons' free edges stay the whole run's.

    Checked against one ``coverage_simplify`` of the whole coverage on random class maps with gaps
    (rotated and axis-aligned, tolerances 0.3–5 px, batches of 1–40 polygons, 20,000 polygons in
    all): every polygon equal. Returns (raw results, removed vertices)."""
    sub = _without_vertices(geoms, shapely.get_coordinates(earlier.removed))
    frame = _outside(np.concatenate([sub, earlier.geometry]))
    raw = shapely.coverage_simplify(np.concatenate([sub, frame]), tolerance, simplify_boundary=False)[:len(geoms)]
    return raw, _removed(sub, raw)


def _vertex_keys(xy: np.ndarray, owner: np.ndarray | None = None) -> np.ndarray:
    """Rows (x, y[, owner]) as comparable scalars (-0.0 counted as 0.0)."""
    cols = [xy + 0.0] if owner is None else [xy + 0.0, owner[:, None].astype(np.float64)]
    rows = np.ascontiguousarray(np.hstack(cols))
    return rows.view(np.dtype((np.void, rows.shape[1] * 8))).ravel()


def _without_vertices(geoms: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``geoms`` with every vertex at one of ``points`` (n×2) taken out of their rings; polygons
    keep their rings and their type (a ring that would fall below three vertices is kept whole: it
    cannot happen to a ring whose removed vertices are those of edges a neighbour simplified)."""
    if len(points) == 0:
        return geoms
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    closing = np.r_[ring[1:] != ring[:-1], True]
    xy, ring = xy[~closing], ring[~closing]
    gone = np.isin(_vertex_keys(xy), _vertex_keys(points))
    if not gone.any():
        return geoms
    left = np.bincount(ring[~gone], minlength=len(rings))
    keep = ~gone | (left < 3)[ring]
    polys = shapely.polygons(shapely.linearrings(xy[keep], indices=ring[keep]), indices=ring_part)
    out = shapely.multipolygons(polys, indices=part_owner)
    single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
    out[single] = shapely.get_geometry(out[single], 0)
    return out


def _vertex_sets(xy: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Sets of points, one per ``owner`` 0..k-1 (each owning one point at least), as LineStrings (a
    lone point twice): made straight from the coordinates, ten times as fast as MultiPoints, and the
    same set of vertices to ``get_coordinates`` and ``shapely.snap`` (which snaps to vertices)."""
    twice = np.where(np.bincount(owner)[owner] == 1, 2, 1)
    return shapely.linestrings(np.repeat(xy, twice, axis=0), indices=np.repeat(owner, twice))


def _removed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per polygon, its vertices in ``before`` that ``after`` lacks (a point set, see
    :func:`_vertex_sets`, or None)."""
    xy, owner = shapely.get_coordinates(before, return_index=True)
    kxy, kowner = shapely.get_coordinates(after, return_index=True)
    gone = ~np.isin(_vertex_keys(xy, owner), _vertex_keys(kxy, kowner))
    out = np.full(len(before), None, object)
    if gone.any():
        xy, owner = xy[gone], owner[gone]
        owners, which = np.unique(owner, return_inverse=True)
        out[owners] = _vertex_sets(xy, which)
    return out


def _outside(geoms: np.ndarray) -> np.ndarray:
    """The outside of a valid coverage as polygons: a far box around it with its outlines as holes,
    and each hole of it as a polygon. Made of the coverage's boundary vertices and four far corners."""
    parts = shapely.get_parts(shapely.coverage_union_all(geoms))
    rings, part = shapely.get_rings(parts, return_index=True)
    shell = np.r_[True, part[1:] != part[:-1]]
    x0, y0, x1, y1 = shapely.total_bounds(geoms)
    m = (x1 - x0) + (y1 - y0) + 1.0
    far = shapely.Polygon(shapely.box(x0 - m, y0 - m, x1 + m, y1 + m).exterior, list(rings[shell]))
    return np.r_[np.array([far], object), shapely.polygons(rings[~shell])]


def _split_antimeridian(geoms: np.ndarray) -> np.ndarray:
    """Split lon/lat polygons that jumped across ±180° into parts on each side.

    After reprojection a polygon straddling the antimeridian has vertices near +180 and -180; drawn
    as is it would wrap around the globe. Such polygons (an edge with a longitude jump > 180°) are
    shifted to 0..360, cut at 180 and the eastern part shifted back by -360. Polygons already
    continuous past ±180 (a no-op reprojection of a lon 170..190 raster) are cut the same way.
    """
    if len(geoms) == 0:
        return geoms
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, ring_idx = shapely.get_coordinates(rings, return_index=True)
    jump = (np.abs(np.diff(coords[:, 0])) > 180) & (ring_idx[:-1] == ring_idx[1:])
    jumping = np.unique(part_owner[ring_part[ring_idx[:-1][jump]]])
    bounds = shapely.bounds(geoms)
    beyond = np.flatnonzero((bounds[:, 0] < -180) | (bounds[:, 2] > 180))
    out = geoms.copy()
    west = shapely.box(-180, -90, 180, 90)
    east = shapely.box(180, -90, 540, 90)
    for k in np.union1d(jumping, beyond).astype(int):
        if k in jumping:
            shifted = shapely.transform(geoms[k], lambda xy: np.where(xy[:, :1] < 0, xy + [360, 0], xy))
        else:
            shifted = shapely.transform(geoms[k], lambda xy: xy + [360, 0]) if bounds[k, 0] < -180 else geoms[k]
        if not shifted.is_valid:
            shifted = shapely.make_valid(shifted)
        a = shapely.intersection(shifted, west)
        b = shapely.transform(shapely.intersection(shifted, east), lambda xy: xy - [360, 0])
        parts = [g for g in shapely.get_parts([a, b]) if g.geom_type == "Polygon" and not g.is_empty]
        out[k] = shapely.orient_polygons(shapely.multipolygons(parts), exterior_cw=False)
    return out


def _count_holes(geoms: np.ndarray) -> np.ndarray:
    """Interior rings per geometry (all parts of a multipolygon together), int32.

    Pixel pieces are nearly always plain polygons: then no ``get_parts`` copy (~5 % of a speckle
    vectorize) is needed.
    """
    if np.all(shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON):
        return shapely.get_num_interior_rings(geoms).astype(np.int32)
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    return np.bincount(part_owner, weights=shapely.get_num_interior_rings(parts),
                       minlength=len(geoms)).astype(np.int32)


def _empty_frame(crs: Any):
    import geopandas as gpd
    import pandas as pd

    dtypes = {"prompt": object, "prompt_index": np.int32, "threshold": np.float64,
              "mean_prob": np.float64, "max_prob": np.float32, "pixels": np.int64,
              "area_m2": np.float64, "perimeter_m": np.float64, "n_holes": np.int32,
              "compactness": np.float64}
    df = pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in OUTPUT_COLUMNS})
    return gpd.GeoDataFrame(df, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def finalize(pieces: Pieces, transform: Affine, crs: Any, prompts: Sequence[str],
             thresholds: Sequence[float], *, min_area: float = 0, fill_holes: float = 0,
             simplify: float = 0, dst_crs: Any = None, exclusive: bool = False,
             context: np.ndarray | None = None, source_index: bool = False,
             simplified_before: Simplified | None = None, raw_out: list[Simplified] | None = None):
    """Turn merged pixel-space pieces into a map-ready ``GeoDataFrame``.

    Steps, all after :func:`merge_seams` so that no chunk-border artefact can influence them:

    1. apply the full affine ``transform`` (rotation and south-up included) and orient rings;
    2. ``fill_holes``: remove holes smaller than this area; pieces lying inside a filled hole are
       absorbed into the polygon around them (so polygons of one prompt never overlap);
    3. ``min_area``: drop polygons smaller than this area (measured after filling);
    4. ``simplify``: tolerance in **CRS units** (degrees for a geographic CRS), applied with
       ``shapely.coverage_simplify`` per prompt so touching polygons keep shared edges — no gaps,
       no overlaps. Roughly, detail smaller than ``simplify`` CRS units goes away.

    Areas (``min_area``, ``fill_holes``) are in m² when the CRS can be measured: ellipsoidal for a
    projected or geographic CRS on a known ellipsoid (within 1e-6 of the area on the ellipsoid, see
    :class:`Measure`), planar × the unit's metres for other linear CRSs; otherwise (no CRS, unknown
    units) in CRS units².

    Columns: ``prompt``, ``prompt_index``, ``threshold``, ``mean_prob`` (mean probability of the
    piece's pixels), ``max_prob``, ``pixels`` (mask pixel count; includes absorbed islands),
    ``area_m2`` and ``perimeter_m`` of the final geometry (NaN when the CRS is not measurable),
    ``n_holes`` and ``compactness`` (Polsby-Popper 4πA/P², 1 = disc, low = thin/ragged; computed
    in CRS units when not measurable).

    ``dst_crs``: reproject at the end (geometry densified first so long pixel edges follow the
    projection's curvature); for a geographic destination, polygons crossing the antimeridian are
    split at ±180°. Measurements always come from the source CRS, where the pixels live.

    ``exclusive``: the pieces come from a class map (``--classes``: no two prompts overlap). Hole
    filling then absorbs islands of any prompt and simplification treats all polygons as one
    coverage, so the classes stay a valid coverage (no overlaps, no new gaps between them).
    ``context``: pixel-space neighbours of the pieces that are finalized elsewhere; with
    ``exclusive`` the pieces are noded against them too (see ``_node_coverage``).
    ``simplified_before``: polygons that come before the pieces in their coverage and are
    simplified already (:class:`Simplified`, as ``raw_out`` gives them): the
    pieces are simplified as the whole coverage would simplify them (see ``_coverage_simplify``).
    ``raw_out``: a list that gets the returned rows' :class:`Simplified` appended.

    Rows keep the input order. ``source_index``: the index is each row's position in ``pieces``
    (filled-in islands and polygons below ``min_area`` or simplified away leave gaps), so a caller
    can find a row's piece; otherwise 0..n-1.

    Empty input gives an empty GeoDataFrame with the same columns and CRS.
    """
    import geopandas as gpd

    min_area = check_nonneg("min_area", min_area)
    fill_holes = check_nonneg("fill_holes", fill_holes)
    simplify = check_nonneg("simplify", simplify)
    prompts = list(prompts)
    t = prompt_thresholds(thresholds, len(prompts))
    if len(pieces) and (pieces.prompt_index.min() < 0 or pieces.prompt_index.max() >= len(prompts)):
        raise ConfigError(f"pieces refer to prompt {int(pieces.prompt_index.max())} but only "
                          f"{len(prompts)} prompts were given")
    if not isinstance(transform, Affine):
        try:
            transform = Affine(*tuple(transform)[:6])
        except TypeError:
            raise ConfigError(f"transform must be an affine.Affine, got {transform!r}") from None
    if transform.determinant == 0:
        raise ConfigError(f"transform {tuple(transform)[:6]} is degenerate (determinant 0)")
    measure = Measure(crs)
    out_crs = crs if dst_crs is None else dst_crs
    if len(pieces) == 0:
        return _empty_frame(out_crs)

    geoms = _apply_affine(_node_coverage(pieces.geometry, context) if exclusive else pieces.geometry, transform)
    prompt = pieces.prompt_index.copy()
    n_px, sum_p, max_p = pieces.n_px.copy(), pieces.sum_p.copy(), pieces.max_p.copy()
    source = np.arange(len(pieces))

    if fill_holes > 0:
        geoms, changed = _fill_holes(geoms, measure, fill_holes)
        target = _absorb_islands(geoms, prompt, changed, any_prompt=exclusive)
        if np.any(target != np.arange(len(geoms))):
            k = len(geoms)
            n_px = np.bincount(target, weights=n_px, minlength=k).astype(np.int64)
            sum_p = np.bincount(target, weights=sum_p, minlength=k)
            np.maximum.at(max_p, target, max_p.copy())
            keep = target == np.arange(k)
            geoms, prompt, source = geoms[keep], prompt[keep], source[keep]
            n_px, sum_p, max_p = n_px[keep], sum_p[keep], max_p[keep]

    if min_area > 0:
        area, _ = measure.area_perimeter(geoms)
        keep = area >= min_area
        geoms, prompt, n_px, sum_p, max_p = geoms[keep], prompt[keep], n_px[keep], sum_p[keep], max_p[keep]
        source = source[keep]

    if simplify > 0 and len(geoms):
        geoms, raw = _coverage_simplify(geoms, np.zeros_like(prompt) if exclusive else prompt, simplify,
                                        simplified_before, shared_edges=exclusive)
        keep = ~shapely.is_empty(geoms)
        geoms, prompt, n_px, sum_p, max_p = geoms[keep], prompt[keep], n_px[keep], sum_p[keep], max_p[keep]
        source = source[keep]
        geoms = shapely.orient_polygons(geoms, exterior_cw=False)
        if raw_out is not None:
            raw_out.append(raw.take(keep))

    if len(geoms) == 0:
        return _empty_frame(out_crs)

    area, perim = measure.area_perimeter(geoms)
    with np.errstate(invalid="ignore", divide="ignore"):
        compact = np.where(perim > 0, 4 * np.pi * area / perim**2, np.nan)
    if not measure.measurable:
        area = np.full(len(geoms), np.nan)
        perim = np.full(len(geoms), np.nan)
    n_holes = _count_holes(geoms)

    prompt_names = np.array(prompts, dtype=object)
    index = source if source_index else None
    gdf = gpd.GeoDataFrame(
        {
            "prompt": prompt_names[prompt],
            "prompt_index": prompt.astype(np.int32),
            "threshold": t[prompt],
            "mean_prob": sum_p / np.maximum(n_px, 1),
            "max_prob": max_p.astype(np.float32),
            "pixels": n_px.astype(np.int64),
            "area_m2": area,
            "perimeter_m": perim,
            "n_holes": n_holes,
            "compactness": compact,
        },
        geometry=gpd.GeoSeries(geoms, crs=crs, index=index),
        crs=crs,
        index=index,
    )

    if dst_crs is not None:
        gdf = _reproject(gdf, transform, dst_crs)
    return gdf


#: Densification step before reprojection, in source pixels: long straight pixel edges become
#: curves in most target CRSs, and an antimeridian crossing needs vertices near ±180 to be found.
_DENSIFY_PX = 16


def _reproject(gdf, transform: Affine, dst_crs: Any):
    import pyproj

    try:
        dst = pyproj.CRS.from_user_input(dst_crs)
    except pyproj.exceptions.CRSError as exc:
        raise ConfigError(f"cannot interpret destination CRS {dst_crs!r}: {exc}") from None
    if gdf.crs is None:
        raise ConfigError("dst_crs given but the source has no CRS to reproject from")
    step = _DENSIFY_PX * math.sqrt(abs(transform.determinant))
    gdf = gdf.set_geometry(shapely.segmentize(gdf.geometry.values, step), crs=gdf.crs)
    gdf = gdf.to_crs(dst)
    if dst.is_geographic:
        geoms = _split_antimeridian(np.asarray(gdf.geometry.values, dtype=object))
        gdf = gdf.set_geometry(geoms, crs=dst)
    return gdf
