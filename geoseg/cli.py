"""The ``geoseg`` command: thin click commands that parse options, call one library function, print.

Errors derived from :class:`geoseg.GeosegError` are shown as one line (``geoseg: error: ...``) with
exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import CHUNK_SIZE, DEFAULT_MODEL, DEFAULT_THRESHOLD, STRIDE, TILE_SIZE, SegmentConfig, VectorizeConfig
from .errors import GeosegError
from .progress import MODES, JsonlLogHandler, emit, is_jsonl, result, set_mode


def _floats(ctx, param, value):
    """Accept ``--threshold 0.3`` repeated or ``--threshold 0.3,0.5``."""
    out = []
    for v in value or ():
        out += [float(x) for x in str(v).split(",") if x.strip()]
    return tuple(out)


def _ints(ctx, param, value):
    if not value:
        return ()
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected band numbers like 1,2,3, got {value!r}") from None


def vector_options(f):
    """Options shared by ``segment`` and ``vectorize`` (as rasterio's rio/options.py shares them)."""
    options = [
        click.option("--threshold", "threshold", multiple=True, callback=_floats, show_default=True,
                     default=[str(DEFAULT_THRESHOLD)],
                     help="Probability at or above which a pixel belongs to the prompt. One value for all "
                          "prompts, or one per prompt in --prompt order (repeat or comma-separate)."),
        click.option("--min-area", type=float, default=0.0, show_default=True,
                     help="Drop polygons smaller than this, in m² (CRS units² if the CRS has no metric "
                          "meaning). Applied after chunk seams are merged."),
        click.option("--fill-holes", type=float, default=0.0, show_default=True,
                     help="Fill holes smaller than this area (m², as --min-area)."),
        click.option("--simplify", type=float, default=0.0, show_default=True,
                     help="Simplification tolerance in CRS units; coverage-safe, so touching polygons keep "
                          "shared edges. 0 keeps exact pixel edges."),
        click.option("--dst-crs", default=None, help="Write polygons in this CRS (default: the raster's). "
                     "Polygons crossing the antimeridian are split at 180°."),
        click.option("--format", "vector_format", type=click.Choice(["gpkg", "parquet"]), default="gpkg",
                     show_default=True, help="GeoPackage (opens styled in QGIS) or GeoParquet."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _vector_config(kw) -> VectorizeConfig:
    return VectorizeConfig(threshold=kw.pop("threshold"), min_area=kw.pop("min_area"),
                           fill_holes=kw.pop("fill_holes"), simplify=kw.pop("simplify"),
                           dst_crs=kw.pop("dst_crs"), vector_format=kw.pop("vector_format"))


def handle_errors(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug")
        try:
            return f(*args, **kwargs)
        except GeosegError as exc:
            if debug:
                raise
            if is_jsonl():
                emit("error", message=str(exc))
            click.echo(f"geoseg: error: {exc}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("--progress", "progress_mode", type=click.Choice(MODES), default="bar", show_default=True,
              help="bar: a progress bar and plain text. jsonl: one JSON object per line on stdout "
                   "(progress, log, result and error events) for programs such as the QGIS plugin.")
def main(verbose, debug, progress_mode):
    """Text-prompted segmentation of georeferenced rasters (CLIPSeg + Dask)."""
    set_mode(progress_mode)
    handler: logging.Handler = JsonlLogHandler() if is_jsonl() else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("geoseg: %(levelname)s: %(message)s"))
    logger = logging.getLogger("geoseg")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING - 10 * min(verbose + (2 if debug else 0), 2))


@main.command()
@click.argument("input", metavar="INPUT")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help="What to find, in a few words (repeat for several: one output band / category each).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Run directory for probabilities.tif, polygons.gpkg and manifest.json. Re-running the same "
                   "command there resumes; a different job there is refused unless --overwrite.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Hugging Face hub id (downloaded once into the HF cache) or a local model directory.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to pin the weights.")
@click.option("--device", default="auto", show_default=True,
              help="auto picks CUDA, then Apple MPS, then CPU; or force cpu / cuda / cuda:1 / mps.")
@click.option("--batch-size", type=int, default=None,
              help="Tiles per model call. Default: on CUDA as many as fit in half the free GPU memory "
                   "(up to 256); 8 elsewhere.")
@click.option("--dtype", type=click.Choice(["float32", "uint8"]), default="float32", show_default=True,
              help="probabilities.tif data type. uint8 stores round(p x 254) with 255 as nodata: 4x smaller, "
                   "probabilities within 1/508 (thresholds decide differently only within 1/508 of them).")
@click.option("--compile", "compile_model", is_flag=True, default=False,
              help="torch.compile the model (compiles once per worker; measure with bench/bench_gpu.py).")
@click.option("--bands", callback=_ints, default=None,
              help="Bands to use as R,G,B (e.g. 4,3,2) or one band for grey. Default: by colour "
                   "interpretation, else the first three non-alpha bands.")
@click.option("--crs", default=None, help="CRS for a raster that has none (e.g. a JPEG with a world file).")
@click.option("--resolution", type=float, default=None,
              help="Pixel size (CRS units, e.g. metres) at which the model sees the image; reads go through "
                   "overviews. Objects should span tens of pixels in a 352 px tile. Default: native.")
@click.option("--tile-size", type=int, default=TILE_SIZE, show_default=True,
              help="Model tile size in px (CLIPSeg was trained at 352).")
@click.option("--stride", type=int, default=STRIDE, show_default=True,
              help="Tile step in px; the overlap (tile - stride) is blended with cosine ramps.")
@click.option("--chunk-size", type=int, default=CHUNK_SIZE, show_default=True,
              help="Chunk (unit of Dask work) size in px, rounded up to the file's internal blocks. Bounds memory "
                   "per worker; does not change the result.")
@click.option("--workers", type=int, default=None,
              help="Worker processes of the local Dask cluster started for the run [default: 1].")
@click.option("--scheduler", default=None,
              help="Address of an existing Dask scheduler (tcp://host:8786), or its scheduler file (.json), "
                   "instead of a local cluster.")
@click.option("--max-in-flight", type=int, default=None,
              help="Chunks queued on the cluster at once [default: one per worker thread]. More only holds "
                   "queued chunks in worker memory.")
@click.option("--overwrite", is_flag=True,
              help="Start afresh: replace geoseg's files in the output directory (a previous run, of this job "
                   "or another, is not resumed); other files there are kept.")
@click.option("--templates", default="aerial", show_default=True, metavar="none|aerial|FILE",
              help="Prompt templates: each phrase is embedded through every template and the embeddings "
                   "averaged (direction of the mean unit vector, mean length). aerial: a remote-sensing set; "
                   "none: the bare phrase; FILE: one template per line with {} for the phrase.")
@click.option("--negative", "negatives", multiple=True, metavar="[PROMPT=]PHRASE",
              help="What a prompt must not fire on (repeatable): PHRASE for every prompt, PROMPT=PHRASE for one. "
                   "Each prompt's probability becomes p * (1 - max p_negative); still one band per prompt.")
@click.option("--exemplars", multiple=True, metavar="FILE",
              help="Exemplar polygons (e.g. a GeoPackage layer drawn in QGIS) whose --class-field names each "
                   "polygon's prompt: 'find more like these'. Any CRS (reprojected).")
@click.option("--class-field", default="class", show_default=True,
              help="The --exemplars field holding the prompt each polygon is an example of.")
@click.option("--exemplar", multiple=True, metavar="PROMPT=FILE",
              help="Every polygon of FILE is an exemplar of PROMPT (repeatable).")
@click.option("--exemplar-weight", type=float, default=0.5, show_default=True,
              help="Mix of text and exemplar embeddings for a prompt that has both: (1-w)*text + w*image; "
                   "1 uses the exemplars only.")
@click.option("--classes", is_flag=True,
              help="Also write classes.tif, an exclusive class map (argmax over the prompts, 0 = none below the "
                   "winner's threshold, 255 = nodata); the polygons are then its classes (no overlaps).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--no-polygons", "no_polygons", is_flag=True,
              help="Probabilities only (threshold in QGIS, or run `geoseg vectorize` on the run later).")
@vector_options
@handle_errors
def segment(input, quiet, no_polygons, **kw):
    """Segment INPUT (any GDAL raster) by text prompts into a probability COG and polygons."""
    from .pipeline import segment as run

    vector = _vector_config(kw)
    kw["compile"] = kw.pop("compile_model")
    config = SegmentConfig(input=input, vector=vector, polygons=not no_polygons, **kw)
    res = run(config, progress=not quiet)
    result(res.summary(), command="segment", run_dir=res.run_dir, probabilities=res.probabilities,
           polygons=res.polygons, layer="segments" if res.polygons and res.polygons.suffix == ".gpkg" else None,
           features=res.features, chunks_run=res.chunks_run, chunks_resumed=res.chunks_skipped,
           prompts=list(config.prompts), thresholds=list(vector.thresholds_for(len(config.prompts))))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes polygonizing chunks side by side (memory: about one chunk each) [default: one per "
                   "CPU core].")
@vector_options
@handle_errors
def vectorize(run_dir, quiet, workers, **kw):
    """Re-threshold and re-vectorize RUN_DIR from its stored probabilities (no model run)."""
    from .pipeline import vectorize as run

    vector = _vector_config(kw)
    path, n = run(run_dir, vector, progress=not quiet, workers=workers)  # None: one per CPU
    result(f"{path} ({n} polygons)", command="vectorize", run_dir=run_dir, polygons=path,
           layer="segments" if path.suffix == ".gpkg" else None, features=n, thresholds=list(vector.threshold))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="PNG to write.")
