"""``geoseg train``: fine-tune CLIPSeg's decoder on a user's polygons over their own raster.

The CLIP encoders stay frozen; only the light decoder (FiLM layers, reduces, transformer layers,
transposed convolutions: ~1.1 M parameters at rd64) learns, conditioned on each class's prompt
embedding, which is computed once. Because the encoder is frozen its activations for a tile never
change, so they are cached (in memory up to a bound, then in a temporary directory) when tiles are
seen more than once on average; then a step costs only the decoder.

Tiles come from :mod:`geoseg.trainingdata` (the segment read path, per-tile rasterised labels,
block-wise spatial hold-out). Validation IoU is measured on the held-out blocks before training and
every ``eval_every`` steps; the decoder weights with the best validation IoU are kept (early
stopping after ``patience`` evaluations without improvement). The output directory is written with
``save_pretrained`` (model and processor) plus the model card, in a temporary directory renamed into
place at the end: there is never a half-written model directory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_json_atomic
from .config import DEFAULT_MODEL, TILE_SIZE
from .errors import ConfigError, OutputExistsError, ReferenceDataError
from .modelcard import CARD_FORMAT, CARD_NAME, README_NAME, read_model_card, render_markdown, sha256_file
from .prompts import PromptPlan, load_templates
from .raster import bounded_gdal_cache, inspect_raster, open_input
from .tiling import Region
from .trainingdata import (
    TRAIN,
    VAL,
    LabelIndex,
    TileSet,
    block_stats,
    load_labels,
    pick_block_size,
    pixel_window,
    split_blocks,
    tile_grid,
    training_area,
)

log = logging.getLogger(__name__)

LOSSES = ("bce", "dice", "bce+dice")
#: Validation IoU is measured at this probability, segment's default threshold.
VAL_THRESHOLD = 0.5


def parse_prompts(items: Sequence[str]) -> dict[str, str]:
    """``CLASS=TEXT`` pairs (split at the first ``=``) into a mapping."""
    out: dict[str, str] = {}
    for item in items:
        cls, sep, text = item.partition("=")
        if not sep or not cls.strip() or not text.strip():
            raise ConfigError(f"--prompt takes CLASS=TEXT (e.g. --prompt 'bldg=a building'), got {item!r}")
        out[cls.strip()] = text.strip()
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``geoseg train`` run needs.

    ``class_field`` None: every polygon is one class, whose prompt is the single ``prompts`` entry
    (given as ``TEXT`` or ``CLASS=TEXT``). ``block_size`` None picks one (trainingdata.BLOCK_CHOICES).
    ``cache`` None decides by cost (cache when steps x batch exceeds the number of training tiles);
    True/False force it. ``eval_every`` None: about 20 evaluations over the run.
    """

    raster: str
    labels: str
    output: Path
    class_field: str | None = None
    prompts: tuple[str, ...] = ()
    aoi: str | None = None
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    loss: str = "bce"
    seed: int = 0
    val_fraction: float = 0.2
    patience: int = 5
    block_size: int | None = None
    bands: tuple[int, ...] = ()
    resolution: float | None = None
    tile_size: int = TILE_SIZE
    train_stride: int | None = None
    eval_every: int | None = None
    cache: bool | None = None
    cache_memory_mb: int = 2048
    overwrite: bool = False
    #: Prompt templates, as ``segment --templates``: the decoder learns FiLM for the embeddings that
    #: ``segment`` will feed it, so both must expand the prompts the same way (recorded in the card).
    templates: str = "aerial"

    def __post_init__(self):
        object.__setattr__(self, "raster", str(self.raster))
        object.__setattr__(self, "labels", str(self.labels))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "bands", tuple(self.bands))
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise ConfigError(f"--patience must be >= 1, got {self.patience}")
        if self.block_size is not None and self.block_size < 16:
            raise ConfigError(f"--block-size must be >= 16 px, got {self.block_size}")
        if self.class_field is None and len(self.prompts) != 1:
            raise ConfigError("without --class-field every polygon is one class: give exactly one --prompt TEXT")

    def class_prompts(self, classes: Sequence[str]) -> dict[str, str]:
        """Prompt text of every class: ``--prompt CLASS=TEXT``, else the class value itself."""
        if self.class_field is None:
            text = self.prompts[0].partition("=")[2].strip() or self.prompts[0].strip()
            return {classes[0]: text}
        given = parse_prompts(self.prompts)
        unknown = sorted(set(given) - set(classes))
        if unknown:
            raise ReferenceDataError(f"{self.labels}: --prompt names class {unknown[0]!r}, which field "
                              f"{self.class_field!r} does not hold (classes: {', '.join(classes)})")
        return {c: given.get(c, c) for c in classes}

    def single_class(self) -> str | None:
        if self.class_field is not None:
            return None
        cls, sep, _ = self.prompts[0].partition("=")
        return cls.strip() if sep else self.prompts[0].strip()


