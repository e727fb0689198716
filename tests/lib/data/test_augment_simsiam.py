"""SimSiam's batched augmentation (sdr_edge.data.augment): deterministic for a generator seed,
random per image, and each colour op does what torchvision's does."""

from __future__ import annotations

import pytest
import torch

from sdr_edge.data.augment import (
    AugmentConfig,
    _hsv_to_rgb,
    _rgb_to_hsv,
    adjust_hue,
    augment_batch,
)
from sdr_edge.training.config import AugmentSection

NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _batch(n: int = 16, c: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_views_other_seed_other_views():
    x = _batch()
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_parameters_differ_per_image():
    # one image repeated: any difference between the rows comes from per-image parameters
    x = _batch(1).expand(12, -1, -1, -1).contiguous()
    for cfg in (AugmentConfig(),  # everything on
                AugmentConfig(flip=False, **NO_COLOUR),  # the crop alone
                AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                              jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)):  # the jitter alone
        out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
        distinct = {tuple(row.flatten()[:64].tolist()) for row in out}
        assert len(distinct) == len(out), cfg


def test_identity_settings_keep_the_image():
    x = _batch(4)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, **NO_COLOUR)
    assert torch.allclose(augment_batch(x, cfg, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_grayscale_output_has_equal_channels():
    x = _batch(8)
    cfg = AugmentConfig(jitter_p=0.0, grayscale_p=1.0, blur_p=0.5)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    # and p = 0.2 greys about a fifth of a large batch, not all or none
    many = augment_batch(_batch(200, size=8), AugmentConfig(jitter_p=0.0, blur_p=0.0),
                         torch.Generator().manual_seed(2))
    grey = ((many[:, 0] - many[:, 1]).abs().amax(dim=(1, 2)) < 1e-6).float().mean()
    assert 0.1 < float(grey) < 0.3


def test_hue_shift_moves_a_pure_colour():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    green = adjust_hue(red, torch.tensor([1 / 3]))  # a third of a turn: red -> green
    assert torch.allclose(green[:, 1], torch.ones(1, 4, 4), atol=1e-5)
    assert float(green[:, 0].abs().max()) < 1e-5 and float(green[:, 2].abs().max()) < 1e-5
    small = adjust_hue(red, torch.tensor([0.05]))  # a small shift adds some green to red
    assert float(small[:, 1].mean()) > 0.2 and float(small[:, 0].mean()) > 0.99
    x = _batch(4)
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)
    # through the batched jitter: hue only, at full strength, changes a pure colour's channels
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, brightness=0,
                        contrast=0, saturation=0, hue=0.5, jitter_p=1.0, grayscale_p=0.0,
                        blur_p=0.0)
    out = augment_batch(red.expand(8, -1, -1, -1).contiguous(), cfg,
                        torch.Generator().manual_seed(0))
    assert float((out - red).abs().amax()) > 0.5


def test_output_is_the_training_size_from_a_larger_decode():
    x = _batch(6, size=40)
    out = augment_batch(x, AugmentConfig(out_size=28), torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 28, 28)
    # a full-image crop of a smooth image at a smaller size is that image, resized
    ramp = torch.linspace(0, 1, 40)[None, None, None, :].expand(2, 3, 40, 40).contiguous()
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, out_size=20,
                        **NO_COLOUR)
    small = augment_batch(ramp, cfg, torch.Generator().manual_seed(0))
    assert small.shape == (2, 3, 20, 20)
    assert torch.allclose(small[0, 0, 0], torch.nn.functional.interpolate(
        ramp, size=(20, 20), mode="bilinear", align_corners=False)[0, 0, 0], atol=1e-4)


def test_one_channel_images_skip_saturation_hue_and_grayscale():
    x = _batch(8, c=1)
    a = augment_batch(x, AugmentConfig(saturation=0.9, hue=0.5, grayscale_p=1.0),
                      torch.Generator().manual_seed(0))
    b = augment_batch(x, AugmentConfig(saturation=0.0, hue=0.0, grayscale_p=0.0),
                      torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)


def test_config_keys_reach_the_augmentation():
    cfg = AugmentSection(saturation=0.2, hue=0.05, jitter_p=0.5, grayscale_p=0.1,
                         blur_sigma_min=0.2, blur_sigma_max=2.0).to_augment_config(out_size=32)
    assert (cfg.saturation, cfg.hue, cfg.jitter_p, cfg.grayscale_p) == (0.2, 0.05, 0.5, 0.1)
    assert cfg.blur_sigma == (0.2, 2.0) and cfg.out_size == 32
    with pytest.raises(ValueError, match="blur_sigma_min <= blur_sigma_max"):
        AugmentSection(blur_sigma_min=2.0, blur_sigma_max=1.0)


def _crop_areas(mode: str, n: int = 20000, h: int = 28, w: int = 28,
                low: float = AugmentConfig().crop_scale[0]) -> tuple[torch.Tensor, ...]:
    from sdr_edge.data.augment import _crop_affine

    cfg = AugmentConfig(crop_mode=mode, crop_scale=(low, 1.0), flip=False)
    theta = _crop_affine(n, h, w, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    sx, sy, tx, ty = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    return sx * sy, sx, sy, tx, ty


@pytest.mark.parametrize("mode", ["clamped", "torchvision"])
def test_every_crop_lies_inside_the_image_and_within_the_area_range(mode):
    area, sx, sy, tx, ty = _crop_areas(mode)
    assert (tx.abs() + sx <= 1 + 1e-5).all() and (ty.abs() + sy <= 1 + 1e-5).all()
    lo, hi = AugmentConfig().crop_scale
    assert area.max() <= hi + 1e-5
    # torchvision's sides fit as drawn (area >= lo); a clamped side only shrinks the area
    assert area.min() >= (lo if mode == "torchvision" else lo * 3 / 4) - 1e-5


def test_clamped_crops_are_larger_than_torchvisions_at_the_same_scale():
    clamped, torchvision = _crop_areas("clamped")[0], _crop_areas("torchvision")[0]
    # one draw clamped keeps whole-extent crops that torchvision redraws (module docstring);
    # at the default 0.4-1 torchvision's mean area is the pre-rewrite clamped 0.3-1 one's, 0.64
    old = _crop_areas("clamped", low=0.3)[0]
    assert abs(torchvision.mean() - old.mean()) < 0.01 and abs(old.mean() - 0.64) < 0.01
    assert clamped.mean() > torchvision.mean() + 0.03
    assert (clamped > 0.9).float().mean() > 2 * (torchvision > 0.9).float().mean()
    # on a wide image the clamp keeps the full height where torchvision would redraw
    wide = _crop_areas("clamped", h=16, w=64)[2]
    assert (wide > 0.999).any()


def test_crop_mode_is_checked_in_the_config_and_the_library():
    assert AugmentSection().crop_mode == "torchvision" and AugmentSection().crop_min == 0.4
    assert AugmentSection().to_augment_config().crop_scale == AugmentConfig().crop_scale
    assert AugmentSection(crop_mode="clamped").to_augment_config().crop_mode == "clamped"
    with pytest.raises(ValueError, match="crop_mode"):
        AugmentSection(crop_mode="random")
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        augment_batch(_batch(2), AugmentConfig(crop_mode="random"), torch.Generator())
