"""How geoseg's outputs look when Processing loads them into the project.

* Probabilities: a pseudocolour ramp fixed to 0..1 (viridis stops, so colours mean the same value
  in every run), and every value below the threshold fully transparent, so only what became
  polygons is coloured. Band 1 (the first prompt) is shown; another band is one click away.
* Polygons: the GeoPackage carries its own default style (``layer_styles``, categorised by
  prompt); QGIS applies it on a plain open, and :class:`PolygonStyler` makes sure of it when
  Processing opened the layer without it.
"""

from __future__ import annotations

from typing import ClassVar

from qgis.core import (
    QgsColorRampShader,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRasterTransparency,
    QgsSingleBandPseudoColorRenderer,
)
from qgis.PyQt.QtGui import QColor

from .runner import float32_below

#: (value, colour) stops of the probability ramp (matplotlib's viridis at 0, ¼, ½, ¾, 1).
RAMP_STOPS = ((0.0, "#440154"), (0.25, "#3b528b"), (0.5, "#21918c"), (0.75, "#5ec962"), (1.0, "#fde725"))


def probability_renderer(layer: QgsRasterLayer, threshold: float, band: int = 1) -> QgsSingleBandPseudoColorRenderer:
    """Pseudocolour 0..1 on ``band`` with values below ``threshold`` transparent."""
    ramp = QgsColorRampShader(0.0, 1.0)
    ramp.setColorRampType(QgsColorRampShader.Interpolated)
    ramp.setColorRampItemList([QgsColorRampShader.ColorRampItem(v, QColor(c), f"{v:g}") for v, c in RAMP_STOPS])
    shader = QgsRasterShader(0.0, 1.0)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    transparency = QgsRasterTransparency()
    below = float32_below(threshold)
    if below >= 0:
        pixel = QgsRasterTransparency.TransparentSingleValuePixel()
        pixel.min, pixel.max, pixel.percentTransparent = 0.0, below, 100.0
        transparency.setTransparentSingleValuePixelList([pixel])
    renderer.setRasterTransparency(transparency)
    return renderer


def style_probabilities(layer: QgsRasterLayer, threshold: float) -> None:
    layer.setRenderer(probability_renderer(layer, threshold))
    layer.triggerRepaint()


def style_polygons(layer) -> None:
    """Apply the GeoPackage's default style unless QGIS already did (it does on a plain open)."""
    renderer = layer.renderer()
    if renderer is None or renderer.type() != "categorizedSymbol":
        layer.loadDefaultStyle()
        layer.triggerRepaint()


class ProbabilityStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles the probability layer after Processing loaded it."""

    _keep: ClassVar[list] = []  # Processing does not own Python post-processors: keep them alive

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    @classmethod
    def create(cls, threshold: float) -> ProbabilityStyler:
        styler = cls(threshold)
        cls._keep.append(styler)
        del cls._keep[:-8]
        return styler

    def postProcessLayer(self, layer, context, feedback):
        if isinstance(layer, QgsRasterLayer):
            style_probabilities(layer, self.threshold)


class PolygonStyler(QgsProcessingLayerPostProcessorInterface):
    """Makes sure the polygon layer wears the GeoPackage's default style."""

    _keep: ClassVar[list] = []

    @classmethod
    def create(cls) -> PolygonStyler:
        styler = cls()
        cls._keep.append(styler)
        del cls._keep[:-8]
        return styler

    def postProcessLayer(self, layer, context, feedback):
        # Re-vectorizing rewrites the run's polygons.gpkg; Processing then hands back the layer already
        # in the project for that file, which must re-read it.
        layer.reload()
        style_polygons(layer)
