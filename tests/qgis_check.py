"""Open geoseg outputs in a real QGIS and report what QGIS sees, as one JSON line.

Two halves in one file:

* **QGIS side** -- ``/usr/bin/python3 tests/qgis_check.py GPKG COG CRS COUNT [--layer NAME]``.
  Runs under the *system* Python (QGIS' bindings are Debian packages, not wheels; see
  ``.ci/install_qgis.sh``) with ``QT_QPA_PLATFORM=offscreen``. It opens the GeoPackage layer
  ``GPKG|layername=segments`` with the ``ogr`` provider and the COG with ``gdal``, and prints one
  JSON object: validity, CRS, feature count, geometry type, the renderer QGIS applied on open (the
  default style from ``layer_styles``) with its categories, raster band count / descriptions /
  data type / nodata, plus ``ok`` and a list of ``problems``. It then ``os._exit(0)``s: QGIS 3.22
  may crash in ``exitQgis()`` and a crash after the report must not turn into a failure.

* **pytest side** -- :func:`run_qgis_check` and :func:`qgis_available`, importable from the venv
  (nothing from ``qgis`` is imported at module import), run the QGIS side in a subprocess with a
  timeout and return the parsed dict. Point it at any run's outputs::

      from tests.qgis_check import run_qgis_check
      report = run_qgis_check("out/segments.gpkg", "out/probabilities.tif", "EPSG:32633", 42)
      assert report["ok"], report["problems"]

What QGIS 3.22 needs to apply the default style: nothing beyond opening the layer normally.
``QgsVectorLayer(uri, name, "ogr")`` uses ``LayerOptions.loadDefaultStyle = True`` by default,
which calls ``loadDefaultStyle()`` -> ``loadNamedStyle()``; for a provider that supports styles in
the database (OGR/GPKG does) that queries ``layer_styles`` for ``f_table_schema = ''``,
``f_table_name = <layer>`` and ``f_geometry_column = <OGR geometry column, 'geom'>``, ordered by
``useAsDefault`` then ``update_time``. The report records ``renderer_on_open`` (what the plain
constructor gave) and, separately, what an explicit ``loadDefaultStyle()`` returns on a layer
opened with ``loadDefaultStyle = False``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Interpreter that has the QGIS bindings (Debian's python3-qgis); the venv's Python does not.
QGIS_PYTHON = "/usr/bin/python3"
DEFAULT_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------------------------------
# pytest / venv side (no qgis imports here)
# --------------------------------------------------------------------------------------------------


def _qgis_env(runtime_dir: str) -> dict[str, str]:
    """Environment for the system Python: headless Qt, and none of the venv leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    env["XDG_RUNTIME_DIR"] = runtime_dir  # Qt warns (and some builds misbehave) without one
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def qgis_available(python: str = QGIS_PYTHON, timeout: float = 60.0) -> tuple[bool, str]:
    """``(True, version)`` when ``python -c "import qgis.core"`` works, else ``(False, reason)``."""
    if not Path(python).exists():
        return False, f"{python} does not exist (QGIS check needs the system Python with python3-qgis)"
    with tempfile.TemporaryDirectory(prefix="qgis-rt-") as rt:
        os.chmod(rt, 0o700)
        try:
            proc = subprocess.run(
                [python, "-c", "import qgis.core as q; print(q.Qgis.QGIS_VERSION)"],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_qgis_env(rt),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"{python} -c 'import qgis.core' failed: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return False, (
            f"{python} cannot import qgis.core ({tail[0]}); install QGIS with .ci/install_qgis.sh"
        )
    return True, proc.stdout.strip()


