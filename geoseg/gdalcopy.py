"""GDAL's CreateCopy with its progress callback, for the probabilities COG.

Why not ``rasterio.shutil.copy``: it calls ``GDALCreateCopy`` without a progress function, and the
COG of a 100,000² run takes many minutes in which a user would see nothing but a clock. This module
calls the same C function, with a progress function, in **the same libgdal that rasterio loaded**:
the library is looked up with ``RTLD_NOLOAD``, which only ever returns a library already in the
process, and it must see a config option set through ``rasterio.Env`` (pyogrio may have loaded a
second, bundled libgdal; that one would not). So ``rasterio.Env`` options (the capped block cache)
apply unchanged. During the copy a quiet error handler is pushed on the calling thread, so GDAL's
reason ends up in the one error line instead of also on stderr; errors of the COG driver's
compression threads still reach rasterio's handler (GDAL's handler stack is per thread).

Where that library cannot be found (Windows, or a GDAL linked statically), :func:`create_copy`
falls back to ``rasterio.shutil.copy`` and reports no fractions; callers then show a ticking line.
Both are strict copies (``bStrict``, as rasterio's default).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import rasterio
import rasterio.shutil

from .errors import GeosegError

_PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_double, ctypes.c_char_p, ctypes.c_void_p)
_PROBE = f"rasterio-{os.getpid()}"
_CE_FAILURE = 3
_GDAL_OF_RASTER_VERBOSE = 0x02 | 0x40  # GDAL_OF_RASTER | GDAL_OF_VERBOSE_ERROR (read-only is 0)


class CopyError(GeosegError, OSError):
    """GDAL failed to write the copy; the message names the file and carries GDAL's reason."""


def _candidates() -> list[str]:
    """Paths or sonames under which rasterio's libgdal may be loaded: the mapped files (Linux),
    then the libraries bundled beside rasterio (wheels), then the system's."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            found += sorted({line.split()[-1] for line in maps if "libgdal" in line.rsplit("/", 1)[-1]})
    except OSError:
        pass
    pkg = Path(rasterio.__file__).parent
    found += sorted(glob.glob(str(pkg.parent / "rasterio.libs" / "libgdal*")))  # manylinux wheels
    found += sorted(glob.glob(str(pkg / ".dylibs" / "libgdal*")))  # macOS wheels
    import ctypes.util

    system = ctypes.util.find_library("gdal")
    return found + ([system] if system else [])


@functools.cache
def _libgdal() -> ctypes.CDLL | None:
    """rasterio's libgdal, bound for the calls below, or None when it is not reachable."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name, mode=noload | os.RTLD_LOCAL)
            lib.CPLGetConfigOption.restype = ctypes.c_char_p
            lib.CPLGetConfigOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            with rasterio.Env(GEOSEG_WHICH_GDAL=_PROBE):
                if lib.CPLGetConfigOption(b"GEOSEG_WHICH_GDAL", None) != _PROBE.encode():
                    continue
        except (OSError, AttributeError):
            continue
        lib.GDALOpenEx.restype = ctypes.c_void_p
        lib.GDALOpenEx.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p]
        lib.GDALGetDriverByName.restype = ctypes.c_void_p
        lib.GDALGetDriverByName.argtypes = [ctypes.c_char_p]
        lib.GDALCreateCopy.restype = ctypes.c_void_p
        lib.GDALCreateCopy.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_char_p), _PROGRESS, ctypes.c_void_p]
        lib.GDALClose.argtypes = [ctypes.c_void_p]
        lib.GDALVersionInfo.restype = ctypes.c_char_p
        lib.GDALVersionInfo.argtypes = [ctypes.c_char_p]
        # CPLErr since GDAL 3.7 (CE_Failure when the flush failed); void before: the error state tells
        lib.GDALClose.restype = ctypes.c_int if int(lib.GDALVersionInfo(b"VERSION_NUM")) >= 3070000 else None
        lib.CPLGetLastErrorType.restype = ctypes.c_int
        lib.CPLGetLastErrorMsg.restype = ctypes.c_char_p
        lib.CPLErrorReset.argtypes = []
        lib.CPLPushErrorHandler.argtypes = [ctypes.c_void_p]
        lib.CPLPopErrorHandler.argtypes = []
        return lib
    return None


def reports_progress() -> bool:
    """Whether :func:`create_copy` will call ``on_progress`` (rasterio's libgdal was found)."""
    return _libgdal() is not None


def create_copy(src: Path, dst: Path, driver: str, options: Mapping[str, str],
                on_progress: Callable[[float], None] | None = None) -> None:
    """``GDALCreateCopy(driver, dst, src, strict, options)``; ``on_progress(fraction)`` as GDAL
    reports it.

    An exception raised in ``on_progress`` (Ctrl-C arrives there too: it is Python code running
    during the copy) cancels the copy through GDAL's own mechanism, and is re-raised here once GDAL
    has returned. A failure raises :class:`CopyError` naming ``dst``; the caller removes the
    partial file (it writes to a temp name, see ``atomic_target``).
    """
    lib = _libgdal()
    if lib is None:
        rasterio.shutil.copy(src, dst, driver=driver, strict=True, **options)
        return
    notify = on_progress or (lambda fraction: None)
    pending: list[BaseException] = []

    def report(fraction: float, _message: bytes | None, _data: int | None) -> int:
        try:
            notify(fraction)
            return 1
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after GDAL unwinds
            pending.append(exc)
            return 0

    callback = _PROGRESS(report)
    opts = (ctypes.c_char_p * (len(options) + 1))(*[f"{k}={v}".encode() for k, v in options.items()], None)
    # GDAL's reason goes into the one error line below, not also onto stderr as "ERROR 4: ..."
    lib.CPLPushErrorHandler(ctypes.cast(lib.CPLQuietErrorHandler, ctypes.c_void_p))
    lib.CPLErrorReset()
    try:
        handle = lib.GDALGetDriverByName(driver.encode())
        if not handle:
            raise CopyError(f"{dst}: this GDAL has no {driver} driver")
        source = lib.GDALOpenEx(os.fsencode(src), _GDAL_OF_RASTER_VERBOSE, None, None, None)
        if not source:
            raise CopyError(f"{src}: GDAL cannot open it: {lib.CPLGetLastErrorMsg().decode(errors='replace')}")
        try:
            out = lib.GDALCreateCopy(handle, os.fsencode(dst), source, 1, opts, callback, None)
            failed = not out
            if out:  # closing flushes, which can fail too (disk full)
                lib.CPLErrorReset()
                failed = (lib.GDALClose(out) or 0) >= _CE_FAILURE or lib.CPLGetLastErrorType() >= _CE_FAILURE
            reason = lib.CPLGetLastErrorMsg().decode(errors="replace")
        finally:
            lib.GDALClose(source)
    finally:
        lib.CPLErrorReset()
        lib.CPLPopErrorHandler()
    if pending:
        raise pending[0]
    if failed:
        raise CopyError(f"{dst}: GDAL failed to write the {driver} copy: {reason or 'no reason given'}")
