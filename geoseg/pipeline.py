"""The public entry points: :func:`segment` (raster → probabilities + polygons) and :func:`vectorize`.

They only orchestrate: the run directory and its manifest are :mod:`geoseg.rundir`, the per-chunk
stages :mod:`geoseg.stages`, running them on Dask :mod:`geoseg.scheduling`, polygons in pixel space
:mod:`geoseg.pieces` and in map space :mod:`geoseg.polygons`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import SegmentConfig, VectorizeConfig
from .export import write_vector
from .model import SegmenterFactory, clipseg_factory
from .pieces import Pieces, merge_seams, polygonize_chunk, read_pieces
from .polygons import finalize
from .raster import RasterInfo, bounded_gdal_cache, inspect_raster, read_probabilities, write_cog, write_vrt
from .rundir import (
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
from .tiling import Region

log = logging.getLogger(__name__)


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
    manifest: RunManifest | None = field(repr=False, default=None)

    def summary(self) -> str:
        return (f"{self.probabilities}\n{self.polygons} ({self.features} polygons)\n"
                f"chunks run: {self.chunks_run}, resumed: {self.chunks_skipped}")


def segment(config: SegmentConfig, client: Any = None, segmenter_factory: SegmenterFactory | None = None,
            progress: bool = False) -> RunResult:
    """Segment ``config.input`` by ``config.prompts`` into ``config.output``; resumable.

    ``client``: an existing ``distributed.Client`` (else ``config.scheduler`` or a LocalCluster).
    ``segmenter_factory``: picklable zero-argument callable building the model on each worker;
    default CLIPSeg from ``config.model``.
    """
    info = inspect_raster(config.input, config.bands, config.crs, config.resolution)
    thresholds = config.vector.thresholds_for(len(config.prompts))
    factory = segmenter_factory or clipseg_factory(config.model, config.revision, config.device, config.compile)
    fp = fingerprint(config, info)
    run_dir = config.output
    done = prepare_run_dir(run_dir, fp, config.overwrite)
    regions = plan_chunks(info, config.chunk_size)
    manifest = RunManifest.new(config, info, fp, regions)
    manifest.save(run_dir)

    # A raster without one valid pixel needs no chunk task: all-nodata COG, empty layer.
    worked = [] if info.all_masked else regions
    jobs = [ChunkJob(r, info, config.prompts, thresholds, config.tile_size, config.stride,
                     config.batch_size, str(run_dir), fp, factory, config.dtype)
            for r in worked if r.name not in done]
    for name in done:
        manifest.chunks[name].status = "done (resumed)"
    try:
        results = _run_jobs(jobs, config, client, progress, manifest)
        revisions = sorted({r.model_revision for r in results if r.model_revision})
        if revisions:
            manifest.model_revision = revisions[0] if len(revisions) == 1 else revisions
        probs_path = assemble_probabilities(run_dir, worked, info, config.prompts, config.dtype)
        pieces = [read_pieces(part_path(run_dir, r.name, ".pieces")) for r in worked]
        vec_path, features = write_polygons(run_dir, pieces, worked, info.transform, info.crs,
                                            config.prompts, config.vector)
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
    manifest.outputs = {"probabilities": probs_path.name, "polygons": vec_path.name}
    manifest.save(run_dir)
    return RunResult(run_dir, probs_path, vec_path, len(results), len(done),
                     sum(r.model_tiles for r in results), features, manifest)


def _run_jobs(jobs: Sequence[ChunkJob], config: SegmentConfig, client: Any, progress: bool,
              manifest: RunManifest) -> list[ChunkResult]:
    results: list[ChunkResult] = []
    if not jobs:
        return results
    with dask_client(config.scheduler, client, config.workers) as c:
        if progress and c.dashboard_link:
            print(f"Dask dashboard: {c.dashboard_link}", file=sys.stderr, flush=True)
        for res in ChunkSubmitter(c, config.max_in_flight, config.retries).run(jobs, progress):
            results.append(res)
            chunk = manifest.chunks[res.name]
            chunk.status, chunk.tiles, chunk.model_tiles = "done", res.tiles, res.model_tiles
            chunk.seconds, chunk.worker = res.seconds, res.worker
    return results


def assemble_probabilities(run_dir: Path, regions: Sequence[Region], info: RasterInfo,
                           prompts: Sequence[str], dtype: str = "float32") -> Path:
    """VRT of the chunk parts → COG with overviews (atomic)."""
    vrt = run_dir / PROBABILITIES_VRT
    write_vrt(vrt, [(r, f"{PARTS}/{r.name}.tif") for r in regions], info, prompts, dtype)
    out = run_dir / PROBABILITIES
    with bounded_gdal_cache():
        write_cog(vrt, out)
    vrt.unlink()
    return out


def write_polygons(run_dir: Path, pieces: list[Pieces], regions: Sequence[Region], transform: Any, crs: Any,
                   prompts: Sequence[str], vector: VectorizeConfig) -> tuple[Path, int]:
    """Merge the chunks' pieces across seams, clean up, and write the vector file once."""
    merged = merge_seams(pieces, [(r.row, r.col, r.height, r.width) for r in regions])
    thresholds = vector.thresholds_for(len(prompts))
    gdf = finalize(merged, transform, crs, prompts, thresholds, min_area=vector.min_area,
                   fill_holes=vector.fill_holes, simplify=vector.simplify, dst_crs=vector.dst_crs)
    path = run_dir / polygons_name(vector.vector_format)
    write_vector(gdf, path, vector.vector_format, prompts=prompts)
    return path, len(gdf)


def vectorize(run_dir: Path | str, vector: VectorizeConfig) -> tuple[Path, int]:
    """Re-threshold and re-vectorize a finished run from its probability COG; no model run.

    Reads the COG chunk by chunk on the run's own chunk grid (memory bounded by one chunk) and uses
    the same polygonize / seam-merge / finalize stages as ``segment``, so the result equals a fresh
    ``segment`` run at the new threshold.
    """
    import rasterio

    run_dir = Path(run_dir)
    manifest = load_finished_run(run_dir)
    prompts = manifest.prompts
    thresholds = vector.thresholds_for(len(prompts))
    regions = manifest.regions()
    pieces = []
    with bounded_gdal_cache(), rasterio.open(run_dir / PROBABILITIES) as src:
        transform, crs = src.transform, src.crs
        for r in regions:
            probs = read_probabilities(src, window=((r.row, r.row_stop), (r.col, r.col_stop)))
            valid = np.isfinite(probs).all(axis=0)
            pieces.append(polygonize_chunk(probs, valid, r.row, r.col, thresholds))
    path, features = write_polygons(run_dir, pieces, regions, transform, crs, prompts, vector)
    if features == 0:
        log.warning("no pixel reached the threshold %s: wrote an empty layer to %s", thresholds, path)
    manifest.vectorize_runs.append({"at": now(), **asdict(vector), "features": features})
    manifest.outputs["polygons"] = path.name
    manifest.save(run_dir)
    return path, features
