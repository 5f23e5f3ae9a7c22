"""Every raster GDAL can open is either segmented correctly or refused with one clear error.

Generated rasters (``tests/rasters.py``) cover each input class; every run is checked for its
outcome, not just for not crashing: polygons in the right CRS, inside the footprint, exactly where
the probabilities reach the threshold, never over masked pixels; refusals raise the exact geoseg
error class with one line naming the file and leave nothing in the output directory.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely

import geoseg
from geoseg.raster import inspect_raster, open_input, read_rgb
from geoseg.tiling import Region

from .models import PerPixelSegmenter
from .rasters import (
    BLUE,
    COMPRESSIONS,
    RED,
    REFUSE_CASES,
    SEGMENT_CASES,
    UTM33,
    Case,
    check_refused,
    check_segmented,
    corrupt_tile,
    env_without_proxies,
    make_antimeridian_utm,
    make_compressed,
    make_truncated,
    no_output,
    read_polygons,
    scene,
    write,
)

PROMPTS = ("red roof", "blue pool")
CHUNK = 352


def config(case: Case, out: Path, **extra) -> geoseg.SegmentConfig:
    options = {"chunk_size": CHUNK, **case.options, **extra}
    return geoseg.SegmentConfig(str(case.path), PROMPTS, out, **options)


def run(case: Case, out: Path, client, factory, **extra) -> geoseg.RunResult:
    return geoseg.segment(config(case, out, **extra), client=client, segmenter_factory=factory)


def reference(case: Case, factory, path: str | None = None) -> np.ndarray:
    """The per-pixel model applied to the whole image at once, NaN where masked."""
    o = case.options
    info = inspect_raster(path or str(case.path), o.get("bands", ()), o.get("crs"), o.get("resolution"))
    with open_input(info) as src:
        rgb, valid = read_rgb(src, info, Region(0, 0, info.height, info.width))
    ref = factory().whole_image(rgb)
    ref[:, ~valid] = np.nan
    return ref


@contextmanager
def captured(logger: str = "geoseg"):
    """Records of ``logger`` (works with ``-p no:logging``, where caplog is unavailable)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, log = Keep(logging.INFO), logging.getLogger(logger)
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


#: Bands the run must feed the model, where the band choice is the point of the case.
EXPECTED_BANDS = {"rgba_alpha": [1, 2, 3], "rgb_nir": [1, 2, 3], "rgbn_no_colorinterp": [1, 2, 3],
                  "multispectral_bands": [4, 3, 2], "multispectral_described": [4, 3, 2],
                  "multispectral_one_band": [5], "grey": [1], "grey_alpha": [1], "paletted": [1]}


@pytest.mark.parametrize("name", list(SEGMENT_CASES))
def test_segments_correctly(name, tmp_path, inproc_client, perpixel):
    case = SEGMENT_CASES[name](tmp_path)
    result = run(case, tmp_path / "out", inproc_client, perpixel)
    gdf = check_segmented(result, case, reference=reference(case, perpixel))
    with rasterio.open(case.path) as src, rasterio.open(result.probabilities) as probs:
        assert (probs.width, probs.height) == (src.width, src.height), "full resolution by default"
        assert probs.transform == src.transform
    if name in EXPECTED_BANDS:
        manifest = json.loads((result.run_dir / "manifest.json").read_text())
        assert manifest["raster"]["bands"] == EXPECTED_BANDS[name]
    if name.startswith("antimeridian"):
        assert gdf.total_bounds[2] > (180 if name == "antimeridian_4326" else 0)


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_any_gdal_compression(compress, tmp_path, inproc_client, perpixel):
    try:
        path = make_compressed(tmp_path, compress)
    except rasterio.errors.RasterioError as exc:
        pytest.skip(f"this GDAL cannot write {compress}: {exc}")
    case = Case(path)
    with rasterio.open(path) as src:
        assert (src.profile.get("compress") is None) == (compress == "NONE")
    result = run(case, tmp_path / "out", inproc_client, perpixel)
    check_segmented(result, case, reference=reference(case, perpixel))


