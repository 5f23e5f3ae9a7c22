"""The model card ``geoseg train`` writes next to the weights, and reading it back for ``segment``.

A trained model directory holds what ``save_pretrained`` writes (weights, config, processor) plus
``geoseg_model_card.json`` (machine-readable: base model and revision, raster and labels with
their sha256, classes and prompts, training options, validation IoU before and after) and
``README.md`` (the same for people). ``segment`` copies the JSON card into its run manifest when
``--model`` is such a directory, so a run says which training produced its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_NAME = "geoseg_model_card.json"
README_NAME = "README.md"
#: Bumped when a field changes meaning; readers check it.
CARD_FORMAT = 1


def sha256_file(path: str | Path) -> str | None:
    """Hex sha256 of a local file (streamed, bounded memory); None for a GDAL virtual path or URL."""
    p = Path(path)
    if str(path).startswith("/vsi") or not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_model_card(model: str | Path) -> dict | None:
    """The geoseg model card of a local model directory, or None (hub ids, directories without one).

    A card that cannot be parsed is reported and ignored: it describes the weights, it never
    decides how they run.
    """
    path = Path(model) / CARD_NAME
    if not os.path.isdir(model) or not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable model card ignored: %s", path, exc)
        return None
    return card if isinstance(card, dict) else None


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def render_markdown(card: dict) -> str:
    """A human-readable README.md for the model directory (a HF-style card with YAML front matter)."""
    base = card["base_model"]
    val = card["validation"]
    tr = card["training"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-segmentation",
        f"base_model: {base['id']}",
        "tags: [clipseg, geoseg, remote-sensing]",
        "---",
        "",
        f"# {card['name']}",
        "",
        f"CLIPSeg decoder (FiLM included) fine-tuned by geoseg {card['geoseg_version']} on {card['created']}; "
        "the CLIP encoders are frozen and unchanged from the base model.",
        "",
        "Use it with `geoseg segment RASTER --model <this directory> --prompt \"<prompt>\"` and the prompts below.",
        "",
        "## Base model",
        "",
        f"- id: `{base['id']}`",
        f"- revision: `{_fmt(base.get('revision'))}`",
        "",
        "## Data",
        "",
        f"- raster: `{card['raster']['name']}` (sha256 `{_fmt(card['raster']['sha256'])}`), "
        f"bands {card['raster']['bands']}, resolution {_fmt(card['raster']['resolution'])}",
        f"- labels: `{card['labels']['name']}` (sha256 `{_fmt(card['labels']['sha256'])}`), "
        f"class field `{_fmt(card['labels']['class_field'])}`",
        f"- training area: {card['training_area']['kind']}"
        + (f" `{card['training_area']['name']}`" if card['training_area'].get('name') else ""),
        "",
        "## Classes",
        "",
        "| class | prompt | IoU before | IoU after |",
        "|---|---|---|---|",
    ]
    for c in card["classes"]:
        lines.append(f"| {c['value']} | {c['prompt']} | {_fmt(val['iou_before'].get(c['value']))} "
                     f"| {_fmt(val['iou_after'].get(c['value']))} |")
    lines += [
        "",
        f"Validation: {_fmt(val['tiles'])} tiles over {val['blocks']} of {card['split']['blocks']} blocks of "
        f"{card['split']['block_size']} px held out (spatial hold-out); IoU at probability "
        f"{val['threshold']}; mean IoU {_fmt(val['mean_before'])} before, {_fmt(val['mean_after'])} after.",
        "",
        "## Training",
        "",
        f"- steps: {tr['steps_run']} of {tr['steps']} (best at step {tr['best_step']}), batch size {tr['batch_size']}, "
        f"lr {tr['lr']}, loss {tr['loss']}, seed {tr['seed']}",
        f"- tiles: {tr['tiles']['train']} training, {tr['tiles']['val']} validation; activation cache: {tr['cache']}",
        f"- device: {tr['device']}, {tr['seconds']} s",
        "",
    ]
    return "\n".join(lines)
