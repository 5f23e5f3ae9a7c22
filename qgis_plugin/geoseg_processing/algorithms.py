"""Processing algorithms that run the geoseg command line (see runner.py) and load styled outputs."""

from __future__ import annotations

import json
import os

from qgis.core import (
    QgsMapLayerType,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingOutputRasterLayer,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingUtils,
)

from .provider import configured_env, configured_executable, icon
from .runner import (
    GeosegCancelled,
    GeosegRunError,
    evaluate_args,
    run_geoseg,
    segment_args,
    train_args,
    vectorize_args,
)
from .styling import PolygonStyler, ProbabilityStyler

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
DEFAULT_THRESHOLD = 0.5
DEFAULT_CHUNK = 4096
DEFAULT_EXEMPLAR_WEIGHT = 0.5  # geoseg's own default (geoseg.prompts.EXEMPLAR_WEIGHT)


def _advanced(param):
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def _threshold_param(name):
    """The probability threshold, in geoseg's open range (0, 1), so a bad value is refused before a run."""
    return QgsProcessingParameterNumber(name, "Threshold (probability 0–1)", QgsProcessingParameterNumber.Double,
                                        DEFAULT_THRESHOLD, minValue=0.001, maxValue=0.999)


def _run_folder_param(name):
    return QgsProcessingParameterFile(name, "Run folder (output folder of a segment run)",
                                      behavior=QgsProcessingParameterFile.Folder)


def polygon_uri(result: dict) -> str:
    """The QGIS source string of the polygon output (a GeoPackage layer, or a GeoParquet file)."""
    path = str(result["polygons"])
    layer = result.get("layer")
    return f"{path}|layername={layer}" if layer else path


class GeosegAlgorithm(QgsProcessingAlgorithm):
    """Runs one geoseg command, streaming its progress and log into the feedback."""

    def group(self):
        return ""

    def groupId(self):
        return ""

    def icon(self):
        return icon()

    def flags(self):
        return super().flags() | QgsProcessingAlgorithm.FlagCanCancel

    def createInstance(self):
        return type(self)()

    def run_cli(self, args, feedback, text_result=False) -> dict:
        """Run geoseg with ``args``; a geoseg failure becomes one QgsProcessingException line."""
        try:
            exe = configured_executable()
            env = configured_env()
        except GeosegRunError as exc:
            raise QgsProcessingException(str(exc)) from None

        def on_start(pid, cmdline):
            feedback.pushCommandInfo(cmdline)
            feedback.pushInfo(f"geoseg started (pid {pid})")

        def on_progress(percent, text):
            feedback.setProgress(percent)
            feedback.setProgressText(text)

        def on_log(level, message):
            if level in ("WARNING", "ERROR", "CRITICAL"):
                feedback.pushWarning(f"geoseg: {message}")
            else:
                feedback.pushInfo(f"geoseg: {message}")

        try:
            result = run_geoseg(exe, args, env=env, on_start=on_start, on_progress=on_progress, on_log=on_log,
                                on_output=feedback.pushConsoleInfo, is_canceled=feedback.isCanceled,
                                text_result=text_result)
        except GeosegCancelled as exc:
            raise QgsProcessingException(f"geoseg {exc}") from None
        except GeosegRunError as exc:
            raise QgsProcessingException(str(exc)) from None
        feedback.setProgress(100)
        return result

    def load_outputs(self, context, probabilities=None, polygons=None, threshold=DEFAULT_THRESHOLD):
        """Ask Processing to load the outputs into the project when it finishes, styled."""
        project = context.project()
        if project is None:
            return
        if probabilities:
            details = QgsProcessingContext.LayerDetails("geoseg probabilities", project, "PROBABILITIES",
                                                        QgsProcessingUtils.LayerHint.Raster)
            details.setPostProcessor(ProbabilityStyler.create(threshold))
            context.addLayerToLoadOnCompletion(probabilities, details)
        if polygons:
            details = QgsProcessingContext.LayerDetails("geoseg polygons", project, "POLYGONS",
                                                        QgsProcessingUtils.LayerHint.Vector)
            details.setPostProcessor(PolygonStyler.create())
            context.addLayerToLoadOnCompletion(polygons, details)


