"""Model side of geoseg: the Segmenter protocol and a per-process, thread-safe model cache.

Only ``clipseg.py`` imports torch/transformers, and only when a CLIPSeg model is actually built,
so planning, vectorizing and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

from .base import Segmenter, SegmenterFactory, TensorSegmenter

__all__ = ["Segmenter", "SegmenterFactory", "TensorSegmenter", "cached_segmenter", "clipseg_factory", "encode_plan",
           "encode_prompts"]

_lock = threading.Lock()
_cache: dict[Hashable, Segmenter] = {}


def cached_segmenter(factory: SegmenterFactory) -> Segmenter:
    """The process's segmenter for ``factory``, built on first use.

    A Dask worker process keeps one model (the last factory asked for); chunk tasks after the first
    pay nothing. The lock makes concurrent worker threads wait for the one load instead of loading
    the weights twice.
    """
    key = factory.key()
    with _lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = factory()
        return _cache[key]


def encode_prompts(factory: SegmenterFactory, prompts: Sequence[str]) -> Any:
    """Prompt embeddings, computed once per run in one task and passed to every chunk task."""
    return cached_segmenter(factory).encode_prompts(tuple(prompts))


def encode_plan(factory: SegmenterFactory, plan: Any) -> Any:
    """A run's conditional embeddings (positives, then negatives) from a :class:`geoseg.prompts.PromptPlan`.

    A segmenter with ``encode_plan`` (CLIPSeg) applies templates and exemplars itself. Any other
    segmenter (the deterministic test models) has no text encoder to put templates through: it gets
    the bare phrases, and exemplars are refused.
    """
    from ..errors import ConfigError

    segmenter = cached_segmenter(factory)
    if hasattr(segmenter, "encode_plan"):
        return segmenter.encode_plan(plan)
    if plan.has_exemplars:
        raise ConfigError(f"the model {factory!r} cannot take exemplar (image) prompts")
    return segmenter.encode_prompts(tuple(plan.phrases))


def clipseg_factory(model: str, revision: str | None = None, device: str = "auto",
                    compile: bool = False) -> SegmenterFactory:
    """The product's factory: CLIPSeg via transformers (imports torch lazily, on first call)."""
    from .clipseg import ClipSegFactory

    return ClipSegFactory(model, revision, device, compile)
