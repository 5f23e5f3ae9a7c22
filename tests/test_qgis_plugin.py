"""The QGIS Processing plugin (qgis_plugin/geoseg_processing) in a real QGIS 3.22.

The installable zip is built, extracted, and loaded into Debian's QGIS (``/usr/bin/python3``,
``QT_QPA_PLATFORM=offscreen``) by ``tests/qgis_plugin_check.py``, which runs ``geoseg:segment``
with the tiny offline CLIPSeg on the sample tile -- cancelled after the first chunk, resumed
(through ``qgis_process`` when Debian's ``qgis`` package is installed), loaded into the project --
renders the loaded layers with QGIS' map renderer and reports as JSON. The assertions are here,
against the run's own files read with rasterio/geopandas. Skipped only when the system Python
cannot import ``qgis.core`` (install with ``.ci/install_qgis.sh``).

The runner (subprocess, events, errors, cancel) and the zip are also tested without QGIS below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "qgis_plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_zip  # noqa: E402
from geoseg_processing import runner  # noqa: E402
from qgis_check import QGIS_PYTHON, _qgis_env, qgis_available  # noqa: E402

RASTER = ROOT / "sample_tiles" / "town_rgb_utm.tif"
PROMPTS = ["building", "water"]
THRESHOLD = 0.5
VECTORIZE_THRESHOLD = 0.6
MIN_AREA = 20.0  # m²: 80 pixels of 0.5 m, so polygons have interiors to sample colours in
GEOSEG = Path(sys.executable).parent / "geoseg"


def _qgis_process() -> str | None:
    # Debian's /usr/bin/qgis_process wrapper passes --noversioncheck, which 3.22's binary rejects
    # ("Command --noversioncheck not known!"); the binary beside it works.
    for name in ("/usr/bin/qgis_process.bin", "qgis_process"):
        found = shutil.which(name)
        if found:
            return found
    return None


_QGIS, _WHY = qgis_available()
needs_qgis = pytest.mark.skipif(not _QGIS, reason=f"QGIS not available: {_WHY}")


# -- without QGIS: zip, arguments, the runner against a fake geoseg --------------------------------

def test_zip_is_installable(tmp_path):
    z = build_zip.build_zip(tmp_path)
    assert z.name == f"geoseg_processing-{build_zip.plugin_version()}.zip"
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        meta = zf.read("geoseg_processing/metadata.txt").decode()
    assert {n.split("/")[0] for n in names} == {"geoseg_processing"}  # one top-level folder
    for required in ("__init__.py", "metadata.txt", "icon.svg", "provider.py", "algorithms.py", "runner.py"):
        assert f"geoseg_processing/{required}" in names
    assert not any("__pycache__" in n for n in names)
    for line in ("qgisMinimumVersion=3.22", "hasProcessingProvider=yes", "icon=icon.svg"):
        assert line in meta.splitlines()
    for key in ("about=", "tracker=", "repository=", "version=", "name="):
        assert any(x.startswith(key) and len(x) > len(key) for x in meta.splitlines()), key
    assert build_zip.build_zip(tmp_path / "again").read_bytes() == z.read_bytes()  # reproducible


def test_plugin_makes_no_network_access_at_load():
    """Nothing in the plugin imports a network module (it only starts a local process)."""
    banned = ("urllib", "requests", "http.client", "socket", "QNetwork", "QgsNetworkAccessManager")
    for path in (ROOT / "qgis_plugin" / "geoseg_processing").glob("*.py"):
        text = path.read_text()
        for word in banned:
            assert word not in text, f"{path.name} mentions {word}"


def test_segment_args_are_deterministic_and_complete():
    a = runner.segment_args("in.tif", [" building ", "", "water\r"], "/out", model="m", threshold=0.4,
                            resolution=0, chunk_size=1024, workers=2, scheduler="", min_area=5.0, device="cpu")
    assert a == ["segment", "in.tif", "--prompt", "building", "--prompt", "water", "--output", "/out",
                 "--model", "m", "--threshold", "0.4", "--chunk-size", "1024", "--workers", "2",
                 "--min-area", "5.0", "--device", "cpu"]
    b = runner.segment_args("in.tif", ["building"], "/out", scheduler="tcp://h:8786", workers=3, resolution=2.5)
    assert "--workers" not in b and b[b.index("--scheduler") + 1] == "tcp://h:8786"
    assert b[b.index("--resolution") + 1] == "2.5"
    with pytest.raises(runner.GeosegRunError, match="no prompt"):
        runner.segment_args("in.tif", ["  ", ""], "/out")


def test_segment_args_exemplars():
    """A class field names each polygon's prompt; without one all polygons are the first prompt's."""
    base = ["segment", "in.tif", "--prompt", "roof", "--prompt", "tree", "--output", "/out"]
    a = runner.segment_args("in.tif", ["roof", "tree"], "/out", exemplars="/t/ex.gpkg", class_field="cls",
                            exemplar_weight=0.7)
    assert a == base + ["--exemplars", "/t/ex.gpkg", "--class-field", "cls", "--exemplar-weight", "0.7"]
    b = runner.segment_args("in.tif", [" roof ", "tree"], "/out", exemplars="/t/ex.gpkg", class_field=None,
                            exemplar_weight=0.0)
    assert b == base + ["--exemplar", "roof=/t/ex.gpkg", "--exemplar-weight", "0.0"]
    # no exemplar layer: the weight and field mean nothing and are not passed
    assert runner.segment_args("in.tif", ["roof", "tree"], "/out", class_field="cls", exemplar_weight=0.7) == base


def test_child_env_drops_qgis_python_and_adds_extra():
    env = runner.child_env(runner.parse_env("A=1; B = x=y\nC=3"), base={"PYTHONHOME": "/q", "PYTHONPATH": "/q",
                                                                         "PATH": "/bin"})
    assert env["A"] == "1" and env["B"] == "x=y" and env["C"] == "3" and env["PATH"] == "/bin"
    assert "PYTHONHOME" not in env and "PYTHONPATH" not in env
    assert runner.child_env({"PYTHONPATH": "/src"}, base={})["PYTHONPATH"] == "/src"  # tests pass it through
    with pytest.raises(runner.GeosegRunError, match="NAME=value"):
        runner.parse_env("novalue")


def test_missing_executable_names_the_setting(tmp_path):
    for value, where in (("geoseg-not-installed-here", "on PATH"), (str(tmp_path / "nope" / "geoseg"), "not found")):
        with pytest.raises(runner.GeosegRunError) as exc:
            runner.resolve_executable(value)
        msg = str(exc.value)
        assert where in msg and "Providers > geoseg" in msg and "\n" not in msg
    assert runner.resolve_executable(str(GEOSEG)) == str(GEOSEG)


def _fake_geoseg(tmp_path: Path, body: str) -> str:
    """An executable script standing in for geoseg (written with this Python; any program would do)."""
    path = tmp_path / "fake-geoseg"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_runner_streams_events_and_returns_result(tmp_path):
    exe = _fake_geoseg(tmp_path, """
