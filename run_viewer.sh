#!/usr/bin/env bash
# Browse a trained identity field in a web browser. Arguments pass through to viewer.py
# (see: python viewer.py --help).
# It prints the address to open, http://127.0.0.1:8080/<session token>/ (requests without the token are refused).
#   bash run_viewer.sh                       # output/cpu/model.pt (bash run_training.sh) on http://127.0.0.1:8080,
#                                            # with the code.pt files of bash run_tracking.sh (output/tracking/)
#   bash run_viewer.sh --checkpoint output/nersemble/model.pt --codes me/code.pt --port 8081
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
exec "$PY" viewer.py "$@"
