"""Lumina-Next-T2I's NextDiT: a flow-matching diffusion transformer over SDXL-VAE latents.

The model of the original Lumina-T2X code (github.com/Alpha-VLLM/Lumina-T2X,
lumina_next_t2i/models/model.py), checked number for number against diffusers'
`LuminaNextDiT2DModel` called the way its `LuminaPipeline` calls it (tests/test_lumina_next.py).

Parameter names are the original Lumina-T2X ones (`consolidated*.safetensors`); the diffusers
layout is renamed onto them by `nextdit_layout`.

What one block computes (x image tokens, y raw Gemma features, c the conditioning vector):

    scale_msa, gate_msa, scale_mlp, gate_mlp = adaLN_modulation(c)      # no shift terms
    h = attention_norm1(x) * (1 + scale_msa)
    o = wo(self_attention(h) + tanh(gate) * cross_attention(h, attention_y_norm(y)))
    x = x + tanh(gate_msa) * attention_norm2(o)                          # attention increment
    x = x + tanh(gate_mlp) * ffn_norm2(SwiGLU(ffn_norm1(x) * (1 + scale_mlp)))   # FFN increment

Each block exposes these pieces (`modulation`, `attention_increment`, `ffn_increment`, and in the
attention `queries` apart from `image_keys_values` and `text_keys_values`) so that AccelAes can
later run queries for a subset of tokens against the keys and values of all tokens, and read the
image-to-text attention, without a second copy of the maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionProbe, attention, merge_heads, split_heads
from .layers import IncrementBlock, RMSNorm, TimestepEmbedder, apply_rope, gather_rows, patch_grid, unpatchify
from .checkpoint import Checkpoint, CheckpointError, load_model
from .keys import Layout, Shapes, find_prefix, renamed

# The latent grid is 1/8 of the image (SDXL VAE) and a token is a 2x2 latent patch, so one token
# covers 16x16 pixels: the 1024^2 release sees (1024/16)^2 = 4096 tokens at its training size.
_PIXELS_PER_LATENT = 8


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NextDiTParams:
    """Sizes of a NextDiT. The defaults are the released Lumina-Next-T2I 2B (NextDiT_2B_GQA_patch2)."""
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8          # learn_sigma: channels 0-3 are the velocity, 4-7 are unused
    dim: int = 2304
    layers: int = 24
    heads: int = 32
    kv_heads: int = 8              # grouped-query attention: each key/value head serves 4 query heads
    ffn_dim: int = 6144            # int(2 * 4 * 2304 / 3) rounded up to a multiple of 256
    caption_dim: int = 2048        # Gemma-2B hidden size
    adaln_dim: int = 1024          # min(dim, 1024): width of the timestep/caption conditioning
    norm_eps: float = 1e-5         # every RMSNorm of the blocks
    rope_theta: float = 10000.0
    qk_norm: bool = True
    base_tokens: int = 4096        # image tokens at the training resolution: base of proportional attention

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def base_image_size(self) -> int:
        """Side in pixels of the training resolution (1024): each token covers 16x16 pixels."""
        return math.isqrt(self.base_tokens) * self.patch_size * _PIXELS_PER_LATENT

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> "NextDiTParams":
        """Infer the sizes from the tensor shapes of a checkpoint (in OUR parameter names).

        Everything but the patch size, the epsilon and the training resolution is readable from
        the shapes. The number of heads is the length of each layer's per-head cross-attention
        gate (`layers.N.attention.gate`, [heads]), which both layouts store; a diffusers
        `config.json` (num_attention_heads, ...) is cross-checked against it. Without a config
        (the original `consolidated*` files have none) the patch size is the release's 2, and
        the training resolution 1024^2 px.
        """
        s = Shapes(shapes, config, "NextDiT")
        config = s.config
        dim, patch_inputs = s["x_embedder.weight"]
        patch_size = int(config.get("patch_size") or 2)
        in_channels, rest_in = divmod(patch_inputs, patch_size ** 2)
        out_channels, rest_out = divmod(s["final_layer.linear.weight"][0], patch_size ** 2)
        if rest_in or rest_out:
            raise CheckpointError(f"x_embedder takes {patch_inputs} inputs per token, which is not "
                                  f"{patch_size}x{patch_size} patches of whole channels")
        s.agree("in_channels", in_channels, "in_channels")

        layers = s.count("layers")
        if layers == 0:
            raise CheckpointError("the checkpoint has no transformer layers (layers.N.*)")
        s.agree("num_layers", layers, "layers")

        heads = s["layers.0.attention.gate"][0]
        s.agree("num_attention_heads", heads, "attention heads")
        head_dim, rest = divmod(dim, heads)
        if rest or head_dim % 4:
            # 2D RoPE splits each head into (row, column) halves of complex pairs.
            raise CheckpointError(f"width {dim} over {heads} heads does not give a head size divisible by 4")
        kv_width = s["layers.0.attention.wk.weight"][0]
        kv_heads, rest = divmod(kv_width, head_dim)
        if rest or heads % kv_heads:
            raise CheckpointError(f"wk has {kv_width} rows, not a divisor of the {heads} heads of size {head_dim}")
        s.agree("num_kv_heads", kv_heads, "key/value heads")
        caption_dim = s["layers.0.attention.wk_y.weight"][1]
        s.agree("cross_attention_dim", caption_dim, "caption width")

        # diffusers' pipeline: base_sequence_length = (sample_size * 8 // 16) ** 2 (sample_size in latents).
        sample_size = config.get("sample_size")
        base_tokens = (sample_size * _PIXELS_PER_LATENT // 16) ** 2 if sample_size else cls.base_tokens

        return cls(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, dim=dim,
            layers=layers, heads=heads, kv_heads=kv_heads,
            ffn_dim=s["layers.0.feed_forward.w1.weight"][0], caption_dim=caption_dim,
            adaln_dim=s["t_embedder.mlp.0.weight"][0],
            norm_eps=float(config.get("norm_eps") or cls.norm_eps),
            qk_norm="layers.0.attention.q_norm.weight" in s, base_tokens=base_tokens)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours: the original Lumina-T2X names (`consolidated*.safetensors`):
#   x_embedder, t_embedder.mlp.{0,2}, cap_embedder.{0,1}, pad_token, final_layer.{adaLN_modulation.1,linear},
#   layers.N.attention.{wq,wk,wv,wo,wk_y,wv_y,q_norm,k_norm,ky_norm,gate}, layers.N.attention_norm{1,2},
#   layers.N.ffn_norm{1,2}, layers.N.attention_y_norm, layers.N.adaLN_modulation.1, layers.N.feed_forward.w{1,2,3}.
# ---------------------------------------------------------------------------------------------

_ORIGINAL_MARKER = "layers.0.attention.wk_y.weight"
_DIFFUSERS_MARKER = "layers.0.attn2.to_k.weight"
_DIFFUSERS_RULES = [
    (r"\.attn1\.to_q\.", ".attention.wq."), (r"\.attn1\.to_k\.", ".attention.wk."),
    (r"\.attn1\.to_v\.", ".attention.wv."), (r"\.attn2\.to_k\.", ".attention.wk_y."),
    (r"\.attn2\.to_v\.", ".attention.wv_y."), (r"\.attn2\.to_out\.0\.", ".attention.wo."),
    (r"\.attn1\.norm_q\.", ".attention.q_norm."), (r"\.attn1\.norm_k\.", ".attention.k_norm."),
    (r"\.attn2\.norm_k\.", ".attention.ky_norm."), (r"^(layers\.\d+)\.gate$", r"\1.attention.gate"),
    (r"\.norm1\.norm\.", ".attention_norm1."), (r"\.norm1\.linear\.", ".adaLN_modulation.1."),
    (r"\.norm2\.", ".attention_norm2."), (r"\.norm1_context\.", ".attention_y_norm."),
    (r"\.feed_forward\.linear_(\d)\.", r".feed_forward.w\1."),
    (r"^patch_embedder\.proj\.", "x_embedder."),
    (r"^time_caption_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^time_caption_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^time_caption_embed\.caption_embedder\.", "cap_embedder."),
    (r"^norm_out\.linear_1\.", "final_layer.adaLN_modulation.1."),
    (r"^norm_out\.linear_2\.", "final_layer.linear."),
]


def nextdit_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_ORIGINAL_MARKER, _DIFFUSERS_MARKER], "NextDiT", prefix)
    if marker == _ORIGINAL_MARKER:
        return Layout("Lumina-T2X NextDiT", prefix, renamed(keys, prefix, []))
    # diffusers stores the one shared wq and q_norm twice (attn1 and attn2); every converted
    # release holds equal copies, so attn1's are read and attn2's are not.
    ignore = (r"layers\.\d+\.attn2\.to_q\.", r"layers\.\d+\.attn2\.norm_q\.")
    return Layout("diffusers NextDiT", prefix, renamed(keys, prefix, _DIFFUSERS_RULES, ignore), ignore)


# ---------------------------------------------------------------------------------------------
# Sampler-side helpers: time-aware RoPE scaling and proportional attention
# ---------------------------------------------------------------------------------------------

def time_aware_rope_factors(t: float, height_px: int, width_px: int, scaling_watershed: float,
                            base_image_size: int = 1024) -> tuple[float, float]:
    """(linear_factor, ntk_factor) of the RoPE for the model call at time t (0 = noise, 1 = data).

    Lumina-Next's time-aware scaling (paper Sec. 2.3) as diffusers' LuminaPipeline computes it
    before every call: s = sqrt(W*H / base^2) from the image size in pixels (applied at every
    resolution, so s < 1 below 1024^2); early steps (t < watershed) interpolate positions
    linearly, later ones stretch the frequency base (NTK). The pipeline's default watershed is
    1.0 (always linear), the official sampler's 0.3.
    """
    scale = math.sqrt(width_px * height_px / base_image_size ** 2)
    if t < scaling_watershed:
        return scale, 1.0
    return 1.0, scale


def proportional_attention_scale(tokens: int, base_tokens: int, head_dim: int) -> float:
    """Softmax scale sqrt(log_base(N) / head_dim): keeps the attention entropy of the training
    resolution when the image has N != base tokens (1/sqrt(head_dim) at N = base)."""
    return math.sqrt(math.log(tokens, base_tokens) / head_dim)


def rope_tables(height: int, width: int, head_dim: int, theta: float = 10000.0, linear_factor: float = 1.0,
                ntk_factor: float = 1.0, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [height*width, head_dim/2] of NextDiT's 2D RoPE, fp32, tokens row-major.

    Each head is head_dim/2 complex pairs; pair 2k turns with the row and pair 2k+1 with the
    column, both at frequency (theta * ntk_factor)^(-4k/head_dim) / linear_factor.
    """
    quarter = head_dim // 4
    exponents = torch.arange(0, 2 * quarter, 2, dtype=torch.float32, device=device) / (2 * quarter)
    freqs = 1.0 / (theta * ntk_factor) ** exponents / linear_factor                       # [quarter]
    rows = torch.arange(height, dtype=torch.float32, device=device)[:, None] * freqs       # [h, quarter]
    cols = torch.arange(width, dtype=torch.float32, device=device)[:, None] * freqs        # [w, quarter]
    angles = torch.stack([rows[:, None, :].expand(height, width, quarter),
                          cols[None, :, :].expand(height, width, quarter)], dim=-1)        # [h, w, quarter, 2]
    angles = angles.reshape(height * width, 2 * quarter)                                   # row, col, row, col, ...
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Self-attention of the image tokens plus gated cross-attention to the caption, one wq/wo.

    The image queries (after q_norm and RoPE) serve both paths; the text keys get no RoPE.
    """

    def __init__(self, p: NextDiTParams):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = p.heads, p.kv_heads, p.head_dim
        kv_width = p.kv_heads * p.head_dim
        self.wq = nn.Linear(p.dim, p.dim, bias=False)
        self.wk = nn.Linear(p.dim, kv_width, bias=False)
        self.wv = nn.Linear(p.dim, kv_width, bias=False)
        self.wk_y = nn.Linear(p.caption_dim, kv_width, bias=False)
        self.wv_y = nn.Linear(p.caption_dim, kv_width, bias=False)
        self.wo = nn.Linear(p.dim, p.dim, bias=False)
        # LayerNorm (with bias) over the whole projected width, before the head split.
        norm = (lambda width: nn.LayerNorm(width, eps=1e-5)) if p.qk_norm else (lambda width: nn.Identity())
        self.q_norm, self.k_norm, self.ky_norm = norm(p.dim), norm(kv_width), norm(kv_width)
        self.gate = nn.Parameter(torch.zeros(p.heads))  # per-head cross-attention gate, tanh'd

    def queries(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[B, Nq, dim] normed query tokens and their RoPE rows -> q [B, heads, Nq, head_dim]."""
        return apply_rope(split_heads(self.q_norm(self.wq(h)), self.heads), *rope)

    def image_keys_values(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """[B, N, dim] normed image tokens -> k (with RoPE), v [B, kv_heads, N, head_dim]."""
        k = apply_rope(split_heads(self.k_norm(self.wk(h)), self.kv_heads), *rope)
        return k, split_heads(self.wv(h), self.kv_heads)

    def text_keys_values(self, y: torch.Tensor):
        """[B, L, caption_dim] normed caption features -> k, v [B, kv_heads, L, head_dim], no RoPE."""
        return (split_heads(self.ky_norm(self.wk_y(y)), self.kv_heads),
                split_heads(self.wv_y(y), self.kv_heads))

    def mix(self, q: torch.Tensor, image_kv, text_kv, text_mask: torch.Tensor,
            self_scale: float | None, probe: AttentionProbe | None = None) -> torch.Tensor:
        """Both attentions for queries q, gated sum per head, output projection -> [B, Nq, dim].

        The probe, if any, sees the image-to-caption attention (AccelAes records it)."""
        own = attention(q, *image_kv, scale=self_scale)
        cross = attention(q, *text_kv, key_mask=text_mask, probe=probe)  # default 1/sqrt(head_dim)
        gate = torch.tanh(self.gate).to(cross.dtype)[None, :, None, None]
        return self.wo(merge_heads((gate * cross).add_(own)))  # in place: one temporary fewer

    def forward(self, h_q: torch.Tensor, h_kv: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                text_mask: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_kv: tuple[torch.Tensor, torch.Tensor], self_scale: float | None,
                probe: AttentionProbe | None = None) -> torch.Tensor:
        """text_kv: `text_keys_values` of the normed caption, which a generation computes once."""
        q = self.queries(h_q, rope_q)
        return self.mix(q, self.image_keys_values(h_kv, rope_kv), text_kv, text_mask, self_scale, probe)


class FeedForward(nn.Module):
    """SwiGLU without biases: w2(silu(w1 u) * w3 u)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # w1(u) is a temporary of the MLP's width: the gate is applied in place, no second copy.
        return self.w2(F.silu(self.w1(u), inplace=True).mul_(self.w3(u)))


class Modulation(NamedTuple):
    """adaLN outputs of one block, each [B, 1, dim] (broadcast over tokens)."""
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


BlockRunner = Callable[[int, nn.Module, torch.Tensor, "StepInputs"], torch.Tensor]


@dataclass
class StepInputs:
    """What every block of one forward shares."""
    c: torch.Tensor                          # [B, adaln_dim] timestep + caption conditioning
    text_mask: torch.Tensor                  # [B, L] bool, True for real tokens
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, head_dim/2] fp32 of every image token
    self_scale: float | None                 # softmax scale of the self-attention (None: 1/sqrt(head_dim))
    # Set per layer by the forward loop:
    text_kv: tuple[torch.Tensor, torch.Tensor] | None = None   # this layer's caption keys and values
    probe: AttentionProbe | None = None      # shown this layer's image-to-caption attention, if recorded
    adaln: Modulation | None = None          # this layer's modulation (IncrementBlock.adaln), once


class NextDiTBlock(IncrementBlock):
    def __init__(self, p: NextDiTParams):
        super().__init__()
        self.attention = Attention(p)
        self.feed_forward = FeedForward(p.dim, p.ffn_dim)
        self.attention_norm1 = RMSNorm(p.dim, p.norm_eps)
        self.attention_norm2 = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm1 = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm2 = RMSNorm(p.dim, p.norm_eps)
        self.attention_y_norm = RMSNorm(p.caption_dim, p.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.adaln_dim, 4 * p.dim))

    def modulation(self, step: StepInputs) -> Modulation:
        return Modulation(*self.adaLN_modulation(step.c)[:, None, :].chunk(4, dim=-1))

    adaln = modulation  # what the forward loop computes once for this block (IncrementBlock)

    def attention_input(self, x: torch.Tensor, scale_msa: torch.Tensor) -> torch.Tensor:
        """Per token: attention_norm1(x) * (1 + scale_msa). A subset of rows gives the subset's input."""
        return self.attention_norm1(x).mul_(1 + scale_msa)   # in place: the norm's output is a temporary

    def caption_keys_values(self, cap_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's caption keys and values: they depend on the caption alone, never on the
        step, so a generation computes them once (`NextDiT.caption_keys_values`)."""
        return self.attention.text_keys_values(self.attention_y_norm(cap_feats))

    def attention_increment(self, x: torch.Tensor, step: StepInputs,
                            focus: torch.Tensor | None = None) -> torch.Tensor:
        """tanh(gate_msa) * attention_norm2(attention): what the attention adds to tokens of x [B, N, dim].

        focus [B, F] (token indices per sample), if given, limits the queries, the output
        projection and the result to those tokens ([B, F, dim]); keys and values still come from
        all N tokens, so focus tokens read the whole image (AccelAes' sparse path, paper Eq. 9).
        """
        m = self.modulation_in(step)
        h = self.attention_input(x, m.scale_msa)
        h_q, rope_q = h, step.rope
        if focus is not None:
            h_q = gather_rows(h, focus)
            rope_q = tuple(table[focus][:, None] for table in step.rope)  # [B, 1, F, head_dim/2]
        o = self.attention(h_q, h, step.text_kv, step.text_mask, rope_q, step.rope, step.self_scale, step.probe)
        return self.attention_norm2(o).mul_(torch.tanh(m.gate_msa))

    def ffn_increment(self, rows: torch.Tensor, attended: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """What the FFN adds to token rows of x given their attention increments (same rows):
        tanh(gate_mlp) * ffn_norm2(FFN(ffn_norm1(u) * (1 + scale_mlp))), u = rows + attended.
        Token-wise, so any subset of rows (paper Eq. 10)."""
        m = self.modulation_in(step)
        u = rows + attended
        out = self.ffn_norm2(self.feed_forward(self.ffn_norm1(u).mul_(1 + m.scale_mlp)))
        return out.mul_(torch.tanh(m.gate_mlp))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) * (1 + scale(c)), then a linear map to the patch pixels."""

    def __init__(self, p: NextDiTParams):
        super().__init__()
        self.norm_final = nn.LayerNorm(p.dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(p.dim, p.patch_size ** 2 * p.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.adaln_dim, p.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = self.adaLN_modulation(c)[:, None, :]
        return self.linear(self.norm_final(x) * (1 + scale))


class NextDiT(nn.Module):
    """The Lumina-Next denoiser: velocity (data - noise) of latents at time t (0 = noise, 1 = data)."""

    def __init__(self, params: NextDiTParams = NextDiTParams()):
        super().__init__()
        p = self.params = params
        self.x_embedder = nn.Linear(p.patch_size ** 2 * p.in_channels, p.dim)
        self.t_embedder = TimestepEmbedder(p.adaln_dim)
        self.cap_embedder = nn.Sequential(nn.LayerNorm(p.caption_dim, eps=1e-5), nn.Linear(p.caption_dim, p.adaln_dim))
        # Only used by the original code for batches of mixed sizes; kept so checkpoints load strictly.
        self.pad_token = nn.Parameter(torch.zeros(p.dim))
        self.layers = nn.ModuleList(NextDiTBlock(p) for _ in range(p.layers))
        self.final_layer = FinalLayer(p)

    # -- pieces of the forward --------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p] with each patch ordered (c, ph, pw), tokens row-major."""
        b, c, height, width = x.shape
        p = self.params.patch_size
        x = x.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (height // p) * (width // p), c * p * p)

    def conditioning(self, t: torch.Tensor, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(t) + cap_embedder(masked mean of the caption features)."""
        weights = cap_mask.float()[:, :, None]
        pooled = ((cap_feats * weights).sum(dim=1) / weights.sum(dim=1)).to(cap_feats.dtype)
        return self.t_embedder(t) + self.cap_embedder(pooled)

    def step_inputs(self, t: torch.Tensor, cap_feats: torch.Tensor, cap_mask: torch.Tensor,
                    grid: tuple[int, int], *, rope_linear_factor: float = 1.0, rope_ntk_factor: float = 1.0,
                    proportional_attn: bool = True, probe: AttentionProbe | None = None) -> StepInputs:
        """Everything the blocks share in one forward over a latent grid of `grid` tokens (rows, cols)."""
        p = self.params
        rope = rope_tables(*grid, p.head_dim, p.rope_theta, rope_linear_factor, rope_ntk_factor, device=cap_feats.device)
        # The scale depends on the number of keys of the self-attention: all N image tokens.
        tokens = grid[0] * grid[1]
        scale = proportional_attention_scale(tokens, p.base_tokens, p.head_dim) if proportional_attn else None
        return StepInputs(self.conditioning(t, cap_feats, cap_mask), cap_mask.bool(), rope, scale, probe=probe)

    def caption_keys_values(self, cap_feats: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's caption keys and values [B, kv_heads, L, head_dim]: a pipeline computes
        them once per generation and passes them to each forward (`caption_kv`)."""
        cap_feats = cap_feats.to(self.x_embedder.weight.dtype)
        return [layer.caption_keys_values(cap_feats) for layer in self.layers]

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cap_feats: torch.Tensor, cap_mask: torch.Tensor, *,
                rope_linear_factor: float = 1.0, rope_ntk_factor: float = 1.0, proportional_attn: bool = True,
                probe: AttentionProbe | None = None, block_runner: BlockRunner | None = None,
                caption_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Predict [B, out_channels, H, W] for latents x [B, in_channels, H, W].

        t: [B] (or a float) in [0, 1], 0 = noise, 1 = data. cap_feats: [B, L, caption_dim] Gemma
        features; cap_mask: [B, L], nonzero for real tokens. The RoPE factors come from
        `time_aware_rope_factors`. Channels 0..in_channels-1 of the output are the velocity
        data - noise; the rest (learn_sigma) are unused.

        probe: asked `probe.for_layer(index)` for each layer, and that answer, if not None, is
        shown the layer's image-to-caption attention. block_runner(index, block, tokens, step) ->
        tokens, if given, runs each block instead of block(tokens, step): AccelAes' sparse path,
        built on the block's `increment(tokens, step, focus)` (or its attention_increment and
        ffn_increment). caption_kv: `caption_keys_values(cap_feats)`, computed here when None.
        """
        p = self.params
        batch, _, height, width = x.shape
        grid = patch_grid(height, width, p.patch_size)
        dtype = self.x_embedder.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)
        step = self.step_inputs(t, cap_feats.to(dtype), cap_mask, grid,
                                rope_linear_factor=rope_linear_factor, rope_ntk_factor=rope_ntk_factor,
                                proportional_attn=proportional_attn)
        caption_kv = self.caption_keys_values(cap_feats) if caption_kv is None else caption_kv
        tokens = self.x_embedder(self.patchify(x.to(dtype)))
        for index, layer in enumerate(self.layers):
            layer_step = replace(step, text_kv=caption_kv[index], adaln=layer.adaln(step),
                                 probe=None if probe is None else probe.for_layer(index))
            tokens = block_runner(index, layer, tokens, layer_step) if block_runner else layer(tokens, layer_step)
        # The output patches are ordered (ph, pw, c), not as patchify ordered the input's.
        return unpatchify(self.final_layer(tokens, step.c), height, width, p.patch_size, p.out_channels)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_nextdit(path_or_checkpoint: str | Checkpoint, prefix: str | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> NextDiT:
    """Build a NextDiT from the original `consolidated*.safetensors` / `.pth` or a diffusers `transformer/` folder."""
    return load_model(path_or_checkpoint, nextdit_layout,
                      lambda shapes, config: NextDiT(NextDiTParams.from_shapes(shapes, config)),
                      prefix=prefix, dtype=dtype, device=device)