# -- the output directory ---------------------------------------------------------------------

def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; even then replace only a geoseg model directory
    (or an empty one), never a user's other files."""
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{output}: exists; choose another -o, or --overwrite to replace a model directory")
    if not output.is_dir() or (any(output.iterdir()) and not (output / CARD_NAME).is_file()):
        raise OutputExistsError(f"{output}: exists and is not a geoseg model directory; not replacing it "
                                "even with --overwrite")


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """A hidden temp directory beside ``output``, renamed onto it when the block succeeds.

    An existing ``output`` (already allowed by :func:`check_output`) is moved aside first and deleted
    only after the rename; on any error the temp directory is removed and ``output`` is untouched.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
        os.rename(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the activation cache ---------------------------------------------------------------------

class ActivationCache:
    """Frozen-encoder activations (plus targets and weights) per (tile, split).

    In memory up to ``memory_bytes``, then as one torch file per entry in a temporary directory
    (deleted by :meth:`close`), so memory stays bounded for any number of tiles.
    """

    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.used = 0
        self.mem: dict[Any, tuple] = {}
        self.disk: dict[Any, Path] = {}
        self._dir: tempfile.TemporaryDirectory | None = None

    def __contains__(self, key) -> bool:
        return key in self.mem or key in self.disk

    @staticmethod
    def _size(entry) -> int:
        acts, targets, weight = entry
        return sum(a.numel() * a.element_size() for a in acts) + targets.nbytes + weight.nbytes

    def put(self, key, entry) -> None:
        size = self._size(entry)
        if self.used + size <= self.memory_bytes:
            self.mem[key] = entry
            self.used += size
            return
        import torch

        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="geoseg-train-cache-")
            log.info("activation cache beyond %d MB spills to %s", self.memory_bytes >> 20, self._dir.name)
        path = Path(self._dir.name) / f"{len(self.disk)}.pt"
        torch.save(entry, path)
        self.disk[key] = path

    def get(self, key):
        if key in self.mem:
            return self.mem[key]
        import torch

        return torch.load(self.disk[key], weights_only=False)

    @property
    def where(self) -> str:
        return "memory" if not self.disk else ("disk" if not self.mem else "memory+disk")

    def close(self) -> None:
        self.mem.clear()
        self.disk.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


# -- losses and scores --------------------------------------------------------------------------

def weighted_loss(logits, targets, weight, kind: str):
    """Mean loss over pixels of weight 1 (masked, outside the area, other split: weight 0).

    ``logits``/``targets`` (N, T, T) float32, ``weight`` (N, T, T) float32. Dice is the soft dice
    of the sigmoid over the batch's weighted pixels.
    """
    import torch
    import torch.nn.functional as F

    total = weight.sum().clamp_min(1.0)
    loss = logits.new_zeros(())
    if kind in ("bce", "bce+dice"):
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = loss + (bce * weight).sum() / total
    if kind in ("dice", "bce+dice"):
        p = torch.sigmoid(logits) * weight
        t = targets * weight
        loss = loss + 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return loss


def iou(inter: np.ndarray, union: np.ndarray) -> list[float | None]:
    """Per-class IoU; None where a class has neither truth nor prediction pixels."""
    return [float(i / u) if u else None for i, u in zip(inter, union)]


def mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# -- the trainer ------------------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic(seed: int):
    """Seed torch and use deterministic algorithms where torch has them; restore the caller's mode."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