def run_qgis_check(
    gpkg: Path | str,
    cog: Path | str,
    crs: str | int,
    count: int,
    *,
    layer: str = "segments",
    python: str = QGIS_PYTHON,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Open ``gpkg`` (layer ``layer``) and ``cog`` in QGIS via ``python``; return its JSON report.

    ``crs`` is what both layers must have: ``"EPSG:32633"``, ``32633`` or a WKT string. ``count``
    is the expected number of features. Raises :class:`RuntimeError` (with the subprocess' output)
    if the check produced no JSON report, e.g. because QGIS crashed before printing it;
    ``subprocess.TimeoutExpired`` propagates. Check ``report["ok"]`` / ``report["problems"]``.
    """
    crs_arg = f"EPSG:{crs}" if isinstance(crs, int) or str(crs).isdigit() else str(crs)
    cmd = [
        python,
        str(Path(__file__).resolve()),
        str(Path(gpkg).resolve()),
        str(Path(cog).resolve()),
        crs_arg,
        str(int(count)),
        "--layer",
        layer,
    ]
    with tempfile.TemporaryDirectory(prefix="qgis-rt-") as rt:
        os.chmod(rt, 0o700)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_qgis_env(rt))
    report = None
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if report is None:
        raise RuntimeError(
            f"QGIS check printed no JSON report (exit code {proc.returncode}).\n"
            f"command: {cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    report["returncode"] = proc.returncode
    report["stderr_tail"] = proc.stderr[-2000:]
    return report


# --------------------------------------------------------------------------------------------------
# QGIS side (runs under /usr/bin/python3)
# --------------------------------------------------------------------------------------------------


def _crs_from_arg(arg: str):  # -> QgsCoordinateReferenceSystem
    from qgis.core import QgsCoordinateReferenceSystem

    if arg.upper().startswith(("EPSG:", "ESRI:", "IAU_", "OGC:")):
        return QgsCoordinateReferenceSystem(arg)
    crs = QgsCoordinateReferenceSystem.fromWkt(arg)
    return crs if crs.isValid() else QgsCoordinateReferenceSystem(arg)


def _same_crs(actual, expected) -> bool:
    if not (actual.isValid() and expected.isValid()):
        return False
    if actual == expected:
        return True
    a, e = actual.authid(), expected.authid()
    return bool(a) and a == e


def _renderer_info(lyr) -> dict[str, Any]:
    r = lyr.renderer()
    info: dict[str, Any] = {"renderer_type": r.type() if r else None}
    if r is not None and r.type() == "categorizedSymbol":
        info["renderer_attr"] = r.classAttribute()
        cats = []
        for c in r.categories():
            sym = c.symbol()
            sl = sym.symbolLayer(0) if sym and sym.symbolLayerCount() else None
            cats.append(
                {
                    "value": c.value(),
                    "label": c.label(),
                    "render": c.renderState(),
                    "fill": sl.color().name() if sl else None,
                    "fill_alpha": sl.color().alpha() if sl else None,
                    "stroke": sl.strokeColor().name() if sl and hasattr(sl, "strokeColor") else None,
                    "stroke_alpha": sl.strokeColor().alpha() if sl and hasattr(sl, "strokeColor") else None,
                    "symbol_opacity": sym.opacity() if sym else None,
                }
            )
        info["categories"] = cats
    return info


def _check_vector(gpkg: str, layer_name: str, expected_crs, count: int, problems: list[str]) -> dict[str, Any]:
    from qgis.core import QgsVectorLayer, QgsWkbTypes

    uri = f"{gpkg}|layername={layer_name}"
    # Plain constructor: LayerOptions.loadDefaultStyle defaults to True -> style from layer_styles.
    lyr = QgsVectorLayer(uri, layer_name, "ogr")
    out: dict[str, Any] = {"uri": uri, "valid": lyr.isValid()}
    if not lyr.isValid():
        problems.append(f"vector layer {uri} is not valid in QGIS")
        return out
    out["provider"] = lyr.providerType()
    out["storage_type"] = lyr.dataProvider().storageType()
    out["crs_authid"] = lyr.crs().authid()
    out["crs_matches"] = _same_crs(lyr.crs(), expected_crs)
    out["feature_count"] = int(lyr.featureCount())
    out["count_matches"] = out["feature_count"] == count
    out["wkb_type"] = QgsWkbTypes.displayString(lyr.wkbType())
    out["geometry_type"] = QgsWkbTypes.geometryDisplayString(lyr.geometryType())
    out["fields"] = [f.name() for f in lyr.fields()]
    out["sublayers"] = list(lyr.dataProvider().subLayers())
    out.update(_spatial_index_info(lyr))
    # What the constructor applied (no explicit call): this is what a user dragging the file in gets.
    out.update(_renderer_info(lyr))
    out["renderer_on_open"] = out.get("renderer_type")
    try:
        n, ids, names, descs, err = lyr.listStylesInDatabase()
        out["styles_in_database"] = {"count": n, "ids": list(ids), "names": list(names), "error": err}
    except Exception as exc:  # noqa: BLE001 - diagnostic only
        out["styles_in_database"] = {"error": repr(exc)}

    # And the explicit path: open without the default style, then loadDefaultStyle().
    try:
        opts = QgsVectorLayer.LayerOptions()
        opts.loadDefaultStyle = False
        bare = QgsVectorLayer(uri, layer_name, "ogr", opts)
        before = bare.renderer().type() if bare.renderer() else None
        msg, loaded = bare.loadDefaultStyle()
        out["explicit_load_default_style"] = {
            "renderer_before": before,
            "message": msg,
            "loaded": bool(loaded),
            "renderer_after": bare.renderer().type() if bare.renderer() else None,
        }
    except Exception as exc:  # noqa: BLE001 - diagnostic only
        out["explicit_load_default_style"] = {"error": repr(exc)}

    if not out["crs_matches"]:
        problems.append(f"vector CRS {out['crs_authid'] or lyr.crs().toWkt()} != expected {expected_crs.authid()}")
    if not out["count_matches"]:
        problems.append(f"vector feature count {out['feature_count']} != expected {count}")
    if not out["spatial_index"]:
        problems.append("QGIS sees no spatial index on the vector layer")
    if not out["filter_rect_ok"]:
        problems.append(f"rectangle query through the index lost or added features: {out['filter_rect']}")
    if out.get("renderer_type") != "categorizedSymbol":
        problems.append(f"default style not applied on open: renderer is {out.get('renderer_type')!r}")
    elif out.get("renderer_attr") != "prompt":
        problems.append(f"categorized renderer is on {out.get('renderer_attr')!r}, not 'prompt'")
    return out


def _spatial_index_info(lyr) -> dict[str, Any]:
    """Whether QGIS finds the GeoPackage R-tree, and whether rectangle queries (which the OGR
    provider answers through it) return every feature meeting the rectangle and none whose box
    misses it: the lower-left and the upper-right quarter of the extent, against a scan."""
    from qgis.core import QgsFeatureRequest, QgsFeatureSource, QgsGeometry, QgsRectangle

    ext, mid = lyr.extent(), lyr.extent().center()
    rects = [QgsRectangle(ext.xMinimum(), ext.yMinimum(), mid.x(), mid.y()),
             QgsRectangle(mid.x(), mid.y(), ext.xMaximum(), ext.yMaximum())]
    counts, ok = [], True
    for rect in rects:
        got = {f.id() for f in lyr.getFeatures(QgsFeatureRequest().setFilterRect(rect))}
        exact, boxes = set(), set()
        probe = QgsGeometry.fromRect(rect)
        for f in lyr.getFeatures():
            if f.geometry().boundingBox().intersects(rect):
                boxes.add(f.id())
                if f.geometry().intersects(probe):
                    exact.add(f.id())
        counts.append({"returned": len(got), "intersecting": len(exact), "box_meets": len(boxes)})
        ok = ok and exact <= got <= boxes
    return {
        "spatial_index": lyr.dataProvider().hasSpatialIndex() == QgsFeatureSource.SpatialIndexPresent,
        "filter_rect": counts,
        "filter_rect_ok": ok,
    }


def _check_raster(cog: str, expected_crs, problems: list[str]) -> dict[str, Any]:
    from qgis.core import QgsRasterLayer

    lyr = QgsRasterLayer(cog, Path(cog).stem, "gdal")
    out: dict[str, Any] = {"uri": cog, "valid": lyr.isValid()}
    if not lyr.isValid():
        problems.append(f"raster layer {cog} is not valid in QGIS")
        return out
    dp = lyr.dataProvider()
    out["crs_authid"] = lyr.crs().authid()
    out["crs_matches"] = _same_crs(lyr.crs(), expected_crs)
    out["band_count"] = int(lyr.bandCount())
    out["width"], out["height"] = int(lyr.width()), int(lyr.height())
    out["band_names"] = [lyr.bandName(i) for i in range(1, lyr.bandCount() + 1)]
    descs = []
    for i in range(1, lyr.bandCount() + 1):
        d = dp.bandDescription(i) if hasattr(dp, "bandDescription") else None  # QGIS >= 3.34
        descs.append(d)
    out["band_descriptions"] = descs
    out["data_types"] = [int(dp.dataType(i)) for i in range(1, lyr.bandCount() + 1)]
    out["nodata"] = [
        (str(dp.sourceNoDataValue(i)) if dp.sourceHasNoDataValue(i) else None)
        for i in range(1, lyr.bandCount() + 1)
    ]
    out["renderer_type"] = lyr.renderer().type() if lyr.renderer() else None
    # GDAL's own view (same GDAL QGIS links): descriptions and COG layout.
    try:
        from osgeo import gdal

        ds = gdal.Open(cog)
        out["gdal_band_descriptions"] = [ds.GetRasterBand(i).GetDescription() for i in range(1, ds.RasterCount + 1)]
        out["gdal_layout"] = ds.GetMetadataItem("LAYOUT", "IMAGE_STRUCTURE")
        ds = None
    except Exception as exc:  # noqa: BLE001 - diagnostic only
        out["gdal_band_descriptions"] = None
        out["gdal_error"] = repr(exc)
    if not out["crs_matches"]:
        problems.append(f"raster CRS {out['crs_authid']} != expected {expected_crs.authid()}")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gpkg")
    ap.add_argument("cog")
    ap.add_argument("crs", help="expected CRS: EPSG:XXXX or WKT")
    ap.add_argument("count", type=int, help="expected feature count")
    ap.add_argument("--layer", default="segments")
    args = ap.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    report: dict[str, Any] = {"ok": False, "problems": []}
    problems: list[str] = report["problems"]
    try:
        from qgis.core import Qgis, QgsApplication

        app = QgsApplication([], False)
        app.initQgis()
        report["qgis_version"] = Qgis.QGIS_VERSION
        try:
            from osgeo import gdal

            report["gdal_version"] = gdal.__version__
        except ImportError:
            report["gdal_version"] = None
        expected = _crs_from_arg(args.crs)
        report["expected_crs"] = {"arg": args.crs[:200], "authid": expected.authid(), "valid": expected.isValid()}
        if not expected.isValid():
            problems.append(f"expected CRS {args.crs[:80]!r} is not a valid CRS for QGIS")
        report["vector"] = _check_vector(args.gpkg, args.layer, expected, args.count, problems)
        report["raster"] = _check_raster(args.cog, expected, problems)
    except Exception as exc:  # noqa: BLE001 - report, never die silently
        import traceback

        problems.append(f"exception: {exc!r}")
        report["traceback"] = traceback.format_exc()
    report["ok"] = not problems
    sys.stdout.write(json.dumps(report, default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # QGIS 3.22 can segfault in exitQgis(); the report is already out


if __name__ == "__main__":
    main()