assert sys.argv[1:3] == ["--progress", "jsonl"], sys.argv
for i in range(3):
    print(json.dumps({"event": "progress", "done": i, "total": 2}), flush=True)
print(json.dumps({"event": "progress", "done": 0, "total": 0, "unit": "chunk"}), flush=True)
for n in (0, 40, 100):
    print(json.dumps({"event": "progress", "stage": "probabilities COG", "done": n, "total": 100, "unit": "%"}),
          flush=True)
for n in (0, 65536, 100000):
    print(json.dumps({"event": "progress", "stage": "spatial index", "done": n, "total": 100000, "unit": "row"}),
          flush=True)
print(json.dumps({"event": "log", "level": "WARNING", "message": "careful"}), flush=True)
print("not json", flush=True)
print("some library noise", file=sys.stderr, flush=True)
print(json.dumps({"event": "result", "features": 7, "argv": sys.argv[3:]}), flush=True)
""")
    seen: dict = {"progress": [], "log": [], "out": [], "start": []}
    res = runner.run_geoseg(exe, ["segment", "x"], on_progress=lambda p, t: seen["progress"].append((p, t)),
                            on_log=lambda lv, m: seen["log"].append((lv, m)), on_output=seen["out"].append,
                            on_start=lambda pid, cmd: seen["start"].append(cmd))
    assert res["features"] == 7 and res["argv"] == ["segment", "x"]
    # chunks fill 0..90 %, the COG to 95 %, the spatial index (rows) the rest: never backwards
    assert seen["progress"] == [
        (0.0, "geoseg: chunk 0 of 2"), (45.0, "geoseg: chunk 1 of 2"), (90.0, "geoseg: chunk 2 of 2"),
        (90.0, "geoseg: probabilities COG, 0 %"), (92.0, "geoseg: probabilities COG, 40 %"),
        (95.0, "geoseg: probabilities COG, 100 %"),
        (95.0, "geoseg: spatial index, 0 of 100,000 rows"),
        (95.0 + 5.0 * 0.65536, "geoseg: spatial index, 65,536 of 100,000 rows"),
        (100.0, "geoseg: spatial index, 100,000 of 100,000 rows")]
    assert seen["log"] == [("WARNING", "careful")]
    assert sorted(seen["out"]) == ["not json", "some library noise"]
    assert seen["start"][0].endswith("--progress jsonl segment x")


def test_runner_error_is_geosegs_one_line(tmp_path):
    exe = _fake_geoseg(tmp_path, """
