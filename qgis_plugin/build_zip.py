"""Build the installable QGIS plugin zip: ``python qgis_plugin/build_zip.py [-o dist/]``.

The zip holds one top-level folder, ``geoseg_processing/``, as QGIS' "Install from ZIP" expects,
with the plugin's sources, metadata.txt and icon (no caches). Prints the zip's path. Any Python 3
runs it (standard library only); the version comes from metadata.txt.
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
import zipfile
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "geoseg_processing"
INCLUDE_SUFFIXES = {".py", ".txt", ".svg", ".png", ".md"}


def plugin_version(plugin_dir: Path = PLUGIN) -> str:
    meta = configparser.ConfigParser()
    meta.read(plugin_dir / "metadata.txt", encoding="utf-8")
    return meta["general"]["version"]


def plugin_files(plugin_dir: Path = PLUGIN) -> list[Path]:
    """The files that go into the zip, sorted (so two builds of one tree are identical)."""
    return sorted(p for p in plugin_dir.rglob("*")
                  if p.is_file() and p.suffix in INCLUDE_SUFFIXES and "__pycache__" not in p.parts)


def build_zip(out_dir: Path | str = "dist", plugin_dir: Path = PLUGIN) -> Path:
    """Write ``<out_dir>/geoseg_processing-<version>.zip`` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{plugin_dir.name}-{plugin_version(plugin_dir)}.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in plugin_files(plugin_dir):
                info = zipfile.ZipInfo(f"{plugin_dir.name}/{path.relative_to(plugin_dir).as_posix()}",
                                       date_time=(2024, 1, 1, 0, 0, 0))  # fixed: reproducible zips
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out-dir", default="dist", help="folder for the zip [dist]")
    args = ap.parse_args(argv)
    print(build_zip(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
