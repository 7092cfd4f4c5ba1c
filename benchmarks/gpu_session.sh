#!/usr/bin/env bash
# Every GPU measurement of the project in one lease, most important first; results land in $OUT.
#   bash benchmarks/gpu_session.sh            # on the GPU machine (wheels for missing packages in .whl/)
#   QUICK=1 OUT=/tmp/o bash benchmarks/gpu_session.sh   # CPU smoke run of the same steps, tiny sizes
#   STEPS="profile bench" bash benchmarks/gpu_session.sh   # only some steps (default: all of
#        parity profile bench bench3 torchrun distributed; bench3 = bench.py at subdivision level 3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [[ "${QUICK:-0}" == 1 ]]; then
  B="--quick"; B3="--quick"; P="--quick"; Q="--quick"; D="--identities 2 --height 96 --level 0 --batch_identities 2 --batch_views 2 --warmup 1 --steps 2"
  T="--identities 2 --height 96 --level 0 --steps 3"; NGPU=2
else
  B="--steps 30 --warmup 8 --train_steps_for_fit 200 --render_repeats 64"
  B3="$B --level 3"; P="--repeats 40"; Q=""
  D="--identities 8 --batch_identities 8 --batch_views 4 --warmup 5 --steps 20"
  T="--identities 2 --height 802 --level 1 --steps 20"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
echo "== warm-up (gsplat compiles its CUDA code on first use)"
SECONDS=0
python3 -c "
import torch; from models.gaussians import random_cloud; from models.renderer import render; from models.camera import Camera
c = random_cloud(1000, center=(0,0,0)); dev = 'cuda' if torch.cuda.is_available() else 'cpu'
print(render(c.to(dev), Camera.look_at((0,0,.6),(0,0,0),(0,1,0),64,64).to(dev))['image'].mean().item())" 2>&1 | tail -2
echo "warm-up: ${SECONDS}s"
STEPS=${STEPS:-parity profile bench bench3 torchrun distributed}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has parity; then
  echo "== rasterizer_parity.py"; timeout 150 python3 benchmarks/rasterizer_parity.py $Q --out "$OUT/parity.md" 2>&1 | tail -25
fi
if has profile; then
  echo "== profile_paths.py"; timeout 200 python3 benchmarks/profile_paths.py $P --out "$OUT/profile.md" 2>&1 \
    | grep -E "^(wall|graphed|network in|## )" 
fi
if has bench; then
  echo "== bench.py"; timeout 260 python3 benchmarks/bench.py $B --out "$OUT/bench.md" 2>&1 | tail -45
fi
if has bench3; then
  echo "== bench.py level 3"; timeout 300 python3 benchmarks/bench.py $B3 --out "$OUT/bench_level3.md" 2>&1 | tail -45
fi
R="python3 -m torch.distributed.run --master_addr=127.0.0.1"
if has torchrun; then
  echo "== torchrun --nproc_per_node=1 vs plain python (and a second plain run: run-to-run spread)"
  timeout 60 python3 benchmarks/torchrun_check.py $T --out "$OUT/plain.json" 2>&1 | tail -1
  timeout 60 python3 benchmarks/torchrun_check.py $T --out "$OUT/plain2.json" 2>&1 | tail -1
  timeout 60 $R --master_port=29613 --nproc_per_node=1 benchmarks/torchrun_check.py $T --out "$OUT/ddp1.json" 2>&1 | tail -1
  python3 benchmarks/torchrun_check.py --compare "$OUT/plain.json" "$OUT/ddp1.json" --noise "$OUT/plain2.json" \
    | tee "$OUT/torchrun_check.md"
fi
if has distributed && [[ "$NGPU" -ge 2 ]]; then
  echo "== bench_distributed (1 and 2 GPUs)"
  timeout 100 $R --master_port=29611 --nproc_per_node=1 benchmarks/bench_distributed.py $D --out "$OUT/dist1.json" 2>&1 | tail -1
  timeout 100 $R --master_port=29612 --nproc_per_node=2 benchmarks/bench_distributed.py $D --out "$OUT/dist2.json" 2>&1 | tail -1
  python3 benchmarks/bench_distributed.py --summarize "$OUT/dist1.json" "$OUT/dist2.json" --write "$OUT/distributed.md"
fi