@click.option("--size", type=int, default=1024, show_default=True, help="Longest side of the image in px.")
@click.option("--mode", type=click.Choice(["probabilities", "polygons"]), default="probabilities",
              show_default=True, help="Overlay probabilities as colour or draw polygon outlines.")
@handle_errors
def preview(run_dir, output, size, mode):
    """Render a PNG quicklook of RUN_DIR: the image with probabilities or polygons and a legend."""
    from .preview import render_preview

    click.echo(render_preview(run_dir, output, size=size, mode=mode))


def _class_pairs(ctx, param, value):
    """``--class VALUE=PROMPT`` (repeatable) → ((value, prompt), ...)."""
    out = []
    for item in value or ():
        value_, sep, prompt = item.partition("=")
        if not sep or not value_.strip() or not prompt.strip():
            raise click.BadParameter(f"expected VALUE=PROMPT (e.g. bldg=building), got {item!r}")
        out.append((value_.strip(), prompt.strip()))
    return tuple(out)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--truth", type=click.Path(path_type=Path), required=True,
              help="Reference polygons (any OGR vector file; reprojected to the raster's CRS if needed).")
@click.option("--class-field", default=None,
              help="Truth attribute naming each polygon's class; a class scores the prompt with the same text "
                   "unless --class maps it. Without it, every truth polygon shows one prompt.")
