#!/usr/bin/env bash
# One setup step for README's commands and .ci/run.
#   bash scripts/setup.sh         CPU torch==2.13.0 (only where no torch is installed), requirements.txt and
#                                 requirements-landmarks.txt (--no-deps): what training, tracking, animation,
#                                 interpolation and the viewer need.
#   bash scripts/setup.sh --dev   the same with requirements-dev.txt (pytest, scikit-image, playwright) plus Debian's
#                                 chromium package (apt-get, with sudo when not root) for tests/test_viewer.py's
#                                 browser test, when no chromium is on PATH (or $CHROMIUM is unset).
# An existing torch (e.g. a CUDA build from environment.yml) is kept: a plain `pip install torch` would replace it.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/setup.sh: unknown argument '$arg' (expected --dev or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build; on a GPU machine install the CUDA build first, see environment.yml)"
  "${PIP[@]}" torch==2.13.0
fi
if [ "$dev" = 1 ]; then
  echo "[setup] installing requirements-dev.txt (requirements.txt + pytest, scikit-image, playwright)"
  "${PIP[@]}" -r requirements-dev.txt
else
  echo "[setup] installing requirements.txt"
  "${PIP[@]}" -r requirements.txt
fi
echo "[setup] installing requirements-landmarks.txt (mediapipe, --no-deps)"
"${PIP[@]}" --no-deps -r requirements-landmarks.txt

if [ "$dev" = 1 ] && [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
   && ! command -v chromium-browser >/dev/null 2>&1; then
  # tests/test_viewer.py drives a real browser through Playwright with the system Chromium (no browser download)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/setup.sh: tests/test_viewer.py needs Chromium and this machine has no apt-get: install chromium" \
         "with your package manager or set CHROMIUM=/path/to/chromium, then run the tests" >&2
    exit 1
  fi
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
      echo "scripts/setup.sh: tests/test_viewer.py needs Chromium; not root and no sudo: run" \
           "'apt-get install -y chromium' as root or set CHROMIUM=/path/to/chromium" >&2
      exit 1
    fi
  fi
  echo "[setup] installing Debian's chromium package (about 400 MB) for tests/test_viewer.py"
  if ! { "${SUDO[@]}" apt-get update -qq && \
         "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
    echo "scripts/setup.sh: 'apt-get install chromium' failed (see above); install Chromium yourself or set" \
         "CHROMIUM=/path/to/chromium" >&2
    exit 1
  fi
fi
echo "[setup] done"
