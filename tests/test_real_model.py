"""The real CIDAS/clipseg-rd64-refined weights (marker ``realweights``: deselected by default).

Run where the weights are in the HF cache: ``pytest -m realweights``. Not run on machines that
cannot reach the hub (CI here); the tiny random model covers the same code path offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

import geoseg

SAMPLE = Path(__file__).resolve().parents[1] / "sample_tiles" / "town_rgb_utm.tif"


@pytest.mark.realweights
def test_real_model_finds_the_pools(tmp_path):
    cfg = geoseg.SegmentConfig(str(SAMPLE), ("swimming pool",), tmp_path / "out", workers=1)
    result = geoseg.segment(cfg)
    with rasterio.open(SAMPLE) as src, rasterio.open(result.probabilities) as probs:
        r, g, b = src.read().astype(int)
        p = probs.read(1)
    pool = (b > 150) & (r < 100)  # the generator paints pools saturated blue
    assert pool.any()
    assert np.nanmean(p[pool]) > np.nanmean(p[~pool]) + 0.2
    assert result.features > 0
