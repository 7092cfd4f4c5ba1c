#!/usr/bin/env bash
# Fit a new person from ONE photo with the trained identity field frozen. Arguments pass through to track.py
# (see: python track.py --help).
#   bash run_tracking.sh                       # every held-out synthetic identity (syn_data), model output/cpu/model.pt,
#                                              # prints a Markdown table of the metrics
#   bash run_tracking.sh --checkpoint X --out DIR                    # the same with another model / output folder
#   bash run_tracking.sh --refine_colour false                       # code-only fit (no per-vertex colour stage)
#   bash run_tracking.sh --subject_dir <root>/<id> --out DIR         # one NeRSemble subject (camera 222200037)
#   bash run_tracking.sh --image photo.jpg                          # any photo: landmarks -> FLAME + camera -> fit
#   bash run_tracking.sh --image me.jpg --camera_json cams.json --flame tracked_flame_params.npz --out DIR
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

has_flag() { local f=$1; shift; for a in "$@"; do [[ "$a" == "$f" || "$a" == "$f="* ]] && return 0; done; return 1; }

if has_flag --subject_dir "$@" || has_flag --image "$@"; then
  if has_flag --image "$@" && ! has_flag --out "$@"; then
    exec "$PY" track.py --out output/tracking/photo "$@"
  fi
  exec "$PY" track.py --out output/tracking "$@"
fi

SYN=${SYNTHETIC_DATA:-syn_data}
if ! has_flag --data_root "$@" && [[ ! -f "$SYN/synthetic_info.json" ]]; then
  echo "[run_tracking] no synthetic dataset in $SYN: train a model first with: bash run_training.sh" >&2
  exit 1
fi
exec "$PY" track.py --all_heldout --data_root "$SYN" --checkpoint output/cpu/model.pt --out output/tracking "$@"
