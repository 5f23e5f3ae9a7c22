"""`geoseg evaluate`: scores against an independent numpy count, CRS, AOI, chunking, objects, CLI errors.

The run directory comes from the real ``geoseg.segment`` path with the deterministic per-pixel model
(tests/models.py) on a synthetic scene whose red rectangles, blue disc and nodata band sit at known
pixels. Truth polygons are boxes on pixel edges, so the reference masks are plain array slices
(independent of rasterio's rasterizer): a pixel centre is never on a polygon edge.
"""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner

import geoseg
from geoseg.cli import main
from geoseg.evaluation import EvaluateConfig, Histograms, best_threshold, match_objects

from .rasters import NORTH_UP, UTM33, rotated, write

H, W = 200, 300
RED, BLUE = (200, 60, 50), (40, 90, 220)
#: red rectangles (row0, col0, row1, col1), exclusive ends
RECTS = {"A": (40, 30, 70, 70), "B": (60, 150, 85, 175), "C": (120, 220, 150, 270)}
DISC = (150, 80, 15)  # centre row, col, radius
NODATA_ROWS = 20
#: truth boxes per class: A and C exact, B shifted 15 px right (object IoU 0.25), D on no red at
#: all and half in the nodata band; a box around the blue disc; a class the run has no prompt for.
TRUTH = [("red roof", (40, 30, 70, 70)), ("red roof", (60, 165, 85, 190)), ("red roof", (120, 220, 150, 270)),
         ("red roof", (10, 100, 35, 130)), ("blue pool", (135, 65, 165, 95)), ("tree", (170, 250, 190, 290))]
PROMPTS = ("red roof", "blue pool")


def scene_with_objects(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((3, H, W), np.uint8)
    img[0] = rng.integers(20, 80, (H, W))
    img[1] = rng.integers(90, 160, (H, W))
    img[2] = rng.integers(20, 80, (H, W))
    # a ramp of reds on row 100..110 so probabilities cover the middle of 0..1 (a real PR curve)
    img[0, 100:110, :] = np.linspace(40, 220, W).astype(np.uint8)
    for r0, c0, r1, c1 in RECTS.values():
        img[:, r0:r1, c0:c1] = np.array(RED, np.uint8)[:, None, None]
    yy, xx = np.mgrid[:H, :W]
    cy, cx, rad = DISC
    img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = np.array(BLUE, np.uint8)[:, None]
    img[:, :NODATA_ROWS] = 0
    return img


def box(transform: Affine, r0: int, c0: int, r1: int, c1: int) -> shapely.Polygon:
    """A box on pixel edges, through the full affine transform."""
    return shapely.Polygon([transform @ (c, r) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])


def write_truth(path, transform, items=TRUTH, crs=UTM33, to_crs=None, field="kind"):
    gdf = gpd.GeoDataFrame({field: [k for k, _ in items]}, geometry=[box(transform, *b) for _, b in items], crs=crs)
    if to_crs:
        gdf = gdf.to_crs(to_crs)
    gdf.to_file(path)
    return path


def make_run(tmp, client, factory, transform=NORTH_UP, name="run"):
    src = write(tmp / f"{name}.tif", scene_with_objects(), transform=transform, nodata=0)
    cfg = geoseg.SegmentConfig(str(src), PROMPTS, tmp / name, chunk_size=352)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory).run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, inproc_client):
    from .models import PerPixelFactory

    factory = PerPixelFactory(weights=((1.0, 0.0, -0.5), (0.0, -0.5, 1.0)), bias=(0.3, 0.25))
    return make_run(tmp_path_factory.mktemp("evalrun"), inproc_client, factory)


def read_probs(run_dir) -> np.ndarray:
    with rasterio.open(run_dir / "probabilities.tif") as ds:
        return ds.read()


def replace_probs(run_dir, probs: np.ndarray) -> None:
    """Put known probabilities into a copied run (same grid, CRS and band names)."""
    path = run_dir / "probabilities.tif"
    with rasterio.open(path) as ds:
        profile, names = ds.profile, ds.descriptions
    path.unlink()
    profile.update(driver="GTiff")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(probs)
        ds.descriptions = names


