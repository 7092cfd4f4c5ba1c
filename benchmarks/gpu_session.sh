#!/usr/bin/env bash
# Every GPU measurement of the project in one lease, most important first; results land in $OUT.
#   bash benchmarks/gpu_session.sh            # on the GPU machine (wheels for missing packages in .whl/)
#   QUICK=1 OUT=/tmp/o bash benchmarks/gpu_session.sh   # CPU smoke run of the same steps, tiny sizes
#   STEPS="profile bench" bash benchmarks/gpu_session.sh   # only some steps (default: all of
#        parity profile bench bench3 torchrun distributed; bench3 = bench.py at subdivision level 3)
# Steps of issues 23-25 (run them by name; one 10-minute call holds about two of them):
#   gputests   the CUDA-only tests (graph replay vs eager, the fit colour stage's prepared gsplat render, L-BFGS)
#   network3   profile_paths.py's network section at the real mask's level 3 (187,219 Gaussians): replay vs eager,
#              quaternions compared as rotations
#   fit3       single-image fit schedules at 187,219 Gaussians, two held-out identities, Adam / L-BFGS /
#              code_levels_down, prepared colour stage on (one schedule also with it off)
#   render3    render rows at 187,219 Gaussians (bf16 network, CUDA graphs), at gsplat tile sizes $RENDER3_TILES (16 8)
#   stream     the live stream (paced at 30 fps) with per-frame latency records in $OUT/sf
#   avatar     issue 23 on a GPU-trained model: synthetic heads at 400 px, nersemble.yaml's network at level 2, then
#              track.py --video on the real clips in data/clips/ (scripts/get_sample_clip.py; carry data/clips);
#              metrics.json and heldout.mp4 of each clip come back
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
# every step's sizes: tiny CPU smoke sizes with QUICK=1, the measured ones otherwise
if [[ "${QUICK:-0}" == 1 ]]; then
  B="--quick"; B3="--quick"; P="--quick"; Q="--quick"; D="--identities 2 --height 96 --level 0 --batch_identities 2 --batch_views 2 --warmup 1 --steps 2"
  T="--identities 2 --height 96 --level 0 --steps 3"; NGPU=2
  N3="--quick"; F3="--quick --level 1 --encoder_steps 20"; R3="--quick"; S="--quick"
  AS="--image_size 96 --num_identities 4"; AT="--steps 20 --compile false"
else
  B="--steps 30 --warmup 8 --train_steps_for_fit 200 --render_repeats 64"
  B3="$B --level 3"; P="--repeats 40"; Q=""
  D="--identities 8 --batch_identities 8 --batch_views 4 --warmup 5 --steps 20"
  T="--identities 2 --height 802 --level 1 --steps 20"
  N3="--gaussians 187219 --train_steps 20 --repeats 200"; F3="--gaussians 187219 --train_steps_for_fit 200"
  R3="--gaussians 187219 --render_repeats 200"; S="--stream_per_transition 16 --stream_lead_in 2.5"
  AS="--image_size 400 --num_identities ${AVATAR_IDS:-48} --device cuda"; AT="--steps ${AVATAR_STEPS:-3000}"
fi
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
if has gputests; then
  echo "== CUDA tests"; timeout 240 python3 -m pytest -q -x tests/test_graphed_synthesis.py tests/test_renderer.py \
    tests/test_lbfgs.py tests/test_gaussians.py 2>&1 | tail -8
fi
if has network3; then
  echo "== profile_paths.py --sections network at 187,219"; timeout 200 python3 benchmarks/profile_paths.py $N3 \
    --sections network --out "$OUT/network3.md" 2>&1 | grep -E "^(wall|## )"
  grep -E "graphed forward|network in the loop:" "$OUT/network3.md"
