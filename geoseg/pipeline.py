"""The public entry points: :func:`segment` (raster → probabilities + polygons) and :func:`vectorize`.

They only orchestrate: the run directory and its manifest are :mod:`geoseg.rundir`, the per-chunk
stages :mod:`geoseg.stages`, running them on Dask :mod:`geoseg.scheduling`, polygons in pixel space
:mod:`geoseg.pieces` and in map space :mod:`geoseg.polygons`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json_atomic
from .classes import class_map, exclusive, write_class_part, write_classes
from .config import SegmentConfig, VectorizeConfig
from .errors import ChunkFailedError
from .gdalcopy import reports_progress
from .model import SegmenterFactory, clipseg_factory
from .pieces import chunk_components
from .progress import percent_bar, progress_bar
from .prompts import PromptPlan, build_plan, embeddings_sha256
from .raster import RasterInfo, bounded_gdal_cache, inspect_raster, read_probabilities, write_cog, write_vrt
from .rundir import (
    CLASS_PART,
    PARTS,
    PROBABILITIES,
    PROBABILITIES_VRT,
    RunManifest,
    fingerprint,
    load_finished_run,
    now,
    part_path,
    polygons_name,
    prepare_run_dir,
)
from .scheduling import ChunkSubmitter, dask_client
from .stages import ChunkJob, ChunkResult, plan_chunks
from .streaming import (
    CONTEXT_SUFFIX,
    FINAL_SUFFIX,
    SEAM_SUFFIX,
    PolygonOutput,
    SeamSource,
    TableSource,
    VectorJob,
    part_seams,
    part_tables,
    ticking,
    write_chunk_polygons,
)
from .tiling import Region, chunk_regions

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What ``segment`` returns: where the outputs are and what the run did."""

    run_dir: Path
    probabilities: Path
    polygons: Path | None  # None: --no-polygons
    chunks_run: int
    chunks_skipped: int
    model_tiles: int
    features: int
    manifest: RunManifest | None = field(repr=False, default=None)

    def summary(self) -> str:
        polygons = f"{self.polygons} ({self.features} polygons)\n" if self.polygons is not None else ""
        return (f"{self.probabilities}\n{polygons}"
                f"chunks run: {self.chunks_run}, resumed: {self.chunks_skipped}")


def vector_job(vector: VectorizeConfig, prompts: Sequence[str], transform: Any, crs_wkt: str | None,
               height: int, width: int, exclusive: bool = False) -> VectorJob:
    """The picklable recipe chunk tasks and the client share to turn pieces into output rows."""
    return VectorJob(tuple(prompts), vector.thresholds_for(len(prompts)), tuple(transform)[:6], crs_wkt or None,
                     int(height), int(width), min_area=vector.min_area, fill_holes=vector.fill_holes,
                     simplify=vector.simplify, dst_crs=vector.dst_crs, vector_format=vector.vector_format,
                     exclusive=exclusive)


