"""Each file in workflows/ is exercised: a real local run, job scripts and specs built without
submitting, YAML checked against the DaskJob shape and geoseg's needs, dry runs printing the plan."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .rasters import scene, write

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
MODEL_ID = "CIDAS/clipseg-rd64-refined"


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, env=None, timeout=180):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("wf") / "in.tif", scene(700, 800, seed=21))


def test_every_workflow_file_is_covered(tmp_path):
    covered = {"README.md", "_common.py", "local.py", "slurm.py", "slurm_driver.sbatch", "gpu_local.py",
               "kubernetes.py", "kubernetes/daskjob.yaml", "kubernetes/hf-cache.yaml"}
    files = {str(p.relative_to(WORKFLOWS)) for p in WORKFLOWS.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert files == covered, "a new workflow file needs a test here"
    for p in WORKFLOWS.rglob("*.py"):
        py_compile.compile(str(p), doraise=True, cfile=str(tmp_path / (p.name + "c")))
    readme = (WORKFLOWS / "README.md").read_text()
    assert "huggingface-cli download CIDAS/clipseg-rd64-refined" in readme and "HF_HUB_OFFLINE=1" in readme


def test_local_workflow_runs_offline_from_prestaged_hf_cache(tmp_path, tiny_model_dir, small_raster):
    """The real product path: 2 worker processes load the tiny CLIPSeg from a staged HF cache, offline."""
    from .tiny_model import seed_hf_cache

    hf_home = tmp_path / "hf"
    revision = seed_hf_cache(hf_home, MODEL_ID, tiny_model_dir)
    out = tmp_path / "run"
    proc = run_script(WORKFLOWS / "local.py", small_raster, "-p", "red roof", "-o", out, "--workers", "2",
                      "--chunk-size", "400", "--offline", "--hf-home", hf_home,
                      env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Dask dashboard: http" in proc.stderr
    assert "chunks run: 4, resumed: 0" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"] == MODEL_ID
    assert manifest["model_revision"] == revision, "weights came from the staged cache"
    assert len({c["worker"] for c in manifest["chunks"].values()}) == 2
    assert (out / "probabilities.tif").exists() and (out / "polygons.gpkg").exists()


def test_local_workflow_dry_run_starts_nothing(tmp_path, small_raster):
    proc = run_script(WORKFLOWS / "local.py", small_raster, "-p", "tree", "-o", tmp_path / "r", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "800 x 700 px" in proc.stdout and "chunk tasks" in proc.stdout
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("dask_jobqueue")
    return load_module("slurm")


def _seconds(text: str) -> int:
    if ":" in text:
        parts = [int(x) for x in text.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    from dask.utils import parse_timedelta

    return int(parse_timedelta(text))


def test_slurm_job_script_is_gpu_walltime_safe_and_offline(slurm):
    with slurm.make_cluster(scheduler_options={"dashboard_address": ":0"}) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert f"#SBATCH -t {slurm.WALLTIME}" in script
    worker_cmd = next(line for line in script.splitlines() if "dask_worker" in line or "dask worker" in line)
    assert "--resources GPU=1" in worker_cmd
    assert f"--lifetime {slurm.LIFETIME}" in worker_cmd and "--lifetime-stagger" in worker_cmd
    assert "--nthreads" in worker_cmd
    assert "export HF_HUB_OFFLINE=1" in script and f"export HF_HOME={slurm.HF_HOME}" in script
    # a worker retires (stagger included) before SLURM kills its job
    assert _seconds(slurm.LIFETIME) + _seconds(slurm.LIFETIME_STAGGER) < _seconds(slurm.WALLTIME)


def test_slurm_dry_run_and_driver_script(slurm, tmp_path, small_raster):
    proc = run_script(WORKFLOWS / "slurm.py", small_raster, "-p", "tree", "-o", tmp_path / "r", "--dry-run",
                      "--max-jobs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gres=gpu:1" in proc.stdout and "adaptive: 1..3 jobs" in proc.stdout
    assert "chunk tasks" in proc.stdout
    sbatch = WORKFLOWS / "slurm_driver.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
    text = sbatch.read_text()
    assert "workflows/slurm.py" in text and "HF_HUB_OFFLINE=1" in text


def test_gpu_workflow_options_build_a_gpu_resource_cluster(tmp_path, small_raster):
    """dask-cuda needs CUDA, so: the options LocalCUDACluster forwards to LocalCluster build a cluster
    whose worker declares GPU=1, and the dry run prints the plan."""
    from distributed import Client, LocalCluster

    gpu = load_module("gpu_local")
    opts = gpu.cluster_options("0,1", "/shared/hf")
    assert opts["resources"] == {"GPU": 1} and opts["threads_per_worker"] == 4
    assert opts["CUDA_VISIBLE_DEVICES"] == "0,1" and opts["env"]["HF_HUB_OFFLINE"] == "1"
    local = {k: v for k, v in opts.items() if k != "CUDA_VISIBLE_DEVICES"}
    local["dashboard_address"] = ":0"
    with LocalCluster(n_workers=1, processes=True, **local) as cluster, Client(cluster) as client:
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["resources"] == {"GPU": 1}
    proc = run_script(WORKFLOWS / "gpu_local.py", small_raster, "-p", "tree", "-o", tmp_path / "r",
                      "--dry-run", "--hf-home", "/shared/hf")
    assert proc.returncode == 0, proc.stderr
    assert "LocalCUDACluster(" in proc.stdout and "'GPU': 1" in proc.stdout and "chunk tasks" in proc.stdout


@pytest.fixture(scope="module")
def k8s():
    return load_module("kubernetes")


def test_kubernetes_daskjob_is_valid(k8s):
    (doc,) = k8s.load()
    assert k8s.check_daskjob(doc) == []
    worker = doc["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = k8s.cluster_spec(doc)
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == doc["metadata"]["name"]
    assert set(spec["spec"]) == {"worker", "scheduler"}
    assert run_script(WORKFLOWS / "kubernetes.py", "--check").returncode == 0


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["spec"].pop("job"), "spec.job is required"),
    (lambda d: _worker(d)["env"].pop(1), "HF_HUB_OFFLINE"),
    (lambda d: _worker(d)["args"].remove("--resources"), "--resources GPU=1"),
    (lambda d: d["spec"]["job"]["spec"]["containers"][0]["args"].__setitem__(-1, "tcp://x:8786"),
     "DASK_SCHEDULER_ADDRESS"),
    (lambda d: _worker(d)["volumeMounts"].append({"name": "nope", "mountPath": "/x"}), "undeclared volume"),
    (lambda d: d["spec"]["cluster"]["spec"]["worker"].__setitem__("replicas", "4"), "replicas"),
])
def test_kubernetes_check_catches_mistakes(k8s, breakage, message):
    (doc,) = k8s.load()
    broken = copy.deepcopy(doc)
    breakage(broken)
    assert any(message in p for p in k8s.check_daskjob(broken))


def _worker(doc):
    return doc["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]


def test_kubernetes_hf_cache_manifests(k8s):
    docs = k8s.load(k8s.HF_CACHE)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Job"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    (daskjob,) = k8s.load()
    used = {v["persistentVolumeClaim"]["claimName"]
            for pod in (daskjob["spec"]["job"]["spec"], daskjob["spec"]["cluster"]["spec"]["worker"]["spec"])
            for v in pod["volumes"]}
    assert used <= claims
    stage = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert stage["command"] == ["huggingface-cli", "download", MODEL_ID]
    assert {"name": "HF_HOME", "value": "/hf"} in stage["env"]


def test_kubernetes_dry_run_prints_daskcluster(k8s, tmp_path, small_raster):
    proc = run_script(WORKFLOWS / "kubernetes.py", small_raster, "-p", "tree", "-o", tmp_path / "r",
                      "--dry-run", "--workers", "7")
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(proc.stdout.split("\nmodel:")[0])
    assert spec["kind"] == "DaskCluster" and spec["spec"]["worker"]["replicas"] == 7


def test_kubernetes_spec_accepted_by_dask_kubernetes_if_installed(k8s):
    operator = pytest.importorskip("dask_kubernetes.operator")
    (doc,) = k8s.load()
    spec = k8s.cluster_spec(doc)
    reference = operator.make_cluster_spec(name=spec["metadata"]["name"], image="ghcr.io/example/geoseg:latest")
    assert set(reference["spec"]) <= set(spec["spec"])
