"""Generate the small synthetic GeoTIFFs in ``sample_tiles/`` (numpy + rasterio only).

Writes, next to this script:

``town_rgb_utm.tif``
    640 x 480 px (width x height), 3-band uint8 RGB, EPSG:32633 (UTM 33N), 0.5 m pixels, upper-left
    corner at E 601000, N 5340240 (so the tile covers 320 m x 240 m), DEFLATE + horizontal predictor,
    tiled 256 x 256, pixel-interleaved, photometric RGB, no nodata. A synthetic "town": noisy green
    grass, grey asphalt roads (two horizontal, two vertical, one diagonal) with a dashed centre line,
    red / brown rectangular roofs with a ridge line, and round blue swimming pools in gardens.

``town_rgbn_uint16.tif``
    320 x 240 px, 4-band uint16 (red, green, blue, near-infrared) in 12-bit range (0..4095),
    EPSG:32633, 1.0 m pixels, same upper-left corner, DEFLATE, tiled 256 x 256, nodata = 0 with a
    nodata wedge in the lower-left corner (like the edge of a satellite swath). Same kind of scene,
    drawn at this resolution, with grass bright in NIR and water dark in NIR. Band descriptions are set.

The output is deterministic: every random draw comes from ``numpy.random.default_rng(SEED)``
and GDAL writes no timestamps, so re-running this script produces byte-identical files with the
same numpy / GDAL / zlib builds (``python sample_tiles/make_samples.py --check`` verifies that
against the files on disk; a different zlib may compress to other bytes with the same pixels).

Usage::

    python sample_tiles/make_samples.py            # (re)write the files
    python sample_tiles/make_samples.py --check    # regenerate into a temp dir and compare bytes
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

SEED = 20240611
HERE = Path(__file__).resolve().parent
CRS_UTM33N = CRS.from_epsg(32633)
ORIGIN = (601000.0, 5340240.0)  # upper-left corner (easting, northing), near Vienna

# Reflectance-like colours, 0..1, per class: (R, G, B, NIR)
GRASS = (0.22, 0.45, 0.18, 0.60)
ROAD = (0.42, 0.42, 0.44, 0.30)
ROAD_LINE = (0.90, 0.90, 0.86, 0.80)
POOL = (0.10, 0.45, 0.85, 0.05)
POOL_RIM = (0.85, 0.85, 0.82, 0.70)
ROOFS = [
    (0.70, 0.20, 0.15, 0.35),  # red tiles
    (0.55, 0.28, 0.16, 0.35),  # brown tiles
    (0.62, 0.33, 0.22, 0.38),  # terracotta
    (0.45, 0.22, 0.14, 0.30),  # dark brown
]


def draw_scene(height: int, width: int, pixel_m: float, rng: np.random.Generator) -> np.ndarray:
    """Return a float32 (4, H, W) RGBN scene in 0..1 drawn in metres, so layouts match across resolutions."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ym, xm = (yy + 0.5) * pixel_m, (xx + 0.5) * pixel_m  # pixel centres in metres from the UL corner
    h_m, w_m = height * pixel_m, width * pixel_m

    img = np.empty((4, height, width), dtype=np.float32)
    for b in range(4):
        img[b] = GRASS[b]
    # grass texture: per-pixel noise plus a smooth, blotchy low-frequency field
    coarse = rng.normal(0.0, 1.0, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
    blotch = np.kron(coarse, np.ones((16, 16), dtype=np.float32))[:height, :width]
    blotch = (blotch + np.roll(blotch, 8, 0) + np.roll(blotch, 8, 1) + np.roll(blotch, (8, 8), (0, 1))) / 4
    img *= 1.0 + 0.08 * blotch
    img += rng.normal(0.0, 0.025, img.shape).astype(np.float32)

    # roads (metres): two horizontal, two vertical, one diagonal; 8 m wide with a dashed centre line
    road = np.zeros((height, width), dtype=bool)
    line = np.zeros((height, width), dtype=bool)
    half = 4.0
    for y0 in (0.30 * h_m, 0.78 * h_m):
        road |= np.abs(ym - y0) < half
        line |= (np.abs(ym - y0) < 0.25 + 0.5 * pixel_m) & ((xm // 3) % 2 == 0)
    for x0 in (0.22 * w_m, 0.66 * w_m):
        road |= np.abs(xm - x0) < half
        line |= (np.abs(xm - x0) < 0.25 + 0.5 * pixel_m) & ((ym // 3) % 2 == 0)
    # diagonal from upper-right towards the middle of the bottom edge
    d = ((xm - 0.95 * w_m) + 0.9 * (ym - 0.0)) / np.hypot(1.0, 0.9)
    road |= np.abs(d) < half
    line &= road
    _paint(img, road, ROAD, rng, 0.02)
    _paint(img, line, ROAD_LINE, rng, 0.02)

    # buildings (rectangles with a ridge line) and pools (discs), placed off the roads, no overlaps
    keep_out = _dilate(road, int(np.ceil(3.0 / pixel_m)))
    occupied = keep_out.copy()
    n_buildings, tries = 0, 0
    while n_buildings < 22 and tries < 2000:
        tries += 1
        bw, bh = rng.uniform(9.0, 22.0), rng.uniform(8.0, 16.0)
        if rng.random() < 0.5:
            bw, bh = bh, bw
        x0, y0 = rng.uniform(2.0, w_m - bw - 2.0), rng.uniform(2.0, h_m - bh - 2.0)
        box = (xm >= x0) & (xm < x0 + bw) & (ym >= y0) & (ym < y0 + bh)
        if not box.any() or (box & _dilate(occupied, int(np.ceil(2.0 / pixel_m)))).any():
            continue
        colour = ROOFS[int(rng.integers(len(ROOFS)))]
        _paint(img, box, colour, rng, 0.015)
        # ridge along the long side, one roof face slightly darker (sun from the south-east)
        if bw >= bh:
            ridge = box & (np.abs(ym - (y0 + bh / 2)) < 0.3 + 0.5 * pixel_m)
            shade = box & (ym < y0 + bh / 2)
        else:
            ridge = box & (np.abs(xm - (x0 + bw / 2)) < 0.3 + 0.5 * pixel_m)
            shade = box & (xm < x0 + bw / 2)
        img[:, shade] *= 0.85
        img[:, ridge] *= 0.7
        occupied |= box
        n_buildings += 1

        # about half of the houses get a pool in the garden next to them
        if rng.random() < 0.55:
            r = rng.uniform(2.5, 4.5)
            for _ in range(20):
                ang = rng.uniform(0, 2 * np.pi)
                cx = x0 + bw / 2 + np.cos(ang) * (max(bw, bh) / 2 + r + 2.5)
                cy = y0 + bh / 2 + np.sin(ang) * (max(bw, bh) / 2 + r + 2.5)
                if not (r + 1 < cx < w_m - r - 1 and r + 1 < cy < h_m - r - 1):
                    continue
                dist = np.hypot(xm - cx, ym - cy)
                rim, water = dist < r + 0.6, dist < r
                if not water.any() or (rim & occupied).any():
                    continue
                _paint(img, rim, POOL_RIM, rng, 0.015)
                _paint(img, water, POOL, rng, 0.02)
                occupied |= rim
                break

    return np.clip(img, 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, colour, rng: np.random.Generator, noise: float) -> None:
    n = int(mask.sum())
    for b in range(img.shape[0]):
        img[b][mask] = colour[b] + rng.normal(0.0, noise, n).astype(np.float32)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square binary dilation by ``r`` pixels (numpy only)."""
    out = mask.copy()
    for _ in range(max(r, 0)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def write_rgb(path: Path, rng: np.random.Generator) -> None:
    height, width, pixel_m = 480, 640, 0.5
    scene = draw_scene(height, width, pixel_m, rng)
    rgb = np.round(scene[:3] * 255.0).astype(np.uint8)
    profile = dict(
        driver="GTiff", width=width, height=height, count=3, dtype="uint8",
        crs=CRS_UTM33N, transform=from_origin(ORIGIN[0], ORIGIN[1], pixel_m, pixel_m),
        tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=2,
        interleave="pixel", photometric="RGB",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb)
        dst.descriptions = ("red", "green", "blue")
        dst.update_tags(SOURCE="geoseg sample_tiles/make_samples.py (synthetic)", SEED=str(SEED))


def write_rgbn(path: Path, rng: np.random.Generator) -> None:
    height, width, pixel_m = 240, 320, 1.0
    scene = draw_scene(height, width, pixel_m, rng)
    data = np.round(scene * 4000.0 + 1.0).astype(np.uint16)  # 1..4001: 0 stays free for nodata
    yy, xx = np.mgrid[0:height, 0:width]
    # lower-left triangle (legs: 35 % of the width and of the height), like the edge of a swath
    wedge = xx / (0.35 * width) + (height - 1 - yy) / (0.35 * height) < 1.0
    data[:, wedge] = 0
    profile = dict(
        driver="GTiff", width=width, height=height, count=4, dtype="uint16",
        crs=CRS_UTM33N, transform=from_origin(ORIGIN[0], ORIGIN[1], pixel_m, pixel_m),
        tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=2,
        interleave="pixel", nodata=0,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = ("red", "green", "blue", "nir")
        dst.update_tags(SOURCE="geoseg sample_tiles/make_samples.py (synthetic)", SEED=str(SEED))


OUTPUTS = {"town_rgb_utm.tif": write_rgb, "town_rgbn_uint16.tif": write_rgbn}


def make_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, writer in OUTPUTS.items():
        # one independent, fixed stream per file: adding a file never changes another one
        rng = np.random.default_rng([SEED, sorted(OUTPUTS).index(name)])
        path = out_dir / name
        if path.exists():
            path.unlink()
        writer(path, rng)
        for sidecar in (path.with_suffix(path.suffix + ".aux.xml"),):
            if sidecar.exists():
                sidecar.unlink()
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with the files in --out-dir")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as td:
            fresh = make_all(Path(td))
            bad = [p.name for p in fresh
                   if not (args.out_dir / p.name).exists()
                   or not filecmp.cmp(p, args.out_dir / p.name, shallow=False)]
        if bad:
            print("differs from a fresh build: " + ", ".join(bad), file=sys.stderr)
            return 1
        print("all sample tiles are byte-identical to a fresh build")
        return 0
    for p in make_all(args.out_dir):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
