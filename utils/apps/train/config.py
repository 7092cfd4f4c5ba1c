"""Configuration of a training run: the loss weights, the optimiser, the run itself and the range checks.

Every field is a YAML key of configs/*.yaml and a ``--section.key`` flag of train.py (utils/core/config.py builds
both from these dataclasses; the comment after a field is its --help text).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.identity_field import IdentityFieldConfig
from utils.core.config import Range, check_ranges
from utils.data.dataset import DataConfig


@dataclass
class LossConfig:
    """Weights of the photometric loss terms and of the regularisers (``loss.*``)."""

    l1_weight: float = 0.8  # weight of the L1 photometric term (paper: 0.8)
    ssim_weight: float = 0.2  # weight of (1 - SSIM) (paper: 0.2)
    lpips_weight: float = 0.0  # weight of LPIPS (optional: needs the lpips package, torchvision and its weights)
    lpips_net: str = "vgg"  # LPIPS backbone
    code_reg: float = 0.0  # weight of the mean squared code norm (the paper's cs_reg_weight)
    offset_reg: float = 1e-3  # weight of the squared Gaussian offsets (edge units): keeps Gaussians on the surface
    scale_reg: float = 1e-3  # weight of squared log-scale growth beyond the edge-length initialisation
    eye_weight: float = 0.0  # weight of an extra L1 term inside each view's eye regions (utils/face/regions.py; 0: off)
    eye_weight_final: float = 1.0  # eye term's weight at the last step / eye_weight, linear from 1 (0: fades out)
    eye_loss: str = "l1"  # the eye term's error: l1 (mean |error|) or mse (mean squared error: what PSNR scores)
    alpha_weight: float = 0.0  # weight of mean |rendered alpha - face mask| (opaque inside the mask; cpu preset 0.1)
    rim_band: int = 0  # training px just outside the face mask left unsupervised (colour, alpha; cpu preset 1)
    supersample: int = 1  # render training views at k x the size, average k x k blocks: pixel areas integrated (1: off)


@dataclass
class OptimConfig:
    """Adam and its learning-rate schedule (``optim.*``)."""

    lr_network: float = 5e-3  # Adam learning rate of the mapping and synthesis networks
    lr_codes: float = 1e-2  # Adam learning rate of the identity codes
    lr_template: float = 1e-2  # Adam learning rate of the per-vertex template features
    lr_final_ratio: float = 0.1  # learning rates decay exponentially to this fraction at the last step
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.99  # Adam beta2
    grad_clip: float = 0.0  # clip the global gradient norm to this value (0: off)


@dataclass
class TrainConfig:
    """One training run: data, network, loss, optimiser, output folder, schedule of steps, logs and checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: IdentityFieldConfig = field(default_factory=IdentityFieldConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "output/train"  # output folder: checkpoints, model.pt, metrics.json, tensorboard logs
    steps: int = 300000  # optimisation steps
    batch_identities: int = 4  # identities per step (global batch, split across ranks)
    batch_views: int = 4  # training cameras rendered per identity and step
    eval_every: int = 5000  # evaluate on the held-out cameras every N steps (and at the end)
    eval_identities: int = 16  # identities evaluated (the first N; 0: all)
    log_every: int = 50  # tensorboard scalars every N steps
    image_every: int = 1000  # tensorboard image grid every N steps
    ckpt_every: int = 5000  # resumable checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # how many checkpoints to keep on disk
    seed: int = 0  # seed of the network initialisation and of the batch sampler
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto (gsplat on CUDA, else torch), torch, gsplat, inria
    precision: str = "tf32"  # network matmuls on CUDA: fp32, tf32 (TensorFloat-32) or bf16 (autocast); no effect on CPU
    compile: bool = False  # torch.compile the network's forward (CUDA; the first steps compile for a minute)
    progress: bool = True  # show tqdm progress bars


# Allowed values, checked before anything runs (a bad value must not train for minutes or export an empty model).
TRAIN_RANGES: dict[str, Range] = {
    "steps": Range(1), "batch_identities": Range(1), "batch_views": Range(1), "eval_every": Range(1),
    "eval_identities": Range(0), "log_every": Range(1), "image_every": Range(1), "ckpt_every": Range(1),
    "keep_checkpoints": Range(1), "seed": Range(0),
    "data.subdivision": Range(0, 3),  # level 3 of real FLAME: 187,219 vertices; each level has 4x the triangles
    "data.frame": Range(0), "data.image_scale": Range(0, 1, lo_open=True), "data.crop_margin": Range(0),
    "data.crop_multiple": Range(1),
    "model.code_dim": Range(1), "model.style_dim": Range(1), "model.mapping_layers": Range(1), "model.hidden": Range(1),
    "model.synth_layers": Range(0), "model.feat_dim": Range(0), "model.fourier_freqs": Range(0),
    "model.gaussians_per_vertex": Range(1), "model.sh_degree": Range(0, 3),
    "model.init_opacity": Range(0, 1, lo_open=True, hi_open=True), "model.filter_3d": Range(0),
    "model.filter_2d": Range(0),
    "model.w_avg_beta": Range(0, 1, hi_open=True),  # EMA decay; 1 would keep the average style at zero
    "loss.l1_weight": Range(0), "loss.ssim_weight": Range(0), "loss.lpips_weight": Range(0), "loss.code_reg": Range(0),
    "loss.offset_reg": Range(0), "loss.scale_reg": Range(0), "loss.eye_weight": Range(0),
    "loss.eye_weight_final": Range(0),
    "loss.alpha_weight": Range(0), "loss.rim_band": Range(0), "loss.supersample": Range(1, 4),
    "optim.lr_network": Range(0), "optim.lr_codes": Range(0), "optim.lr_template": Range(0),
    "optim.lr_final_ratio": Range(0, 1, lo_open=True), "optim.beta1": Range(0, 1, hi_open=True),
    "optim.beta2": Range(0, 1, hi_open=True), "optim.grad_clip": Range(0),
}
PRECISIONS = ("fp32", "tf32", "bf16")  # choices of TrainConfig.precision
EYE_LOSSES = ("l1", "mse")  # choices of LossConfig.eye_loss


def validate_config(cfg: TrainConfig) -> None:
    """Range checks of TRAIN_RANGES and the choice fields (ValueError naming the flag)."""
    check_ranges(cfg, TRAIN_RANGES)
    if cfg.loss.eye_loss not in EYE_LOSSES:
        raise ValueError(f"--loss.eye_loss must be one of {', '.join(EYE_LOSSES)}, got {cfg.loss.eye_loss!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
