"""Chunk grid, global tile grid, halos and Tukey blend weights — pure integer/array maths.

Tiles come from ONE global grid over the whole raster, so a chunk that runs every tile touching it
gets exactly the whole-image blend for its own pixels: no seams, and results independent of the
chunk size. Along each axis tiles start every ``stride`` px and the last tile sits flush with the
raster edge; an axis shorter than a tile gets a single tile that is padded, never stretched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True, order=True)
class Region:
    """A half-open pixel rectangle ``[row, row + height) x [col, col + width)``."""

    row: int
    col: int
    height: int
    width: int

    @property
    def row_stop(self) -> int:
        return self.row + self.height

    @property
    def col_stop(self) -> int:
        return self.col + self.width

    @property
    def name(self) -> str:
        return f"r{self.row:07d}_c{self.col:07d}"

    def slices(self, within: Region | None = None) -> tuple[slice, slice]:
        """Array slices of this region inside ``within`` (whose origin is its own row/col)."""
        r0, c0 = (within.row, within.col) if within else (0, 0)
        return (slice(self.row - r0, self.row_stop - r0), slice(self.col - c0, self.col_stop - c0))

    def intersection(self, other: Region) -> Region | None:
        r0, c0 = max(self.row, other.row), max(self.col, other.col)
        r1, c1 = min(self.row_stop, other.row_stop), min(self.col_stop, other.col_stop)
        if r1 <= r0 or c1 <= c0:
            return None
        return Region(r0, c0, r1 - r0, c1 - c0)


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Tile origins along one axis: every ``stride`` px, the last one flush with the edge."""
    if length <= tile:
        return (0,)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return tuple(starts)


def aligned_chunk(chunk: int, block: int) -> int:
    """Round the chunk size up to a multiple of the file's internal block so reads never split one."""
    if block <= 0 or block >= chunk:
        return chunk
    return math.ceil(chunk / block) * block


def chunk_regions(height: int, width: int, chunk_h: int, chunk_w: int) -> list[Region]:
    """Row-major list of chunk regions covering the raster."""
    return [
        Region(r, c, min(chunk_h, height - r), min(chunk_w, width - c))
        for r in range(0, height, chunk_h)
        for c in range(0, width, chunk_w)
    ]


def tiles_touching(region: Region, height: int, width: int, tile: int, stride: int) -> list[Region]:
    """Global-grid tiles overlapping ``region``, row-major (a fixed order keeps sums bit-identical)."""
    rows = [s for s in tile_starts(height, tile, stride) if s < region.row_stop and s + tile > region.row]
    cols = [s for s in tile_starts(width, tile, stride) if s < region.col_stop and s + tile > region.col]
    return [Region(r, c, tile, tile) for r in rows for c in cols]


def halo(tiles: list[Region], height: int, width: int) -> Region:
    """The window a chunk must read: the union of its tiles, clipped to the raster."""
    r0, c0 = min(t.row for t in tiles), min(t.col for t in tiles)
    r1 = min(max(t.row_stop for t in tiles), height)
    c1 = min(max(t.col_stop for t in tiles), width)
    return Region(r0, c0, r1 - r0, c1 - c0)


@lru_cache(maxsize=64)
def _ramp(tile: int, ramp: int) -> np.ndarray:
    """Tukey (tapered cosine) window along one axis, sampled at pixel centres so no weight is zero."""
    w = np.ones(tile, dtype=np.float64)
    if ramp > 0:
        x = (np.arange(ramp) + 0.5) / ramp
        up = 0.5 * (1.0 - np.cos(np.pi * x))
        w[:ramp] = up
        w[tile - ramp:] = np.minimum(w[tile - ramp:], up[::-1])
    w.setflags(write=False)
    return w


def axis_weights(start: int, length: int, tile: int, stride: int) -> np.ndarray:
    """1-D weights of the tile at ``start``; sides on the raster boundary are not tapered.

    The ramp equals the overlap (``tile - stride``): neighbouring ramps then sum to one, and the
    final division by the sum of weights makes the blend exact wherever they do not.
    """
    ramp = min(tile - stride, tile // 2)
    w = _ramp(tile, ramp).copy()
    if start == 0:
        w[: tile // 2] = 1.0
    if start + tile >= length:
        w[tile // 2:] = 1.0
    return w


def tile_weights(t: Region, height: int, width: int, tile: int, stride: int) -> np.ndarray:
    """2-D separable Tukey weights (tile, tile) for a global-grid tile, float32."""
    wy = axis_weights(t.row, height, tile, stride)
    wx = axis_weights(t.col, width, tile, stride)
    return np.outer(wy, wx).astype(np.float32)
