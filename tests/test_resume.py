"""Resume trusts a chunk's done-record only when it carries this job's fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

import geoseg

from .models import PerPixelSegmenter
from .rasters import scene, write


def test_a_record_of_another_job_is_not_trusted(tmp_path, inproc_client, perpixel):
    src = write(tmp_path / "in.tif", scene(800, 800, seed=31))
    cfg = geoseg.SegmentConfig(str(src), ("red roof", "blue pool"), tmp_path / "out", chunk_size=400)
    first = geoseg.segment(cfg, client=inproc_client, segmenter_factory=perpixel)
    with rasterio.open(first.probabilities) as ds:
        before = ds.read()
    records = sorted((first.run_dir / "parts").glob("[!.]*.json"))
    assert len(records) == 4
    stale = records[0]
    record = json.loads(stale.read_text())
    record["fingerprint"] = "0" * 16  # a record left by a different job (other input or options)
    stale.write_text(json.dumps(record))
    (first.run_dir / "probabilities.tif").unlink()
    PerPixelSegmenter.calls = 0
    again = geoseg.segment(cfg, client=inproc_client, segmenter_factory=perpixel)
    assert (again.chunks_run, again.chunks_skipped) == (1, 3), "only the stale chunk is recomputed"
    assert PerPixelSegmenter.calls == again.model_tiles > 0
    assert json.loads(stale.read_text())["fingerprint"] == first.manifest.fingerprint
    with rasterio.open(again.probabilities) as ds:
        assert np.array_equal(ds.read(), before, equal_nan=True)


def test_weights_changed_in_place_are_another_job(tmp_path, inproc_client, tiny_model_dir):
    """`geoseg train --overwrite` rewrites a model directory in place: a re-run must not resume chunks
    made with the old weights (the fingerprint covers the local model's files)."""
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    src = write(tmp_path / "in.tif", scene(300, 300, seed=5))
    cfg = geoseg.SegmentConfig(str(src), ("red roof",), tmp_path / "out", model=str(model), device="cpu")
    geoseg.segment(cfg, client=inproc_client)
    again = geoseg.segment(cfg, client=inproc_client)
    assert again.chunks_skipped == 1, "same weights: resumed"
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained in place
    with pytest.raises(geoseg.OutputExistsError):
        geoseg.segment(cfg, client=inproc_client)


def test_same_job_typed_from_another_directory_resumes(tmp_path, inproc_client, perpixel, monkeypatch):
    """The fingerprint hashes the absolute input: `segment a.tif -o out` in d/, then
    `segment d/a.tif -o d/out` from its parent is the same job and resumes."""
    work = tmp_path / "d"
    work.mkdir()
    write(work / "in.tif", scene(300, 300, seed=7))
    monkeypatch.chdir(work)
    first = geoseg.segment(geoseg.SegmentConfig("in.tif", ("red roof",), "out"), client=inproc_client,
                           segmenter_factory=perpixel)
    monkeypatch.chdir(tmp_path)
    again = geoseg.segment(geoseg.SegmentConfig("d/in.tif", ("red roof",), "d/out"), client=inproc_client,
                           segmenter_factory=perpixel)
    assert again.chunks_skipped == first.chunks_run == 1 and again.chunks_run == 0
    assert again.manifest.fingerprint == first.manifest.fingerprint
