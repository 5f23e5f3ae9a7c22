"""The GeoPackage R-tree spatial index, bulk-built after the features are written, in bounded memory.

Why not let GDAL build it: GDAL builds a GeoPackage's R-tree in memory while a write session runs
and copies it into the file at the end, 50-70 bytes a row (``bench/bench_rtree.py``). For the 17.7
M polygons of a 16384² speckle run that is about 1 GB, growing with the object count, while the
worker processes are still alive. Capping it (``OGR_GPKG_MAX_RAM_USAGE_RTREE=0``) makes GDAL insert
row by row: 59 s for 8 M rows against 21 s without an index, and it still grew to 307 MiB.
SQLite's own row-by-row insert costs 16 µs a row. Packing costs 2.6 µs a row, against GDAL's 0.55.
So the streamed output is written without an index and :func:`build_rtree` packs one afterwards.
It reads each row's envelope from its GeoPackage geometry header, a window of rows at a time; sorts
each window into Sort-Tile-Recursive order; and writes the full leaf nodes straight into the
R-tree's shadow tables (``_node``, ``_rowid``, ``_parent``, in SQLite's documented node format).
Only the leaves' boxes stay in memory, 1/51 of the rows, to pack the upper levels the same way.

The rtree virtual table, its triggers and the ``gpkg_extensions`` row are copied from an empty
layer GDAL itself creates with the same names, so the file is what GDAL would have written, with
a tree SQLite's ``rtreecheck`` accepts (tested) and GDAL and QGIS query through.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import shapely

from .progress import progress_bar

#: Rows read and packed at a time: bounded memory, and leaves local to their part of the raster.
WINDOW = 1 << 16
_CELL = np.dtype([("id", ">i8"), ("box", ">f4", 4)])  # an R-tree cell: rowid, minx maxx miny maxy


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _gdal_rtree_sql(layer: str, geom_col: str, fid_col: str, version: int) -> tuple[list[str], str, list[tuple]]:
    """The statements that make layer ``layer``'s R-tree (virtual table first, then its triggers),
    the ``gpkg_extensions`` table and its rows, as the GDAL at hand writes them for an empty layer
    with the same names in a GeoPackage of the same version (1.2 and 1.4 differ in triggers)."""
    import pyarrow as pa
    import pyogrio

    schema = pa.schema([("geometry", pa.binary())])
    with tempfile.TemporaryDirectory(prefix="geoseg-rtree-") as tmp:
        path = Path(tmp) / "template.gpkg"
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, iter(())), path, layer=layer,
                            driver="GPKG", geometry_name="geometry", geometry_type="Polygon", crs="EPSG:4326",
                            layer_options={"SPATIAL_INDEX": "YES", "GEOMETRY_NAME": geom_col, "FID": fid_col},
                            dataset_options={"VERSION": f"{version // 10000}.{version // 100 % 100}"})
        with closing(sqlite3.connect(path)) as con:
            rtree = f"rtree_{layer}_{geom_col}"
            table = con.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (rtree,)).fetchall()
            triggers = con.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? "
                                   "AND name LIKE ? ESCAPE '\\' ORDER BY name",
                                   (layer, rtree.replace("_", "\\_") + "\\_%")).fetchall()
            ext_table = con.execute("SELECT sql FROM sqlite_master WHERE name = 'gpkg_extensions'").fetchone()
            ext = con.execute("SELECT * FROM gpkg_extensions WHERE extension_name = 'gpkg_rtree_index'"
                              ).fetchall()
    if len(table) != 1 or not triggers or len(ext) != 1:
        raise RuntimeError(f"internal error: GDAL wrote no R-tree for an empty layer {layer!r}")
    return [table[0][0]] + [t[0] for t in triggers], ext_table[0], ext


def envelopes(rows: list[tuple[int, bytes]], con: sqlite3.Connection, table: str, geom_col: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(fid, [minx, maxx, miny, maxy])`` of rows ``(fid, first 40 bytes of the geometry blob)``,
    from the GeoPackage binary header's envelope; empty geometries are dropped (GeoPackage's R-tree
    holds none). A geometry written without an envelope is read whole and measured."""
    n = len(rows)
    fids, blobs = zip(*rows)
    fid = np.array(fids, np.int64)
    joined = b"".join(blobs)
    if len(joined) != 40 * n:  # some are shorter: no envelope (points, empties)
        joined = b"".join(b.ljust(40, b"\0") for b in blobs)
    head = np.frombuffer(joined, np.uint8).reshape(n, 40)
    if not (head[:, 0] == ord("G")).all() or not (head[:, 1] == ord("P")).all():
        raise ValueError(f"{table}.{geom_col}: not GeoPackage geometry blobs")
    flags = head[:, 3]
    little, kind, empty = (flags & 1).astype(bool), (flags >> 1) & 7, ((flags >> 4) & 1).astype(bool)
    if (kind > 4).any():
        raise ValueError(f"{table}.{geom_col}: invalid GeoPackage envelope indicator {int(kind.max())}")
    raw = np.ascontiguousarray(head[:, 8:40])
    env = np.where(little[:, None], raw.view("<f8"), raw.view(">f8"))
    empty |= (kind > 0) & np.isnan(env).any(axis=1)  # the spec's other way to say empty
    for i in np.flatnonzero((kind == 0) & ~empty):  # no envelope in the header: measure the geometry
        blob = con.execute(f"SELECT {_quote(geom_col)} FROM {_quote(table)} WHERE rowid = ?",
                           (int(fid[i]),)).fetchone()[0]
        geom = shapely.from_wkb(bytes(blob[8:]))
        if shapely.is_empty(geom):
            empty[i] = True
        else:
            x0, y0, x1, y1 = shapely.bounds(geom)
            env[i] = (x0, x1, y0, y1)
    keep = ~empty
    return fid[keep], env[keep]


