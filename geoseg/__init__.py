"""geoseg: text-prompted segmentation of huge georeferenced rasters with CLIPSeg and Dask.

    >>> import geoseg
    >>> cfg = geoseg.SegmentConfig("scene.tif", prompts=("building",), output="scene_out")
    >>> result = geoseg.segment(cfg)            # probabilities.tif, polygons.gpkg, manifest.json
"""

import logging

__version__ = "0.1.0"

from .config import DEFAULT_MODEL, SegmentConfig, VectorizeConfig  # noqa: E402
from .errors import (  # noqa: E402
    ChunkFailedError,
    ConfigError,
    GeoreferencingError,
    GeosegError,
    MissingCRSError,
    ModelLoadError,
    ModelOutOfMemoryError,
    NotARunError,
    OutputExistsError,
    RasterError,
    RasterOpenError,
    RasterReadError,
    UnsupportedDataError,
)
from .pipeline import RunResult, segment, vectorize  # noqa: E402

__all__ = [
    "__version__", "segment", "vectorize", "SegmentConfig", "VectorizeConfig", "RunResult", "DEFAULT_MODEL",
    "GeosegError", "ConfigError", "RasterError", "RasterOpenError", "MissingCRSError", "GeoreferencingError",
    "UnsupportedDataError", "RasterReadError", "ModelLoadError", "ModelOutOfMemoryError", "OutputExistsError",
    "NotARunError", "ChunkFailedError",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
