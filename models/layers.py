"""Small pieces the diffusion transformers share: timestep sinusoids and their MLP, the fp32
RMSNorm, and the rotation of interleaved pairs that Lumina-Next's and FLUX's RoPE apply."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_sinusoids(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] values -> [B, dim] fp32: [cos | sin] of t * max_period^(-i/half), i = 0..half-1 (DiT's
    embedding; diffusers' Timesteps with flip_sin_to_cos=True, downscale_freq_shift=0). Each model
    scales t its own way first (Lumina-Next: t in [0, 1]; SD3: sigma * 1000; FLUX: t * 1000)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoids -> Linear, SiLU, Linear (parameters mlp.0, mlp.2)."""

    frequencies = 256

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoids(t, self.frequencies).to(self.mlp[0].weight.dtype))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in fp32 and cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """rms_normalize, then times a learnt weight (Lumina-Next's norms, SD3.5's qk-norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x[2j], x[2j+1]) of x [B, H, N, D] by each token's angles, in fp32.

    cos, sin: [N, D/2], or [B, 1, N, D/2] when each sample has its own rows (AccelAes' focus)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
