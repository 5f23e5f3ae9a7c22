"""Polygons streamed to the output as chunks finish: memory follows the chunk and the seams, not the objects.

A chunk's pieces that touch no *seam* (a chunk border shared with another chunk; the raster's own
edge is not one) can never be merged with another chunk's piece, so with per-polygon options they
are already final. The chunk task (:func:`write_chunk_polygons`) finalizes them itself, in the
same canonical form and order :func:`geoseg.pieces.merge_seams` gives them, and saves them as an
Arrow table (``parts/<chunk>.polygons.parquet``); only the seam-touching pieces are kept as pixel
pieces (``parts/<chunk>.seam``). The client (:func:`assemble_polygons`) appends the chunks' tables
to the output **in chunk order** as they become available, then merges the seam pieces, finalizes
them and appends them last, and only then builds the spatial index once.

Which rule keeps this exact
---------------------------
``finalize`` is per polygon for the affine transform, ``min_area``, the measures, the attributes and
reprojection: a final piece gives the same row in the chunk as in one global ``finalize``. Hole
filling (island absorption) and coverage simplification are not per polygon: a piece's result can
depend on pieces of another chunk (a ring closed across a seam makes a new hole that may swallow an
island far from the seam; the coverage simplifier checks other polygons' vertices inside the
triangles it removes, and a merged polygon's triangles can reach into another chunk). So when
``fill_holes`` or ``simplify`` is set, **every** piece is deferred to the client and finalized there
in one call, exactly as before: correct by construction, but the client's memory then grows with
the object count (see bench/README.md; a bounded variant is future work).

Row order
---------
Chunk by chunk in the plan's order (within a chunk, merge_seams' canonical order), then the seam
polygons in canonical order. The file is therefore the same however often a run was interrupted;
with another chunk size the same features come in another row order.

Resume
------
Chunk parts are written atomically before the chunk's done-record, so a finished chunk's polygons
are on disk. The output is written under a hidden temp name and renamed only when complete (index
and style included); a client killed mid-write leaves only that temp file, which the next run
deletes before rebuilding the output from the parts: no polygon is lost or written twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from .atomic import atomic_target
from .pieces import Pieces, merge_seams, read_pieces, write_pieces
from .polygons import OUTPUT_COLUMNS, finalize
from .tiling import Region

log = logging.getLogger(__name__)

#: Rows finalized and written at a time: bounds the memory of one chunk's final polygons.
BATCH_ROWS = 200_000
#: Suffixes of a chunk's vector parts in ``parts/``.
FINAL_SUFFIX = ".polygons.parquet"
SEAM_SUFFIX = ".seam"


@dataclass(frozen=True)
class VectorJob:
    """Everything needed to turn one chunk's pieces into output rows; small and picklable."""

    prompts: tuple[str, ...]
    thresholds: tuple[float, ...]
    transform: tuple[float, ...]
    crs: str | None
    height: int
    width: int
    min_area: float = 0.0
    fill_holes: float = 0.0
    simplify: float = 0.0
    dst_crs: str | None = None
    vector_format: str = "gpkg"
    #: The pieces are a class map's (``--classes``): finalized as one coverage, noded across classes.
    exclusive: bool = False

    @property
    def per_polygon(self) -> bool:
        """True when every finalize step is per polygon, so interior pieces are final in their chunk.

        Hole filling, simplify and a class map's shared-edge noding look at neighbouring polygons, so
        with any of them every piece goes to the client and is finalized there in one call (exact,
        but client memory then follows the object count)."""
        return self.fill_holes == 0 and self.simplify == 0 and not self.exclusive

    def key(self) -> str:
        """Hash of the options: a chunk part made with another key must be made again."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def crs_out(self) -> Any:
        """The CRS the rows are written in."""
        return self.dst_crs if self.dst_crs is not None else self.crs

    def finalize(self, pieces: Pieces):
        from affine import Affine

        return finalize(pieces, Affine(*self.transform), self.crs, self.prompts, self.thresholds,
                        min_area=self.min_area, fill_holes=self.fill_holes, simplify=self.simplify,
                        dst_crs=self.dst_crs, exclusive=self.exclusive)


def touches_seam(pieces: Pieces, region: Region, height: int, width: int) -> np.ndarray:
    """Pieces whose bounding box reaches a border of ``region`` that another chunk shares."""
    if len(pieces) == 0:
        return np.zeros(0, bool)
    b = shapely.bounds(pieces.geometry)
    return (((b[:, 0] == region.col) & (region.col > 0))
            | ((b[:, 2] == region.col_stop) & (region.col_stop < width))
            | ((b[:, 1] == region.row) & (region.row > 0))
            | ((b[:, 3] == region.row_stop) & (region.row_stop < height)))


def _take(pieces: Pieces, sel: np.ndarray | slice) -> Pieces:
    return Pieces(pieces.prompt_index[sel], pieces.geometry[sel], pieces.n_px[sel], pieces.sum_p[sel],
                  pieces.max_p[sel])


def split_final(pieces: Pieces, region: Region, job: VectorJob) -> tuple[Pieces, Pieces]:
    """(final, deferred): final pieces in canonical form and order; deferred ones go to the client."""
    if not job.per_polygon:
        return Pieces.empty(), pieces
    seam = touches_seam(pieces, region, job.height, job.width)
    final = merge_seams([_take(pieces, ~seam)], [(region.row, region.col, region.height, region.width)])
    return final, _take(pieces, seam)


def to_arrow(gdf, vector_format: str):
    """A finalized GeoDataFrame as an Arrow table (GeoParquet metadata; MultiPolygon for GeoPackage)."""
    from geopandas.io.arrow import _geopandas_to_arrow

    if vector_format == "gpkg" and len(gdf):
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
        if single.any():  # the old writer's promote_to_multi, done here (in parallel chunk tasks)
            geoms = geoms.copy()
            idx = np.flatnonzero(single)
            geoms[idx] = shapely.multipolygons(geoms[idx], indices=np.arange(len(idx)))
            gdf = gdf.set_geometry(geoms, crs=gdf.crs)
    table = _geopandas_to_arrow(gdf.reset_index(drop=True), index=False)
    return table.cast(_schema().with_metadata(table.schema.metadata))


def _schema() -> Any:
    """The output columns' Arrow types (fixed, so an empty chunk's table has them too)."""
    import pyarrow as pa

    types = {"prompt": pa.string(), "prompt_index": pa.int32(), "threshold": pa.float64(),
             "mean_prob": pa.float64(), "max_prob": pa.float32(), "pixels": pa.int64(),
             "area_m2": pa.float64(), "perimeter_m": pa.float64(), "n_holes": pa.int32(),
             "compactness": pa.float64()}
    return pa.schema([pa.field(c, types[c]) for c in OUTPUT_COLUMNS] + [pa.field("geometry", pa.binary())])


def finalized_tables(pieces: Pieces, job: VectorJob) -> Iterator[Any]:
    """``job.finalize`` over ``pieces`` in slices of :data:`BATCH_ROWS` (per-polygon options only,
    where slicing cannot change a row), as Arrow tables; all at once otherwise."""
    step = BATCH_ROWS if job.per_polygon else max(len(pieces), 1)
    for start in range(0, max(len(pieces), 1), step):
        gdf = job.finalize(_take(pieces, slice(start, start + step)))
        if len(gdf):
            yield to_arrow(gdf, job.vector_format)


def write_chunk_polygons(run_dir: Path | str, name: str, pieces: Pieces, region: Region, job: VectorJob) -> int:
    """In the chunk task: finalize the chunk's final pieces into its parquet part and keep the
    seam pieces for the client, both atomically. Returns the number of final rows."""
    import pyarrow.parquet as pq

    from .rundir import part_path

    final, deferred = split_final(pieces, region, job)
    write_pieces(part_path(run_dir, name, SEAM_SUFFIX), deferred)
    rows = 0
    with atomic_target(part_path(run_dir, name, FINAL_SUFFIX)) as tmp:
        writer = None
        for table in finalized_tables(final, job):
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            empty = to_arrow(job.finalize(Pieces.empty()), job.vector_format)
            pq.write_table(empty, tmp)
        else:
            writer.close()
    return rows


# -- the output file ----------------------------------------------------------------------------


class _GpkgStream:
    """One GDAL write session fed batch by batch: ``pyogrio.write_arrow`` reads a RecordBatchReader
    whose batches a background thread takes from a queue. One session lets GDAL insert in large
    transactions and build the R-tree once, in bulk, when the session ends (appending with
    ``append=True`` instead goes through the R-tree triggers: 8x slower, measured)."""

    def __init__(self, path: Path, schema: Any, layer: str, crs: Any):
        import pyarrow as pa
        import pyogrio

        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        schema = schema.remove_metadata()

        def batches():
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item.cast(schema).to_batches()

        def run():
            try:
                pyogrio.write_arrow(
                    pa.RecordBatchReader.from_batches(schema, batches()), path, layer=layer, driver="GPKG",
                    geometry_name="geometry", geometry_type="MultiPolygon", crs=crs,
                    layer_options={"SPATIAL_INDEX": "YES", "GEOMETRY_NAME": "geom", "FID": "fid"},
                    # GeoPackage 1.2, as write_vector writes (QGIS 3.22 / GDAL 3.6 read it cleanly)
                    dataset_options={"VERSION": "1.2"})
            except BaseException as exc:  # re-raised in the client thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="geoseg-gpkg-writer", daemon=True)
        self._thread.start()

    def write(self, table: Any) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(table, timeout=0.5)
                return
            except queue.Full:
                continue
        self._raise()

    def close(self, abort: bool = False) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(RuntimeError("aborted") if abort else None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        if not abort:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _ParquetStream:
    """GeoParquet, one row group per batch (``pyarrow.parquet.ParquetWriter``)."""

    def __init__(self, path: Path, schema: Any):
        import pyarrow.parquet as pq

        meta = dict(schema.metadata or {})
        geo = json.loads(meta.get(b"geo", b"{}"))
        for col in geo.get("columns", {}).values():
            col.pop("bbox", None)  # the first batch's bbox would be wrong for the file
        meta[b"geo"] = json.dumps(geo).encode()
        self.schema = schema.with_metadata(meta)
        self._writer = pq.ParquetWriter(path, self.schema)

    def write(self, table: Any) -> None:
        self._writer.write_table(table.cast(self.schema))

    def close(self, abort: bool = False) -> None:
        self._writer.close()


@contextlib.contextmanager
def ticking(desc: str, enabled: bool, size_of: Callable[[], int] | None = None) -> Iterator[None]:
    """A progress line that ticks (elapsed time, bytes written so far) while a long step with no
    progress report of its own runs: the COG copy, the R-tree build. Never silent for minutes."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(total=None, desc=desc, unit="s", bar_format="{desc}: {elapsed} {postfix}")

    def tick():
        while not stop.wait(1.0):
            if size_of is not None:
                bar.set_postfix_str(f"{size_of() / 2**20:.0f} MiB written", refresh=False)
            bar.update(1)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed writer of ``path`` left (``atomic_target`` names them
    ``.<stem>.tmp-<pid>-<id><suffix>``, plus SQLite's -journal/-wal/-shm)."""
    for stale in path.parent.glob(f".{path.stem}.tmp-*"):
        stale.unlink(missing_ok=True)


TableSource = Callable[[], Iterable[Any]]
SeamSource = Callable[[], Pieces]


def part_tables(path: Path) -> TableSource:
    """A chunk part's final rows, one row group at a time (bounded memory)."""
    def read() -> Iterator[Any]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i)
    return read


