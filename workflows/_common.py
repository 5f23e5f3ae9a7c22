"""Shared by the workflow scripts: the command line, the dry-run plan, the HF-cache environment.

Copy the whole ``workflows/`` folder when you adapt one of the scripts; each imports this module.
"""

from __future__ import annotations

import argparse
import os

import geoseg
from geoseg.config import CHUNK_SIZE, DEFAULT_MODEL

MODEL = DEFAULT_MODEL


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("input", help="raster to segment (any GDAL path, on storage every worker can read)")
    p.add_argument("-p", "--prompt", action="append", required=True, help="text prompt (repeat for more)")
    p.add_argument("-o", "--output", required=True, help="run directory on storage every worker can write")
    p.add_argument("--model", default=MODEL, help="hub id (pre-staged in HF_HOME) or a local model directory")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per model call [default: sized to free GPU memory on CUDA, else 8]")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="probabilities.tif dtype (uint8: round(p x 254), 255 nodata; 4x smaller)")
    p.add_argument("--dry-run", action="store_true", help="print the cluster definition and the plan; start nothing")
    return p


def config(args, **extra) -> geoseg.SegmentConfig:
    return geoseg.SegmentConfig(args.input, tuple(args.prompt), args.output, model=args.model,
                                chunk_size=args.chunk_size, batch_size=args.batch_size,
                                dtype=args.dtype, **extra)


def plan(cfg: geoseg.SegmentConfig) -> str:
    """What the run will do, computed from the raster header only (no pixels read, no model loaded)."""
    from geoseg.raster import inspect_raster
    from geoseg.stages import plan_chunks

    lines = [f"model: {cfg.model}   prompts: {list(cfg.prompts)}   output: {cfg.output}"]
    if os.path.exists(cfg.input) or "://" in cfg.input or cfg.input.startswith("/vsi"):
        info = inspect_raster(cfg.input, cfg.bands, cfg.crs, cfg.resolution)
        chunks = plan_chunks(info, cfg.chunk_size)
        lines.append(f"raster: {info.width} x {info.height} px  ->  {len(chunks)} chunk tasks "
                     f"of <= {max(r.height for r in chunks)} x {max(r.width for r in chunks)} px")
    else:
        lines.append(f"raster: {cfg.input} (not readable from here; plan skipped)")
    return "\n".join(lines)


def run(cfg: geoseg.SegmentConfig, client) -> int:
    """Run the job on the cluster behind ``client`` (progress bar and dashboard link), print the outputs."""
    print(geoseg.segment(cfg, client=client, progress=True).summary())
    return 0


def hf_env(hf_home: str | None) -> dict[str, str]:
    """Worker environment for a pre-staged Hugging Face cache: no worker ever calls the hub.

    Stage once, from a machine with internet access, into storage every worker mounts:
        HF_HOME=/shared/hf huggingface-cli download CIDAS/clipseg-rd64-refined
    (``hf download CIDAS/clipseg-rd64-refined`` with huggingface_hub >= 0.34).
    """
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if hf_home:
        env["HF_HOME"] = hf_home
    return env
