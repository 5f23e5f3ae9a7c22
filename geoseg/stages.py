"""The stages of one chunk, shared by local and distributed runs: pure functions of a :class:`ChunkJob`.

Each chunk is three Dask tasks: :func:`read_chunk` opens its own rasterio handle and reads its halo
window; :func:`infer_chunk` runs every tile of the global grid touching the chunk through the model
(the only task that holds a GPU); :func:`finish_chunk` blends, writes the probability part
atomically, polygonizes the chunk's own region and returns a small :class:`ChunkResult` (metadata,
never pixel arrays). How the tasks are submitted is :mod:`geoseg.scheduling`'s business.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from .atomic import write_json_atomic
from .blend import accumulate, new_accumulators, normalise
from .classes import class_map, exclusive, write_class_part
from .model import Segmenter, SegmenterFactory, TensorSegmenter, cached_segmenter
from .pieces import chunk_components
from .prompts import apply_negatives
from .raster import (
    RasterInfo,
    bounded_gdal_cache,
    dequantise,
    open_input,
    quantise,
    read_window,
    stretch_table,
    to_model_rgb,
    write_part,
)
from .rundir import CLASS_PART, part_path
from .streaming import VectorJob, write_chunk_polygons
from .tiling import Region, aligned_chunk, chunk_regions, halo, tile_weights, tiles_touching

#: Tiles per model call on the host path when no --batch-size is given.
HOST_BATCH = 8


@dataclass(frozen=True)
class ChunkJob:
    """Everything one chunk task needs; small and picklable."""

    region: Region
    info: RasterInfo
    prompts: tuple[str, ...]
    thresholds: tuple[float, ...]
    tile_size: int
    stride: int
    batch_size: int | None  # None: sized to device memory (CUDA) or HOST_BATCH
    run_dir: str
    fingerprint: str
    factory: SegmenterFactory
    #: Per prompt, the negatives (rows after the prompts in the embeddings) that apply to it.
    negatives: tuple[tuple[int, ...], ...] = ()
    #: Also write the chunk's exclusive class map, and polygonize the classes instead of each prompt.
    classes: bool = False
    #: How to make the chunk's polygons; None: probabilities only (``--no-polygons``).
    vector: VectorJob | None = None
    dtype: str = "float32"  # of probabilities.tif: float32, or uint8 = round(p * 254), 255 nodata

    def path(self, suffix: str) -> Path:
        return part_path(self.run_dir, self.region.name, suffix)

    @property
    def applies(self) -> tuple[tuple[int, ...], ...]:
        """Per prompt, the negatives that apply to it (none when the run has no negatives)."""
        return self.negatives or tuple(() for _ in self.prompts)


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


def plan_chunks(info: RasterInfo, chunk_size: int) -> list[Region]:
    """Chunk regions aligned to the file's internal blocks (native grid only)."""
    bh, bw = info.block if not info.resampled else (0, 0)
    return chunk_regions(info.height, info.width, aligned_chunk(chunk_size, bh), aligned_chunk(chunk_size, bw))


def in_window(tile: Region, window: Region) -> Region:
    """The part of ``tile`` inside ``window``; the halo window holds every touching tile's in-raster part."""
    inside = tile.intersection(window)
    if inside is None:
        raise RuntimeError(f"internal error: tile {tile} lies outside the halo window {window}")
    return inside


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
                inside = in_window(t, self.window)
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
    tiles = tuple(t for t in touching if valid[in_window(t, window).slices(within=window)].any())
    return ChunkTiles(tiles, window, data, valid, len(touching), time.perf_counter() - start)