fi
if has fit3; then
  E="init=encoder"; L="$E,optimizer=lbfgs,colour_solver=lbfgs"
  declare -A V=([adam_60_10]="$E,iterations=60,min_iterations=60,colour_iterations=10"
    [lb_15_10]="$L,iterations=15,min_iterations=15,colour_iterations=10"
    [lb_20_10]="$L,iterations=20,min_iterations=20,colour_iterations=10"
    [lb_15_10d1]="$L,iterations=15,min_iterations=15,colour_iterations=10,code_levels_down=1"
    [lb_20_10d1]="$L,iterations=20,min_iterations=20,colour_iterations=10,code_levels_down=1"
    [adam_60_10d1]="$E,iterations=60,min_iterations=60,colour_iterations=10,code_levels_down=1"
    [lb_15_10_full]="$L,iterations=15,min_iterations=15,colour_iterations=10,renderer.GSPLAT_PREPARED_COLOUR=false")
  FV=(); for n in ${FIT3_VARIANTS:-adam_60_10 lb_15_10 lb_20_10 lb_15_10d1 lb_20_10d1 adam_60_10d1 lb_15_10_full}; do
    FV+=("$n:${V[$n]}"); done
  echo "== bench.py fit schedules at 187,219"; timeout ${FIT3_TIMEOUT:-420} python3 benchmarks/bench.py --parts fit \
    --encoder $F3 --fit_identities 2 --prepared_colour on --out "$OUT/fit3.md" --fit_variant "${FV[@]}" 2>&1 \
    | grep -E "seconds|gap|psnr|colour|iteration|Error|error" | grep -v "_id[0-9]" | head -90
fi
if has render3; then
  for ts in ${RENDER3_TILES:-16 8}; do  # gsplat's tile size (16: models.renderer.GSPLAT_TILE_SIZE), never swept on a GPU
    echo "== bench.py --parts render at 187,219 (bf16 network), tile $ts"; timeout 240 python3 benchmarks/bench.py \
      --parts render $R3 --synth_precision bf16 --tile_size $ts --out "$OUT/render3_tile$ts.md" 2>&1 \
      | grep -iE "fps|error" | head -30
  done
fi
if has stream; then
  echo "== bench.py --parts stream (live, paced at 30 fps, per-frame records)"; timeout 300 python3 benchmarks/bench.py \
    --parts stream $S --stream_workers 1 --stream_fit_devices cpu --stream_fit_process 1 --stream_refine_frames 12 \
    --stream_save "$OUT/sf" --out "$OUT/stream.md" 2>&1 | grep -E "latency|sustained|stage_ms|calibration|dropped|min_r|r_|rror" | head -60
fi
if has avatar; then
  AV=/tmp/avatar; mkdir -p $AV
  echo "== avatar: synthetic data, GPU training, track.py --video on the real clips"; SECONDS=0
  python3 utils/make_synthetic_dataset.py --out $AV/syn $AS --quiet 2>&1 | tail -2 && echo "data: ${SECONDS}s" \
    && python3 utils/preprocess/FLAME2PLY.py --data_root $AV/syn/subjects --flame_dir $AV/syn/flame --max_level 2 \
      2>&1 | tail -1 \
    && python3 utils/preprocess/projection_ply.py --data_root $AV/syn/subjects --mask_images 2>&1 | tail -1 \
    && echo "preprocessed: ${SECONDS}s" \
    && timeout 300 python3 train.py --config configs/nersemble.yaml --data_root $AV/syn --out $AV/model $AT \
      --eval_every 1000000 --image_every 1000000 2>&1 | tr '\r' '\n' | grep -vE "it/s|s/it" | tail -4 \
    && echo "trained: ${SECONDS}s" && grep -o '"psnr[a-z_]*": [0-9.]*' $AV/model/metrics.json | head -8
  for clip in ${AVATAR_CLIPS:-female male}; do
    f=data/clips/head-pose-face-detection-$clip.gif; [[ -f $f ]] || { echo "no $f (scripts/get_sample_clip.py)"; continue; }
    timeout 240 python3 track.py --checkpoint $AV/model/model.pt --video $f --out $AV/$clip 2>&1 | tr '\r' '\n' \
      | grep -vE "it/s|s/it" | tail -3
    cp $AV/$clip/metrics.json "$OUT/${clip}_metrics.json" 2>/dev/null; cp $AV/$clip/heldout.mp4 "$OUT/${clip}_heldout.mp4" 2>/dev/null
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: v for k, v in m.items() if 'psnr' in k and not isinstance(v, (list, dict))})" \
      "$OUT/${clip}_metrics.json" 2>&1 | tail -1; echo "$clip: ${SECONDS}s"
  done
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
