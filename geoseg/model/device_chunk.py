"""The device-resident chunk path: one chunk in, its blended probabilities (P, h, w) out.

The host path cuts and stretches tiles on the CPU, ships (N, 3, T, T) float32 to the device and
(N, P, T, T) float32 back, then blends on the CPU: at 4096² chunks that is ~0.4 s of CPU work and
~125 MB per prompt over the bus per chunk, which starves a GPU many times over. Here instead:

1. the raw halo goes to the device ONCE, in its own dtype (bytes for most imagery; from pinned
   memory, in row bands on a copy stream, so the upload of later rows overlaps the encoder's work
   on earlier ones);
2. on the device it goes through the run's global look-up table (:func:`geoseg.raster.stretch_table`,
   the table the host path indexes too), is masked and normalised, once per halo pixel;
3. tiles are sliced out of that image, run through the model in batches sized to device memory;
4. the blend accumulates on the device with the same Tukey weights (:func:`geoseg.tiling.axis_weights`)
   in the same tile order as :func:`geoseg.blend.accumulate`;
5. only the normalised chunk (P, h, w), NaN where masked, comes back.

The same code runs on CPU (streams and pinning are then skipped). Every step is an exactly
rounded float32 operation in the same order as the host path (table look-ups, ``x - mean``,
``/ std``, ``p * w``, ``+=``, ``/``), so on CPU the result equals the host path bit for bit for
the same tile probabilities; only the model's own arithmetic may differ with the batch layout.
Memory: the normalised halo is 12 bytes per halo pixel (~230 MB at a 4096² chunk) plus one batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ModelOutOfMemoryError
from ..tiling import Region, axis_weights

#: Rows per upload band: small enough that the first batch starts early, large enough that a band
#: is one efficient copy (512 rows x 4400 px = 2.2 MB per byte band).
BAND_ROWS = 512
#: Fraction of the device's free memory a batch may plan to use (the rest: allocator slack, other
#: threads' chunks, the halo itself).
MEMORY_FRACTION = 0.5
#: Largest batch worth running: beyond this a GPU is saturated and latency only grows.
MAX_BATCH = 256


@dataclass(frozen=True)
class ChunkInput:
    """What the device path needs from the read stage (host arrays, picklable).

    ``data`` is the raw halo (B, h, w) when ``table`` is given, else the already stretched
    (3, h, w) float32 0..1 image (float rasters, whose stretch is arithmetic). ``valid`` is the
    halo's (h, w) mask. ``tiles`` are global-grid tiles in row-major order; ``region`` is the
    chunk's own area inside ``window``; ``shape`` the raster's (height, width).
    """

    data: np.ndarray
    valid: np.ndarray
    table: np.ndarray | None
    palette: bool
    window: Region
    tiles: tuple[Region, ...]
    region: Region
    shape: tuple[int, int]
    tile: int
    stride: int


def batch_size(segmenter: Any, configured: int | None, n_prompts: int) -> int:
    """Tiles per model call: ``configured`` if given; on CUDA otherwise what fits in half the free
    memory (``torch.cuda.mem_get_info``) at the segmenter's ``bytes_per_tile``; else 8."""
    if configured:
        return configured
    device = torch.device(getattr(segmenter, "device", "cpu"))
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_tile = segmenter.bytes_per_tile(n_prompts) if hasattr(segmenter, "bytes_per_tile") else 64 << 20
    return int(max(1, min(MAX_BATCH, free * MEMORY_FRACTION // per_tile)))


class _Halo:
    """The normalised (3, H, W) model image of the halo on the device, filled band by band.

    ``H, W`` are at least one tile (a raster smaller than a tile is zero padded, as the host path
    pads its tiles). Rows are uploaded on a side stream at construction and stretched lazily, the
    first time a batch needs them, so the copy of later bands overlaps earlier batches' compute.
    """

    def __init__(self, inp: ChunkInput, device: torch.device, mean: Sequence[float], std: Sequence[float]):
        self.inp, self.device = inp, device
        h, w = inp.valid.shape
        self.h, self.w = h, w
        self.cuda = device.type == "cuda"
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
        rows = max(h, inp.tile)
        self.image = torch.empty((3, rows, max(w, inp.tile)), dtype=torch.float32, device=device)
        data = inp.data[:1] if inp.palette else inp.data
        if data.dtype == np.uint16:  # uint16 has few device kernels: ship the bits as int16
            data = data.view(np.int16)
        self.mask_bits = {np.dtype(np.int8): 0xFF, np.dtype(np.int16): 0xFFFF}.get(data.dtype)
        self.table = None if inp.table is None else torch.tensor(inp.table, device=device)
        self.bands = [(r, min(r + BAND_ROWS, rows)) for r in range(0, rows, BAND_ROWS)]
        self.done = 0  # bands stretched so far
        host = [torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(np.ascontiguousarray(inp.valid))]
        if self.cuda:
            host = [t.pin_memory() for t in host]
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.raw = torch.empty(host[0].shape, dtype=host[0].dtype, device=device)
        self.valid = torch.empty(host[1].shape, dtype=torch.bool, device=device)
        self.events = []
        for r0, r1 in self.bands:  # one contiguous copy per band of rows per channel
            r1 = min(r1, h)
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                if r0 < r1:
                    for b in range(host[0].shape[0]):
                        self.raw[b, r0:r1].copy_(host[0][b, r0:r1], non_blocking=self.cuda)
                    self.valid[r0:r1].copy_(host[1][r0:r1], non_blocking=self.cuda)
                if self.cuda:
                    event = torch.cuda.Event()
                    event.record(self.stream)
                    self.events.append(event)
        self._host = host  # pinned buffers must outlive their asynchronous copies

    def ensure_rows(self, stop: int) -> None:
        """Stretch, mask and normalise every band up to row ``stop`` (in halo rows)."""
        while self.done < len(self.bands) and self.bands[self.done][0] < stop:
            r0, r1 = self.bands[self.done]
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.events[self.done])
            self._stretch(r0, r1)
            self.done += 1

    def _stretch(self, r0: int, r1: int) -> None:
        out = self.image[:, r0:r1]
        v0, v1 = r0, min(r1, self.h)
        if v1 - v0 < r1 - r0 or self.w < out.shape[2]:
            out.zero_()  # padding beyond the raster (smaller than a tile) is 0 before normalising
        if v0 < v1:
            raw = self.raw[:, v0:v1]
            if self.table is None:  # float rasters: stretched (and masked) on the host
                out[:, : v1 - v0, : self.w] = raw
            else:
                index = raw.to(torch.int32)
                if self.mask_bits is not None:  # signed or int16-shipped values → unsigned bit pattern
                    index = index & self.mask_bits
                if self.inp.palette:
                    flat = index[0].clamp(0, self.table.shape[1] - 1).flatten()
                    rgb = torch.stack([torch.index_select(t, 0, flat) for t in self.table])
                else:  # index_select: a plain gather, 4x faster on CPU than advanced indexing
                    rgb = torch.stack([torch.index_select(t, 0, i.flatten()) for t, i in zip(self.table, index)])
                rgb = rgb.view(-1, v1 - v0, self.w).masked_fill_(~self.valid[v0:v1], 0.0)
                out[:, : v1 - v0, : self.w] = rgb  # one band (grey) broadcasts to R, G, B
        out.sub_(self.mean).div_(self.std)

    def tiles(self, batch: Sequence[Region]) -> torch.Tensor:
        """(n, 3, T, T) normalised model input for global-grid tiles (halo-relative slices)."""
        t, (r0, c0) = self.inp.tile, (self.inp.window.row, self.inp.window.col)
        self.ensure_rows(max(b.row - r0 for b in batch) + t)
        out = torch.empty((len(batch), 3, t, t), dtype=torch.float32, device=self.device)
        for k, b in enumerate(batch):
            out[k].copy_(self.image[:, b.row - r0:b.row - r0 + t, b.col - c0:b.col - c0 + t])
        return out

    def release(self) -> None:
        if self.cuda:  # the copies must be finished before their pinned buffers may be reused
            self.stream.synchronize()
        self._host = []


class _Weights:
    """Tukey weights of global-grid tiles on the device, one (T, T) map per kind of tile.

    A tile's weights depend only on whether each of its sides lies on the raster border, so a chunk
    has at most 9 distinct maps; each is the float64 outer product cast to float32, exactly as
    :func:`geoseg.tiling.tile_weights` computes it.
    """

    def __init__(self, shape: tuple[int, int], tile: int, stride: int, device: torch.device):
        self.shape, self.tile, self.stride, self.device = shape, tile, stride, device
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, t: Region) -> torch.Tensor:
        height, width = self.shape
        key = (t.row == 0, t.row + self.tile >= height, t.col == 0, t.col + self.tile >= width)
        if key not in self.cache:
            wy = torch.from_numpy(axis_weights(t.row, height, self.tile, self.stride)).to(self.device)
            wx = torch.from_numpy(axis_weights(t.col, width, self.tile, self.stride)).to(self.device)
            self.cache[key] = torch.outer(wy, wx).to(torch.float32)
        return self.cache[key]


@contextlib.contextmanager
def _threads(device: torch.device, n: int):
    """On CPU, run the enclosed torch ops on ``n`` intra-op threads (then restore the setting).

    The chunk path's bookkeeping is ~1,000 small ops (a tile copy, a weighted add) per chunk; on a
    busy machine each multi-threaded op pays an OpenMP barrier that costs more than the op
    (measured: a 352² weighted add 1 ms on one thread, 20 ms on two threads of a loaded 2-core
    machine). The model keeps every thread; on CUDA this changes nothing.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def blend_chunk(segmenter: Any, inp: ChunkInput, embeddings: Any, n_prompts: int,
                batch: int | None = None, post: Callable[[Any], Any] | None = None) -> np.ndarray:
    """Blended probabilities (P, h, w) float32 of the chunk's own region, NaN where masked.

    ``segmenter`` is a :class:`~geoseg.model.base.TensorSegmenter`; ``batch`` tiles per model call
    (None: sized to device memory, see :func:`batch_size`); ``post`` maps each batch's model output
    to the P bands that are blended (negative prompts, :func:`geoseg.prompts.apply_negatives`).
    """
    device = torch.device(segmenter.device)
    model_threads = torch.get_num_threads()
    with _threads(device, 1):
        return _blend_chunk(segmenter, inp, embeddings, n_prompts, batch, device, model_threads, post)


def _blend_chunk(segmenter: Any, inp: ChunkInput, embeddings: Any, n_prompts: int, batch: int | None,
                 device: torch.device, model_threads: int, post: Callable[[Any], Any] | None) -> np.ndarray:
    region, window = inp.region, inp.window
    halo = _Halo(inp, device, segmenter.pixel_mean, segmenter.pixel_std)
    weights = _Weights(inp.shape, inp.tile, inp.stride, device)
    acc = torch.zeros((n_prompts, region.height, region.width), dtype=torch.float32, device=device)
    wsum = torch.zeros((region.height, region.width), dtype=torch.float32, device=device)
    step = batch_size(segmenter, batch, n_prompts)
    try:
        i = 0
        while i < len(inp.tiles):
            part = inp.tiles[i:i + step]
            try:
                x = halo.tiles(part)
                with _threads(device, model_threads):
                    probs = segmenter.predict_tensor(x, embeddings)
                    if post is not None:
                        probs = post(probs)
            except torch.cuda.OutOfMemoryError as exc:
                if step == 1:
                    raise ModelOutOfMemoryError(f"out of memory on {device} at one tile: {exc}") from exc
                torch.cuda.empty_cache()
                step = max(1, step // 2)
                continue
            for t, p in zip(part, probs):
                inter = t.intersection(region)
                assert inter is not None  # the chunk's tiles all touch it (tiles_touching)
                in_tile, in_region = inter.slices(within=t), inter.slices(within=region)
                w = weights(t)[in_tile]
                acc[(slice(None), *in_region)] += p[(slice(None), *in_tile)] * w
                wsum[in_region] += w
            i += len(part)
        valid = halo.valid[region.slices(within=window)]
        ok = valid & (wsum > 0)
        return acc.div_(wsum).masked_fill_(~ok, math.nan).cpu().numpy()
    finally:
        halo.release()
