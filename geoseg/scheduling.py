"""Running chunk stages on Dask: the client, failure sorting, and windowed submission.

:func:`dask_client` gives the caller's client, one of a running scheduler, or a LocalCluster.
:class:`ChunkSubmitter` submits each chunk as three tasks (read → infer → finish, see
:mod:`geoseg.stages`) and keeps a bounded number of chunks in flight, so the scheduler's memory and
the queue stay small whatever the raster size. :func:`run_stage` wraps every stage and sorts its
failures into ones Dask should retry and ones that are final.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ChunkFailedError, GeosegError, ModelOutOfMemoryError, RasterReadError, first_line
from .model import encode_plan
from .stages import ChunkJob, ChunkResult, finish_chunk, infer_chunk, read_chunk

log = logging.getLogger(__name__)

#: Seconds between looks at the cluster's workers (GPU resources, window size) while chunks run.
CLUSTER_POLL_S = 5.0


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, client: Any = None, workers: int | None = None) -> Iterator[Any]:
    """The caller's client, a client of ``scheduler``, or a LocalCluster started for this run.

    ``scheduler`` is an address (``tcp://host:8786``) or the path of a scheduler file written by
    ``dask scheduler --scheduler-file`` (the usual hand-off on SLURM/MPI). A caller's client is used
    as it is and never closed. The LocalCluster runs one single-threaded worker process per
    ``workers`` and shares the machine's cores between their math libraries. Its workers run
    without Dask's statistical profiler, which keeps a call tree per second for the last 1,000 s:
    measured on one worker running geoseg's chunk stages, its RSS grew ~2 MiB a chunk (2048²) with
    it and stayed flat without; at 16384² that was ~90 MiB by the end (bench/README.md). Nobody
    reads those trees on geoseg's own cluster; a cluster of the user's keeps its settings.
    """
    import dask
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler:
        with connect(scheduler) as c:
            yield c
        return
    n = workers or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                         env=env, silence_logs=logging.CRITICAL) as cluster, Client(cluster) as c:
        yield c


def connect(scheduler: str) -> Any:
    """A client of an existing scheduler; a clear geoseg error (not a timeout traceback) if unreachable."""
    from distributed import Client

    is_file = scheduler.endswith(".json") and "://" not in scheduler
    try:
        return Client(scheduler_file=scheduler) if is_file else Client(scheduler)
    except (OSError, TimeoutError, ValueError) as exc:
        what = "read the scheduler file" if is_file else "reach the Dask scheduler at"
        raise GeosegError(f"cannot {what} {scheduler}: {type(exc).__name__}: {first_line(exc)}; is the "
                          "cluster running and may this machine connect to it?") from exc


@dataclass(frozen=True)
class ChunkError:
    """A chunk task's non-transient failure, returned (not raised) so Dask does not retry it."""

    error: BaseException


def run_stage(stage: Callable[..., Any], job: ChunkJob, *inputs: Any, io_retries: int = 0) -> Any:
    """One stage of a chunk as a Dask task, sorting its failures into transient and final.

    * An earlier stage's final failure (an input that is a :class:`ChunkError`) is passed on as is.
    * A block that failed to read (:class:`RasterReadError`: network hiccup or corrupt data) is
      retried here, in place, ``io_retries`` times with a short back-off; if it keeps failing it is
      final. In-task retries keep the chunk's worker and its loaded model.
    * Any other geoseg error (bad input, model that cannot load) and out-of-memory errors are final
      at once: retrying them on another worker would fail the same way.
    * Everything else (an unexpected OSError, a library crash that raises) is raised, so Dask's own
      ``retries`` reschedule it. A worker process that dies is rescheduled by the scheduler.
    """
    failed = next((v for v in inputs if isinstance(v, ChunkError)), None)
    if failed is not None:
        return failed
    for attempt in itertools.count():
        try:
            return stage(job, *inputs)
        except RasterReadError as exc:
            if attempt >= io_retries:
                return ChunkError(exc)
            log.warning("chunk %s: read failed (attempt %d of %d), retrying: %s",
                        job.region.name, attempt + 1, io_retries + 1, exc)
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        except ModelOutOfMemoryError as exc:  # before GeosegError: it is one, and gets its own advice
            return ChunkError(ChunkFailedError(
                f"chunk {describe(job)} ran out of GPU memory at batch size {job.batch_size or 'auto'}: "
                f"{first_line(exc)}; lower --batch-size, or use GPUs with more memory"))
        except GeosegError as exc:
            return ChunkError(exc)
        except MemoryError as exc:
            return ChunkError(ChunkFailedError(
                f"chunk {describe(job)} ran out of memory (batch size {job.batch_size or 'auto'}): {exc}; "
                "lower --batch-size or --chunk-size, or give the workers more memory"))
    raise AssertionError("unreachable")  # itertools.count() never ends


def describe(job: ChunkJob) -> str:
    """The chunk's name and pixel window, for error messages."""
    r = job.region
    return f"{r.name} (rows {r.row}..{r.row_stop}, cols {r.col}..{r.col_stop})"


def cluster_workers(client: Any) -> dict:
    """Every worker's info (``scheduler_info`` lists only 5 by default in some distributed versions)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return info.get("workers", {})


def has_gpus(workers: dict) -> bool:
    return any(w.get("resources", {}).get("GPU") for w in workers.values())


class ChunkSubmitter:
    """Submits chunks keeping a bounded number queued, and yields their results as they finish.

    Each chunk is three tasks: :func:`read_chunk` → :func:`infer_chunk` → :func:`finish_chunk`.
    The window is ``max_in_flight`` chunks when given, else one per worker thread, re-read as workers
    join (an adaptive cluster scales on queued work, so the window must grow with it). Not more:
    a chunk queued behind a busy thread only waits, holding its read halo and probabilities in the
    worker's memory. Measured with one single-threaded worker at 8192² (``bench/README.md``): two
    chunks in flight ran the next chunk's read and inference before the current chunk's polygon
    stage, which then peaked 130 MiB higher, for no speed-up (one thread runs one task at a time).
    The prompts are encoded once, by the first task, and its small result feeds every chunk.
    Inference tasks carry ``resources={"GPU": 1}`` once any worker declares a GPU resource: one
    inference per GPU at a time, never on CPU-only workers of a mixed cluster, and reading,
    blending and polygonizing of other chunks run beside it instead of holding the GPU. Results
    are metadata; futures are released as soon as they are read.

    A task that killed its worker too often (Dask's ``KilledWorker``) or failed for good raises
    :class:`ChunkFailedError` naming the chunk and its window; still queued tasks are cancelled.
    """

    def __init__(self, client: Any, max_in_flight: int | None, retries: int):
        self.client = client
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.window = max_in_flight or 1
        self.resources: dict[str, int] | None = None
        self._polled = -float("inf")
        self._jobs: dict[str, ChunkJob] = {}  # future key -> its chunk
        self._embeddings: Any = None
        #: The run's conditional embeddings and the seconds their one task took (for the manifest).
        self.embeddings: Any = None
        self.encode_seconds: float | None = None

    def poll(self) -> None:
        """Re-read the cluster (at most every :data:`CLUSTER_POLL_S`): GPU resources, window size."""
        now = time.monotonic()
        if now - self._polled < CLUSTER_POLL_S:
            return
        self._polled = now
        workers = cluster_workers(self.client)
        if has_gpus(workers):
            self.resources = {"GPU": 1}
        if not self.max_in_flight:
            self.window = max(self.window, sum(w.get("nthreads", 1) for w in workers.values()))

    def submit(self, job: ChunkJob) -> Any:
        """The chunk's three tasks; returns the future of the last one."""
        # read (CPU) -> infer (the GPU slot) -> finish (CPU); Dask runs a chunk's stages where its
        # data is, and only inference waits for, and holds, a GPU
        name = f"{job.fingerprint}-{job.region.name}"
        submit, retries = self.client.submit, self.retries
        tiles = submit(run_stage, read_chunk, job, io_retries=retries, key=f"geoseg-read-{name}",
                       retries=retries, pure=False)
        inference = submit(run_stage, infer_chunk, job, tiles, self._embeddings, key=f"geoseg-infer-{name}",
                           resources=self.resources, retries=retries, pure=False)
        done = submit(run_stage, finish_chunk, job, tiles, inference, key=f"geoseg-{name}",
                      retries=retries, pure=False)
        self._jobs[done.key] = job
        return done

    def run(self, jobs: Sequence[ChunkJob], progress: bool = False, plan: Any = None) -> Iterator[ChunkResult]:
        """Run every job; yield each chunk's :class:`ChunkResult` as it finishes.

        ``plan`` (a :class:`geoseg.prompts.PromptPlan`; default: the jobs' prompts as they are) is
        encoded once, in one task, before any chunk is submitted.
        """
        from distributed import as_completed

        from .progress import progress_bar
        from .prompts import PromptPlan

        if not jobs:
            return
        todo = iter(jobs)
        self.poll()
        first = jobs[0]
        # A few KB: fetched once and sent by value, so no chunk task is tied to the worker that made it.
        plan = plan if plan is not None else PromptPlan(first.prompts)
        self.embeddings, self.encode_seconds = self.client.submit(
            _timed_encode, first.factory, plan, key=f"geoseg-{first.fingerprint}-prompts",
            resources=self.resources, pure=False).result()
        self._embeddings = self.embeddings
        pending = as_completed([self.submit(j) for j in itertools.islice(todo, self.window)])
        model_tiles = 0
        try:
            with progress_bar(total=len(jobs), unit="chunk", disable=not progress, desc="segment") as bar:
                for future in pending:
                    outcome = self._result(future)
                    model_tiles += outcome.model_tiles
                    bar.set_postfix(tiles=model_tiles, refresh=False)
                    bar.update()
                    self.poll()
                    while pending.count() < self.window:
                        nxt = next(todo, None)
                        if nxt is None:
                            break
                        pending.add(self.submit(nxt))
                    yield outcome
        finally:
            left = list(pending.futures) if hasattr(pending, "futures") else []
            if left:  # stopped early (error, or the caller closed us): do not leave work queued
                with contextlib.suppress(Exception):
                    self.client.cancel(left)

    def _result(self, future: Any) -> ChunkResult:
        """The finished chunk's result, or its failure as one :class:`ChunkFailedError`/geoseg error."""
        from distributed import KilledWorker

        job = self._jobs.pop(future.key)
        try:
            outcome = future.result()
        except KilledWorker as exc:
            raise ChunkFailedError(
                f"chunk {describe(job)}: the worker processes running it died repeatedly "
                "(killed by the OS for memory, or a crash in a native library; the cause may "
                "also be a chunk queued beside it on those workers); lower --chunk-size or "
                "--batch-size, or give workers more memory") from exc
        except GeosegError:
            raise
        except Exception as exc:  # retries exhausted: name the chunk, not a traceback
            raise ChunkFailedError(f"chunk {describe(job)} failed after {self.retries} retries: "
                                   f"{type(exc).__name__}: {first_line(exc)}") from exc
        finally:
            future.release()
        if isinstance(outcome, ChunkError):
            raise outcome.error
        return outcome


def _timed_encode(factory: Any, plan: Any) -> tuple[Any, float]:
    """The prompt task: the plan's embeddings and the seconds they took (model load excluded)."""
    from .model import cached_segmenter

    cached_segmenter(factory)
    start = time.perf_counter()
    embeddings = encode_plan(factory, plan)
    return embeddings, time.perf_counter() - start

