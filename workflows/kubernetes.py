"""Kubernetes: check the DaskJob manifest, or run from your machine with a KubeCluster.

Two ways, both using ``kubernetes/daskjob.yaml`` (edit that file, not this one):

1. Batch, nothing running on your machine: the DaskJob (see the comments in the YAML)::

       kubectl apply -f workflows/kubernetes/hf-cache.yaml   # once: volumes + pre-stage the model
       python workflows/kubernetes.py --check                 # validate before applying
       kubectl apply -f workflows/kubernetes/daskjob.yaml

2. Interactive, driver on your machine (``pip install 'geoseg[kubernetes]'``, kubectl context set,
   input and output on storage that you *and* the pods reach, e.g. s3:// or a mounted share)::

       python workflows/kubernetes.py /data/input/scene.tif -p building -o /data/runs/b --workers 4
       python workflows/kubernetes.py ... --dry-run          # print the DaskCluster spec and plan

   The cluster is the DaskJob's ``spec.cluster`` as a DaskCluster, created with
   ``dask_kubernetes.operator.KubeCluster(custom_cluster_spec=...)`` and deleted at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASKJOB = HERE / "kubernetes" / "daskjob.yaml"
HF_CACHE = HERE / "kubernetes" / "hf-cache.yaml"


def load(path: Path = DASKJOB) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _check_pod(spec, where: str, problems: list[str]) -> None:
    if not isinstance(spec, dict) or not spec.get("containers"):
        problems.append(f"{where}: a pod spec needs containers")
        return
    volumes = {v.get("name") for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for key in ("name", "image"):
            if not isinstance(c.get(key), str) or not c[key]:
                problems.append(f"{where}: container needs a string {key!r}")
        if not isinstance(c.get("args", []), list) or not all(isinstance(a, str) for a in c.get("args", [])):
            problems.append(f"{where}.{c.get('name')}: args must be a list of strings (quote numbers)")
        for m in c.get("volumeMounts", []):
            if m.get("name") not in volumes:
                problems.append(f"{where}.{c.get('name')}: mounts undeclared volume {m.get('name')!r}")


def check_daskjob(doc: dict) -> list[str]:
    """Problems with a geoseg DaskJob manifest (empty = fine): the CRD's shape plus geoseg's needs."""
    p: list[str] = []
    if doc.get("apiVersion") != "kubernetes.dask.org/v1" or doc.get("kind") != "DaskJob":
        p.append("apiVersion/kind must be kubernetes.dask.org/v1 / DaskJob")
    name = doc.get("metadata", {}).get("name")
    if not name:
        p.append("metadata.name is required")
    spec = doc.get("spec", {})
    for key in ("job", "cluster"):
        if key not in spec:
            p.append(f"spec.{key} is required")
    if p:
        return p
    job = spec["job"].get("spec", {})
    cluster = spec["cluster"].get("spec", {})
    worker, scheduler = cluster.get("worker", {}), cluster.get("scheduler", {})
    _check_pod(job, "job", p)
    _check_pod(worker.get("spec"), "worker", p)
    _check_pod(scheduler.get("spec"), "scheduler", p)
    if not isinstance(worker.get("replicas"), int) or worker["replicas"] < 1:
        p.append("cluster.worker.replicas must be an integer >= 1")
    if p:
        return p
    args = job["containers"][0].get("args", [])
    if args[:2] != ["geoseg", "segment"] or "--scheduler" not in args:
        p.append("job: runs `geoseg segment ... --scheduler $(DASK_SCHEDULER_ADDRESS)`")
    elif args[args.index("--scheduler") + 1] != "$(DASK_SCHEDULER_ADDRESS)":
        p.append("job: --scheduler must be $(DASK_SCHEDULER_ADDRESS) (injected by the operator)")
    for c in worker["spec"]["containers"]:
        env, wargs = _env(c), c.get("args", [])
        if env.get("HF_HUB_OFFLINE") != "1" or not env.get("HF_HOME"):
            p.append("worker: set HF_HOME (pre-staged cache) and HF_HUB_OFFLINE='1'")
        gpu = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        declared = "--resources" in wargs and wargs[wargs.index("--resources") + 1] == f"GPU={gpu}"
        if gpu and not declared:
            p.append(f"worker: a pod with nvidia.com/gpu: {gpu} must declare `--resources GPU={gpu}`")
        if "$(DASK_WORKER_NAME)" not in wargs:
            p.append("worker: pass --name $(DASK_WORKER_NAME)")
    ports = {pt.get("port") for pt in scheduler.get("service", {}).get("ports", [])}
    if 8786 not in ports:
        p.append("scheduler.service must expose port 8786 (tcp-comm)")
    if scheduler.get("service", {}).get("selector", {}).get("dask.org/cluster-name") != name:
        p.append(f"scheduler.service.selector dask.org/cluster-name must equal metadata.name ({name})")
    return p


def cluster_spec(doc: dict) -> dict:
    """The DaskJob's cluster as a standalone DaskCluster resource (for KubeCluster)."""
    return {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskCluster",
            "metadata": {"name": doc["metadata"]["name"]}, "spec": doc["spec"]["cluster"]["spec"]}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--check"]:
        problems = check_daskjob(load()[0])
        print("\n".join(problems) or f"{DASKJOB.name}: ok")
        return 1 if problems else 0

    sys.path.insert(0, str(HERE))
    import _common
    import yaml

    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=None, help="worker pods [default: the YAML's replicas]")
    args = p.parse_args(argv)
    doc = load()[0]
    problems = check_daskjob(doc)
    if problems:
        raise SystemExit("daskjob.yaml: " + "; ".join(problems))
    spec = cluster_spec(doc)
    if args.workers:
        spec["spec"]["worker"]["replicas"] = args.workers
    workers = spec["spec"]["worker"]["replicas"]
    cfg = _common.config(args, max_in_flight=2 * workers)
    if args.dry_run:
        print(yaml.safe_dump(spec, sort_keys=False))
        print(_common.plan(cfg))
        return 0

    from dask_kubernetes.operator import KubeCluster
    from distributed import Client

    with KubeCluster(custom_cluster_spec=spec) as cluster, Client(cluster) as client:
        return _common.run(cfg, client)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
