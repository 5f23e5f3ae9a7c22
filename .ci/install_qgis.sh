#!/usr/bin/env bash
# Install QGIS' Python bindings (Debian: python3-qgis + qgis-providers) for tests/test_qgis.py, and
# qgis_process (Debian: qgis, without recommends) for tests/test_qgis_plugin.py.
#
# Idempotent: exits at once when the system Python can already `import qgis.core` and qgis_process
# is installed. Non-interactive.
# The bindings belong to the *system* Python (/usr/bin/python3, 3.11 on Debian 12, QGIS 3.22.16);
# they are not pip-installable into the project venv, which is why tests/qgis_check.py runs them
# in a subprocess. Needs root (or sudo) and network access to the Debian mirror; ~300 packages,
# ~1.5 min on a fast mirror.
set -euo pipefail

PY=/usr/bin/python3
check() { QT_QPA_PLATFORM=offscreen "$PY" -c "import qgis.core" >/dev/null 2>&1; }

if [ -x "$PY" ] && check && [ -x /usr/bin/qgis_process.bin ]; then
    echo "QGIS already available: $(QT_QPA_PLATFORM=offscreen "$PY" -c 'import qgis.core as q; print(q.Qgis.QGIS_VERSION)')"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_qgis.sh: apt-get not found; install python3-qgis and qgis-providers for $PY by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -E"; else
        echo "install_qgis.sh: must run as root (or with sudo available)" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
$SUDO apt-get update -q
$SUDO apt-get install -y -q \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    python3-qgis qgis-providers
$SUDO apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    qgis
echo "apt install took $(( $(date +%s) - start ))s"

if ! check; then
    echo "install_qgis.sh: installed, but '$PY -c \"import qgis.core\"' still fails:" >&2
    QT_QPA_PLATFORM=offscreen "$PY" -c "import qgis.core" >&2 || true
    exit 1
fi
echo "QGIS available: $(QT_QPA_PLATFORM=offscreen "$PY" -c 'import qgis.core as q; print(q.Qgis.QGIS_VERSION)')"
