"""Offline helpers that build a tiny random-weight CLIPSeg checkpoint for tests.

Nothing here touches the network. Two helpers:

``build_tiny_clipseg(out_dir, seed=0)``
    Builds a deterministic, tiny ``CLIPSegForImageSegmentation`` (352x352 input, 16 px patches,
    hidden size 32, 5 vision layers of which the decoder reads only layers 1-3) plus a matching
    ``CLIPSegProcessor`` (``ViTImageProcessor`` with CLIPSeg's ImageNet mean/std, and a small
    byte-level ``CLIPTokenizer``) and saves both with ``save_pretrained(out_dir)``. Returns
    ``out_dir``. Load back with ``CLIPSegForImageSegmentation.from_pretrained(out_dir)`` /
    ``CLIPSegProcessor.from_pretrained(out_dir)`` / ``AutoProcessor.from_pretrained(out_dir)``.

``seed_hf_cache(hf_home, model_id, model_dir, revision_hash=...)``
    Copies a saved checkpoint into the real huggingface_hub cache layout
    (``hf_home/hub/models--{org}--{name}/{blobs,refs/main,snapshots/<hash>/}``) so that a process
    started with ``HF_HOME=hf_home HF_HUB_OFFLINE=1`` can ``from_pretrained(model_id)`` it.
    Returns the revision hash. (The env vars must be set before ``huggingface_hub`` is imported,
    so use them in a subprocess or in the environment of the process under test.)

No pytest import here, so the module can be used from scripts and benchmarks too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

#: CLIPSeg (CIDAS/clipseg-rd64-refined) uses ImageNet statistics, not CLIP's.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

IMAGE_SIZE = 352
PATCH_SIZE = 16
HIDDEN = 32
VISION_LAYERS = 5
EXTRACT_LAYERS = (1, 2, 3)  # decoder never reads vision layers 4 and 5
REDUCE_DIM = 16
PROJECTION_DIM = 16
TEXT_LAYERS = 2
MAX_TEXT_LEN = 77

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

DEFAULT_REVISION_HASH = "0123456789abcdef0123456789abcdef01234567"

# A handful of merges so that BPE actually does something (common English bits + our prompts).
_MERGES = [
    "i n",
    "in g</w>",
    "o o",
    "e r",
    "a n",
    "t h",
    "th e</w>",
    "r e",
    "o n</w>",
    "b u",
    "bu i",
    "l d",
    "w a",
    "t e",
    "e r</w>",
    "p oo",
    "poo l</w>",
    "o a",
    "r oa",
    "roa d</w>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Byte-level CLIP-style vocab: 256 chars, 256 chars + ``</w>``, merge results, specials last."""
    chars = list(_bytes_to_unicode().values())
    tokens: list[str] = chars + [c + "</w>" for c in chars]
    for merge in _MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, list(_MERGES)


def _write_tokenizer_files(tmp: Path) -> tuple[Path, Path]:
    vocab, merges = tiny_vocab_and_merges()
    vocab_file = tmp / "vocab.json"
    merges_file = tmp / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_processor(save_dir: Path | None = None):
    """Return a ``CLIPSegProcessor`` with a tiny tokenizer (optionally saved to ``save_dir``)."""
    from transformers import CLIPSegProcessor, CLIPTokenizer, ViTImageProcessor

    with tempfile.TemporaryDirectory() as td:
        vocab_file, merges_file = _write_tokenizer_files(Path(td))
        # transformers 5.x: CLIPTokenizer is the tokenizers-backed class; it accepts the
        # vocab/merges as file paths (or a dict / list) and no longer takes ``vocab_file=``.
        tokenizer = CLIPTokenizer(
            vocab=str(vocab_file),
            merges=str(merges_file),
            model_max_length=MAX_TEXT_LEN,
        )
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear, as in CIDAS/clipseg-rd64-refined
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if save_dir is not None:
        processor.save_pretrained(str(save_dir))
    return processor


def tiny_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import CLIPSegConfig

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_LEN,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    vision_config = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return CLIPSegConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=PROJECTION_DIM,
        extract_layers=list(EXTRACT_LAYERS),
        reduce_dim=REDUCE_DIM,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=2 * REDUCE_DIM,
        conditional_layer=0,
    )


def build_tiny_clipseg(out_dir: Path, seed: int = 0) -> Path:
    """Build and save a tiny deterministic random-weight CLIPSeg model + processor in ``out_dir``."""
    import torch
    from transformers import CLIPSegForImageSegmentation

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(out_dir)
    tok = processor.tokenizer
    config = tiny_config(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Seed the global RNG (init uses it) and restore the caller's RNG state afterwards.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    finally:
        torch.random.set_rng_state(rng_state)
    model.eval()
    model.save_pretrained(str(out_dir))
    return out_dir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seed_hf_cache(
    hf_home: Path,
    model_id: str,
    model_dir: Path,
    revision_hash: str = DEFAULT_REVISION_HASH,
) -> str:
    """Install the files of ``model_dir`` as ``model_id`` into the HF hub cache under ``hf_home``.

    Layout written (same as huggingface_hub's own downloads)::

        hf_home/hub/models--{org}--{name}/
            blobs/<sha256 of file>
            refs/main                       (contains ``revision_hash``)
            snapshots/<revision_hash>/<file> -> ../../blobs/<sha256>   (copy if symlinks fail)

    Use with ``HF_HOME=hf_home HF_HUB_OFFLINE=1`` in the environment of the loading process.
    """
    hf_home, model_dir = Path(hf_home), Path(model_dir)
    if len(revision_hash) != 40 or any(c not in "0123456789abcdef" for c in revision_hash):
        raise ValueError(f"revision_hash must be 40 lowercase hex chars, got {revision_hash!r}")
    repo_dir = hf_home / "hub" / ("models--" + model_id.replace("/", "--"))
    blobs = repo_dir / "blobs"
    snapshot = repo_dir / "snapshots" / revision_hash
    refs = repo_dir / "refs"
    for d in (blobs, snapshot, refs):
        d.mkdir(parents=True, exist_ok=True)

    for src in sorted(model_dir.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(model_dir)
        blob = blobs / _sha256(src)
        if not blob.exists():
            shutil.copyfile(src, blob)
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        try:
            os.symlink(os.path.relpath(blob, dst.parent), dst)
        except OSError:
            shutil.copyfile(blob, dst)
    (refs / "main").write_text(revision_hash)  # no trailing newline, as huggingface_hub writes it
    return revision_hash


__all__ = [
    "DEFAULT_REVISION_HASH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_tiny_clipseg",
    "build_tiny_processor",
    "seed_hf_cache",
    "tiny_vocab_and_merges",
]