class DecoderTrainer:
    """Runs tiles through the frozen encoder (or the cache) and the trainable decoder."""

    def __init__(self, segmenter, plan: PromptPlan, tiles: TileSet, src, loss: str,
                 cache: ActivationCache | None):
        import torch

        self.seg = segmenter
        self.torch = torch
        self.device = segmenter.device
        self.tiles, self.src, self.loss_kind, self.cache = tiles, src, loss, cache
        segmenter.model.requires_grad_(False)
        self.decoder = segmenter.model.decoder
        self.decoder.requires_grad_(True)
        # the same encoding `segment` uses (templates); it runs in inference mode, and a clone outside
        # it is an ordinary tensor autograd accepts
        self.embeddings = segmenter.encode_plan(plan).clone().to(self.device)

    def encode(self, rgb: np.ndarray) -> list:
        """Frozen-encoder activations of (n, 3, T, T) 0..1 tiles, normalised as ``segment`` does."""
        torch, seg = self.torch, self.seg
        x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).to(self.device)
        x = (x - seg.mean) / seg.std
        with torch.no_grad(), self.autocast():
            return [a.detach() for a in seg.activations(x)]

    def autocast(self):
        dtype = self.seg.autocast_dtype
        return self.torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def batch(self, tiles: Sequence[Region], which: int):
        """Activations (list of (n, L, D)), targets (n, P, T, T) float, weights (n, T, T) float."""
        torch = self.torch
        entries: list[Any] = [None] * len(tiles)
        todo = []
        for i, t in enumerate(tiles):
            if self.cache is not None and (t, which) in self.cache:
                entries[i] = self.cache.get((t, which))
            else:
                todo.append(i)
        if todo:
            samples = [self.tiles.sample(self.src, tiles[i], which) for i in todo]
            acts = self.encode(np.stack([s[0] for s in samples]))
            for j, i in enumerate(todo):
                # a copy, not a view: a view would keep the whole batch's storage alive in the cache
                entry = ([a[j:j + 1].cpu().clone() for a in acts], samples[j][1], samples[j][2])
                entries[i] = entry
                if self.cache is not None:
                    self.cache.put((tiles[i], which), entry)
        acts = [torch.cat([e[0][k] for e in entries]).to(self.device) for k in range(len(entries[0][0]))]
        targets = torch.from_numpy(np.stack([e[1] for e in entries])).to(self.device, torch.float32)
        weights = torch.from_numpy(np.stack([e[2] for e in entries])).to(self.device, torch.float32)
        return acts, targets, weights

    def logits(self, acts, k: int):
        n = acts[0].shape[0]
        cond = self.embeddings[k:k + 1].expand(n, -1)
        with self.autocast():
            out = self.decoder(acts, cond).logits
        return out.float().reshape(n, *out.shape[-2:])

    def step_loss(self, tiles: Sequence[Region]):
        acts, targets, weights = self.batch(tiles, TRAIN)
        losses = [weighted_loss(self.logits(acts, k), targets[:, k], weights, self.loss_kind)
                  for k in range(targets.shape[1])]
        return sum(losses) / len(losses)

    def validate(self, tiles: Sequence[Region], batch_size: int) -> list[float | None]:
        """Per-class IoU over the validation pixels (weight 1) at probability VAL_THRESHOLD."""
        torch = self.torch
        p = self.embeddings.shape[0]
        inter, union = np.zeros(p), np.zeros(p)
        with torch.no_grad():
            for i in range(0, len(tiles), batch_size):
                acts, targets, weights = self.batch(tiles[i:i + batch_size], VAL)
                w = weights.bool()
                for k in range(p):
                    pred = (self.logits(acts, k) >= 0.0) & w  # sigmoid(x) >= 0.5 <=> x >= 0
                    truth = targets[:, k].bool() & w
                    inter[k] += float((pred & truth).sum())
                    union[k] += float((pred | truth).sum())
        return iou(inter, union)


@dataclass
class TrainResult:
    """What ``train`` returns: the model directory and its card."""

    output: Path
    card: dict = field(repr=False)

    def summary(self) -> str:
        v = self.card["validation"]
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        return (f"{self.output}\nvalidation IoU {fmt(v['mean_before'])} -> {fmt(v['mean_after'])} "
                f"(steps run: {self.card['training']['steps_run']}, best at {self.card['training']['best_step']})")


