"""Shared fixtures: a tiny random CLIPSeg saved offline, an in-process Dask client, test rasters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Run the suite under another torch thread count (float tolerances must hold at any): e.g.
#: ``GEOSEG_TEST_TORCH_THREADS=2 pytest``. OMP_NUM_THREADS/MKL_NUM_THREADS work as usual too.
_TORCH_THREADS = os.environ.get("GEOSEG_TEST_TORCH_THREADS")
if _TORCH_THREADS:
    import torch

    torch.set_num_threads(int(_TORCH_THREADS))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RASTERS = SHARED / "rasters"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from .tiny_model import build_tiny_clipseg

    return build_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


@pytest.fixture(scope="session")
def inproc_client():
    """A distributed client whose worker runs in this process (so tests can count model calls)."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        yield client


@pytest.fixture
def perpixel():
    from .models import PerPixelFactory, PerPixelSegmenter

    PerPixelSegmenter.calls = 0
    return PerPixelFactory(weights=((1.0, 0.0, -0.5), (0.0, -0.5, 1.0)), bias=(0.3, 0.25))