def part_seams(path: Path) -> SeamSource:
    return lambda: read_pieces(path)


class PolygonOutput:
    """The output being built: chunk tables appended in chunk order as they become available, the
    seam polygons last, then the spatial index and the default style; renamed into place only
    when complete.

    Use as a context manager; call :meth:`add` once per chunk (any order) and :meth:`finish`.
    """

    def __init__(self, path: Path, regions: Sequence[Region], job: VectorJob, progress: bool = False):
        self.path = Path(path)
        self.regions = list(regions)
        self.job = job
        self.progress = progress
        self.features = 0
        self._order = [r.name for r in self.regions]
        self._next = 0
        self._ready: dict[str, tuple[TableSource, SeamSource]] = {}
        self._seams: list[SeamSource] = []

    def __enter__(self) -> PolygonOutput:
        remove_stale_temps(self.path)
        self._target = atomic_target(self.path)
        self._tmp = self._target.__enter__()
        schema = to_arrow(self.job.finalize(Pieces.empty()), self.job.vector_format).schema
        if self.job.vector_format == "gpkg":
            self._writer: Any = _GpkgStream(self._tmp, schema, "segments", self.job.crs_out)
        else:
            self._writer = _ParquetStream(self._tmp, schema)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._writer.close(abort=True)
        self._target.__exit__(exc_type, exc, tb)

    def add(self, name: str, tables: TableSource, seams: SeamSource) -> None:
        """Chunk ``name`` is finished: append it, and any chunks after it that were waiting."""
        self._ready[name] = (tables, seams)
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            tables, seams = self._ready.pop(self._order[self._next])
            for table in tables():
                self._writer.write(table)
                self.features += table.num_rows
            self._seams.append(seams)
            self._next += 1

    def finish(self) -> int:
        """Merge and append the seam polygons, build the index and style; returns the row count."""
        if self._next != len(self._order):
            missing = self._order[self._next]
            raise RuntimeError(f"internal error: chunk {missing} was never added to the polygon output")
        with ticking("seam polygons", self.progress):
            seam_pieces = [load() for load in self._seams]
            merged = merge_seams(seam_pieces, [(r.row, r.col, r.height, r.width) for r in self.regions])
            del seam_pieces
            for table in finalized_tables(merged, self.job):
                self._writer.write(table)
                self.features += table.num_rows
        size = lambda: self._tmp.stat().st_size if self._tmp.exists() else 0  # noqa: E731
        with ticking("spatial index" if self.job.vector_format == "gpkg" else "closing", self.progress, size):
            self._writer.close()
        if self.job.vector_format == "gpkg":
            from .export import _write_layer_styles

            _write_layer_styles(self._tmp, "segments", "geom", list(self.job.prompts))
        return self.features
