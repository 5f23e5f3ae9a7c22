"""Single- or multi-GPU machine via dask-cuda's LocalCUDACluster (``pip install 'geoseg[gpu]'``).

One worker process per GPU, pinned to it with CUDA_VISIBLE_DEVICES, declaring ``GPU=1``: geoseg
tags chunk tasks ``resources={"GPU": 1}``, so each GPU loads the model once and runs one chunk
at a time. CPU work of the chunk (read, blend, polygonize) overlaps across the GPU workers.

    python workflows/gpu_local.py scene.tif -p "building" -o run/              # all GPUs
    python workflows/gpu_local.py scene.tif -p "building" -o run/ --gpus 0,2   # two of them
    python workflows/gpu_local.py ... --dry-run                               # print the plan

Batch size: by default each chunk's batch is sized from the GPU's free memory (half of it, at most
256 tiles; CUDA out of memory halves it); --batch-size fixes it. Out of memory at one tile is
reported naming the chunk.

Model weights: stage once (``HF_HOME=/data/hf huggingface-cli download CIDAS/clipseg-rd64-refined``)
and pass ``--hf-home /data/hf``: workers get HF_HUB_OFFLINE=1 and never call the hub.

Without dask-cuda (or on a machine without GPUs) ``--dry-run`` still prints the plan.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def cluster_options(gpus: str | None, hf_home: str | None) -> dict:
    """Keyword arguments for LocalCUDACluster (printed by --dry-run)."""
    # 4 threads per GPU worker: one runs a chunk's inference (the GPU=1 slot) while the others read,
    # blend and polygonize other chunks, so the GPU is not left waiting on the CPU stages
    opts = dict(threads_per_worker=4, resources={"GPU": 1}, dashboard_address=":8787",
                env=_common.hf_env(hf_home) if hf_home else {})
    if gpus:
        opts["CUDA_VISIBLE_DEVICES"] = gpus
    return opts


def make_cluster(gpus: str | None = None, hf_home: str | None = None):
    from dask_cuda import LocalCUDACluster

    return LocalCUDACluster(**cluster_options(gpus, hf_home))


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids [default: all]")
    p.add_argument("--hf-home", default=None, help="pre-staged HF cache; sets HF_HUB_OFFLINE=1 on workers")
    args = p.parse_args(argv)
    cfg = _common.config(args, device="cuda")
    if args.dry_run:
        try:
            import dask_cuda  # noqa: F401
            have = "dask-cuda available"
        except ImportError:
            have = "dask-cuda NOT installed: pip install 'geoseg[gpu]'"
        print(f"LocalCUDACluster({cluster_options(args.gpus, args.hf_home)})  [{have}]")
        print(_common.plan(cfg))
        return 0

    from distributed import Client

    with make_cluster(args.gpus, args.hf_home) as cluster, Client(cluster) as client:
        return _common.run(cfg, client)


if __name__ == "__main__":
    sys.exit(main())