def _batches(n_tiles: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless seeded epochs: each a fresh permutation of the tiles, cut into batches (the last
    batch of an epoch is topped up from the next so every batch has ``batch_size`` tiles)."""
    pool = np.empty(0, int)
    while True:
        while len(pool) < batch_size:
            pool = np.concatenate([pool, rng.permutation(n_tiles)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def prepare(config: TrainConfig):
    """Validate every input (one clear error, nothing written) and plan tiles and the split."""
    check_output(config.output, config.overwrite)
    info = inspect_raster(config.raster, config.bands, None, config.resolution)
    if info.all_masked:
        raise ReferenceDataError(f"{config.raster}: every pixel is masked; nothing to train on")
    labels = load_labels(config.labels, config.class_field, info.crs, config.single_class())
    prompts = config.class_prompts(labels.classes)
    area = training_area(info, labels, config.aoi, config.raster)
    window = pixel_window(info, area)
    block = pick_block_size(window, config.block_size)
    index = LabelIndex(labels, info)
    stats = block_stats(info, area, index, window, block)
    if not stats:
        raise ReferenceDataError(f"{config.aoi or config.labels}: the training area covers no pixel centre "
                                 f"of {config.raster}")
    for k, cls in enumerate(labels.classes):
        if not any(s[2][k] for s in stats):
            raise ReferenceDataError(f"{config.labels}: class {cls!r} has no pixels inside the training area of "
                              f"{config.raster} (polygons smaller than a pixel, or outside the area)")
    split = split_blocks(stats, labels.classes, config.val_fraction, config.seed, block)
    if config.val_fraction > 0 and not split.val_blocks:
        raise ReferenceDataError(f"{config.raster}: the training area spans one block of {block} px, too few to hold "
                          f"any out for validation; lower --block-size, or --val-fraction 0")
    tiles = TileSet(info, area, index, split)
    tile = config.tile_size
    stride = config.train_stride or tile // 2
    train_tiles = [t for t in tile_grid(window, tile, stride) if tiles.has_pixels(t, TRAIN)]
    val_tiles = [t for t in tile_grid(window, tile, tile) if tiles.has_pixels(t, VAL)] if split.val_blocks else []
    return info, labels, prompts, area, window, tiles, train_tiles, val_tiles


def train(config: TrainConfig, progress: bool = False) -> TrainResult:
    """Train the decoder on ``config.labels`` over ``config.raster`` and write ``config.output``."""
    from tqdm.auto import tqdm

    from .model.clipseg import ClipSegSegmenter

    start = time.perf_counter()
    info, labels, prompts, area, window, tiles, train_tiles, val_tiles = prepare(config)
    split = tiles.split
    log.info("%d training tiles, %d validation tiles, %d blocks of %d px (%d held out)", len(train_tiles),
             len(val_tiles), split.blocks, split.block_size, len(split.val_blocks))
    segmenter = ClipSegSegmenter.load(config.model, config.revision, config.device)
    classes = labels.classes
    eval_every = config.eval_every or max(1, config.steps // 20)
    n_evals = config.steps // eval_every + 1
    use_cache = config.cache if config.cache is not None else config.steps * config.batch_size > len(train_tiles)
    cache = ActivationCache(config.cache_memory_mb << 20) if (use_cache or n_evals > 1) else None
    train_cache = cache if use_cache else None
    rng = np.random.default_rng(config.seed)
    history = []
    with deterministic(config.seed), bounded_gdal_cache(), open_input(info) as src:
        plan = PromptPlan(tuple(prompts[c] for c in classes), load_templates(config.templates))
        trainer = DecoderTrainer(segmenter, plan, tiles, src, config.loss, None)
        import torch

        opt = torch.optim.AdamW(trainer.decoder.parameters(), lr=config.lr, weight_decay=0.0)

        def validate():
            if not val_tiles:
                return [None] * len(classes)
            trainer.cache = cache
            trainer.decoder.eval()
            scores = trainer.validate(val_tiles, config.batch_size)
            trainer.decoder.train()
            trainer.cache = train_cache
            return scores

        before = validate()
        best = (mean_defined(before), 0, copy.deepcopy(trainer.decoder.state_dict()), before)
        trainer.cache, waited, step = train_cache, 0, 0
        trainer.decoder.train()
        batches = _batches(len(train_tiles), config.batch_size, rng)
        bar = tqdm(total=config.steps, unit="step", desc="train", disable=not progress)
        score = best[0]
        try:
            with bar:
                for step in range(1, config.steps + 1):
                    loss = trainer.step_loss([train_tiles[i] for i in next(batches)])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_value = float(loss.detach())
                    if step % eval_every == 0 or step == config.steps:
                        scores = validate()
                        score = mean_defined(scores)
                        history.append({"step": step, "loss": round(loss_value, 5), "val_iou": score})
                        if score is not None and (best[0] is None or score > best[0]):
                            best, waited = (score, step, copy.deepcopy(trainer.decoder.state_dict()), scores), 0
                        elif val_tiles:
                            waited += 1
                    bar.set_postfix(loss=f"{loss_value:.4f}", val_iou="n/a" if score is None else f"{score:.3f}",
                                    refresh=False)
                    bar.update()
                    if val_tiles and waited >= config.patience:
                        log.info("early stop at step %d: no better validation IoU in %d evaluations", step, waited)
                        break
        finally:
            if cache is not None:
                cache_where = cache.where if use_cache else "validation only"
                cache.close()
        if val_tiles:
            trainer.decoder.load_state_dict(best[2])
        else:  # nothing to select on: keep the last weights
            best = (None, step, None, [None] * len(classes))
    seconds = round(time.perf_counter() - start, 1)
    card = _card(config, info, labels, prompts, split, train_tiles, val_tiles, segmenter, before, best, step,
                 "none" if cache is None else cache_where, history, seconds)
    with staged_directory(config.output) as tmp:
        segmenter.model.save_pretrained(tmp)
        segmenter.processor.save_pretrained(tmp)
        write_json_atomic(tmp / CARD_NAME, card)
        (tmp / README_NAME).write_text(render_markdown(card), encoding="utf-8")
    return TrainResult(config.output, card)


def _card(config: TrainConfig, info, labels, prompts, split, train_tiles, val_tiles, segmenter, before, best,
          steps_run, cache_where, history, seconds) -> dict:
    classes = labels.classes
    base_card = read_model_card(config.model)
    return {
        "geoseg_model_card": CARD_FORMAT,
        "name": config.output.name,
        "geoseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"id": config.model, "revision": segmenter.revision,
                       **({"card": base_card} if base_card else {})},
        "raster": {"name": Path(config.raster).name, "path": config.raster, "sha256": sha256_file(config.raster),
                   "bands": list(info.bands), "resolution": config.resolution, "crs": info.crs.to_string(),
                   "stretch": [list(s) for s in info.stretch]},
        "labels": {"name": Path(config.labels).name, "path": config.labels, "sha256": sha256_file(config.labels),
                   "class_field": config.class_field, "reprojected_from": labels.reprojected_from},
        "training_area": ({"kind": "aoi", "name": Path(config.aoi).name, "path": config.aoi,
                           "sha256": sha256_file(config.aoi)} if config.aoi else {"kind": "labels' bounding box"}),
        "classes": [{"value": c, "prompt": prompts[c], "pixels": {"train": split.class_pixels[k][0],
                                                                  "val": split.class_pixels[k][1]}}
                    for k, c in enumerate(classes)],
        "prompts": {c: prompts[c] for c in classes},
        "templates": list(load_templates(config.templates)),
        "split": {"block_size": split.block_size, "blocks": split.blocks, "val_blocks": len(split.val_blocks),
                  "val_fraction": config.val_fraction,
                  "area_pixels": {"train": split.area_pixels[0], "val": split.area_pixels[1]}},
        "training": {"steps": config.steps, "steps_run": steps_run, "best_step": best[1],
                     "batch_size": config.batch_size, "lr": config.lr, "loss": config.loss, "seed": config.seed,
                     "patience": config.patience, "tile_size": config.tile_size,
                     "tiles": {"train": len(train_tiles), "val": len(val_tiles)}, "cache": cache_where,
                     "device": str(segmenter.device), "seconds": seconds, "trained": "decoder (FiLM included)",
                     "history": history},
        "validation": {"threshold": VAL_THRESHOLD, "tiles": len(val_tiles), "blocks": len(split.val_blocks),
                       "iou_before": dict(zip(classes, before)), "iou_after": dict(zip(classes, best[3])),
                       "mean_before": mean_defined(before), "mean_after": best[0]},
    }
