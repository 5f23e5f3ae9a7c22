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


@pytest.fixture
def mimalloc_pool(monkeypatch):
    """Arrow's bundled allocator as the default pool, as pyarrow starts; restored afterwards."""
    import pyarrow as pa

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    before = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
    except NotImplementedError:
        pytest.skip("this pyarrow has no mimalloc")
    yield pa
    pa.set_memory_pool(before)


def test_polygon_stages_move_arrow_to_the_c_heap(tmp_path, mimalloc_pool):
    """A chunk's polygon stage and the client's output switch Arrow to malloc, whose freed pages
    malloc_trim returns (mimalloc kept ~70 MiB per row of chunks in the client; memory.py)."""
    import numpy as np

    from geoseg.pieces import chunk_components
    from geoseg.streaming import (
        FINAL_SUFFIX,
        SEAM_SUFFIX,
        PolygonOutput,
        VectorJob,
        part_seams,
        part_tables,
        write_chunk_polygons,
    )
    from geoseg.tiling import Region

    job = VectorJob(("a",), (0.5,), (1.0, 0, 0, 0, -1.0, 0), "EPSG:32633", 8, 8)
    region = Region(0, 0, 8, 8)
    (tmp_path / "parts").mkdir()
    comps = chunk_components(np.zeros((1, 8, 8), np.float32), np.ones((8, 8), bool), 0, 0, (0.5,))
    write_chunk_polygons(tmp_path, region.name, comps, region, job)
    assert mimalloc_pool.default_memory_pool().backend_name == "system"

    mimalloc_pool.set_memory_pool(mimalloc_pool.mimalloc_memory_pool())
    with PolygonOutput(tmp_path / "polygons.gpkg", [region], job) as out:
        assert mimalloc_pool.default_memory_pool().backend_name == "system"
        out.add(region.name, part_tables(tmp_path / "parts" / f"{region.name}{FINAL_SUFFIX}"),
                part_seams(tmp_path / "parts" / f"{region.name}{SEAM_SUFFIX}"))
        assert out.finish() == 0


def test_a_pool_the_user_chose_is_kept(mimalloc_pool, monkeypatch):
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    memory.arrow_on_c_heap()
    assert mimalloc_pool.default_memory_pool().backend_name == "mimalloc"
