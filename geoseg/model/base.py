"""The small interface the pipeline talks to, so tests can plug in a deterministic model.

A segmenter turns prompts into embeddings once per run, then maps batches of tiles to per-prompt
probabilities. Tiles are float32 arrays of shape ``(N, 3, T, T)`` with values in 0..1 (already
globally stretched and padded); the segmenter does its own model-specific normalisation.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Segmenter(Protocol):
    """Prompts → embeddings (once per run); tiles × embeddings → probabilities."""

    #: The model's resolved revision (a commit hash), recorded in the manifest; None if unknown.
    revision: str | None

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Encode every prompt once; the result is passed back to :meth:`predict`."""

    def predict(self, tiles: np.ndarray, embeddings: Any) -> np.ndarray:
        """Return float32 probabilities of shape ``(N, P, T, T)`` for ``tiles`` of shape ``(N, 3, T, T)``.

        A model that runs out of accelerator memory raises :class:`geoseg.errors.ModelOutOfMemoryError`.
        """


class SegmenterFactory(Protocol):
    """A picklable zero-argument callable that builds a :class:`Segmenter`.

    It travels to Dask workers instead of the model itself; each process builds the model once and
    keeps it, cached under :meth:`key` (see :func:`geoseg.model.cached_segmenter`).
    """

    def __call__(self) -> Segmenter:
        """Build the model (on a worker; may load weights)."""

    def key(self) -> Hashable:
        """What identifies the model this factory builds: equal keys share one loaded model."""


@runtime_checkable
class TensorSegmenter(Segmenter, Protocol):
    """A segmenter that also takes torch tensors on its own device: the device-resident chunk path.

    The pipeline uploads the raw halo once and stretches, tiles, normalises and blends it on
    ``device`` (see :mod:`geoseg.model.device_chunk`); only the blended chunk comes back. A
    segmenter without these members (e.g. a numpy test model) gets the host path: numpy tiles in,
    numpy probabilities out, blended on the CPU.
    """

    device: Any  # a torch.device
    pixel_mean: tuple[float, ...]  # the model input is (x - mean) / std of 0..1 RGB
    pixel_std: tuple[float, ...]

    def predict_tensor(self, pixels: Any, embeddings: Any) -> Any:
        """Float32 probabilities (N, P, T, T) on ``device`` for normalised pixels (N, 3, T, T) there."""
