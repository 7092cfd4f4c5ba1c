#!/usr/bin/env bash
# Morph between identities of a trained identity field. Arguments pass through to interpolate.py
# (see: python interpolate.py --help).
#   bash run_interpolation.sh              # the first 3 training identities of output/cpu/model.pt, looped
#   bash run_interpolation.sh --identities 300 output/tracking/017/code.pt --frames 40 --orbit 30 --out DIR
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
exec "$PY" interpolate.py --checkpoint output/cpu/model.pt --num_default 3 --loop --out output/interpolation "$@"
