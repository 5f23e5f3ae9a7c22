"""Run the ``geoseg`` command line in a child process and follow its JSON-lines events.

Pure Python, no ``qgis`` import: the QGIS algorithms pass callbacks in, and tests can drive it
from any interpreter. geoseg runs in its own Python environment (torch and friends never enter
QGIS' Python); the only contract is ``geoseg --progress jsonl COMMAND ...``, which prints one JSON
object per line on stdout (``progress``, ``log``, ``result``, ``error`` events) and the usual
one-line ``geoseg: error: ...`` on stderr.

Cancelling kills the whole process group (geoseg plus its Dask worker processes): SIGTERM, then
SIGKILL after a grace period. Chunks already written stay on disk, so re-running the same job
into the same folder resumes it.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

#: Where the executable is configured, as a user finds it in QGIS.
SETTING_PATH = "Processing > Options > Providers > geoseg > 'geoseg executable'"
#: Variables of QGIS' own Python that would break a different Python (OSGeo4W sets both).
_DROP_ENV = ("PYTHONHOME", "PYTHONPATH")
#: Seconds between SIGTERM and SIGKILL when cancelling.
KILL_GRACE_S = 3.0
#: How often the cancel flag is polled while geoseg is quiet.
POLL_S = 0.1


class GeosegRunError(Exception):
    """geoseg failed; ``str()`` is one line fit for the Processing log."""


class GeosegCancelled(Exception):
    """The user cancelled; the child process tree is gone."""


def resolve_executable(value: str | None) -> str:
    """The absolute path of the configured geoseg executable, or one clear error naming the setting."""
    name = os.path.expanduser((value or "").strip() or "geoseg")
    found = shutil.which(name)
    if found is None:
        where = "" if os.sep in name or (os.altsep and os.altsep in name) else " on PATH"
        raise GeosegRunError(
            f"geoseg executable {name!r} not found{where}: install geoseg and set its path in {SETTING_PATH}")
    return found


def parse_env(text: str | None) -> dict[str, str]:
    """``"NAME=value; NAME2=value"`` (or one per line) as a dict; one error line for a bad entry."""
    out: dict[str, str] = {}
    for item in (text or "").replace("\n", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise GeosegRunError(f"extra environment entry {item!r} is not NAME=value (provider setting)")
        out[name.strip()] = value.strip()
    return out


def child_env(extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """QGIS' environment without its Python variables, plus ``extra`` (the provider setting)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _opt(args: list[str], flag: str, value) -> None:
    if value is not None and value != "":
        args += [flag, str(value)]


def segment_args(raster: str, prompts: Sequence[str], output: str, *, model: str | None = None,
                 threshold: float | None = None, resolution: float | None = None,
                 chunk_size: int | None = None, workers: int | None = None,
                 scheduler: str | None = None, min_area: float | None = None,
                 device: str | None = None, overwrite: bool = False, exemplars: str | None = None,
                 class_field: str | None = None, exemplar_weight: float | None = None) -> list[str]:
    """``geoseg segment`` arguments. The same inputs always give the same list, so a re-run resumes.

    ``resolution`` 0/None is native, ``workers`` 0/None is geoseg's default; prompts are stripped
    and empty ones dropped. ``exemplars`` is a polygon file: with a ``class_field`` each polygon is
    an exemplar of the prompt its field names (``--exemplars FILE --class-field F``), without one
    every polygon is an exemplar of the first prompt (``--exemplar PROMPT=FILE``).
    """
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise GeosegRunError("no prompt given: type at least one prompt (one per line)")
    args = ["segment", raster]
    for p in prompts:
        args += ["--prompt", p]
    args += ["--output", output]
    _opt(args, "--model", model.strip() if model else None)
    _opt(args, "--threshold", threshold)
    _opt(args, "--resolution", resolution or None)
    _opt(args, "--chunk-size", chunk_size or None)
    _opt(args, "--scheduler", scheduler.strip() if scheduler else None)
    if not scheduler:
        _opt(args, "--workers", workers or None)
    _opt(args, "--min-area", min_area or None)
    _opt(args, "--device", device.strip() if device else None)
    if exemplars:
        if class_field:
            args += ["--exemplars", exemplars, "--class-field", class_field]
        else:
            args += ["--exemplar", f"{prompts[0]}={exemplars}"]
        _opt(args, "--exemplar-weight", exemplar_weight)
    if overwrite:
        args.append("--overwrite")
    return args


