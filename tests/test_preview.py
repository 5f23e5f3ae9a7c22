"""`geoseg preview`: PNG quicklooks of a finished run (probability tint, polygon outlines, legend)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from PIL import Image

import geoseg
from geoseg.cli import main
from geoseg.errors import NotARunError
from geoseg.export import prompt_colors
from geoseg.preview import MAX_ALPHA, render_preview

from .rasters import NORTH_UP, write

PROMPTS = ("red roof", "blue pool")
GROUND, RED, BLUE = (40, 120, 40), (200, 60, 50), (40, 90, 220)
# Input 600 x 800 px, previewed at 400 px: exactly 2 x 2 input pixels per preview pixel.
H, W, SIZE = 600, 800, 400
RED_BOX = (100, 300, 100, 400)   # rows, cols in input pixels
BLUE_BOX = (350, 550, 500, 750)


def flat_scene() -> np.ndarray:
    """Uniform ground with one red and one blue block: decimated colours are exact."""
    img = np.empty((3, H, W), np.uint8)
    img[:] = np.array(GROUND, np.uint8)[:, None, None]
    for (r0, r1, c0, c1), rgb in ((RED_BOX, RED), (BLUE_BOX, BLUE)):
        img[:, r0:r1, c0:c1] = np.array(rgb, np.uint8)[:, None, None]
    return img


def segment(tmp_path, client, factory, name="run", transform=NORTH_UP):
    src = write(tmp_path / f"{name}.tif", flat_scene(), transform=transform)
    cfg = geoseg.SegmentConfig(str(src), PROMPTS, tmp_path / name, chunk_size=400)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


@pytest.fixture
def run(tmp_path, inproc_client, perpixel):
    return segment(tmp_path, inproc_client, perpixel)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def probs_at(result, row, col):
    with rasterio.open(result.probabilities) as ds:
        return ds.read(window=((row, row + 1), (col, col + 1)))[:, 0, 0]


def blend(base, probs, colors):
    out = np.asarray(base, float)
    for p, c in zip(probs, colors):
        a = float(np.clip(p, 0, 1)) * MAX_ALPHA
        out = out * (1 - a) + np.asarray(c, float) * a
    return out


def test_probabilities_tint_where_probability_is_high(tmp_path, run):
    out = render_preview(run.run_dir, tmp_path / "p.png", size=SIZE)
    assert out == tmp_path / "p.png"
    img = png(out)
    assert img.shape[1] == SIZE and img.shape[0] > H // 2  # map 400 x 300 + legend strip below
    colors = prompt_colors(2)
    for (r0, r1, c0, c1), base, k in ((RED_BOX, RED, 0), (BLUE_BOX, BLUE, 1)):
        r, c = (r0 + r1) // 2, (c0 + c1) // 2
        p = probs_at(run, r, c)
        assert p[k] > 0.95, "the per-pixel model finds its colour"
        got = img[r // 2, c // 2]
        assert np.abs(got - blend(base, p, colors)).max() <= 1
        # tinted towards the prompt's colour compared with the input pixel
        assert np.abs(got - colors[k]).sum() < np.abs(np.array(base) - colors[k]).sum() - 100
    # low probability on the ground: close to the plain input colour
    p = probs_at(run, 20, 20)
    assert p.max() < 0.1
    assert np.abs(img[10, 10] - np.array(GROUND)).max() <= 255 * MAX_ALPHA * p.max() + 1


def test_polygon_outlines_and_legend(tmp_path, run):
    img = png(render_preview(run.run_dir, tmp_path / "o.png", size=SIZE, mode="polygons"))
    colors = prompt_colors(2)
    for (r0, r1, c0, c1), base, k in ((RED_BOX, RED, 0), (BLUE_BOX, BLUE, 1)):
        mid_r, mid_c = (r0 + r1) // 4, (c0 + c1) // 4
        # the outline runs along the block's edges (preview px = input px / 2) in the prompt colour
        for edge in (img[r0 // 2 - 2:r0 // 2 + 2, mid_c], img[r1 // 2 - 2:r1 // 2 + 2, mid_c],
                     img[mid_r, c0 // 2 - 2:c0 // 2 + 2], img[mid_r, c1 // 2 - 2:c1 // 2 + 2]):
            assert (np.abs(edge - colors[k]).max(axis=-1) == 0).any()
        # inside the block, the plain input shows (outlines only, no fill)
        assert np.array_equal(img[mid_r, mid_c], base)
    assert np.array_equal(img[10, 10], GROUND)
    # legend strip below the map: one swatch per prompt in its exact colour, and text
    legend = img[H // 2:]
    for rgb in colors:
        assert (np.abs(legend - rgb).max(axis=-1) == 0).sum() >= 100, f"swatch {rgb} in the legend"
    assert (legend.max(axis=-1) < 80).sum() > 200, "dark legend text"
    assert legend.shape[0] >= 2 * 20


def test_rotated_transform_polygons_line_up(tmp_path, inproc_client, perpixel):
    rotated = Affine.translation(500000, 4500000) @ Affine.rotation(30) @ Affine.scale(0.5, -0.5)
    result = segment(tmp_path, inproc_client, perpixel, name="rot", transform=rotated)
    with rasterio.open(result.probabilities) as ds:
        assert ds.transform.almost_equals(rotated)
    north = segment(tmp_path, inproc_client, perpixel, name="north")
    a = png(render_preview(result.run_dir, tmp_path / "rot.png", size=SIZE, mode="polygons"))
    b = png(render_preview(north.run_dir, tmp_path / "north.png", size=SIZE, mode="polygons"))
    # same pixels, same polygons in pixel space: the maps agree (legend titles differ); allow a few
    # pixels where a vertex lands on a pixel boundary and rounds the other way
    differ = (a[:H // 2] != b[:H // 2]).any(axis=-1)
    assert differ.mean() < 0.002
    assert (np.abs(a[:H // 2] - prompt_colors(2)[0]).max(axis=-1) == 0).sum() > 400


def test_legend_counts_polygons_and_size_option(tmp_path, run):
    gpkg = run.run_dir / "polygons.gpkg"
    import pyogrio

    counts = pyogrio.read_dataframe(gpkg, read_geometry=False)["prompt"].value_counts()
    assert counts["red roof"] >= 1 and counts["blue pool"] >= 1
    img = png(render_preview(run.run_dir, tmp_path / "small.png", size=100))
    assert img.shape[1] >= 100  # the map is 100 x 75; the legend may widen the canvas
    img = png(render_preview(run.run_dir, tmp_path / "big.png", size=1200))
    assert img.shape[1] == 1200 and img.shape[0] > 900  # upsampled map, 1200 x 900, + legend


def test_cli_preview(tmp_path, run):
    runner = CliRunner()
    out = tmp_path / "cli" / "x.png"
    res = runner.invoke(main, ["preview", str(run.run_dir), "-o", str(out), "--size", "300"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    assert png(out).shape[1] == 300
    res = runner.invoke(main, ["preview", str(run.run_dir), "-o", str(tmp_path / "y.png"), "--mode", "polygons"])
    assert res.exit_code == 0, res.output
    assert png(tmp_path / "y.png").shape[1] == 1024
    assert not [p for p in (tmp_path).rglob(".*tmp*")], "no temp files left behind"


def test_cli_errors_cleanly_on_non_run(tmp_path, run):
    runner = CliRunner()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    for target in (plain, tmp_path / "missing"):
        res = runner.invoke(main, ["preview", str(target), "-o", str(tmp_path / "z.png")])
        assert res.exit_code == 1
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "z.png").exists()
    # an unfinished run
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    manifest["status"] = "running"
    (run.run_dir / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(main, ["preview", str(run.run_dir), "-o", str(tmp_path / "z.png")])
    assert res.exit_code == 1 and "did not finish" in res.output


def test_library_errors(tmp_path, run):
    with pytest.raises(NotARunError, match="not a geoseg run"):
        render_preview(tmp_path, tmp_path / "a.png")
    assert issubclass(NotARunError, geoseg.GeosegError)
    with pytest.raises(geoseg.ConfigError, match="mode"):
        render_preview(run.run_dir, tmp_path / "a.png", mode="heatmap")
    with pytest.raises(geoseg.ConfigError, match="size"):
        render_preview(run.run_dir, tmp_path / "a.png", size=0)
    (run.run_dir / "polygons.gpkg").unlink()
    with pytest.raises(NotARunError, match="no polygons"):
        render_preview(run.run_dir, tmp_path / "a.png", mode="polygons")
    # probabilities mode still works without the polygons (counts shown as n/a)
    assert png(render_preview(run.run_dir, tmp_path / "b.png", size=200)).shape[1] >= 200


def test_missing_input_draws_on_grey(tmp_path, run):
    (tmp_path / "run.tif").unlink()
    img = png(render_preview(run.run_dir, tmp_path / "g.png", size=SIZE))
    assert img.shape[1] == SIZE
    assert np.array_equal(img[10, 10], img[20, 390])  # flat background, no input image


def _not_grey(img) -> bool:
    """The map shows the input (green ground in a corner), not the grey "input image not readable" one.

    12 levels: the ground's faint probability tint (measured 6) but far from grey (48, 48, 48)."""
    return np.abs(img[5, 5] - np.array(GROUND)).max() <= 12


def test_relative_input_preview_from_another_directory(tmp_path, inproc_client, perpixel, monkeypatch):
    """A run made with a relative input path (issue 8) previews from any working directory."""
    work = tmp_path / "work"
    work.mkdir()
    write(work / "scene.tif", flat_scene(), transform=NORTH_UP)
    monkeypatch.chdir(work)
    geoseg.segment(geoseg.SegmentConfig("scene.tif", PROMPTS, "../out", chunk_size=400),
                   client=inproc_client, segmenter_factory=perpixel)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"] == str(work / "scene.tif") and manifest["input_relative"] == "../work/scene.tif"
    monkeypatch.chdir(tmp_path)
    assert _not_grey(png(render_preview("out", "p.png", size=SIZE)))


def test_moved_project_finds_its_input(tmp_path, run):
    """Input and run moved together: the input is found relative to the run directory."""
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "run.tif").rename(moved / "run.tif")
    run.run_dir.rename(moved / "run")
    assert _not_grey(png(render_preview(moved / "run", tmp_path / "p.png", size=SIZE)))
    (moved / "run.tif").unlink()  # and without it: grey, as before
    assert not _not_grey(png(render_preview(moved / "run", tmp_path / "g.png", size=SIZE)))