def infer_chunk(job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> ChunkInference:
    """GPU stage (the only one that carries ``resources={"GPU": 1}``): the model over the tiles and
    the blend. The process's model is loaded once and kept (``cached_segmenter``).

    A :class:`~geoseg.model.TensorSegmenter` (CLIPSeg) gets the device-resident path: the raw halo
    goes to its device once and only the blended chunk comes back. Other segmenters get numpy
    tiles, ``batch_size`` at a time, blended on the CPU; both give the same blend.
    """
    start = time.perf_counter()
    segmenter = cached_segmenter(job.factory)
    # duck-typed on the one method (a runtime Protocol check would also demand every attribute)
    if callable(getattr(segmenter, "predict_tensor", None)):
        probs = device_blend(cast(TensorSegmenter, segmenter), job, tiles, embeddings)
    else:
        probs = host_blend(segmenter, job, tiles, embeddings)
    # ``revision`` is part of the Segmenter protocol; a plug-in model that lacks it records None
    revision = getattr(segmenter, "revision", None)
    return ChunkInference(probs, f"{socket.gethostname()}:{os.getpid()}", revision, time.perf_counter() - start)


def host_blend(segmenter: Segmenter, job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> np.ndarray:
    """Numpy tiles through ``segmenter.predict``, blended on the CPU as each batch returns: (P, h, w).

    Blending batch by batch holds one batch of tile probabilities, not the chunk's (~140 MB for a
    4096² chunk of 352-px tiles and one prompt), and adds the tiles in the same order as before."""
    n, batch = len(tiles.tiles), job.batch_size or HOST_BATCH
    acc, wsum = new_accumulators(job.region, len(job.prompts))
    info = job.info
    for i, x in zip(range(0, n, batch), tiles.batches(info, batch)):
        # negatives ran in the same call (extra embedding rows); one band per prompt remains
        probs = apply_negatives(segmenter.predict(x, embeddings), job.applies)
        for t, p in zip(tiles.tiles[i:i + len(x)], probs):
            accumulate(acc, wsum, job.region, t, p,
                       tile_weights(t, info.height, info.width, job.tile_size, job.stride))
    return normalise(acc, wsum, tiles.valid[job.region.slices(within=tiles.window)])


def device_blend(segmenter: TensorSegmenter, job: ChunkJob, tiles: ChunkTiles, embeddings: Any) -> np.ndarray:
    """The device-resident path (:mod:`geoseg.model.device_chunk`, imports torch): (P, h, w)."""
    from .model.device_chunk import ChunkInput, blend_chunk

    info = job.info
    table = stretch_table(info, tiles.data.dtype)
    data, valid = tiles.data, tiles.valid
    if table is None:  # float / 32-bit data: the stretch is arithmetic, done here on the host
        data, valid = to_model_rgb(data, valid, info)
    inp = ChunkInput(data, valid, table, info.palette is not None, tiles.window, tiles.tiles, job.region,
                     (info.height, info.width), job.tile_size, job.stride)
    return blend_chunk(segmenter, inp, embeddings, len(job.prompts), job.batch_size,
                       post=functools.partial(apply_negatives, applies=job.applies))


def finish_chunk(job: ChunkJob, tiles: ChunkTiles, inference: ChunkInference) -> ChunkResult:
    """CPU stage: blend, write the probability part, polygonize the chunk's own region (its final
    polygons and its seam pieces, :func:`geoseg.streaming.write_chunk_polygons`), and write the
    done-record last (its presence is what makes the chunk count as finished)."""
    start = time.perf_counter()
    region = job.region
    probs = inference.probs
    if job.dtype == "uint8":  # polygons from the stored values, so `geoseg vectorize` finds the same ones
        stored = quantise(probs)
        probs = dequantise(stored)
    else:
        stored = probs
    with bounded_gdal_cache():
        write_part(job.path(".tif"), stored, job.info, region, job.prompts)
    own_valid = tiles.valid[region.slices(within=tiles.window)]
    if job.classes:
        labels = class_map(probs, own_valid & np.isfinite(probs).all(axis=0), job.thresholds)
        with bounded_gdal_cache():
            write_class_part(job.path(CLASS_PART), labels, job.info, region)
        probs = exclusive(probs, labels)
    n_pieces = 0
    if job.vector is not None:
        comps = chunk_components(probs, own_valid, region.row, region.col, job.thresholds)
        write_chunk_polygons(job.run_dir, region.name, comps, region, job.vector)
        n_pieces = sum(len(c) for c in comps)
    seconds = tiles.seconds + inference.seconds + time.perf_counter() - start
    result = ChunkResult(name=region.name, region=region, tiles=tiles.touching, model_tiles=len(tiles.tiles),
                         pieces=n_pieces, seconds=round(seconds, 3), worker=inference.worker,
                         model_revision=inference.model_revision)
    vector_key = job.vector.key() if job.vector is not None else None
    write_json_atomic(job.path(".json"), {"fingerprint": job.fingerprint, "vector_key": vector_key, **asdict(result)})
    return result
