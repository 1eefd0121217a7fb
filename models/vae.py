"""AutoencoderKL: the image <-> latent autoencoder of SD 1.x / SDXL (4 latent channels) and SD3 / FLUX (16).

All of them share one architecture, that of the original latent-diffusion code: a convolutional
encoder and decoder of ResNet blocks, with one single-head self-attention in the middle of each.
Parameters carry the original LDM names (also those of FLUX's `ae.safetensors` and of SD3's
`first_stage_model.*`); diffusers folders are renamed onto them by `vae_layout`.

    encode: images [B, 3, H, W] in [-1, 1] -> DiagonalGaussian over latents [B, C, H/f, W/f]
    decode: latents [B, C, H/f, W/f] -> images [B, 3, H, W], roughly in [-1, 1]

with f = 2 ** (levels - 1), 8 for every released model.

The latent scaling and shift (SDXL 0.13025; SD3 z * 1.5305 after - 0.0609; FLUX 0.3611 and
0.1159) are NOT applied here: each pipeline owns its own constants, and this module works on the
raw latents the decoder was trained on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .checkpoint import Checkpoint, CheckpointError, build_on_meta, load_model
from .keys import AsConv1x1, Layout, Shapes, find_prefix, renamed


@dataclass(frozen=True)
class VAEParams:
    image_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # one per resolution level, highest first
    resnets_per_block: int = 2    # per encoder level; decoder levels have one more
    use_quant_conv: bool = False  # 1x1 convs around the latent: SD / SDXL have them, SD3 / FLUX not
    has_encoder: bool = True      # some single files ship only the decoder
    groups: int = 32
    eps: float = 1e-6

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> "VAEParams":
        """Infer the parameters from tensor shapes under OUR names (see `Layout.shapes`).

        `config` (a diffusers config.json) is read only for what shapes cannot say: the number
        of GroupNorm groups.
        """
        s = Shapes(shapes, config, "AutoencoderKL")
        latent_channels = s["decoder.conv_in.weight"][1]
        image_channels = s["decoder.conv_out.weight"][0]

        # Each decoder level's first resnet outputs that level's width; up.0 is the highest resolution.
        levels = s.count("decoder.up")
        if levels == 0:
            raise CheckpointError("this VAE checkpoint has no decoder.up.* blocks; "
                                  "it is not an AutoencoderKL")
        widths = [s[f"decoder.up.{level}.block.0.conv1.weight"][0] for level in range(levels)]
        base = widths[0]
        if any(width % base for width in widths):
            raise CheckpointError(f"this VAE's level widths {widths} are not multiples of the first; "
                                  "an unsupported variant")

        has_encoder = any(name.startswith("encoder.") for name in shapes)
        decoder_resnets = s.count("decoder.up.0.block")
        resnets = s.count("encoder.down.0.block") if has_encoder else decoder_resnets - 1
        if decoder_resnets != resnets + 1:
            raise CheckpointError(f"this VAE has {resnets} resnets per encoder level but {decoder_resnets} "
                                  "per decoder level; an AutoencoderKL has one more in the decoder")

        groups = s.config.get("norm_num_groups", 32)
        if any(width % groups for width in widths):
            raise CheckpointError(f"this VAE's widths {widths} cannot be split into {groups} GroupNorm "
                                  "groups; give the model's config.json (norm_num_groups) beside the weights")

        return cls(
            image_channels=image_channels,
            latent_channels=latent_channels,
            base_channels=base,
            channel_multipliers=tuple(width // base for width in widths),
            resnets_per_block=resnets,
            # A decoder-only file has post_quant_conv but no quant_conv (which sits after the encoder).
            use_quant_conv="post_quant_conv.weight" in shapes or "quant_conv.weight" in shapes,
            has_encoder=has_encoder,
            groups=groups,
        )

    @property
    def widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_multipliers]


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours: the original LDM names (also FLUX's `ae.safetensors`):
#   {encoder,decoder}.conv_in, encoder.down.I.block.J.*, encoder.down.I.downsample.conv,
#   {encoder,decoder}.mid.{block_1,attn_1.{norm,q,k,v,proj_out},block_2}, decoder.up.I.block.J.*,
#   decoder.up.I.upsample.conv, {encoder,decoder}.{norm_out,conv_out}, [post_]quant_conv.
#   Resnet: norm1, conv1, norm2, conv2, nin_shortcut. up.0 is the highest resolution.
# ---------------------------------------------------------------------------------------------

def vae_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The VAE in the original LDM layout (`first_stage_model.` in full checkpoints) or diffusers'."""
    keys = list(keys)
    # Both layouts end their decoder input convolution in `decoder.conv_in.weight`; diffusers is
    # told apart by its up_blocks.
    prefix, _ = find_prefix(keys, ["decoder.conv_in.weight"], "VAE", prefix)
    if not any(k.startswith(prefix + "decoder.up_blocks.") for k in keys):
        return Layout("LDM VAE", prefix, renamed(keys, prefix, []))

    up_blocks = 1 + max(int(m.group(1)) for k in keys
                        if (m := re.match(re.escape(prefix) + r"decoder\.up_blocks\.(\d+)\.", k)))
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        # diffusers counts decoder blocks from the lowest resolution, LDM from the highest.
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_blocks - 1 - int(m.group(1))}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_blocks - 1 - int(m.group(1))}.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        # Current diffusers names, then the ones of older diffusers files.
        (r"attn_1\.group_norm\.", "attn_1.norm."),
        (r"attn_1\.(to_q|query)\.", "attn_1.q."), (r"attn_1\.(to_k|key)\.", "attn_1.k."),
        (r"attn_1\.(to_v|value)\.", "attn_1.v."), (r"attn_1\.(to_out\.0|proj_attn)\.", "attn_1.proj_out."),
        (r"conv_norm_out\.", "norm_out."),
    ]
    mapping = {name: (AsConv1x1(src.key) if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name) else src)
               for name, src in renamed(keys, prefix, rules).items()}
    return Layout("diffusers VAE", prefix, mapping)


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior: per-latent mean and log-variance (clamped to [-30, 20], as trained)."""
    mean: Tensor
    logvar: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        mean = self.mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def _norm(channels: int, p: VAEParams) -> nn.GroupNorm:
    return nn.GroupNorm(p.groups, channels, eps=p.eps, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, p: VAEParams):
        super().__init__()
        self.norm1 = _norm(in_channels, p)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, p)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the width changes (the first resnet of some levels).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with C-wide 1x1-conv projections."""

    def __init__(self, channels: int, p: VAEParams):
        super().__init__()
        self.norm = _norm(channels, p)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(batch, 1, channels, height * width).transpose(2, 3)

        h = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        h = h.transpose(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right and bottom only, as trained (a symmetric padding=1 shifts the image by a pixel).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, p: VAEParams):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, p)
        self.attn_1 = AttnBlock(channels, p)
        self.block_2 = ResnetBlock(channels, channels, p)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _resnets(in_channels: int, out_channels: int, count: int, p: VAEParams) -> nn.Sequential:
    """A level's resnets, run in turn: the first changes the width, the others keep it."""
    return nn.Sequential(*(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, p)
                           for i in range(count)))


