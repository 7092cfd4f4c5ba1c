"""Feed-forward encoder: one face-masked photo crop -> the style w of the identity field, in one forward pass.

The input is what a single-image fit sees: the photo, face-masked on black, plus its face mask (the projected FLAME
face mask of the tracked or landmark-fitted head, so the encoder is told where the face is and how it is posed).
:func:`encoder_input` cuts a square window around the mask's bounding box (grown by ``margin``), resamples it to
``size`` x ``size`` pixels and stacks RGB and mask into 4 channels; the same function, with random jitter, makes the
training inputs (utils/apps/train/encoder.py), so training and use see the same crops.

The backbone is a small ResNet (written here; nothing is downloaded): a stride-2 stem, four stages of basic
residual blocks (GroupNorm, so a batch of one behaves as in training), global average pooling and a linear head.
The head predicts the style in units of the training styles' spread: ``w = w_mean + w_std * head(features)``, with
``w_mean`` / ``w_std`` (S,) the mean and per-channel standard deviation of the styles the encoder was trained on
(buffers saved with its weights), so a zero head output is the mean style.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class EncoderConfig:
    """Architecture of the encoder (stored in model.pt beside its weights)."""

    size: int = 48  # input crops are size x size pixels
    channels: list[int] = field(default_factory=lambda: [24, 48, 64, 96])  # widths of the residual stages
    blocks: int = 1  # residual blocks per stage
    margin: float = 0.1  # the crop is the face mask's bounding box grown by this fraction per side, made square
    style_dim: int = 128  # output size (the identity field's style_dim, or its code_dim for space z)
    space: str = "w"  # output: the style w, or the code z (mapped to w by the field's frozen mapping network)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"encoder config has unknown keys {unknown} (known: {sorted(names)})")
        out = cls(**d)
        out.channels = list(out.channels)
        if out.space not in ("w", "z"):
            raise ValueError(f"encoder config: space must be 'w' or 'z', got {out.space!r}")
        return out


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout)))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(y)) + self.skip(x))


class StyleEncoder(nn.Module):
    """(B, 4, size, size) crops (RGB + mask, :func:`encoder_input`) -> (B, style_dim) styles w."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.channels[0]
        self.stem = nn.Sequential(nn.Conv2d(4, c0, 3, 2, 1, bias=False), _norm(c0), nn.ReLU())
        layers, cin = [], c0
        for i, c in enumerate(cfg.channels):
            for b in range(cfg.blocks):
                layers.append(BasicBlock(cin, c, 2 if (b == 0 and i > 0) else 1))
                cin = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, cfg.style_dim)
        nn.init.zeros_(self.head.weight)  # starts at the mean style
        nn.init.zeros_(self.head.bias)
        self.register_buffer("w_mean", torch.zeros(cfg.style_dim))
        self.register_buffer("w_std", torch.ones(cfg.style_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 4:
            raise ValueError(f"StyleEncoder expects (B, 4, {self.cfg.size}, {self.cfg.size}) crops, got "
                             f"{tuple(x.shape)}")
        f = self.body(self.stem(x)).mean(dim=(2, 3))
        return self.w_mean + self.w_std * self.head(f)

    @torch.no_grad()
    def predict(self, image: Tensor, mask: Tensor) -> Tensor:
        """One photo: image (h, w, 3) face-masked on black, mask (h, w, 1) -> style (S,)."""
        was = self.training
        self.eval()
        x = encoder_input(image[None], mask[None], self.cfg.size, self.cfg.margin)
        w = self(x)[0]
        self.train(was)
        return w


def mask_boxes(mask: Tensor) -> Tensor:
    """(B, h, w, 1) masks -> (B, 4) boxes x0, y0, x1, y1 in pixels (pixel edges) of the pixels > 0.5; a mask with
    no pixel gives the whole image."""
    B, h, w = mask.shape[:3]
    m = mask[..., 0] > 0.5
    rows, cols = m.any(2), m.any(1)  # (B, h), (B, w)
    ar_h = torch.arange(h, device=mask.device, dtype=torch.float32)
    ar_w = torch.arange(w, device=mask.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1.0).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1.0).amax(1) + 1
    empty = ~rows.any(1)
    box = torch.stack([x0, y0, x1, y1], 1)
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=mask.device)
    return torch.where(empty[:, None], full, box)


def encoder_input(image: Tensor, mask: Tensor, size: int, margin: float = 0.1, shift: Tensor | None = None,
                  scale: Tensor | None = None) -> Tensor:
    """Crops for the encoder: (B, h, w, 3) face-masked images and (B, h, w, 1) masks -> (B, 4, size, size).

    The window is the square around the mask's bounding box, its side the box's longer side times (1 + 2 margin);
    ``shift`` (B, 2) moves its centre by that fraction of the side and ``scale`` (B,) multiplies the side (crop
    jitter for training).  Bilinear resampling; outside the image is black (mask 0)."""
    B, h, w = image.shape[:3]
    box = mask_boxes(mask)
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) * (1 + 2 * margin)
    if scale is not None:
        side = side * scale
    if shift is not None:
        cx, cy = cx + shift[:, 0] * side, cy + shift[:, 1] * side
    src = torch.cat([image, mask], -1).permute(0, 3, 1, 2).float()  # (B, 4, h, w)
    # sampling grid in normalised coordinates (align_corners=False: -1 / +1 are the image's outer pixel edges)
    t = (torch.arange(size, device=image.device, dtype=torch.float32) + 0.5) / size - 0.5  # (size,) in (-0.5, 0.5)
    px = cx[:, None] + side[:, None] * t[None]  # (B, size) pixel x
    py = cy[:, None] + side[:, None] * t[None]
    gx = (px / w) * 2 - 1
    gy = (py / h) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    # antialias: when the crop shrinks the image a lot, blur first (area-like) so small features do not alias
    down = float((side / size).max())
    if down > 1.5:
        k = int(round(down)) | 1
        src = F.avg_pool2d(src, k, 1, k // 2, count_include_pad=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def encoder_state(encoder: StyleEncoder) -> dict:
    """The model.pt entry of an encoder: {"config": dict, "state_dict": {name: CPU tensor}}."""
    return {"config": encoder.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}


def encoder_from_state(doc: dict, device: torch.device | str = "cpu") -> StyleEncoder:
    """Build an encoder from its model.pt entry (:func:`encoder_state`); ValueError when it does not fit."""
    if not isinstance(doc, dict) or "config" not in doc or "state_dict" not in doc:
        raise ValueError("the 'encoder' entry must hold 'config' and 'state_dict'")
    enc = StyleEncoder(EncoderConfig.from_dict(dict(doc["config"])))
    try:
        enc.load_state_dict(doc["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"its weights do not fit its config ({str(exc).splitlines()[0]})") from exc
    if not all(torch.isfinite(v).all() for v in enc.state_dict().values() if v.is_floating_point()):
        raise ValueError("its weights hold NaN or inf")
    return enc.to(device).eval()
