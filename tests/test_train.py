"""`geoseg train`: the tiny random CLIPSeg learns red squares (not blue discs) on one half of a scene and
finds them on the other; same seed, same weights; the segment read path is the training read path;
bad input is one line and writes nothing; the model card, and segment's manifest recording it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from click.testing import CliRunner
from shapely.geometry import box, shape

import geoseg
from geoseg.cli import main
from geoseg.errors import ReferenceDataError
from geoseg.modelcard import CARD_NAME
from geoseg.prompts import PromptPlan, load_templates
from geoseg.raster import inspect_raster, open_input
from geoseg.tiling import Region
from geoseg.train import TrainConfig, train, weighted_loss
from geoseg.trainingdata import (
    TRAIN,
    VAL,
    LabelIndex,
    TileSet,
    block_stats,
    load_labels,
    pixel_window,
    read_tile,
    split_blocks,
    training_area,
)

from .rasters import BLUE, NORTH_UP, RED, UTM33, scene, write

torch = pytest.importorskip("torch")

SIZE = 1024
PROMPT = "red roof"
STEPS = 200


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on this shared 2-core machine two OpenMP threads spin against the other
    processes (measured: 5.4 s per decoder step with two threads, 0.8 s with one, under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def squares_scene(size: int, seed: int) -> np.ndarray:
    """uint8 RGB: noisy green ground, bright red squares (the objects) and blue discs (distractors)
    of similar sizes, 32-80 px: two to five patches of the tiny model's 16 px grid, so the test is
    about learning *which* object, not about sub-patch edges a 32-wide random encoder blurs."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), np.uint8)
    img[0] = rng.integers(20, 80, (size, size))
    img[1] = rng.integers(90, 160, (size, size))
    img[2] = rng.integers(20, 80, (size, size))
    yy, xx = np.mgrid[:size, :size]
    n = size * size // 40000
    for _ in range(n):
        cy, cx, rad = rng.integers(0, size, 2).tolist() + [int(rng.integers(16, 40))]
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = np.array(BLUE, np.uint8)[:, None]
    for _ in range(n):
        side = int(rng.integers(32, 80))
        r, c = rng.integers(0, size - side, 2)
        img[:, r:r + side, c:c + side] = np.array(RED, np.uint8)[:, None, None]
    return img


def red_mask(img: np.ndarray) -> np.ndarray:
    """Truth: pixels painted RED (discs drawn later may cover parts of rectangles)."""
    return (img == np.array(RED, np.uint8)[:, None, None]).all(axis=0)


def polygons(mask: np.ndarray, transform=NORTH_UP) -> list:
    return [shape(g) for g, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=transform)]


def write_vector(path: Path, geoms, crs=UTM33, **fields) -> Path:
    gpd.GeoDataFrame(fields or None, geometry=list(geoms), crs=crs).to_file(path)
    return path


