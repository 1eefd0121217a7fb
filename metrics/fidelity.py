"""PSNR and SSIM of a sample against a reference image (the same prompt and seed, full computation).

Both read RGB pixels in [0, 1] (uint8 / 255) with data range 1, per image:

  - PSNR = 10 log10(1 / MSE), the MSE over channels and pixels of one image. torchmetrics'
    default reduces over the whole batch at once instead; per image, as here, is its
    `reduction="none", dim=(1, 2, 3)`. Identical images give +inf.
  - SSIM as torchmetrics (>= 1.4.2) computes it: a gaussian window (sigma 1.5, 11 taps:
    int(3.5 sigma + 0.5) * 2 + 1), k1 0.01, k2 0.03, each RGB channel on its own, population
    (window-weighted) statistics with the variances clamped at 0, reflect padding of 5 so the
    SSIM map has the image's size, averaged over the map and the channels.

Computed in float64: SSIM's variances are differences of window means, which float32 rounds
coarsely on flat regions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import unit_pixels

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B] PSNR in dB of each image against its reference; images, references: [B, C, H, W]."""
    _check_pair(images, references)
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1-D window, summing to 1; the 2-D window is its outer product (applied as two passes)."""
    taps = int(3.5 * sigma + 0.5) * 2 + 1
    offsets = torch.arange(taps, dtype=dtype, device=device) - (taps - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Each channel of x convolved with the 2-D gaussian, valid region only (x is already padded)."""
    channels, taps = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, taps, 1).expand(channels, 1, taps, 1), groups=channels)
    return F.conv2d(x, window.view(1, 1, 1, taps).expand(channels, 1, 1, taps), groups=channels)


def ssim(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B] mean SSIM of each image against its reference; images, references: [B, C, H, W]."""
    _check_pair(images, references)
    x, y = images.double(), references.double()
    window = _gaussian_window(SSIM_SIGMA, x.dtype, x.device)
    pad = (window.numel() - 1) // 2
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = (_blur(x * x, window) - mu_x ** 2).clamp_min(0)
    var_y = (_blur(y * y, window) - mu_y ** 2).clamp_min(0)
    cov = _blur(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def _check_pair(images: torch.Tensor, references: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape != references.shape:
        raise ValueError(f"images {list(images.shape)} and references {list(references.shape)} must both be "
                         "[B, C, H, W] of one shape: compare each sample with the reference of the same size")


def _unit_batch(images: Sequence[Image.Image], device: torch.device | str) -> torch.Tensor:
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"the images have several sizes ({sorted(sizes)[:3]}); score one size at a time")
    return torch.stack([unit_pixels(image, torch.float64) for image in images]).to(device)


def psnr_of_images(images: Sequence[Image.Image], references: Sequence[Image.Image],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] float64 on the CPU: PSNR (dB) of each RGB image against its reference, data range 1."""
    return psnr(_unit_batch(images, device), _unit_batch(references, device)).cpu()


def ssim_of_images(images: Sequence[Image.Image], references: Sequence[Image.Image],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] float64 on the CPU: SSIM of each RGB image against its reference, data range 1."""
    return ssim(_unit_batch(images, device), _unit_batch(references, device)).cpu()
