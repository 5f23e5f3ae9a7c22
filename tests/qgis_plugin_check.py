"""Drive the geoseg Processing plugin in a real QGIS and report what happened, as one JSON line.

Runs under the *system* Python (``/usr/bin/python3``, Debian's python3-qgis) with
``QT_QPA_PLATFORM=offscreen``; ``tests/test_qgis_plugin.py`` starts it with a JSON config file
and asserts on the report. Nothing is asserted here: this side only acts and records.

Steps, in order (each records its own part of the report, errors included):

1. ``setup``: initialise QGIS and Processing, import the plugin from the folder the zip was
   extracted into, call ``classFactory(None).initProcessing()`` (what QGIS and qgis_process do).
2. ``missing``: the executable setting points nowhere -> the error Processing logs.
3. ``cancel``: ``geoseg:segment`` cancelled once the first chunk is done; which processes of the
   child's process group existed then, and how long until none is left.
4. ``resume``: the same parameters again, through ``qgis_process`` when it exists (a separate
   QGIS process reading the plugin and its settings from a profile), else in this QGIS.
5. ``loaded``: the same parameters through ``processing.runAndLoadResults`` (nothing left to
   compute): the layers Processing put into the project and their styles.
6. ``render``: those layers drawn by ``QgsMapRendererParallelJob`` to PNGs at the raster's own
   pixel grid (1 image pixel = 1 raster pixel), for pixel checks on the pytest side.
7. ``geoseg_error``: a different job into the same folder -> geoseg's one-line refusal.
8. ``vectorize``: ``geoseg:vectorize`` at a higher threshold.
9. ``thin``: ``geoseg:evaluate`` / ``geoseg:train`` through a stand-in executable.
10. ``exemplars``: ``geoseg:segment_exemplars`` with some features of an exemplar layer selected.

Ends with ``os._exit(0)``: QGIS 3.22 may crash in ``exitQgis()`` after the report is out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _group(pgid: int) -> list[dict]:
    """Processes whose process group is ``pgid`` (the geoseg child and everything it started)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp == pgid and state != "Z":
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
                out.append({"pid": int(d.name), "cmd": cmd})
        except (OSError, ValueError, IndexError):
            continue
    return out


def _feedback_class():
    from qgis.core import QgsProcessingFeedback

    class Recorder(QgsProcessingFeedback):
        """Keeps everything the algorithm tells the user; optionally cancels after a condition."""

        def __init__(self, cancel_when=None):
            super().__init__()
            self.log: list[list[str]] = []
            self.progress: list[float] = []
            self.pid: int | None = None
            self.cancel_when = cancel_when
            self.cancelled_at: float | None = None
            self.group_at_cancel: list[dict] = []
            self.progressChanged.connect(self.progress.append)

        def _add(self, kind, text):
            self.log.append([kind, str(text)])

        def pushInfo(self, info):
            m = re.match(r"geoseg started \(pid (\d+)\)", str(info))
            if m:
                self.pid = int(m.group(1))
            self._add("info", info)
            super().pushInfo(info)

        def pushWarning(self, w):
            self._add("warning", w)
            super().pushWarning(w)

        def pushConsoleInfo(self, c):
            self._add("console", c)
            super().pushConsoleInfo(c)

        def pushCommandInfo(self, c):
            self._add("command", c)
            super().pushCommandInfo(c)

        def reportError(self, e, fatalError=False):
            self._add("error", e)
            super().reportError(e, fatalError)

        def isCanceled(self):
            if self.cancel_when and self.cancelled_at is None and self.cancel_when(self):
                if self.pid:
                    self.group_at_cancel = _group(self.pid)
                self.cancelled_at = time.monotonic()
                self.cancel()
            return super().isCanceled()

        def errors(self):
            return [t for k, t in self.log if k == "error"]

    return Recorder


def _run(alg, params, feedback, load=False):
    import processing
    from qgis.core import QgsProcessingContext, QgsProject

    t0 = time.monotonic()
    out = {"params": {k: str(v) for k, v in params.items()}}
    try:
        if load:
            context = QgsProcessingContext()
            context.setProject(QgsProject.instance())
            res = processing.runAndLoadResults(alg, params, feedback=feedback, context=context)
        else:
            res = processing.run(alg, params, feedback=feedback)
        out["results"] = {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in res.items()}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out["exception"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.monotonic() - t0, 2)
    out["log"] = feedback.log
    out["errors"] = feedback.errors()
    out["progress"] = feedback.progress
    return out


