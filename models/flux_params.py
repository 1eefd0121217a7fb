"""FLUX.1's sizes and checkpoint layouts, for models/flux.py.

`FluxParams` are the sizes of a FLUX transformer; `FluxParams.from_shapes` reads them from a
checkpoint's tensor shapes, and `flux_layout` says how the keys of the released files become
our parameter names. They sit in this file beside flux.py, which builds and loads the model
from them, to keep flux.py under the project's 500 lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .keys import CheckpointError, Layout, Shapes, SwappedHalves, find_prefix, fused, renamed


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FluxParams:
    """Sizes of a FLUX transformer. The defaults are FLUX.1 [dev]; [schnell] has guidance_embed=False."""
    in_channels: int = 64          # 16 latent channels x 2x2 patch, packed (c, ph, pw)
    out_channels: int = 64
    hidden: int = 3072
    heads: int = 24
    depth: int = 19                # double-stream blocks
    depth_single: int = 38         # single-stream blocks
    context_dim: int = 4096        # T5-XXL width
    vec_dim: int = 768             # CLIP-L pooled width
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis (unused, row, col); sums to head_dim
    theta: int = 10000
    guidance_embed: bool = True    # dev is guidance-distilled; schnell has no guidance_in
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def blocks(self) -> int:
        return self.depth + self.depth_single

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None,
                    axes_dim: tuple[int, ...] | None = None) -> FluxParams:
        """Infer the sizes from the tensor shapes of a checkpoint (in OUR parameter names).

        Everything is readable from the shapes, the head size included (the QKNorm scales are
        [head_dim]), except how the head splits over the three RoPE axes (see `_rope_axes`).
        A config.json's entries are cross-checked against the shapes.
        """
        s = Shapes(shapes, config, "FLUX transformer")
        hidden, in_channels = s["img_in.weight"]
        s.agree("in_channels", in_channels, "in_channels")
        depth, depth_single = s.count("double_blocks"), s.count("single_blocks")
        if depth + depth_single == 0:
            raise CheckpointError("the checkpoint has no transformer blocks (double_blocks.N.*, single_blocks.N.*)")
        s.agree("num_layers", depth, "double blocks")
        s.agree("num_single_layers", depth_single, "single blocks")

        if depth:
            head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
            mlp_hidden = s["double_blocks.0.img_mlp.0.weight"][0]
        else:
            head_dim = s["single_blocks.0.norm.query_norm.scale"][0]
            mlp_hidden = s["single_blocks.0.linear2.weight"][1] - hidden
        heads, rest = divmod(hidden, head_dim)
        if rest:
            raise CheckpointError(f"width {hidden} is not a whole number of heads of size {head_dim}")
        s.agree("attention_head_dim", head_dim, "head size")
        s.agree("num_attention_heads", heads, "attention heads")
        mlp_ratio = mlp_hidden / hidden
        if int(hidden * mlp_ratio) != mlp_hidden:
            raise CheckpointError(f"MLP width {mlp_hidden} is not a ratio of the width {hidden} this code can rebuild")

        context_dim = s["txt_in.weight"][1]
        s.agree("joint_attention_dim", context_dim, "text width")
        vec_dim = s["vector_in.in_layer.weight"][1]
        s.agree("pooled_projection_dim", vec_dim, "pooled text width")
        guidance_embed = "guidance_in.in_layer.weight" in s
        s.agree("guidance_embeds", guidance_embed, "guidance embedding")

        return cls(in_channels=in_channels, out_channels=s["final_layer.linear.weight"][0], hidden=hidden,
                   heads=heads, depth=depth, depth_single=depth_single, context_dim=context_dim, vec_dim=vec_dim,
                   mlp_ratio=mlp_ratio, axes_dim=_rope_axes(axes_dim, s.config, head_dim),
                   guidance_embed=guidance_embed,
                   qkv_bias=("double_blocks.0.img_attn.qkv.bias" in s) if depth else True)


def _rope_axes(axes_dim: tuple[int, ...] | None, config: dict, head_dim: int) -> tuple[int, ...]:
    """How a head of `head_dim` splits over the three RoPE axes, which no shape says. From, in
    order: `axes_dim` given to from_shapes, a diffusers config.json (`axes_dims_rope`), or the
    release's (16, 56, 56) when the head size is its 128."""
    if axes_dim is None and config.get("axes_dims_rope") is not None:
        axes_dim = tuple(config["axes_dims_rope"])
    if axes_dim is None:
        axes_dim = FluxParams.axes_dim
        if sum(axes_dim) != head_dim:
            raise CheckpointError(
                f"the head size is {head_dim}, not the release's {sum(axes_dim)}, and nothing says how it "
                "splits over the three RoPE axes: load it from a diffusers folder whose config.json has "
                "axes_dims_rope, or pass axes_dim")
    axes_dim = tuple(int(d) for d in axes_dim)
    if sum(axes_dim) != head_dim or any(d % 2 for d in axes_dim):
        raise CheckpointError(f"RoPE axes {axes_dim} must be even and sum to the head size {head_dim}")
    return axes_dim


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours: the original BFL names (`flux1-dev.safetensors`):
#   img_in, txt_in, {time_in,vector_in,guidance_in}.{in_layer,out_layer},
#   double_blocks.N.{img,txt}_mod.lin, double_blocks.N.{img,txt}_attn.{qkv,proj,norm.{query,key}_norm.scale},
#   double_blocks.N.{img,txt}_mlp.{0,2}, single_blocks.N.{linear1,linear2,modulation.lin,
#   norm.{query,key}_norm.scale}, final_layer.{adaLN_modulation.1,linear}.
# diffusers' FluxTransformer2DModel keeps apart what BFL fuses: a double block's q, k, v (per
# stream), a single block's q, k, v and MLP input (BFL's linear1). They are renamed to parts of
# the fused tensor (`qkv.q.weight`, `linear1.mlp.weight`) and joined by fused().
# ---------------------------------------------------------------------------------------------

