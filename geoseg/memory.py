"""Hand memory a finished chunk freed back to the OS, so a process's peak does not creep chunk by chunk.

A chunk's polygon stage makes about a million small GEOS allocations (glibc's heap) and Arrow
buffers (Arrow's own mimalloc pool). Freed, both stay mapped in the process: measured on 4096²
speckle chunks (1.1 M polygons each, ``bench/README.md``), a process kept ~250 MiB above its
baseline after the first chunk, and its next chunk peaked ~100 MiB higher than the first, because
its large arrays were mapped beside that free but fragmented heap. So the peak grew with the number
of chunks a process had run, which is what made memory not flat in the raster size. Returning the
free pages after each chunk keeps every chunk's peak at the first one's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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