# A level runs its parts in the order they are set: nn.Sequential's forward.

class DownLevel(nn.Sequential):
    """One encoder resolution level: resnets, then (all but the lowest level) a 2x downsample."""

    def __init__(self, in_channels: int, out_channels: int, p: VAEParams, downsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, p.resnets_per_block, p)
        if downsample:
            self.downsample = Downsample(out_channels)


class UpLevel(nn.Sequential):
    """One decoder resolution level: one resnet more than the encoder's, then (all but the highest
    level) a 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, p: VAEParams, upsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, p.resnets_per_block + 1, p)
        if upsample:
            self.upsample = Upsample(out_channels)


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder
# ---------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        widths = p.widths
        self.conv_in = nn.Conv2d(p.image_channels, widths[0], 3, padding=1)
        inputs = widths[:1] + widths[:-1]
        self.down = nn.ModuleList(DownLevel(inputs[i], widths[i], p, downsample=i != len(widths) - 1)
                                  for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], p)
        self.norm_out = _norm(widths[-1], p)
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.latent_channels, 3, padding=1)  # mean | logvar

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        widths = p.widths
        self.conv_in = nn.Conv2d(p.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], p)
        # up[i] mirrors encoder level i (up.0 is the highest resolution); they run from the last.
        inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(UpLevel(inputs[i], widths[i], p, upsample=i != 0) for i in range(len(widths)))
        self.norm_out = _norm(widths[0], p)
        self.conv_out = nn.Conv2d(widths[0], p.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, params: VAEParams):
        super().__init__()
        self.params = params
        if params.has_encoder:
            self.encoder = Encoder(params)
            if params.use_quant_conv:
                self.quant_conv = nn.Conv2d(2 * params.latent_channels, 2 * params.latent_channels, 1)
        if params.use_quant_conv:
            self.post_quant_conv = nn.Conv2d(params.latent_channels, params.latent_channels, 1)
        self.decoder = Decoder(params)

    @property
    def downscale(self) -> int:
        """Pixels per latent, along each side."""
        return 2 ** (len(self.params.channel_multipliers) - 1)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """images [B, 3, H, W] in [-1, 1], H and W multiples of `downscale` -> the latent posterior."""
        if not self.params.has_encoder:
            raise RuntimeError("this VAE was loaded from a decoder-only file and cannot encode; "
                               "load a file that holds encoder.* too")
        moments = self.encoder(images.to(self.decoder.conv_in.weight.dtype))
        if self.params.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents (no pipeline scaling) [B, C, h, w] -> images [B, 3, h*f, w*f], roughly in [-1, 1].

        Latents are cast to the weights' dtype, so a fp32 sampler may feed a bf16 VAE."""
        z = latents.to(self.decoder.conv_in.weight.dtype)
        if self.params.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_vae(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
             dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> AutoencoderKL:
    """Load an AutoencoderKL from an LDM-layout file (FLUX `ae.safetensors`, SD3's `first_stage_model.`),
    a diffusers `vae/` folder, or an already-open Checkpoint holding several models.

    `prefix` says where the VAE sits when the file holds several (e.g. "first_stage_model.");
    `dtype` None keeps the file's dtype.
    """
    return load_model(path_or_checkpoint, vae_layout,
                      lambda shapes, config: AutoencoderKL(VAEParams.from_shapes(shapes, config)),
                      prefix=prefix, dtype=dtype, device=device)


def tiny_random_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """A small randomly initialised VAE (same code paths, 8x downscale) for demos with no weights.

    Deterministic for a given seed, whatever the global RNG state.
    """
    params = VAEParams(latent_channels=latent_channels, base_channels=32, channel_multipliers=(1, 2, 2, 2),
                       resnets_per_block=1, use_quant_conv=latent_channels == 4)
    model = build_on_meta(lambda: AutoencoderKL(params))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.dim() == 1 and ("norm" in name) and name.endswith("weight"):
            state[name] = 1 + 0.1 * noise      # GroupNorm scales near 1
        elif tensor.dim() == 1:
            state[name] = 0.02 * noise         # biases
        else:
            fan_in = tensor[0].numel()         # variance-preserving init keeps activations O(1)
            state[name] = noise / fan_in ** 0.5
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