def segment(config: SegmentConfig, client: Any = None, segmenter_factory: SegmenterFactory | None = None,
            progress: bool = False) -> RunResult:
    """Segment ``config.input`` by ``config.prompts`` into ``config.output``; resumable.

    ``client``: an existing ``distributed.Client`` (else ``config.scheduler`` or a LocalCluster).
    ``segmenter_factory``: picklable zero-argument callable building the model on each worker;
    default CLIPSeg from ``config.model``.

    Polygons stream: each chunk task finalizes the polygons no other chunk can change; the client
    merges the others after each row of chunks and writes all rows in canonical order, a band at a
    time, as soon as nothing still to come can precede them (:mod:`geoseg.streaming`).
    ``config.polygons=False`` writes probabilities only.
    """
    info = inspect_raster(config.input, config.bands, config.crs, config.resolution)
    thresholds = config.vector.thresholds_for(len(config.prompts))
    factory = segmenter_factory or clipseg_factory(config.model, config.revision, config.device, config.compile)
    plan = build_plan(config, info)  # exemplars are read (and refused) before anything is written
    fp = fingerprint(config, info, plan)
    run_dir = config.output
    done = prepare_run_dir(run_dir, fp, config.overwrite)
    regions = plan_chunks(info, config.chunk_size)
    manifest = RunManifest.new(config, info, fp, regions, prompting=plan.describe())
    _check_card_templates(config.model, manifest.model_card, plan)
    manifest.prompting["exemplars_sha256"] = plan.exemplars_sha256()
    manifest.save(run_dir)
    vjob = (vector_job(config.vector, config.prompts, info.transform, info.crs_wkt, info.height, info.width,
                       exclusive=config.classes) if config.polygons else None)

    # A raster without one valid pixel needs no chunk task: all-nodata COG, empty layer.
    worked = [] if info.all_masked else regions
    jobs = [ChunkJob(r, info, config.prompts, thresholds, config.tile_size, config.stride,
                     config.batch_size, str(run_dir), fp, factory, plan.applies, config.classes, vjob,
                     config.dtype)
            for r in worked if r.name not in done]
    for name in done:
        manifest.chunks[name].status = "done (resumed)"
    vec_path = run_dir / polygons_name(config.vector.vector_format) if vjob is not None else None
    features = None
    try:
        with contextlib.ExitStack() as stack:
            out = None
            if vjob is not None and vec_path is not None:
                out = stack.enter_context(PolygonOutput(vec_path, worked, vjob, progress))
                for r in worked:
                    if r.name in done:
                        ensure_chunk_polygons(run_dir, r, vjob, info)
                        out.add(r.name, *chunk_sources(run_dir, r.name))
            results = _run_jobs(jobs, config, client, progress, manifest, plan, out)
            revisions = sorted({r.model_revision for r in results if r.model_revision})
            if revisions:
                manifest.model_revision = revisions[0] if len(revisions) == 1 else revisions
            probs_path = assemble_probabilities(run_dir, worked, info, config.prompts, progress, config.dtype)
            outputs = {"probabilities": probs_path.name}
            if config.classes:
                outputs["classes"] = write_classes(run_dir, [(r, f"{PARTS}/{r.name}{CLASS_PART}") for r in worked],
                                                   info, config.prompts).name
            if out is not None:
                features = out.finish()
    except BaseException as exc:
        manifest.status, manifest.finished, manifest.error = "failed", now(), f"{type(exc).__name__}: {exc}"
        manifest.save(run_dir)
        raise
    if info.all_masked:
        manifest.empty = "every input pixel is masked"
        for chunk in manifest.chunks.values():
            chunk.status = "skipped (all masked)"
    elif features == 0:
        log.warning("no pixel reached the threshold %s: wrote an empty layer to %s", thresholds, vec_path)
    manifest.status, manifest.finished, manifest.features = "complete", now(), features
    manifest.outputs = outputs
    if vec_path is not None:
        manifest.outputs["polygons"] = vec_path.name
    manifest.save(run_dir)
    return RunResult(run_dir, probs_path, vec_path, len(results), len(done),
                     sum(r.model_tiles for r in results), features or 0, manifest)


def chunk_sources(run_dir: Path, name: str) -> tuple[TableSource, SeamSource]:
    """Where a finished chunk's final rows and seam pieces are read from."""
    return (part_tables(part_path(run_dir, name, FINAL_SUFFIX)), part_seams(part_path(run_dir, name, SEAM_SUFFIX)))


def ensure_chunk_polygons(run_dir: Path, region: Region, vjob: VectorJob, info: RasterInfo) -> None:
    """A chunk a previous run finished: remake its polygon parts from its probability part when
    they were made with other vector options (or not at all, ``--no-polygons``), or are missing.
    With a class map (``vjob.exclusive``) its part is remade too: it follows the thresholds."""
    record = part_path(run_dir, region.name, ".json")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if (json.loads(record.read_text()).get("vector_key") == vjob.key()
                and all(part_path(run_dir, region.name, suffix).exists()
                        for suffix in (FINAL_SUFFIX, SEAM_SUFFIX, CONTEXT_SUFFIX))):
            return
    import rasterio

    with bounded_gdal_cache(), rasterio.open(part_path(run_dir, region.name, ".tif")) as src:
        probs = read_probabilities(src)
    valid = np.isfinite(probs).all(axis=0)
    if vjob.exclusive:
        labels = class_map(probs, valid, vjob.thresholds)
        with bounded_gdal_cache():
            write_class_part(part_path(run_dir, region.name, CLASS_PART), labels, info, region)
        probs = exclusive(probs, labels)
    comps = chunk_components(probs, valid, region.row, region.col, vjob.thresholds)
    write_chunk_polygons(run_dir, region.name, comps, region, vjob)
    data = json.loads(record.read_text())
    data["vector_key"] = vjob.key()
    write_json_atomic(record, data)


def _run_jobs(jobs: Sequence[ChunkJob], config: SegmentConfig, client: Any, progress: bool,
              manifest: RunManifest, plan: PromptPlan, out: PolygonOutput | None) -> list[ChunkResult]:
    results: list[ChunkResult] = []
    if not jobs:
        return results
    with dask_client(config.scheduler, client, config.workers) as c:
        if progress and c.dashboard_link:
            print(f"Dask dashboard: {c.dashboard_link}", file=sys.stderr, flush=True)
        submitter = ChunkSubmitter(c, config.max_in_flight, config.retries)
        for res in submitter.run(jobs, progress, plan):
            if submitter.encode_seconds is not None and "encode_seconds" not in manifest.prompting:
                manifest.prompting.update(_embedding_record(plan, submitter.embeddings, submitter.encode_seconds))
            results.append(res)
            chunk = manifest.chunks[res.name]
            chunk.status, chunk.tiles, chunk.model_tiles = "done", res.tiles, res.model_tiles
            chunk.seconds, chunk.worker = res.seconds, res.worker
            if out is not None:
                out.add(res.name, *chunk_sources(Path(config.output), res.name))
    return results