def _vector_info(lyr) -> dict:
    from qgis.core import QgsWkbTypes

    info = {"name": lyr.name(), "kind": "vector", "valid": lyr.isValid(), "source": lyr.source(),
            "crs": lyr.crs().authid(), "features": int(lyr.featureCount()),
            "geometry": QgsWkbTypes.geometryDisplayString(lyr.geometryType())}
    r = lyr.renderer()
    info["renderer"] = r.type() if r else None
    if r is not None and r.type() == "categorizedSymbol":
        info["attribute"] = r.classAttribute()
        cats = []
        for c in r.categories():
            sym = c.symbol()
            sl = sym.symbolLayer(0)
            col = sl.color()
            cats.append({"value": c.value(), "fill": [col.red(), col.green(), col.blue(), col.alpha()],
                         "opacity": sym.opacity()})
        info["categories"] = cats
    return info


def _raster_info(lyr) -> dict:
    info = {"name": lyr.name(), "kind": "raster", "valid": lyr.isValid(), "source": lyr.source(),
            "crs": lyr.crs().authid(), "bands": lyr.bandCount(), "width": lyr.width(), "height": lyr.height()}
    r = lyr.renderer()
    info["renderer"] = r.type() if r else None
    if r is not None and r.type() == "singlebandpseudocolor":
        info["band"] = r.band()
        info["classification"] = [r.classificationMin(), r.classificationMax()]
        fn = r.shader().rasterShaderFunction()
        info["ramp"] = [[i.value, [i.color.red(), i.color.green(), i.color.blue(), i.color.alpha()]]
                        for i in fn.colorRampItemList()]
        t = r.rasterTransparency()
        info["transparent"] = [[p.min, p.max, p.percentTransparent] for p in t.transparentSingleValuePixelList()]
    return info


def _render(layers, extent, size, crs, path) -> dict:
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    ms = QgsMapSettings()
    ms.setLayers(layers)  # first = on top
    ms.setDestinationCrs(crs)
    ms.setExtent(extent)
    ms.setOutputSize(QSize(*size))
    ms.setBackgroundColor(QColor(255, 255, 255))
    ms.setOutputDpi(96)
    job = QgsMapRendererParallelJob(ms)
    job.start()
    job.waitForFinished()
    img = job.renderedImage()
    ok = img.save(str(path), "PNG")
    return {"path": str(path), "saved": bool(ok), "size": [img.width(), img.height()],
            "extent": [ms.visibleExtent().xMinimum(), ms.visibleExtent().yMinimum(),
                       ms.visibleExtent().xMaximum(), ms.visibleExtent().yMaximum()],
            "errors": [f"{e.layerID}: {e.message}" for e in job.errors()]}


