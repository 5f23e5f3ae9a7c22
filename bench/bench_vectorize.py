"""Benchmark geoseg.vectorize: chunked polygonize + seam merge vs one whole-image polygonize.

A dense synthetic mask (seeded random discs and rectangles, many of them crossing chunk borders)
is vectorized three ways, all in this one process and run:

* baseline   — ``rasterio.features.shapes`` over the whole image (geometry only, no stats);
* whole      — ``polygonize_chunk`` on the whole image as one chunk (geometry + exact stats);
* chunked    — ``polygonize_chunk`` per chunk (sequentially, as one worker would) + ``merge_seams``.

Usage: ``python bench/bench_vectorize.py [--size 8192] [--chunk 2048] [--seed 0]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rasterio.features import shapes  # noqa: E402

from geoseg.pieces import merge_seams, polygonize_chunk  # noqa: E402


def synthetic_probs(size: int, seed: int) -> np.ndarray:
    """float32 (1, size, size) probabilities: >= 0.5 inside random blobs, below elsewhere."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    n_blobs = size * size // 600  # ~110k blobs at 8192²
    cy = rng.integers(0, size, n_blobs)
    cx = rng.integers(0, size, n_blobs)
    rad = rng.integers(1, 12, n_blobs)
    is_disc = rng.random(n_blobs) < 0.5
    for y, x, r, disc in zip(cy, cx, rad, is_disc):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, size), max(x - r, 0), min(x + r + 1, size)
        if disc:
            yy, xx = np.ogrid[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        else:
            mask[y0:y1, x0:x1 - r // 2] = True
    noise = rng.random((size, size), dtype=np.float32)
    probs = np.where(mask, 0.5 + 0.5 * noise, 0.49 * noise).astype(np.float32)
    return probs[None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n, cs = args.size, args.chunk

    t0 = time.perf_counter()
    probs = synthetic_probs(n, args.seed)
    valid = np.ones((n, n), bool)
    mask = probs[0] >= 0.5
    print(f"mask {n}x{n}: {mask.mean():.1%} foreground, built in {time.perf_counter() - t0:.1f}s")
    mpx = n * n / 1e6

    # baseline: whole image, geometry only
    t0 = time.perf_counter()
    base = [g for g, _ in shapes(mask.view(np.uint8), mask=mask, connectivity=4)]
    t_base = time.perf_counter() - t0

    # geoseg, one chunk = the whole image (geometry + stats)
    t0 = time.perf_counter()
    whole = polygonize_chunk(probs, valid, 0, 0, [0.5])
    t_whole = time.perf_counter() - t0

    # geoseg, chunked
    t0 = time.perf_counter()
    pieces, regions = [], []
    for r in range(0, n, cs):
        for c in range(0, n, cs):
            h, w = min(cs, n - r), min(cs, n - c)
            pieces.append(polygonize_chunk(probs[:, r:r + h, c:c + w], valid[r:r + h, c:c + w], r, c, [0.5]))
            regions.append((r, c, h, w))
    t_poly = time.perf_counter() - t0
    n_raw = sum(len(p) for p in pieces)
    t0 = time.perf_counter()
    merged = merge_seams(pieces, regions)
    t_merge = time.perf_counter() - t0
    t_chunked = t_poly + t_merge

    ok = (len(merged) == len(base) == len(whole) and merged.n_px.sum() == mask.sum()
          and np.array_equal(np.sort(merged.n_px), np.sort(whole.n_px)))

    rows = [
        ("baseline shapes(), whole image", t_base, len(base)),
        ("polygonize_chunk, whole image", t_whole, len(whole)),
        (f"polygonize_chunk x{len(regions)} ({cs}px)", t_poly, n_raw),
        ("merge_seams alone", t_merge, len(merged)),
        (f"chunked total ({cs}px)", t_chunked, len(merged)),
    ]
    print(f"\n{'stage':<36}{'time s':>9}{'Mpx/s':>9}{'polygons':>10}{'poly/s':>11}")
    for name, t, k in rows:
        print(f"{name:<36}{t:>9.2f}{mpx / t:>9.1f}{k:>10d}{k / t:>11.0f}")
    print(f"\nchunked total / baseline time: {t_chunked / t_base:.2f}x "
          f"(throughput ratio chunked/baseline {t_base / t_chunked:.2f})")
    print(f"seam merge share of chunked time: {t_merge / t_chunked:.1%}; "
          f"pieces before merge {n_raw}, after {len(merged)}")
    print(f"result matches whole-image polygonize: {ok}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
