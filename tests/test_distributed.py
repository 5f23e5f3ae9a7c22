"""geoseg on real multi-process Dask clusters: same output as one process, worker and client deaths,
GPU-resource placement, and failures that stop the run with a message naming the chunk.

One 2-worker LocalCluster (geoseg's own ``dask_client``) is shared by the module to keep it fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

import geoseg
from geoseg.scheduling import dask_client

from .faulty_models import BIAS, WEIGHTS, KillOnceFactory, OutOfMemoryFactory
from .models import PerPixelFactory
from .rasters import scene, write

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("red roof", "blue pool")


@pytest.fixture(scope="module")
def cluster_client():
    """Two single-threaded worker processes; a chunk may kill its worker once before KilledWorker."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with dask_client(workers=2) as client:
            client.wait_for_workers(2, timeout=60)
            yield client


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    """1000 x 1200 px, 256 px tiles: 400 px chunks round up to 512 → 2 x 3 = 6 chunks."""
    path = tmp_path_factory.mktemp("raster") / "in.tif"
    return write(path, scene(1000, 1200, seed=11), tiled=True, blockxsize=256, blockysize=256,
                 compress="deflate")


def config(src, out, **kw) -> geoseg.SegmentConfig:
    return geoseg.SegmentConfig(str(src), PROMPTS, out, chunk_size=kw.pop("chunk_size", 400), **kw)


def outputs(result):
    with rasterio.open(result.probabilities) as ds:
        probs = ds.read()
    gdf = gpd.read_file(result.polygons, layer="segments")
    return probs, sorted(gdf.geometry.to_wkb()), list(gdf.drop(columns="geometry").itertuples(index=False))