def _qgis_process(cfg: dict, params: dict) -> dict:
    """Run ``geoseg:segment`` through qgis_process with the plugin and settings in a profile."""
    from qgis.PyQt.QtCore import QSettings

    home = Path(cfg["qgis_process_home"])
    profile = home / ".local/share/QGIS/QGIS3/profiles/default"
    (profile / "QGIS").mkdir(parents=True, exist_ok=True)
    plugins = profile / "python" / "plugins"
    plugins.parent.mkdir(parents=True, exist_ok=True)
    if not plugins.exists():
        plugins.symlink_to(cfg["plugins_dir"], target_is_directory=True)
    # What the Options dialog and "plugins enable" write, written the same way (QSettings).
    s = QSettings(str(profile / "QGIS" / "QGIS3.ini"), QSettings.IniFormat)
    s.setValue("Processing/Configuration/GEOSEG_EXECUTABLE", cfg["geoseg"])
    s.setValue("Processing/Configuration/GEOSEG_EXTRA_ENV", cfg["extra_env"])
    s.setValue("PythonPlugins/geoseg_processing", True)
    s.sync()
    cmd = [cfg["qgis_process"], "--json", "run", "geoseg:segment", "--"]
    cmd += [f"{k}={v}" for k, v in params.items()]
    env = dict(os.environ, HOME=str(home))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.get("timeout", 240))
    out = {"cmd": cmd, "returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 2),
           "stderr_tail": proc.stderr[-3000:]}
    try:
        doc = json.loads(proc.stdout[proc.stdout.index("{"):])
        out["results"] = doc.get("results")
        out["algorithm"] = doc.get("algorithm_details", {}).get("id")
    except ValueError:
        out["stdout_tail"] = proc.stdout[-3000:]
    return out


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    work = Path(cfg["work"])
    report: dict = {"steps_failed": []}

    def step(name, fn):
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - recorded for the test
            report.setdefault(name, {})
            report[name] = {"traceback": traceback.format_exc()}
            report["steps_failed"].append(name)

    from qgis.core import Qgis, QgsApplication

    app = QgsApplication([], False)
    app.initQgis()
    report["qgis_version"] = Qgis.QGIS_VERSION
    sys.path.insert(0, "/usr/share/qgis/python/plugins")
    sys.path.insert(0, cfg["plugins_dir"])
    Recorder = _feedback_class()
    state: dict = {}

    def setup():
        from processing.core.Processing import Processing
        from processing.core.ProcessingConfig import ProcessingConfig

        Processing.initialize()
        import geoseg_processing

        plugin = geoseg_processing.classFactory(None)
        plugin.initProcessing()
        state["plugin"] = plugin
        reg = QgsApplication.processingRegistry()
        prov = reg.providerById("geoseg")
        seg = reg.algorithmById("geoseg:segment")
        return {"module_file": geoseg_processing.__file__,
                "provider": prov.longName() if prov else None,
                "icon_null": prov.icon().isNull() if prov else None,
                "algorithms": sorted(a.id() for a in prov.algorithms()) if prov else [],
                "display_names": {a.id(): a.displayName() for a in prov.algorithms()} if prov else {},
                "segment_params": [p.name() for p in seg.parameterDefinitions()] if seg else [],
                "segment_outputs": [o.name() for o in seg.outputDefinitions()] if seg else [],
                "settings": {k: ProcessingConfig.getSetting(k) for k in ("GEOSEG_EXECUTABLE", "GEOSEG_EXTRA_ENV")}}

    step("setup", setup)
    from processing.core.ProcessingConfig import ProcessingConfig

    def missing():
        out = {}
        for label, value in (("path", "/nonexistent/bin/geoseg"), ("name", "geoseg-not-installed-here")):
            ProcessingConfig.setSettingValue("GEOSEG_EXECUTABLE", value)
            out[label] = _run("geoseg:vectorize", {"RUN": str(work)}, Recorder())
        return out

    step("missing", missing)
    ProcessingConfig.setSettingValue("GEOSEG_EXECUTABLE", cfg["geoseg"])
    ProcessingConfig.setSettingValue("GEOSEG_EXTRA_ENV", cfg["extra_env"])
    run_dir = work / "run"
    params = {"INPUT": cfg["raster"], "PROMPTS": "\n".join(cfg["prompts"]), "MODEL": cfg["model"],
              "THRESHOLD": cfg["threshold"], "CHUNK_SIZE": cfg["chunk_size"], "MIN_AREA": cfg["min_area"],
              "WORKERS": 1, "OUTPUT": str(run_dir)}

    def cancel():
        fb = Recorder(cancel_when=lambda f: any(p > 0 for p in f.progress))  # first chunk done
        out = _run("geoseg:segment", params, fb)
        out["pid"] = fb.pid
        out["group_at_cancel"] = fb.group_at_cancel
        if fb.cancelled_at is not None:
            out["return_after_cancel_s"] = round(time.monotonic() - fb.cancelled_at, 2)
            left = _group(fb.pid) if fb.pid else []
            out["group_on_return"] = left
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = _group(fb.pid)
            out["group_gone_after_s"] = round(time.monotonic() - fb.cancelled_at, 2) if not left else None
        parts = run_dir / "parts"
        out["parts"] = sorted(p.name for p in parts.iterdir()) if parts.is_dir() else []
        man = run_dir / "manifest.json"
        out["manifest_status"] = json.loads(man.read_text()).get("status") if man.exists() else None
        return out

    step("cancel", cancel)

    def resume():
        qp_params = dict(params, LOAD_OUTPUTS="false")
        if cfg.get("qgis_process"):
            return {"via": "qgis_process", **_qgis_process(cfg, qp_params)}
        return {"via": "processing.run", **_run("geoseg:segment", dict(params, LOAD_OUTPUTS=False), Recorder())}

    step("resume", resume)

    def loaded():
        from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

        out = _run("geoseg:segment", params, Recorder(), load=True)
        layers = []
        for lyr in QgsProject.instance().mapLayers().values():
            if isinstance(lyr, QgsVectorLayer):
                layers.append(_vector_info(lyr))
                state["polygons"] = lyr
            elif isinstance(lyr, QgsRasterLayer):
                layers.append(_raster_info(lyr))
                state["probabilities"] = lyr
        out["layers"] = layers
        # keep the segment run's polygons for the test: step "vectorize" replaces them in the run folder
        shutil.copyfile(run_dir / "polygons.gpkg", work / "segment_polygons.gpkg")
        return out

    step("loaded", loaded)

    def render():
        from qgis.core import QgsRasterLayer

        base = QgsRasterLayer(cfg["raster"], "input", "gdal")
        prob, poly = state["probabilities"], state["polygons"]
        extent, size, crs = base.extent(), (base.width(), base.height()), base.crs()
        return {
            "probabilities": _render([prob], extent, size, crs, work / "render_probabilities.png"),
            # 4 image pixels per raster pixel: the ~1 px outlines leave each polygon pixel an interior
            "polygons": _render([poly], extent, (4 * size[0], 4 * size[1]), crs, work / "render_polygons.png"),
            "screenshot": _render([poly, prob, base], extent, (size[0] // 2, size[1] // 2), crs,
                                  work / "render_screenshot.png"),
        }

    step("render", render)
    step("geoseg_error", lambda: _run("geoseg:segment", dict(params, PROMPTS="something else", LOAD_OUTPUTS=False),
                                      Recorder()))

    def vectorize():
        from qgis.core import QgsProject, QgsVectorLayer

        out = _run("geoseg:vectorize", {"RUN": str(run_dir), "THRESHOLD": cfg["vectorize_threshold"],
                                        "MIN_AREA": cfg["min_area"]}, Recorder(), load=True)
        # the project already shows this run's polygons.gpkg: Processing reuses that layer
        out["layers"] = [_vector_info(lyr) for lyr in QgsProject.instance().mapLayers().values()
                         if isinstance(lyr, QgsVectorLayer)]
        return out

    step("vectorize", vectorize)

    def thin():
        """evaluate / train through a stand-in executable that records how it was called."""
        from qgis.core import (
            QgsProcessingFeatureSourceDefinition,
            QgsProject,
            QgsVectorLayer,
        )

        labels = QgsVectorLayer(f"{work / 'segment_polygons.gpkg'}|layername=segments", "labels", "ogr")
        QgsProject.instance().addMapLayer(labels)
        labels.selectByIds(sorted(f.id() for f in labels.getFeatures())[:5])
        ProcessingConfig.setSettingValue("GEOSEG_EXECUTABLE", cfg["fake_geoseg"])
        try:
            ev = _run("geoseg:evaluate", {
                "RUN": str(run_dir), "CLASS_FIELD": "prompt", "OUTPUT": str(work / "evaluation"),
                "TRUTH": QgsProcessingFeatureSourceDefinition(labels.id(), selectedFeaturesOnly=True)}, Recorder())
            tr = _run("geoseg:train", {"INPUT": cfg["raster"], "LABELS": labels.id(), "CLASS_FIELD": "prompt",
                                       "STEPS": 3, "OUTPUT": str(work / "trained")}, Recorder())
        finally:
            ProcessingConfig.setSettingValue("GEOSEG_EXECUTABLE", cfg["geoseg"])
        return {"evaluate": ev, "train": tr, "labels_total": labels.featureCount()}

    step("thin", thin)

    def exemplars():
        """geoseg:segment_exemplars with only some features of a layer selected: which exemplars the
        run's manifest names, mapped back to the layer's ``name`` attribute through the exported file."""
        from qgis.core import QgsProcessingFeatureSourceDefinition, QgsProject, QgsVectorLayer

        lyr = QgsVectorLayer(cfg["exemplars"], "examples", "ogr")
        QgsProject.instance().addMapLayer(lyr)
        lyr.selectByIds([f.id() for f in lyr.getFeatures() if f["name"] in cfg["exemplars_selected"]])
        out_dir = work / "run_exemplars"
        out = _run("geoseg:segment_exemplars", dict(
            params, OUTPUT=str(out_dir), LOAD_OUTPUTS=False, CLASS_FIELD="prompt", EXEMPLAR_WEIGHT=0.7,
            EXEMPLARS=QgsProcessingFeatureSourceDefinition(lyr.id(), selectedFeaturesOnly=True)), Recorder())
        man = json.loads((out_dir / "manifest.json").read_text())
        names: dict = {}
        for prompt, ids in man["prompting"]["exemplars"].items():
            for ident in ids:
                path, _, fid = ident.rpartition(":")
                exported = QgsVectorLayer(path, "exported", "ogr")
                names.setdefault(prompt, []).append(exported.getFeature(int(fid))["name"])
        out["manifest_prompting"] = man["prompting"]
        out["exemplar_names"] = names
        out["layer_total"], out["selected"] = lyr.featureCount(), lyr.selectedFeatureCount()
        return out

    step("exemplars", exemplars)
    sys.stdout.write(json.dumps(report, default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # QGIS 3.22 can segfault in exitQgis(); the report is already out


if __name__ == "__main__":
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        main(sys.argv[1])
    except BaseException:  # noqa: BLE001 - never die without a report
        sys.stdout.write(json.dumps({"fatal": traceback.format_exc()}) + "\n")
        sys.stdout.flush()
        os._exit(0)
