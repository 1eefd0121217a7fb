"""Stable Diffusion 3 / 3.5's MMDiT: a joint-attention diffusion transformer over 16-channel latents.

The model of Stability AI's reference code (github.com/Stability-AI/sd3.5, mmditx.py), checked
number for number against diffusers' `SD3Transformer2DModel` (tests/test_mmdit.py), called the
way diffusers' SD3 pipeline calls it: with timestep = sigma * 1000.

Parameter names are the original SD3 ones (`model.diffusion_model.*` in sd3_medium.safetensors
and the SD3.5 single files); the diffusers layout is renamed onto them by `mmdit_layout`.

Each joint block has two streams with their own weights, `context_block` for the text tokens
and `x_block` for the image tokens, that meet in one attention over all tokens:

    shift, scale, gate (msa, mlp) = adaLN_modulation(c)                 # per stream
    q, k, v = qkv(LN(tokens) * (1 + scale_msa) + shift_msa)             # per stream, then joined
    tokens += gate_msa * proj(attention(q, k, v over text + image))     # per stream
    tokens += gate_mlp * mlp(LN(tokens) * (1 + scale_mlp) + shift_mlp)  # per stream

SD3.5-Medium's first blocks add to the image stream a second, image-only self-attention
(`x_block.attn2`) fed from the same normalised tokens with its own shift/scale/gate. The last
block's text stream is `pre_only`: it only gives keys and values, and its output is dropped.

For AccelAes the model keeps ONE token tensor through the blocks, [text | image], and each
block exposes `increment(tokens, step, focus)`: the update of some of the rows, with queries,
output projections and MLPs for those rows only, but keys and values from every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionProbe, attention, merge_heads, split_heads
from .layers import (IncrementBlock, RMSNorm, TimestepEmbedder, gather_rows, gelu_tanh_, modulate_, patch_grid,
                     unpatchify)
from .checkpoint import Checkpoint, CheckpointError, load_model
from .keys import Layout, Shapes, SwappedHalves, find_prefix, fused, renamed


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MMDiTParams:
    """Sizes of an MMDiT. The defaults are SD3-Medium's."""
    depth: int = 24
    hidden: int = 1536                          # 64 * depth in every release
    heads: int = 24                             # = depth in every release: heads of 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max: int = 192                    # side of the stored position table (SD3.5-M: 384)
    context_dim: int = 4096                     # width of the text sequence (CLIP states padded to T5's)
    pooled_dim: int = 2048                      # CLIP-L pooled (768) + CLIP-G pooled (1280)
    qk_norm: bool = False                       # SD3.5: RMSNorm of each query/key head
    dual_attention_layers: tuple[int, ...] = () # blocks whose image stream has attn2 (SD3.5-M: 0..12)
    mlp_ratio: int = 4
    eps: float = 1e-6                           # every LayerNorm and RMSNorm

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None,
                    heads: int | None = None) -> "MMDiTParams":
        """Infer the sizes from the tensor shapes of a checkpoint (in OUR parameter names).

        Everything but the number of heads (see `_heads`) is in the shapes: the width and the
        patch from the patch convolution, the depth from the joint_blocks present, the position
        grid from sqrt(pos_embed.shape[1]), qk-norm from the ln_k keys, the dual-attention blocks
        from the attn2 keys. A config.json is cross-checked against the shapes.
        """
        s = Shapes(shapes, config, "SD3 MMDiT")
        config = s.config
        s.agree("_class_name", "SD3Transformer2DModel", "the tensors of an")

        hidden, in_channels, patch_size, patch_w = s["x_embedder.proj.weight"]
        if patch_size != patch_w:
            raise CheckpointError(f"x_embedder.proj has a {patch_size}x{patch_w} kernel; SD3 patches are square")
        s.agree("patch_size", patch_size, "patch size")
        s.agree("in_channels", in_channels, "in_channels")
        outputs = s["final_layer.linear.weight"][0]
        out_channels, rest = divmod(outputs, patch_size ** 2)
        if rest:
            raise CheckpointError(f"final_layer.linear has {outputs} outputs, "
                                  f"not {patch_size}x{patch_size} patches of whole channels")
        s.agree("out_channels", out_channels, "out_channels")

        depth = s.count("joint_blocks")
        s.agree("num_layers", depth, "joint blocks")
        grid = math.isqrt(s["pos_embed"][1])
        if grid * grid != s["pos_embed"][1]:
            raise CheckpointError(f"pos_embed has {s['pos_embed'][1]} rows, not a square grid")
        s.agree("pos_embed_max_size", grid, "a position grid of side")

        qk_norm = "joint_blocks.0.context_block.attn.ln_k.weight" in s
        if "qk_norm" in config and config["qk_norm"] != ("rms_norm" if qk_norm else None):
            raise CheckpointError(f"config.json says qk_norm={config['qk_norm']!r} but the weights have "
                                  f"{'RMS qk-norm' if qk_norm else 'no qk-norm'}: the config belongs to another model")
        dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in s)
        s.agree("dual_attention_layers", dual, "dual-attention layers")
        heads = _heads(s, hidden, qk_norm, heads)

        context_width, context_dim = s["context_embedder.weight"]
        if context_width != hidden:
            # diffusers allows caption_projection_dim != width; no release (nor the joint attention) does.
            raise CheckpointError(f"context_embedder projects to {context_width}, not the width {hidden}")
        s.agree("joint_attention_dim", context_dim, "a text width of")
        pooled_dim = s["y_embedder.mlp.0.weight"][1]
        s.agree("pooled_projection_dim", pooled_dim, "a pooled width of")
        mlp_ratio, rest = divmod(s["joint_blocks.0.x_block.mlp.fc1.weight"][0], hidden)
        if rest:
            raise CheckpointError(f"mlp.fc1 has {s['joint_blocks.0.x_block.mlp.fc1.weight'][0]} rows, "
                                  f"not a multiple of the width {hidden}")

        return cls(depth=depth, hidden=hidden, heads=heads, patch_size=patch_size, in_channels=in_channels,
                   out_channels=out_channels, pos_embed_max=grid, context_dim=context_dim, pooled_dim=pooled_dim,
                   qk_norm=qk_norm, dual_attention_layers=dual, mlp_ratio=mlp_ratio)


