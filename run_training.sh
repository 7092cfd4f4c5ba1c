#!/usr/bin/env bash
# Train the identity field. Arguments pass through to train.py (see: python train.py --help).
#   bash run_training.sh                       # synthetic data (generated + preprocessed if absent), CPU preset
#   bash run_training.sh --data_root <nersemble> --flame_dir data --out output/nersemble   # the paper's recipe
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

has_flag() { local f=$1; shift; for a in "$@"; do [[ "$a" == "$f" || "$a" == "$f="* ]] && return 0; done; return 1; }

if has_flag --data_root "$@" || has_flag --data.root "$@"; then
  exec "$PY" train.py --config configs/nersemble.yaml --out output/nersemble "$@"
fi

# CPU preset, memory: the torch rasterizer allocates and frees tens of MB per render, and by default glibc mmaps
# each such buffer afresh and the kernel faults its pages in again (a fifth to a third of the CPU time). Transparent
# huge pages for torch's large buffers and glibc keeping freed memory remove most of that; the results are
# bit-identical (benchmarks/results/run_training_cpu_2026-12-06b.md). Set either variable yourself to override.
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-1}
MALLOC_SETTINGS=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824  # 32 MB, 1 GB
if [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.* ]]; then
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$MALLOC_SETTINGS"
fi

SYN=${SYNTHETIC_DATA:-syn_data}
if [[ ! -f "$SYN/synthetic_info.json" ]]; then
  echo "[run_training] no real data given: generating the synthetic dataset in $SYN"
  "$PY" utils/make_synthetic_dataset.py --out "$SYN"
fi
# Preprocessing is idempotent: it only writes what is missing.
"$PY" utils/preprocess/FLAME2PLY.py --data_root "$SYN/subjects" --flame_dir "$SYN/flame" --max_level 1
"$PY" utils/preprocess/projection_ply.py --data_root "$SYN/subjects" --mask_images
exec "$PY" train.py --config configs/cpu.yaml --data_root "$SYN" --out output/cpu "$@"
