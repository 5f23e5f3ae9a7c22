"""The device-resident chunk path (geoseg.model.device_chunk) against the host path, on the CPU.

Both paths read the same halo; the device path uploads it raw, stretches it through the same look-up
table, slices tiles, runs the same model and blends on the device. On the CPU its model input must
equal the host path's bit for bit (same table values, same float32 ``(x - mean) / std``), and its
blended probabilities must equal the host path's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.model.clipseg import ClipSegSegmenter
from geoseg.model.device_chunk import ChunkInput, _Halo, blend_chunk
from geoseg.raster import inspect_raster, stretch_table, to_model_rgb
from geoseg.stages import ChunkJob, device_blend, host_blend, plan_chunks, read_chunk

from . import rasters
from .rasters import scene, write

PROMPTS = ("building", "swimming pool")

CASES = {
    "rgb uint8": rasters.make_rgb,
    "uint16": rasters.make_uint16,
    "int16 negative, nodata": rasters.make_int16_negative,
    "palette": rasters.make_paletted,
    "float32 NaN": rasters.make_float32_nan_undeclared,
    "grey + alpha": rasters.make_grey_alpha,
    "5x7 (smaller than a tile)": rasters.make_tiny_5x7,
    "internal mask": rasters.make_internal_mask,
}


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_model_dir):
    return ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")


def big_uint16_masked(d):
    """Several chunks and tiles: uint16 with a nodata collar, so tiles and chunks are partly masked."""
    img = scene(700, 900, seed=31).astype(np.uint16) * 100 + 3000
    valid = rasters._valid_collar(700, 900)
    img[:, ~valid] = 0
    return rasters.Case(write(d / "big_u16.tif", img, nodata=0), valid=valid)


def jobs_for(path, segmenter_factory=None, chunk_size=4096, batch_size=3, **options):
    info = inspect_raster(str(path), **options)
    return [ChunkJob(r, info, PROMPTS, (0.5, 0.5), 352, 264, batch_size, "unused", "fp", segmenter_factory)
            for r in plan_chunks(info, chunk_size)]


def halo_input(job, tiles):
    info = job.info
    table = stretch_table(info, tiles.data.dtype)
    data, valid = (tiles.data, tiles.valid) if table is not None else to_model_rgb(tiles.data, tiles.valid, info)
    return ChunkInput(data, valid, table, info.palette is not None, tiles.window, tiles.tiles, job.region,
                      (info.height, info.width), job.tile_size, job.stride)


@pytest.mark.parametrize("name", list(CASES) + ["uint16 masked, 4 chunks"])
def test_device_model_input_equals_host_bit_for_bit(tmp_path, tiny_segmenter, name):
    case = big_uint16_masked(tmp_path) if name.startswith("uint16 masked") else CASES[name](tmp_path)
    for job in jobs_for(case.path, chunk_size=400, **case.options):
        tiles = read_chunk(job)
        if not tiles.tiles:
            continue
        halo = _Halo(halo_input(job, tiles), torch.device("cpu"), tiny_segmenter.pixel_mean, tiny_segmenter.pixel_std)
        got = halo.tiles(tiles.tiles).numpy()
        host = np.concatenate(list(tiles.batches(job.info, 4)))
        want = ((torch.from_numpy(host) - tiny_segmenter.mean) / tiny_segmenter.std).numpy()
        assert np.array_equal(got, want), f"{name}: chunk {job.region}"


@pytest.mark.parametrize("name", ["rgb uint8", "int16 negative, nodata", "palette", "float32 NaN",
                                  "5x7 (smaller than a tile)", "uint16 masked, 4 chunks"])
def test_device_blend_equals_host_blend(tmp_path, tiny_segmenter, name):
    """Same model input, same batches, same model: the blends agree.

    Tolerance 1e-6: the two paths hand the model identical float32 tensors in identical batches and
    accumulate ``p * w`` in the same tile order with the same float32 operations, so they agree
    exactly unless a BLAS kernel's result depends on the buffer's memory alignment (oneDNN/MKL may
    pick another code path); that moves a probability by a few ulps (~1e-7), never more.
    """
    case = big_uint16_masked(tmp_path) if name.startswith("uint16 masked") else CASES[name](tmp_path)
    emb = tiny_segmenter.encode_prompts(PROMPTS)
    for job in jobs_for(case.path, chunk_size=400, **case.options):
        tiles = read_chunk(job)
        if not tiles.tiles:
            continue
        host = host_blend(tiny_segmenter, job, tiles, emb)
        dev = device_blend(tiny_segmenter, job, tiles, emb)
        assert dev.shape == host.shape == (2, job.region.height, job.region.width)
        assert np.array_equal(np.isnan(dev), np.isnan(host))
        if case.valid is not None:  # NaN exactly where the input is masked
            own = case.valid[job.region.slices()]
            assert np.array_equal(np.isnan(dev[0]), ~own)
        np.testing.assert_allclose(dev, host, rtol=0, atol=1e-6, equal_nan=True)


def test_batch_size_does_not_change_the_device_blend(tmp_path, tiny_segmenter):
    """A batch of 1, 3 or all tiles: same tile probabilities (to BLAS rounding), same blend."""
    case = big_uint16_masked(tmp_path)
    emb = tiny_segmenter.encode_prompts(PROMPTS)
    job = jobs_for(case.path)[0]
    tiles = read_chunk(job)
    inp = halo_input(job, tiles)
    outs = [blend_chunk(tiny_segmenter, inp, emb, 2, b) for b in (1, 3, len(tiles.tiles))]
    for o in outs[1:]:  # different GEMM shapes: rounding may differ by a few ulps (see above)
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-6, equal_nan=True)