def test_paletted_input_is_expanded_through_the_palette(tmp_path):
    case = SEGMENT_CASES["paletted"](tmp_path)
    info = inspect_raster(str(case.path))
    with open_input(info) as src:
        rgb, valid = read_rgb(src, info, Region(0, 0, info.height, info.width))
        idx = src.read(1)
    assert np.array_equal(valid, case.valid)
    assert np.allclose(rgb[:, idx == 2].T, np.array(RED) / 255.0)
    assert np.allclose(rgb[:, idx == 3].T, np.array(BLUE) / 255.0)


def test_uint8_scale_offset_tags_do_not_change_what_the_model_sees(tmp_path):
    plain = write(tmp_path / "plain.tif", scene(200, 200, seed=23))
    scaled = SEGMENT_CASES["uint8_scale_offset"](tmp_path).path
    images = []
    for path in (plain, scaled):
        info = inspect_raster(str(path))
        with open_input(info) as src:
            images.append(read_rgb(src, info, Region(0, 0, 200, 200))[0])
    assert np.allclose(images[0], images[1], atol=1e-6)
    assert 0.5 < images[1].max() <= 1.0  # not crushed to black by the 0.01 scale


def test_nbits_data_uses_its_own_range(tmp_path):
    path = write(tmp_path / "nbits4.tif", (scene(100, 100, seed=1) // 16).astype(np.uint8), NBITS=4)
    info = inspect_raster(str(path))
    assert info.stretch == ((0.0, 15.0),) * 3


def test_scale_offset_with_percentile_stretch_is_consistent(tmp_path):
    """uint16 with scale/offset tags reads exactly like the same data without them (positive scale)."""
    case = SEGMENT_CASES["uint16_scale_offset"](tmp_path)
    plain = write(tmp_path / "plain16.tif", scene(200, 200, seed=22).astype(np.uint16) * 40)
    images = []
    for path in (plain, case.path):
        info = inspect_raster(str(path))
        with open_input(info) as src:
            images.append(read_rgb(src, info, Region(0, 0, 200, 200))[0])
    assert np.allclose(images[0], images[1], atol=1e-5)


def test_rgba_alpha_is_a_mask_not_a_channel(tmp_path):
    case = SEGMENT_CASES["rgba_alpha"](tmp_path)
    info = inspect_raster(str(case.path))
    assert info.bands == (1, 2, 3)
    with open_input(info) as src:
        rgb, valid = read_rgb(src, info, Region(0, 0, info.height, info.width))
    assert np.array_equal(valid, case.valid)
    assert (rgb[:, ~valid] == 0).all(), "masked pixels never reach the model with their colours"


def test_four_bands_without_colour_interpretation_warn(tmp_path):
    case = SEGMENT_CASES["rgbn_no_colorinterp"](tmp_path)
    with captured() as records:
        assert inspect_raster(str(case.path)).bands == (1, 2, 3)
    assert any("--bands" in r.getMessage() and r.levelno == logging.WARNING for r in records)


@pytest.mark.parametrize("kind", ["uint8_nodata", "float_nan_undeclared", "alpha_zero", "larger_than_sample"])
def test_all_nodata_gives_an_empty_valid_result_without_model_calls(kind, tmp_path, inproc_client, perpixel):
    if kind == "uint8_nodata":
        path = write(tmp_path / "all_nodata.tif", np.zeros((3, 200, 300), np.uint8), nodata=0)
    elif kind == "float_nan_undeclared":
        path = write(tmp_path / "all_nan.tif", np.full((1, 150, 200), np.nan, np.float32))
    elif kind == "alpha_zero":
        data = np.concatenate([scene(200, 200), np.zeros((1, 200, 200), np.uint8)])
        path = write(tmp_path / "all_transparent.tif", data, photometric="RGB", alpha="YES")
    else:  # long side beyond the decimated statistics read: the emptiness check must still be exact
        path = write(tmp_path / "long.tif", np.zeros((1, 20, 1500), np.uint16), nodata=0)
    with captured() as records:
        result = run(Case(path), tmp_path / "out", inproc_client, perpixel)
    assert PerPixelSegmenter.calls == 0 and result.model_tiles == 0
    assert result.features == 0
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("every pixel is masked" in m and str(path) in m for m in messages), messages
    gdf = read_polygons(result.polygons)
    assert len(gdf) == 0 and gdf.crs is not None and gdf.crs.to_epsg() == 32633
    assert list(gdf.columns)[:2] == ["prompt", "prompt_index"]
    with rasterio.open(result.probabilities) as ds:
        assert np.isnan(ds.read()).all()
    assert json.loads((result.run_dir / "manifest.json").read_text())["status"] == "complete"


def test_a_single_valid_pixel_is_not_all_masked(tmp_path):
    data = np.zeros((1, 30, 2100), np.uint16)
    data[0, 17, 1333] = 500  # missed by the decimated statistics read
    info = inspect_raster(str(write(tmp_path / "one.tif", data, nodata=0)))
    assert not info.all_masked


def test_cog_full_resolution_by_default_and_resolution_on_request(tmp_path, inproc_client, perpixel):
    case = SEGMENT_CASES["cog_overviews"](tmp_path)
    coarse = Case(case.path, options=dict(resolution=1.0))  # native 0.5 m: half the pixels per axis
    result = run(coarse, tmp_path / "coarse", inproc_client, perpixel)
    with rasterio.open(result.probabilities) as ds:
        assert (ds.width, ds.height) == (320, 300)
        assert ds.transform.a == pytest.approx(1.0) and ds.transform.e == pytest.approx(-1.0)
    check_segmented(result, coarse)


def test_dst_crs_4326_splits_polygons_at_the_antimeridian(tmp_path, inproc_client, perpixel):
    case = make_antimeridian_utm(tmp_path)
    native = run(case, tmp_path / "native", inproc_client, perpixel)
    native_gdf = check_segmented(native, case)
    lon = native_gdf.to_crs("EPSG:4326").geometry  # naive reprojection: crossing polygons wrap the globe
    assert (lon.bounds["maxx"] - lon.bounds["minx"]).max() > 180, "the scene must have polygons crossing 180°"
    vector = geoseg.VectorizeConfig(dst_crs="EPSG:4326")
    case.options["vector"] = vector
    case.crs = "EPSG:4326"
    result = run(case, tmp_path / "geo", inproc_client, perpixel, vector=vector)
    gdf = check_segmented(result, case)
    parts = gdf.geometry.explode(index_parts=False)
    widths = parts.bounds["maxx"] - parts.bounds["minx"]
    assert widths.max() < 5, "no polygon part may wrap around the globe"
    assert gdf.total_bounds[0] >= -180 and gdf.total_bounds[2] <= 180
    assert (parts.bounds["maxx"] > 179.9).any() and (parts.bounds["minx"] < -179.9).any()
    # the split polygons cover the same ground: total geodesic area within 0.5 %
    assert gdf["area_m2"].sum() == pytest.approx(native_gdf["area_m2"].sum(), rel=5e-3)


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(REFUSE_CASES))
def test_refused_before_anything_is_written(name, tmp_path, inproc_client, perpixel):
    case = REFUSE_CASES[name](tmp_path)
    out = tmp_path / "out"
    with pytest.raises(geoseg.GeosegError) as exc_info:
        run(case, out, inproc_client, perpixel)
    assert exc_info.match(case.match)
    check_refused(exc_info, case, out)
    assert not out.exists(), "a refused input must not create the output directory"
    assert PerPixelSegmenter.calls == 0


def test_refusal_on_the_command_line_is_one_line_and_nonzero_exit(tmp_path):
    from click.testing import CliRunner

    from geoseg.cli import main

    case = REFUSE_CASES["gcps_only"](tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", str(case.path), "-p", "roof", "-o", str(out), "-q"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: ") and str(case.path) in lines[0], lines
    assert "gdalwarp" in lines[0]
    assert not out.exists()


def _assert_failed_mid_run(exc_info, path: Path, out: Path) -> None:
    err = exc_info.value
    assert type(err) is geoseg.RasterReadError, f"{type(err).__name__}: {err}"
    text = str(err)
    assert "\n" not in text and str(path) in text
    no_output(out)


def test_block_that_fails_to_decode_mid_run_names_the_window(tmp_path, inproc_client, perpixel):
    path = write(tmp_path / "corrupt.tif", scene(384, 640, seed=60), tiled=True, blockxsize=128, blockysize=128,
                 compress="deflate", photometric="RGB")
    corrupt_tile(path, row=1, col=4)  # pixels rows 128..256, cols 512..640
    inspect_raster(str(path))  # opens and inspects fine: the damage only shows when the block is read
    out = tmp_path / "out"
    with pytest.raises(geoseg.GeosegError) as exc_info:
        run(Case(path), out, inproc_client, perpixel, retries=0)
    _assert_failed_mid_run(exc_info, path, out)
    assert exc_info.match(r"failed to read window .*rows \d+\.\.\d+, cols \d+\.\.\d+")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] != "complete"


