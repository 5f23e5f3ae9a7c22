"""Model side of geoseg: the Segmenter protocol and a per-process, thread-safe model cache.

Only ``clipseg.py`` imports torch/transformers, and only when a CLIPSeg model is actually built,
so planning, vectorizing and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from .base import Segmenter, SegmenterFactory

__all__ = ["Segmenter", "SegmenterFactory", "cached_segmenter", "clipseg_factory"]

_lock = threading.Lock()
_cache: dict[Any, tuple[Segmenter, dict]] = {}


def _key(factory: SegmenterFactory):
    return factory.key() if hasattr(factory, "key") else factory


def cached_segmenter(factory: SegmenterFactory, prompts: Sequence[str]) -> tuple[Segmenter, Any]:
    """The process's segmenter for ``factory`` and its prompt embeddings, built on first use.

    A Dask worker process keeps one model (the last factory asked for) and encodes each prompt set
    once; chunk tasks after the first pay nothing. The lock makes concurrent worker threads wait
    for the one load instead of loading the weights twice.
    """
    key, prompts = _key(factory), tuple(prompts)
    with _lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = (factory(), {})
        segmenter, embeddings = _cache[key]
        if prompts not in embeddings:
            embeddings[prompts] = segmenter.encode_prompts(prompts)
        return segmenter, embeddings[prompts]


def clipseg_factory(model: str, revision: str | None = None, device: str = "auto") -> SegmenterFactory:
    """The product's factory: CLIPSeg via transformers (imports torch lazily, on first call)."""
    from .clipseg import ClipSegFactory

    return ClipSegFactory(model, revision, device)
