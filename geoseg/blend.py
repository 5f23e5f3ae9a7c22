"""Weighted accumulation of overlapping tile probabilities and normalisation by the sum of weights.

Probabilities are blended, never binary masks: thresholding after the blend keeps the decision
boundary smooth across tile overlaps. Accumulators cover only the chunk's own region, so memory is
``(prompts + 1) x chunk`` floats whatever the raster size.
"""

from __future__ import annotations

import numpy as np

from .tiling import Region


def new_accumulators(region: Region, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed (sum of w·p per prompt, sum of w) arrays for one chunk region."""
    return (np.zeros((n_prompts, region.height, region.width), np.float32),
            np.zeros((region.height, region.width), np.float32))


def accumulate(acc: np.ndarray, wsum: np.ndarray, region: Region, tile: Region,
               probs: np.ndarray, weights: np.ndarray) -> None:
    """Add one tile's weighted probabilities (P, T, T) to the part of ``region`` it covers."""
    inter = tile.intersection(region)
    if inter is None:
        return
    in_tile, in_region = inter.slices(within=tile), inter.slices(within=region)
    w = weights[in_tile]
    acc[(slice(None), *in_region)] += probs[(slice(None), *in_tile)] * w
    wsum[in_region] += w


def normalise(acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Blended probabilities (P, h, w) float32; NaN (the output nodata) where the input is masked."""
    out = np.full(acc.shape, np.nan, dtype=np.float32)
    ok = valid & (wsum > 0)
    np.divide(acc, wsum, out=out, where=ok[None])
    return out