def map_box(row0, col0, row1, col1, transform=NORTH_UP):
    (x0, y0), (x1, y1) = transform @ (col0, row1), transform @ (col1, row0)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    """1024² UTM RGB scene: red rectangles labelled 'roof', blue discs not; AOI = the left half."""
    d = tmp_path_factory.mktemp("train-scene")
    img = squares_scene(SIZE, seed=5)
    truth = red_mask(img)
    raster = write(d / "scene.tif", img)
    labels = write_vector(d / "labels.gpkg", polygons(truth), **{"class": ["roof"] * len(polygons(truth))})
    aoi = write_vector(d / "aoi.gpkg", [map_box(0, 0, SIZE, SIZE // 2)])
    return {"dir": d, "raster": raster, "labels": labels, "aoi": aoi, "truth": truth}


def config(files, out, **kw) -> TrainConfig:
    base = dict(class_field="class", prompts=(f"roof={PROMPT}",), aoi=str(files["aoi"]), steps=20, batch_size=4,
                lr=3e-3)
    return TrainConfig(str(files["raster"]), str(files["labels"]), out, **{**base, **kw})


# -- the headline: training on one half raises IoU on the other ------------------------------------

def heldout_iou(files, model_dir, out, client) -> tuple[float, dict]:
    """IoU of `geoseg segment --model model_dir` at 0.5 on the right half (never trained on), by numpy."""
    cfg = geoseg.SegmentConfig(str(files["raster"]), (PROMPT,), out, model=str(model_dir))
    result = geoseg.segment(cfg, client=client)
    with rasterio.open(result.probabilities) as ds:
        pred = ds.read(1) >= 0.5
    truth = files["truth"]
    p, t = pred[:, SIZE // 2:], truth[:, SIZE // 2:]
    return float((p & t).sum() / (p | t).sum()), result.manifest


@pytest.fixture(scope="module")
def trained(scene_files, tiny_model_dir, inproc_client):
    out = scene_files["dir"] / "model"
    # measured on this scene (seed 5): validation IoU 0.59 / 0.71 / 0.76 / 0.81 after 50 / 100 / 150 / 200
    # steps of batch 4 at lr 1e-2 with bce+dice (bce alone at lr 3e-3 learns ~4x slower)
    return train(config(scene_files, out, model=str(tiny_model_dir), steps=STEPS, batch_size=4, lr=1e-2,
                        loss="bce+dice", patience=100, eval_every=25))


def test_training_on_one_half_finds_objects_on_the_other(scene_files, tiny_model_dir, trained, inproc_client, tmp_path):
    before, _ = heldout_iou(scene_files, tiny_model_dir, tmp_path / "untrained", inproc_client)
    after, manifest = heldout_iou(scene_files, trained.output, tmp_path / "trained", inproc_client)
    assert before < 0.3, before  # the random tiny model does not know red squares
    assert after >= 0.7, (before, after)
    print(f"held-out IoU {before:.3f} -> {after:.3f}; validation IoU {trained.card['validation']['mean_before']:.3f}"
          f" -> {trained.card['validation']['mean_after']:.3f}")
    # segment's manifest records the model card of the directory it ran
    assert manifest.model_card == json.loads((trained.output / CARD_NAME).read_text())
    card = trained.card
    assert card["validation"]["mean_after"] > card["validation"]["mean_before"]
    # `geoseg evaluate` on the held-out half agrees with the numpy count: truth polygons come from the
    # pixel mask (edges on pixel edges) and the AOI is the exact right half, so both count the same pixels
    right = write_vector(tmp_path / "right.gpkg", [map_box(0, SIZE // 2, SIZE, SIZE)])
    for run, iou in (("untrained", before), ("trained", after)):
        report = geoseg.evaluate(tmp_path / run, geoseg.EvaluateConfig(
            truth=scene_files["labels"], class_field="class", classes=(("roof", PROMPT),), aoi=right,
            output=tmp_path / f"eval-{run}", objects=False))
        assert report[PROMPT].at_threshold.iou == pytest.approx(iou, abs=1e-12), run


def test_model_card_content(scene_files, tiny_model_dir, trained):
    out = trained.output
    card = json.loads((out / CARD_NAME).read_text())
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert card["geoseg_model_card"] == 1
    # trained through segment's default templates, so `segment --model` feeds the embeddings it learnt on
    assert card["templates"] == list(load_templates("aerial")) and len(card["templates"]) > 1
    assert card["base_model"] == {"id": str(tiny_model_dir), "revision": None}
    assert card["raster"]["name"] == "scene.tif" and card["raster"]["sha256"] == sha(scene_files["raster"])
    assert card["labels"]["name"] == "labels.gpkg" and card["labels"]["sha256"] == sha(scene_files["labels"])
    assert card["labels"]["class_field"] == "class"
    assert card["training_area"]["kind"] == "aoi" and card["training_area"]["sha256"] == sha(scene_files["aoi"])
    assert card["prompts"] == {"roof": PROMPT}
    assert [c["value"] for c in card["classes"]] == ["roof"]
    assert card["training"]["steps"] == STEPS and card["training"]["seed"] == 0
    assert card["training"]["loss"] == "bce+dice" and card["training"]["batch_size"] == 4
    assert 1 <= card["training"]["best_step"] <= card["training"]["steps_run"] <= STEPS
    v = card["validation"]
    assert v["iou_before"]["roof"] == v["mean_before"] and v["iou_after"]["roof"] == v["mean_after"]
    assert 0 <= v["mean_before"] < v["mean_after"] <= 1
    # the best evaluation in the history is the one kept
    assert max(h["val_iou"] for h in card["training"]["history"]) == v["mean_after"]
    # validation pixels are only ever in the AOI's held-out blocks, which exist and are not everything
    assert 0 < card["split"]["area_pixels"]["val"] < card["split"]["area_pixels"]["train"]
    readme = (out / "README.md").read_text()
    assert PROMPT in readme and "scene.tif" in readme and f"{v['mean_after']:.3f}" in readme
    # a directory from_pretrained loads: weights, config and the processor
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".model.")], "temp directories left"


def test_cli_segment_with_trained_model(scene_files, trained, tmp_path):
    small = write(tmp_path / "small.tif", scene(300, 300, seed=9))
    run = CliRunner().invoke(main, ["segment", str(small), "-p", PROMPT, "-o", str(tmp_path / "run"),
                                    "--model", str(trained.output), "-q"])
    assert run.exit_code == 0, run.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model_card"]["prompts"] == {"roof": PROMPT}
    assert manifest["model_card"]["raster"]["sha256"] == trained.card["raster"]["sha256"]


# -- reproducibility ------------------------------------------------------------------------------

def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_same_seed_same_weights(scene_files, tiny_model_dir, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[name] = train(config(scene_files, tmp_path / name, model=str(tiny_model_dir), seed=seed, steps=12,
                                  eval_every=4))
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact: same seed, same CPU, same operations
    assert runs["a"].card["validation"] == runs["b"].card["validation"]
    changed = [k for k in a if not torch.equal(a[k], c[k])]
    assert changed and all(k.startswith("decoder.") for k in changed), "a different seed changes the decoder only"
    base = weights(tiny_model_dir)
    assert all(torch.equal(a[k], base[k]) for k in a if not k.startswith("decoder.")), "encoders stay frozen"


# -- the read path --------------------------------------------------------------------------------

def test_training_tiles_equal_segment_tiles(tmp_path, tiny_model_dir):
    """read_tile gives the model input segment's read_chunk + ChunkTiles.batches give, bit for bit
    (uint16 with a percentile stretch, a nodata band and tiles past the raster edge), and the
    trainer's encoder + decoder give segment's logits."""
    from geoseg.model.clipseg import ClipSegSegmenter
    from geoseg.stages import ChunkJob, read_chunk
    from geoseg.train import DecoderTrainer

    img = scene(500, 610, seed=4).astype(np.uint16) * 37
    img[:, 40:90] = 0
    src = write(tmp_path / "u16.tif", img, nodata=0)
    info = inspect_raster(str(src))
    region = Region(0, 0, info.height, info.width)
    job = ChunkJob(region, info, ("x",), (0.5,), 352, 264, 64, str(tmp_path), "fp", None)
    chunk = read_chunk(job)
    batch = next(chunk.batches(info, 64))
    assert len(chunk.tiles) >= 4 and any(t.row_stop > info.height for t in chunk.tiles) is False
    edge = [t for t in chunk.tiles if t.col_stop == info.width]
    assert edge
    with open_input(info) as ds:
        for k, t in enumerate(chunk.tiles):
            rgb, valid = read_tile(ds, info, t)
            assert np.array_equal(rgb, batch[k]), t
            assert not valid[40:90].any() if t.row == 0 else True
        # beyond the raster: zeros and invalid
        rgb, valid = read_tile(ds, info, Region(300, 400, 352, 352))
    assert not valid[200:].any() and not rgb[:, 200:].any() and not valid[:, 210:].any()

    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    emb = seg.encode_prompts(("red roof",))
    expected = seg.predict(batch[:2], emb)[:, 0]
    trainer = DecoderTrainer(seg, PromptPlan(("red roof",)), None, None, "bce", None)
    with torch.no_grad():
        got = torch.sigmoid(trainer.logits(trainer.encode(batch[:2]), 0)).numpy()
    # same operations in the same order on the same CPU; 1e-6 allows the sigmoid's float32 rounding only
    assert np.abs(got - expected).max() <= 1e-6


# -- labels, split and loss -----------------------------------------------------------------------

def test_weights_ignore_masked_other_split_and_outside_area(tmp_path):
    img = scene(400, 400, seed=6)
    img[:, :, :30] = 0  # nodata columns
    src = write(tmp_path / "m.tif", img, nodata=0)
    info = inspect_raster(str(src))
    truth = red_mask(img)
    lab = write_vector(tmp_path / "l.gpkg", polygons(truth), cls=["a"] * len(polygons(truth)))
    labels = load_labels(lab, "cls", info.crs)
    area = map_box(0, 0, 400, 300)  # columns 300.. are outside the AOI
    index = LabelIndex(labels, info)
    window = pixel_window(info, area)
    stats = block_stats(info, area, index, window, 100)
    split = split_blocks(stats, labels.classes, 0.25, 0, 100)
    assert len(split.val_blocks) >= 1 and split.blocks == 12
    tiles = TileSet(info, area, index, split)
    tile = Region(0, 0, 352, 352)
    with open_input(info) as ds:
        _, targets, w_train = tiles.sample(ds, tile, TRAIN)
        _, _, w_val = tiles.sample(ds, tile, VAL)
    assert not (w_train & w_val).any()
    assert not w_train[:, :30].any() and not w_val[:, :30].any()        # masked
    assert not w_train[:, 300:].any() and not w_val[:, 300:].any()      # outside the AOI
    for br, bc in split.val_blocks:
        assert not w_train[br * 100:(br + 1) * 100, bc * 100:(bc + 1) * 100].any()
    assert np.array_equal(targets[0].astype(bool), truth[:352, :352])
    # the loss does not see weight-0 pixels: flipping their targets changes nothing
    logits = torch.randn(1, 352, 352)
    t = torch.from_numpy(targets[:1].astype(np.float32))
    w = torch.from_numpy(w_train[None].astype(np.float32))
    flipped = torch.where(w > 0, t, 1 - t)
    for kind in ("bce", "dice", "bce+dice"):
        assert torch.equal(weighted_loss(logits, t, w, kind), weighted_loss(logits, flipped, w, kind)), kind


def test_geographic_labels_are_reprojected(scene_files, tmp_path):
    info = inspect_raster(str(scene_files["raster"]))
    utm = load_labels(scene_files["labels"], "class", info.crs)
    gdf = gpd.read_file(scene_files["labels"]).to_crs("EPSG:4326")
    gdf.to_file(tmp_path / "ll.gpkg")
    ll = load_labels(tmp_path / "ll.gpkg", "class", info.crs)
    assert ll.reprojected_from == "EPSG:4326" and utm.reprojected_from is None
    tile = Region(100, 100, 352, 352)
    a, b = LabelIndex(utm, info).targets(tile), LabelIndex(ll, info).targets(tile)
    # a round trip through lon/lat moves vertices by far less than a 0.5 m pixel: at most a
    # pixel centre lying exactly on an edge may flip
    assert (a != b).sum() <= 0.001 * a.size and a.sum() > 1000
    area = training_area(info, ll, None, "scene.tif")
    assert area.bounds == pytest.approx(training_area(info, utm, None, "scene.tif").bounds, abs=1e-3)


# -- bad input: one line naming the file, nothing written --------------------------------------------

def refuse(args, tmp_path, match: str, file: str):
    out = tmp_path / "model"
    res = CliRunner().invoke(main, ["train", *args, "-o", str(out), "-q"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), res.output
    assert match in lines[0] and file in lines[0], lines[0]
    assert not out.exists() or out.name == "exists"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(scene_files, tiny_model_dir, tmp_path):
    raster, labels = str(scene_files["raster"]), str(scene_files["labels"])
    common = ["--model", str(tiny_model_dir), "--steps", "2"]
    far = write_vector(tmp_path / "far.gpkg", [box(0, 0, 10, 10)], **{"class": ["roof"]})
    refuse([raster, "--labels", str(far), "--class-field", "class", *common], tmp_path, "overlaps the raster",
           "far.gpkg")
    refuse([raster, "--labels", labels, "--class-field", "kind", *common], tmp_path, "no field 'kind'",
           "labels.gpkg")
    # a second class whose only polygon lies outside the raster
    gdf = gpd.read_file(labels)
    extra = gpd.GeoDataFrame({"class": ["pool"]}, geometry=[box(0, 0, 10, 10)], crs=gdf.crs)
    two = tmp_path / "two.gpkg"
    gpd.pd.concat([gdf, extra]).to_file(two)
    refuse([raster, "--labels", str(two), "--class-field", "class", *common], tmp_path, "class 'pool' has no pixels",
           "two.gpkg")
    refuse([raster, "--labels", labels, "--class-field", "class", "-p", "pool=a pool", *common], tmp_path,
           "names class 'pool'", "labels.gpkg")
    # an existing output is refused, and left as it was
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "mine.txt").write_text("keep")
    res = CliRunner().invoke(main, ["train", raster, "--labels", labels, "--class-field", "class", *common,
                                    "-o", str(exists), "-q"])
    assert res.exit_code == 1 and "exists" in res.output and str(exists) in res.output
    res = CliRunner().invoke(main, ["train", raster, "--labels", labels, "--class-field", "class", *common,
                                    "-o", str(exists), "-q", "--overwrite"])
    assert res.exit_code == 1 and "not a geoseg model directory" in res.output
    assert (exists / "mine.txt").read_text() == "keep" and len(list(exists.iterdir())) == 1


def test_overwrite_replaces_a_model_directory(scene_files, tiny_model_dir, tmp_path):
    out = tmp_path / "m"
    first = train(config(scene_files, out, model=str(tiny_model_dir), steps=2, val_fraction=0.0))
    with pytest.raises(geoseg.OutputExistsError, match="exists"):
        train(config(scene_files, out, model=str(tiny_model_dir), steps=3, val_fraction=0.0))
    second = train(config(scene_files, out, model=str(tiny_model_dir), steps=3, val_fraction=0.0, overwrite=True))
    assert first.card["training"]["steps"] == 2 and second.card["training"]["steps"] == 3
    assert json.loads((out / CARD_NAME).read_text())["training"]["steps"] == 3
    assert second.card["validation"]["mean_after"] is None  # no validation asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_labels_error_is_a_geoseg_error():
    assert issubclass(ReferenceDataError, geoseg.GeosegError)


def test_failure_while_writing_leaves_nothing(scene_files, tiny_model_dir, tmp_path, monkeypatch):
    """A crash after training, while the directory is written, leaves neither -o nor a temp directory."""
    import geoseg.train as train_module

    def broken(card):
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "render_markdown", broken)
    with pytest.raises(OSError, match="disk full"):
        train(config(scene_files, tmp_path / "m", model=str(tiny_model_dir), steps=1, val_fraction=0.0))
    assert list(tmp_path.iterdir()) == []


def test_cli_single_class_without_class_field(scene_files, tiny_model_dir, tmp_path):
    """No --class-field: every polygon is one class, named and prompted by the single --prompt."""
    out = tmp_path / "one"
    res = CliRunner().invoke(main, ["train", str(scene_files["raster"]), "--labels", str(scene_files["labels"]),
                                    "-p", "a red roof", "--aoi", str(scene_files["aoi"]), "--model",
                                    str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output and "validation IoU" in res.output
    card = json.loads((out / CARD_NAME).read_text())
    assert card["prompts"] == {"a red roof": "a red roof"} and card["labels"]["class_field"] is None
    assert card["training"]["steps_run"] == 2
    bad = CliRunner().invoke(main, ["train", str(scene_files["raster"]), "--labels", str(scene_files["labels"]),
                                    "-o", str(tmp_path / "two"), "-q"])
    assert bad.exit_code == 1 and "exactly one --prompt" in bad.output
    assert not (tmp_path / "two").exists()


def test_activation_cache_spills_to_disk_beyond_its_bound():
    from geoseg.train import ActivationCache

    def entry(i):
        return ([torch.full((1, 5, 4), float(i))], np.full((1, 3, 3), i, np.uint8), np.ones((3, 3), bool))

    size = 5 * 4 * 4 + 9 + 9  # float32 activations + uint8 targets + bool weights
    cache = ActivationCache(memory_bytes=2 * size)
    for i in range(5):
        cache.put(("tile", i), entry(i))
    assert cache.used == 2 * size and len(cache.mem) == 2 and len(cache.disk) == 3 and cache.where == "memory+disk"
    folder = next(iter(cache.disk.values())).parent
    for i in range(5):
        acts, targets, _ = cache.get(("tile", i))
        assert torch.equal(acts[0], entry(i)[0][0]) and (targets == i).all()
    cache.close()
    assert not folder.exists()
