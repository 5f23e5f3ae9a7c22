"""Benchmark ``geoseg.segment`` end to end against the I/O limit and the pipeline's own overhead.

Everything is measured in ONE invocation on the same machine, so the ratios are meaningful even on a
noisy box (absolute numbers are not):

* ``read``      -- a plain rasterio windowed read of the input, chunk window by chunk window, in this
                   process: how fast the bytes can come off disk and through DEFLATE (the I/O limit);
* ``zero-cost`` -- ``geoseg.segment`` with a model that returns zeros at once
                   (``tests/models.py: ZeroCostFactory``): reading, tiling, blending, writing parts,
                   polygonizing and assembling the COG, i.e. the pipeline's overhead;
* ``clipseg``   -- ``geoseg.segment`` through the product path (``SegmentConfig(model=<dir>)``, CLIPSeg
                   loaded by transformers on the worker) with the tiny random CLIPSeg from
                   ``tests/tiny_model.py``: end to end, including the LocalCluster start-up;
* ``rss``       -- peak RSS of a fresh process running ``segment`` with the zero-cost model and an
                   in-process Dask worker (client, worker and assembly all in that one process), for
                   a small and a large input: memory must not grow with the raster.

Inputs are generated once into ``bench/out/`` (gitignored) and reused by later runs.

Usage::

    python bench/bench_segment.py                 # the full run: 8192² scene, RSS at 4096² and 16384²
    python bench/bench_segment.py --size 2048 --rss-sizes 1024,4096   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rasterio  # noqa: E402
from rasterio.windows import Window  # noqa: E402

OUT = ROOT / "bench" / "out"
BLOCK = 512
PROMPT = "red roof"


# -- inputs ------------------------------------------------------------------------------------

def make_scene(path: Path, size: int, seed: int = 0) -> Path:
    """An RGB uint8 GeoTIFF like ``tests/rasters.py: scene`` (noisy green ground, red rectangles,
    blue discs), tiled 512 px and DEFLATE-compressed, written strip by strip (bounded memory)."""
    from tests.rasters import NORTH_UP, UTM33

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    n_rect, n_disc = max(1, size * size // 20000), max(1, size * size // 40000)
    rects = np.column_stack([rng.integers(0, size, n_rect), rng.integers(0, size, n_rect),
                             rng.integers(6, 40, n_rect), rng.integers(6, 40, n_rect)])
    discs = np.column_stack([rng.integers(0, size, n_disc), rng.integers(0, size, n_disc),
                             rng.integers(4, 20, n_disc)])
    tmp = path.with_name(path.name + ".tmp")
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=UTM33,
                   transform=NORTH_UP, tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                   photometric="RGB", BIGTIFF="IF_SAFER")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, BLOCK):
            h = min(BLOCK, size - row)
            srng = np.random.default_rng([seed, row])
            img = np.empty((3, h, size), np.uint8)
            img[0] = srng.integers(20, 80, (h, size), dtype=np.uint8)
            img[1] = srng.integers(90, 160, (h, size), dtype=np.uint8)
            img[2] = srng.integers(20, 80, (h, size), dtype=np.uint8)
            for r, c, rh, rw in rects[(rects[:, 0] < row + h) & (rects[:, 0] + rects[:, 2] > row)]:
                r0, r1 = max(r, row) - row, min(r + rh, row + h) - row
                img[:, r0:r1, c:c + rw] = np.array([200, 60, 50], np.uint8)[:, None, None]
            for cy, cx, rad in discs[(discs[:, 0] + discs[:, 2] > row) & (discs[:, 0] - discs[:, 2] < row + h)]:
                r0, r1 = max(cy - rad, row), min(cy + rad + 1, row + h)
                c0, c1 = max(cx - rad, 0), min(cx + rad + 1, size)
                yy, xx = np.ogrid[r0:r1, c0:c1]
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2
                img[:, r0 - row:r1 - row, c0:c1][:, disc] = np.array([40, 90, 220], np.uint8)[:, None]
            dst.write(img, window=Window(0, row, size, h))
    os.replace(tmp, path)
    return path


def tiny_model(out: Path) -> Path:
    from tests.tiny_model import build_tiny_clipseg

    if not (out / "config.json").exists():
        build_tiny_clipseg(out)
    return out


# -- measurements -------------------------------------------------------------------------------

def plain_read(path: Path, chunk: int) -> float:
    """Seconds for a windowed read of every chunk window (bands 1-3) of the file."""
    from geoseg.raster import inspect_raster
    from geoseg.stages import plan_chunks

    regions = plan_chunks(inspect_raster(str(path)), chunk)
    start = time.perf_counter()
    with rasterio.open(path) as src:
        for r in regions:
            src.read([1, 2, 3], window=Window(r.col, r.row, r.width, r.height))
    return time.perf_counter() - start


def cluster_startup(workers: int) -> float:
    """Seconds to start and stop the LocalCluster ``segment`` starts when given no client."""
    from geoseg.scheduling import dask_client

    start = time.perf_counter()
    with dask_client(workers=workers):
        pass
    return time.perf_counter() - start


def run_segment(path: Path, run_dir: Path, chunk: int, workers: int, threshold: float, factory=None,
                model: str | None = None):
    """(seconds, RunResult) of one fresh ``geoseg.segment`` with no client (the product path)."""
    import geoseg

    shutil.rmtree(run_dir, ignore_errors=True)
    kw = {"model": model} if model else {}
    cfg = geoseg.SegmentConfig(str(path), (PROMPT,), run_dir, chunk_size=chunk, workers=workers,
                               vector=geoseg.VectorizeConfig(threshold=threshold), **kw)
    start = time.perf_counter()
    result = geoseg.segment(cfg, segmenter_factory=factory)
    return time.perf_counter() - start, result


def task_seconds(result) -> float:
    return sum(c.seconds or 0.0 for c in result.manifest.chunks.values())


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Unlike ``getrusage``'s ru_maxrss, which a child inherits
    from the parent it was forked from, VmHWM starts afresh at exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: KiB on Linux, bytes on macOS


def rss_child(path: str, run_dir: str, chunk: int) -> None:
    """Runs in a fresh process: segment with the zero-cost model in-process; prints JSON."""
    from distributed import Client

    import geoseg
    from tests.models import ZeroCostFactory

    shutil.rmtree(run_dir, ignore_errors=True)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        before = peak_rss_kib()
        cfg = geoseg.SegmentConfig(path, (PROMPT,), run_dir, chunk_size=chunk)
        start = time.perf_counter()
        result = geoseg.segment(cfg, client=client, segmenter_factory=ZeroCostFactory())
        seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    print(json.dumps({"baseline_kib": before, "peak_kib": peak, "seconds": seconds,
                      "chunks": result.chunks_run}))


def measure_rss(path: Path, run_dir: Path, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), str(run_dir), "--chunk-size", str(chunk)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="side of the square throughput input (px)")
    ap.add_argument("--rss-sizes", default="4096,16384", help="input sides for the peak-RSS runs ('' skips)")
    ap.add_argument("--chunk-size", type=int, default=4096, help="geoseg chunk size (px)")
    ap.add_argument("--workers", type=int, default=1, help="LocalCluster workers for the throughput runs")
    ap.add_argument("--threshold", type=float, default=0.9999,
                    help="polygon threshold; the random tiny model's probabilities are speckle around 0.5, "
                         "so the default 0.5 would vectorize millions of 1-pixel polygons")
    ap.add_argument("--rss-child", nargs=2, metavar=("INPUT", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child, args.chunk_size)
        return

    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from tests.models import ZeroCostFactory

    OUT.mkdir(parents=True, exist_ok=True)
    n = args.size
    mpx = n * n / 1e6
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]

    t = time.perf_counter()
    src = make_scene(OUT / f"scene_{n}.tif", n)
    for s in rss_sizes:
        make_scene(OUT / f"scene_{s}.tif", s)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s ({src})", file=sys.stderr)
    model = tiny_model(OUT / "tiny-clipseg")

    rows = []
    read_s = plain_read(src, args.chunk_size)
    rows.append(("rasterio windowed read (I/O limit)", read_s, None, None))
    startup = cluster_startup(args.workers)
    zero_s, zero = run_segment(src, OUT / "run-zero", args.chunk_size, args.workers, args.threshold,
                                 factory=ZeroCostFactory())
    rows.append(("geoseg, zero-cost model (overhead)", zero_s, task_seconds(zero), zero.features))
    clip_s, clip = run_segment(src, OUT / "run-clipseg", args.chunk_size, args.workers, args.threshold,
                                 model=str(model))
    rows.append(("geoseg, tiny CLIPSeg (end to end)", clip_s, task_seconds(clip), clip.features))

    rss = [(s, measure_rss(OUT / f"scene_{s}.tif", OUT / f"run-rss-{s}", args.chunk_size)) for s in rss_sizes]

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\ngeoseg segment bench: {n} x {n} RGB uint8 ({mpx:.1f} Mpx), tiled {BLOCK} DEFLATE, "
          f"1 prompt, threshold {args.threshold}, chunk {args.chunk_size}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPUs, model on {device}")
    print(f"LocalCluster start+stop: {startup:.1f} s (included in both geoseg rows)\n")
    print(f"{'measurement':<38} {'wall s':>8} {'Mpx/s':>8} {'x read':>8} {'tasks s':>8} {'polygons':>9}")
    for name, secs, tasks, feats in rows:
        print(f"{name:<38} {secs:>8.1f} {mpx / secs:>8.2f} {secs / read_s:>8.1f} "
              f"{'' if tasks is None else f'{tasks:.1f}':>8} {'' if feats is None else feats:>9}")
    print(f"{'model share of end-to-end time':<38} {max(0.0, clip_s - zero_s) / clip_s:>8.0%}")
    if rss:
        print(f"\n{'peak RSS, zero-cost, 1 process':<38} {'Mpx':>8} {'chunks':>8} {'wall s':>8} "
              f"{'base MiB':>9} {'peak MiB':>9} {'growth':>8}")
        for s, r in rss:
            print(f"{f'{s} x {s}':<38} {s * s / 1e6:>8.1f} {r['chunks']:>8} {r['seconds']:>8.1f} "
                  f"{r['baseline_kib'] / 1024:>9.0f} {r['peak_kib'] / 1024:>9.0f} "
                  f"{(r['peak_kib'] - r['baseline_kib']) / 1024:>7.0f}M")
        if len(rss) >= 2:
            (s0, r0), (s1, r1) = rss[0], rss[-1]
            print(f"peak RSS ratio {s1}² / {s0}²: {r1['peak_kib'] / r0['peak_kib']:.2f} "
                  f"for {(s1 / s0) ** 2:.0f}x the pixels")


if __name__ == "__main__":
    main()