def test_truncated_file_fails_mid_run(tmp_path, inproc_client, perpixel):
    case = make_truncated(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(geoseg.GeosegError) as exc_info:
        run(case, out, inproc_client, perpixel, retries=0)
    _assert_failed_mid_run(exc_info, Path(case.path), out)


def test_corrupt_block_found_by_the_statistics_read_is_refused_up_front(tmp_path, inproc_client, perpixel):
    data = scene(256, 256, seed=61).astype(np.uint16) * 100
    path = write(tmp_path / "corrupt16.tif", data, tiled=True, blockxsize=128, blockysize=128, compress="deflate")
    corrupt_tile(path, row=0, col=1)
    out = tmp_path / "out"
    with pytest.raises(geoseg.RasterReadError) as exc_info:
        run(Case(path), out, inproc_client, perpixel)
    assert str(path) in str(exc_info.value) and "\n" not in str(exc_info.value)
    assert not out.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, inproc_client, perpixel):
    case = SEGMENT_CASES["tiny_5x7"](tmp_path)
    out = tmp_path / "taken"
    out.write_text("mine")
    with pytest.raises(geoseg.OutputExistsError, match="not a directory"):
        run(case, out, inproc_client, perpixel)
    assert out.read_text() == "mine"


def test_output_dir_of_something_else_needs_overwrite(tmp_path, inproc_client, perpixel):
    case = SEGMENT_CASES["tiny_5x7"](tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "probabilities.tif").write_text("not ours")
    with pytest.raises(geoseg.OutputExistsError, match="--overwrite") as exc_info:
        run(case, out, inproc_client, perpixel)
    assert "\n" not in str(exc_info.value) and str(out) in str(exc_info.value)
    assert (out / "probabilities.tif").read_text() == "not ours"
    (out / "notes.txt").write_text("keep me")
    result = run(case, out, inproc_client, perpixel, overwrite=True)
    check_segmented(result, case)
    assert (out / "notes.txt").read_text() == "keep me"


