"""Score a finished run against reference polygons: ``geoseg evaluate``.

Pixel-level scores per prompt (IoU, F1, precision, recall) at the run's threshold, and the
thresholds that maximise F1 and IoU, all from the stored probability COG (no model runs).

How it stays exact and bounded on any raster size:

* The evaluation area (the AOI, else the bounding box of the truth) is rasterised window by window
  (``window_size`` px squares of the COG), with the window's full affine transform, so rotated and
  south-up rasters work. Only windows meeting the area are read.
* Per window and prompt, truth polygons near the window (an STRtree query) are rasterised; a pixel
  is in a polygon when its centre is (GDAL's default rule, ``all_touched=False``), for the truth and
  for the area alike.
* Counts at the run threshold are made directly with the rule geoseg's vectorize uses
  (``probability >= threshold``, compared in float64), so they are exact.
* For other thresholds, each prompt keeps two histograms (truth-positive and truth-negative pixels)
  over ``bins + 1`` bins whose lower edges are ``k / bins``: bin ``k`` holds ``k/bins <= p <
  (k+1)/bins`` and the last bin holds ``p == 1``. The count of pixels with ``p >= k/bins`` is then
  a suffix sum, exact at every grid threshold. The threshold resolution is ``1 / bins`` (0.001 by
  default), and the best thresholds are searched over ``k/bins`` strictly inside (0, 1), the range
  ``--threshold`` accepts.
* Pixels whose probability is NaN (the run's nodata) are left out of every score and counted apart.

Object-level scores (optional) match truth polygons with the run's polygons (its ``polygons.gpkg``
or ``.parquet``, at the run's threshold and after its ``min_area``/``simplify``) at IoU >= 0.5, one
to one, greedily by IoU. Both sets keep the objects with more than half their area inside the
evaluation area, clipped to it. They hold every truth
polygon and every run polygon inside the area's bounding box in memory at once: fine for the tens
of thousands of objects a reference set has, not for a continent's worth (turn them off there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_target
from .errors import ConfigError, OutputExistsError, ReferenceDataError, first_line
from .raster import read_probabilities
from .rundir import EVALUATION

log = logging.getLogger(__name__)

#: Histogram resolution: thresholds k/1000, k = 0..1000.
BINS = 1000
#: Pixels per side of a read window; 2048² float32 × prompts keeps memory to tens of MB.
WINDOW_SIZE = 2048
#: Object match rule (the usual one: above 0.5 a truth object can match at most one prediction).
OBJECT_IOU = 0.5
#: The layer geoseg writes its polygons to (geoseg.export.write_vector's default).
POLYGON_LAYER = "segments"
REPORT_FILES = ("evaluation.json", "evaluation.txt", "pr_curve.png")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of one evaluation.

    ``class_field``: truth attribute naming each polygon's class. Classes map to prompts by equal
    text, or by ``classes`` (pairs ``(value, prompt)``, as ``--class VALUE=PROMPT``). Without a
    field, every truth polygon shows one prompt: the run's only prompt, or ``prompt``.
    ``aoi``: polygons bounding the evaluation; default: the bounding box of the truth.
    ``output``: report directory (default ``RUN_DIR/evaluation``).
    """

    truth: Path
    class_field: str | None = None
    classes: tuple[tuple[str, str], ...] = ()
    prompt: str | None = None
    aoi: Path | None = None
    output: Path | None = None
    overwrite: bool = False
    objects: bool = True
    window_size: int = WINDOW_SIZE
    bins: int = BINS

    def __post_init__(self):
        object.__setattr__(self, "truth", Path(self.truth))
        if self.aoi is not None:
            object.__setattr__(self, "aoi", Path(self.aoi))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "classes", tuple((str(v), str(p)) for v, p in self.classes))
        if self.classes and not self.class_field:
            raise ConfigError("--class VALUE=PROMPT needs --class-field (the truth attribute holding VALUE)")
        if self.prompt is not None and self.class_field:
            raise ConfigError("--prompt is for truth without classes; with --class-field use --class VALUE=PROMPT")
        values = [v for v, _ in self.classes]
        if len(set(values)) != len(values):
            raise ConfigError(f"each --class value may map to one prompt only, got {list(self.classes)}")
        if self.window_size < 16:
            raise ConfigError(f"window size must be >= 16 px, got {self.window_size}")
        if self.bins < 2:
            raise ConfigError(f"bins must be >= 2, got {self.bins}")


