"""The CLI end to end: the README quickstart offline from a seeded HF cache, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import main

from .tiny_model import seed_hf_cache

ROOT = Path(__file__).resolve().parents[1]
GEOSEG = str(Path(sys.executable).parent / "geoseg")


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```sh\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def geoseg_cli(cmd: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def offline_env(hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def quickstart_cmd() -> str:
    first, second = quickstart_commands()
    assert "pytest" in second
    # the main job is the last step of the first command; setup steps before it need the network
    main_job = first.split("&&")[-1].strip()
    assert main_job.startswith(".venv/bin/geoseg segment sample_tiles/")
    return main_job.replace(".venv/bin/geoseg", shlex.quote(GEOSEG), 1)


def test_readme_quickstart_runs_offline_from_seeded_cache(tmp_path, tiny_model_dir, quickstart_cmd):
    rev = seed_hf_cache(tmp_path / "hf", "CIDAS/clipseg-rd64-refined", tiny_model_dir)
    work = tmp_path / "work"
    work.mkdir()
    (work / "sample_tiles").symlink_to(ROOT / "sample_tiles")
    proc = geoseg_cli(quickstart_cmd, offline_env(tmp_path / "hf"), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "town_out"
    src_path = ROOT / "sample_tiles" / "town_rgb_utm.tif"
    with rasterio.open(out / "probabilities.tif") as probs, rasterio.open(src_path) as src:
        assert probs.crs == src.crs and probs.transform == src.transform
        assert (probs.width, probs.height) == (src.width, src.height)
        assert probs.descriptions == ("building", "swimming pool")
        data = probs.read()
        assert np.isfinite(data).all() and 0 <= data.min() and data.max() <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"] == "CIDAS/clipseg-rd64-refined" and manifest["model_revision"] == rev
    assert (out / "polygons.gpkg").stat().st_size > 0
    assert "chunk" in proc.stderr  # the progress bar


def test_without_cache_or_network_one_clear_line(tmp_path, quickstart_cmd):
    work = tmp_path / "work"
    work.mkdir()
    (work / "sample_tiles").symlink_to(ROOT / "sample_tiles")
    proc = geoseg_cli(quickstart_cmd + " -q", offline_env(tmp_path / "empty-hf"), work)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("geoseg: error: cannot load model 'CIDAS/clipseg-rd64-refined'")
    assert "huggingface-cli download CIDAS/clipseg-rd64-refined" in last
    out = work / "town_out"
    assert not (out / "probabilities.tif").exists() and not (out / "polygons.gpkg").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


def test_local_model_dir_and_bad_inputs(tmp_path, tiny_model_dir):
    src = ROOT / "sample_tiles" / "town_rgbn_uint16.tif"
    out = tmp_path / "out"
    proc = subprocess.run([GEOSEG, "segment", str(src), "-p", "pool", "-o", str(out), "--model",
                           str(tiny_model_dir), "--workers", "1", "-q", "--threshold", "0.6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["vector"]["threshold"] == [0.6]
    assert manifest["raster"]["bands"] == [1, 2, 3]


@pytest.mark.parametrize("content, message", [
    (b"", "cannot open as a raster"),
    (b"this is not a raster\n", "cannot open as a raster"),
])
def test_unreadable_input_is_one_line(tmp_path, content, message):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    result = CliRunner().invoke(main, ["segment", str(bad), "-p", "x", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"geoseg: error: {bad}: {message}")
    assert not (tmp_path / "o").exists()


def test_help_explains_every_option_with_defaults():
    result = CliRunner().invoke(main, ["segment", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for opt in ("--prompt", "--output", "--model", "--revision", "--device", "--batch-size", "--bands", "--crs",
                "--resolution", "--tile-size", "--stride", "--chunk-size", "--workers", "--scheduler",
                "--overwrite", "--threshold", "--min-area", "--simplify", "--fill-holes", "--dst-crs", "--format",
                "--dtype", "--compile"):
        assert opt in text
    for default in ("default: CIDAS/clipseg-rd64-refined", "default: 352", "default: 264", "default: 4096",
                    "8 elsewhere", "default: float32", "default: auto", "default: 0.5"):
        assert default in text, default