print("Traceback noise", file=sys.stderr)
print("geoseg: error: in.tif: not a raster GDAL can open", file=sys.stderr)
sys.exit(1)
""")
    shown = []
    with pytest.raises(runner.GeosegRunError) as exc:
        runner.run_geoseg(exe, ["segment"], on_output=shown.append)
    assert str(exc.value) == "in.tif: not a raster GDAL can open"
    assert shown == ["Traceback noise"], "the error line is raised, not also logged"
    exe2 = _fake_geoseg(tmp_path, 'print(json.dumps({"event": "error", "message": "from the event"})); sys.exit(1)')
    with pytest.raises(runner.GeosegRunError, match="^from the event$"):
        runner.run_geoseg(exe2, [])
    exe3 = _fake_geoseg(tmp_path, "sys.exit(0)")
    with pytest.raises(runner.GeosegRunError, match="no result"):
        runner.run_geoseg(exe3, [])


def test_text_result_for_commands_without_result_event(tmp_path):
    exe = _fake_geoseg(tmp_path,
                       'print("IoU 0.5"); print(json.dumps({"event": "log", "message": "m"})); print("F1 0.6")')
    assert runner.run_geoseg(exe, [], text_result=True)["text"] == "IoU 0.5\nF1 0.6"
    with pytest.raises(runner.GeosegRunError, match="no result"):
        runner.run_geoseg(exe, [])


def test_evaluate_and_train_args():
    assert runner.evaluate_args("/run", "/t.gpkg", class_field="cls", prompt="", output="/o", overwrite=True) == [
        "evaluate", "/run", "--truth", "/t.gpkg", "--class-field", "cls", "--output", "/o", "--overwrite"]
    assert runner.train_args("r.tif", "l.gpkg", "/m", prompts=["roof", " "], steps=5, resolution=0) == [
        "train", "r.tif", "--labels", "l.gpkg", "--output", "/m", "--prompt", "roof", "--steps", "5"]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_runner_cancel_kills_the_process_tree(tmp_path):
    """A child that ignores SIGTERM and has a grandchild (like a Dask worker) is gone within the grace."""
    pidfile = tmp_path / "grandchild.pid"
    exe = _fake_geoseg(tmp_path, f"""
