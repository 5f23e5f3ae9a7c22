"""Hand memory a finished chunk freed back to the OS, so a process's peak does not creep chunk by chunk.

A chunk's polygon stage makes about a million small GEOS allocations (glibc's heap) and Arrow
buffers (Arrow's own mimalloc pool). Freed, both stay mapped in the process. Measured in one
process polygonizing 4096² speckle chunks (1.1 M polygons each) one after another: ~200 MiB of
freed memory stayed mapped after each chunk, and chunks 2-4 peaked at 699-710 MiB against 605 for
the first; returning the free pages after each chunk gave 609-614. `vectorize`'s processes on
4096² chunks of 8192² peaked at 629 MiB against 682-700 (bench/README.md). Dask workers gain less: their
nanny already sets ``MALLOC_TRIM_THRESHOLD_``, which trims the top of the heap.

Arrow allocates from the C heap in geoseg's processes (:func:`arrow_on_c_heap`), not from its
bundled mimalloc, which keeps the pages a thread freed for that thread's next allocations (the
GeoPackage writer thread, the merge in the client's main thread). Replaying the 8192² segment
client's polygon side on its chunk parts (bench/README.md), writing a row of chunks peaked at
374 MiB with mimalloc and 302 with the C heap, in the same time (8.5 and 7.6 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any


@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (macOS, Windows, musl: nothing to do there)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return freed heap pages of every glibc arena and Arrow's unused pool memory to the OS.

    Costs a few milliseconds; call it between chunks, never inside a hot loop."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def arrow_on_c_heap() -> None:
    """Make Arrow allocate with malloc in this process (module docstring), so that the freed
    buffers go where :func:`release_free_memory` can return them. Not when the user chose a pool
    with ``ARROW_DEFAULT_MEMORY_POOL``. Process-wide, hence called where geoseg's own polygon
    stages start, not on import."""
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
