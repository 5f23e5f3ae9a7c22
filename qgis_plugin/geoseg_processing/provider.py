"""The "geoseg" Processing provider and its settings (Processing > Options > Providers > geoseg)."""

from __future__ import annotations

import os

from processing.core.ProcessingConfig import ProcessingConfig, Setting
from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .runner import child_env, parse_env, resolve_executable

#: Setting names (QSettings keys Processing/Configuration/<name>).
EXECUTABLE_SETTING = "GEOSEG_EXECUTABLE"
ENV_SETTING = "GEOSEG_EXTRA_ENV"
DEFAULT_EXECUTABLE = "geoseg"
ICON_PATH = os.path.join(os.path.dirname(__file__), "icon.svg")


def icon() -> QIcon:
    return QIcon(ICON_PATH)


def configured_executable() -> str:
    """The geoseg executable from the provider setting, resolved; one clear error if missing."""
    return resolve_executable(ProcessingConfig.getSetting(EXECUTABLE_SETTING) or DEFAULT_EXECUTABLE)


def configured_env() -> dict:
    """The child environment: QGIS' own, minus its Python variables, plus the extra-env setting."""
    return child_env(parse_env(ProcessingConfig.getSetting(ENV_SETTING)))


def _any(value) -> None:
    """Accept any value: Setting.FILE's own check rejects the default, a name looked up on PATH.
    A wrong value gives one clear error naming this setting when an algorithm runs."""


class GeosegProvider(QgsProcessingProvider):
    def load(self) -> bool:
        ProcessingConfig.settingIcons[self.name()] = self.icon()
        ProcessingConfig.addSetting(Setting(
            self.name(), EXECUTABLE_SETTING,
            "geoseg executable (a path, or a name found on PATH)", DEFAULT_EXECUTABLE, valuetype=Setting.FILE,
            validator=_any))
        ProcessingConfig.addSetting(Setting(
            self.name(), ENV_SETTING,
            "Extra environment for geoseg (NAME=value; NAME=value, e.g. HF_HOME=D:/hf; CUDA_VISIBLE_DEVICES=0)",
            ""))
        ProcessingConfig.readSettings()
        self.refreshAlgorithms()
        return True

    def unload(self) -> None:
        ProcessingConfig.removeSetting(EXECUTABLE_SETTING)
        ProcessingConfig.removeSetting(ENV_SETTING)

    def loadAlgorithms(self) -> None:
        from .algorithms import ALGORITHMS

        for cls in ALGORITHMS:
            self.addAlgorithm(cls())

    def id(self) -> str:
        return "geoseg"

    def name(self) -> str:
        return "geoseg"

    def longName(self) -> str:
        return "geoseg (text-prompted segmentation)"

    def icon(self) -> QIcon:
        return icon()

    def svgIconPath(self) -> str:
        return ICON_PATH