def vectorize_args(run_dir: str, *, threshold: float | None = None, min_area: float | None = None,
                   simplify: float | None = None) -> list[str]:
    """``geoseg vectorize`` arguments (re-threshold a finished run, no model)."""
    args = ["vectorize", run_dir]
    _opt(args, "--threshold", threshold)
    _opt(args, "--min-area", min_area or None)
    _opt(args, "--simplify", simplify or None)
    return args


def evaluate_args(run_dir: str, truth: str, *, class_field: str | None = None, prompt: str | None = None,
                  output: str | None = None, overwrite: bool = False) -> list[str]:
    """``geoseg evaluate`` arguments (scores a finished run against reference polygons)."""
    args = ["evaluate", run_dir, "--truth", truth]
    _opt(args, "--class-field", class_field or None)
    _opt(args, "--prompt", prompt.strip() if prompt else None)
    _opt(args, "--output", output or None)
    if overwrite:
        args.append("--overwrite")
    return args


def train_args(raster: str, labels: str, output: str, *, prompts: Sequence[str] = (),
               class_field: str | None = None, model: str | None = None, steps: int | None = None,
               device: str | None = None, resolution: float | None = None, overwrite: bool = False) -> list[str]:
    """``geoseg train`` arguments (fine-tunes the decoder on labelled polygons into a model folder)."""
    args = ["train", raster, "--labels", labels, "--output", output]
    _opt(args, "--class-field", class_field or None)
    for p in prompts:
        if p and p.strip():
            args += ["--prompt", p.strip()]
    _opt(args, "--model", model.strip() if model else None)
    _opt(args, "--steps", steps or None)
    _opt(args, "--device", device.strip() if device else None)
    _opt(args, "--resolution", resolution or None)
    if overwrite:
        args.append("--overwrite")
    return args


def command_line(cmd: Sequence[str]) -> str:
    """The command as a user could paste it into a shell (for the Processing log)."""
    if os.name == "nt":
        return subprocess.list2cmdline(list(cmd))
    return " ".join(shlex.quote(c) for c in cmd)


def _pump(stream, name: str, q: queue.Queue) -> None:
    try:
        for line in iter(stream.readline, ""):
            q.put((name, line.rstrip("\r\n")))
    finally:
        q.put((name, None))


def kill_tree(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """Stop ``proc`` and every process it started (Dask workers), gently first, then for sure."""
    if proc.poll() is not None and os.name != "nt":
        # geoseg itself is gone; its process group may still hold workers
        _signal_group(proc.pid, signal.SIGKILL)
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], check=False, capture_output=True)
        proc.wait()
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group, and geoseg if it ignored TERM
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


#: Where each stage geoseg reports fills the bar, keyed by its unit and in the order they run: the
#: chunks, the probabilities COG (GDAL's percent), the spatial index (rows). The bar never runs
#: backwards; a stage a command skips (vectorize writes no COG) leaves a jump.
SHARES = {"chunk": (0.0, 90.0), "%": (90.0, 95.0), "row": (95.0, 100.0)}


def progress_of(event: dict) -> tuple[float, str] | None:
    """``(percent, text)`` for a geoseg progress event, or None when it has no total yet."""
    done, total = int(event.get("done", 0)), int(event.get("total", 0))
    if total <= 0:
        return None
    unit = str(event.get("unit", "chunk"))
    start, end = SHARES.get(unit, SHARES["row"])
    percent = start + (end - start) * done / total
    if unit == "chunk":
        return percent, f"geoseg: chunk {done} of {total}"
    stage = str(event.get("stage", "")).strip() or "finishing"
    if unit == "%":
        return percent, f"geoseg: {stage}, {done} %"
    return percent, f"geoseg: {stage}, {done:,} of {total:,} {unit}s"