class SegmentAlgorithm(GeosegAlgorithm):
    INPUT, PROMPTS, MODEL, THRESHOLD = "INPUT", "PROMPTS", "MODEL", "THRESHOLD"
    RESOLUTION, CHUNK_SIZE, WORKERS, SCHEDULER = "RESOLUTION", "CHUNK_SIZE", "WORKERS", "SCHEDULER"
    MIN_AREA, DEVICE, OVERWRITE, LOAD = "MIN_AREA", "DEVICE", "OVERWRITE", "LOAD_OUTPUTS"
    OUTPUT = "OUTPUT"

    def name(self):
        return "segment"

    def displayName(self):
        return "Segment raster by text prompts"

    def shortHelpString(self):
        return ("Finds what the prompts describe (one per line, e.g. <i>building</i>) in a raster with CLIPSeg "
                "and writes a probability raster (one band per prompt, 0–1) and polygons (one category per "
                "prompt) into the output folder. Runs the geoseg command line configured in Processing › "
                "Options › Providers › geoseg. Re-running with the same parameters and output folder resumes "
                "an interrupted run. Workers start a local Dask cluster; a scheduler address (tcp://host:8786) "
                "or scheduler file uses an existing cluster instead.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterString(self.PROMPTS, "Prompts (one per line)", multiLine=True))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model (Hugging Face hub id or local folder)",
                                                       defaultValue=DEFAULT_MODEL))
        self.addParameter(_threshold_param(self.THRESHOLD))
        self.addParameter(QgsProcessingParameterNumber(self.RESOLUTION, "Resolution (pixel size in layer units; "
                                                       "empty or 0: native)", QgsProcessingParameterNumber.Double,
                                                       None, optional=True, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(self.CHUNK_SIZE, "Chunk size (pixels)",
                                                       QgsProcessingParameterNumber.Integer, DEFAULT_CHUNK,
                                                       minValue=352))
        self.addParameter(QgsProcessingParameterNumber(self.WORKERS, "Workers (local Dask processes; "
                                                       "0: geoseg's default)", QgsProcessingParameterNumber.Integer,
                                                       0, optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterString(self.SCHEDULER, "Dask scheduler address or scheduler file "
                                                       "(instead of local workers)", optional=True))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.MIN_AREA, "Minimum polygon area (m²)", QgsProcessingParameterNumber.Double, 0.0, minValue=0.0)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (auto, cpu, cuda, cuda:1, mps)", defaultValue="auto")))
        self.addParameter(_advanced(QgsProcessingParameterBoolean(
            self.OVERWRITE, "Start afresh (replace a previous run in the output folder)", False)))
        self.addParameter(_advanced(QgsProcessingParameterBoolean(
            self.LOAD, "Open the output layers (styled) when done", True)))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Output folder"))
        self.addOutput(QgsProcessingOutputRasterLayer("PROBABILITIES", "Probabilities"))
        self.addOutput(QgsProcessingOutputVectorLayer("POLYGONS", "Polygons", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("FEATURES", "Number of polygons"))
        self.addOutput(QgsProcessingOutputNumber("CHUNKS_RUN", "Chunks run"))
        self.addOutput(QgsProcessingOutputNumber("CHUNKS_RESUMED", "Chunks resumed from an earlier run"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("no raster layer given")
        if layer.type() != QgsMapLayerType.RasterLayer or layer.providerType() != "gdal":
            raise QgsProcessingException(f"layer {layer.name()!r} is not a GDAL raster (provider "
                                         f"{layer.providerType()!r}); geoseg reads files GDAL can open")
        prompts = self.parameterAsString(parameters, self.PROMPTS, context).splitlines()
        threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)
        resolution = (self.parameterAsDouble(parameters, self.RESOLUTION, context)
                      if parameters.get(self.RESOLUTION) not in (None, "") else None)
        output = self.parameterAsString(parameters, self.OUTPUT, context)
        try:
            args = segment_args(
                layer.source(), prompts, output,
                model=self.parameterAsString(parameters, self.MODEL, context),
                threshold=threshold, resolution=resolution,
                chunk_size=self.parameterAsInt(parameters, self.CHUNK_SIZE, context),
                workers=self.parameterAsInt(parameters, self.WORKERS, context),
                scheduler=self.parameterAsString(parameters, self.SCHEDULER, context),
                min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context),
                device=self.parameterAsString(parameters, self.DEVICE, context),
                overwrite=self.parameterAsBool(parameters, self.OVERWRITE, context),
                **self.exemplar_args(parameters, context, feedback))
        except GeosegRunError as exc:
            raise QgsProcessingException(str(exc)) from None
        result = self.run_cli(args, feedback)
        feedback.pushInfo(f"{result.get('features')} polygons; chunks run: {result.get('chunks_run')}, "
                          f"resumed: {result.get('chunks_resumed')}")
        probabilities, polygons = str(result["probabilities"]), polygon_uri(result)
        if self.parameterAsBool(parameters, self.LOAD, context):
            self.load_outputs(context, probabilities, polygons, threshold)
        return {self.OUTPUT: output, "PROBABILITIES": probabilities, "POLYGONS": polygons,
                "FEATURES": int(result.get("features", 0)), "CHUNKS_RUN": int(result.get("chunks_run", 0)),
                "CHUNKS_RESUMED": int(result.get("chunks_resumed", 0))}

    def exemplar_args(self, parameters, context, feedback) -> dict:
        """Extra ``segment_args`` keywords; the text-only algorithm has none."""
        return {}


class SegmentExemplarsAlgorithm(SegmentAlgorithm):
    """``geoseg:segment`` plus example polygons: ``--exemplars FILE --class-field F`` or
    ``--exemplar PROMPT=FILE``. A separate algorithm so the plain one stays short."""

    EXEMPLARS, CLASS_FIELD, EXEMPLAR_WEIGHT = "EXEMPLARS", "CLASS_FIELD", "EXEMPLAR_WEIGHT"

    def name(self):
        return "segment_exemplars"

    def displayName(self):
        return "Segment raster by text prompts and example polygons"

    def shortHelpString(self):
        return ("Like <i>Segment raster by text prompts</i>, but also shows the model examples: polygons drawn "
                "over the raster around things to find. With a class field each polygon is an example of the "
                "prompt its field names; without one every polygon is an example of the first prompt. Use "
                "<i>Selected features only</i> to pass only some polygons of a layer. The exemplar weight mixes "
                "text and examples: (1-w)·text + w·examples; 1 uses the examples only.")

    def initAlgorithm(self, config=None):
        super().initAlgorithm(config)
        self.addParameter(QgsProcessingParameterFeatureSource(self.EXEMPLARS, "Example polygons (exemplars)",
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(
            self.CLASS_FIELD, "Class field (its values are the prompts; empty: all are the first prompt)",
            parentLayerParameterName=self.EXEMPLARS, optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.EXEMPLAR_WEIGHT, "Exemplar weight (0: text only, 1: examples only)",
            QgsProcessingParameterNumber.Double, DEFAULT_EXEMPLAR_WEIGHT, minValue=0.0, maxValue=1.0))

    def exemplar_args(self, parameters, context, feedback) -> dict:
        return {"exemplars": polygons_file(self, parameters, self.EXEMPLARS, context, feedback),
                "class_field": self.parameterAsString(parameters, self.CLASS_FIELD, context) or None,
                "exemplar_weight": self.parameterAsDouble(parameters, self.EXEMPLAR_WEIGHT, context)}


class VectorizeAlgorithm(GeosegAlgorithm):
    RUN, THRESHOLD, MIN_AREA, SIMPLIFY, LOAD = "RUN", "THRESHOLD", "MIN_AREA", "SIMPLIFY", "LOAD_OUTPUTS"

    def name(self):
        return "vectorize"

    def displayName(self):
        return "Re-vectorize a run at a new threshold"

    def shortHelpString(self):
        return ("Redraws the polygons of a finished <i>Segment raster by text prompts</i> run at a new threshold "
                "from its stored probabilities, without running the model. Replaces polygons.gpkg in the run "
                "folder.")

    def initAlgorithm(self, config=None):
        self.addParameter(_run_folder_param(self.RUN))
        self.addParameter(_threshold_param(self.THRESHOLD))
        self.addParameter(QgsProcessingParameterNumber(self.MIN_AREA, "Minimum polygon area (m²)",
                                                       QgsProcessingParameterNumber.Double, 0.0, minValue=0.0))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.SIMPLIFY, "Simplify tolerance (layer units; 0 keeps pixel edges)",
            QgsProcessingParameterNumber.Double, 0.0, minValue=0.0)))
        self.addParameter(_advanced(QgsProcessingParameterBoolean(
            self.LOAD, "Open the output layer (styled) when done", True)))
        self.addOutput(QgsProcessingOutputVectorLayer("POLYGONS", "Polygons", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("FEATURES", "Number of polygons"))

    def processAlgorithm(self, parameters, context, feedback):
        run_dir = self.parameterAsFile(parameters, self.RUN, context)
        if not run_dir or not os.path.isdir(run_dir):
            raise QgsProcessingException(f"{run_dir!r} is not a folder")
        args = vectorize_args(run_dir, threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
                              min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context),
                              simplify=self.parameterAsDouble(parameters, self.SIMPLIFY, context))
        result = self.run_cli(args, feedback)
        polygons = polygon_uri(result)
        if self.parameterAsBool(parameters, self.LOAD, context):
            self.load_outputs(context, polygons=polygons)
        return {"POLYGONS": polygons, "FEATURES": int(result.get("features", 0))}