import signal, subprocess
signal.signal(signal.SIGTERM, signal.SIG_IGN)
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(pidfile)!r}, "w").write(str(p.pid))
print(json.dumps({{"event": "progress", "done": 0, "total": 9}}), flush=True)
time.sleep(600)
""")
    state = {"pid": None, "at": None}

    def cancel_after_start():
        if state["at"] is None and pidfile.exists() and pidfile.read_text():
            state["at"] = time.monotonic()
        return state["at"] is not None

    with pytest.raises(runner.GeosegCancelled):
        runner.run_geoseg(exe, [], on_start=lambda pid, cmd: state.update(pid=pid), is_canceled=cancel_after_start)
    took = time.monotonic() - state["at"]
    assert took < runner.KILL_GRACE_S + 2.0  # grace for SIGTERM, then SIGKILL; 2 s of scheduling slack
    assert not _alive(state["pid"])
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously to the rest of the group
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = _alive(grandchild)
    if survived:
        os.kill(grandchild, 9)  # do not leave it behind when the test fails
    assert not survived


# -- the CLI's JSON-lines mode (what the plugin reads) ------------------------------------------------

def test_cli_jsonl_error_event(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(GEOSEG), "--progress", "jsonl", "vectorize", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events == [{"event": "error", "message": f"{tmp_path / 'nope'}: no such run directory"}]
    assert proc.stderr.strip().splitlines()[-1] == f"geoseg: error: {tmp_path / 'nope'}: no such run directory"


# -- in real QGIS ---------------------------------------------------------------------------------------

#: Stands in for ``geoseg evaluate`` / ``geoseg train`` (built on other branches): records its
#: arguments and the vector file it was given, prints plain text as those commands do.
FAKE_RECORDER = """
import pyogrio
args = sys.argv[1:]
vec = args[args.index("--truth" if "--truth" in args else "--labels") + 1]
out = args[args.index("--output") + 1]
os.makedirs(out, exist_ok=True)
info = {"argv": args, "features": int(pyogrio.read_info(vec)["features"]),
        "layers": [str(x[0]) for x in pyogrio.list_layers(vec)]}
