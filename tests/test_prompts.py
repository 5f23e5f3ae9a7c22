"""Prompts beyond one phrase (issue 10): templates, negatives, the exclusive class map, exemplars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg import prompts as P
from geoseg.errors import ConfigError

from .rasters import NORTH_UP, scene, write

# -- the rules, without a model ------------------------------------------------------------------

def test_ensemble_is_normalised_mean_at_mean_length():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(4, 16)).astype(np.float32) * np.array([[1.0], [2.0], [3.0], [6.0]], np.float32)
    e = P.ensemble(u)
    unit = u / np.linalg.norm(u, axis=1, keepdims=True)
    direction = unit.mean(0) / np.linalg.norm(unit.mean(0))
    # float32 output of a float64 computation: relative 1e-6 is float32 rounding
    np.testing.assert_allclose(e, direction * np.linalg.norm(u, axis=1).mean(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e), 3.0 * np.linalg.norm(u, axis=1).mean() / 3.0, rtol=1e-6)
    assert np.array_equal(P.ensemble(u[:1]), u[0])  # one template: untouched, bit for bit


def test_mix_is_linear_interpolation():
    t, i = np.ones(4, np.float32), np.full(4, 3.0, np.float32)
    assert np.array_equal(P.mix(t, i, 0.25), np.full(4, 1.5, np.float32))
    assert np.array_equal(P.mix(t, i, 1.0), i) and np.array_equal(P.mix(t, i, 0.0), t)


def test_negatives_rule():
    probs = np.zeros((1, 4, 1, 3), np.float32)
    probs[0, 0] = [[0.9, 0.9, 0.9]]   # building
    probs[0, 1] = [[0.8, 0.8, 0.8]]   # pool
    probs[0, 2] = [[0.0, 0.5, 0.2]]   # road (negative 0)
    probs[0, 3] = [[0.0, 0.1, 0.6]]   # parking lot (negative 1)
    out = P.apply_negatives(probs, ((0, 1), ()))
    assert out.shape == (1, 2, 1, 3)
    np.testing.assert_allclose(out[0, 0, 0], [0.9, 0.9 * 0.5, 0.9 * 0.4], rtol=1e-6)
    assert np.array_equal(out[0, 1], probs[0, 1])


def test_parse_negatives_global_and_per_prompt():
    phrases, applies = P.parse_negatives(["road", "building=parking lot", "pool=road"], ("building", "pool"))
    assert phrases == ("road", "parking lot")
    assert applies == ((0, 1), (0,))
    with pytest.raises(ConfigError, match="'tree' is not a --prompt"):
        P.parse_negatives(["tree=road"], ("building",))
    with pytest.raises(ConfigError, match="also a --prompt"):
        P.parse_negatives(["building"], ("building", "road"))


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\nan aerial photo of {}.\n\n{} from above\n")
    assert P.load_templates(str(f)) == ("an aerial photo of {}.", "{} from above")
    assert P.load_templates("none") == ("{}",) and len(P.load_templates("aerial")) > 1
    f.write_text("no placeholder\n")
    with pytest.raises(ConfigError, match=r"t.txt: line 1: .*exactly once"):
        P.load_templates(str(f))
    with pytest.raises(ConfigError, match="nowhere.txt"):
        P.load_templates(str(tmp_path / "nowhere.txt"))


# -- CLIPSeg embeddings with the tiny model --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from geoseg.model.clipseg import ClipSegSegmenter

    return ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")


def _stock_text(seg, text):
    """The stock conditional path for one text, alone in its batch."""
    ids = seg.tokenizer([text], return_tensors="pt")
    return seg.model.get_conditional_embeddings(batch_size=1, input_ids=ids["input_ids"],
                                                attention_mask=ids["attention_mask"])[0].numpy()


def test_templates_change_the_embedding_exactly_as_documented(tiny):
    plan = P.PromptPlan(("building", "swimming pool"), templates=P.AERIAL_TEMPLATES)
    got = tiny.encode_plan(plan).numpy()
    for k, phrase in enumerate(plan.prompts):
        u = np.stack([_stock_text(tiny, t.replace("{}", phrase)) for t in P.AERIAL_TEMPLATES])
        unit = u / np.linalg.norm(u, axis=1, keepdims=True)
        expected = unit.mean(0) / np.linalg.norm(unit.mean(0)) * np.linalg.norm(u, axis=1).mean()
        # texts are encoded one by one here and padded into one batch by geoseg: CPU matmuls over
        # different padded lengths round float32 differently (~1e-6 relative)
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got[k]), np.linalg.norm(u, axis=1).mean(), rtol=1e-5)
        assert not np.allclose(got[k], u[0], atol=1e-3)  # the ensemble is not the bare phrase


def test_templates_none_is_todays_embedding(tiny):
    plan = P.PromptPlan(("building", "swimming pool"))
    assert torch.equal(tiny.encode_plan(plan), tiny.encode_prompts(["building", "swimming pool"]))


def _prepared_crop(tmp_path):
    import geopandas as gpd
    from shapely import box

    from geoseg.exemplars import ExemplarSource, read_exemplars
    from geoseg.raster import inspect_raster

    src = write(tmp_path / "in.tif", scene(400, 500, seed=3))
    info = inspect_raster(str(src))
    x0, y0 = NORTH_UP.c, NORTH_UP.f
    gdf = gpd.GeoDataFrame({"class": ["building", "building"]},
                           geometry=[box(x0 + 20, y0 - 60, x0 + 50, y0 - 30),
                                     box(x0 + 100, y0 - 100, x0 + 140, y0 - 50)],
                           crs="EPSG:32633")
    gdf.to_file(tmp_path / "ex.gpkg")
    crops, ids = read_exemplars([ExemplarSource(str(tmp_path / "ex.gpkg"), class_field="class")], info,
                                ("building", "pool"))
    assert ids[0] == (f"{tmp_path / 'ex.gpkg'}:1", f"{tmp_path / 'ex.gpkg'}:2") and crops[1] is None
    return crops[0]


def test_exemplar_embedding_equals_stock_conditional_path(tiny, tiny_model_dir, tmp_path):
    from transformers import CLIPSegProcessor

    crops = _prepared_crop(tmp_path)
    assert crops.shape == (2, 3, 352, 352) and crops.dtype == np.float32
    got = tiny.encode_images(crops)
    processor = CLIPSegProcessor.from_pretrained(tiny_model_dir)
    pixels = processor.image_processor(images=list(crops), do_resize=False, do_rescale=False,
                                       input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    stock = tiny.model.get_conditional_embeddings(batch_size=2, conditional_pixel_values=pixels)
    # same weights and pixels; the processor normalises in numpy, geoseg in torch: float32 rounding only
    np.testing.assert_allclose(got.numpy(), stock.numpy(), rtol=1e-5, atol=1e-5)

    plan = P.PromptPlan(("building", "pool"), exemplars=(crops, None), exemplar_weight=0.3)
    emb = tiny.encode_plan(plan).numpy()
    text = tiny.encode_prompts(["building", "pool"]).numpy()
    image = P.ensemble(stock.numpy())
    np.testing.assert_allclose(emb[0], 0.7 * text[0] + 0.3 * image, rtol=1e-5, atol=1e-5)  # same rounding
    np.testing.assert_allclose(emb[1], text[1], rtol=1e-6, atol=1e-6)


def test_crop_is_blurred_darkened_background(tmp_path):
    """Inside the polygon the image as read; outside 10 % of its blur (constant colours: exact)."""
    import geopandas as gpd
    from shapely import box

    from geoseg.exemplars import ExemplarSource, read_exemplars
    from geoseg.raster import inspect_raster

    img = np.empty((3, 300, 300), np.uint8)
    img[:] = np.array([40, 120, 60], np.uint8)[:, None, None]
    img[:, 100:160, 50:230] = np.array([200, 30, 30], np.uint8)[:, None, None]  # a roof wider than the polygon
    info = inspect_raster(str(write(tmp_path / "in.tif", img)))
    x0, y0 = NORTH_UP.c, NORTH_UP.f
    gpd.GeoDataFrame(geometry=[box(x0 + 40, y0 - 80, x0 + 100, y0 - 50)], crs="EPSG:32633").to_file(tmp_path / "e.gpkg")
    crops, _ = read_exemplars([ExemplarSource(str(tmp_path / "e.gpkg"), prompt="roof")], info, ("roof",))
    c = crops[0][0]
    # the 120x60 px box + 10 % context each side -> a 144 px square (rows 58..202), scaled to 352
    red = np.array([200, 30, 30], np.float32) / 255
    green = np.array([40, 120, 60], np.float32) / 255
    np.testing.assert_allclose(c[:, 176, 176], red, atol=1e-6)          # inside: as read
    np.testing.assert_allclose(c[:, 5, 176], 0.1 * green, atol=1e-6)    # above the box: 10 % of green
    np.testing.assert_allclose(c[:, 176, 3], 0.1 * red, atol=1e-6)      # beside: context only 10 %


# -- exemplar input checks -----------------------------------------------------------------------

def _exemplar_file(tmp_path, geoms, crs="EPSG:32633", name="ex.gpkg"):
    import geopandas as gpd

    path = tmp_path / name
    gpd.GeoDataFrame({"class": ["roof"] * len(geoms)}, geometry=geoms, crs=crs).to_file(path)
    return path


def _read(tmp_path, path, src=None):
    from geoseg.exemplars import ExemplarSource, read_exemplars
    from geoseg.raster import inspect_raster

    src = src or write(tmp_path / "in.tif", scene(200, 200, seed=4))
    return read_exemplars([ExemplarSource(str(path), class_field="class")], inspect_raster(str(src)), ("roof",))


def test_exemplar_outside_raster_is_refused_naming_its_id(tmp_path):
    from shapely import box

    from geoseg.errors import ExemplarError

    x0, y0 = NORTH_UP.c, NORTH_UP.f
    path = _exemplar_file(tmp_path, [box(x0 + 10, y0 - 30, x0 + 20, y0 - 20),
                                     box(x0 + 500, y0 - 30, x0 + 520, y0 - 20)])
    with pytest.raises(ExemplarError) as err:
        _read(tmp_path, path)
    assert str(err.value) == f"{path}: exemplar feature 2: lies outside the raster {tmp_path / 'in.tif'}"


def test_exemplar_over_masked_pixels_only_is_refused(tmp_path):
    from shapely import box

    from geoseg.errors import ExemplarError

    data = scene(200, 200, seed=5)
    data[:, :100] = 0  # nodata 0 in the top half
    src = write(tmp_path / "in.tif", data, nodata=0)
    x0, y0 = NORTH_UP.c, NORTH_UP.f
    path = _exemplar_file(tmp_path, [box(x0 + 10, y0 - 30, x0 + 40, y0 - 10)])  # rows 20..60: all masked
    with pytest.raises(ExemplarError, match=r"^.*ex.gpkg: exemplar feature 1: covers only masked \(nodata\) pixels"):
        _read(tmp_path, path, src)
    assert "\n" not in str(ExemplarError("x"))
    ok = _exemplar_file(tmp_path, [box(x0 + 10, y0 - 60, x0 + 40, y0 - 40)], name="ok.gpkg")  # straddles rows 80..120
    crops, _ = _read(tmp_path, ok, src)
    assert crops[0].shape == (1, 3, 352, 352)


def test_exemplar_in_another_crs_is_reprojected(tmp_path):
    """The same polygon given in EPSG:4326 gives the same crop (to reprojection rounding)."""
    import geopandas as gpd
    from shapely import box

    x0, y0 = NORTH_UP.c, NORTH_UP.f
    utm = _exemplar_file(tmp_path, [box(x0 + 20, y0 - 60, x0 + 50, y0 - 30)])
    ll = gpd.read_file(utm).to_crs("EPSG:4326")
    ll.to_file(tmp_path / "ll.gpkg")
    src = write(tmp_path / "in.tif", scene(200, 200, seed=6))
    a, _ = _read(tmp_path, utm, src)
    b, _ = _read(tmp_path, tmp_path / "ll.gpkg", src)
    # a UTM -> lon/lat -> UTM round trip moves vertices by ~1e-9 m: the same pixels, the same crop
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert not np.allclose(a[0], _read(tmp_path, _exemplar_file(tmp_path, [box(x0 + 60, y0 - 60, x0 + 90, y0 - 30)],
                                                                    name="other.gpkg"), src)[0][0], atol=1e-3)


# -- negatives and the class map through the pipeline, with deterministic segmenters ----------------

def _run(tmp_path, src, client, factory, name, prompts, **kw):
    import geoseg

    cfg = geoseg.SegmentConfig(str(src), prompts, tmp_path / name, **kw)
    return geoseg.segment(cfg, client=client, segmenter_factory=factory)


def _band(path, band=None):
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read() if band is None else ds.read(band)


def test_negatives_lower_probability_where_the_negative_fires_and_only_there(tmp_path, inproc_client):
    from geoseg.raster import inspect_raster, open_input, read_rgb
    from geoseg.tiling import Region

    from .models import PerPixelFactory, PerPixelSegmenter

    # row 0: the prompt (reddish pixels); row 1: the negative (bluish pixels)
    factory = PerPixelFactory(weights=((1.0, 0.0, -0.5), (0.0, -0.5, 1.0)), bias=(0.3, 0.25), gain=80.0)
    src = write(tmp_path / "in.tif", scene(500, 640, seed=7))
    plain = _run(tmp_path, src, inproc_client, factory, "plain", ("red roof",), chunk_size=400)
    PerPixelSegmenter.calls = 0
    neg = _run(tmp_path, src, inproc_client, factory, "neg", ("red roof",), negatives=("blue pool",), chunk_size=400)
    assert PerPixelSegmenter.calls == plain.model_tiles  # same predict calls: negatives ride along
    a, b = _band(plain.probabilities, 1), _band(neg.probabilities, 1)
    assert _band(neg.probabilities).shape[0] == 1  # still one band per positive prompt
    info = inspect_raster(str(src))
    with open_input(info) as ds:
        rgb, _ = read_rgb(ds, info, Region(0, 0, info.height, info.width))
    p_neg = factory().whole_image(rgb)[1]
    quiet = p_neg < 1e-8     # 1 - p_neg rounds to 1.0 in float32: exactly unchanged
    fires = p_neg > 0.5
    assert quiet.sum() > 1000 and fires.sum() > 1000
    assert np.array_equal(a[quiet], b[quiet])
    assert np.all(b[fires] <= a[fires] * 0.5 + 1e-6)
    # everywhere: the documented rule, to blending rounding (per-pixel model: tiles agree, 1e-6)
    np.testing.assert_allclose(b, a * (1 - p_neg), atol=1e-6)
    manifest = neg.manifest.to_json()
    assert manifest["prompting"]["negatives"] == {"red roof": ["blue pool"]}
    assert list(manifest["options"]["negatives"]) == ["blue pool"]
    assert manifest["fingerprint"] != plain.manifest.fingerprint


def test_class_map_is_exclusive_chunk_invariant_and_a_valid_coverage(tmp_path, inproc_client):
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.features import rasterize

    from geoseg.classes import NODATA

    from .models import PerPixelFactory

    # prompt 0 fires on red, prompt 1 on blue: both fire on the magenta block, where red fades
    # into blue and the winner changes mid-block (the two classes would overlap without the argmax)
    perpixel = PerPixelFactory(weights=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)), bias=(0.55, 0.55))
    data = scene(700, 900, seed=8)
    # a ragged switch line (noise on the ramp), so simplification has staircases between classes
    ramp = np.linspace(250, 150, 200) + np.random.default_rng(1).normal(0, 15, (2, 130, 200))
    data[0, 200:330, 300:500], data[1, 200:330, 300:500] = np.clip(ramp[0], 0, 255), 20
    data[2, 200:330, 300:500] = np.clip(ramp[1][:, ::-1], 0, 255)
    data[:, 600:, 700:] = 0  # a masked corner (nodata 0)
    src = write(tmp_path / "in.tif", data, nodata=0, tiled=True, blockxsize=128, blockysize=128)
    runs = [_run(tmp_path, src, inproc_client, perpixel, f"c{c}", ("red roof", "blue pool"), chunk_size=c,
                 classes=True, vector=__import__("geoseg").VectorizeConfig(threshold=(0.5, 0.4)))
            for c in (352, 2048)]
    assert [r.chunks_run for r in runs] == [6, 1]
    maps = [_band(r.run_dir / "classes.tif", 1) for r in runs]
    assert np.array_equal(maps[0], maps[1])  # chunk-size invariant, bit for bit
    labels, probs = maps[0], _band(runs[0].probabilities)
    # the rule: argmax over the prompts, 0 below the winner's threshold, 255 where masked
    masked = ~np.isfinite(probs).all(axis=0)
    assert np.array_equal(labels == NODATA, masked)
    win = np.argmax(np.where(masked, -1, probs), axis=0)
    best = np.take_along_axis(probs, win[None], 0)[0]
    expected = np.where(best >= np.array([0.5, 0.4])[win], win + 1, 0)
    assert np.array_equal(labels[~masked], expected[~masked])
    assert {1, 2} <= set(np.unique(labels)) and 0 in labels
    with rasterio.open(runs[0].run_dir / "classes.tif") as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == NODATA and ds.descriptions[0] == "classes"
        from geoseg.export import prompt_colors

        assert [ds.colormap(1)[k][:3] for k in (1, 2)] == prompt_colors(2)  # the polygons' colours
        assert ds.overviews(1) == [2] and ds.profile["tiled"]
        assert ds.crs == rasterio.open(src).crs and ds.transform == rasterio.open(src).transform
    assert "<Category>red roof</Category>" in (runs[0].run_dir / "classes.tif.aux.xml").read_text()

    gdf = gpd.read_file(runs[0].polygons, layer="segments")
    geoms = gdf.geometry.values
    assert shapely.coverage_is_valid(geoms)
    assert shapely.is_empty(shapely.coverage_invalid_edges(geoms)).all()
    # polygons cover exactly each class's pixels: no overlap, no gap between touching classes
    with rasterio.open(src) as ds:
        transform = ds.transform
    for k, prompt in enumerate(("red roof", "blue pool"), start=1):
        burnt = rasterize(gdf[gdf.prompt == prompt].geometry, out_shape=labels.shape, transform=transform)
        assert np.array_equal(burnt == 1, labels == k)
    # touching classes exist, along the magenta block's switch (else the coverage test proves little)
    a, b = gdf[gdf.prompt == "red roof"].union_all(), gdf[gdf.prompt == "blue pool"].union_all()
    assert a.intersection(b).length >= 130 * 0.5 and a.intersection(b).area == 0

    # re-vectorized with simplification (one coverage for all classes) and new thresholds: still valid,
    # and classes.tif follows the new thresholds
    from geoseg import VectorizeConfig, vectorize

    # fill_holes: specks of one class inside the other's holes are absorbed, never left overlapping
    for options in ({"dst_crs": "EPSG:4326"}, {"fill_holes": 50.0}):
        path, n = vectorize(runs[0].run_dir, VectorizeConfig(**options))
        assert n > 0 and shapely.coverage_is_valid(gpd.read_file(path, layer="segments").geometry.values), options
    path, n = vectorize(runs[0].run_dir, VectorizeConfig(threshold=(0.999, 0.9), simplify=1.5))
    simplified = gpd.read_file(path, layer="segments").geometry.values
    assert n > 0 and shapely.coverage_is_valid(simplified)
    # no overlaps: the union's area is the sum of the areas (to float rounding of ~1e5 m² sums)
    total = shapely.area(simplified).sum()
    assert abs(shapely.union_all(simplified).area - total) < 1e-6 * total
    relabelled = _band(runs[0].run_dir / "classes.tif", 1)
    expected = np.where(best >= np.array([0.999, 0.9])[win], win + 1, 0)
    assert np.array_equal(relabelled[~masked], expected[~masked]) and not np.array_equal(relabelled, labels)
    assert np.array_equal(relabelled == NODATA, masked)


# -- the tiny CLIPSeg through the whole run --------------------------------------------------------

def test_templates_none_reproduces_todays_output_bit_for_bit(tmp_path, inproc_client, tiny_model_dir):
    from geoseg.model import clipseg_factory

    from .models import TextOnlyClipSegFactory

    src = write(tmp_path / "in.tif", scene(300, 420, seed=9))
    prompts = ("building", "swimming pool")
    product = clipseg_factory(str(tiny_model_dir), device="cpu")
    none = _run(tmp_path, src, inproc_client, product, "none", prompts, templates="none")
    today = _run(tmp_path, src, inproc_client, TextOnlyClipSegFactory(tiny_model_dir), "today", prompts,
                 templates="none")
    aerial = _run(tmp_path, src, inproc_client, product, "aerial", prompts)  # the default
    a, b, c = (_band(r.probabilities) for r in (none, today, aerial))
    assert np.array_equal(a, b, equal_nan=True)
    assert not np.allclose(a, c, atol=1e-4)  # the templates do reach the model
    assert none.manifest.fingerprint != aerial.manifest.fingerprint  # a different job for resume
    expanded = aerial.manifest.to_json()["prompting"]["expanded"]
    assert expanded["building"] == [t.replace("{}", "building") for t in P.AERIAL_TEMPLATES]
    assert none.manifest.to_json()["prompting"]["expanded"]["building"] == ["building"]


def test_cli_every_prompt_feature_manifest_and_resume(tmp_path, tiny_model_dir):
    import json

    import geopandas as gpd
    from click.testing import CliRunner
    from shapely import box

    from geoseg.cli import main

    src = write(tmp_path / "in.tif", scene(300, 300, seed=10))
    x0, y0 = NORTH_UP.c, NORTH_UP.f
    ll = gpd.GeoDataFrame({"kind": ["building", "building", "road"]},
                          geometry=[box(x0 + 10, y0 - 40, x0 + 30, y0 - 20), box(x0 + 60, y0 - 90, x0 + 80, y0 - 60),
                                    box(x0 + 100, y0 - 110, x0 + 140, y0 - 100)], crs="EPSG:32633").to_crs("EPSG:4326")
    ll.index = ll.index + 1
    ll.to_file(tmp_path / "ex.gpkg")
    out = tmp_path / "out"
    args = ["segment", str(src), "-p", "building", "-p", "road", "--negative", "building=parking lot",
            "--negative", "tree", "--exemplars", str(tmp_path / "ex.gpkg"), "--class-field", "kind",
            "--classes", "--model", str(tiny_model_dir), "--device", "cpu", "-o", str(out), "-q"]
    runner = CliRunner()
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    p = m["prompting"]
    assert p["negatives"] == {"building": ["parking lot", "tree"], "road": ["tree"]}
    assert p["expanded"]["parking lot"][1] == "an aerial photo of parking lot."
    assert p["exemplars"] == {"building": [f"{tmp_path / 'ex.gpkg'}:1", f"{tmp_path / 'ex.gpkg'}:2"],
                              "road": [f"{tmp_path / 'ex.gpkg'}:3"]}
    assert p["exemplar_weight"] == 0.5 and len(p["exemplars_sha256"]) == 64
    assert len(p["exemplar_embeddings_sha256"]) == 64 and p["encode_seconds"] > 0
    assert m["outputs"]["classes"] == "classes.tif" and (out / "classes.qml").exists()
    # the same command resumes; another exemplar weight is another job
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "chunks run: 0, resumed: 1" in again.output
    other = runner.invoke(main, args + ["--exemplar-weight", "0.8"])
    assert other.exit_code == 1
    assert other.output.strip().endswith("holds a geoseg run with different input or options; use another -o, "
                                         "or --overwrite to replace geoseg's files there")
    # an exemplar outside the raster: one line naming the feature, nothing written
    gpd.GeoDataFrame({"kind": ["road"]}, geometry=[box(x0 + 1000, y0 - 40, x0 + 1030, y0 - 20)],
                     crs="EPSG:32633").to_file(tmp_path / "far.gpkg")
    bad_args = [a if a != str(out) else str(tmp_path / "bad") for a in args]
    bad = runner.invoke(main, bad_args + ["--exemplar", f"road={tmp_path / 'far.gpkg'}"])
    assert bad.exit_code == 1
    assert bad.output == f"geoseg: error: {tmp_path / 'far.gpkg'}: exemplar feature 1: lies outside the raster {src}\n"
    assert not (tmp_path / "bad").exists()


def test_qgis_shows_the_class_names_in_the_legend(tmp_path, inproc_client, perpixel):
    """QGIS 3.22 opens classes.tif paletted, with the prompts (and only them) in the legend."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from qgis_check import QGIS_PYTHON, _qgis_env, qgis_available

    ok, why = qgis_available()
    if not ok:
        pytest.skip(f"QGIS not available: {why}")
    src = write(tmp_path / "in.tif", scene(300, 300, seed=11))
    run = _run(tmp_path, src, inproc_client, perpixel, "out", ("red roof", "blue pool"), classes=True)
    script = (
        "import json, sys\n"
        "from qgis.core import QgsApplication, QgsRasterLayer\n"
        "app = QgsApplication([], False); app.initQgis()\n"
        "layer = QgsRasterLayer(sys.argv[1], 'classes')\n"
        "items = layer.renderer().legendSymbologyItems()\n"
        "print(json.dumps({'valid': layer.isValid(), 'renderer': layer.renderer().type(),\n"
        "                  'legend': [[label, colour.name()] for label, colour in items],\n"
        "                  'categories': [i.label for i in layer.dataProvider().colorTable(1)[:3]]}))\n")
    proc = subprocess.run([QGIS_PYTHON, "-c", script, str(run.run_dir / "classes.tif")], capture_output=True,
                          text=True, timeout=120, env=_qgis_env(str(tmp_path)))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    from geoseg.export import prompt_colors

    colours = ["#{:02x}{:02x}{:02x}".format(*c) for c in prompt_colors(2)]
    assert report == {"valid": True, "renderer": "paletted",
                      "legend": [["red roof", colours[0]], ["blue pool", colours[1]]],
                      "categories": ["none", "red roof", "blue pool"]}