def _heads(s: Shapes, hidden: int, qk_norm: bool, heads: int | None) -> int:
    """The head count, in this order of trust: `heads` (tests), the qk-norm weights (one per head
    channel), config.json (num_attention_heads), the releases' heads of 64 (sd3.5's reference's)."""
    if heads is None and qk_norm:
        heads = hidden // s["joint_blocks.0.x_block.attn.ln_q.weight"][0]
    if heads is None and s.config.get("num_attention_heads"):
        heads = int(s.config["num_attention_heads"])
    if heads is None:
        heads = hidden // 64
    if heads <= 0 or hidden % heads:
        raise CheckpointError(f"width {hidden} does not split into {heads} heads")
    s.agree("num_attention_heads", heads, "attention heads")
    s.agree("attention_head_dim", hidden // heads, "a head size of")
    return heads


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours: the original SD3 names (sd3_medium.safetensors, under
# `model.diffusion_model.`); diffusers' SD3Transformer2DModel names are renamed onto them.
# ---------------------------------------------------------------------------------------------

_ORIGINAL_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
_DIFFUSERS_MARKER = "pos_embed.pos_embed"  # SD3's own crop table (diffusers' FLUX has joint blocks too)
_BLOCK = r"^transformer_blocks\.(\d+)\."
_DIFFUSERS_RULES = [
    # q, k, v stored apart: renamed to parts of the fused qkv (`qkv.q.weight`), joined by fused().
    (_BLOCK + r"attn\.to_([qkv])\.", r"joint_blocks.\1.x_block.attn.qkv.\2."),
    (_BLOCK + r"attn\.add_([qkv])_proj\.", r"joint_blocks.\1.context_block.attn.qkv.\2."),
    (_BLOCK + r"attn2\.to_([qkv])\.", r"joint_blocks.\1.x_block.attn2.qkv.\2."),
    (_BLOCK + r"attn\.norm_([qk])\.", r"joint_blocks.\1.x_block.attn.ln_\2."),
    (_BLOCK + r"attn\.norm_added_([qk])\.", r"joint_blocks.\1.context_block.attn.ln_\2."),
    (_BLOCK + r"attn2\.norm_([qk])\.", r"joint_blocks.\1.x_block.attn2.ln_\2."),
    (_BLOCK + r"attn\.to_out\.0\.", r"joint_blocks.\1.x_block.attn.proj."),
    (_BLOCK + r"attn\.to_add_out\.", r"joint_blocks.\1.context_block.attn.proj."),
    (_BLOCK + r"attn2\.to_out\.0\.", r"joint_blocks.\1.x_block.attn2.proj."),
    (_BLOCK + r"ff\.net\.0\.proj\.", r"joint_blocks.\1.x_block.mlp.fc1."),
    (_BLOCK + r"ff\.net\.2\.", r"joint_blocks.\1.x_block.mlp.fc2."),
    (_BLOCK + r"ff_context\.net\.0\.proj\.", r"joint_blocks.\1.context_block.mlp.fc1."),
    (_BLOCK + r"ff_context\.net\.2\.", r"joint_blocks.\1.context_block.mlp.fc2."),
    (_BLOCK + r"norm1\.linear\.", r"joint_blocks.\1.x_block.adaLN_modulation.1."),
    (_BLOCK + r"norm1_context\.linear\.", r"joint_blocks.\1.context_block.adaLN_modulation.1."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^pos_embed\.proj\.", "x_embedder.proj."),
    (r"^pos_embed\.pos_embed$", "pos_embed"),
    (r"^time_text_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^time_text_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^time_text_embed\.text_embedder\.linear_1\.", "y_embedder.mlp.0."),
    (r"^time_text_embed\.text_embedder\.linear_2\.", "y_embedder.mlp.2."),
]


def mmdit_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The SD3 MMDiT in its original layout or diffusers' (SD3Transformer2DModel)."""
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_ORIGINAL_MARKER, _DIFFUSERS_MARKER], "SD3 MMDiT", prefix)
    if marker == _ORIGINAL_MARKER:
        return Layout("original SD3 MMDiT", prefix, renamed(keys, prefix, []))
    # Where the text stream is pre_only (the last block: no output projection), diffusers'
    # norm1_context is an AdaLayerNormContinuous, which splits (scale, shift) where the original
    # splits (shift, scale); so is norm_out.
    names = renamed(keys, prefix, _DIFFUSERS_RULES)
    blocks = {name.split(".")[1] for name in names if name.startswith("joint_blocks.")}
    pre_only = [i for i in blocks if f"joint_blocks.{i}.context_block.attn.proj.weight" not in names]
    swapped = ("final_layer.adaLN_modulation.1.", *(f"joint_blocks.{i}.context_block.adaLN_modulation.1."
                                                    for i in pre_only))
    mapping = {name: SwappedHalves(source.key) if name.startswith(swapped) else source
               for name, source in names.items()}
    return Layout("diffusers SD3 MMDiT", prefix, fused(mapping, {"qkv": ("q", "k", "v")}))


# ---------------------------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------------------------

class VectorEmbedder(nn.Module):
    """The pooled CLIP vector -> Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), width]: a p x p stride-p convolution, tokens row-major."""

    def __init__(self, p: MMDiTParams):
        super().__init__()
        self.proj = nn.Conv2d(p.in_channels, p.hidden, kernel_size=p.patch_size, stride=p.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1, GELU (tanh approximation), fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh_(self.fc1(x)))


class Attention(nn.Module):
    """One stream's projections: fused qkv ([q | k | v], each head-major), per-head qk-norm, proj.

    Queries and keys/values are computed apart (from the rows of the fused weight), so a caller
    can ask for the queries of a few tokens and the keys/values of all of them. The attention
    itself runs in the block, where the streams meet.
    """

    def __init__(self, p: MMDiTParams, pre_only: bool = False):
        super().__init__()
        self.heads, self.width = p.heads, p.hidden
        self.qkv = nn.Linear(p.hidden, 3 * p.hidden)
        if p.qk_norm:
            self.ln_q = RMSNorm(p.head_dim, p.eps)
            self.ln_k = RMSNorm(p.head_dim, p.eps)
        else:
            self.ln_q = self.ln_k = nn.Identity()
        # The last block's text stream only lends keys and values: no output projection.
        self.proj = None if pre_only else nn.Linear(p.hidden, p.hidden)

    def _project(self, h: torch.Tensor, part: slice) -> torch.Tensor:
        return F.linear(h, self.qkv.weight[part], self.qkv.bias[part])

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """[B, N, width] modulated tokens -> q [B, heads, N, head_dim]."""
        return self.ln_q(split_heads(self._project(h, slice(0, self.width)), self.heads))

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, width] modulated tokens -> k, v [B, heads, N, head_dim]."""
        k, v = self._project(h, slice(self.width, 3 * self.width)).chunk(2, dim=-1)
        return self.ln_k(split_heads(k, self.heads)), split_heads(v, self.heads)


class Modulation(NamedTuple):
    """adaLN outputs of one stream, each [B, 1, width]: 2, 6 or 9 of them, in the checkpoint's order."""
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor | None = None
    shift_mlp: torch.Tensor | None = None
    scale_mlp: torch.Tensor | None = None
    gate_mlp: torch.Tensor | None = None
    shift_msa2: torch.Tensor | None = None     # the image stream's attn2 (SD3.5-M)
    scale_msa2: torch.Tensor | None = None
    gate_msa2: torch.Tensor | None = None