json.dump(info, open(os.path.join(out, "fake_call.json"), "w"))
print(f"read {info['features']} polygons")
"""


#: Exemplar polygons (name, prompt, lower-left corner in the raster's EPSG:32633; 20 m squares inside
#: town_rgb_utm.tif, whose pixels are all valid) and the ones selected in QGIS.
EXEMPLARS = [("ex1", "building", 601020, 5340020), ("ex2", "building", 601120, 5340120),
             ("ex3", "water", 601220, 5340020), ("ex4", "water", 601060, 5340180),
             ("ex5", "building", 601250, 5340200)]
EXEMPLARS_SELECTED = ["ex2", "ex3", "ex5"]


def _exemplar_layer(path: Path) -> str:
    import geopandas as gpd
    from shapely.geometry import box

    gpd.GeoDataFrame({"name": [e[0] for e in EXEMPLARS], "prompt": [e[1] for e in EXEMPLARS]},
                     geometry=[box(x, y, x + 20, y + 20) for _, _, x, y in EXEMPLARS],
                     crs="EPSG:32633").to_file(path, layer="examples")
    return str(path)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> dict:
    work = tmp_path_factory.mktemp("qgis-plugin")
    z = build_zip.build_zip(work / "dist")
    plugins = work / "plugins"
    # a copy: QGIS writes statistics (.aux.xml) beside a raster it draws, never into the checkout
    raster = Path(shutil.copy(RASTER, work / RASTER.name))
    with zipfile.ZipFile(z) as zf:  # what "Install from ZIP" does: extract into the profile's plugins
        zf.extractall(plugins)
    cfg = {
        "work": str(work), "plugins_dir": str(plugins), "geoseg": str(GEOSEG),
        # the venv's geoseg may be an editable install of another checkout: run this one
        "extra_env": f"PYTHONPATH={ROOT}; HF_HUB_OFFLINE=1",
        "raster": str(raster), "model": str(tiny_model_dir), "prompts": PROMPTS, "threshold": THRESHOLD,
        "vectorize_threshold": VECTORIZE_THRESHOLD, "chunk_size": 352, "min_area": MIN_AREA,
        "qgis_process": _qgis_process(), "qgis_process_home": str(work / "home"),
    }
    cfg["fake_geoseg"] = _fake_geoseg(work, FAKE_RECORDER)
    cfg["exemplars"], cfg["exemplars_selected"] = _exemplar_layer(work / "examples.gpkg"), EXEMPLARS_SELECTED
    (work / "config.json").write_text(json.dumps(cfg))
    rt = work / "xdg"
    rt.mkdir(mode=0o700)
    env = _qgis_env(str(rt))
    env["HOME"] = str(work / "home")  # a fresh QGIS profile and QSettings: the user's are never touched
    (work / "home").mkdir()
    check_script = str(Path(__file__).with_name("qgis_plugin_check.py"))
    proc = subprocess.run([QGIS_PYTHON, check_script, str(work / "config.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no report (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(lines[-1])
    (work / "report.json").write_text(lines[-1])  # for a person reading a failure
    assert "fatal" not in rep, rep["fatal"]
    rep["_cfg"] = cfg
    rep["_run_dir"] = work / "run"
    return rep


def _error(step: dict) -> str:
    """The message the algorithm failed with (what the Processing log shows)."""
    assert "exception" in step, step.get("results")
    prefix = "QgsProcessingException: "
    assert step["exception"].startswith(prefix)
    return step["exception"][len(prefix):]


def _step(report, name):
    assert name not in report["steps_failed"], report[name].get("traceback")
    return report[name]


@needs_qgis
def test_provider_registered(report):
    s = _step(report, "setup")
    assert s["module_file"].startswith(report["_cfg"]["plugins_dir"])  # the extracted zip, not the source tree
    assert s["algorithms"] == ["geoseg:evaluate", "geoseg:segment", "geoseg:segment_exemplars", "geoseg:train",
                               "geoseg:vectorize"]
    assert s["display_names"]["geoseg:segment"] == "Segment raster by text prompts"
    assert s["display_names"]["geoseg:vectorize"] == "Re-vectorize a run at a new threshold"
    assert s["icon_null"] is False
    assert {"INPUT", "PROMPTS", "MODEL", "THRESHOLD", "RESOLUTION", "CHUNK_SIZE", "WORKERS", "SCHEDULER",
            "OUTPUT"} <= set(s["segment_params"])
    assert {"PROBABILITIES", "POLYGONS", "OUTPUT"} <= set(s["segment_outputs"])
    assert s["settings"]["GEOSEG_EXECUTABLE"] == "geoseg"  # the default: geoseg on PATH


@needs_qgis
def test_missing_executable_message(report):
    m = _step(report, "missing")
    for label, needle in (("path", "'/nonexistent/bin/geoseg' not found:"),
                          ("name", "'geoseg-not-installed-here' not found on PATH")):
        first = _error(m[label])
        assert needle in first and "Processing > Options > Providers > geoseg" in first
        assert "\n" not in first.strip()


@needs_qgis
def test_cancel_stops_geoseg_and_its_workers(report):
    c = _step(report, "cancel")
    assert "cancelled" in _error(c) and "resume" in _error(c)
    group = c["group_at_cancel"]
    assert c["pid"] in [p["pid"] for p in group]
    assert len(group) >= 2, group  # geoseg plus at least its Dask worker process
    assert c["return_after_cancel_s"] < runner.KILL_GRACE_S + 3.0  # SIGTERM grace + polling slack
    assert c["group_gone_after_s"] is not None and c["group_gone_after_s"] < runner.KILL_GRACE_S + 3.0
    assert c["manifest_status"] != "complete"
    assert len(c["parts"]) >= 1  # the finished chunk stays for the re-run
    # progress streamed from geoseg's chunk events: the first chunk of 2 is 90 % / 2
    assert next(p for p in c["progress"] if p > 0) == pytest.approx(45.0)


@needs_qgis
def test_rerun_resumes(report):
    r = _step(report, "resume")
    if report["_cfg"]["qgis_process"]:
        assert r["via"] == "qgis_process"
        assert r["returncode"] == 0, r.get("stderr_tail")
        assert r["algorithm"] == "geoseg:segment"
    res = r["results"]
    assert res["CHUNKS_RESUMED"] >= 1  # the chunk finished before Cancel was not computed again
    assert res["CHUNKS_RUN"] + res["CHUNKS_RESUMED"] == 2
    assert Path(res["PROBABILITIES"]).exists()


@needs_qgis
@pytest.mark.skipif(_qgis_process() is None, reason="qgis_process not installed (Debian package 'qgis')")
def test_qgis_process_runs_segment(report):
    r = _step(report, "resume")
    assert r["via"] == "qgis_process" and r["returncode"] == 0, r.get("stderr_tail")
    assert int(r["results"]["FEATURES"]) > 0


def _gdf(report):
    import geopandas as gpd

    # the segment run's polygons, copied before vectorize replaced them in the run folder
    return gpd.read_file(Path(report["_cfg"]["work"]) / "segment_polygons.gpkg", layer="segments")


@needs_qgis
def test_outputs_load_styled(report):
    import rasterio

    from geoseg.export import prompt_colors

    s = _step(report, "loaded")
    assert "exception" not in s, s["errors"]
    res = s["results"]
    assert res["CHUNKS_RUN"] == 0 and res["CHUNKS_RESUMED"] == 2
    gdf = _gdf(report)
    assert res["FEATURES"] == len(gdf) > 0
    assert Path(res["PROBABILITIES"]) == report["_run_dir"] / "probabilities.tif"
    layers = {lyr["kind"]: lyr for lyr in s["layers"]}
    assert len(s["layers"]) == 2
    vec, ras = layers["vector"], layers["raster"]
    with rasterio.open(res["PROBABILITIES"]) as src:
        crs = f"EPSG:{src.crs.to_epsg()}"
        assert (ras["width"], ras["height"], ras["bands"]) == (src.width, src.height, len(PROMPTS))
    assert gdf.crs.to_epsg() == 32633 and vec["crs"] == ras["crs"] == crs == "EPSG:32633"
    assert vec["valid"] and ras["valid"]
    assert vec["features"] == len(gdf)
    # polygons: the GeoPackage's default style, categorised by prompt, one category per prompt
    assert vec["renderer"] == "categorizedSymbol" and vec["attribute"] == "prompt"
    assert [c["value"] for c in vec["categories"]] == PROMPTS
    assert [c["fill"][:3] for c in vec["categories"]] == [list(c) for c in prompt_colors(len(PROMPTS))]
    # probabilities: pseudocolour 0..1, transparent below the threshold
    assert ras["renderer"] == "singlebandpseudocolor" and ras["band"] == 1
    assert ras["classification"] == [0.0, 1.0]
    assert [v for v, _ in ras["ramp"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    (lo, hi, pct), = ras["transparent"]
    assert lo == 0.0 and pct == 100.0
    assert hi == float(np.nextafter(np.float32(THRESHOLD), np.float32(0)))  # exact: largest float32 < 0.5


def _ramp(values: np.ndarray, ramp: list) -> np.ndarray:
    stops = np.array([v for v, _ in ramp])
    rgb = np.array([c[:3] for _, c in ramp], dtype=float)
    return np.stack([np.interp(values, stops, rgb[:, i]) for i in range(3)], axis=-1)


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _uniform(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood is all inside ``mask`` (away from any edge)."""
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, np.ones((2 * r + 1, 2 * r + 1), bool), border_value=0)


