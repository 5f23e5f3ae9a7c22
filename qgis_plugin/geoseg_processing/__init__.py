"""geoseg Processing provider for QGIS: text-prompted segmentation via the geoseg command line.

QGIS calls :func:`classFactory` when the plugin loads. Nothing here imports geoseg, torch or
anything outside QGIS; the algorithms run geoseg in a child process (see runner.py).
"""


def classFactory(iface):
    from .plugin import GeosegPlugin

    return GeosegPlugin(iface)
