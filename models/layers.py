"""Small pieces the diffusion transformers share: timestep sinusoids and their MLP, the fp32
RMSNorm, the rotation of interleaved pairs that Lumina-Next's and FLUX's RoPE apply, the
patch grid that Lumina-Next and SD3 cut their latents into, the adaLN modulation and the MLP
activation done in place, and `IncrementBlock`, the form of every block that AccelAes runs on
a subset of the tokens.

On a CPU a block's time goes to its matmuls and, next, to the fresh tensors of the tokens'
size (every new page is zeroed by the system before it is written): so the pieces here work in
place on temporaries wherever the references' rounding allows (benchmark.py --peers measures it)."""

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


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The (rows, cols) of tokens a height x width latent is cut into; sizes the patches do not tile are refused."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int, channels: int) -> torch.Tensor:
    """A DiT final layer's tokens [B, N, p*p*C], row-major, each ordered (ph, pw, c) -> [B, C, H, W]."""
    p = patch_size
    x = tokens.view(tokens.shape[0], height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(tokens.shape[0], channels, height, width)


def modulate_(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN in place: x * (1 + scale) + shift, scale and shift [B, 1, D] broadcast over the tokens
    of x [B, N, D]. x must be a temporary (a norm's output), which is overwritten: the blocks'
    largest costs after the matmuls are fresh tensors of the tokens' size. Multiply, then add,
    as the references round (a fused addcmul rounds once, and moves SD3 away from diffusers by
    more than its parity test allows)."""
    return x.mul_(1 + scale).add_(shift)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) in place: the MLPs call it on their first projection's output,
    a temporary as large as the tokens times the MLP width, which needs no second copy."""
    return torch.ops.aten.gelu_(x, approximate="tanh")


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at token indices [B, K] -> [B, K, D]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class IncrementBlock(nn.Module):
    """A transformer block written as what it adds to its tokens, so that AccelAes can update
    some of the rows only (docs/method.md). Each model's blocks define the two parts; the
    block's update is their sum, and its forward the residual of that.

    Both parts read the block's adaLN modulation, which depends on the step alone: the model's
    forward loop computes it once per block (`adaln`) and hands it over in the block's step
    (`step.adaln`), so neither part, nor AccelAes' attention-only path that calls them apart,
    computes it again. A block called on its own (step.adaln None) computes it itself."""

    def adaln(self, step):
        """The block's adaLN modulation of this step, in whatever form its two parts read it."""
        raise NotImplementedError

    def modulation_in(self, step):
        """This block's modulation: the one its forward loop computed (step.adaln), or computed here."""
        return step.adaln if step.adaln is not None else self.adaln(step)

    def attention_increment(self, tokens: torch.Tensor, step, focus: torch.Tensor | None = None) -> torch.Tensor:
        """What the attention adds to the rows of tokens [B, N, D] listed in focus [B, F] ([B, F, D];
        every row when focus is None): queries of those rows, keys and values of every token (paper Eq. 9).
        `step` is the model's StepInputs, what every block of one forward shares."""
        raise NotImplementedError

    def ffn_increment(self, rows: torch.Tensor, attended: torch.Tensor, step) -> torch.Tensor:
        """What the FFN adds to token rows given their attention increments (the same rows):
        token-wise, so any subset of rows (paper Eq. 10)."""
        raise NotImplementedError

    def increment(self, tokens: torch.Tensor, step, focus: torch.Tensor | None = None) -> torch.Tensor:
        """What the block adds to the rows of tokens listed in focus (all rows when None). The
        parts return new tensors, so the sum is taken in place, into the FFN's."""
        rows = tokens if focus is None else gather_rows(tokens, focus)
        attended = self.attention_increment(tokens, step, focus)
        return self.ffn_increment(rows, attended, step).add_(attended)

    def forward(self, tokens: torch.Tensor, step) -> torch.Tensor:
        return self.increment(tokens, step).add_(tokens)      # a new tensor: summed in place


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x[2j], x[2j+1]) of x [B, H, N, D] by each token's angles, in fp32.

    cos, sin: [N, D/2], or [B, 1, N, D/2] when each sample has its own rows (AccelAes' focus).
    Each pair is a complex number times e^(i angle): one complex multiply reads x once and
    writes the result once, where the same sums in real arithmetic make six passes (the values
    are the same to the bit)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)
