"""How the CLI reports progress: a tqdm bar for people, or JSON lines for programs.

``geoseg --progress jsonl COMMAND ...`` prints one JSON object per line on stdout, each with an
``event`` key, so a front end (the QGIS plugin in ``qgis_plugin/``) can follow a run without
parsing a progress bar::

    {"event": "progress", "stage": "segment", "done": 3, "total": 12, "unit": "chunk"}
    {"event": "log", "level": "WARNING", "message": "..."}
    {"event": "result", "command": "segment", "probabilities": "...", "polygons": "...", ...}
    {"event": "error", "message": "..."}

stdout then carries nothing else; the one-line ``geoseg: error: ...`` still goes to stderr as in
the default mode, and third-party noise (Dask, warnings) stays on stderr. ``bar`` (the default)
keeps tqdm and plain text. The mode is process-wide state set once by the CLI's group callback;
library callers never see it unless they ask for :func:`progress_bar`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, Self, TextIO

MODES = ("bar", "jsonl")
_state: dict[str, Any] = {"mode": "bar", "stream": None}


def set_mode(mode: str, stream: TextIO | None = None) -> None:
    """Select ``bar`` or ``jsonl``; JSON lines go to ``stream`` (default: the current stdout)."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    _state.update(mode=mode, stream=stream)


def is_jsonl() -> bool:
    return bool(_state["mode"] == "jsonl")


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line ``{"event": event, **fields}`` and flush (a reader waits on each line)."""
    stream = _state["stream"] or sys.stdout
    stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    stream.flush()


class JsonlBar:
    """The part of tqdm's interface the pipeline uses, printing a progress event per update."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", disable: bool = False) -> None:
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n = 0
        self.postfix: dict[str, Any] = {}

    def __enter__(self) -> Self:
        self._emit()  # "0 of total": the front end learns the total before the first chunk ends
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix(self, refresh: bool = True, **kw: Any) -> None:
        self.postfix.update(kw)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def _emit(self) -> None:
        if not self.disable:
            emit("progress", stage=self.desc, done=self.n, total=self.total, unit=self.unit, **self.postfix)


def progress_bar(total: int, desc: str, unit: str, disable: bool = False) -> Any:
    """A tqdm bar in ``bar`` mode, a :class:`JsonlBar` in ``jsonl`` mode."""
    if is_jsonl():
        return JsonlBar(total=total, desc=desc, unit=unit, disable=disable)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable)


@contextlib.contextmanager
def percent_bar(desc: str) -> Iterator[Callable[[float], None]]:
    """A 0-100 % bar fed with fractions (GDAL's progress callback). It moves only when the whole
    percent changes, so a JSON reader gets at most 101 events however often GDAL calls."""
    with progress_bar(100, desc, "%") as bar:
        def report(fraction: float) -> None:
            percent = min(100, int(fraction * 100))
            if percent > bar.n:
                bar.update(percent - bar.n)

        yield report


class JsonlLogHandler(logging.Handler):
    """Log records as ``{"event": "log", "level": ..., "message": ...}`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            emit("log", level=record.levelname, logger=record.name, message=record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never raise into the run
            self.handleError(record)


def result(text: str, **fields: Any) -> None:
    """A command's final report: ``text`` on stdout in ``bar`` mode, a result event in ``jsonl``."""
    if is_jsonl():
        emit("result", **fields)
    else:
        print(text, flush=True)
