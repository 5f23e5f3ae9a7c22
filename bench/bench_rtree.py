"""Benchmark the GeoPackage spatial index: GDAL's in-memory build against geoseg's bulk packing.

For each row count, three fresh child processes write the same boxes (a square grid, rows in
raster order, as geoseg's output comes) in one ``pyogrio.write_arrow`` session, 20,000 rows a
batch, and report wall time and peak RSS (``ru_maxrss``):

* ``gdal``     -- ``SPATIAL_INDEX=YES``: GDAL fills its R-tree in memory while rows are written;
* ``none``     -- ``SPATIAL_INDEX=NO``: the write alone;
* ``geoseg``   -- ``SPATIAL_INDEX=NO``, then ``geoseg.gpkg_rtree.build_rtree`` in the same process.

Then it checks that both indexed files answer the same window queries (the corners are exact
in float32, so both trees hold the same boxes; elsewhere GDAL rounds outward by more). Usage::

    python bench/bench_rtree.py                    # 1 M, 4 M, 8 M rows
    python bench/bench_rtree.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = 20_000


def child(mode: str, n: int, path: Path) -> dict:
    import pyarrow as pa
    import pyogrio
    import shapely

    side = int(np.ceil(np.sqrt(n)))
    schema = pa.schema([("area", pa.float64()), ("geometry", pa.binary())])

    def batches():
        for start in range(0, n, BATCH):
            i = np.arange(start, min(n, start + BATCH))
            x, y = (i % side) * 3.0 + 500_000.25, 5_000_000.5 - (i // side) * 3.0  # exact in float32
            geoms = shapely.to_wkb(shapely.multipolygons(shapely.box(x, y - 2, x + 2, y)[:, None]))
            yield pa.record_batch([pa.array(np.full(len(i), 4.0)), pa.array(geoms, pa.binary())], schema=schema)

    start = time.perf_counter()
    pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, batches()), path, layer="p", driver="GPKG",
                        geometry_name="geometry", geometry_type="MultiPolygon", crs="EPSG:32633",
                        layer_options={"SPATIAL_INDEX": "YES" if mode == "gdal" else "NO",
                                       "GEOMETRY_NAME": "geom", "FID": "fid"},
                        dataset_options={"VERSION": "1.2"})
    written = time.perf_counter() - start
    if mode == "geoseg":
        from geoseg.gpkg_rtree import build_rtree

        build_rtree(path, "p")
    return {"wall": time.perf_counter() - start, "write": written,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def same_answers(a: Path, b: Path, n: int, queries: int = 200) -> bool:
    side = np.sqrt(n) * 3.0
    rng = np.random.default_rng(0)
    sql = "SELECT id FROM rtree_p_geom WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ? ORDER BY id"
    with closing(sqlite3.connect(a)) as ca, closing(sqlite3.connect(b)) as cb:
        for _ in range(queries):
            x0, y0 = 500_000 + rng.uniform(0, side), 5_000_000 - rng.uniform(0, side)
            args = (x0 + 300, x0, y0 + 300, y0)
            if ca.execute(sql, args).fetchall() != cb.execute(sql, args).fetchall():
                return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,4000000,8000000")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, Path(args.path))))
        return

    print("| rows | mode | wall s | of which write s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-rtree-") as tmp:
        for n in (int(r) for r in args.rows.split(",")):
            res, paths = {}, {}
            for mode in ("gdal", "none", "geoseg"):
                paths[mode] = Path(tmp) / f"{mode}_{n}.gpkg"
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n),
                                      "--path", str(paths[mode])], capture_output=True, text=True, check=True)
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                r = res[mode]
                print(f"| {n:,} | {mode} | {r['wall']:.1f} | {r['write']:.1f} | {r['rss']:,.0f} |", flush=True)
            g, o = res["gdal"], res["geoseg"]
            print(f"{n:,} rows: geoseg / GDAL peak RSS {o['rss'] / g['rss']:.2f}, wall {o['wall'] / g['wall']:.2f}; "
                  f"same query answers: {same_answers(paths['gdal'], paths['geoseg'], n)}", flush=True)
            for p in paths.values():
                p.unlink()


if __name__ == "__main__":
    main()