class StreamBlock(nn.Module):
    """One stream (text or image) of a joint block: the original `DismantledBlock`.

    The norms are LayerNorms without affine parameters, so they hold no weights.
    """

    def __init__(self, p: MMDiTParams, pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        self.norm1 = nn.LayerNorm(p.hidden, eps=p.eps, elementwise_affine=False)
        self.attn = Attention(p, pre_only)
        self.attn2 = Attention(p) if dual_attention else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(p.hidden, eps=p.eps, elementwise_affine=False)
            self.mlp = Mlp(p.hidden, p.mlp_ratio * p.hidden)
        # (shift, scale) for the pre_only stream; + gate and the MLP's three; + attn2's three.
        self.chunks = 2 if pre_only else 9 if dual_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.hidden, self.chunks * p.hidden))

    def modulation(self, c: torch.Tensor) -> Modulation:
        return Modulation(*self.adaLN_modulation(c)[:, None, :].chunk(self.chunks, dim=-1))

    def mlp_increment(self, x: torch.Tensor, m: Modulation) -> torch.Tensor:
        """gate_mlp * mlp(modulated norm2(x)): token-wise, so any subset of rows."""
        return self.mlp(modulate_(self.norm2(x), m.shift_mlp, m.scale_mlp)).mul_(m.gate_mlp)


