"""Invariants of `geoseg segment` with a deterministic per-pixel model (DESIGN.md invariants 1, 2, 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine

import geoseg
from geoseg.raster import inspect_raster, open_input, read_rgb
from geoseg.tiling import Region

from .models import PerPixelSegmenter, TorchPerPixelSegmenter
from .rasters import NORTH_UP, scene, write


@pytest.fixture(params=["host", "device"])
def perpixel(request):
    """The per-pixel model on the host path (numpy) and on the device-resident path (torch, on
    the CPU here): every invariant below holds on both."""
    from .models import PerPixelFactory, TorchPerPixelFactory

    PerPixelSegmenter.calls = TorchPerPixelSegmenter.device_calls = 0
    factory = PerPixelFactory if request.param == "host" else TorchPerPixelFactory
    yield factory(weights=((1.0, 0.0, -0.5), (0.0, -0.5, 1.0)), bias=(0.3, 0.25))
    if request.param == "device":  # the device path really ran (not the host path as a fallback)
        assert TorchPerPixelSegmenter.device_calls > 0


def run(tmp_path, src, client, factory, name="out", prompts=("red roof", "blue pool"), **kw):
    cfg = geoseg.SegmentConfig(str(src), prompts, tmp_path / name, **kw)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


def whole_image(src, factory):
    info = inspect_raster(str(src))
    with open_input(info) as ds:
        rgb, valid = read_rgb(ds, info, Region(0, 0, info.height, info.width))
    ref = factory().whole_image(rgb)
    ref[:, ~valid] = np.nan
    return ref


def read_probs(result):
    with rasterio.open(result.probabilities) as ds:
        return ds.read()


@pytest.mark.parametrize("shape", [(700, 1000), (200, 150), (1, 500), (353, 353), (352, 900)])
def test_tiled_equals_whole_image(tmp_path, inproc_client, perpixel, shape):
    src = write(tmp_path / "in.tif", scene(*shape, seed=1))
    result = run(tmp_path, src, inproc_client, perpixel, chunk_size=400)
    got, ref = read_probs(result), whole_image(src, perpixel)
    assert got.shape == ref.shape
    # same bound as rasters.check_segmented: Σ(p·w)/Σw over <= 6 tiles of the same float32 p, at most
    # (3n - 1) float32 roundings of values <= 1 (1.0e-6); elementwise IEEE, so machine-independent
    assert np.nanmax(np.abs(got - ref)) <= 1e-6
    # the raster edges specifically (first/last rows and columns)
    for edge in (got[:, 0], got[:, -1], got[:, :, 0], got[:, :, -1]):
        assert np.isfinite(edge).all()
    assert np.abs(got[:, -1] - ref[:, -1]).max() <= 1e-6  # as above


def test_chunk_size_does_not_change_output(tmp_path, inproc_client, perpixel):
    src = write(tmp_path / "in.tif", scene(900, 1300, seed=2), tiled=True, blockxsize=128, blockysize=128)
    outs = [run(tmp_path, src, inproc_client, perpixel, name=f"c{c}", chunk_size=c) for c in (352, 600, 2048)]
    assert [o.chunks_run for o in outs] == [12, 6, 1]  # 384-, 640- and 2048-px chunks (block aligned)
    arrays = [read_probs(o) for o in outs]
    # exact by construction: a pixel gets the same tiles (the global grid) with the same model output
    # (one tile at a time, per-pixel model), summed in the same row-major order for any chunk size
    for a in arrays[1:]:
        assert np.array_equal(a, arrays[0], equal_nan=True)


def test_output_metadata_and_nodata(tmp_path, inproc_client, perpixel):
    data = scene(600, 700, seed=3)
    data[:, :100, :] = 0  # a nodata band across the top
    transform = Affine(2.0, 0.0, 300000.0, 0.0, -2.0, 5000000.0)
    src = write(tmp_path / "in.tif", data, crs="EPSG:32618", transform=transform, nodata=0)
    result = run(tmp_path, src, inproc_client, perpixel)
    with rasterio.open(result.probabilities) as ds:
        assert ds.crs.to_epsg() == 32618
        assert ds.transform == transform
        assert (ds.width, ds.height, ds.count) == (700, 600, 2)
        assert ds.descriptions == ("red roof", "blue pool")
        assert np.isnan(ds.nodata)
        assert ds.overviews(1) == [2], "a COG with overviews"
        assert ds.profile["compress"] == "deflate"
        probs = ds.read()
    assert np.isnan(probs[:, :100]).all()
    assert np.isfinite(probs[:, 100:]).all()
    assert ((probs[:, 100:] >= 0) & (probs[:, 100:] <= 1)).all()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["prompts"] == ["red roof", "blue pool"]
    assert manifest["geoseg_version"] == geoseg.__version__
    assert manifest["options"]["chunk_size"] == 4096
    assert all(c["status"] == "done" for c in manifest["chunks"].values())


def test_fully_masked_tiles_never_reach_the_model(tmp_path, inproc_client, perpixel):
    data = scene(704, 704, seed=4)
    data[:, :, :400] = 0  # left 400 columns nodata: the first tile column is fully masked
    src = write(tmp_path / "in.tif", data, nodata=0)
    result = run(tmp_path, src, inproc_client, perpixel, chunk_size=704)
    assert PerPixelSegmenter.calls == result.model_tiles
    tiles = json.loads((result.run_dir / "manifest.json").read_text())["chunks"]
    total = sum(c["tiles"] for c in tiles.values())
    assert total == 9 and result.model_tiles == 6


def test_resume_skips_finished_chunks(tmp_path, inproc_client, perpixel):
    src = write(tmp_path / "in.tif", scene(800, 800, seed=5))
    first = run(tmp_path, src, inproc_client, perpixel, chunk_size=400)
    assert first.chunks_run == 4
    before = read_probs(first)
    # simulate a run that died before one chunk finished: its done-record is missing
    last = sorted((first.run_dir / "parts").glob("*.json"))[-1]
    last.unlink()
    (first.run_dir / "probabilities.tif").unlink()
    PerPixelSegmenter.calls = 0
    again = run(tmp_path, src, inproc_client, perpixel, chunk_size=400)
    assert (again.chunks_run, again.chunks_skipped) == (1, 3)
    assert PerPixelSegmenter.calls == again.model_tiles == 4  # only that chunk's 2x2 tiles
    assert json.loads(last.read_text())["name"] == last.stem
    assert np.array_equal(read_probs(again), before, equal_nan=True)
    cog_bytes = again.probabilities.read_bytes()
    PerPixelSegmenter.calls = 0
    third = run(tmp_path, src, inproc_client, perpixel, chunk_size=400)
    assert third.chunks_run == 0 and PerPixelSegmenter.calls == 0
    assert third.probabilities.read_bytes() == cog_bytes  # the same file, byte for byte


def test_other_job_in_output_dir_is_refused(tmp_path, inproc_client, perpixel):
    src = write(tmp_path / "in.tif", scene(300, 300, seed=6))
    run(tmp_path, src, inproc_client, perpixel)
    with pytest.raises(geoseg.OutputExistsError, match="different input or options"):
        run(tmp_path, src, inproc_client, perpixel, prompts=("tree",))
    result = run(tmp_path, src, inproc_client, perpixel, prompts=("tree",), overwrite=True)
    with rasterio.open(result.probabilities) as ds:
        assert ds.descriptions == ("tree",)
    again = run(tmp_path, src, inproc_client, perpixel, prompts=("tree",), overwrite=True)
    assert (again.chunks_run, again.chunks_skipped) == (1, 0)  # --overwrite starts afresh, never resumes
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(geoseg.OutputExistsError, match="not a geoseg run"):
        run(tmp_path, src, inproc_client, perpixel, name="mine")
    run(tmp_path, src, inproc_client, perpixel, name="mine", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_uint16_uses_one_global_stretch(tmp_path, inproc_client):
    rng = np.random.default_rng(7)
    data = rng.integers(6000, 36000, (3, 500, 500)).astype(np.uint16)
    data[:, :, 250:] //= 3  # the right half is much darker: a per-tile stretch would equalise it
    src = write(tmp_path / "in.tif", data)
    info = inspect_raster(str(src))
    lo, hi = np.percentile(data[0].astype(float), [2, 98])
    # the stretch is a percentile of a block sample of the raster, not of every pixel: 2 %
    assert info.stretch[0] == pytest.approx((lo, hi), rel=0.02)
    with open_input(info) as ds:
        left, _ = read_rgb(ds, info, Region(0, 0, 500, 250))
        right, _ = read_rgb(ds, info, Region(0, 250, 500, 250))
    assert left.mean() > 2 * right.mean()
    assert 0 <= right.min() and left.max() <= 1


def test_resolution_reads_a_coarser_grid(tmp_path, inproc_client, perpixel):
    data = scene(800, 1000, seed=8)
    src = write(tmp_path / "in.tif", data)  # 0.5 m pixels
    result = run(tmp_path, src, inproc_client, perpixel, resolution=1.0, chunk_size=352)
    with rasterio.open(result.probabilities) as ds:
        assert (ds.width, ds.height) == (500, 400)
        assert ds.transform == NORTH_UP @ Affine.scale(2)
        got = ds.read()
    # reference: the model on the 2x2 block mean of the image (GDAL 'average' resampling)
    mean = data.reshape(3, 400, 2, 500, 2).astype(np.float64).mean(axis=(2, 4))
    ref = perpixel().whole_image((mean / 255).astype(np.float32))
    # GDAL's average resampling returns uint8 (rounded or truncated: |Δrgb| <= 1/255); the model's slope
    # is <= gain/4 · Σ|w_k| = 4.5, so |Δp| <= 0.018 < 0.02 (a modelling bound, not float noise)
    assert np.abs(got - ref).max() < 0.02
    assert json.loads((result.run_dir / "manifest.json").read_text())["raster"]["resampled"] is True


def _features(path):
    import geopandas as gpd

    gdf = gpd.read_file(path, layer="segments")
    return list(gdf.geometry.to_wkb()), gdf.drop(columns="geometry").values.tolist()


def test_no_polygons_then_vectorize_or_resume_gives_the_segment_polygons(tmp_path, inproc_client, perpixel):
    """--no-polygons writes probabilities only; `vectorize` later, or a resumed `segment` with
    polygons (which remakes the chunks' polygon parts from their probability parts), writes the
    same rows in the same order as a run that made polygons from the start."""
    src = write(tmp_path / "in.tif", scene(700, 900, seed=5))
    full = run(tmp_path, src, inproc_client, perpixel, name="full", chunk_size=352)
    bare = run(tmp_path, src, inproc_client, perpixel, name="bare", chunk_size=352, polygons=False)
    assert bare.polygons is None and bare.features == 0
    assert not list((tmp_path / "bare").glob("polygons.*"))
    manifest = json.loads((tmp_path / "bare" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "polygons" not in manifest["outputs"]
    assert np.array_equal(read_probs(bare), read_probs(full), equal_nan=True)

    path, n = geoseg.vectorize(tmp_path / "bare", geoseg.VectorizeConfig())
    assert n == full.features > 0
    assert _features(path) == _features(full.polygons)

    path.unlink()
    resumed = run(tmp_path, src, inproc_client, perpixel, name="bare", chunk_size=352)
    assert resumed.chunks_run == 0 and resumed.features == full.features
    assert _features(resumed.polygons) == _features(full.polygons)
