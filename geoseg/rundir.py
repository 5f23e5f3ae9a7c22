"""The run directory: its file names, its manifest, and the rules for resuming or replacing a run.

A run directory holds everything one ``geoseg segment`` run made (every name is defined here, and
nowhere else)::

    manifest.json        RunManifest: input, prompts, options, raster, chunk states, outputs
    probabilities.tif    the probability COG (one band per prompt)
    polygons.gpkg        the polygons (or polygons.parquet)
    parts/               per-chunk probability parts, pieces and done-records (what resume reads)

The manifest records the input both as an absolute path and relative to the run directory, so later
commands (``vectorize``, ``preview``) work from any working directory and after the input and the
run were moved together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import write_json_atomic
from .config import SegmentConfig
from .errors import NotARunError, OutputExistsError
from .raster import RasterInfo
from .tiling import Region

MANIFEST = "manifest.json"
PROBABILITIES = "probabilities.tif"
#: Temporary mosaic of the parts; the COG is copied from it, then it is removed.
PROBABILITIES_VRT = "probabilities.vrt"
PARTS = "parts"
POLYGONS = {"gpkg": "polygons.gpkg", "parquet": "polygons.parquet"}
#: Names geoseg owns inside a run directory; --overwrite removes only these.
OWNED = (MANIFEST, PROBABILITIES, PARTS, *POLYGONS.values(), PROBABILITIES_VRT)


def polygons_name(vector_format: str) -> str:
    """File name of the polygons in ``vector_format`` (``gpkg`` or ``parquet``)."""
    return POLYGONS[vector_format]


def part_path(run_dir: Path | str, chunk: str, suffix: str) -> Path:
    """A chunk's file in ``parts/``: ``.tif`` probabilities, ``.pieces`` polygons, ``.json`` done-record."""
    return Path(run_dir) / PARTS / f"{chunk}{suffix}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class ChunkRecord:
    """One chunk's line in the manifest: where it is and what became of it."""

    region: Region
    status: str = "pending"
    tiles: int | None = None
    model_tiles: int | None = None
    seconds: float | None = None
    worker: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.region
        out: dict[str, Any] = {"region": [r.row, r.col, r.height, r.width], "status": self.status}
        for key in ("tiles", "model_tiles", "seconds", "worker"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChunkRecord:
        return cls(Region(*data["region"]), data.get("status", "pending"), data.get("tiles"),
                   data.get("model_tiles"), data.get("seconds"), data.get("worker"))


@dataclass
class RasterRecord:
    """The input grid as the run saw it (preview checks the file still has it)."""

    width: int
    height: int
    crs: str | None
    transform: tuple[float, ...]
    bands: tuple[int, ...]
    stretch: tuple[tuple[float, float], ...]
    resampled: bool

    @classmethod
    def of(cls, info: RasterInfo) -> RasterRecord:
        return cls(info.width, info.height, info.crs_wkt, tuple(info.transform)[:6], tuple(info.bands),
                   tuple((float(lo), float(hi)) for lo, hi in info.stretch), info.resampled)

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "crs": self.crs, "transform": list(self.transform),
                "bands": list(self.bands), "stretch": [list(s) for s in self.stretch], "resampled": self.resampled}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RasterRecord:
        stretch = tuple((float(lo), float(hi)) for lo, hi in data.get("stretch") or ())
        return cls(int(data["width"]), int(data["height"]), data.get("crs"), tuple(data.get("transform") or ()),
                   tuple(data.get("bands") or ()), stretch, bool(data.get("resampled", False)))


