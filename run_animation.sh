#!/usr/bin/env bash
# Animate a head of a trained identity field with FLAME. Arguments pass through to animate.py
# (see: python animate.py --help).
#   bash run_animation.sh                      # after run_training.sh: the first training identity of
#                                              # output/cpu/model.pt through the built-in keyframes
#   bash run_animation.sh --identity output/tracking/017/code.pt --motion syn_data/subjects/300 --side_by_side video
#   bash run_animation.sh --motion tracked_flame_params.npz --png --ply --out DIR
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

has_flag() { local f=$1; shift; for a in "$@"; do [[ "$a" == "$f" || "$a" == "$f="* ]] && return 0; done; return 1; }

if ! has_flag --checkpoint "$@" && [[ ! -f output/cpu/model.pt ]]; then
  echo "[run_animation] no model at output/cpu/model.pt: train one first with: bash run_training.sh" >&2
  exit 1
fi
exec "$PY" animate.py --checkpoint output/cpu/model.pt --out output/animation "$@"
