"""Benchmark geoseg on Dask: worker scaling, scheduler load, and per-worker memory vs raster size.

All measured in one run of this script:

1. **Throughput, 1 vs 2 worker processes** — the real product path (``geoseg.segment`` with the
   CLIPSeg factory, a LocalCluster started for the run) on a generated RGB GeoTIFF, with the tiny
   random CLIPSeg from ``tests/tiny_model.py`` (same code path as the real weights, ~1000x cheaper).
   Wall time includes cluster start and model load per worker; Mpx/s = raster pixels / wall time.
2. **Scheduler tasks for a 100,000² raster** at the default chunk size, computed from the plan
   (``geoseg.tiling``), not run.
3. **Peak RSS per worker, 4096² vs 16384² input** with the zero-cost model (pipeline only), each size
   on a fresh 2-worker cluster; ``ru_maxrss`` read from every worker after the run.

Usage: ``python bench/bench_distributed.py [--size 2048] [--chunk 1024] [--big 16384] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rasterio  # noqa: E402
from rasterio.windows import Window  # noqa: E402

import geoseg  # noqa: E402
from geoseg.config import CHUNK_SIZE, STRIDE, TILE_SIZE  # noqa: E402
from geoseg.scheduling import dask_client  # noqa: E402
from geoseg.tiling import aligned_chunk, chunk_regions, tiles_touching  # noqa: E402
from tests.models import ZeroCostFactory  # noqa: E402
from tests.rasters import NORTH_UP, UTM33, scene, write  # noqa: E402
from tests.tiny_model import build_tiny_clipseg  # noqa: E402


def write_big(path: Path, size: int, block: int = 512) -> Path:
    """size² uint8 RGB GeoTIFF, DEFLATE, 512 px tiles, written 2048 rows at a time from a repeated scene."""
    pattern = scene(2048, 2048, seed=3)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=UTM33,
                   transform=NORTH_UP, tiled=True, blockxsize=block, blockysize=block, compress="deflate",
                   BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 2048):
            h = min(2048, size - row)
            for col in range(0, size, 2048):
                w = min(2048, size - col)
                dst.write(pattern[:, :h, :w], window=Window(col, row, w, h))
    return path


def throughput(tmp: Path, size: int, chunk: int) -> list[tuple[int, float, float, int]]:
    model = build_tiny_clipseg(tmp / "tiny-clipseg")
    src = write(tmp / f"rgb{size}.tif", scene(size, size, seed=1), tiled=True, blockxsize=256,
                blockysize=256, compress="deflate")
    rows = []
    for workers in (1, 2):
        cfg = geoseg.SegmentConfig(str(src), ("red roof", "blue pool"), tmp / f"tp-{workers}", model=str(model),
                                   device="cpu", chunk_size=chunk, workers=workers)
        start = time.perf_counter()
        result = geoseg.segment(cfg)
        wall = time.perf_counter() - start
        busy = sum(c.seconds or 0 for c in result.manifest.chunks.values())
        rows.append((workers, wall, size * size / wall / 1e6, result.chunks_run, busy))
    return rows


def plan_100k(size: int = 100_000, block: int = 512) -> dict:
    c = aligned_chunk(CHUNK_SIZE, block)
    regions = chunk_regions(size, size, c, c)
    per_chunk = [len(tiles_touching(r, size, size, TILE_SIZE, STRIDE)) for r in regions]
    whole = len(tiles_touching(chunk_regions(size, size, size, size)[0], size, size, TILE_SIZE, STRIDE))
    return {"chunk": c, "tasks": len(regions), "tiles": sum(per_chunk), "tiles_whole": whole}


def peak_rss(tmp: Path, size: int) -> tuple[list[float], float, int]:
    src = write_big(tmp / f"big{size}.tif", size)
    cfg = geoseg.SegmentConfig(str(src), ("thing",), tmp / f"rss-{size}")
    with dask_client(workers=2) as client:
        start = time.perf_counter()
        result = geoseg.segment(cfg, client=client, segmenter_factory=ZeroCostFactory())
        wall = time.perf_counter() - start
        rss = client.run(_vm_hwm_kib)
    src.unlink()
    return sorted(v / 1024 for v in rss.values()), wall, result.chunks_run


def _vm_hwm_kib() -> int:
    """This process's peak RSS in KiB. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork+exec,
    so a spawned worker would report its (big) parent's peak; VmHWM starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="throughput raster side (px)")
    ap.add_argument("--chunk", type=int, default=1024, help="chunk size for the throughput runs")
    ap.add_argument("--small", type=int, default=4096)
    ap.add_argument("--big", type=int, default=16384)
    ap.add_argument("--skip-throughput", action="store_true", help="only sections 2 and 3")
    ap.add_argument("--keep", type=Path, default=None, help="work here instead of a temporary directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = args.keep or Path(td)
        tmp.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} cores   geoseg {geoseg.__version__}\n")

        rows = [] if args.skip_throughput else throughput(tmp, args.size, args.chunk)
        for _ in rows[:1]:
            print(f"1. throughput, tiny CLIPSeg, {args.size}² RGB, chunk {args.chunk} "
              f"(wall time incl. cluster start + model load)")
            print(f"   {'workers':>7} {'wall s':>8} {'Mpx/s':>8} {'chunks':>6} {'chunk-s sum':>11}")
            for w, wall, mpx, n, busy in rows:
                print(f"   {w:>7} {wall:>8.2f} {mpx:>8.3f} {n:>6} {busy:>11.2f}")
            print(f"   speed-up 2 vs 1 worker: {rows[1][2] / rows[0][2]:.2f}x\n", flush=True)

        p = plan_100k()
        print(f"2. scheduler load, 100,000² raster, default chunk {CHUNK_SIZE} (512 px blocks -> {p['chunk']}):")
        print(f"   {p['tasks']} chunks = {3 * p['tasks'] + 1:,} scheduler tasks per run (read, infer, finish "
              f"per chunk + one prompt encoding); {p['tiles']:,} model tiles "
              f"({p['tiles'] / p['tiles_whole'] - 1:+.1%} vs one whole-image tiling)\n")

        print("3. peak RSS per worker process (zero-cost model, 2 workers, default chunk size):")
        print(f"   {'raster':>8} {'MB raw':>7} {'chunks':>6} {'wall s':>7}  worker peak RSS (VmHWM) MiB")
        for size in (args.small, args.big):
            rss, wall, n = peak_rss(tmp, size)
            print(f"   {size:>7}² {3 * size * size / 1e6:>7.0f} {n:>6} {wall:>7.1f}  "
                  + ", ".join(f"{v:.0f}" for v in rss))


if __name__ == "__main__":
    main()
