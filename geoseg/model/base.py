"""The small interface the pipeline talks to, so tests can plug in a deterministic model.

A segmenter turns prompts into embeddings once per run, then maps batches of tiles to per-prompt
probabilities. Tiles are float32 arrays of shape ``(N, 3, T, T)`` with values in 0..1 (already
globally stretched and padded); the segmenter does its own model-specific normalisation.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Segmenter(Protocol):
    """Prompts → embeddings (once per run); tiles × embeddings → probabilities."""

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Encode every prompt once; the result is passed back to :meth:`predict`."""

    def predict(self, tiles: np.ndarray, embeddings: Any) -> np.ndarray:
        """Return float32 probabilities of shape ``(N, P, T, T)`` for ``tiles`` of shape ``(N, 3, T, T)``."""


#: A picklable, hashable zero-argument callable that builds a Segmenter. It travels to Dask workers
#: instead of the model itself; each process builds the model once (see ``model.loader``).
SegmenterFactory = Callable[[], Segmenter]
