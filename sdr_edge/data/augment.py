"""SimSiam augmentations applied to whole batches on the training device.

Per-image random resized crops and flips become one batched affine `grid_sample`, jitter is
per-image scalars and blur a depthwise convolution, so a CPU run is not bound by a Python
loop over images. Works for any channel count (grayscale or RGB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of each augmentation; defaults follow SimSiam, scaled for small images."""

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)


def _crop_affine(n: int, cfg: AugmentConfig, g: torch.Generator, device) -> torch.Tensor:
    area = torch.empty(n, device=device).uniform_(*cfg.crop_scale, generator=g)
    log_r = torch.empty(n, device=device).uniform_(
        math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator=g
    )
    ratio = torch.exp(log_r)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - sh)
    if cfg.flip:
        sign = torch.where(torch.rand(n, generator=g, device=device) < 0.5, -1.0, 1.0)
    else:
        sign = torch.ones(n, device=device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = cy
    return theta


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    xs = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-(xs[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random view of a batch x (N x C x H x W floats in [0, 1]); output in [0, 1]."""
    n, c, h, w = x.shape
    device = x.device
    theta = _crop_affine(n, cfg, g, device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = (torch.rand(n, generator=g, device=device) < cfg.jitter_p).float()[:, None, None, None]
    b = 1 + (torch.rand(n, 1, 1, 1, generator=g, device=device) * 2 - 1) * cfg.brightness
    ct = 1 + (torch.rand(n, 1, 1, 1, generator=g, device=device) * 2 - 1) * cfg.contrast
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((out * b) - mean) * ct + mean
    out = jitter * jittered + (1 - jitter) * out

    if cfg.blur_p > 0:
        radius = max(1, min(h, w) // 8)
        sigma = torch.empty(n, device=device).uniform_(*cfg.blur_sigma, generator=g)
        k = _gaussian_kernels(sigma, radius)  # n x (2r+1)
        blur = (torch.rand(n, generator=g, device=device) < cfg.blur_p).float()
        identity = torch.zeros_like(k)
        identity[:, radius] = 1.0
        k = blur[:, None] * k + (1 - blur[:, None]) * identity
        kk = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
        flat = out.reshape(1, n * c, h, w)
        flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
        flat = F.conv2d(flat, kk[:, None, None, :], groups=n * c)
        flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
        flat = F.conv2d(flat, kk[:, None, :, None], groups=n * c)
        out = flat.reshape(n, c, h, w)
    return out.clamp(0.0, 1.0)


def to_unit_tensor(images_uint8, device=None) -> torch.Tensor:
    """N x H x W x C uint8 (NumPy) -> N x C x H x W float tensor in [0, 1]."""
    t = torch.from_numpy(images_uint8).to(device=device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def normalize_tensor(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Same normalisation as `preprocess.normalize_batch`, on a [0, 1] NCHW tensor."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - m) / s


def light_augment(x: torch.Tensor, g: torch.Generator, *, shift: float = 0.08,
                  scale: tuple[float, float] = (0.9, 1.1), flip: bool = False) -> torch.Tensor:
    """Fine-tuning augmentation: a small random shift and zoom (and a flip only when asked).

    Works on any NCHW float batch (normalised or not): borders are replicated, not zero-filled.
    `shift` is the largest translation as a fraction of the image side. Flip is off by default
    because it changes the meaning of glyphs and digits; clothes tolerate it.
    """
    n = x.shape[0]
    device = x.device
    zoom = torch.empty(n, device=device).uniform_(*scale, generator=g)  # > 1 zooms out
    sign = (torch.where(torch.rand(n, generator=g, device=device) < 0.5, -1.0, 1.0) if flip
            else torch.ones(n, device=device))
    move = (torch.rand(n, 2, generator=g, device=device) * 2 - 1) * (2 * shift)
    theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = zoom * sign
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = move
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