def mask_of(boxes, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r0, c0, r1, c1 in boxes:
        m[max(r0, 0):r1, max(c0, 0):c1] = True
    return m


def counts(prob, truth, area, t):
    """Independent reference: confusion counts over finite pixels of ``area`` at ``prob >= t``."""
    valid = area & np.isfinite(prob)
    pred = np.zeros_like(valid)
    pred[valid] = prob[valid].astype(np.float64) >= t
    return dict(tp=int((pred & truth & valid).sum()), fp=int((pred & ~truth & valid).sum()),
                fn=int((~pred & truth & valid).sum()), tn=int((~pred & ~truth & valid).sum()))


def truth_extent():
    rows = [b[0] for _, b in TRUTH] + [b[2] for _, b in TRUTH]
    cols = [b[1] for _, b in TRUTH] + [b[3] for _, b in TRUTH]
    return mask_of([(min(rows), min(cols), max(rows), max(cols))])


def run_eval(run_dir, tmp_path, **kw):
    kw.setdefault("class_field", "kind")
    kw.setdefault("output", tmp_path / "report")
    return geoseg.evaluate(run_dir, EvaluateConfig(**kw))


def scores_dict(result):
    return {p.prompt: p.to_dict() for p in result.prompts}


# -- pixel scores ---------------------------------------------------------------------------------

def test_pixel_scores_equal_numpy_count(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    result = run_eval(run_dir, tmp_path, truth=truth)
    probs = read_probs(run_dir)
    area = truth_extent()
    assert result.area_mode == "truth extent" and result.area_pixels == int(area.sum())
    assert result.unmapped_classes == ("tree",)
    for k, prompt in enumerate(PROMPTS):
        t_mask = mask_of([b for c, b in TRUTH if c == prompt])
        ref = counts(probs[k], t_mask, area, 0.5)
        got = result[prompt].at_threshold
        assert dict(tp=got.tp, fp=got.fp, fn=got.fn, tn=got.tn) == ref
        assert got.iou == ref["tp"] / (ref["tp"] + ref["fp"] + ref["fn"])
        assert got.f1 == 2 * ref["tp"] / (2 * ref["tp"] + ref["fp"] + ref["fn"])
        assert got.precision == ref["tp"] / (ref["tp"] + ref["fp"])
        assert got.recall == ref["tp"] / (ref["tp"] + ref["fn"])
        nodata = area & ~np.isfinite(probs[k])
        assert result[prompt].nodata_pixels == int(nodata.sum())
        assert result[prompt].truth_pixels_in_nodata == int((nodata & t_mask).sum())
    # the scene is built so that this is a meaningful case: nodata inside a truth box, every cell non-zero
    assert result["red roof"].truth_pixels_in_nodata == 10 * 30
    a = result["red roof"].at_threshold
    assert min(a.tp, a.fp, a.fn, a.tn) > 0
    assert 0 < result["blue pool"].at_threshold.iou < 1


def test_threshold_rule_is_vectorize_rule_and_best_thresholds_are_brute_force(run_dir, tmp_path):
    """Probabilities exactly at the run threshold and on bin edges (stored as float32): counts at
    every grid threshold equal a brute-force count with ``>=`` in float64."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    probs = read_probs(run)
    rng = np.random.default_rng(0)
    grid = (rng.integers(0, 1001, probs.shape) / 1000).astype(np.float32)  # on (float32 of) bin edges
    grid[:, 100:140] = 0.5  # exactly the run threshold
    grid[np.isnan(probs)] = np.nan
    replace_probs(run, grid)
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    result = run_eval(run, tmp_path, truth=truth)
    area = truth_extent()
    t_mask = mask_of([b for c, b in TRUTH if c == "red roof"])
    p = grid[0]
    got = result["red roof"]
    assert counts(p, t_mask, area, 0.5) == {k: getattr(got.at_threshold, k) for k in ("tp", "fp", "fn", "tn")}
    assert counts(p, t_mask, area, 0.5) != counts(p, t_mask, area, np.nextafter(0.5, 1))  # '>' would differ
    best = (-1.0, None)
    for k in range(0, 1001):
        ref = counts(p, t_mask, area, k / 1000)
        s = got.curve[k]
        assert (s.tp, s.fp, s.fn, s.tn) == tuple(ref.values()), k
        f1 = 2 * ref["tp"] / (2 * ref["tp"] + ref["fp"] + ref["fn"])
        if 0 < k < 1000 and f1 > best[0]:
            best = (f1, k / 1000)
    assert (got.best_f1.f1, got.best_f1.threshold) == best
    ious = [(c.iou, c.threshold) for c in got.curve[1:-1]]
    assert got.best_iou.iou == max(i for i, _ in ious)


def test_best_f1_on_real_run_beats_or_equals_the_run_threshold(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    result = run_eval(run_dir, tmp_path, truth=truth)
    probs = read_probs(run_dir)
    t_mask = mask_of([b for c, b in TRUTH if c == "red roof"])
    got = result["red roof"]
    ref = counts(probs[0], t_mask, truth_extent(), got.best_f1.threshold)
    assert (got.best_f1.tp, got.best_f1.fp, got.best_f1.fn) == (ref["tp"], ref["fp"], ref["fn"])
    assert got.best_f1.f1 >= got.at_threshold.f1


def test_histogram_bins_are_half_open_with_one_at_the_top():
    h = Histograms(bins=4, threshold=0.5)
    p = np.array([0.0, 0.25, 0.2499, 0.5, 0.75, 1.0, np.nan], np.float64)
    h.add(p, np.ones(7, bool), np.ones(7, bool))
    assert h.pos.tolist() == [2, 1, 1, 1, 1] and h.nodata == 1 and h.truth_in_nodata == 1
    assert (h.tp, h.fn) == (3, 3)


def test_geographic_truth_gives_the_same_scores(run_dir, tmp_path):
    """Truth in EPSG:4326 over the UTM raster. The boxes' vertices round-trip UTM → lon/lat → UTM
    within nanometres, and every pixel centre is 0.25 m from a box edge: the rasterised truth, and
    hence every count, is identical."""
    utm = run_eval(run_dir, tmp_path / "a", truth=write_truth(tmp_path / "utm.gpkg", NORTH_UP))
    geo = run_eval(run_dir, tmp_path / "b", truth=write_truth(tmp_path / "geo.gpkg", NORTH_UP, to_crs="EPSG:4326"))
    assert gpd.read_file(tmp_path / "geo.gpkg").crs.to_epsg() == 4326
    assert scores_dict(utm) == scores_dict(geo)
    assert utm.area_pixels == geo.area_pixels


def test_aoi_restricts_the_area(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    aoi_box = (30, 20, 100, 200)
    aoi = gpd.GeoDataFrame(geometry=[box(NORTH_UP, *aoi_box)], crs=UTM33).to_crs("EPSG:3857")
    aoi.to_file(tmp_path / "aoi.gpkg")
    result = run_eval(run_dir, tmp_path, truth=truth, aoi=tmp_path / "aoi.gpkg")
    area = mask_of([aoi_box])
    assert result.area_mode == "aoi" and result.area_pixels == int(area.sum())
    probs = read_probs(run_dir)
    for k, prompt in enumerate(PROMPTS):
        ref = counts(probs[k], mask_of([b for c, b in TRUTH if c == prompt]), area, 0.5)
        got = result[prompt].at_threshold
        assert dict(tp=got.tp, fp=got.fp, fn=got.fn, tn=got.tn) == ref
    assert result["blue pool"].at_threshold.tp == 0  # the disc lies outside the AOI


@pytest.mark.parametrize("window", [16, 100, 333])
def test_chunked_equals_whole_raster(run_dir, tmp_path, window):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    whole = run_eval(run_dir, tmp_path / "whole", truth=truth, window_size=4096)
    chunked = run_eval(run_dir, tmp_path / "chunked", truth=truth, window_size=window)
    assert scores_dict(whole) == scores_dict(chunked)


def test_rotated_raster_uses_the_full_transform(tmp_path, inproc_client, perpixel):
    transform = rotated(30.0)
    run = make_run(tmp_path, inproc_client, perpixel, transform=transform)
    truth = write_truth(tmp_path / "truth.gpkg", transform)
    result = run_eval(run, tmp_path, truth=truth)
    probs = read_probs(run)
    # the truth extent is the axis-aligned bounding box in the CRS: pixels whose centre it holds
    xs, ys = transform @ np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    x0, y0, x1, y1 = shapely.union_all([box(transform, *b) for _, b in TRUTH]).bounds
    area = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)
    assert result.area_pixels == int(area.sum())
    for k, prompt in enumerate(PROMPTS):
        ref = counts(probs[k], mask_of([b for c, b in TRUTH if c == prompt]), area, 0.5)
        got = result[prompt].at_threshold
        assert dict(tp=got.tp, fp=got.fp, fn=got.fn, tn=got.tn) == ref


# -- class mapping --------------------------------------------------------------------------------

def test_explicit_class_map_and_single_class(run_dir, tmp_path):
    items = [("bldg" if c == "red roof" else c, b) for c, b in TRUTH]
    renamed = write_truth(tmp_path / "renamed.gpkg", NORTH_UP, items)
    plain = write_truth(tmp_path / "plain.gpkg", NORTH_UP)
    by_value = run_eval(run_dir, tmp_path / "a", truth=plain)
    mapped = run_eval(run_dir, tmp_path / "b", truth=renamed,
                      classes=(("bldg", "red roof"), ("blue pool", "blue pool")))
    assert mapped["red roof"].classes == ("bldg",)
    assert scores_dict(by_value) == {k: {**v, "truth_classes": list(by_value[k].classes)}
                                     for k, v in scores_dict(mapped).items()}
    roofs = write_truth(tmp_path / "roofs.gpkg", NORTH_UP, [i for i in TRUTH if i[0] == "red roof"])
    single = run_eval(run_dir, tmp_path / "c", truth=roofs, class_field=None, prompt="red roof")
    assert [p.prompt for p in single.prompts] == ["red roof"]
    expected = mask_of([b for _, b in TRUTH[:4]]) & mask_of([(10, 30, 150, 270)])
    assert single["red roof"].truth_pixels == int(expected.sum())
    with pytest.raises(geoseg.ConfigError, match="say which one"):
        run_eval(run_dir, tmp_path / "d", truth=roofs, class_field=None)


def test_run_threshold_follows_a_later_vectorize(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    geoseg.vectorize(run, geoseg.VectorizeConfig(threshold=(0.7, 0.4)))
    result = run_eval(run, tmp_path, truth=write_truth(tmp_path / "truth.gpkg", NORTH_UP))
    assert [p.at_threshold.threshold for p in result.prompts] == [0.7, 0.4]


# -- objects --------------------------------------------------------------------------------------

def test_object_matching_known_answer():
    truth = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10), shapely.box(40, 0, 50, 10)]
    pred = [shapely.box(1, 0, 10, 10),     # IoU 0.9 with truth 0
            shapely.box(26, 0, 36, 10),    # IoU 0.25 with truth 1: no match
            shapely.box(0, 0, 10, 9),      # IoU 0.9 with truth 0 as well: one-to-one leaves it unmatched
            shapely.box(100, 0, 110, 10)]  # nothing
    s = match_objects(truth, pred)
    assert (s.truth, s.predicted, s.matched, s.false_positives, s.false_negatives) == (3, 4, 1, 3, 2)
    assert match_objects(truth, [shapely.box(0, 0, 10, 5)]).matched == 1  # IoU exactly 0.5 counts
    assert match_objects(truth, [shapely.box(0, 0, 10, 4.9)]).matched == 0
    # one prediction at IoU exactly 0.5 with each of two truth halves: it matches one of them only
    halves = [shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1)]
    assert match_objects(halves, [shapely.box(0, 0, 2, 1)]).matched == 1
    assert match_objects([shapely.box(0, 0, 2, 1)], halves).matched == 1


def test_objects_count_when_more_than_half_inside_the_area():
    from geoseg.evaluation import objects_in_area

    area = shapely.box(0, 0, 10, 10)
    geoms = np.array([shapely.box(6, 0, 16, 10), shapely.box(4, 0, 14, 10), shapely.box(1, 1, 2, 2)], dtype=object)
    kept = objects_in_area(geoms, area)
    assert [g.bounds for g in kept] == [(4.0, 0.0, 10.0, 10.0), (1.0, 1.0, 2.0, 2.0)]


def test_best_threshold_is_one_that_vectorize_accepts():
    """t = 0 (everything is the prompt) would score best here, but --threshold takes 0 < t < 1."""
    h = Histograms(bins=1000, threshold=0.5)
    p = np.array([0.0] * 10 + [0.6] * 5 + [0.0])
    truth = np.arange(16) < 15
    h.add(p, truth, np.ones(16, bool))
    curve = h.curve()
    assert curve[0].f1 == 30 / 31
    best = best_threshold(curve, "f1")
    assert (best.threshold, best.f1) == (0.001, 0.5)
    # every t in 0.001..0.6 ties at F1 0.5: a tie is no reason to move the run's own threshold
    assert best_threshold(curve, "f1", 0.5).threshold == 0.5
    assert best_threshold(curve, "f1", 0.75).threshold == 0.001  # not among the ties


def test_object_scores_from_the_run_polygons(run_dir, tmp_path):
    # an AOI of two parts leaving out the red ramp (rows 100..110), which breaks into many speckles
    aoi = gpd.GeoDataFrame(geometry=[box(NORTH_UP, 0, 0, 100, W), box(NORTH_UP, 110, 0, H, W)], crs=UTM33)
    aoi.to_file(tmp_path / "aoi.gpkg")
    result = run_eval(run_dir, tmp_path, truth=write_truth(tmp_path / "truth.gpkg", NORTH_UP),
                      aoi=tmp_path / "aoi.gpkg")
    o = result["red roof"].objects
    # truth A, C match their rectangles exactly; B is shifted (IoU 0.25); D covers no red at all
    assert (o.truth, o.predicted, o.matched) == (4, 3, 2)
    assert (o.precision, o.recall) == (2 / 3, 2 / 4)
    # the same from GeoParquet polygons written in another CRS
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    geoseg.vectorize(run, geoseg.VectorizeConfig(vector_format="parquet", dst_crs="EPSG:3857"))
    again = run_eval(run, tmp_path / "pq", truth=tmp_path / "truth.gpkg", aoi=tmp_path / "aoi.gpkg")
    assert again["red roof"].objects == o


# -- outputs and errors ---------------------------------------------------------------------------

def test_report_files(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    out = tmp_path / "report"
    result = run_eval(run_dir, tmp_path, truth=truth, output=out)
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.txt", "pr_curve.png"]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["area"]["mode"] == "truth extent" and "bounding box" in report["area"]["note"]
    assert report["prompts"][0]["at_run_threshold"] == result["red roof"].at_threshold.to_dict()
    assert sum(report["prompts"][0]["histogram"]["positive"]) == result["red roof"].truth_pixels - 300
    text = (out / "evaluation.txt").read_text()
    assert "red roof" in text and f"{result['red roof'].at_threshold.iou:.3f}" in text
    from PIL import Image

    with Image.open(out / "pr_curve.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800
    with pytest.raises(geoseg.OutputExistsError, match="evaluation.json"):
        run_eval(run_dir, tmp_path, truth=truth, output=out)
    run_eval(run_dir, tmp_path, truth=truth, output=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.txt", "pr_curve.png"]


def cli_error(args):
    res = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), res.output
    return lines[0]


def test_cli_success_prints_the_table(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    res = CliRunner().invoke(main, ["evaluate", str(run_dir), "--truth", str(truth), "--class-field", "kind",
                                    "--class", "red roof=red roof", "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "IoU" in res.output and "red roof" in res.output and "pr_curve.png" in res.output
    assert not any(line.startswith("blue pool") for line in res.output.splitlines())  # only mapped classes


def test_cli_errors_are_one_line(run_dir, tmp_path):
    truth = write_truth(tmp_path / "truth.gpkg", NORTH_UP)
    assert "missing.gpkg" in cli_error([run_dir, "--truth", tmp_path / "missing.gpkg", "-o", tmp_path / "o"])
    msg = cli_error([run_dir, "--truth", truth, "--class-field", "nope", "-o", tmp_path / "o"])
    assert "truth.gpkg" in msg and "'nope'" in msg and "kind" in msg
    far = write_truth(tmp_path / "far.gpkg", NORTH_UP @ Affine.translation(10000, 0))
    assert "far.gpkg" in cli_error([run_dir, "--truth", far, "--class-field", "kind", "-o", tmp_path / "o"])
    assert "overlaps" in cli_error([run_dir, "--truth", far, "--class-field", "kind", "-o", tmp_path / "o"])
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[box(NORTH_UP, -500, -500, -400, -400)], crs=UTM33).to_file(aoi)
    assert "aoi.gpkg" in cli_error([run_dir, "--truth", truth, "--class-field", "kind", "--aoi", aoi,
                                    "-o", tmp_path / "o"])
    assert "no polygon has kind = 'x'" in cli_error([run_dir, "--truth", truth, "--class-field", "kind",
                                                     "--class", "x=red roof",
                                    "-o", tmp_path / "o"])
    assert "say which" in cli_error([run_dir, "--truth", truth, "-o", tmp_path / "o"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert "did not finish" in cli_error([unfinished, "--truth", truth, "--class-field", "kind"])
    assert not (unfinished / "evaluation").exists()
    assert not (tmp_path / "o").exists()  # nothing written by any refusal


@pytest.mark.parametrize("bins", [2, 7, 1000, 1001])
def test_bin_index_is_searchsorted_on_the_edges(bins):
    """The fast binning equals the plain definition, on and next to every edge (float32 ones too)."""
    from geoseg.evaluation import bin_index

    edges = np.arange(bins + 1, dtype=np.float64) / bins
    p = np.concatenate([np.random.default_rng(bins).random(10_000), edges, np.nextafter(edges, 2),
                        np.nextafter(edges, -1), edges.astype(np.float32).astype(np.float64), [-0.1, 1.1]])
    ref = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins)
    assert np.array_equal(bin_index(p, bins), ref)
