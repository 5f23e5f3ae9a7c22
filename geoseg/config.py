"""Run options as frozen dataclasses, validated once when built (not 28 keyword arguments).

The CLI builds a :class:`SegmentConfig` and calls :func:`geoseg.segment`; Python users do the same.
Defaults are chosen for quality on a laptop and explained in the README and ``geoseg segment --help``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
#: CLIPSeg's input size: tiles are fed at the resolution the model was trained on, never resized.
TILE_SIZE = 352
#: 25 % overlap: every pixel's blended value is dominated by tiles where it lies >= 44 px from a
#: tile edge, where CLIPSeg's context is complete; the 88 px cosine ramps sum to one in the overlap.
STRIDE = 264
#: Chunk = the unit of Dask work (read, infer and finish tasks); several thousand px keeps the halo
#: overhead modest (+18.7 % model tiles at 4096 for a 100,000² raster, measured from the plan).
CHUNK_SIZE = 4096
DEFAULT_THRESHOLD = 0.5
#: GDAL's block cache defaults to 5 % of RAM per process and fills as a run reads on (measured: a
#: 16384² run peaked 2.3x higher than a 4096² one); geoseg's reads and writes run under this bound
#: so memory follows the chunk size only. The COG build holds about 1.4x the cap (measured on the
#: chunk parts of a 16384² run: 331 / 702 / 1,063 MiB peak at 64 / 256 / 512 MB, 23-24 s each),
#: so 64 MB. A GDAL_CACHEMAX environment variable takes precedence.
GDAL_CACHEMAX_MB = 64


def check_thresholds(values: tuple[float, ...]) -> tuple[float, ...]:
    """The one rule for thresholds: each strictly between 0 and 1.

    0 would put every valid pixel (probability 0 included) in the mask, and a sigmoid output never
    exceeds 1, so neither end selects anything meaningful. Returns ``values`` as floats.
    """
    try:
        out = tuple(float(t) for t in values)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number between 0 and 1 (exclusive), got {values!r}") from None
    if not all(0.0 < t < 1.0 for t in out):  # NaN fails too
        raise ConfigError(f"threshold must be between 0 and 1 (exclusive), got {out}")
    return out


def check_nonneg(name: str, value: float) -> float:
    """The one rule for areas and tolerances (``min_area``, ``fill_holes``, ``simplify``): a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _as_tuple(value, kind) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        value = (value,)
    return tuple(kind(v) for v in value)


@dataclass(frozen=True)
class VectorizeConfig:
    """How probabilities become polygons (shared by ``segment`` and ``vectorize``).

    ``threshold`` holds one value for all prompts or one per prompt. Areas (``min_area``,
    ``fill_holes``) are in square metres where the CRS allows it (else CRS units²); ``simplify`` is a
    tolerance in CRS units and is applied coverage-safely after the seam merge.
    """

    threshold: tuple[float, ...] = (DEFAULT_THRESHOLD,)
    min_area: float = 0.0
    fill_holes: float = 0.0
    simplify: float = 0.0
    dst_crs: str | None = None
    vector_format: str = "gpkg"

    def __post_init__(self):
        threshold = _as_tuple(self.threshold, float) or (DEFAULT_THRESHOLD,)
        object.__setattr__(self, "threshold", check_thresholds(threshold))
        for name in ("min_area", "fill_holes", "simplify"):
            object.__setattr__(self, name, check_nonneg(name, getattr(self, name)))
        if self.vector_format not in ("gpkg", "parquet"):
            raise ConfigError(f"format must be 'gpkg' or 'parquet', got {self.vector_format!r}")

    def thresholds_for(self, n_prompts: int) -> tuple[float, ...]:
        if len(self.threshold) == 1:
            return self.threshold * n_prompts
        if len(self.threshold) != n_prompts:
            raise ConfigError(
                f"give one threshold or one per prompt: {len(self.threshold)} thresholds for {n_prompts} prompts")
        return self.threshold


