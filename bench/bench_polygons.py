"""Benchmark polygons at speckle density: throughput, peak RSS of the process tree, and GDAL as anchor.

For each size (default 4096², 8192², 16384²) one run of this script, each step in a fresh child
process whose whole process tree (the Dask worker processes included) is polled with psutil every
0.1 s for its summed RSS:

* ``segment``    -- ``geoseg.segment`` end to end (LocalCluster, one worker, default chunk size) on an
                    RGB speckle raster with a deterministic per-pixel test model
                    (``tests/models.py: PerPixelFactory``: p = sigmoid(12 (red - 0.5)), red uniform
                    noise), threshold 0.5: about 1 M polygons per 4096², like the tiny random
                    CLIPSeg, without spending the run in a network;
* ``vectorize``  -- ``geoseg vectorize`` of that run at threshold 0.5 (re-reads the COG);
* ``simplify``   -- (only when asked for) ``geoseg vectorize --simplify`` one pixel (0.5 m) of
                    that run: the client streams the coverage simplification;
* ``classmap``   -- (only when asked for) ``geoseg.segment --classes --no-polygons`` of the same
                    raster with two prompts, ``red`` (red > 0.5) and ``dark`` (red < 0.5), threshold
                    0.6 (about 7 % of the pixels, near 0.5, in neither): a class map of speckle whose
                    neighbours share edges everywhere;
* ``classes``    -- (only when asked for) ``geoseg vectorize --simplify`` one pixel of that run:
                    the class map's coverage, simplified in order with its shared edges held;
* ``gdal``       -- ``gdal_polygonize.py`` (Debian GDAL, /usr/bin/python3) of the same mask
                    (``probabilities >= 0.5`` written as a uint8 GeoTIFF with nodata 0) to
                    GeoPackage, 4-connected: geometry only, no attributes.

Columns: polygons, wall s, polygons/s, peak RSS MiB (sum over the tree), and ``gdal / vectorize``
(how many times faster geoseg vectorize writes a GeoPackage than gdal_polygonize.py).

Usage::

    python bench/bench_polygons.py                       # 4096,8192,16384
    python bench/bench_polygons.py --sizes 2048,4096 --chunk-size 1024   # what fits a busy 2-core box
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "polygons"
BLOCK = 512


def make_speckle(path: Path, size: int, seed: int = 0) -> Path:
    """RGB uint8 GeoTIFF, red = uniform noise, tiled and DEFLATE, written strip by strip."""
    import rasterio
    from rasterio.windows import Window

    from tests.rasters import NORTH_UP, UTM33

    if path.exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=UTM33,
                   transform=NORTH_UP, tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                   photometric="RGB", BIGTIFF="IF_SAFER")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, BLOCK):
            h = min(BLOCK, size - row)
            rng = np.random.default_rng([seed, row])
            img = np.zeros((3, h, size), np.uint8)
            img[0] = rng.integers(0, 256, (h, size), dtype=np.uint8)
            img[1] = 128
            dst.write(img, window=Window(0, row, size, h))
    os.replace(tmp, path)
    return path


def write_mask(cog: Path, mask: Path, threshold: float = 0.5) -> Path:
    """``band 1 >= threshold`` as uint8 (1 = object, 0 = nodata), block by block."""
    import rasterio

    with rasterio.open(cog) as src:
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                       compress="deflate", nodata=0, BIGTIFF="IF_SAFER")
        with rasterio.open(mask, "w", **profile) as dst:
            for _, win in dst.block_windows(1):
                p = src.read(1, window=win)
                dst.write((p >= threshold).astype(np.uint8), 1, window=win)
    return mask


# -- children (each runs in a fresh process) -------------------------------------------------------

def child_segment(size: int, chunk: int, max_in_flight: int | None = None) -> dict:
    import geoseg
    from geoseg.config import SegmentConfig
    from tests.models import PerPixelFactory

    src = make_speckle(OUT / f"speckle_{size}.tif", size)
    cfg = SegmentConfig(input=str(src), prompts=("speckle",), output=OUT / f"run_{size}", overwrite=True,
                        chunk_size=chunk, max_in_flight=max_in_flight)
    res = geoseg.segment(cfg, segmenter_factory=PerPixelFactory())
    return {"features": res.features}


def child_vectorize(size: int, chunk: int, max_in_flight: int | None = None, simplify: float = 0.0) -> dict:
    from geoseg.config import VectorizeConfig
    from geoseg.pipeline import vectorize

    # one worker per CPU, as the CLI
    _, n = vectorize(OUT / f"run_{size}", VectorizeConfig(threshold=0.5, simplify=simplify), workers=None)
    return {"features": n}


def child_simplify(size: int, chunk: int, max_in_flight: int | None = None) -> dict:
    from tests.rasters import NORTH_UP

    return child_vectorize(size, chunk, max_in_flight, simplify=NORTH_UP.a)  # one pixel


CLASS_THRESHOLD = 0.6


def child_classmap(size: int, chunk: int, max_in_flight: int | None = None) -> dict:
    import geoseg
    from geoseg.config import SegmentConfig, VectorizeConfig
    from tests.models import PerPixelFactory

    src = make_speckle(OUT / f"speckle_{size}.tif", size)
    cfg = SegmentConfig(input=str(src), prompts=("red", "dark"), output=OUT / f"classes_{size}", overwrite=True,
                        chunk_size=chunk, max_in_flight=max_in_flight, classes=True, polygons=False,
                        vector=VectorizeConfig(threshold=CLASS_THRESHOLD))
    geoseg.segment(cfg, segmenter_factory=PerPixelFactory(((1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)), (0.5, -0.5)))
    return {"features": 0}


def child_classes(size: int, chunk: int, max_in_flight: int | None = None) -> dict:
    from geoseg.config import VectorizeConfig
    from geoseg.pipeline import vectorize
    from tests.rasters import NORTH_UP

    _, n = vectorize(OUT / f"classes_{size}", VectorizeConfig(threshold=CLASS_THRESHOLD, simplify=NORTH_UP.a),
                     workers=None)
    return {"features": n}


CHILDREN = {"segment": child_segment, "vectorize": child_vectorize, "simplify": child_simplify,
            "classmap": child_classmap, "classes": child_classes}


PEAKS: dict[str, float] = {}  # the last measure()'s peaks of the client alone and of one child


def measure(cmd: list[str], env: dict | None = None, timeline: Path | None = None) -> tuple[float, float, str]:
    """(wall s, peak summed RSS MiB of the process tree, stdout) of ``cmd``; the peak RSS of the
    client process alone and of its largest child go to :data:`PEAKS` (what grows with the output
    shows in the client; a worker's peak follows the chunk size). ``timeline``: a CSV of every
    sample (seconds, tree, client, largest child MiB), to see which stage a peak falls in."""
    import psutil

    samples = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = client = child = 0
    while proc.poll() is None:
        sizes = []
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.Error:
                    sizes.append(0)
        except psutil.Error:
            pass
        if sizes:
            peak, client, child = max(peak, sum(sizes)), max(client, sizes[0]), max(child, *sizes[1:], 0)
            samples.append((time.perf_counter() - start, sum(sizes), sizes[0], max(sizes[1:], default=0)))
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
    PEAKS.update(client=client / 2**20, child=child / 2**20)
    if timeline is not None:
        timeline.write_text("s,tree_mib,client_mib,child_mib\n" + "".join(
            f"{t:.1f},{a / 2**20:.0f},{b / 2**20:.0f},{c / 2**20:.0f}\n" for t, a, b, c in samples))
    return wall, peak / 2**20, out


def gdal_features(gpkg: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(gpkg)["features"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,8192,16384")
    ap.add_argument("--chunk-size", type=int, default=4096, help="geoseg --chunk-size (default: geoseg's)")
    ap.add_argument("--gdal-max", type=int, default=16384, help="skip the GDAL anchor above this size")
    ap.add_argument("--steps", default="segment,vectorize,gdal",
                    help="which steps to run, of segment,vectorize,simplify,classmap,classes,gdal (vectorize, "
                         "simplify and gdal reuse an earlier segment run, classes a classmap run)")
    ap.add_argument("--max-in-flight", type=int, default=None,
                    help="segment: chunks in flight (default: geoseg's, one per worker thread)")
    ap.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.size, args.chunk_size, args.max_in_flight)))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows, split = [], {}
    steps = args.steps.split(",")
    for size in (int(s) for s in args.sizes.split(",")):
        make_speckle(OUT / f"speckle_{size}.tif", size)
        for step in (s for s in CHILDREN if s in steps):
            wall, rss, out = measure([sys.executable, __file__, "--child", step, "--size", str(size),
                                      "--chunk-size", str(args.chunk_size),
                                      *(["--max-in-flight", str(args.max_in_flight)] if args.max_in_flight else [])],
                                     env, timeline=OUT / f"timeline_{size}_{step}.csv")
            n = json.loads(out.strip().splitlines()[-1])["features"]
            rows.append((size, step, n, wall, rss))
            split[size, step] = dict(PEAKS)
            print(f"{size}² {step}: {n} polygons, {wall:.1f} s, {n / wall:,.0f}/s, peak RSS {rss:,.0f} MiB "
                  f"(client {PEAKS['client']:,.0f}, largest child {PEAKS['child']:,.0f})", flush=True)
        if "gdal" in steps and size <= args.gdal_max and shutil.which("gdal_polygonize.py"):
            mask = write_mask(OUT / f"run_{size}" / "probabilities.tif", OUT / f"mask_{size}.tif")
            gpkg = OUT / f"gdal_{size}.gpkg"
            gpkg.unlink(missing_ok=True)
            # 4-connected by default, as geoseg
            wall, rss, _ = measure(["gdal_polygonize.py", "-q", str(mask), "-of", "GPKG", str(gpkg)])
            n = gdal_features(gpkg)
            rows.append((size, "gdal", n, wall, rss))
            print(f"{size}² gdal_polygonize.py: {n} polygons, {wall:.1f} s, {n / wall:,.0f}/s, "
                  f"peak RSS {rss:,.0f} MiB", flush=True)

    print("\n| size | step | polygons | wall s | polygons/s | peak RSS MiB | client / largest child MiB |")
    print("|---|---|---|---|---|---|---|")
    for size, step, n, wall, rss in rows:
        peaks = split.get((size, step))
        cells = f"{peaks['client']:,.0f} / {peaks['child']:,.0f}" if peaks else "–"
        print(f"| {size}² | {step} | {n:,} | {wall:.1f} | {n / wall:,.0f} | {rss:,.0f} | {cells} |")
    by = {(s, k): (n, w, r) for s, k, n, w, r in rows}
    sizes = sorted({s for s, *_ in rows})
    for size in sizes:
        if (size, "gdal") in by and (size, "vectorize") in by:
            print(f"{size}²: vectorize is {by[size, 'gdal'][1] / by[size, 'vectorize'][1]:.2f}x as fast as "
                  "gdal_polygonize.py to GeoPackage")
    for step in CHILDREN:
        if (sizes[0], step) in by and (sizes[-1], step) in by and len(sizes) > 1:
            big, small = split[sizes[-1], step], split[sizes[0], step]
            print(f"{step}: peak RSS {sizes[-1]}² / {sizes[0]}² = {by[sizes[-1], step][2] / by[sizes[0], step][2]:.2f}"
                  f" (client alone {big['client'] / small['client']:.2f})")


if __name__ == "__main__":
    main()
