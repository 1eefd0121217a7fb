"""FLUX.1 [dev] / [schnell]: the rectified-flow transformer of Black Forest Labs.

The model of BFL's reference code (github.com/black-forest-labs/flux, src/flux/model.py and
src/flux/modules/layers.py), checked number for number against diffusers'
`FluxTransformer2DModel`, called the way its `FluxPipeline` calls it (tests/test_flux.py).

Parameter names are the original BFL ones (`flux1-dev.safetensors`); the diffusers layout is
renamed onto them by `flux_layout`. Both `flux_layout` and the sizes (`FluxParams`, read from a
checkpoint's shapes) are in models/flux_params.py.

The model sees one sequence: T5 text tokens first, then image tokens (2x2 patches of the 16
latent channels, "packed" to 64 features). Positions enter only through a 3-axis RoPE, from ids
(0, row, col) for image tokens and zeros for text tokens. c = time_in(t) + guidance_in(g) +
vector_in(pooled CLIP) conditions every block through adaLN (shift, scale, gate):

    double block (19): text and image keep their own weights (txt_* / img_*), but attend jointly
        h = LN(x) * (1 + scale1) + shift1 per stream, q/k/v = qkv(h), q, k = QKNorm(q, k)
        o = attention over cat(text, image) with RoPE on q and k
        x = x + gate1 * proj(o);  x = x + gate2 * mlp(LN(x) * (1 + scale2) + shift2)
    single block (38): one stream, attention and MLP side by side from one fused linear
        h = LN(x) * (1 + scale) + shift;  [q | k | v | u] = linear1(h)
        x = x + gate * linear2(cat(attention(q, k, v), gelu_tanh(u)))
    final layer: LN(image tokens) * (1 + scale) + shift -> linear to 64 packed features.

Time runs from t = 1 (noise) to t = 0 (data) and the output is the velocity noise - data:
x_t = t * noise + (1 - t) * data.

For AccelAes, the text and image tokens stay in ONE tensor [B, L + N, D] through every block,
and each block says what it adds to a subset of its rows (`increment(tokens, step, focus)`):
queries, output projections and MLPs for the focus rows only, keys and values of all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionProbe, attention, merge_heads, split_heads
from .layers import IncrementBlock, apply_rope, gather_rows, gelu_tanh_, modulate_, rms_normalize, timestep_sinusoids
from .checkpoint import Checkpoint, load_model
from .flux_params import FluxParams, flux_layout

# Sinusoids of the timestep and guidance embeddings; both scale their input by 1000 first.
_TIME_FREQUENCIES = 256
_TIME_FACTOR = 1000.0


# ---------------------------------------------------------------------------------------------
# Latent packing and position ids (as FluxPipeline prepares them)
# ---------------------------------------------------------------------------------------------

def pack(latents: Tensor) -> Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens: 2x2 patches, row-major, features (c, ph, pw)."""
    b, c, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent size {height}x{width} must be even: FLUX packs 2x2 patches")
    x = latents.view(b, c, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (height // 2) * (width // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack`: [B, (H/2)(W/2), 4C] -> [B, C, H, W], with H, W the LATENT size."""
    b, n, features = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not tile a {height}x{width} latent in 2x2 patches")
    x = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """[h*w, 3] ids (0, row, col) of the packed token grid (h, w = latent size / 2), row-major."""
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(height * width, 3).to(dtype)


def text_ids(length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[L, 3] zeros: every text token sits at position (0, 0, 0), so RoPE leaves it unturned."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings: timestep sinusoids and RoPE
# ---------------------------------------------------------------------------------------------

def rope_tables(ids: Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin [S, sum(axes_dim)/2] fp32 of the multi-axis RoPE for ids [S, n_axes].

    Axis a turns axes_dim[a]/2 pairs at frequencies theta^(-2i/axes_dim[a]) times ids[:, a];
    the axes' pairs follow each other. The angles are computed in float64, as diffusers and
    BFL's first release do (in fp32, as BFL's code does now, cos and sin of a 128x128 grid move
    by up to 7e-6), except on MPS, which has no float64.
    """
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        angles.append(ids[:, axis].to(dtype)[:, None] * omega[None])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer: embeds the timestep, guidance and pooled-CLIP vectors."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the learnt `scale`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The result stays in x's dtype even if the scale is wider (BFL casts q and k back likewise);
        # the scale is applied in place, to the normalised copy.
        return rms_normalize(x, self.eps).mul_(self.scale.type_as(x))


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys, each with its own learnt scale (applied before RoPE)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class ModulationOut(NamedTuple):
    """One adaLN triple, each [B, 1, D] (broadcast over tokens)."""
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate_(self, x: Tensor) -> Tensor:
        """(1 + scale) * x + shift, in place: x is a temporary (a norm's output), so no copy of the tokens."""
        return modulate_(x, self.shift, self.scale)


class Modulation(nn.Module):
    """lin(SiLU(vec)) split into one (shift, scale, gate) triple, or two for a double block."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.triples = 2 if double else 1
        self.lin = nn.Linear(dim, 3 * self.triples * dim)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ...]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.triples, dim=-1)
        return tuple(ModulationOut(*chunks[3 * i: 3 * i + 3]) for i in range(self.triples))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _run_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """`mlp(x)` with the GELU applied in place to the first linear's output (a temporary as wide as
    the MLP: no second copy of it)."""
    return mlp[2](gelu_tanh_(mlp[0](x)))


BlockRunner = Callable[[int, nn.Module, Tensor, "StepInputs"], Tensor]


@dataclass
class StepInputs:
    """What every block of one forward shares."""
    vec: Tensor                          # [B, hidden] conditioning vector (time, guidance, pooled CLIP)
    text_tokens: int                     # L: rows 0..L-1 of the token tensor are text, the rest image
    rope: tuple[Tensor, Tensor]          # cos, sin [L+N, head_dim/2] fp32, one row per token
    probe: AttentionProbe | None = None  # shown every double block's image-to-text attention
    adaln: tuple | ModulationOut | None = None  # set per block: its modulation (IncrementBlock.adaln), once

    def rope_rows(self, focus: Tensor | None) -> tuple[Tensor, Tensor]:
        """The RoPE rows of the tokens listed in focus [B, F] ([B, 1, F, head_dim/2]), all rows if None."""
        if focus is None:
            return self.rope
        return tuple(table[focus][:, None] for table in self.rope)


class StreamAttention(nn.Module):
    """One stream's attention weights in a double block: fused qkv ("(K H D)": q, k, v, each
    head-major), QKNorm, output projection. The attention itself is joint, in the block."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def _part(self, h: Tensor, begin: int, end: int) -> Tensor:
        # Rows of the fused weight: a view, no copy, so q and k|v can be taken for different tokens.
        bias = None if self.qkv.bias is None else self.qkv.bias[begin:end]
        return F.linear(h, self.qkv.weight[begin:end], bias)

    def queries(self, h: Tensor) -> Tensor:
        """[B, Nq, D] modulated tokens -> normed q [B, heads, Nq, head_dim] (no RoPE yet)."""
        return self.norm.query_norm(split_heads(self._part(h, 0, self.dim), self.heads))

    def keys_values(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """[B, N, D] modulated tokens -> normed k, v [B, heads, N, head_dim] (no RoPE yet)."""
        k, v = self._part(h, self.dim, 3 * self.dim).chunk(2, dim=-1)
        return self.norm.key_norm(split_heads(k, self.heads)), split_heads(v, self.heads)


class DoubleStreamBlock(IncrementBlock):
    """Text and image streams with their own weights, one joint attention over [text, image]."""

    def __init__(self, p: FluxParams):
        super().__init__()
        self.img_mod = Modulation(p.hidden, double=True)
        self.img_norm1 = _layer_norm(p.hidden)
        self.img_attn = StreamAttention(p.hidden, p.heads, p.qkv_bias)
        self.img_norm2 = _layer_norm(p.hidden)
        self.img_mlp = _mlp(p.hidden, p.mlp_hidden)

        self.txt_mod = Modulation(p.hidden, double=True)
        self.txt_norm1 = _layer_norm(p.hidden)
        self.txt_attn = StreamAttention(p.hidden, p.heads, p.qkv_bias)
        self.txt_norm2 = _layer_norm(p.hidden)
        self.txt_mlp = _mlp(p.hidden, p.mlp_hidden)

    def adaln(self, step: StepInputs) -> tuple[tuple[ModulationOut, ...], tuple[ModulationOut, ...]]:
        """The text and the image stream's modulations, each (attention's triple, MLP's triple)."""
        return self.txt_mod(step.vec), self.img_mod(step.vec)

    def attention_increment(self, tokens: Tensor, step: StepInputs, focus: Tensor | None = None) -> Tensor:
        """What the joint attention adds to the rows of tokens [B, L+N, D] listed in focus [B, F]
        ([B, F, D]), every row when focus is None. focus lists all text rows 0..L-1 first, then
        image rows. Queries and output projections run for the focus rows (text rows with the
        txt_* weights, image rows with the img_* ones); keys and values come from every token, so
        the result is exactly those rows of the dense block (AccelAes paper Eq. 9).
        """
        L = step.text_tokens
        txt, img = tokens[:, :L], tokens[:, L:]
        (txt_mod, _), (img_mod, _) = self.modulation_in(step)
        txt_h = txt_mod.modulate_(self.txt_norm1(txt))
        img_h = img_mod.modulate_(self.img_norm1(img))

        txt_k, txt_v = self.txt_attn.keys_values(txt_h)
        img_k, img_v = self.img_attn.keys_values(img_h)
        k = apply_rope(torch.cat([txt_k, img_k], dim=2), *step.rope)
        v = torch.cat([txt_v, img_v], dim=2)

        if focus is not None:
            img_h = gather_rows(img_h, focus[:, L:] - L)  # focus' image rows, as rows of img
        q = torch.cat([self.txt_attn.queries(txt_h), self.img_attn.queries(img_h)], dim=2)
        q = apply_rope(q, *step.rope_rows(focus))
        # The probe sees the image queries against the (T5) text keys, softmax over the text alone.
        o = merge_heads(attention(q, k, v, probe=step.probe, probe_span=(slice(L, None), slice(0, L))))
        return torch.cat([self.txt_attn.proj(o[:, :L]).mul_(txt_mod.gate),
                          self.img_attn.proj(o[:, L:]).mul_(img_mod.gate)], dim=1)

    def ffn_increment(self, rows: Tensor, attended: Tensor, step: StepInputs) -> Tensor:
        """What the MLPs add to token rows (text rows first) given their attention increments:
        gate2 * mlp(modulated norm2(rows + attended)), token-wise (Eq. 10)."""
        L = step.text_tokens
        (_, txt_mod), (_, img_mod) = self.modulation_in(step)
        u = rows + attended
        txt = _run_mlp(self.txt_mlp, txt_mod.modulate_(self.txt_norm2(u[:, :L]))).mul_(txt_mod.gate)
        img = _run_mlp(self.img_mlp, img_mod.modulate_(self.img_norm2(u[:, L:]))).mul_(img_mod.gate)
        return torch.cat([txt, img], dim=1)


class SingleStreamBlock(IncrementBlock):
    """One stream over [text, image]: attention and MLP in parallel from the fused linear1
    ([q | k | v | mlp] rows), joined again by linear2, with one gated residual."""

    def __init__(self, p: FluxParams):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden = p.hidden, p.heads, p.mlp_hidden
        self.linear1 = nn.Linear(p.hidden, 3 * p.hidden + p.mlp_hidden)
        self.linear2 = nn.Linear(p.hidden + p.mlp_hidden, p.hidden)
        self.norm = QKNorm(p.head_dim)
        self.pre_norm = _layer_norm(p.hidden)      # the MLP's activation: gelu_tanh_, in _mlp
        self.modulation = Modulation(p.hidden, double=False)

    def _part(self, h: Tensor, begin: int, end: int) -> Tensor:
        return F.linear(h, self.linear1.weight[begin:end], self.linear1.bias[begin:end])

    def adaln(self, step: StepInputs) -> ModulationOut:
        return self.modulation(step.vec)[0]

    def _attention(self, h: Tensor, h_focus: Tensor, step: StepInputs, focus: Tensor | None) -> Tensor:
        """The attention output [B, F, D] of the focus rows h_focus, against keys and values of
        every row of h (both modulated pre_norm outputs), before linear2.

        linear1 is applied in row-slices of its weight (views, nothing copied): q for the focus
        rows only, k and v for every token. So the background rows cost only their k|v projection.
        """
        D = self.hidden
        k, v = self._part(h, D, 3 * D).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        k = apply_rope(self.norm.key_norm(k), *step.rope)
        q = self.norm.query_norm(split_heads(self._part(h_focus, 0, D), self.heads))
        q = apply_rope(q, *step.rope_rows(focus))
        return merge_heads(attention(q, k, v))

    def _mlp(self, h_rows: Tensor) -> Tensor:
        """linear2's MLP columns (and its bias) applied to the MLP of modulated rows h_rows."""
        D = self.hidden
        mlp = gelu_tanh_(self._part(h_rows, 3 * D, 3 * D + self.mlp_hidden))
        return F.linear(mlp, self.linear2.weight[:, D:], self.linear2.bias)

    def attention_increment(self, tokens: Tensor, step: StepInputs, focus: Tensor | None = None) -> Tensor:
        """The attention's share of what the block adds to the rows of tokens [B, L+N, D] listed in
        focus [B, F] ([B, F, D]), every row when focus is None: gate * linear2's attention columns
        applied to the attention output; exactly those rows of the dense block."""
        mod = self.modulation_in(step)
        h = mod.modulate_(self.pre_norm(tokens))
        h_focus = h if focus is None else gather_rows(h, focus)
        attended = self._attention(h, h_focus, step, focus)
        return F.linear(attended, self.linear2.weight[:, :self.hidden]).mul_(mod.gate)

    def ffn_increment(self, rows: Tensor, attended: Tensor, step: StepInputs) -> Tensor:
        """The MLP's share, for token rows: it runs in parallel with the attention, on the same
        modulated pre_norm(rows), so `attended` is not read. linear2's bias is counted here."""
        mod = self.modulation_in(step)
        return self._mlp(mod.modulate_(self.pre_norm(rows))).mul_(mod.gate)

    def increment(self, tokens: Tensor, step: StepInputs, focus: Tensor | None = None) -> Tensor:
        """Both shares at once, as the block computes them: one modulated pre_norm of the tokens
        feeds the attention and the MLP of the focus rows, and linear2 runs once over [attention |
        MLP] without joining them (the attention's columns accumulate onto the MLP's output)."""
        mod = self.modulation_in(step)
        h = mod.modulate_(self.pre_norm(tokens))
        h_focus = h if focus is None else gather_rows(h, focus)
        out = self._mlp(h_focus)
        attended = self._attention(h, h_focus, step, focus)
        out.flatten(0, 1).addmm_(attended.flatten(0, 1), self.linear2.weight[:, :self.hidden].t())
        return out.mul_(mod.gate)


class LastLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm (no affine) -> linear to the packed latent features."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """The FLUX.1 denoiser: velocity (noise - data) of packed latents at time t (1 = noise, 0 = data)."""

    def __init__(self, params: FluxParams = FluxParams()):
        super().__init__()
        p = self.params = params
        if p.hidden % p.heads or sum(p.axes_dim) != p.head_dim:
            raise ValueError(f"width {p.hidden} over {p.heads} heads must give a head size equal to "
                             f"sum(axes_dim) = {sum(p.axes_dim)}")
        self.img_in = nn.Linear(p.in_channels, p.hidden)
        self.time_in = MLPEmbedder(_TIME_FREQUENCIES, p.hidden)
        self.vector_in = MLPEmbedder(p.vec_dim, p.hidden)
        self.guidance_in = MLPEmbedder(_TIME_FREQUENCIES, p.hidden) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_dim, p.hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.depth_single))
        self.final_layer = LastLayer(p.hidden, p.out_channels)

    def blocks(self) -> list[nn.Module]:
        """Every block in order: double blocks, then single blocks (the block_runner's index)."""
        return [*self.double_blocks, *self.single_blocks]

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """vec = time_in(t*1000) [+ guidance_in(g*1000)] + vector_in(pooled CLIP), [B, hidden]."""
        dtype = self.img_in.weight.dtype
        # t and g are cast to the model's dtype before the x1000, as BFL and diffusers both do.
        vec = self.time_in(timestep_sinusoids(timesteps.to(dtype) * _TIME_FACTOR).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled ([dev]): pass guidance, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_sinusoids(guidance.to(dtype) * _TIME_FACTOR).to(dtype))
        # [schnell] has no guidance embedding: a guidance given to it is ignored, as in BFL's code.
        return vec + self.vector_in(y.to(dtype))

    def step_inputs(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, txt_ids: Tensor,
                    img_ids: Tensor, probe: AttentionProbe | None = None) -> StepInputs:
        """Everything the blocks share in one forward."""
        for name, ids in (("txt_ids", txt_ids), ("img_ids", img_ids)):
            if ids.dim() != 2 or ids.shape[1] != len(self.params.axes_dim):
                raise ValueError(f"{name} has shape {tuple(ids.shape)}; pass one [tokens, "
                                 f"{len(self.params.axes_dim)}] set of ids, shared by the batch")
        rope = rope_tables(torch.cat([txt_ids, img_ids]), self.params.axes_dim, self.params.theta)
        return StepInputs(self.conditioning(timesteps, y, guidance), txt_ids.shape[0], rope, probe)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor | float,
                y: Tensor, guidance: Tensor | float | None = None, *, probe: AttentionProbe | None = None,
                block_runner: BlockRunner | None = None) -> Tensor:
        """Predict the velocity [B, N, out_channels] of packed latents img [B, N, in_channels].

        img_ids [N, 3] (`image_ids` of the packed grid), txt [B, L, context_dim] T5 features,
        txt_ids [L, 3] (zeros), timesteps [B] (or a float) in [0, 1] with 1 = noise, y [B, vec_dim]
        pooled CLIP, guidance [B] (or a float; [dev] only, e.g. 3.5: it is embedded as g*1000).

        probe: shown every double block's image-to-text attention. block_runner(index, block,
        tokens, step) -> tokens, if given, runs each block (index over double blocks, then single
        blocks) instead of block(tokens, step): AccelAes' sparse path, built on the block's
        `increment(tokens, step, focus)`.
        """
        batch = img.shape[0]
        dtype = self.img_in.weight.dtype
        timesteps = torch.as_tensor(timesteps, device=img.device).reshape(-1).expand(batch)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=img.device).reshape(-1).expand(batch)
        step = self.step_inputs(timesteps, y, guidance, txt_ids, img_ids)
        tokens = torch.cat([self.txt_in(txt.to(dtype)), self.img_in(img.to(dtype))], dim=1)
        for index, block in enumerate(self.blocks()):
            # Only the double blocks show the probe their attention (docs/method.md: AesMask).
            shown = None if probe is None or index >= len(self.double_blocks) else probe.for_layer(index)
            block_step = replace(step, probe=shown, adaln=block.adaln(step))
            tokens = block_runner(index, block, tokens, block_step) if block_runner else block(tokens, block_step)
        return self.final_layer(tokens[:, step.text_tokens:], step.vec)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_flux(path_or_checkpoint: str | Checkpoint, prefix: str | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", *, axes_dim: tuple[int, ...] | None = None) -> Flux:
    """Build FLUX from `flux1-{dev,schnell}.safetensors` (no prefix, or `model.diffusion_model.`) or
    a diffusers `transformer/` folder. axes_dim: the RoPE split of a head, for an original-layout
    file whose head size is not the release's 128 (the file cannot say; a diffusers config can)."""
    return load_model(path_or_checkpoint, flux_layout,
                      lambda shapes, config: Flux(FluxParams.from_shapes(shapes, config, axes_dim=axes_dim)),
                      prefix=prefix, dtype=dtype, device=device)
