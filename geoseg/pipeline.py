"""Builds and runs the chunk tasks; the same stage functions serve local and distributed runs.

Each chunk is three Dask tasks: :func:`read_chunk` opens its own rasterio handle and reads its halo
window; :func:`infer_chunk` runs every tile of the global grid touching the chunk through the model
(the only task that holds a GPU); :func:`finish_chunk` blends, writes the probability part
atomically, polygonizes the chunk's own region and returns a small :class:`ChunkResult` (metadata,
never pixel arrays). The client keeps a bounded number of chunks in flight, skips chunks a previous
run finished, then assembles the COG and the polygons.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import __version__
from .blend import accumulate, new_accumulators, normalise
from .config import SegmentConfig, VectorizeConfig
from .atomic import write_json_atomic
from .errors import ChunkFailedError, GeosegError, NotARunError, OutputExistsError, first_line
from .export import write_vector
from .model import SegmenterFactory, TensorSegmenter, cached_segmenter, clipseg_factory, encode_prompts
from .raster import (RasterInfo, bounded_gdal_cache, inspect_raster, open_input, read_window, stretch_table,
                     to_model_rgb, write_cog, write_part, write_vrt)
from .tiling import Region, aligned_chunk, chunk_regions, halo, tile_weights, tiles_touching
from .vectorize import finalize, merge_seams, polygonize_chunk, read_pieces, write_pieces

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROBABILITIES = "probabilities.tif"
PARTS = "parts"
#: Names geoseg owns inside a run directory; --overwrite removes only these.
#: Tiles per model call on the host path when no --batch-size is given.
HOST_BATCH = 8
OWNED = (MANIFEST, PROBABILITIES, PARTS, "polygons.gpkg", "polygons.parquet", "probabilities.vrt")


@dataclass(frozen=True)
class ChunkJob:
    """Everything one chunk task needs; small and picklable."""

    region: Region
    info: RasterInfo
    prompts: tuple[str, ...]
    thresholds: tuple[float, ...]
    tile_size: int
    stride: int
    batch_size: int | None  # None: sized to device memory (CUDA) or 8
    run_dir: str
    fingerprint: str
    factory: Any

    def path(self, suffix: str) -> Path:
        return Path(self.run_dir) / PARTS / f"{self.region.name}{suffix}"


@dataclass(frozen=True)
class ChunkResult:
    """What a chunk task returns to the client: metadata only."""

    name: str
    region: Region
    tiles: int
    model_tiles: int
    pieces: int
    seconds: float
    worker: str
    model_revision: str | None = None


# -- stage functions -----------------------------------------------------------------------------

def plan_chunks(info: RasterInfo, chunk_size: int) -> list[Region]:
    """Chunk regions aligned to the file's internal blocks (native grid only)."""
    bh, bw = info.block if not info.resampled else (0, 0)
    return chunk_regions(info.height, info.width, aligned_chunk(chunk_size, bh), aligned_chunk(chunk_size, bw))


@dataclass(frozen=True)
class ChunkTiles:
    """Output of the read stage: the chunk's model input. Stays in worker memory between tasks.

    The halo is kept as raw band values (bytes for most imagery) and converted to the model's
    float input one batch of tiles at a time, so a 4096² chunk holds ~70 MB here, not ~430 MB.
    """

    tiles: tuple[Region, ...]  # the global-grid tiles that reach the model (not fully masked)
    window: Region             # the halo window the arrays cover
    data: np.ndarray           # (B, h, w) raw model bands of the halo
    valid: np.ndarray          # (h, w) valid mask of the halo
    touching: int              # tiles touching the chunk, masked ones included
    seconds: float

    def batches(self, info: RasterInfo, batch_size: int) -> Iterator[np.ndarray]:
        """(n, 3, T, T) float32 0..1 model input, zero-padded beyond the raster and where masked."""
        for i in range(0, len(self.tiles), batch_size):
            batch = self.tiles[i:i + batch_size]
            out = np.zeros((len(batch), 3, batch[0].height, batch[0].width), np.float32)
            for k, t in enumerate(batch):
                inside = t.intersection(self.window)
                src = (slice(None), *inside.slices(within=self.window))
                rgb, _ = to_model_rgb(self.data[src], self.valid[src[1:]], info)
                out[(k, slice(None), *inside.slices(within=t))] = rgb
            yield out


