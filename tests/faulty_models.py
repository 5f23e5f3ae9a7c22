"""Test segmenters that misbehave on purpose: kill their worker, run slowly, run out of memory.

All wrap :class:`tests.models.PerPixelSegmenter`, so outputs stay comparable with an undisturbed run.
They are module-level classes so they pickle by reference to Dask worker processes, and each has
its own ``key()`` so the per-process model cache never mixes them up.

Safety: the killing segmenters only ever kill a Dask *worker* process while it runs a geoseg chunk
task, never the process that built the factory (the test runner), checked by pid.
"""

from __future__ import annotations

import os
import signal
import time

from geoseg.errors import ModelOutOfMemoryError

from .models import PerPixelFactory, PerPixelSegmenter

WEIGHTS = ((1.0, 0.0, -0.5), (0.0, -0.5, 1.0))
BIAS = (0.3, 0.25)


def current_chunk() -> str | None:
    """Name of the chunk the calling Dask worker thread is running (``geoseg-<fp>-<name>``), else None."""
    try:
        from distributed import get_worker

        key = get_worker().get_current_task()
    except (ImportError, ValueError):
        return None
    if not isinstance(key, str) or not key.startswith("geoseg-"):
        return None
    return key.rsplit("-", 1)[-1]


class _Wrapped(PerPixelSegmenter):
    def __init__(self, hook):
        super().__init__(WEIGHTS, BIAS)
        self.hook = hook

    def predict(self, tiles, embeddings):
        self.hook()
        return super().predict(tiles, embeddings)


class KillOnceFactory(PerPixelFactory):
    """SIGKILLs the worker the first time any worker processes ``chunk`` (a marker file makes it once)."""

    def __init__(self, chunk: str, marker: str, always: bool = False):
        super().__init__(WEIGHTS, BIAS)
        self.chunk, self.marker, self.always = chunk, str(marker), always
        self.guard_pid = os.getpid()  # never kill the process that made the factory

    def key(self):
        return ("kill", self.chunk, self.marker, self.always)

    def _hook(self):
        if os.getpid() == self.guard_pid or current_chunk() != self.chunk:
            return
        if self.always:
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\n")
        else:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self):
        return _Wrapped(self._hook)


class SlowFactory(PerPixelFactory):
    """The per-pixel model, sleeping ``delay`` seconds per batch (to kill a client mid-run)."""

    def __init__(self, delay: float = 0.2):
        super().__init__(WEIGHTS, BIAS)
        self.delay = delay

    def key(self):
        return ("slow", self.delay)

    def __call__(self):
        return _Wrapped(lambda: time.sleep(self.delay))


class OutOfMemoryError(ModelOutOfMemoryError):
    """What a model raises when the GPU runs out of memory at one tile (no torch needed)."""


class OutOfMemoryFactory(PerPixelFactory):
    """Raises an OutOfMemoryError on ``chunk`` and counts the attempts in ``counter`` (a file)."""

    def __init__(self, chunk: str, counter: str):
        super().__init__(WEIGHTS, BIAS)
        self.chunk, self.counter = chunk, str(counter)

    def key(self):
        return ("oom", self.chunk, self.counter)

    def _hook(self):
        if current_chunk() == self.chunk:
            with open(self.counter, "a") as f:
                f.write("x")
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def __call__(self):
        return _Wrapped(self._hook)