@dataclass
class RunManifest:
    """``manifest.json``: what a run was asked to do and how far it got.

    ``input`` is absolute (or a GDAL path such as ``/vsicurl/...``, kept as given);
    ``input_relative`` is the same file relative to the run directory. :meth:`input_path` picks the
    one that exists. The JSON keys are those geoseg 0.1 wrote, plus ``input_relative``.
    """

    input: str
    prompts: tuple[str, ...]
    fingerprint: str
    model: str
    model_revision: str | list[str] | None
    options: dict[str, Any]
    raster: RasterRecord
    chunks: dict[str, ChunkRecord]
    input_relative: str | None = None
    geoseg_version: str = __version__
    status: str = "running"
    started: str = field(default_factory=now)
    finished: str | None = None
    features: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    empty: str | None = None
    vectorize_runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, config: SegmentConfig, info: RasterInfo, fp: str, regions: list[Region]) -> RunManifest:
        options = asdict(config)
        options["output"] = str(config.output)
        absolute, relative = _input_paths(config.input, config.output)
        return cls(input=absolute, input_relative=relative, prompts=tuple(config.prompts), fingerprint=fp,
                   model=config.model, model_revision=config.revision, options=options,
                   raster=RasterRecord.of(info), chunks={r.name: ChunkRecord(r) for r in regions})

    def input_path(self, run_dir: Path) -> str:
        """The input as recorded if it exists, else relative to ``run_dir`` (a moved project)."""
        if self.input_relative is not None and not os.path.exists(self.input):
            moved = Path(run_dir) / self.input_relative
            if moved.exists():
                return str(moved)
        return self.input

    def regions(self) -> list[Region]:
        return [c.region for c in self.chunks.values()]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "geoseg_version": self.geoseg_version, "status": self.status, "started": self.started,
            "fingerprint": self.fingerprint, "input": self.input, "input_relative": self.input_relative,
            "model": self.model, "model_revision": self.model_revision, "prompts": list(self.prompts),
            "options": self.options, "raster": self.raster.to_json(),
            "chunks": {name: c.to_json() for name, c in self.chunks.items()},
        }
        for key in ("finished", "features", "error", "empty"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.outputs:
            out["outputs"] = dict(self.outputs)
        if self.vectorize_runs:
            out["vectorize_runs"] = list(self.vectorize_runs)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunManifest:
        return cls(input=str(data["input"]), input_relative=data.get("input_relative"),
                   prompts=tuple(str(p) for p in data["prompts"]), fingerprint=str(data.get("fingerprint", "")),
                   model=str(data.get("model", "")), model_revision=data.get("model_revision"),
                   options=dict(data.get("options") or {}), raster=RasterRecord.from_json(data["raster"]),
                   chunks={k: ChunkRecord.from_json(v) for k, v in (data.get("chunks") or {}).items()},
                   geoseg_version=str(data.get("geoseg_version", "")), status=str(data.get("status", "")),
                   started=str(data.get("started", "")), finished=data.get("finished"),
                   features=data.get("features"), outputs=dict(data.get("outputs") or {}),
                   error=data.get("error"), empty=data.get("empty"),
                   vectorize_runs=list(data.get("vectorize_runs") or []))

    def save(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, run_dir: Path) -> RunManifest:
        """The manifest in ``run_dir``, or one clear :class:`NotARunError`."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise NotARunError(f"{run_dir}: no such run directory")
        try:
            data = json.loads((run_dir / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise NotARunError(f"{run_dir}: not a geoseg run directory (no readable {MANIFEST})") from exc
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NotARunError(f"{run_dir}: {MANIFEST} is not a geoseg run manifest") from exc


def _input_paths(path: str, run_dir: Path) -> tuple[str, str | None]:
    """(absolute, relative to ``run_dir``) for a local file; a GDAL path (``/vsi…``, URL) as given."""
    if path.startswith("/vsi") or "://" in path:
        return path, None
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute, os.path.abspath(run_dir))
    except ValueError:  # another drive on Windows
        relative = None
    return absolute, relative


def load_finished_run(run_dir: Path) -> RunManifest:
    """The manifest of a finished ``segment`` run, or one clear :class:`NotARunError`."""
    manifest = RunManifest.load(run_dir)
    if manifest.status != "complete":
        raise NotARunError(f"{run_dir}: the segment run did not finish; re-run `geoseg segment` to resume it")
    if not (run_dir / PROBABILITIES).exists():
        raise NotARunError(f"{run_dir}: {PROBABILITIES} is missing; re-run `geoseg segment` there")
    return manifest


def fingerprint(config: SegmentConfig, info: RasterInfo) -> str:
    """Hash of everything that determines the output pixels; equal hash = same job (resumable)."""
    stat = {}
    with contextlib.suppress(OSError):
        st = os.stat(config.input)
        stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    blob = json.dumps({**config.pixel_options(), **stat, "grid": [info.width, info.height]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, fp: str, overwrite: bool) -> set[str]:
    """Create or reuse the run directory; returns names of chunks a previous run finished.

    A directory holding a run of the same job is resumed. Anything else that exists is refused
    unless ``overwrite`` is set. ``overwrite`` always starts afresh, and removes only geoseg's own
    files: nothing a user made is deleted.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"{run_dir}: exists and is not a directory; choose another -o")
    manifest = run_dir / MANIFEST
    previous = None
    if manifest.exists():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            previous = json.loads(manifest.read_text()).get("fingerprint")
    busy = run_dir.exists() and any(run_dir.iterdir())
    if busy and (previous != fp or overwrite):
        if not overwrite:
            what = ("holds a geoseg run with different input or options" if previous
                    else "exists and is not a geoseg run directory")
            raise OutputExistsError(f"{run_dir}: {what}; use another -o, or --overwrite to replace geoseg's "
                                    "files there")
        for name in OWNED:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (run_dir / PARTS).mkdir(parents=True, exist_ok=True)
    return finished_chunks(run_dir, fp)


def finished_chunks(run_dir: Path, fp: str) -> set[str]:
    """Names of the chunks whose done-record belongs to the job ``fp``."""
    done = set()
    for record in (run_dir / PARTS).glob("[!.]*.json"):  # not a crashed writer's hidden temp file
        with contextlib.suppress(ValueError, OSError, AttributeError):
            if json.loads(record.read_text()).get("fingerprint") == fp:
                done.add(record.stem)
    return done