def assert_same(a, b):
    pa, ga, aa = outputs(a)
    pb, gb, ab = outputs(b)
    assert np.array_equal(pa, pb, equal_nan=True)
    assert ga == gb and len(ga) > 0
    assert sorted(aa) == sorted(ab)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, raster, inproc_client):
    """The undisturbed single-process run everything below must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return geoseg.segment(config(raster, out), client=inproc_client,
                          segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))


def workers_of(result) -> list[str]:
    return [c.worker for c in result.manifest.chunks.values()]


def test_two_worker_processes_equal_single_process(tmp_path, raster, reference, cluster_client):
    # by address, the way `geoseg segment --scheduler tcp://host:8786` connects
    cfg = config(raster, tmp_path / "run", scheduler=cluster_client.scheduler.address)
    result = geoseg.segment(cfg, segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert result.chunks_run == reference.chunks_run == 6
    assert len(set(workers_of(result))) == 2, "both worker processes ran chunks"
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in workers_of(result)}
    assert_same(result, reference)


def test_geosegs_own_workers_keep_no_profile_history(cluster_client):
    """Dask's profiler would keep a call tree per second for 1,000 s in every worker (~90 MiB by
    the end of a 16384² run; scheduling.dask_client). Checked after a run on these workers."""
    def profiling(dask_worker):
        return dask.config.get("distributed.worker.profile.enabled"), len(dask_worker.profile_history)

    assert set(cluster_client.run(profiling).values()) == {(False, 0)}


def test_class_map_with_hole_filling_on_worker_processes_equals_one_chunk(tmp_path, raster, cluster_client,
                                                                          inproc_client):
    """--classes --fill-holes: chunk tasks on two worker processes finalize what the streaming rules
    let them, the client the rest; the features equal the raster segmented as one chunk. (The
    rules' hard cases, islands in holes closed across seams and class-map noding context, are
    built on purpose in tests/test_streaming.py; this runs the machinery on real workers.)"""
    kw = {"classes": True, "vector": geoseg.VectorizeConfig(fill_holes=30.0, min_area=2.0)}
    factory = PerPixelFactory(WEIGHTS, BIAS)
    one = geoseg.segment(config(raster, tmp_path / "one", chunk_size=1280, **kw), client=inproc_client,
                         segmenter_factory=factory)
    many = geoseg.segment(config(raster, tmp_path / "many", **kw), client=cluster_client, segmenter_factory=factory)
    assert (one.chunks_run, many.chunks_run) == (1, 6)
    assert_same(one, many)
    final_rows = sum(pq.read_metadata(p).num_rows for p in (many.run_dir / "parts").glob("*.polygons.parquet"))
    assert 0 < final_rows < many.features  # both sides did part of the work


def test_a_single_threaded_worker_holds_one_chunk_at_a_time(tmp_path, raster, inproc_client):
    """The default window is one chunk per worker thread: a chunk's read and inference never run
    while another chunk's stages are unfinished on that worker, where they would only wait in its
    memory (two per worker made the 8192² bench's polygon stage peak 130 MiB higher, for no speed)."""
    from distributed import get_task_stream

    with get_task_stream(client=inproc_client) as stream:
        result = geoseg.segment(config(raster, tmp_path / "run"), client=inproc_client,
                                segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert result.chunks_run == 6
    starts = sorted((min(s["start"] for s in t["startstops"]), t["key"]) for t in stream.data)
    chunk_of = [re.sub(r"^geoseg-(read-|infer-)?", "", key) for _, key in starts if not key.endswith("-prompts")]
    assert len(chunk_of) == 18
    runs = [c for i, c in enumerate(chunk_of) if i == 0 or c != chunk_of[i - 1]]
    assert len(runs) == 6, f"stages of chunks interleaved on the worker: {chunk_of}"


def test_worker_killed_mid_run_gives_same_output(tmp_path, raster, reference, cluster_client):
    marker = tmp_path / "killed"
    factory = KillOnceFactory("r0000512_c0000512", marker)
    result = geoseg.segment(config(raster, tmp_path / "run"), client=cluster_client, segmenter_factory=factory)
    assert marker.exists(), "a worker was SIGKILLed while running chunk r0000512_c0000512"
    killed_pid = int(marker.read_text().split()[0])
    chunk = result.manifest.chunks["r0000512_c0000512"]
    assert chunk.status == "done" and not chunk.worker.endswith(f":{killed_pid}")
    assert result.chunks_run == 6
    assert_same(result, reference)
    cluster_client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_chunk_that_keeps_killing_workers_names_the_chunk(tmp_path, raster, cluster_client):
    factory = KillOnceFactory("r0000000_c0000512", tmp_path / "kills", always=True)
    # Dask blames every chunk that was on a dying worker, so the one named may be a bystander
    with pytest.raises(geoseg.ChunkFailedError, match=r"^chunk r\d{7}_c\d{7} \(rows \d+\.\.\d+, cols \d+\.\.\d+\): "
                                                       r"the worker processes running it died repeatedly"):
        geoseg.segment(config(raster, tmp_path / "run"), client=cluster_client, segmenter_factory=factory)
    assert len((tmp_path / "kills").read_text().split()) == 2  # allowed-failures=1: the second death stops it
    assert not (tmp_path / "run" / "probabilities.tif").exists()
    cluster_client.wait_for_workers(2, timeout=60)


CLIENT_RUN = """
import json, sys
import geoseg
from tests.faulty_models import SlowFactory
vector = geoseg.VectorizeConfig(simplify=float(sys.argv[4]))
cfg = geoseg.SegmentConfig(sys.argv[1], ("red roof", "blue pool"), sys.argv[2], chunk_size=352, workers=2,
                           vector=vector, classes=sys.argv[5] == "True")
r = geoseg.segment(cfg, segmenter_factory=SlowFactory(float(sys.argv[3])))
print(json.dumps({"run": r.chunks_run, "skipped": r.chunks_skipped}))
"""


def _segment_process(src, out, delay, simplify=0.0, classes=False):
    return subprocess.Popen([sys.executable, "-c", CLIENT_RUN, str(src), str(out), str(delay), str(simplify),
                             str(classes)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(proc, ready) -> None:
    """SIGKILL the client process as soon as ``ready()`` holds (fail if it exits or stalls first), then
    give its orphaned worker processes a moment to notice their parent is gone."""
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    time.sleep(1.0)


def test_client_killed_mid_run_resumes_with_same_output(tmp_path, inproc_client):
    src = write(tmp_path / "in.tif", scene(1056, 1056, seed=12))  # 352 px chunks: 3 x 3 = 9
    ref = geoseg.segment(config(src, tmp_path / "ref", chunk_size=352), client=inproc_client,
                         segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    out = tmp_path / "run"
    _kill_when(_segment_process(src, out, delay=0.4), lambda: len(finished_chunks(out)) >= 3)
    finished = finished_chunks(out)
    all_chunks = {f"r{r:07d}_c{c:07d}" for r in (0, 352, 704) for c in (0, 352, 704)}
    assert finished < all_chunks and len(finished) >= 3
    done = len(finished)
    assert not (out / "probabilities.tif").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    again = _segment_process(src, out, delay=0.0)
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    counts = json.loads(stdout.strip().splitlines()[-1])
    assert counts == {"run": 9 - done, "skipped": done}, "no finished chunk recomputed"
    result = geoseg.segment(config(src, out, chunk_size=352), client=inproc_client,
                            segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert (result.chunks_run, result.chunks_skipped) == (0, 9)
    assert finished_chunks(out) == all_chunks
    assert_same(result, ref)


def finished_chunks(run_dir):
    """Names of chunks with a done-record, counted as the product counts them: ``[!.]*.json``. A
    writer killed mid-write leaves a hidden temp file (``.name.tmp-....json``) that is not a record."""
    return {p.stem for p in (run_dir / "parts").glob("[!.]*.json")}


def test_gpu_tasks_run_only_on_gpu_worker(tmp_path, raster, reference):
    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {"cpu": {"cls": Nanny, "options": {"nthreads": 1}},
               "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        info = client.scheduler_info()["workers"]
        gpu_addr = next(a for a, w in info.items() if w.get("resources", {}).get("GPU"))
        gpu_pid = client.run(os.getpid, workers=[gpu_addr])[gpu_addr]
        result = geoseg.segment(config(raster, tmp_path / "run"), client=client,
                                segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert {int(w.rsplit(":", 1)[1]) for w in workers_of(result)} == {gpu_pid}
    assert_same(result, reference)


def test_corrupt_block_stops_with_the_window_not_a_traceback(tmp_path, inproc_client):
    src = write(tmp_path / "in.tif", scene(768, 768, seed=13), tiled=True, blockxsize=256, blockysize=256,
                compress="deflate")
    with rasterio.open(src) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    data = bytearray(src.read_bytes())
    data[offset:offset + size] = b"\xff" * size
    src.write_bytes(bytes(data))
    start = time.monotonic()
    with pytest.raises(geoseg.RasterReadError, match=r"failed to read window .*rows \d+\.\.\d+, cols \d+\.\.\d+"):
        geoseg.segment(config(src, tmp_path / "run", retries=1), client=inproc_client,
                       segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert time.monotonic() - start < 20
    assert not (tmp_path / "run" / "probabilities.tif").exists()


def test_out_of_memory_is_not_retried_and_names_the_chunk(tmp_path, raster, inproc_client):
    counter = tmp_path / "attempts"
    factory = OutOfMemoryFactory("r0000000_c0000000", counter)
    with pytest.raises(geoseg.ChunkFailedError, match=r"r0000000_c0000000 \(rows 0\.\.512, cols 0\.\.512\) "
                                                       r"ran out of GPU memory at batch size auto"):
        geoseg.segment(config(raster, tmp_path / "run", retries=3), client=inproc_client, segmenter_factory=factory)
    assert counter.read_text() == "x", "a deterministic failure is not retried"


def test_unreachable_scheduler_is_a_clear_error(tmp_path, raster):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(geoseg.GeosegError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
            geoseg.segment(config(raster, tmp_path / "run", scheduler="tcp://127.0.0.1:9"),
                           segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))


@pytest.mark.parametrize(("simplify", "classes"), [
    (0.0, False),
    (1.0, False),  # the client simplifies in order, a band at a time
    (1.0, True),   # a class map's coverage too, its shared edges held
])
def test_client_killed_mid_streaming_write_resumes_without_lost_or_doubled_polygons(tmp_path, inproc_client,
                                                                                     simplify, classes):
    """The client is killed while its polygon file is open and chunks are being appended to it;
    the resumed run deletes the half-written temp file, rebuilds the output from the chunk parts,
    and has exactly the features of an undisturbed run with another chunk size."""
    src = write(tmp_path / "in.tif", scene(1056, 1056, seed=12))
    vector = geoseg.VectorizeConfig(simplify=simplify)
    ref = geoseg.segment(config(src, tmp_path / "ref", chunk_size=512, vector=vector, classes=classes),
                         client=inproc_client,
                         segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))  # 3 x 3 chunks of another size
    out = tmp_path / "run"
    # finished chunks counted as the product counts them (a killed writer's hidden temp is not one)
    _kill_when(_segment_process(src, out, delay=0.4, simplify=simplify, classes=classes),
               lambda: len(finished_chunks(out)) >= 3 and bool(list(out.glob(".polygons.tmp-*.gpkg"))))
    assert list(out.glob(".polygons.tmp-*.gpkg")), "killed in the middle of the streaming write"
    assert not (out / "polygons.gpkg").exists()

    again = _segment_process(src, out, delay=0.0, simplify=simplify, classes=classes)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert not list(out.glob(".polygons.tmp-*")), "the killed writer's temp file is gone"
    result = geoseg.segment(config(src, out, chunk_size=352, vector=vector, classes=classes), client=inproc_client,
                            segmenter_factory=PerPixelFactory(WEIGHTS, BIAS))
    assert (result.chunks_run, result.chunks_skipped) == (0, 9)
    assert result.features == ref.features
    assert_same(result, ref)