def _embedding_record(plan: PromptPlan, embeddings: Any, seconds: float) -> dict[str, Any]:
    """Manifest facts about the encoded prompts: the time it took and a hash of the exemplar prompts'
    final embeddings (so a resumed run can be checked to condition on the same thing)."""
    record: dict[str, Any] = {"encode_seconds": round(seconds, 4)}
    rows = [k for k, crops in enumerate(plan.exemplars) if crops is not None]
    if rows:
        record["exemplar_embeddings_sha256"] = embeddings_sha256(np.asarray(embeddings)[rows])
    return record


def assemble_probabilities(run_dir: Path, regions: Sequence[Region], info: RasterInfo,
                           prompts: Sequence[str], progress: bool = False, dtype: str = "float32") -> Path:
    """VRT of the chunk parts → COG with overviews (atomic), with GDAL's progress as a percent bar
    (a ticking line with the MiB written where GDAL's callback is out of reach)."""
    vrt = run_dir / PROBABILITIES_VRT
    write_vrt(vrt, [(r, f"{PARTS}/{r.name}.tif") for r in regions], info, prompts, dtype)
    out = run_dir / PROBABILITIES
    stem = Path(PROBABILITIES).stem

    def written() -> int:
        return sum(p.stat().st_size for p in run_dir.glob(f".{stem}.tmp-*") if p.exists())

    with bounded_gdal_cache():
        if progress and reports_progress():
            with percent_bar("probabilities COG") as report:
                write_cog(vrt, out, report)
        else:
            with ticking("probabilities COG", progress, written):
                write_cog(vrt, out)
    vrt.unlink()
    return out


class _GridInfo:
    """The grid of a finished run's probability COG, as the class-map writers need it."""

    def __init__(self, src: Any):
        from affine import Affine

        self.width, self.height, self.transform = src.width, src.height, src.transform
        self.crs, self.crs_wkt = src.crs, src.crs.to_wkt()
        self.region_transform = lambda r: self.transform @ Affine.translation(r.col, r.row)


def _vectorize_chunk(run_dir: Path, parts: Path, vjob: VectorJob, classes: bool, region: Region) -> str:
    """One chunk of :func:`vectorize` (in a worker process): read its probabilities, remake its class
    part (the class map follows the new thresholds too), write its polygon parts under ``parts``."""
    import rasterio

    with bounded_gdal_cache(), rasterio.open(run_dir / PROBABILITIES) as src:
        probs = read_probabilities(src, window=((region.row, region.row_stop), (region.col, region.col_stop)))
        valid = np.isfinite(probs).all(axis=0)
        if classes:
            labels = class_map(probs, valid, vjob.thresholds)
            write_class_part(part_path(run_dir, region.name, CLASS_PART), labels, _GridInfo(src), region)
            probs = exclusive(probs, labels)
    comps = chunk_components(probs, valid, region.row, region.col, vjob.thresholds)
    del probs, valid
    write_chunk_polygons(parts, region.name, comps, region, vjob)
    return region.name


@contextlib.contextmanager
def _map_chunks(work: Callable[[Region], str], regions: Sequence[Region], workers: int) -> Iterator[Iterator[str]]:
    """``work`` over ``regions``, results in order: in this process, or in ``workers`` fresh
    processes (``spawn``: the client holds a GDAL writer thread, which must not be forked). On
    leaving, work not started is cancelled and running work awaited, so nothing still writes into
    the parts folder when it is removed."""
    if workers <= 1:
        yield map(work, regions)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def results() -> Iterator[str]:
        done = pool.map(work, regions)
        for i, region in enumerate(regions):
            try:
                yield next(done)
            except BrokenProcessPool as exc:  # a process killed by the OS: every unfinished chunk fails
                raise ChunkFailedError(
                    f"a vectorize worker process died (killed by the OS, out of memory?) with chunk "
                    f"{region.name} unfinished ({i} of {len(regions)} chunks done); use fewer "
                    f"--workers or a smaller chunk size"
                ) from exc

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: The smallest chunk :func:`vectorize_regions` cuts to: two COG blocks (512 px), so seams stay few.
MIN_VECTORIZE_CHUNK = 1024
#: The largest chunk ``vectorize`` polygonizes in one process: a process's peak follows its chunk,
#: so one size for every run keeps vectorize's memory the same whatever the raster and its run's
#: ``--chunk-size`` (at 4096² chunks it was 1.4x that of 2048² ones; bench/README.md).
MAX_VECTORIZE_CHUNK = 2048