def run_geoseg(executable: str, args: Sequence[str], *, env: dict[str, str] | None = None,
               on_progress: Callable[[float, str], None] = lambda percent, text: None,
               on_log: Callable[[str, str], None] = lambda level, message: None,
               on_output: Callable[[str], None] = lambda line: None,
               on_start: Callable[[int, str], None] = lambda pid, cmdline: None,
               is_canceled: Callable[[], bool] = lambda: False, text_result: bool = False) -> dict:
    """Run ``executable --progress jsonl *args``; return its ``result`` event as a dict.

    ``text_result``: a command that prints plain text instead of a result event (evaluate and train
    as their branches stand) succeeds with ``{"text": <its stdout lines>}``.

    Callbacks run in the calling thread: ``on_progress(percent, text)`` per progress event
    (:func:`progress_of`),
    ``on_log(level, message)`` per log event, ``on_output(line)`` for anything else geoseg or its
    libraries print (stderr, non-JSON stdout), ``on_start(pid, command line)`` once.
    ``is_canceled`` is polled at least every :data:`POLL_S` s; when it turns true the process tree
    is killed and :class:`GeosegCancelled` raised. A failure raises :class:`GeosegRunError` with
    geoseg's own one-line message.
    """
    cmd = [executable, "--progress", "jsonl", *args]
    kw: dict = {}
    if os.name == "nt":
        kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kw["start_new_session"] = True  # own process group: cancel reaches the Dask workers too
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace", bufsize=1,
                                env=child_env() if env is None else env, **kw)
    except OSError as exc:
        raise GeosegRunError(f"cannot start {executable!r}: {exc.strerror or exc}; check {SETTING_PATH}") from exc
    on_start(proc.pid, command_line(cmd))
    q: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=_pump, args=(s, n, q), daemon=True)
               for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
    for t in threads:
        t.start()
    result: dict | None = None
    error: str | None = None
    last_stderr: list[str] = []
    stdout_text: list[str] = []
    open_streams = 2
    try:
        while open_streams:
            if is_canceled():
                kill_tree(proc)
                raise GeosegCancelled("cancelled; geoseg and its workers were stopped. Run again with the same "
                                      "parameters and output folder to resume")
            try:
                name, line = q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            event = _event(line) if name == "stdout" else None
            if event is None:
                if line.strip():
                    # geoseg's one error line becomes the raised exception: shown once, not twice
                    if not (name == "stderr" and line.startswith("geoseg: error: ")):
                        on_output(line)
                    if name == "stdout":
                        stdout_text.append(line)
                    if name == "stderr":
                        last_stderr = (last_stderr + [line.strip()])[-20:]
                continue
            kind = event.get("event")
            if kind == "progress":
                shown = progress_of(event)
                if shown is not None:
                    on_progress(*shown)
            elif kind == "log":
                on_log(str(event.get("level", "INFO")), str(event.get("message", "")))
            elif kind == "result":
                result = event
            elif kind == "error":
                error = str(event.get("message", ""))
        while proc.poll() is None:  # streams closed; the process is about to exit
            if is_canceled():
                kill_tree(proc)
                raise GeosegCancelled("cancelled")
            time.sleep(POLL_S)
    except BaseException:
        if proc.poll() is None:
            kill_tree(proc)
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if proc.returncode != 0:
        raise GeosegRunError(error or _error_line(last_stderr) or f"geoseg exited with status {proc.returncode}")
    if result is None and text_result:
        return {"event": "result", "text": "\n".join(stdout_text)}
    if result is None:
        raise GeosegRunError(f"{executable} printed no result; is it geoseg >= 0.1 (needs --progress jsonl)?")
    return result


def _event(line: str) -> dict | None:
    s = line.strip()
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None


def _error_line(stderr: list[str]) -> str | None:
    """geoseg's ``geoseg: error: ...`` line, else click's ``Error: ...``, else the last line."""
    for prefix in ("geoseg: error: ", "Error: "):
        for line in reversed(stderr):
            if line.startswith(prefix):
                return line[len(prefix):]
    return stderr[-1] if stderr else None


if __name__ == "__main__":  # a manual check: python runner.py geoseg segment ...
    res = run_geoseg(sys.argv[1], sys.argv[2:], on_progress=lambda pct, text: print(f"{pct:.0f} % {text}"),
                     on_log=lambda lv, m: print(lv, m), on_output=print)
    print(res)


def float32_below(value: float) -> float:
    """The largest float32 ``p`` with ``p < value``: the top of the range QGIS must make transparent.

    geoseg compares float32 probabilities with a float64 threshold (``prob >= t``), so a pixel is in
    a polygon exactly when ``p >= t``; QGIS' transparency ranges include both ends, so
    ``[0, float32_below(t)]`` hides exactly the pixels below the threshold. Where float32(t) < t
    (e.g. t = 0.7) float32(t) itself is below t and is the answer.
    """
    if value <= 0:
        return -1.0  # nothing is below 0: an empty range
    f = struct.unpack("<f", struct.pack("<f", value))[0]
    if f < value:
        return f
    bits = struct.unpack("<I", struct.pack("<f", f))[0]
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]