@dataclass(frozen=True)
class ChunkInference:
    """Output of the inference stage: the chunk's blended probabilities and where they were computed."""

    probs: np.ndarray          # (P, h, w) float32 over the chunk's own region, NaN where masked
    worker: str
    model_revision: str | None
    seconds: float


def read_chunk(job: ChunkJob) -> ChunkTiles:
    """CPU stage: read the chunk's halo window and list the tiles of the global grid touching it.

    Fully masked tiles are dropped here: they never reach the model.
    """
    start = time.perf_counter()
    region, info = job.region, job.info
    touching = tiles_touching(region, info.height, info.width, job.tile_size, job.stride)
    window = halo(touching, info.height, info.width)
    with bounded_gdal_cache(), open_input(info) as src:
        data, valid = read_window(src, info, window)
    tiles = tuple(t for t in touching if valid[t.intersection(window).slices(within=window)].any())
    return ChunkTiles(tiles, window, data, valid, len(touching), time.perf_counter() - start)


def infer_chunk(job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> ChunkInference:
    """GPU stage (the only one that carries ``resources={"GPU": 1}``): the model over the tiles and
    the blend. The process's model is loaded once and kept (``cached_segmenter``).

    A :class:`~geoseg.model.TensorSegmenter` (CLIPSeg) gets the device-resident path: the raw halo
    goes to its device once and only the blended chunk comes back. Other segmenters get numpy
    tiles, ``batch_size`` at a time, and are blended on the CPU; both give the same blend.
    """
    start = time.perf_counter()
    segmenter = cached_segmenter(job.factory)
    if isinstance(segmenter, TensorSegmenter):
        probs = device_blend(segmenter, job, tiles, embeddings)
    else:
        probs = host_blend(segmenter, job, tiles, embeddings)
    return ChunkInference(probs, f"{socket.gethostname()}:{os.getpid()}", getattr(segmenter, "revision", None),
                          time.perf_counter() - start)


def host_blend(segmenter, job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> np.ndarray:
    """Numpy tiles through ``segmenter.predict``, blended on the CPU: (P, h, w)."""
    n, batch = len(tiles.tiles), job.batch_size or HOST_BATCH
    probs = np.empty((n, len(job.prompts), job.tile_size, job.tile_size), np.float32)
    for i, x in zip(range(0, n, batch), tiles.batches(job.info, batch)):
        probs[i:i + len(x)] = segmenter.predict(x, embeddings)
    return blend_tiles(tiles, probs, job.region, job.info, job.tile_size, job.stride)


def blend_tiles(tiles: ChunkTiles, probs: np.ndarray, region: Region, info: RasterInfo, tile_size: int,
                stride: int) -> np.ndarray:
    """Tukey-weighted blend of the tiles' probabilities over ``region``, normalised by Σw (P, h, w)."""
    acc, wsum = new_accumulators(region, probs.shape[1])
    for t, p in zip(tiles.tiles, probs):
        accumulate(acc, wsum, region, t, p, tile_weights(t, info.height, info.width, tile_size, stride))
    return normalise(acc, wsum, tiles.valid[region.slices(within=tiles.window)])


def device_blend(segmenter, job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> np.ndarray:
    """The device-resident path (:mod:`geoseg.model.device_chunk`, imports torch): (P, h, w)."""
    from .model.device_chunk import ChunkInput, blend_chunk

    info = job.info
    table = stretch_table(info, tiles.data.dtype)
    data, valid = tiles.data, tiles.valid
    if table is None:  # float / 32-bit data: the stretch is arithmetic, done here on the host
        data, valid = to_model_rgb(data, valid, info)
    inp = ChunkInput(data, valid, table, info.palette is not None, tiles.window, tiles.tiles, job.region,
                     (info.height, info.width), job.tile_size, job.stride)
    return blend_chunk(segmenter, inp, embeddings, len(job.prompts), job.batch_size)


def finish_chunk(job: ChunkJob, tiles: ChunkTiles, inference: ChunkInference) -> ChunkResult:
    """CPU stage: blend, write the probability part, polygonize the chunk's own region, and write
    the done-record last (its presence is what makes the chunk count as finished)."""
    start = time.perf_counter()
    region = job.region
    probs = inference.probs
    with bounded_gdal_cache():
        write_part(job.path(".tif"), probs, job.info, region, job.prompts)
    own_valid = tiles.valid[region.slices(within=tiles.window)]
    pieces = polygonize_chunk(probs, own_valid, region.row, region.col, job.thresholds)
    write_pieces(job.path(".pieces"), pieces)
    seconds = tiles.seconds + inference.seconds + time.perf_counter() - start
    result = ChunkResult(name=region.name, region=region, tiles=tiles.touching, model_tiles=len(tiles.tiles),
                         pieces=len(pieces), seconds=round(seconds, 3), worker=inference.worker,
                         model_revision=inference.model_revision)
    write_json_atomic(job.path(".json"), {"fingerprint": job.fingerprint, **asdict(result)})
    return result


# -- run directory ---------------------------------------------------------------------------

def fingerprint(config: SegmentConfig, info: RasterInfo) -> str:
    """Hash of everything that determines the output pixels; equal hash = same job (resumable)."""
    stat = {}
    with contextlib.suppress(OSError):
        st = os.stat(config.input)
        stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    blob = json.dumps({**config.pixel_options(), **stat, "grid": [info.width, info.height]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, fp: str, overwrite: bool) -> set[str]:
    """Create or reuse the run directory; returns names of chunks a previous run finished.

    A directory holding a run of the same job is resumed. Anything else that exists is refused
    unless ``overwrite`` is set. ``overwrite`` always starts afresh, and removes only geoseg's own
    files: nothing a user made is deleted.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"{run_dir}: exists and is not a directory; choose another -o")
    manifest = run_dir / MANIFEST
    previous = None
    if manifest.exists():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(manifest.read_text()).get("fingerprint")
    busy = run_dir.exists() and any(run_dir.iterdir())
    if busy and (previous != fp or overwrite):
        if not overwrite:
            what = ("holds a geoseg run with different input or options" if previous
                    else "exists and is not a geoseg run directory")
            raise OutputExistsError(f"{run_dir}: {what}; use another -o, or --overwrite to replace geoseg's files there")
        for name in OWNED:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (run_dir / PARTS).mkdir(parents=True, exist_ok=True)
    done = set()
    for record in (run_dir / PARTS).glob("[!.]*.json"):  # not a crashed writer's hidden temp file
        with contextlib.suppress(ValueError, OSError):
            if json.loads(record.read_text()).get("fingerprint") == fp:
                done.add(record.stem)
    return done


# -- running the chunk tasks -------------------------------------------------------------------

@contextlib.contextmanager
def dask_client(scheduler: str | None = None, client=None, workers: int | None = None):
    """The caller's client, a client of ``scheduler``, or a LocalCluster started for this run.

    ``scheduler`` is an address (``tcp://host:8786``) or the path of a scheduler file written by
    ``dask scheduler --scheduler-file`` (the usual hand-off on SLURM/MPI). A caller's client is used
    as it is and never closed. The LocalCluster runs one single-threaded worker process per
    ``workers`` and shares the machine's cores between their math libraries.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler:
        with _connect(Client, scheduler) as c:
            yield c
        return
    n = workers or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                      env=env, silence_logs=logging.CRITICAL) as cluster, Client(cluster) as c:
        yield c


def _connect(Client, scheduler: str):
    """A client of an existing scheduler; a clear geoseg error (not a timeout traceback) if unreachable."""
    is_file = scheduler.endswith(".json") and "://" not in scheduler
    try:
        return Client(scheduler_file=scheduler) if is_file else Client(scheduler)
    except (OSError, TimeoutError, ValueError) as exc:
        what = "read the scheduler file" if is_file else "reach the Dask scheduler at"
        raise GeosegError(f"cannot {what} {scheduler}: {type(exc).__name__}: {first_line(exc)}; is the "
                          "cluster running and may this machine connect to it?") from exc


#: Seconds between looks at the cluster's workers (GPU resources, window size) while chunks run.
_CLUSTER_POLL_S = 5.0


@dataclass(frozen=True)
class _ChunkError:
    """A chunk task's non-transient failure, returned (not raised) so Dask does not retry it."""

    error: BaseException


def _stage(stage, job: ChunkJob, *inputs: Any, io_retries: int = 0) -> Any:
    """One stage of a chunk as a Dask task, sorting its failures into transient and final.

    * An earlier stage's final failure (an input that is a ``_ChunkError``) is passed on as is.
    * A block that failed to read (:class:`RasterReadError`: network hiccup or corrupt data) is
      retried here, in place, ``io_retries`` times with a short back-off; if it keeps failing it is
      final. In-task retries keep the chunk's worker and its loaded model.
    * Any other geoseg error (bad input, model that cannot load) and out-of-memory errors are final
      at once: retrying them on another worker would fail the same way.
    * Everything else (an unexpected OSError, a library crash that raises) is raised, so Dask's own
      ``retries`` reschedule it. A worker process that dies is rescheduled by the scheduler.
    """
    from .errors import RasterReadError

    failed = next((v for v in inputs if isinstance(v, _ChunkError)), None)
    if failed is not None:
        return failed
    for attempt in itertools.count():
        try:
            return stage(job, *inputs)
        except RasterReadError as exc:
            if attempt >= io_retries:
                return _ChunkError(exc)
            log.warning("chunk %s: read failed (attempt %d of %d), retrying: %s",
                        job.region.name, attempt + 1, io_retries + 1, exc)
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        except GeosegError as exc:
            return _ChunkError(exc)
        except MemoryError as exc:
            return _ChunkError(ChunkFailedError(
                f"chunk {_describe(job)} ran out of memory (batch size {job.batch_size}): {exc}; "
                "lower --batch-size or --chunk-size, or give the workers more memory"))
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
                raise
            return _ChunkError(ChunkFailedError(
                f"chunk {_describe(job)} ran out of GPU memory at batch size {job.batch_size}: "
                f"{first_line(exc)}; lower --batch-size, or use GPUs with more memory"))


def _describe(job: ChunkJob) -> str:
    r = job.region
    return f"{r.name} (rows {r.row}..{r.row_stop}, cols {r.col}..{r.col_stop})"


def submit_chunks(client, jobs: Sequence[ChunkJob], max_in_flight: int | None, retries: int,
                  progress: bool) -> Iterator[ChunkResult]:
    """Submit chunks keeping a bounded number queued; yield their results as they finish.

    Each chunk is three tasks: :func:`read_chunk` → :func:`infer_chunk` → :func:`finish_chunk`.
    The window is ``max_in_flight`` chunks when given, else two per worker, re-read as workers
    join (an adaptive cluster scales on queued work, so the window must grow with it).
    The prompts are encoded once, by the first task, and its small result feeds every chunk.
    Inference tasks carry ``resources={"GPU": 1}`` once any worker declares a GPU resource: one
    inference per GPU at a time, never on CPU-only workers of a mixed cluster, and reading,
    blending and polygonizing of other chunks run beside it instead of holding the GPU. Results
    are metadata; futures are released as soon as they are read.

    A task that killed its worker too often (Dask's ``KilledWorker``) or failed for good raises
    :class:`ChunkFailedError` naming the chunk and its window; still queued tasks are cancelled.
    """
    from distributed import KilledWorker, as_completed
    from tqdm.auto import tqdm

    todo = iter(jobs)
    by_key: dict[str, ChunkJob] = {}
    state = {"resources": None, "window": max_in_flight or 2, "polled": -float("inf")}

    def poll():
        now = time.monotonic()
        if now - state["polled"] < _CLUSTER_POLL_S:
            return
        state["polled"] = now
        workers = _workers(client)
        if _has_gpus(workers):
            state["resources"] = {"GPU": 1}
        if not max_in_flight:
            state["window"] = max(state["window"], 2 * len(workers))

    def submit(job):
        # read (CPU) -> infer (the GPU slot) -> finish (CPU); Dask runs a chunk's stages where its
        # data is, and only inference waits for, and holds, a GPU
        name = f"{job.fingerprint}-{job.region.name}"
        opts = dict(retries=retries, pure=False)
        tiles = client.submit(_stage, read_chunk, job, io_retries=retries, key=f"geoseg-read-{name}", **opts)
        inference = client.submit(_stage, infer_chunk, job, tiles, embeddings, key=f"geoseg-infer-{name}",
                                  resources=state["resources"], **opts)
        done = client.submit(_stage, finish_chunk, job, tiles, inference, key=f"geoseg-{name}", **opts)
        by_key[done.key] = job
        return done

    poll()
    first = jobs[0]
    # A few KB: fetched once and sent by value, so no chunk task is tied to the worker that made it.
    embeddings = client.submit(encode_prompts, first.factory, first.prompts, key=f"geoseg-{first.fingerprint}-prompts",
                               resources=state["resources"], pure=False).result()
    pending = as_completed([submit(j) for j in itertools.islice(todo, state["window"])])
    bar = tqdm(total=len(jobs), unit="chunk", disable=not progress, desc="segment")
    model_tiles = 0
    try:
        with bar:
            for future in pending:
                job = by_key.pop(future.key)
                try:
                    outcome = future.result()
                except KilledWorker as exc:
                    raise ChunkFailedError(
                        f"chunk {_describe(job)}: the worker processes running it died repeatedly "
                        "(killed by the OS for memory, or a crash in a native library; the cause may "
                        "also be a chunk queued beside it on those workers); lower --chunk-size or "
                        "--batch-size, or give workers more memory") from exc
                except GeosegError:
                    raise
                except Exception as exc:  # retries exhausted: name the chunk, not a traceback
                    raise ChunkFailedError(f"chunk {_describe(job)} failed after {retries} retries: "
                                           f"{type(exc).__name__}: {first_line(exc)}") from exc
                finally:
                    future.release()
                if isinstance(outcome, _ChunkError):
                    raise outcome.error
                model_tiles += outcome.model_tiles
                bar.set_postfix(tiles=model_tiles, refresh=False)
                bar.update()
                poll()
                while pending.count() < state["window"]:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    pending.add(submit(nxt))
                yield outcome
    finally:
        left = list(pending.futures) if hasattr(pending, "futures") else []
        if left:  # stopped early (error, or the caller closed us): do not leave work queued
            with contextlib.suppress(Exception):
                client.cancel(left)


def _workers(client) -> dict:
    """Every worker's info (``scheduler_info`` lists only 5 by default in some distributed versions)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return info.get("workers", {})


def _has_gpus(workers: dict) -> bool:
    return any(w.get("resources", {}).get("GPU") for w in workers.values())


# -- public entry points --------------------------------------------------------------------

@dataclass
class RunResult:
    """What ``segment`` returns: where the outputs are and what the run did."""

    run_dir: Path
    probabilities: Path
    polygons: Path
    chunks_run: int
    chunks_skipped: int
    model_tiles: int
    features: int
    manifest: dict = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        return (f"{self.probabilities}\n{self.polygons} ({self.features} polygons)\n"
                f"chunks run: {self.chunks_run}, resumed: {self.chunks_skipped}")


def segment(config: SegmentConfig, client=None, segmenter_factory: SegmenterFactory | None = None,
            progress: bool = False) -> RunResult:
    """Segment ``config.input`` by ``config.prompts`` into ``config.output``; resumable.

    ``client``: an existing ``distributed.Client`` (else ``config.scheduler`` or a LocalCluster).
    ``segmenter_factory``: picklable zero-argument callable building the model on each worker;
    default CLIPSeg from ``config.model``.
    """
    info = inspect_raster(config.input, config.bands, config.crs, config.resolution)
    thresholds = config.vector.thresholds_for(len(config.prompts))
    factory = segmenter_factory or clipseg_factory(config.model, config.revision, config.device)
    fp = fingerprint(config, info)
    run_dir = config.output
    done = prepare_run_dir(run_dir, fp, config.overwrite)
    regions = plan_chunks(info, config.chunk_size)
    manifest = _manifest(config, info, fp, regions)
    write_json_atomic(run_dir / MANIFEST, manifest)

    # A raster without one valid pixel needs no chunk task: all-nodata COG, empty layer.
    worked = [] if info.all_masked else regions
    jobs = [ChunkJob(r, info, config.prompts, thresholds, config.tile_size, config.stride,
                     config.batch_size, str(run_dir), fp, factory)
            for r in worked if r.name not in done]
    for name in done:
        manifest["chunks"][name]["status"] = "done (resumed)"
    try:
        results = _run_jobs(jobs, config, client, progress, manifest)
        revisions = sorted({r.model_revision for r in results if r.model_revision})
        if revisions:
            manifest["model_revision"] = revisions[0] if len(revisions) == 1 else revisions
        probs_path = assemble_probabilities(run_dir, worked, info, config.prompts)
        pieces = [read_pieces(run_dir / PARTS / f"{r.name}.pieces") for r in worked]
        vec_path, features = write_polygons(run_dir, pieces, worked, info.transform, info.crs,
                                            config.prompts, config.vector)
    except BaseException as exc:
        manifest.update(status="failed", finished=_now(), error=f"{type(exc).__name__}: {exc}")
        write_json_atomic(run_dir / MANIFEST, manifest)
        raise
    if info.all_masked:
        manifest["empty"] = "every input pixel is masked"
        for chunk in manifest["chunks"].values():
            chunk["status"] = "skipped (all masked)"
    elif features == 0:
        log.warning("no pixel reached the threshold %s: wrote an empty layer to %s", thresholds, vec_path)
    manifest.update(status="complete", finished=_now(), features=features,
                    outputs={"probabilities": probs_path.name, "polygons": vec_path.name})
    write_json_atomic(run_dir / MANIFEST, manifest)
    return RunResult(run_dir, probs_path, vec_path, len(results), len(done),
                     sum(r.model_tiles for r in results), features, manifest)


def _run_jobs(jobs: Sequence[ChunkJob], config: SegmentConfig, client, progress: bool,
              manifest: dict) -> list[ChunkResult]:
    results: list[ChunkResult] = []
    if not jobs:
        return results
    with dask_client(config.scheduler, client, config.workers) as c:
        if progress and c.dashboard_link:
            print(f"Dask dashboard: {c.dashboard_link}", file=sys.stderr, flush=True)
        for res in submit_chunks(c, jobs, config.max_in_flight, config.retries, progress):
            results.append(res)
            manifest["chunks"][res.name].update(status="done", tiles=res.tiles, model_tiles=res.model_tiles,
                                                 seconds=res.seconds, worker=res.worker)
    return results


def assemble_probabilities(run_dir: Path, regions: Sequence[Region], info: RasterInfo,
                           prompts: Sequence[str]) -> Path:
    """VRT of the chunk parts → COG with overviews (atomic)."""
    vrt = run_dir / "probabilities.vrt"
    write_vrt(vrt, [(r, f"{PARTS}/{r.name}.tif") for r in regions], info, prompts)
    out = run_dir / PROBABILITIES
    with bounded_gdal_cache():
        write_cog(vrt, out)
    vrt.unlink()
    return out


def write_polygons(run_dir: Path, pieces: list, regions: Sequence[Region], transform, crs,
                   prompts: Sequence[str], vector: VectorizeConfig) -> tuple[Path, int]:
    """Merge the chunks' pieces across seams, clean up, and write the vector file once."""
    merged = merge_seams(pieces, [(r.row, r.col, r.height, r.width) for r in regions])
    thresholds = vector.thresholds_for(len(prompts))
    gdf = finalize(merged, transform, crs, prompts, thresholds, min_area=vector.min_area,
                   fill_holes=vector.fill_holes, simplify=vector.simplify, dst_crs=vector.dst_crs)
    path = run_dir / ("polygons.gpkg" if vector.vector_format == "gpkg" else "polygons.parquet")
    write_vector(gdf, path, vector.vector_format, prompts=prompts)
    return path, len(gdf)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _manifest(config: SegmentConfig, info: RasterInfo, fp: str, regions: Sequence[Region]) -> dict:
    options = asdict(config)
    options["output"] = str(config.output)
    return {
        "geoseg_version": __version__, "status": "running", "started": _now(), "fingerprint": fp,
        "input": config.input, "model": config.model, "model_revision": config.revision,
        "prompts": list(config.prompts), "options": options,
        "raster": {"width": info.width, "height": info.height, "crs": info.crs_wkt,
                   "transform": list(info.transform)[:6], "bands": list(info.bands),
                   "stretch": [list(s) for s in info.stretch], "resampled": info.resampled},
        "chunks": {r.name: {"region": [r.row, r.col, r.height, r.width], "status": "pending"} for r in regions},
    }


def load_finished_run(run_dir: Path) -> dict:
    """The manifest of a finished ``segment`` run, or one clear :class:`NotARunError`."""
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir}: no such run directory")
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise NotARunError(f"{run_dir}: not a geoseg run directory (no readable {MANIFEST})") from exc
    if not isinstance(manifest, dict) or "prompts" not in manifest:
        raise NotARunError(f"{run_dir}: {MANIFEST} is not a geoseg run manifest")
    if manifest.get("status") != "complete":
        raise NotARunError(f"{run_dir}: the segment run did not finish; re-run `geoseg segment` to resume it")
    if not (run_dir / PROBABILITIES).exists():
        raise NotARunError(f"{run_dir}: {PROBABILITIES} is missing; re-run `geoseg segment` there")
    return manifest


def vectorize(run_dir: Path | str, vector: VectorizeConfig) -> tuple[Path, int]:
    """Re-threshold and re-vectorize a finished run from its probability COG; no model run.

    Reads the COG chunk by chunk on the run's own chunk grid (memory bounded by one chunk) and uses
    the same polygonize / seam-merge / finalize stages as ``segment``, so the result equals a fresh
    ``segment`` run at the new threshold.
    """
    import rasterio

    run_dir = Path(run_dir)
    manifest = load_finished_run(run_dir)
    prompts = tuple(manifest["prompts"])
    thresholds = vector.thresholds_for(len(prompts))
    regions = [Region(*c["region"]) for c in manifest["chunks"].values()]
    pieces = []
    with bounded_gdal_cache(), rasterio.open(run_dir / PROBABILITIES) as src:
        transform, crs = src.transform, src.crs
        for r in regions:
            probs = src.read(window=((r.row, r.row_stop), (r.col, r.col_stop)))
            valid = np.isfinite(probs).all(axis=0)
            pieces.append(polygonize_chunk(probs, valid, r.row, r.col, thresholds))
    path, features = write_polygons(run_dir, pieces, regions, transform, crs, prompts, vector)
    if features == 0:
        log.warning("no pixel reached the threshold %s: wrote an empty layer to %s", thresholds, path)
    manifest.setdefault("vectorize_runs", []).append({"at": _now(), **asdict(vector), "features": features})
    manifest["outputs"]["polygons"] = path.name
    write_json_atomic(run_dir / MANIFEST, manifest)
    return path, features