def vectorize_regions(regions: Sequence[Region], height: int, width: int, workers: int) -> list[Region]:
    """The run's chunks cut to at most :data:`MAX_VECTORIZE_CHUNK`, then halved (in multiples of
    512 px, down to :data:`MIN_VECTORIZE_CHUNK`) while there are fewer than ``workers``, so every
    worker process has a chunk: a 2048² run of one chunk is polygonized as four on a 4-core laptop.
    The rows come in canonical order whatever the grid, so the file does not change."""
    regions = list(regions)
    chunk_h, chunk_w = max(r.height for r in regions), max(r.width for r in regions)
    if max(chunk_h, chunk_w) > MAX_VECTORIZE_CHUNK:
        chunk_h, chunk_w = min(chunk_h, MAX_VECTORIZE_CHUNK), min(chunk_w, MAX_VECTORIZE_CHUNK)
        regions = chunk_regions(height, width, chunk_h, chunk_w)
    while len(regions) < workers and max(chunk_h, chunk_w) > MIN_VECTORIZE_CHUNK:
        chunk_h, chunk_w = (max(MIN_VECTORIZE_CHUNK, math.ceil(c / 1024) * 512) for c in (chunk_h, chunk_w))
        regions = chunk_regions(height, width, chunk_h, chunk_w)
    return regions


def vectorize(run_dir: Path | str, vector: VectorizeConfig, progress: bool = False,
              workers: int | None = 1) -> tuple[Path, int]:
    """Re-threshold and re-vectorize a finished run from its probability COG; no model run.

    Chunks are polygonized by ``workers`` processes (``None``: one per CPU this process may use;
    memory about one chunk each; more than one needs the calling script to guard its top level with
    ``if __name__ == "__main__":``, as ``spawn`` re-imports it) on the run's own chunk grid, cut
    finer where it has fewer chunks than workers (:func:`vectorize_regions`; a class map keeps the
    run's grid, whose class parts it rewrites), through the same chunk stage as ``segment``, into a
    temporary parts folder, and streamed into the output exactly as ``segment`` does (same rules,
    same canonical row order), so the result equals a fresh ``segment`` run at the new threshold.
    """
    import shutil
    import tempfile

    import rasterio

    run_dir = Path(run_dir).absolute()
    manifest = load_finished_run(run_dir)
    prompts = manifest.prompts
    thresholds = vector.thresholds_for(len(prompts))
    regions = manifest.regions()
    classes = bool(manifest.options.get("classes"))
    path = run_dir / polygons_name(vector.vector_format)
    for stale in run_dir.glob(".vectorize-*"):  # left by a killed vectorize
        shutil.rmtree(stale, ignore_errors=True)
    with rasterio.open(run_dir / PROBABILITIES) as src:
        vjob = vector_job(vector, prompts, src.transform, src.crs.to_wkt() if src.crs else None,
                          src.height, src.width, exclusive=classes)
        grid = _GridInfo(src)
    n_workers = workers or len(os.sched_getaffinity(0))
    if not classes:
        regions = vectorize_regions(regions, vjob.height, vjob.width, n_workers)
    n_workers = min(n_workers, len(regions))
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".vectorize-") as tmp, \
            PolygonOutput(path, regions, vjob, progress) as out:
        parts = Path(tmp)
        (parts / PARTS).mkdir()
        work = functools.partial(_vectorize_chunk, run_dir, parts, vjob, classes)
        with _map_chunks(work, regions, n_workers) as names, \
                progress_bar(total=len(regions), desc="vectorize", unit="chunk", disable=not progress) as bar:
            for name in names:
                out.add(name, *chunk_sources(parts, name))
                bar.update(1)
        features = out.finish()
    if classes:
        write_classes(run_dir, [(r, f"{PARTS}/{r.name}{CLASS_PART}") for r in regions], grid, prompts)
    if features == 0:
        log.warning("no pixel reached the threshold %s: wrote an empty layer to %s", thresholds, path)
    manifest.vectorize_runs.append({"at": now(), **asdict(vector), "features": features})
    manifest.outputs["polygons"] = path.name
    manifest.save(run_dir)
    return path, features


def _check_card_templates(model: str, card: dict[str, Any] | None, plan: PromptPlan) -> None:
    """A `geoseg train` model learnt FiLM for embeddings made with its card's templates; other
    templates feed it embeddings it never saw (allowed, but worth one warning)."""
    trained = (card or {}).get("templates")
    if trained is not None and list(trained) != list(plan.templates):
        log.warning("%s was trained with templates %s; this run uses %s (pass the same --templates)",
                    model, trained, list(plan.templates))