@dataclass(frozen=True)
class SegmentConfig:
    """Everything one ``geoseg segment`` run needs. Paths are kept as given (GDAL paths included)."""

    input: str
    prompts: tuple[str, ...]
    output: Path
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    #: probabilities.tif: float32 (NaN nodata) or uint8 = round(p * 254), 255 nodata (4x smaller)
    dtype: str = "float32"
    #: torch.compile the model (speed only; off by default, see bench/bench_gpu.py --compile)
    compile: bool = False
    bands: tuple[int, ...] = ()
    crs: str | None = None
    resolution: float | None = None
    tile_size: int = TILE_SIZE
    stride: int = STRIDE
    chunk_size: int = CHUNK_SIZE
    workers: int | None = None
    scheduler: str | None = None
    max_in_flight: int | None = None
    retries: int = 2
    overwrite: bool = False
    vector: VectorizeConfig = field(default_factory=VectorizeConfig)
    #: ``none``, ``aerial`` (default: a remote-sensing ensemble) or a file of templates (geoseg.prompts)
    templates: str = "aerial"
    #: ``PHRASE`` (every prompt) or ``PROMPT=PHRASE`` (that prompt only): what a prompt must not fire on
    negatives: tuple[str, ...] = ()
    #: Exemplar polygon files whose ``class_field`` names each polygon's prompt
    exemplars: tuple[str, ...] = ()
    class_field: str = "class"
    #: ``PROMPT=FILE``: every polygon of FILE is an exemplar of PROMPT
    exemplar: tuple[str, ...] = ()
    #: Weight of the image embedding when a prompt has a phrase and exemplars (0 = text only, 1 = image only)
    exemplar_weight: float = 0.5
    #: Also write the exclusive class map ``classes.tif``; the polygons are then its classes (no overlaps)
    classes: bool = False
    #: False: probabilities only (``--no-polygons``); ``geoseg vectorize`` can make polygons later.
    polygons: bool = True

    def __post_init__(self):
        object.__setattr__(self, "input", str(self.input))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "prompts", _as_tuple(self.prompts, str))
        object.__setattr__(self, "bands", _as_tuple(self.bands, int))
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ConfigError("give at least one non-empty --prompt")
        if len(set(self.prompts)) != len(self.prompts):
            raise ConfigError(f"prompts must be distinct, got {list(self.prompts)}")
        if self.bands and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise ConfigError(f"--bands takes 1 or 3 band numbers counted from 1, got {list(self.bands)}")
        if self.dtype not in ("float32", "uint8"):
            raise ConfigError(f"dtype must be 'float32' or 'uint8', got {self.dtype!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 < self.stride <= self.tile_size:
            raise ConfigError(f"stride must be in 1..tile size ({self.tile_size}), got {self.stride}")
        if self.chunk_size < self.tile_size:
            raise ConfigError(f"chunk size must be >= the tile size ({self.tile_size}), got {self.chunk_size}")
        if self.resolution is not None and not self.resolution > 0:
            raise ConfigError(f"resolution must be > 0, got {self.resolution}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        self.vector.thresholds_for(len(self.prompts))
        from .prompts import load_templates, parse_negatives

        for name in ("negatives", "exemplars", "exemplar"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), str))
        load_templates(self.templates)
        parse_negatives(self.negatives, self.prompts)
        if not 0.0 <= self.exemplar_weight <= 1.0:
            raise ConfigError(f"--exemplar-weight must be in 0..1, got {self.exemplar_weight}")
        if self.classes:
            from .classes import check_classes

            check_classes(len(self.prompts))

    def replace(self, **changes) -> SegmentConfig:
        return dataclasses.replace(self, **changes)

    def pixel_options(self) -> dict:
        """The options that change output pixels or their layout: the resume fingerprint."""
        return {
            "input": self.input, "prompts": list(self.prompts), "model": self.model,
            "revision": self.revision, "bands": list(self.bands), "crs": self.crs,
            "resolution": self.resolution, "tile_size": self.tile_size, "stride": self.stride,
            "chunk_size": self.chunk_size, "threshold": list(self.vector.threshold), "dtype": self.dtype,
            "negatives": list(self.negatives), "exemplar_weight": self.exemplar_weight, "classes": self.classes,
        }
