"""Generators for test rasters (kept with the tests, seeded, written with rasterio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

UTM33 = "EPSG:32633"
NORTH_UP = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0)


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB (3, H, W): noisy green ground with red rectangles and blue discs."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, height, width), np.uint8)
    img[0] = rng.integers(20, 80, (height, width))
    img[1] = rng.integers(90, 160, (height, width))
    img[2] = rng.integers(20, 80, (height, width))
    for _ in range(max(1, height * width // 20000)):
        h, w = rng.integers(6, 40, 2)
        r, c = rng.integers(0, max(1, height - h)), rng.integers(0, max(1, width - w))
        img[:, r:r + h, c:c + w] = np.array([200, 60, 50], np.uint8)[:, None, None]
    yy, xx = np.mgrid[:height, :width]
    for _ in range(max(1, height * width // 40000)):
        cy, cx, rad = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 20)
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = np.array([40, 90, 220], np.uint8)[:, None]
    return img


def write(path: Path, data: np.ndarray, crs=UTM33, transform: Affine = NORTH_UP, **profile) -> Path:
    """Write (bands, H, W) ``data`` as a GeoTIFF; extra creation options/profile keys pass through."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    kw = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
              dtype=data.dtype, crs=crs, transform=transform)
    kw.update(profile)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return Path(path)