@needs_qgis
def test_render_probabilities_ramp_and_transparency(report):
    import rasterio

    r = _step(report, "render")["probabilities"]
    assert r["saved"] and not r["errors"]
    img = _png(r["path"])
    ramp = next(lyr for lyr in report["loaded"]["layers"] if lyr["kind"] == "raster")["ramp"]
    with rasterio.open(report["_run_dir"] / "probabilities.tif") as src:
        p = src.read(1)
    assert img.shape[:2] == p.shape  # one image pixel per raster pixel
    above = p >= np.float32(THRESHOLD)  # geoseg's own rule, in float32
    assert 1000 < above.sum() < above.size - 1000
    # below the threshold: transparent, so the white background shows, exactly
    assert (img[~above] == 255).all()
    # at or above: the ramp colour of the pixel's value. 2 levels: QGIS interpolates and stores 8-bit
    # channels, so each channel may round differently from this float interpolation.
    diff = np.abs(img[above] - _ramp(p[above], ramp)).max(axis=1)
    assert diff.max() <= 2, (diff.max(), np.percentile(diff, 99))
    assert np.ptp(img[above], axis=0).max() > 60  # the ramp really spans colours


@needs_qgis
def test_render_polygons_categorised_colours(report):
    import rasterio
    from rasterio.features import rasterize

    r = _step(report, "render")["polygons"]
    assert r["saved"] and not r["errors"]
    img = _png(r["path"])
    cats = next(lyr for lyr in report["loaded"]["layers"] if lyr["kind"] == "vector")["categories"]
    gdf = _gdf(report)
    with rasterio.open(RASTER) as src:  # the image is the raster's grid at 4 image pixels per raster pixel
        shape, transform = (4 * src.height, 4 * src.width), src.transform @ Affine.scale(0.25)
    assert img.shape[:2] == shape
    masks = [rasterize(gdf.geometry[gdf["prompt"] == prompt], out_shape=shape, transform=transform,
                       fill=0, default_value=1, dtype="uint8").astype(bool) if (gdf["prompt"] == prompt).any()
             else np.zeros(shape, bool) for prompt in PROMPTS]
    # 2 px away from any polygon edge: outlines are ~1 px wide and antialiased
    white = _uniform(~np.logical_or.reduce(masks), 2)
    assert white.sum() > 10_000 and (img[white] == 255).all()
    checked = 0
    for i, cat in enumerate(cats):
        # inside this prompt's polygons and away from the other prompt's, whose translucent fill
        # would be composed over this one where they overlap
        others = np.logical_or.reduce([m for j, m in enumerate(masks) if j != i])
        inner = _uniform(masks[i], 2) & _uniform(~others, 2)
        if not inner.any():
            continue
        fill, alpha = np.array(cat["fill"][:3]), cat["fill"][3] / 255 * cat["opacity"]
        expected = alpha * fill + (1 - alpha) * 255  # the translucent fill over the white background
        # 2 levels: Qt composes in premultiplied 8-bit ARGB, rounding each channel once or twice
        assert np.abs(img[inner] - expected).max() <= 2, (cat, img[inner][:3], expected)
        checked += int(inner.sum())
    assert checked > 5000