@dataclass
class StepInputs:
    """What every block of one forward shares."""
    c: torch.Tensor                        # [B, width] timestep + pooled-text conditioning
    text_tokens: int                       # L: tokens 0..L-1 are text, L.. are image
    probe: AttentionProbe | None = None    # set per block: shown its image-to-text attention
    adaln: tuple[Modulation, Modulation] | None = None  # set per block: its (text, image) modulations, once


BlockRunner = Callable[[int, nn.Module, torch.Tensor, StepInputs], torch.Tensor]


class JointBlock(IncrementBlock):
    def __init__(self, p: MMDiTParams, index: int):
        super().__init__()
        self.context_block = StreamBlock(p, pre_only=index == p.depth - 1)
        self.x_block = StreamBlock(p, dual_attention=index in p.dual_attention_layers)

    def adaln(self, step: StepInputs) -> tuple[Modulation, Modulation]:
        """The (text, image) streams' modulations."""
        return self.context_block.modulation(step.c), self.x_block.modulation(step.c)

    def attention_increment(self, tokens: torch.Tensor, step: StepInputs,
                            focus: torch.Tensor | None = None) -> torch.Tensor:
        """What the attentions add to rows of tokens [B, L+N, width] ([text | image]).

        focus [B, F], if given, lists the rows to update: all text rows 0..L-1 first, then image
        rows (>= L, ascending); the result is [B, F, width]. Only those rows get queries and
        output projections (text rows with the context stream's weights, image rows with the x
        stream's); keys and values come from every token, so each row sees the whole joint
        sequence (paper Eq. 9). The last block's text rows get a zero update (pre_only: the
        original drops them). With focus None every row is updated.
        """
        L = step.text_tokens
        ctx, xb = self.context_block, self.x_block
        mc, mx = self.modulation_in(step)
        image_rows = None if focus is None else focus[:, L:] - L
        text_out, image_out = self._joint_attention(tokens, step, (mc, mx), image_rows)
        image_attended = xb.attn.proj(image_out).mul_(mx.gate_msa)
        if xb.dual_attention:
            image_attended = image_attended + mx.gate_msa2 * self._image_attention(tokens[:, L:], mx, image_rows)
        text_attended = (torch.zeros_like(tokens[:, :L]) if ctx.pre_only
                         else ctx.attn.proj(text_out).mul_(mc.gate_msa))
        return torch.cat([text_attended, image_attended], dim=1)

    def _joint_attention(self, tokens: torch.Tensor, step: StepInputs, mods: tuple[Modulation, Modulation],
                         image_rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The joint attention's output before the output projections: (text rows [B, L, width],
        None where the text stream is pre_only; the image rows listed in image_rows [B, F], all
        when None). Queries of those rows, keys and values of every token, text first (no RoPE,
        so the order is free). Only the output outlives the call: the normed and projected
        tokens are freed on return, before the projections and the MLP allocate theirs."""
        L = step.text_tokens
        ctx, xb = self.context_block, self.x_block
        mc, mx = mods
        text_h = modulate_(ctx.norm1(tokens[:, :L]), mc.shift_msa, mc.scale_msa)
        image_h = modulate_(xb.norm1(tokens[:, L:]), mx.shift_msa, mx.scale_msa)
        k, v = (torch.cat(pair, dim=2) for pair in zip(ctx.attn.keys_values(text_h), xb.attn.keys_values(image_h)))
        q = xb.attn.queries(image_h if image_rows is None else gather_rows(image_h, image_rows))
        if not ctx.pre_only:
            q = torch.cat([ctx.attn.queries(text_h), q], dim=2)
        first_image_query = 0 if ctx.pre_only else L
        out = merge_heads(attention(q, k, v, probe=step.probe,
                                    probe_span=(slice(first_image_query, None), slice(0, L))))
        return (None if ctx.pre_only else out[:, :L]), out[:, first_image_query:]

    def _image_attention(self, image: torch.Tensor, mx: Modulation,
                         image_rows: torch.Tensor | None) -> torch.Tensor:
        """SD3.5-M's attn2, image tokens only: it reads norm1 of the image tokens (as the joint
        attention does) modulated by its own shift and scale; projected, not gated."""
        xb = self.x_block
        h2 = modulate_(xb.norm1(image), mx.shift_msa2, mx.scale_msa2)
        o2 = attention(xb.attn2.queries(h2 if image_rows is None else gather_rows(h2, image_rows)),
                       *xb.attn2.keys_values(h2))
        return xb.attn2.proj(merge_heads(o2))

    def ffn_increment(self, rows: torch.Tensor, attended: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """What the MLPs add to token rows (text rows first, as in `attention_increment`'s focus)
        given their attention increments: token-wise, so any subset of image rows (Eq. 10)."""
        L = step.text_tokens
        ctx, xb = self.context_block, self.x_block
        mc, mx = self.modulation_in(step)
        image = xb.mlp_increment(rows[:, L:] + attended[:, L:], mx)
        text = (torch.zeros_like(rows[:, :L]) if ctx.pre_only
                else ctx.mlp_increment(rows[:, :L] + attended[:, :L], mc))
        return torch.cat([text, image], dim=1)


class FinalLayer(nn.Module):
    """LayerNorm (no affine), modulated by (shift, scale) of c, then a linear map to the patch pixels."""

    def __init__(self, p: MMDiTParams):
        super().__init__()
        self.norm_final = nn.LayerNorm(p.hidden, eps=p.eps, elementwise_affine=False)
        self.linear = nn.Linear(p.hidden, p.patch_size ** 2 * p.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.hidden, 2 * p.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate_(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class MMDiT(nn.Module):
    """The SD3 denoiser: velocity (noise - data) of latents at timestep = sigma * 1000."""

    def __init__(self, params: MMDiTParams = MMDiTParams()):
        super().__init__()
        p = self.params = params
        self.x_embedder = PatchEmbed(p)
        # A fixed sin-cos table in the releases, but stored in the checkpoint: read, never built.
        self.pos_embed = nn.Parameter(torch.zeros(1, p.pos_embed_max ** 2, p.hidden))
        self.t_embedder = TimestepEmbedder(p.hidden)
        self.y_embedder = VectorEmbedder(p.pooled_dim, p.hidden)
        self.context_embedder = nn.Linear(p.context_dim, p.hidden)
        self.joint_blocks = nn.ModuleList(JointBlock(p, i) for i in range(p.depth))
        self.final_layer = FinalLayer(p)

    # -- pieces of the forward --------------------------------------------------------------

    def cropped_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """The centre rows x cols of the stored table, [1, rows*cols, width], row-major."""
        side = self.params.pos_embed_max
        if rows > side or cols > side:
            raise ValueError(f"a latent of {rows}x{cols} patches exceeds the position table's {side}x{side}: "
                             f"at most {side * self.params.patch_size * 8} px a side")
        top, left = (side - rows) // 2, (side - cols) // 2
        table = self.pos_embed.view(1, side, side, -1)[:, top:top + rows, left:left + cols]
        return table.reshape(1, rows * cols, -1)

    def conditioning(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(timestep) + y_embedder(pooled): what every adaLN reads."""
        return self.t_embedder(timestep) + self.y_embedder(pooled)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor, pooled: torch.Tensor, *,
                probe: AttentionProbe | None = None, block_runner: BlockRunner | None = None) -> torch.Tensor:
        """Predict the velocity [B, out_channels, H, W] of latents x [B, in_channels, H, W].

        timestep: [B] (or a float), sigma * 1000 as diffusers' SD3 pipeline passes it.
        context: [B, L, context_dim] text states; pooled: [B, pooled_dim].
        probe: asked `probe.for_layer(index)` for each block; the answer, if not None, is shown
        the block's image-to-text attention. block_runner(index, block, tokens,
        step) -> tokens, if given, runs each block instead of block(tokens, step): AccelAes'
        sparse path, built on the block's `increment(tokens, step, focus)`. tokens are
        [text | image] rows.
        """
        p = self.params
        batch, _, height, width = x.shape
        grid = patch_grid(height, width, p.patch_size)
        dtype = self.x_embedder.proj.weight.dtype
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
        image = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(*grid)
        text = self.context_embedder(context.to(dtype))
        step = StepInputs(self.conditioning(timestep, pooled.to(dtype)), text.shape[1])
        tokens = torch.cat([text, image], dim=1)
        for index, block in enumerate(self.joint_blocks):
            block_step = replace(step, probe=None if probe is None else probe.for_layer(index),
                                 adaln=block.adaln(step))
            tokens = block_runner(index, block, tokens, block_step) if block_runner else block(tokens, block_step)
        return unpatchify(self.final_layer(tokens[:, step.text_tokens:], step.c), height, width, p.patch_size,
                          p.out_channels)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_mmdit(path_or_checkpoint: str | Checkpoint, prefix: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", heads: int | None = None) -> MMDiT:
    """Build an MMDiT from an SD3 / SD3.5 single file (it sits under `model.diffusion_model.` beside
    the VAE and maybe the text encoders) or a diffusers `transformer/` folder.

    heads: the number of attention heads, for models that break the releases' heads-of-64 rule
    and carry neither qk-norm weights nor a config.json to read it from (small test models).
    """
    return load_model(path_or_checkpoint, mmdit_layout,
                      lambda shapes, config: MMDiT(MMDiTParams.from_shapes(shapes, config, heads)),
                      prefix=prefix, dtype=dtype, device=device)