def test_exemplars_per_prompt_are_capped(tmp_path, monkeypatch):
    """Crops are held in memory: the count per prompt is bounded, with one line naming the feature."""
    from shapely import box

    import geoseg.exemplars
    from geoseg.errors import ExemplarError

    monkeypatch.setattr(geoseg.exemplars, "MAX_PER_PROMPT", 2)
    x0, y0 = NORTH_UP.c, NORTH_UP.f
    path = _exemplar_file(tmp_path, [box(x0 + 10 * i, y0 - 30, x0 + 10 * i + 5, y0 - 20) for i in range(3)])
    with pytest.raises(ExemplarError, match=r"ex.gpkg: exemplar feature 3: more than 2 exemplars of 'roof'"):
        _read(tmp_path, path)


def test_negative_rule_is_the_same_on_tensors_and_arrays():
    """The device path applies negatives to torch tensors, the host path to numpy arrays: same numbers,
    bit for bit (the max is a mask product, exact), prompts without negatives untouched."""
    import torch

    from geoseg.prompts import apply_negatives

    rng = np.random.default_rng(3)
    probs = rng.random((4, 5, 6, 7), dtype=np.float32)  # 2 prompts + 3 negatives
    applies = ((0, 2), ())
    host = apply_negatives(probs, applies)
    device = apply_negatives(torch.from_numpy(probs.copy()), applies).numpy()
    assert host.shape == (4, 2, 6, 7) and np.array_equal(host, device)
    expected = probs[:, 0] * (np.float32(1) - np.maximum(probs[:, 2], probs[:, 4]))
    assert np.array_equal(host[:, 0], expected) and np.array_equal(host[:, 1], probs[:, 1])