# -- the run --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInputs:
    """What evaluation needs from a finished run directory."""

    run_dir: Path
    input: str
    probabilities: Path
    polygons: Path | None
    prompts: tuple[str, ...]
    thresholds: tuple[float, ...]
    crs: Any
    transform: Any
    width: int
    height: int
    fingerprint: str | None


def _load_run(run_dir: Path) -> RunInputs:
    """The one place that reads the run directory.

    The run threshold is the one its polygons were last made with: a later ``geoseg vectorize``
    overrides ``segment``'s.
    """
    import rasterio

    from .config import VectorizeConfig
    from .rundir import PROBABILITIES, load_finished_run

    manifest = load_finished_run(run_dir)
    prompts = tuple(manifest.prompts)
    reruns = manifest.vectorize_runs
    raw = reruns[-1]["threshold"] if reruns else manifest.options["vector"]["threshold"]
    thresholds = VectorizeConfig(threshold=raw).thresholds_for(len(prompts))
    name = manifest.outputs.get("polygons")
    polygons = run_dir / name if name and (run_dir / name).exists() else None
    probs = run_dir / PROBABILITIES
    with rasterio.open(probs) as src:
        if src.count != len(prompts):
            raise ReferenceDataError(f"{probs}: {src.count} bands but the manifest lists {len(prompts)} prompts")
        crs, transform, width, height = src.crs, src.transform, src.width, src.height
    return RunInputs(run_dir, manifest.input_path(run_dir), probs, polygons, prompts, thresholds, crs, transform,
                     width, height, manifest.fingerprint)


# -- reference polygons ---------------------------------------------------------------------------

def _read_polygons(path: Path, what: str, crs: Any, columns: Sequence[str] = ()):
    """Polygonal features of ``path`` in ``crs`` (reprojected when the file has another CRS)."""
    import geopandas as gpd
    import shapely

    if not path.exists():
        raise ReferenceDataError(f"{path}: {what} file not found")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # GDAL/pyogrio raise many types for unreadable files
        raise ReferenceDataError(f"{path}: cannot read the {what} file: {first_line(exc)}") from exc
    for col in columns:
        if col not in gdf.columns:
            have = ", ".join(c for c in gdf.columns if c != gdf.geometry.name) or "none"
            raise ReferenceDataError(f"{path}: no field {col!r} in the {what} (fields: {have})")
    if gdf.crs is None:
        raise ReferenceDataError(f"{path}: the {what} has no CRS; assign one (e.g. in QGIS) and try again")
    geoms = gdf.geometry.values
    polygonal = ~(gdf.geometry.isna() | shapely.is_empty(geoms)) & gdf.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.any():
        raise ReferenceDataError(f"{path}: the {what} holds no polygons")
    gdf = gdf[polygonal].to_crs(crs)
    gdf = gdf.set_geometry(shapely.make_valid(gdf.geometry.values), crs=gdf.crs)
    return gdf


@dataclass(frozen=True)
class PromptTruth:
    """The truth polygons of one prompt and the class values they came from."""

    prompt: str
    index: int  # band of the probability COG, from 0
    classes: tuple[str, ...]
    geoms: np.ndarray  # shapely geometries in the raster CRS