@click.option("--class", "classes", multiple=True, callback=_class_pairs, metavar="VALUE=PROMPT",
              help="Map truth class VALUE to the run's PROMPT (repeat). Unmapped classes count as background.")
@click.option("--prompt", default=None,
              help="Without --class-field: the prompt the truth shows (needed when the run has several).")
@click.option("--aoi", type=click.Path(path_type=Path), default=None,
              help="Polygons bounding the evaluation. Default: the bounding box of the truth polygons.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Report directory for evaluation.json, evaluation.txt and pr_curve.png "
                   "[default: RUN_DIR/evaluation].")
@click.option("--overwrite", is_flag=True, help="Replace report files already in the output directory.")
@click.option("--no-objects", is_flag=True, help="Skip object-level scores (they hold the area's polygons in memory).")
@handle_errors
def evaluate(run_dir, truth, class_field, classes, prompt, aoi, output, overwrite, no_objects):
    """Score RUN_DIR's probabilities against reference polygons (no model run).

    Pixel IoU, F1, precision and recall per prompt at the run's threshold, the thresholds that
    maximise F1 and IoU, object matches at IoU >= 0.5, and a precision-recall chart.
    """
    from .evaluation import EvaluateConfig
    from .evaluation import evaluate as run

    config = EvaluateConfig(truth=truth, class_field=class_field, classes=classes, prompt=prompt, aoi=aoi,
                            output=output, overwrite=overwrite, objects=not no_objects)
    report = run(run_dir, config)
    text = report.table() + "\n\n" + "\n".join(str(p) for p in report.files)
    result(text, command="evaluate", run_dir=run_dir, files=[str(p) for p in report.files], table=report.table())


@main.command()
@click.argument("raster", metavar="RASTER")
@click.option("--labels", required=True, help="Polygons of the things to find (any OGR vector file, any CRS).")
@click.option("--class-field", default=None,
              help="Field of --labels holding each polygon's class. Without it every polygon is one class, "
                   "named by the single --prompt.")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="CLASS=TEXT: the prompt a class is trained (and later segmented) with; repeat per class. "
                   "Default: the class value itself.")
@click.option("--aoi", default=None,
              help="Polygons of the area that is fully labelled: inside it, pixels outside every label are "
                   "negatives. Default: the bounding box of the labels.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Model directory to write (save_pretrained + processor + model card); use it as --model.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id or local directory.")
@click.option("--revision", default=None, help="Hub revision of the base model.")
@click.option("--device", default="auto", show_default=True, help="auto picks CUDA, then MPS, then CPU.")
@click.option("--templates", default="aerial", show_default=True, metavar="none|aerial|FILE",
              help="Prompt templates, as for segment: train with the ones you will segment with.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimiser steps (at most).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Tiles per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--loss", type=click.Choice(["bce", "dice", "bce+dice"]), default="bce", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and tile order.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of the training area held out for validation, in whole blocks (0: none).")
@click.option("--block-size", type=int, default=None,
              help="Side in px of the spatial hold-out blocks [default: the largest of 2048, 1024, 704, 352, "
                   "176 giving >= 10 blocks].")
@click.option("--patience", type=int, default=5, show_default=True,
              help="Stop after this many validations without a better IoU.")
@click.option("--bands", callback=_ints, default=None, help="Bands as R,G,B, as for segment (use the same there).")
@click.option("--resolution", type=float, default=None, help="Working pixel size, as for segment (use the same there).")
@click.option("--overwrite", is_flag=True, help="Replace an existing geoseg model directory at -o.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train(raster, quiet, **kw):
    """Fine-tune CLIPSeg's decoder on labelled polygons over RASTER; write a model directory for --model."""
    from .train import TrainConfig
    from .train import train as run

    click.echo(run(TrainConfig(raster=raster, **kw), progress=not quiet).summary())