def float32_box(env: np.ndarray) -> np.ndarray:
    """Boxes in float32 that contain the float64 ones, as SQLite's R-tree stores them: minima
    rounded down, maxima up."""
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, which still contains
        box = env.astype(np.float32)
        lo, hi = box[:, [0, 2]], box[:, [1, 3]]
        lo[:] = np.where(lo > env[:, [0, 2]], np.nextafter(lo, np.float32(-np.inf)), lo)
        hi[:] = np.where(hi < env[:, [1, 3]], np.nextafter(hi, np.float32(np.inf)), hi)
    box[:, [0, 2]], box[:, [1, 3]] = lo, hi
    return box


def str_order(box: np.ndarray, capacity: int) -> np.ndarray:
    """Sort-Tile-Recursive order (Leutenegger et al. 1997): vertical slices by box centre x, each
    sorted by centre y, so that every run of ``capacity`` boxes is compact."""
    n = len(box)
    slices = math.ceil(math.sqrt(math.ceil(n / capacity)))
    cx, cy = box[:, 0] + box[:, 1], box[:, 2] + box[:, 3]  # doubled centres: the order is the same
    by_x = np.argsort(cx, kind="stable")
    slice_of = np.arange(n) // (slices * capacity)
    return by_x[np.lexsort((cy[by_x], slice_of))]


def _nodes(ids: np.ndarray, box: np.ndarray, capacity: int, node_size: int, depth: int = 0) -> list[bytes]:
    """Node blobs holding cells ``(ids[i], box[i])``, ``capacity`` to a node, in order. Format: a
    big-endian u16 depth (read at the root only) and u16 cell count, then 24-byte cells."""
    n_nodes = math.ceil(len(ids) / capacity)
    cells = np.zeros(n_nodes * capacity, _CELL)
    cells["id"][:len(ids)], cells["box"][:len(ids)] = ids, box
    data = np.zeros((n_nodes, node_size), np.uint8)
    head = np.zeros((n_nodes, 2), ">u2")
    head[:, 0] = depth
    head[:, 1] = capacity
    head[-1, 1] = len(ids) - (n_nodes - 1) * capacity
    data[:, :4] = head.view(np.uint8).reshape(n_nodes, 4)
    data[:, 4:4 + capacity * _CELL.itemsize] = cells.view(np.uint8).reshape(n_nodes, -1)
    return [row.tobytes() for row in data]


def _windows(con: sqlite3.Connection, table: str, geom_col: str) -> Iterator[list[tuple[int, bytes]]]:
    cur = con.execute(f"SELECT rowid, substr({_quote(geom_col)}, 1, 40) FROM {_quote(table)} "
                      f"WHERE {_quote(geom_col)} IS NOT NULL ORDER BY rowid")
    while rows := cur.fetchmany(WINDOW):
        yield rows