@needs_qgis
def test_screenshot_shows_all_three_layers(report):
    r = _step(report, "render")["screenshot"]
    assert r["saved"] and not r["errors"]
    img = _png(r["path"])
    assert img.shape[:2] == (240, 320)  # half the raster grid: small enough for the README
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000  # the photo, the ramp and the fills
    probs = _png(_step(report, "render")["probabilities"]["path"])
    white = (img == 255).all(axis=2).mean()
    # alone, the probabilities leave the background white below the threshold (a big share); here the
    # input image shows through there
    assert (probs == 255).all(axis=2).mean() > 0.2 and white < 0.02, white


@needs_qgis
def test_geoseg_error_is_one_line(report):
    first = _error(_step(report, "geoseg_error"))
    assert "\n" not in first.strip() and "Traceback" not in first
    assert "different" in first or "overwrite" in first.lower(), first  # geoseg's own refusal, verbatim


@needs_qgis
def test_vectorize_at_new_threshold(report):
    v = _step(report, "vectorize")
    assert "exception" not in v, v["errors"]
    import geopandas as gpd

    gdf = gpd.read_file(report["_run_dir"] / "polygons.gpkg", layer="segments")  # rewritten by vectorize
    assert v["results"]["FEATURES"] == len(gdf)
    assert 0 < len(gdf) < len(_gdf(report))  # a higher threshold: fewer pixels, fewer polygons of 20 m²
    assert set(gdf["threshold"].round(6)) == {VECTORIZE_THRESHOLD}
    (lyr,) = v["layers"]  # the project's polygon layer, re-read: not a stale copy beside a new one
    assert lyr["valid"] and lyr["features"] == len(gdf) and lyr["renderer"] == "categorizedSymbol"


