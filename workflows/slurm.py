"""SLURM run on GPU nodes via dask-jobqueue (``pip install 'geoseg[slurm]'``).

Run this *driver* where it can live for the whole job and reach the compute nodes: a login node
(in tmux/screen) or a small CPU job (see ``slurm_driver.sbatch``). It starts a Dask scheduler here,
submits one SLURM job per GPU worker, scales them with the queue (adaptive), and runs geoseg on them:

    python workflows/slurm.py /shared/scene.tif -p "solar panel" -o /shared/runs/solar --max-jobs 16
    python workflows/slurm.py ... --dry-run        # print the worker job script and the plan

Edit the constants below for your site (partition, account, GPU gres, memory, walltime).

Walltime safety: each worker retires itself ``--lifetime`` before its job's walltime ends (staggered
by ``--lifetime-stagger`` so they do not all leave together), its running chunk moves to another
worker, and ``adapt`` submits a replacement job. Nothing is lost: a chunk is finished only when its
done-record is written, and an interrupted chunk is simply run again. Keep LIFETIME below WALLTIME
by more than the slowest chunk (see the manifest's per-chunk ``seconds``).

GPU: each worker declares ``--resources GPU=1``; geoseg then tags its chunk tasks
``resources={"GPU": 1}``, so every GPU holds one model and runs one chunk at a time.

Model weights: workers must not each download from the hub. Stage once, on a node with internet:

    export HF_HOME=/shared/hf                      # storage every compute node mounts
    huggingface-cli download CIDAS/clipseg-rd64-refined     # or: hf download ...

The job script below exports HF_HOME and HF_HUB_OFFLINE=1, so workers read only that cache.

If the driver dies (walltime, lost ssh session), run the same command again: it resumes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# -- edit for your site -----------------------------------------------------------------------
PARTITION = "gpu"
ACCOUNT = None                 # e.g. "proj123"
GRES = "gpu:1"                 # one GPU per job = one worker = one model
CORES = 8                      # CPU cores per job (reading, blending, polygonizing; torch threads)
MEMORY = "32GB"                # per job; peak worker RSS is bounded by chunk and batch size
WALLTIME = "04:00:00"
LIFETIME = "215m"              # + stagger < WALLTIME minus the slowest chunk (one unit: "215m")
LIFETIME_STAGGER = "10m"
HF_HOME = "/shared/hf"         # pre-staged Hugging Face cache, mounted on every node
PROLOGUE = ["module load cuda || true", "source /shared/envs/geoseg/bin/activate"]
LOCAL_DIRECTORY = "$TMPDIR"    # worker scratch on node-local disk
LOG_DIRECTORY = "dask-logs"
PYTHON = "python"              # the environment's python on the nodes (activated in PROLOGUE)
# ---------------------------------------------------------------------------------------------


def make_cluster(**overrides):
    """The SLURMCluster (starts only the scheduler, here; jobs are submitted by scale/adapt)."""
    from dask_jobqueue import SLURMCluster

    env = _common.hf_env(HF_HOME)
    kw = dict(
        queue=PARTITION, account=ACCOUNT, cores=CORES, processes=1, memory=MEMORY, walltime=WALLTIME,
        job_extra_directives=[f"--gres={GRES}"],
        worker_extra_args=["--resources", "GPU=1", "--lifetime", LIFETIME,
                           "--lifetime-stagger", LIFETIME_STAGGER],
        job_script_prologue=[*PROLOGUE, *(f"export {k}={v}" for k, v in env.items()),
                             f"export OMP_NUM_THREADS={CORES}"],
        local_directory=LOCAL_DIRECTORY, log_directory=LOG_DIRECTORY, python=PYTHON,
        scheduler_options={"dashboard_address": ":8787"},
    )
    kw.update(overrides)
    return SLURMCluster(**kw)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--min-jobs", type=int, default=1, help="GPU jobs kept even when idle")
    p.add_argument("--max-jobs", type=int, default=8, help="most GPU jobs at once")
    args = p.parse_args(argv)
    # Keep 2 chunks queued per possible worker so the adaptive scaler sees the whole demand.
    cfg = _common.config(args, max_in_flight=2 * args.max_jobs)
    if args.dry_run:
        with make_cluster() as cluster:
            print(cluster.job_script())
        print(f"adaptive: {args.min_jobs}..{args.max_jobs} jobs")
        print(_common.plan(cfg))
        return 0

    from distributed import Client

    with make_cluster() as cluster, Client(cluster) as client:
        cluster.adapt(minimum_jobs=args.min_jobs, maximum_jobs=args.max_jobs)
        return _common.run(cfg, client)


if __name__ == "__main__":
    sys.exit(main())