def polygons_file(alg, parameters, name, context, feedback) -> str:
    """A one-layer GeoPackage of the source's features (only the selected ones when the user ticked
    "Selected features only"), for a geoseg command that takes a vector file path."""
    # no format counts as compatible: always written out, so a multi-layer GeoPackage, a database
    # layer or a selection all reach geoseg as one plain file
    return alg.parameterAsCompatibleSourceLayerPath(parameters, name, context, ["geoseg-export"], "gpkg", feedback)


class EvaluateAlgorithm(GeosegAlgorithm):
    """Thin wrapper of ``geoseg evaluate RUN --truth FILE [--class-field F] [--prompt P] [-o DIR]``."""

    RUN, TRUTH, CLASS_FIELD, PROMPT, OUTPUT = "RUN", "TRUTH", "CLASS_FIELD", "PROMPT", "OUTPUT"

    def name(self):
        return "evaluate"

    def displayName(self):
        return "Evaluate a run against reference polygons"

    def shortHelpString(self):
        return ("Scores a finished <i>Segment raster by text prompts</i> run against reference polygons (pixel "
                "IoU, F1, precision, recall per prompt, best thresholds) with <tt>geoseg evaluate</tt>. Use "
                "<i>Selected features only</i> to score against part of a layer.")

    def initAlgorithm(self, config=None):
        self.addParameter(_run_folder_param(self.RUN))
        self.addParameter(QgsProcessingParameterFeatureSource(self.TRUTH, "Reference polygons",
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field (its values are the prompts)",
                                                      parentLayerParameterName=self.TRUTH, optional=True))
        self.addParameter(QgsProcessingParameterString(self.PROMPT, "Prompt the polygons show (when there is no "
                                                       "class field)", optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Report folder"))
        self.addOutput(QgsProcessingOutputString("REPORT", "Scores (text)"))

    def processAlgorithm(self, parameters, context, feedback):
        truth = polygons_file(self, parameters, self.TRUTH, context, feedback)
        output = self.parameterAsString(parameters, self.OUTPUT, context)
        args = evaluate_args(self.parameterAsFile(parameters, self.RUN, context), truth,
                             class_field=self.parameterAsString(parameters, self.CLASS_FIELD, context),
                             prompt=self.parameterAsString(parameters, self.PROMPT, context),
                             output=output, overwrite=True)
        result = self.run_cli(args, feedback, text_result=True)
        return {self.OUTPUT: output, "REPORT": result.get("table") or result.get("text") or json.dumps(result)}


class TrainAlgorithm(GeosegAlgorithm):
    """Thin wrapper of ``geoseg train RASTER --labels FILE -o DIR [--class-field F] [--prompt P ...]``."""

    INPUT, LABELS, CLASS_FIELD, PROMPTS, MODEL = "INPUT", "LABELS", "CLASS_FIELD", "PROMPTS", "MODEL"
    STEPS, DEVICE, OUTPUT = "STEPS", "DEVICE", "OUTPUT"

    def name(self):
        return "train"

    def displayName(self):
        return "Fine-tune the model on labelled polygons"

    def shortHelpString(self):
        return ("Fine-tunes CLIPSeg's decoder on labelled polygons over a raster with <tt>geoseg train</tt> and "
                "writes a model folder to use as the <i>Model</i> of <i>Segment raster by text prompts</i>.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, "Labelled polygons",
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field", optional=True,
                                                      parentLayerParameterName=self.LABELS))
        self.addParameter(QgsProcessingParameterString(self.PROMPTS, "Prompts (one per line)", multiLine=True,
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Base model (hub id or local folder)",
                                                       defaultValue=DEFAULT_MODEL))
        self.addParameter(QgsProcessingParameterNumber(self.STEPS, "Optimiser steps (at most)",
                                                       QgsProcessingParameterNumber.Integer, 1000, minValue=1))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.DEVICE, "Device (auto, cpu, cuda, cuda:1, mps)", defaultValue="auto")))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Model folder"))
        self.addOutput(QgsProcessingOutputFolder("MODEL_DIR", "Model folder"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or layer.providerType() != "gdal":
            raise QgsProcessingException("geoseg train needs a GDAL raster layer")
        labels = polygons_file(self, parameters, self.LABELS, context, feedback)
        output = self.parameterAsString(parameters, self.OUTPUT, context)
        args = train_args(layer.source(), labels, output,
                          prompts=self.parameterAsString(parameters, self.PROMPTS, context).splitlines(),
                          class_field=self.parameterAsString(parameters, self.CLASS_FIELD, context),
                          model=self.parameterAsString(parameters, self.MODEL, context),
                          steps=self.parameterAsInt(parameters, self.STEPS, context),
                          device=self.parameterAsString(parameters, self.DEVICE, context))
        self.run_cli(args, feedback, text_result=True)
        return {self.OUTPUT: output, "MODEL_DIR": output}


ALGORITHMS = (SegmentAlgorithm, SegmentExemplarsAlgorithm, VectorizeAlgorithm, EvaluateAlgorithm,
              TrainAlgorithm)
