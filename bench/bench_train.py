"""Benchmark ``geoseg train``: training steps/s of the full-size CLIPSeg, with and without cached activations.

The model is built offline with random weights in the architecture of CIDAS/clipseg-rd64-refined:
``CLIPSegConfig`` defaults (CLIP ViT-B text and vision widths and depths, projection 512,
extract_layers 3/6/9, reduce_dim 64, decoder 4 heads / 2048 intermediate, FiLM at layer 0) with the
two settings the defaults do NOT match: vision ``patch_size=16`` (the default is 32, i.e. ViT-B/32)
and ``use_complex_transposed_convolution=True`` (the "refined" decoder). Random weights cost the
same arithmetic as the real ones.

A step runs the product's :class:`geoseg.train.DecoderTrainer` (the code ``geoseg train`` runs):

* ``no cache``: every step reads its tiles (here: random 0..1 tiles from memory, so I/O is not
  measured), runs the frozen encoder up to the last extracted layer, then the decoder forward and
  backward and one AdamW step;
* ``cached``: activations come from :class:`geoseg.train.ActivationCache` (filled beforehand, in
  memory), so a step is the decoder forward/backward + AdamW only.

Usage: ``python bench/bench_train.py [--batch-sizes 1,4] [--steps 3] [--device cpu] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from geoseg.prompts import PromptPlan

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation  # noqa: E402

from geoseg.model.clipseg import ClipSegSegmenter, pick_device  # noqa: E402
from geoseg.tiling import Region  # noqa: E402
from geoseg.train import ActivationCache, DecoderTrainer  # noqa: E402
from tests.tiny_model import build_tiny_processor  # noqa: E402

TILE = 352


def full_size_config() -> CLIPSegConfig:
    return CLIPSegConfig(vision_config={"patch_size": 16}, use_complex_transposed_convolution=True)


class RandomTiles:
    """Stands in for trainingdata.TileSet: seeded random tiles, targets and weights, no raster."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def sample(self, src, tile: Region, which: int):
        rgb = self.rng.random((3, TILE, TILE), dtype=np.float32)
        targets = (self.rng.random((1, TILE, TILE)) > 0.8).astype(np.uint8)
        return rgb, targets, np.ones((TILE, TILE), bool)


def time_steps(trainer: DecoderTrainer, opt, tiles: list[Region], batch: int, steps: int) -> float:
    """Seconds per step (after one warm-up step)."""
    def step(i):
        chosen = [tiles[(i * batch + k) % len(tiles)] for k in range(batch)]
        loss = trainer.step_loss(chosen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    step(0)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = CLIPSegForImageSegmentation(full_size_config())
    seg = ClipSegSegmenter(net, build_tiny_processor(), device, "random rd64-refined architecture", None)
    built = time.perf_counter() - t0
    trainable = sum(p.numel() for p in net.decoder.parameters())
    total = sum(p.numel() for p in net.parameters())
    print(f"full-size CLIPSeg (ViT-B/16, rd64, refined decoder): {total / 1e6:.1f} M parameters, "
          f"{trainable / 1e6:.2f} M trained (decoder); built in {built:.1f} s; device {device}"
          f"{'' if device.type != 'cpu' else f', {torch.get_num_threads()} threads'}; autocast "
          f"{seg.autocast_dtype or 'off'}")
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        tiles = [Region(0, TILE * i, TILE, TILE) for i in range(batch * (args.steps + 1))]
        for cached in (False, True):
            trainer = DecoderTrainer(seg, PromptPlan(("a building",)), RandomTiles(), None, "bce", None)
            opt = torch.optim.AdamW(trainer.decoder.parameters(), lr=1e-4)
            if cached:
                cache = ActivationCache(8 << 30)
                trainer.cache = cache
                with torch.no_grad():
                    for i in range(0, len(tiles), batch):
                        trainer.batch(tiles[i:i + batch], 0)  # fills the cache
            s = time_steps(trainer, opt, tiles, batch, args.steps)
            rows.append((batch, "cached" if cached else "no cache", s))
            if cached:
                per_tile = cache.used / len(tiles)
                cache.close()
    print()
    print("| batch | activations | s/step | steps/s | tiles/s |")
    print("|---|---|---|---|---|")
    for batch, what, s in rows:
        print(f"| {batch} | {what} | {s:.3f} | {1 / s:.3f} | {batch / s:.2f} |")
    print(f"\ncache entry per tile: {per_tile / 2**20:.2f} MiB (activations at layers "
          f"{list(net.config.extract_layers)}, targets, weights)")
    for batch in sorted({r[0] for r in rows}):
        slow = next(r[2] for r in rows if r[0] == batch and r[1] == "no cache")
        fast = next(r[2] for r in rows if r[0] == batch and r[1] == "cached")
        print(f"batch {batch}: caching makes a step {slow / fast:.1f}x faster")


if __name__ == "__main__":
    main()
