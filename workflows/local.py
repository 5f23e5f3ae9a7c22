"""Local multi-process run: one machine, N worker processes, each loading the model once.

    python workflows/local.py scene.tif -p "red roof" -p "swimming pool" -o run/ --workers 4

Equivalent to ``geoseg segment scene.tif -p ... -o run/ --workers 4``; this script is the place to
tune the cluster (memory limit per worker, threads) from Python. The dashboard link is printed.

Memory: each worker holds one chunk (+ halo) and one batch at a time, so its peak RSS is set by
``--chunk-size`` and ``--batch-size`` (and the model), not by the raster size. Give each worker
that plus headroom via MEMORY_LIMIT; Dask restarts a worker that passes it and the chunk reruns.

Model weights: the first run downloads CIDAS/clipseg-rd64-refined into HF_HOME (~600 MB). To run
offline, stage it once (``huggingface-cli download CIDAS/clipseg-rd64-refined``) and pass
``--offline``: the workers then get HF_HUB_OFFLINE=1 and read only the local cache.

Interrupted (Ctrl-C, power loss)? Run the same command again: finished chunks are skipped.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MEMORY_LIMIT = "4GiB"  # per worker process; "auto" splits the machine's memory between workers


def make_cluster(workers: int, offline: bool = False, hf_home: str | None = None, memory_limit=MEMORY_LIMIT):
    from distributed import LocalCluster

    threads = max(1, (os.cpu_count() or 1) // workers)  # cores per worker for torch / BLAS
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if offline:
        env.update(_common.hf_env(hf_home or os.environ.get("HF_HOME")))
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                        env=env, dashboard_address=":8787")


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes (each loads one model)")
    p.add_argument("--offline", action="store_true", help="workers read the HF cache only (HF_HUB_OFFLINE=1)")
    p.add_argument("--hf-home", default=None, help="pre-staged HF cache [default: $HF_HOME]")
    args = p.parse_args(argv)
    cfg = _common.config(args)
    if args.dry_run:
        print(f"LocalCluster: {args.workers} worker processes x 1 thread, memory_limit={MEMORY_LIMIT}, "
              f"offline={args.offline}")
        print(_common.plan(cfg))
        return 0

    from distributed import Client

    with make_cluster(args.workers, args.offline, args.hf_home) as cluster, Client(cluster) as client:
        return _common.run(cfg, client)


if __name__ == "__main__":
    sys.exit(main())
