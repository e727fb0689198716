"""SimSiam's augmentation recipe applied to whole batches on the training device.

The recipe is SimSiam's ImageNet one (Chen & He 2021, main_simsiam.py): RandomResizedCrop
(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 in a random order per image,
RandomGrayscale(p = 0.2), GaussianBlur(sigma 0.1-2.0, p = 0.5), horizontal flip. Every parameter
is drawn per image from one `torch.Generator`, so a view depends only on (seed, phase, epoch,
rank) and a resumed epoch replays exactly.

Hand-written rather than torchvision/kornia transforms: torchvision.transforms.v2 draws one
parameter set per call (a whole batch would share one crop), and both libraries draw from
torch's global RNG, not from a generator we pass. Here a crop and a flip are one batched affine
`grid_sample` (output at the training size, read from a decoded image that may be larger), the
colour jitter is per-image scalars (torchvision's formulas: brightness and contrast blend
towards black and the grey mean, saturation towards the grey image, hue rotates the HSV hue),
and the blur is a depthwise separable convolution. 1-channel images get brightness and
contrast only (saturation, hue and grayscale have no meaning there).

The crop's sides come from one of two draws (`AugmentConfig.crop_mode`). "torchvision" (the
default) is RandomResizedCrop's: redraw up to 10 times until the crop fits, then a centre crop.
"clamped" draws once and clamps each side to the image, as this module did before issue 13; its
views are larger on average. The default area range is 0.4-1 (SimSiam's 0.2-1 stays in
configs/imagenet.toml): on the 28-px mixed pool of issue 10 (3 seeds, whole task sets;
docs/claim.md, round 6) issue 13's rewrite at 0.3-1 had cost the unified model 1.4 probe points and the
routed K = 16 sub-net 1.2, most of it the crop (the old clamped crop alone gave the routed
sub-net back +0.9 +- 0.7). At 0.4-1 torchvision's crop has the clamped one's mean area (0.64):
it gave +2.4 +- 7.9 (unified, 14 of 18 seed-task pairs up) and +0.5 +- 2.2 (routed) over 0.3-1,
and the clamped crop at 0.3-1 was 1.1 +- 2.5 below it on the unified model (15 of 18 pairs).

Bilinear sampling does not antialias: a crop much larger than the training size (a decode far
above it) aliases where torchvision's resize would low-pass first; decode at most ~1.5x larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CROP_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then a centre crop
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths and probabilities of each augmentation (defaults: SimSiam's, with a smaller
    blur for small images). `out_size` is the output side (None: the input's size)."""

    crop_scale: tuple[float, float] = (0.4, 1.0)  # SimSiam: 0.2-1 at 224 px (see above)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_mode: str = "torchvision"  # or "clamped" (see CROP_MODES)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    out_size: int | None = None

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:  # once here, not on every batch
            raise ValueError(f"crop_mode must be one of {sorted(CROP_MODES)}, "
                             f"got {self.crop_mode!r}")


