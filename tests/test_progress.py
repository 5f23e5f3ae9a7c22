"""``geoseg --progress jsonl``: the machine-readable events front ends (the QGIS plugin) rely on."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest

import geoseg
from geoseg import progress

from .rasters import scene, write

ROOT = Path(__file__).resolve().parents[1]
GEOSEG = Path(sys.executable).parent / "geoseg"


@pytest.fixture
def jsonl():
    buf = io.StringIO()
    progress.set_mode("jsonl", buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    progress.set_mode("bar")


def test_segment_reports_every_chunk(tmp_path, inproc_client, perpixel, jsonl):
    src = write(tmp_path / "in.tif", scene(700, 900))
    cfg = geoseg.SegmentConfig(str(src), ("a", "b"), tmp_path / "out", chunk_size=512)
    res = geoseg.segment(cfg, client=inproc_client, segmenter_factory=perpixel, progress=True)
    all_events = [e for e in jsonl() if e["event"] == "progress"]
    events = [e for e in all_events if e["unit"] == "chunk"]
    assert all_events[:len(events)] == events  # the chunks come first
    total = res.chunks_run
    assert total == 4  # 700 x 900 in 512 px chunks
    assert [e["done"] for e in events] == list(range(total + 1))  # "0 of n" first, then one per chunk
    assert {e["total"] for e in events} == {total} and {e["unit"] for e in events} == {"chunk"}
    assert events[-1]["tiles"] == res.model_tiles
    # then the COG build reports GDAL's progress in whole percents, rising to 100
    cog = [e for e in all_events if e["stage"] == "probabilities COG"]
    assert all_events[len(events):len(events) + len(cog)] == cog
    assert {(e["unit"], e["total"]) for e in cog} == {("%", 100)}
    assert [e["done"] for e in cog] == sorted({e["done"] for e in cog}) and cog[0]["done"] == 0
    assert cog[-1]["done"] == 100 and len(cog) >= 3
    # after it, the R-tree build counts the rows it indexed, up to every feature
    index = all_events[len(events) + len(cog):]
    assert [e["stage"] for e in index] == ["spatial index"] * len(index) and index[0]["done"] == 0
    assert index[-1]["done"] == index[-1]["total"] == res.features and res.features > 0


def test_disabled_progress_prints_nothing(tmp_path, inproc_client, perpixel, jsonl):
    src = write(tmp_path / "in.tif", scene(300, 300))
    geoseg.segment(geoseg.SegmentConfig(str(src), ("a",), tmp_path / "out"), client=inproc_client,
                   segmenter_factory=perpixel, progress=False)
    assert jsonl() == []


def test_log_handler_and_result(jsonl):
    logger = logging.getLogger("geoseg.test_progress")
    logger.propagate = False
    logger.addHandler(progress.JsonlLogHandler())
    logger.warning("careful with %s", "this")
    progress.result("human text", command="x", path=Path("/a/b"), n=3)
    assert jsonl() == [
        {"event": "log", "level": "WARNING", "logger": "geoseg.test_progress", "message": "careful with this"},
        {"event": "result", "command": "x", "path": "/a/b", "n": 3},
    ]


def test_bar_mode_result_is_the_plain_text(capsys):
    progress.set_mode("bar")
    progress.result("human text", command="x")
    assert capsys.readouterr().out == "human text\n"
    with pytest.raises(ValueError, match="progress mode"):
        progress.set_mode("xml")


def test_cli_vectorize_jsonl_result(tmp_path, inproc_client, perpixel):
    src = write(tmp_path / "in.tif", scene(300, 400))
    geoseg.segment(geoseg.SegmentConfig(str(src), ("a", "b"), tmp_path / "run"), client=inproc_client,
                   segmenter_factory=perpixel)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(GEOSEG), "--progress", "jsonl", "vectorize", str(tmp_path / "run"), "--threshold",
                           "0.3"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON lines only
    (result,) = [e for e in events if e["event"] == "result"]
    gdf = gpd.read_file(result["polygons"], layer=result["layer"])
    assert result["command"] == "vectorize" and result["features"] == len(gdf) > 0
    assert result["thresholds"] == [0.3] and set(gdf["threshold"].round(6)) == {0.3}
    # progress as JSON too: the chunks, then the spatial index up to every feature
    stages = [(e["stage"], e["unit"], e["done"], e["total"]) for e in events if e["event"] == "progress"]
    assert stages[0] == ("vectorize", "chunk", 0, 1) and stages[1] == ("vectorize", "chunk", 1, 1)
    assert stages[-1] == ("spatial index", "row", len(gdf), len(gdf))


def test_cli_evaluate_result_event(tmp_path, inproc_client):
    """In jsonl mode evaluate's table travels in its result event; stdout holds JSON lines only."""
    import rasterio
    from click.testing import CliRunner
    from shapely.geometry import box

    from geoseg.cli import main

    from .models import PerPixelFactory

    src = write(tmp_path / "in.tif", scene(200, 200, seed=3))
    geoseg.segment(geoseg.SegmentConfig(str(src), ("red roof",), tmp_path / "run"), client=inproc_client,
                   segmenter_factory=PerPixelFactory(weights=((1.0, 0.0, -0.5),), bias=(0.3,)))
    with rasterio.open(src) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    truth = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame(geometry=[box(left, bottom, (left + right) / 2, top)], crs=crs).to_file(truth)
    out = CliRunner().invoke(main, ["--progress", "jsonl", "evaluate", str(tmp_path / "run"), "--truth", str(truth),
                                    "--prompt", "red roof", "--no-objects"])
    assert out.exit_code == 0, out.output
    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    (res,) = [e for e in events if e["event"] == "result"]
    assert res["command"] == "evaluate" and "red roof" in res["table"]
    assert [Path(f).name for f in res["files"]] == ["evaluation.json", "evaluation.txt", "pr_curve.png"]
