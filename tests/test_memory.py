"""geoseg.memory: freed heap goes back to the OS between chunks (the peak it saves is measured in
bench/bench_polygons.py, not here: RSS in a test depends on the machine's allocator)."""

from __future__ import annotations

import sys

import pytest

from geoseg import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_glibc_malloc_trim_is_found_on_linux():
    """Where it exists it must be found: a lookup that quietly fails would switch the release off."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    trim = memory._libc_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was released, 0: none was
