"""Prompt encoding with every feature on, next to the time of one tile (issue 10).

Builds a random-weight CLIPSeg with the real architecture (CLIPSegConfig defaults: ViT-B/16 vision,
12-layer text encoder, reduce_dim 64, as CIDAS/clipseg-rd64-refined; the tiny test tokenizer) and
measures, in one process:

* preparing 6 exemplar crops from a raster (read path + crop, blur, darken),
* encoding a plain run (2 phrases) and a full one (2 prompts + 2 negatives through the 6 aerial
  templates = 24 texts, plus 3 exemplars per prompt mixed in),
* one tile through the model with the full run's 4 embeddings (a batch of 4 tiles, per tile).

Weights are random, so the times (not the outputs) are what carries over. Run:
``python bench/bench_prompts.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    import geopandas as gpd
    import torch
    from shapely import box
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from geoseg.exemplars import ExemplarSource, read_exemplars
    from geoseg.model.clipseg import ClipSegSegmenter
    from geoseg.prompts import AERIAL_TEMPLATES, PromptPlan, parse_negatives
    from geoseg.raster import inspect_raster
    from tests.rasters import NORTH_UP, scene, write
    from tests.tiny_model import build_tiny_processor

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = build_tiny_processor(tmp / "model")
        tok = processor.tokenizer
        config = CLIPSegConfig(text_config={"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
        CLIPSegForImageSegmentation(config).save_pretrained(tmp / "model")
        seg = ClipSegSegmenter.load(str(tmp / "model"), device="cpu")

        src = write(tmp / "in.tif", scene(2000, 2000, seed=0))
        info = inspect_raster(str(src))
        x0, y0 = NORTH_UP.c, NORTH_UP.f
        geoms = [box(x0 + 40 * i + 5, y0 - 40 * i - 30, x0 + 40 * i + 25, y0 - 40 * i - 10) for i in range(6)]
        gpd.GeoDataFrame({"class": ["building"] * 3 + ["road"] * 3}, geometry=geoms,
                         crs="EPSG:32633").to_file(tmp / "ex.gpkg")
        prompts = ("building", "road")
        crop_s, (crops, ids) = best_of(lambda: read_exemplars(
            [ExemplarSource(str(tmp / "ex.gpkg"), class_field="class")], info, prompts))
        negatives, applies = parse_negatives(["parking lot", "tree"], prompts)
        full = PromptPlan(prompts, AERIAL_TEMPLATES, negatives, applies, crops, 0.5, ids)
        plain = PromptPlan(prompts)

        plain_s, _ = best_of(lambda: seg.encode_plan(plain))
        full_s, emb = best_of(lambda: seg.encode_plan(full))
        tiles = np.random.default_rng(0).random((4, 3, 352, 352), dtype=np.float32)
        tile_s, _ = best_of(lambda: seg.predict(tiles, emb), n=2)
        per_tile = tile_s / len(tiles)

    texts = len(full.phrases) * len(full.templates)
    print(f"torch threads: {torch.get_num_threads()}, full-size random CLIPSeg on CPU")
    print("| step | seconds |")
    print("|---|---|")
    print(f"| prepare 6 exemplar crops (read, crop, blur, darken) | {crop_s:.3f} |")
    print(f"| encode plain (2 phrases) | {plain_s:.3f} |")
    print(f"| encode full ({texts} texts, 6 exemplar crops, mix) | {full_s:.3f} |")
    print(f"| one tile, 4 embeddings (2 prompts + 2 negatives) | {per_tile:.3f} |")
    print(f"full prompt encoding + crops = {(full_s + crop_s) / per_tile:.1f} tiles' time; "
          f"a 10,000 x 10,000 px raster is ~{int(1.78 * 1e8 / 352 ** 2)} tiles")


if __name__ == "__main__":
    main()