@needs_qgis
def test_evaluate_and_train_call_the_cli(report):
    t = _step(report, "thin")
    ev, tr = t["evaluate"], t["train"]
    assert "exception" not in ev and "exception" not in tr, (ev.get("exception"), tr.get("exception"))
    work = Path(report["_cfg"]["work"])
    call = json.loads((work / "evaluation" / "fake_call.json").read_text())
    a = call["argv"]
    assert a[:5] == ["--progress", "jsonl", "evaluate", str(report["_run_dir"]), "--truth"]
    assert a[6:] == ["--class-field", "prompt", "--output", str(work / "evaluation"), "--overwrite"]
    assert call["features"] == 5 and len(call["layers"]) == 1  # only the selection, as one plain layer
    assert ev["results"]["REPORT"] == "read 5 polygons"  # the command's text output
    call = json.loads((work / "trained" / "fake_call.json").read_text())
    a = call["argv"]
    assert a[:3] == ["--progress", "jsonl", "train"] and a[3] == report["_cfg"]["raster"] and a[4] == "--labels"
    assert a[6:] == ["--output", str(work / "trained"), "--class-field", "prompt", "--model",
                     "CIDAS/clipseg-rd64-refined", "--steps", "3", "--device", "auto"]
    assert call["features"] == t["labels_total"] > 5  # the whole layer: nothing selected-only here
    assert tr["results"]["MODEL_DIR"] == str(work / "trained")


@needs_qgis
def test_segment_exemplars_uses_only_the_selected_features(report):
    """The run's manifest names exactly the selected polygons, each under its class field's prompt."""
    e = _step(report, "exemplars")
    assert "exception" not in e, e.get("exception")
    assert e["layer_total"] == len(EXEMPLARS) and e["selected"] == len(EXEMPLARS_SELECTED)
    assert {p: sorted(n) for p, n in e["exemplar_names"].items()} == {"building": ["ex2", "ex5"],
                                                                      "water": ["ex3"]}
    assert e["manifest_prompting"]["exemplar_weight"] == 0.7
    assert e["results"]["FEATURES"] >= 0 and Path(e["results"]["PROBABILITIES"]).is_file()


@pytest.mark.parametrize("t", [0.5, 0.7, 0.3, 0.35, 1e-3, 0.999])
def test_transparent_range_ends_just_below_what_geoseg_keeps(t):
    """QGIS hides [0, float32_below(t)]: exactly the float32 values geoseg's `p >= t` (float64 t) drops."""
    top = runner.float32_below(t)
    assert np.float32(top) == top and np.float64(np.float32(top)) < t
    assert np.float64(np.nextafter(np.float32(top), np.float32(2))) >= t
