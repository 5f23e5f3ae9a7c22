"""Write-then-rename: a file with its final name is always complete.

Every output geoseg writes (chunk parts, their done-records, the COG, polygons, manifests) goes to a
unique hidden temp name in the same directory and is moved over the final name with
:func:`os.replace` only once complete, so a crash or a killed worker never leaves a truncated file
that a resumed run or a user would take as finished. Unique names keep two writers of the same chunk
(a task Dask re-ran beside a slow original) from clobbering each other's temp file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_target", "write_json_atomic"]


def _temp_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` that keeps its suffix (GDAL picks/validates by suffix)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _fsync_file(path: Path) -> None:
    """Flush ``path`` to stable storage so the rename never exposes a file whose data is lost on a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path``, on error delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json_atomic(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as pretty JSON to ``path`` via a temp file + :func:`os.replace`.

    Used for run manifests, which a resumed run reads to decide what is already done: a manifest
    must be either the old one or the new one, never truncated JSON. Non-JSON values (``Path``,
    numpy scalars, datetimes) are written with ``str()``.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    with atomic_target(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return path



def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalar -> Python scalar
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy array -> list
    if callable(tolist):
        return tolist()
    return str(value)
