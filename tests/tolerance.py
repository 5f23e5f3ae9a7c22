"""Float tolerances for comparing two float32 network forward passes, scaled to the values compared.

Two float32 forward passes of the same network that differ only in how their sums are grouped (the
thread count, the CPU's matrix kernels, a batched vs per-prompt decoder) differ by rounding only:
about 2^-24 (6e-8) relative per operation, accumulated over the network's depth. The error is
relative to the *magnitude of the activations*, not of each element, so the tolerance is relative
to the largest value compared, never a bare absolute 1e-5 (tiny-CLIPSeg logits reach ~19 in
magnitude: 1e-5 absolute is 5e-7 relative, about what two threads instead of one already give).
"""

from __future__ import annotations

import numpy as np

#: float32 reassociation over a small network (tiny CLIPSeg: 4 vision layers read, 1 text tower,
#: a 3-block decoder, ~10 matmul/attention steps deep): measured up to 5.5e-7 of the largest logit
#: between 1 and 2 threads; 1e-5 gives 20x margin and is still 1000x below any real bug's effect
#: (a wrong layer or prompt moves logits by > 1e-2 of their magnitude).
FORWARD_RTOL = 1e-5


def assert_forward_close(actual, expected, rel: float = FORWARD_RTOL, scale: float | None = None) -> None:
    """``|actual - expected| <= rel * max|expected|`` elementwise (``scale`` overrides the magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    magnitude = float(np.abs(expected).max()) if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * magnitude)
