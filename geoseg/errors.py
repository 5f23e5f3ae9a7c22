"""Errors raised by geoseg.

Every error derives from :class:`GeosegError`, so a caller (and the CLI) can catch one type and show a
single clear line. Each subclass also inherits the builtin it resembles, following
``rasterio/errors.py``, so code that already catches ``ValueError`` or ``OSError`` keeps working.
Messages name the file (or chunk window) and say what is wrong and, where there is one, the fix.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (GDAL and Dask messages run on), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GeosegError(Exception):
    """Root of all geoseg errors."""


class ConfigError(GeosegError, ValueError):
    """An option value is invalid (bad band index, threshold outside 0..1, ...)."""


class RasterError(GeosegError, ValueError):
    """The input raster cannot be segmented as it is."""


class RasterOpenError(RasterError, OSError):
    """GDAL cannot open the file: empty, truncated, not a raster, or unreachable."""


class MissingCRSError(RasterError):
    """The raster has no usable CRS: none, one PROJ cannot read or place (a LOCAL_CS made from an
    unknown EPSG code), or a geocentric one. ``--crs`` supplies one."""


class GeoreferencingError(RasterError):
    """The raster has no usable affine georeferencing (identity transform, GCPs or RPCs only)."""


class UnsupportedDataError(RasterError):
    """The raster's data type or band layout cannot be fed to the model (complex data, bad bands)."""


class RasterReadError(GeosegError, OSError):
    """A block failed to decode while the run was reading it; the message names the window."""


class ModelLoadError(GeosegError, OSError):
    """The model could not be loaded from the hub, the HF cache or a local directory."""


class ModelOutOfMemoryError(GeosegError, MemoryError):
    """The model ran out of accelerator memory even at one tile per batch (raised by the model, so
    the scheduler recognises it by class, without importing torch)."""


class OutputExistsError(GeosegError, FileExistsError):
    """The output path holds something that is not a previous run of the same job."""


class NotARunError(GeosegError, ValueError):
    """A directory given as a run is not a finished geoseg run (no manifest, unfinished, outputs missing)."""


class ChunkFailedError(GeosegError, RuntimeError):
    """A chunk task failed for a reason that retrying will not fix; the message names the chunk."""