_ORIGINAL_MARKER = "double_blocks.0.img_attn.qkv.weight"
_DIFFUSERS_MARKER = "single_transformer_blocks.0.attn.to_q.weight"
_DOUBLE, _SINGLE = r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."
_DIFFUSERS_RULES = [
    (r"^x_embedder\.", "img_in."), (r"^context_embedder\.", "txt_in."),
    (r"^time_text_embed\.timestep_embedder\.", "time_in."), (r"^time_text_embed\.text_embedder\.", "vector_in."),
    (r"^time_text_embed\.guidance_embedder\.", "guidance_in."),
    (r"^(time|vector|guidance)_in\.linear_1\.", r"\1_in.in_layer."),
    (r"^(time|vector|guidance)_in\.linear_2\.", r"\1_in.out_layer."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),   # halves swapped: see flux_layout
    (r"^proj_out\.", "final_layer.linear."),
    (_DOUBLE + r"norm1\.linear\.", r"double_blocks.\1.img_mod.lin."),
    (_DOUBLE + r"norm1_context\.linear\.", r"double_blocks.\1.txt_mod.lin."),
    (_DOUBLE + r"attn\.to_([qkv])\.", r"double_blocks.\1.img_attn.qkv.\2."),
    (_DOUBLE + r"attn\.add_([qkv])_proj\.", r"double_blocks.\1.txt_attn.qkv.\2."),
    # torch's RMSNorm weight is BFL's QKNorm scale.
    (_DOUBLE + r"attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (_DOUBLE + r"attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (_DOUBLE + r"attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (_DOUBLE + r"attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (_DOUBLE + r"attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (_DOUBLE + r"attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (_DOUBLE + r"ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
    (_DOUBLE + r"ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
    (_DOUBLE + r"ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
    (_DOUBLE + r"ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
    (_SINGLE + r"norm\.linear\.", r"single_blocks.\1.modulation.lin."),
    (_SINGLE + r"attn\.to_([qkv])\.", r"single_blocks.\1.linear1.\2."),
    (_SINGLE + r"proj_mlp\.", r"single_blocks.\1.linear1.mlp."),
    (_SINGLE + r"attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (_SINGLE + r"attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
    (_SINGLE + r"proj_out\.", r"single_blocks.\1.linear2."),
]


def flux_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The FLUX transformer in BFL's layout (alone or under `model.diffusion_model.`) or diffusers'."""
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_ORIGINAL_MARKER, _DIFFUSERS_MARKER], "FLUX transformer", prefix)
    if marker == _ORIGINAL_MARKER:
        return Layout("BFL FLUX", prefix, renamed(keys, prefix, []))
    # diffusers' norm_out (AdaLayerNormContinuous) splits its modulation (scale, shift), BFL's
    # final layer (shift, scale).
    mapping = {name: SwappedHalves(source.key) if name.startswith("final_layer.adaLN_modulation.1.") else source
               for name, source in renamed(keys, prefix, _DIFFUSERS_RULES).items()}
    return Layout("diffusers FLUX", prefix, fused(mapping, {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}))
