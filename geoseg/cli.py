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
            click.echo(f"geoseg: error: {exc}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(verbose, debug):
    """Text-prompted segmentation of georeferenced rasters (CLIPSeg + Dask)."""
    handler = logging.StreamHandler()
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
              help="Chunk tasks queued on the cluster at once [default: 2 per worker]. Bounds scheduler "
                   "and client memory for huge rasters.")
@click.option("--overwrite", is_flag=True,
              help="Start afresh: replace geoseg's files in the output directory (a previous run, of this job "
                   "or another, is not resumed); other files there are kept.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@vector_options
@handle_errors
def segment(input, quiet, **kw):
    """Segment INPUT (any GDAL raster) by text prompts into a probability COG and polygons."""
    from .pipeline import segment as run

    vector = _vector_config(kw)
    kw["compile"] = kw.pop("compile_model")
    config = SegmentConfig(input=input, vector=vector, **kw)
    click.echo(run(config, progress=not quiet).summary())


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@vector_options
@handle_errors
def vectorize(run_dir, **kw):
    """Re-threshold and re-vectorize RUN_DIR from its stored probabilities (no model run)."""
    from .pipeline import vectorize as run

    path, n = run(run_dir, _vector_config(kw))
    click.echo(f"{path} ({n} polygons)")


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