# -- remote paths -------------------------------------------------------------------------------

class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (GDAL's /vsicurl/ reads byte ranges)."""

    ranges = 0

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not header or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        spec = header.strip().removeprefix("bytes=").split(",")[0]
        first, _, last = spec.partition("-")
        start = int(first) if first else max(0, size - int(last))
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        type(self).ranges += 1
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def end_headers(self):
        if not self.headers.get("Range"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            chunk = source.read(min(65536, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """A threaded HTTP server with Range support on 127.0.0.1 serving a folder; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    for key, value in env_without_proxies().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "20")

    class Handler(RangeHandler):
        ranges = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"/vsicurl/http://127.0.0.1:{server.server_address[1]}", Handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_remote_vsicurl_path(http_dir, tmp_path, inproc_client, perpixel):
    root, base, handler = http_dir
    src = write(tmp_path / "local.tif", scene(300, 330, seed=62), tiled=True, blockxsize=128, blockysize=128,
                compress="deflate", nodata=0)
    (root / "remote.tif").write_bytes(src.read_bytes())
    case = Case(f"{base}/remote.tif")
    result = run(case, tmp_path / "out", inproc_client, perpixel)
    assert handler.ranges > 0, "GDAL read the file by byte ranges"
    check_segmented(result, case, reference=reference(Case(src), perpixel))
    missing = Case(f"{base}/missing.tif")
    with pytest.raises(geoseg.RasterOpenError) as exc_info:
        run(missing, tmp_path / "out_missing", inproc_client, perpixel)
    assert missing.path in str(exc_info.value) and "\n" not in str(exc_info.value)
    assert not (tmp_path / "out_missing").exists()


# -- size extremes ------------------------------------------------------------------------------

def _peak_memory(tmp_path, name, shape, client, factory) -> tuple[int, geoseg.RunResult, Path]:
    import tracemalloc

    path = write(tmp_path / f"{name}.tif", scene(*shape, seed=63), BIGTIFF="YES", tiled=True, blockxsize=128,
                 blockysize=128, compress="deflate")
    tracemalloc.start()
    try:
        result = run(Case(path), tmp_path / f"{name}_out", client, factory, batch_size=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result, path


def test_bigtiff_memory_is_bounded_by_the_chunk_not_the_raster(tmp_path, inproc_client, perpixel, monkeypatch):
    """A BigTIFF 4x the size: no task reads more than one chunk plus its halo, and the Python-side
    peak (numpy included) grows by far less than one float copy of the raster (the growth left is
    Dask bookkeeping per task)."""
    import geoseg.stages as stages

    windows = []
    original = stages.read_window

    def recording(src, info, region):
        windows.append(region)
        return original(src, info, region)

    monkeypatch.setattr(stages, "read_window", recording)
    small, _, _ = _peak_memory(tmp_path, "small", (300, 1152), inproc_client, perpixel)
    big, result, path = _peak_memory(tmp_path, "big", (300, 4608), inproc_client, perpixel)
    assert result.chunks_run == 12  # 384 px chunks (352 rounded up to the 128 px blocks)
    assert max(w.width for w in windows) <= 384 + 2 * 352 and max(w.height for w in windows) <= 300
    whole_image_float = 3 * 300 * 4608 * 4
    assert big < small + whole_image_float / 2, f"4x the pixels: peak {small / 2**20:.1f} -> {big / 2**20:.1f} MiB"
    check_segmented(result, Case(path))


def test_huge_sparse_bigtiff_is_inspected_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.tif"  # 30 Gpx, no overviews; only one block holds data
    with rasterio.open(path, "w", driver="GTiff", width=200_000, height=150_000, count=1, dtype="uint16",
                       crs=UTM33, transform=rasterio.Affine(0.5, 0, 5e5, 0, -0.5, 4.6e6), nodata=0, tiled=True,
                       blockxsize=1024, blockysize=1024, BIGTIFF="YES", SPARSE_OK=True, compress="deflate") as dst:
        dst.write(np.full((1, 512, 512), 700, np.uint16), window=rasterio.windows.Window(0, 0, 512, 512))
    assert path.stat().st_size < 50 * 2**20
    tracemalloc.start()
    try:
        info = inspect_raster(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.width, info.height) == (200_000, 150_000)
    assert peak < 64 * 2**20
    assert info.stretch[0][0] == 700 and not info.all_masked
    assert shapely.Polygon([info.transform @ c for c in ((0, 0), (1, 0), (1, 1))]).area > 0