def _torchvision_crop_sizes(n: int, h: int, w: int, cfg: AugmentConfig, g: torch.Generator,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop sides in pixels as torchvision's RandomResizedCrop.get_params draws them, vectorised:
    up to 10 (area, aspect) draws per image, the first that fits wins, else (`ok` False) a
    centre crop with the aspect clamped to the range."""
    t = _CROP_TRIES
    area = h * w * torch.empty(n, t, device=device).uniform_(*cfg.crop_scale, generator=g)
    log_r = torch.empty(n, t, device=device).uniform_(
        math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator=g)
    ratio = torch.exp(log_r)
    cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h
    if in_ratio < cfg.crop_ratio[0]:
        fw, fh = float(w), w / cfg.crop_ratio[0]
    elif in_ratio > cfg.crop_ratio[1]:
        fw, fh = h * cfg.crop_ratio[1], float(h)
    else:
        fw, fh = float(w), float(h)
    ok = fits.any(dim=1)
    cw = torch.where(ok, cw, torch.full_like(cw, fw))
    ch = torch.where(ok, ch, torch.full_like(ch, fh))
    return cw, ch, ok


def _clamped_crop_sizes(n: int, h: int, w: int, cfg: AugmentConfig, g: torch.Generator,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop sides in pixels from one (area, aspect) draw per image, each side clamped to the
    image instead of redrawn. A draw that does not fit keeps the whole extent on one side, so
    views are larger on average than torchvision's (mean area 0.64 vs 0.59 at scale 0.3-1 on
    a square image) and about 8 % of them cover more than 90 % of it (torchvision: 3 %)."""
    area = h * w * torch.empty(n, device=device).uniform_(*cfg.crop_scale, generator=g)
    log_r = torch.empty(n, device=device).uniform_(
        math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator=g)
    ratio = torch.exp(log_r)
    cw = torch.sqrt(area * ratio).clamp(max=float(w))
    ch = torch.sqrt(area / ratio).clamp(max=float(h))
    return cw, ch, torch.ones(n, dtype=torch.bool, device=device)


CROP_MODES = {"clamped": _clamped_crop_sizes, "torchvision": _torchvision_crop_sizes}


def _crop_affine(n: int, h: int, w: int, cfg: AugmentConfig, g: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """n x 2 x 3 affine maps (normalised coordinates) of random resized crops, flips included:
    sides drawn by `cfg.crop_mode`, the crop placed uniformly inside the image (centred when
    torchvision's draw fell back)."""
    cw, ch, ok = CROP_MODES[cfg.crop_mode](n, h, w, cfg, g, device)
    u = torch.rand(n, 3, generator=g, device=device)
    left = torch.where(ok, u[:, 0] * (w - cw), (w - cw) / 2)  # pixels from the left edge
    top = torch.where(ok, u[:, 1] * (h - ch), (h - ch) / 2)
    sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = cw / w * sign
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    return theta


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma of an RGB batch (a 1-channel batch is its own grey image)."""
    if x.shape[1] == 1:
        return x
    r, gr, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * gr + _GRAY[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb2hsv on an N x 3 x H x W batch in [0, 1]; hue in [0, 1)."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv2rgb (the inverse of `_rgb_to_hsv`)."""
    h, s, v = x.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.long) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack((torch.stack((v, q, p, p, t, v), dim=1),
                         torch.stack((t, v, v, q, p, p), dim=1),
                         torch.stack((p, p, t, v, v, q), dim=1)), dim=1)  # N x 3 x 6 x H x W
    index = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, index).squeeze(2)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards black by a per-image factor (1: unchanged)."""
    return (x * factor[:, None, None, None]).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the image's mean grey level by a per-image factor (1: unchanged)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the grey image by a per-image factor (1: unchanged; RGB only)."""
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * grayscale(x)).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by a per-image shift in turns (-0.5..0.5; 0: unchanged; RGB only)."""
    hsv = _rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def _color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter with probability jitter_p, per image: factors and the order
    of the ops are drawn per image. Each round applies every op, with the identity factor for
    the images whose op in that round is another one (no masks, no host synchronisation)."""
    n, device = x.shape[0], x.device
    colour = x.shape[1] == 3
    ops = [(adjust_brightness, cfg.brightness, 1.0), (adjust_contrast, cfg.contrast, 1.0)]
    if colour:
        ops += [(adjust_saturation, cfg.saturation, 1.0), (adjust_hue, cfg.hue, 0.0)]
    u = torch.rand(n, 1 + 2 * len(ops), generator=g, device=device)
    on = u[:, 0] < cfg.jitter_p
    order = torch.argsort(u[:, 1:1 + len(ops)], dim=1)  # a random permutation per image
    factors = []
    for j, (_, strength, identity) in enumerate(ops):
        lo = max(0.0, identity - strength) if identity == 1.0 else -strength
        factors.append(lo + (identity + strength - lo) * u[:, 1 + len(ops) + j])
    for k in range(len(ops)):
        for j, (op, strength, identity) in enumerate(ops):
            if strength == 0:
                continue
            chosen = on & (order[:, k] == j)
            x = op(x, torch.where(chosen, factors[j], torch.full_like(factors[j], identity)))
    return x


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    xs = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-(xs[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)


def _blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur with probability blur_p and a per-image sigma (pixels of the output);
    the kernel reaches 3 sigma of the largest sigma, within half the image side."""
    n, c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * cfg.blur_sigma[1]), (min(h, w) - 1) // 2))
    sigma = torch.empty(n, device=x.device).uniform_(*cfg.blur_sigma, generator=g)
    k = _gaussian_kernels(sigma, radius)  # n x (2r+1)
    on = (torch.rand(n, generator=g, device=x.device) < cfg.blur_p).float()
    identity = torch.zeros_like(k)
    identity[:, radius] = 1.0
    k = on[:, None] * k + (1 - on[:, None]) * identity
    kk = k.repeat_interleave(c, dim=0).to(x.dtype)  # one kernel per (image, channel)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                    kk[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                    kk[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random SimSiam view of a batch x (N x C x H x W floats in [0, 1]); output in [0, 1]
    at cfg.out_size (default: H x W), on x's device."""
    n, c, h, w = x.shape
    side = cfg.out_size or None
    out_h, out_w = (side, side) if side else (h, w)
    theta = _crop_affine(n, h, w, cfg, g, x.device).to(x.dtype)
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = _color_jitter(out.clamp(0.0, 1.0), cfg, g)
    if c == 3 and cfg.grayscale_p > 0:
        gray = torch.rand(n, generator=g, device=x.device) < cfg.grayscale_p
        out = torch.where(gray[:, None, None, None], grayscale(out).expand_as(out), out)
    if cfg.blur_p > 0:
        out = _blur(out, cfg, g)
    return out.clamp(0.0, 1.0)


def to_unit_tensor(images_uint8, device=None, pin_memory: bool = False) -> torch.Tensor:
    """N x H x W x C uint8 (NumPy) -> N x C x H x W float tensor in [0, 1] on `device`.

    With `pin_memory` (CUDA only) the uint8 batch is copied from page-locked memory without
    blocking the host; it is 4x smaller than the float batch, so it travels before the cast.
    """
    t = torch.from_numpy(images_uint8)
    device = torch.device(device) if device is not None else None
    if pin_memory and device is not None and device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device=device)
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