def build_rtree(path: Path | str, layer: str, progress: bool = False) -> int:
    """Add the GeoPackage R-tree spatial index of ``layer`` (written without one) to ``path``;
    returns the number of boxes indexed.

    For a file being built and not yet in place: no rollback journal is kept, so a crash leaves
    the file unusable (the caller's temporary copy is discarded).
    """
    path = Path(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        geom_col = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                               (layer,)).fetchone()
        if geom_col is None:
            raise ValueError(f"{path}: no feature layer {layer!r}")
        geom_col = geom_col[0]
        rtree = f"rtree_{layer}_{geom_col}"
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone():
            raise ValueError(f"{path}: layer {layer!r} has a spatial index already")
        fid_col = next(r[1] for r in con.execute(f"PRAGMA table_info({_quote(layer)})") if r[5] == 1)
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version < 10200:  # 1.0/1.1 files keep no version here, and their triggers differ
            raise ValueError(f"{path}: GeoPackage older than 1.2 (user_version {version})")
        statements, extension_table, extension = _gdal_rtree_sql(layer, geom_col, fid_col, version)
        total = con.execute(f"SELECT max(rowid) FROM {_quote(layer)}").fetchone()[0] or 0  # O(log n)
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN")
        con.execute(statements[0])  # the virtual table: SQLite writes an empty root, node 1
        node = _quote(rtree + "_node")
        node_size = con.execute(f"SELECT length(data) FROM {node} WHERE nodeno = 1").fetchone()[0]
        capacity = (node_size - 4) // _CELL.itemsize
        put_node = f"INSERT INTO {node} VALUES (?, ?)"
        put_rowid = f"INSERT INTO {_quote(rtree + '_rowid')} VALUES (?, ?)"
        put_parent = f"INSERT INTO {_quote(rtree + '_parent')} VALUES (?, ?)"

        next_node = 2

        def pack(ids: np.ndarray, box: np.ndarray, link: str) -> tuple[np.ndarray, np.ndarray]:
            """Write cells ``(ids, box)`` in STR order as new full nodes, each cell's id linked to
            its node (``link``: the ``_rowid`` or ``_parent`` insert); return the nodes and boxes."""
            nonlocal next_node
            order = str_order(box, capacity)
            ids, box = ids[order], box[order]
            blobs = _nodes(ids, box, capacity, node_size)
            nodeno = np.arange(next_node, next_node + len(blobs))
            next_node += len(blobs)
            con.executemany(put_node, zip(nodeno.tolist(), blobs))
            con.executemany(link, zip(ids.tolist(), np.repeat(nodeno, capacity)[:len(ids)].tolist()))
            return nodeno, _node_boxes(box, capacity)

        level_ids, level_box = [], []  # the leaves: node numbers and boxes
        indexed = 0
        with progress_bar(total=total, desc="spatial index", unit="row", disable=not progress) as bar:
            for rows in _windows(con, layer, geom_col):
                fid, env = envelopes(rows, con, layer, geom_col)
                bar.update(rows[-1][0] - bar.n)  # rowids done, as the total counts them
                if len(fid):
                    nodes, boxes = pack(fid, float32_box(env), put_rowid)
                    level_ids.append(nodes)
                    level_box.append(boxes)
                    indexed += len(fid)
        if next_node == 3:  # one leaf: it is the root (SQLite never makes a root with one child)
            con.execute(f"UPDATE {node} SET data = (SELECT data FROM {node} WHERE nodeno = 2) WHERE nodeno = 1")
            con.execute(f"DELETE FROM {node} WHERE nodeno = 2")
            con.execute(f"UPDATE {_quote(rtree + '_rowid')} SET nodeno = 1")
        elif indexed:
            ids, box = np.concatenate(level_ids), np.concatenate(level_box)
            depth = 1
            while len(ids) > capacity:  # pack the level above, until it fits in the root
                ids, box = pack(ids, box, put_parent)
                depth += 1
            con.execute(f"UPDATE {node} SET data = ? WHERE nodeno = 1",
                        (_nodes(ids, box, capacity, node_size, depth)[0],))
            con.executemany(put_parent, ((int(i), 1) for i in ids))
        for sql in statements[1:]:
            con.execute(sql)
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'gpkg_extensions'").fetchone():
            con.execute(extension_table)
        con.executemany(f"INSERT OR REPLACE INTO gpkg_extensions VALUES ({', '.join('?' * len(extension[0]))})",
                        extension)
        con.execute("COMMIT")
    return indexed


def _node_boxes(box: np.ndarray, capacity: int) -> np.ndarray:
    """The box of each node of ``capacity`` consecutive cells (exact: min and max of float32s)."""
    n_nodes = math.ceil(len(box) / capacity)
    starts = np.arange(n_nodes) * capacity
    return np.stack([np.minimum.reduceat(box[:, 0], starts), np.maximum.reduceat(box[:, 1], starts),
                     np.minimum.reduceat(box[:, 2], starts), np.maximum.reduceat(box[:, 3], starts)], axis=1)