def map_classes(values: Sequence[Any] | None, prompts: Sequence[str], config: EvaluateConfig,
                truth_path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``{prompt: [class values]}`` for the prompts the truth covers, and the unmapped values.

    ``values`` are the truth's class values (None: no class field).
    """
    prompts = list(prompts)
    if values is None:
        if config.prompt is not None:
            if config.prompt not in prompts:
                raise ConfigError(f"--prompt {config.prompt!r} is not a prompt of the run {prompts}")
            return {config.prompt: ["(all truth polygons)"]}, []
        if len(prompts) > 1:
            raise ConfigError(f"the run has {len(prompts)} prompts {prompts}: say which one the truth shows "
                              "(--prompt P), or give --class-field")
        return {prompts[0]: ["(all truth polygons)"]}, []
    present = sorted({str(v) for v in values})
    mapping = dict(config.classes) if config.classes else {v: v for v in present if v in prompts}
    for value, prompt in config.classes:
        if prompt not in prompts:
            raise ConfigError(f"--class {value}={prompt}: {prompt!r} is not a prompt of the run {prompts}")
        if value not in present:
            raise ReferenceDataError(f"{truth_path}: no polygon has {config.class_field} = {value!r} "
                                     f"(values: {', '.join(present[:20])})")
    if not mapping:
        raise ReferenceDataError(f"{truth_path}: no value of {config.class_field!r} equals a prompt of the run "
                                 f"{prompts} (values: {', '.join(present[:20])}); map them with --class VALUE=PROMPT")
    out: dict[str, list[str]] = {}
    for value, prompt in mapping.items():
        out.setdefault(prompt, []).append(value)
    ordered = {p: sorted(out[p]) for p in prompts if p in out}
    return ordered, [v for v in present if v not in mapping]


# -- the evaluation area --------------------------------------------------------------------------

def raster_footprint(transform: Any, width: int, height: int):
    """The raster's outline in its CRS (full affine: rotated grids give a rotated outline)."""
    import shapely

    corners = [transform @ (c, r) for c, r in ((0, 0), (width, 0), (width, height), (0, height))]
    return shapely.Polygon(corners)


def pixel_bounds(geom: Any, transform: Any, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) of the pixels whose extent meets ``geom``, clipped to the raster."""
    import shapely

    inv = ~transform
    px = shapely.affinity.affine_transform(geom, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])
    c0, r0, c1, r1 = px.bounds
    r0, c0 = max(0, math.floor(r0)), max(0, math.floor(c0))
    r1, c1 = min(height, math.ceil(r1)), min(width, math.ceil(c1))
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, c0, r1, c1


# -- scores ---------------------------------------------------------------------------------------

def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


@dataclass(frozen=True)
class Scores:
    """Confusion counts and the scores made from them (None where a score is undefined, 0/0)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def iou(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    def to_dict(self) -> dict:
        return {**asdict(self), "iou": self.iou, "f1": self.f1, "precision": self.precision, "recall": self.recall}


@dataclass
class Histograms:
    """Per-prompt accumulators, summed window by window (all integer: order does not matter)."""

    bins: int
    threshold: float
    pos: np.ndarray = field(init=False)  # truth-positive pixels per probability bin
    neg: np.ndarray = field(init=False)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    nodata: int = 0            # area pixels without a probability (NaN)
    truth_in_nodata: int = 0   # of those, inside a truth polygon

    def __post_init__(self):
        self.pos = np.zeros(self.bins + 1, np.int64)
        self.neg = np.zeros(self.bins + 1, np.int64)

    def add(self, prob: np.ndarray, truth: np.ndarray, inside: np.ndarray) -> None:
        """Count one window: ``prob`` float (NaN = nodata), ``truth`` and ``inside`` boolean."""
        finite = np.isfinite(prob)
        missing = inside & ~finite
        self.nodata += int(missing.sum())
        self.truth_in_nodata += int((missing & truth).sum())
        use = inside & finite
        p = prob[use].astype(np.float64)
        t = truth[use]
        idx = bin_index(p, self.bins)
        self.pos += np.bincount(idx[t], minlength=self.bins + 1)
        self.neg += np.bincount(idx[~t], minlength=self.bins + 1)
        pred = p >= self.threshold  # vectorize's rule: a pixel is in the mask when prob >= threshold
        self.tp += int((pred & t).sum())
        self.fp += int((pred & ~t).sum())
        self.fn += int((~pred & t).sum())
        self.tn += int((~pred & ~t).sum())

    def at_run_threshold(self) -> Scores:
        return Scores(self.threshold, self.tp, self.fp, self.fn, self.tn)

    def curve(self) -> list[Scores]:
        """Scores at every grid threshold k/bins, k = 0..bins (exact counts, from suffix sums)."""
        tp = np.cumsum(self.pos[::-1])[::-1]
        fp = np.cumsum(self.neg[::-1])[::-1]
        npos, nneg = int(self.pos.sum()), int(self.neg.sum())
        return [Scores(k / self.bins, int(tp[k]), int(fp[k]), npos - int(tp[k]), nneg - int(fp[k]))
                for k in range(self.bins + 1)]


def bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each probability: k with ``k/bins <= p < (k+1)/bins`` (k = bins for p = 1), clipped.

    The same rule as ``searchsorted(arange(bins + 1) / bins, p, side="right") - 1``, so ``p >= k/bins``
    exactly when the bin is >= k, but ~20x faster: ``floor(p * bins)`` is off by at most one where
    ``p * bins`` rounds across an integer, and one comparison with each neighbouring edge fixes that.
    """
    p = np.asarray(p, dtype=np.float64)
    idx = np.clip(np.floor(p * bins), 0, bins).astype(np.int64)
    idx -= p < idx / bins                                    # rounded up past an edge
    up = np.minimum(idx + 1, bins)
    idx += (p >= up / bins) & (idx < bins)                   # rounded down below an edge
    return np.clip(idx, 0, bins)


def best_threshold(curve: Sequence[Scores], score: str, run_threshold: float | None = None) -> Scores | None:
    """The grid threshold strictly inside (0, 1) with the highest ``score`` ('f1' or 'iou').

    Ties go to the run's threshold when it is one of them (a tie is no reason to change it), else to
    the lowest. None when the score is undefined everywhere (no truth and no prediction) or zero
    everywhere (nothing to find).
    """
    inner = curve[1:-1]
    values = [getattr(s, score) or 0.0 for s in inner]
    if not values or max(values) <= 0:
        return None
    ties = [s for s, v in zip(inner, values, strict=True) if v == max(values)]
    return next((s for s in ties if run_threshold is not None and abs(s.threshold - run_threshold) < 1e-9), ties[0])


# -- objects --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectScores:
    """Object counts at IoU >= ``iou``: matched (TP), unmatched predictions (FP), unmatched truth (FN)."""

    truth: int
    predicted: int
    matched: int
    iou: float = OBJECT_IOU

    @property
    def false_positives(self) -> int:
        return self.predicted - self.matched

    @property
    def false_negatives(self) -> int:
        return self.truth - self.matched

    @property
    def precision(self) -> float | None:
        return _ratio(self.matched, self.predicted)

    @property
    def recall(self) -> float | None:
        return _ratio(self.matched, self.truth)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.matched, self.truth + self.predicted)

    def to_dict(self) -> dict:
        return {"truth": self.truth, "predicted": self.predicted, "matched": self.matched,
                "false_positives": self.false_positives, "false_negatives": self.false_negatives,
                "precision": self.precision, "recall": self.recall, "f1": self.f1, "match_iou": self.iou}


def match_objects(truth: Sequence[Any] | np.ndarray, predicted: Sequence[Any] | np.ndarray,
                  min_iou: float = OBJECT_IOU) -> ObjectScores:
    """One-to-one matching of polygons at IoU >= ``min_iou``, greedily by descending IoU.

    Candidate pairs come from an STRtree, so the cost follows the number of overlapping pairs, not
    truth × predictions. Above 0.5 a truth object can overlap at most one prediction that well
    (when the predictions do not overlap each other), so greedy matching is then optimal.
    """
    import shapely

    t = np.asarray(truth, dtype=object)
    p = np.asarray(predicted, dtype=object)
    if len(t) == 0 or len(p) == 0:
        return ObjectScores(len(t), len(p), 0, min_iou)
    tree = shapely.STRtree(p)
    ti, pi = tree.query(t, predicate="intersects")
    inter = shapely.area(shapely.intersection(t[ti], p[pi]))
    union = shapely.area(t[ti]) + shapely.area(p[pi]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    used_t: set[int] = set()
    used_p: set[int] = set()
    matched = 0
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < min_iou:
            break
        a, b = int(ti[k]), int(pi[k])
        if a not in used_t and b not in used_p:
            used_t.add(a)
            used_p.add(b)
            matched += 1
    return ObjectScores(len(t), len(p), matched, min_iou)


def objects_in_area(geoms: np.ndarray, area: Any) -> np.ndarray:
    """The objects with more than half their area inside ``area``, clipped to it.

    Half, not "any part": a polygon cut by the area's edge, or one whose reprojected edge grazes it,
    would otherwise count as a sliver object that nothing can match.
    """
    import shapely

    clipped = shapely.intersection(geoms, area)
    whole = shapely.area(geoms)
    keep = ~shapely.is_empty(clipped) & (shapely.area(clipped) > 0.5 * whole)
    return clipped[keep]


def _run_polygons(run: RunInputs, area: Any) -> Any:
    """The run's polygons meeting ``area``'s bounding box, in the raster CRS."""
    import geopandas as gpd
    import pyogrio

    path = run.polygons
    assert path is not None
    box = gpd.GeoSeries([area], crs=run.crs)
    if path.suffix == ".parquet":
        gdf = gpd.read_parquet(path)
        gdf = gdf[gdf.intersects(box.to_crs(gdf.crs).iloc[0].envelope)] if len(gdf) else gdf
    else:
        file_crs = pyogrio.read_info(path, layer=POLYGON_LAYER)["crs"]
        bbox = tuple(box.to_crs(file_crs).total_bounds) if file_crs else None
        gdf = gpd.read_file(path, layer=POLYGON_LAYER, bbox=bbox)
    return gdf.to_crs(run.crs) if gdf.crs is not None and len(gdf) else gdf


# -- the evaluation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptResult:
    prompt: str
    classes: tuple[str, ...]
    at_threshold: Scores
    best_f1: Scores | None
    best_iou: Scores | None
    truth_pixels: int
    nodata_pixels: int
    truth_pixels_in_nodata: int
    curve: tuple[Scores, ...] = field(repr=False)
    histograms: Histograms = field(repr=False)
    objects: ObjectScores | None = None

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "truth_classes": list(self.classes),
            "at_run_threshold": self.at_threshold.to_dict(),
            "best_f1": self.best_f1.to_dict() if self.best_f1 else None,
            "best_iou": self.best_iou.to_dict() if self.best_iou else None,
            "truth_pixels": self.truth_pixels, "nodata_pixels": self.nodata_pixels,
            "truth_pixels_in_nodata": self.truth_pixels_in_nodata,
            "objects": self.objects.to_dict() if self.objects else None,
            "histogram": {"positive": self.histograms.pos.tolist(), "negative": self.histograms.neg.tolist()},
        }


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` returns: the scores per prompt and where the report went."""

    run_dir: Path
    truth: Path
    area_mode: str        # "aoi" or "truth extent"
    area_note: str        # a sentence for the report
    area_pixels: int      # raster pixels inside the evaluation area (nodata included)
    bins: int
    prompts: tuple[PromptResult, ...]
    unmapped_classes: tuple[str, ...]
    report: dict = field(repr=False)
    files: tuple[Path, ...] = ()

    def __getitem__(self, prompt: str) -> PromptResult:
        return next(p for p in self.prompts if p.prompt == prompt)

    def table(self) -> str:
        return format_table(self.report)


def evaluate(run_dir: Path | str, config: EvaluateConfig) -> EvaluationResult:
    """Score the finished run in ``run_dir`` against ``config.truth`` and write the report.

    Writes ``evaluation.json``, ``evaluation.txt`` and ``pr_curve.png`` into ``config.output``
    (default ``RUN_DIR/evaluation``), each atomically; existing report files are refused unless
    ``config.overwrite``.
    """
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    out_dir = config.output or run_dir / EVALUATION
    targets = [out_dir / name for name in REPORT_FILES]
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory; choose another -o")
    existing = [p.name for p in targets if p.exists()]
    if existing and not config.overwrite:
        raise OutputExistsError(f"{out_dir}: already holds {', '.join(existing)}; use --overwrite to replace, "
                                "or another -o")
    result = compute(run, config)
    from .plots import plot_pr_curves

    with contextlib.ExitStack() as stack:
        tmp_json, tmp_txt, tmp_png = (stack.enter_context(atomic_target(p)) for p in targets)
        _write_json(tmp_json, result.report)
        tmp_txt.write_text(result.table() + "\n", encoding="utf-8")
        plot_pr_curves(result, tmp_png)
    return dataclasses.replace(result, files=tuple(targets))


def compute(run: RunInputs, config: EvaluateConfig) -> EvaluationResult:
    """All the numbers (no files written)."""
    import rasterio
    import shapely
    from rasterio.features import rasterize
    from rasterio.windows import Window

    from .raster import bounded_gdal_cache

    crs, transform = run.crs, run.transform
    columns = [config.class_field] if config.class_field else []
    truth = _read_polygons(config.truth, "truth", crs, columns)
    values = truth[config.class_field].astype(str).tolist() if config.class_field else None
    mapping, unmapped = map_classes(values, run.prompts, config, config.truth)

    footprint = raster_footprint(transform, run.width, run.height)
    truth_bounds = truth.total_bounds
    hits = truth.sindex.query(footprint, predicate="intersects")
    if not (shapely.area(shapely.intersection(truth.geometry.values[hits], footprint)) > 0).any():
        raise ReferenceDataError(f"{config.truth}: no truth polygon overlaps the raster {run.probabilities} "
                                 f"(truth bounds {_fmt_bounds(truth_bounds)} vs raster "
                                 f"{_fmt_bounds(footprint.bounds)} in the raster CRS)")
    if config.aoi is not None:
        aoi = _read_polygons(config.aoi, "AOI", crs)
        area = shapely.union_all(aoi.geometry.values)
        mode, note = "aoi", f"AOI {config.aoi}"
    else:
        area = shapely.box(*truth_bounds)
        mode, note = "truth extent", ("truth extent: the bounding box of the truth polygons in the raster CRS "
                                      "(no --aoi given)")
    area = area.intersection(footprint)
    where = config.aoi if config.aoi is not None else config.truth
    bounds = pixel_bounds(area, transform, run.width, run.height) if area.area > 0 else None
    if bounds is None:
        raise ReferenceDataError(f"{where}: the evaluation area does not overlap the raster {run.probabilities}")

    prompt_geoms: dict[str, np.ndarray] = {}
    geoms = truth.geometry.values
    for prompt, classes in mapping.items():
        if values is None:
            prompt_geoms[prompt] = np.asarray(geoms, dtype=object)
        else:
            sel = np.isin(np.asarray(values, dtype=object), classes)
            prompt_geoms[prompt] = np.asarray(geoms[sel], dtype=object)
    trees = {p: shapely.STRtree(g) for p, g in prompt_geoms.items()}
    bands = [run.prompts.index(p) for p in mapping]
    hists = {p: Histograms(config.bins, run.thresholds[run.prompts.index(p)]) for p in mapping}

    area_pixels = 0
    truth_pixels = dict.fromkeys(mapping, 0)
    r0, c0, r1, c1 = bounds
    ws = config.window_size
    with rasterio.open(run.probabilities) as src:
        for row in range((r0 // ws) * ws, r1, ws):
            for col in range((c0 // ws) * ws, c1, ws):
                h, w = min(ws, run.height - row), min(ws, run.width - col)
                win = Window(col, row, w, h)
                wt = src.window_transform(win)
                cell = raster_footprint(wt, w, h)
                if not area.intersects(cell):
                    continue
                inside = rasterize([(area, 1)], out_shape=(h, w), transform=wt, fill=0, dtype="uint8") == 1
                if not inside.any():
                    continue
                area_pixels += int(inside.sum())
                # the cache cap only around reads: rasterize sizes its row chunks by GDAL's cache,
                # and each chunk re-scans every shape (10x slower for 600 boxes under the cap)
                with bounded_gdal_cache():
                    probs = read_probabilities(src, window=win)[list(bands)]  # float32 or uint8 runs
                for k, prompt in enumerate(mapping):
                    near = prompt_geoms[prompt][trees[prompt].query(cell, predicate="intersects")]
                    mask = (rasterize([(g, 1) for g in near], out_shape=(h, w), transform=wt, fill=0,
                                      dtype="uint8") == 1) if len(near) else np.zeros((h, w), bool)
                    truth_pixels[prompt] += int((mask & inside).sum())
                    hists[prompt].add(probs[k], mask, inside)
    if area_pixels == 0:
        raise ReferenceDataError(f"{where}: the evaluation area covers no pixel centre of the raster "
                                 f"{run.probabilities}")

    polygons = None
    if config.objects and run.polygons is not None:
        polygons = _run_polygons(run, area)
    results = []
    for prompt, classes in mapping.items():
        hist = hists[prompt]
        curve = tuple(hist.curve())
        objects = None
        if polygons is not None:
            pred = polygons.geometry.values[(polygons["prompt"] == prompt).to_numpy()] if len(polygons) else []
            objects = match_objects(objects_in_area(np.asarray(prompt_geoms[prompt], dtype=object), area),
                                    objects_in_area(np.asarray(pred, dtype=object), area))
        at_run = hist.at_run_threshold()
        results.append(PromptResult(prompt, tuple(classes), at_run, best_threshold(curve, "f1", at_run.threshold),
                                    best_threshold(curve, "iou", at_run.threshold), truth_pixels[prompt], hist.nodata,
                                    hist.truth_in_nodata, curve, hist, objects))
    for prompt, n in truth_pixels.items():
        if n == 0:
            log.warning("%s: no truth pixel of %r inside the evaluation area: recall and IoU are undefined",
                        config.truth, prompt)
    if unmapped:
        log.warning("%s: truth classes %s map to no prompt; their polygons count as background", config.truth,
                    unmapped)
    report = _report(run, config, mode, note, area_pixels, results, unmapped)
    return EvaluationResult(run.run_dir, config.truth, mode, note, area_pixels, config.bins, tuple(results),
                            tuple(unmapped), report)


def _fmt_bounds(b: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def _report(run: RunInputs, config: EvaluateConfig, mode: str, note: str, area_pixels: int,
            results: Sequence[PromptResult], unmapped: Sequence[str]) -> dict:
    from . import __version__

    return {
        "geoseg_version": __version__,
        "run_dir": str(run.run_dir), "run_fingerprint": run.fingerprint, "input": run.input,
        "probabilities": str(run.probabilities), "polygons": str(run.polygons) if run.polygons else None,
        "truth": str(config.truth), "class_field": config.class_field,
        "class_map": [list(c) for c in config.classes], "aoi": str(config.aoi) if config.aoi else None,
        "area": {"mode": mode, "note": note, "pixels": area_pixels,
                 "pixel_rule": "a pixel belongs to a polygon (truth or area) when its centre lies inside"},
        "threshold_rule": "a pixel is predicted when probability >= threshold (as geoseg vectorize)",
        "threshold_resolution": 1.0 / config.bins,
        "histogram_bins": f"bin k holds k/{config.bins} <= p < (k+1)/{config.bins}; the last holds p == 1",
        "unmapped_classes": list(unmapped),
        "prompts": [r.to_dict() for r in results],
    }


def _write_json(path: Path, report: dict) -> None:
    import json

    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _f(v: float | None, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def format_table(report: dict) -> str:
    """The readable table the CLI prints and writes to ``evaluation.txt``."""
    area = report["area"]
    lines = [f"run:   {report['run_dir']}", f"truth: {report['truth']}",
             f"area:  {area['note']}; {area['pixels']:,} px"]
    if report["unmapped_classes"]:
        lines.append(f"note:  truth classes mapped to no prompt (counted as background): "
                     f"{', '.join(report['unmapped_classes'])}")
    head = ["prompt", "thr", "IoU", "F1", "prec", "recall", "best-F1 thr", "F1", "best-IoU thr", "IoU"]
    rows = []
    for p in report["prompts"]:
        a, bf, bi = p["at_run_threshold"], p["best_f1"] or {}, p["best_iou"] or {}
        rows.append([p["prompt"], f"{a['threshold']:.3f}", _f(a["iou"]), _f(a["f1"]), _f(a["precision"]),
                     _f(a["recall"]), _f(bf.get("threshold")), _f(bf.get("f1")), _f(bi.get("threshold")),
                     _f(bi.get("iou"))])
    lines += ["", "pixel scores (at the run threshold, and the best thresholds on a "
              f"{report['threshold_resolution']:g} grid)", *_columns(head, rows)]
    lines += ["", "pixels", *_columns(
        ["prompt", "truth classes", "TP", "FP", "FN", "TN", "nodata", "truth in nodata"],
        [[p["prompt"], ", ".join(p["truth_classes"]),
          *(f"{p['at_run_threshold'][k]:,}" for k in ("tp", "fp", "fn", "tn")),
          f"{p['nodata_pixels']:,}", f"{p['truth_pixels_in_nodata']:,}"] for p in report["prompts"]])]
    objs = [p for p in report["prompts"] if p["objects"]]
    if objs:
        iou = objs[0]["objects"]["match_iou"]
        title = f"objects (matched one to one at IoU >= {iou:g}; those more than half inside the area, clipped)"
        lines += ["", title, *_columns(
            ["prompt", "truth", "predicted", "matched", "FP", "FN", "prec", "recall", "F1"],
            [[p["prompt"], *(str(p["objects"][k]) for k in ("truth", "predicted", "matched", "false_positives",
                                                             "false_negatives")),
              *(_f(p["objects"][k]) for k in ("precision", "recall", "f1"))] for p in objs])]
    return "\n".join(lines)


def _columns(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
