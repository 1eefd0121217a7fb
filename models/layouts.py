"""Checkpoint key layouts: which key of a released file becomes which parameter of our modules.

Every model here names its parameters after one release (CLIP and T5 and Gemma after
transformers, the VAE after the original LDM / FLUX `ae` code, the DiTs after their original
repositories); every other layout is renamed to those names here, in one place. A layout is
a `Layout`: the prefix the model sits under in the file, and for each of our parameter names
a `Source` that says how to read it (a plain key, a chunk of a fused tensor, a transpose, ...).

`describe(keys)` names what a file holds, for the error raised when a file does not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .checkpoint import CheckpointError

Read = Callable[[str], torch.Tensor]
ShapeOf = Callable[[str], tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# Sources: how one parameter is read from the file
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """A tensor stored as the model uses it."""
    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        return shape_of(self.key)

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key)


@dataclass(frozen=True)
class Chunk:
    """Part `index` of `parts` equal pieces of a fused tensor (e.g. OpenCLIP's q|k|v in_proj)."""
    key: str
    parts: int
    index: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        rows, *rest = shape_of(self.key)
        return (rows // self.parts, *rest)

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key).chunk(self.parts, dim=0)[self.index].clone()


@dataclass(frozen=True)
class Transposed:
    """A matrix stored as x @ P (OpenCLIP's text_projection) where the model keeps P^T."""
    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        return tuple(reversed(shape_of(self.key)))

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key).t().contiguous()


@dataclass(frozen=True)
class AsConv1x1:
    """A Linear weight [out, in] used as a 1x1 convolution [out, in, 1, 1] (diffusers' VAE attention)."""
    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        shape = tuple(shape_of(self.key))
        return shape + (1, 1) if len(shape) == 2 else shape

    def read(self, read: Read) -> torch.Tensor:
        tensor = read(self.key)
        return tensor[:, :, None, None] if tensor.dim() == 2 else tensor


@dataclass(frozen=True)
class Concat:
    """Tensors stored apart that the model keeps fused along dim 0 (diffusers' to_q, to_k, to_v
    -> one qkv; FLUX single blocks' q, k, v and proj_mlp -> linear1)."""
    parts: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parts

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        shapes = [tuple(shape_of(key)) for key in self.parts]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read(self, read: Read) -> torch.Tensor:
        return torch.cat([read(key) for key in self.parts], dim=0)


@dataclass(frozen=True)
class SwappedHalves:
    """diffusers' AdaLayerNormContinuous splits its modulation as (scale, shift) where the
    original code splits (shift, scale): the two halves of dim 0 trade places."""
    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        return tuple(shape_of(self.key))

    def read(self, read: Read) -> torch.Tensor:
        first, second = read(self.key).chunk(2, dim=0)
        return torch.cat([second, first], dim=0)


@dataclass
class Layout:
    """How one model sits in one checkpoint."""
    name: str                       # the layout's name, for error messages
    prefix: str                     # every key of this model starts with it
    mapping: dict[str, object]      # our parameter name -> Source
    ignore: tuple[str, ...] = field(default=())  # regexes (after the prefix) of keys no parameter reads

    def shapes(self, shape_of: ShapeOf) -> dict[str, tuple[int, ...]]:
        """The shape each of our parameters will have, from the file's header alone (nothing is read)."""
        return {name: tuple(source.shape(shape_of)) for name, source in self.mapping.items()}

    def scope(self, keys: Iterable[str]) -> list[str]:
        """The checkpoint keys that belong to this model: every one of them must be read."""
        return [k for k in keys if k.startswith(self.prefix)
                and not any(re.match(p, k[len(self.prefix):]) for p in self.ignore)]


def renamed(keys: Iterable[str], prefix: str, rules: list[tuple[str, object]],
            ignore: tuple[str, ...] = ()) -> dict[str, Key]:
    """Map every key under `prefix` through `rules` (regex, replacement), applied in order.

    Keys matching one of the `ignore` regexes (after the prefix) are left out."""
    mapping = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if any(re.match(pattern, name) for pattern in ignore):
            continue
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        mapping[name] = Key(key)
    return mapping


def _ends_with_name(key: str, marker: str) -> bool:
    """`key` is `marker` under some prefix ending in '.' (so 'xdecoder.conv_in' is not 'decoder.conv_in')."""
    return key == marker or (key.endswith(marker) and key[-len(marker) - 1] == ".")


def find_prefix(keys: Iterable[str], markers: Iterable[str], what: str, prefix: str | None) -> tuple[str, str]:
    """Find where a model sits in a file: the prefix before one of `markers`, and which marker.

    A file may hold several models (SD3's `_incl_clips` files hold CLIP-L, CLIP-G and T5); then
    `prefix` says which one, and it must be there.
    """
    keys = list(keys)
    found = []
    for marker in markers:
        found += [(k[: -len(marker)], marker) for k in keys if _ends_with_name(k, marker)]
    if prefix is not None:
        found = [f for f in found if f[0] == prefix]
    if len(found) == 1:
        return found[0]
    if not found:
        where = f" under '{prefix}'" if prefix else ""
        raise CheckpointError(f"no {what} found{where} in this checkpoint; it looks like: {describe(keys)}")
    raise CheckpointError(f"this checkpoint holds several {what} models (under "
                          f"{', '.join(repr(f[0]) for f in found)}); say which prefix to load")


# ---------------------------------------------------------------------------------------------
# CLIP text tower. Ours: transformers' names without the `text_model.` level:
#   embeddings.{token,position}_embedding.weight, encoder.layers.N.self_attn.{q,k,v,out}_proj.*,
#   encoder.layers.N.layer_norm{1,2}.*, encoder.layers.N.mlp.fc{1,2}.*, final_layer_norm.*,
#   text_projection.weight (absent when the file has none).
# ---------------------------------------------------------------------------------------------

_CLIP_HF_MARKER = "text_model.final_layer_norm.weight"
_CLIP_OPENCLIP_MARKER = "transformer.resblocks.0.attn.in_proj_weight"
# transformers 5 saves a bare CLIPTextModel without the `text_model.` level: our names exactly.
_CLIP_BARE_MARKER = "embeddings.token_embedding.weight"


def clip_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The CLIP text tower in a file of transformers' layout or of OpenCLIP's."""
    keys = list(keys)
    # The bare marker also ends the transformers layout's keys, so it is looked for only when
    # neither full layout is there.
    if any(_ends_with_name(k, m) for k in keys for m in (_CLIP_HF_MARKER, _CLIP_OPENCLIP_MARKER)):
        prefix, marker = find_prefix(keys, [_CLIP_HF_MARKER, _CLIP_OPENCLIP_MARKER], "CLIP text", prefix)
    else:
        prefix, marker = find_prefix(keys, [_CLIP_BARE_MARKER], "CLIP text", prefix)
    if marker == _CLIP_BARE_MARKER:
        ignore = (r"embeddings\.position_ids$",)
        return Layout("transformers CLIP", prefix, renamed(keys, prefix, [], ignore), ignore)
    if marker == _CLIP_HF_MARKER:
        # A full CLIPModel file also holds the image tower; position_ids is a stale buffer.
        ignore = (r"text_model\.embeddings\.position_ids$", r"vision_model\.", r"visual_projection\.",
                  r"logit_scale$")
        return Layout("transformers CLIP", prefix, renamed(keys, prefix, [(r"^text_model\.", "")], ignore), ignore)

    # OpenCLIP: fused q|k|v, a bare positional table, and text_projection applied as x @ P.
    mapping: dict[str, object] = {}
    rules = [
        (r"^transformer\.resblocks\.", "encoder.layers."),
        (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
        (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
        (r"^ln_final\.", "final_layer_norm."),
        (r"^token_embedding\.", "embeddings.token_embedding."),
        (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    ]
    ignore = (r"visual\.", r"logit_scale$", r"attn_mask$")
    for name, source in renamed(keys, prefix, rules, ignore).items():
        fused = re.match(r"(encoder\.layers\.\d+)\.attn\.in_proj_(weight|bias)$", name)
        if fused:
            layer, kind = fused.groups()
            for index, projection in enumerate("qkv"):
                mapping[f"{layer}.self_attn.{projection}_proj.{kind}"] = Chunk(source.key, 3, index)
        elif name == "text_projection":
            mapping["text_projection.weight"] = Transposed(source.key)
        else:
            mapping[name] = source
    return Layout("OpenCLIP", prefix, mapping, ignore)


# ---------------------------------------------------------------------------------------------
# AutoencoderKL. Ours: the original LDM names (also FLUX's `ae.safetensors`):
#   {encoder,decoder}.conv_in, encoder.down.I.block.J.*, encoder.down.I.downsample.conv,
#   {encoder,decoder}.mid.{block_1,attn_1.{norm,q,k,v,proj_out},block_2}, decoder.up.I.block.J.*,
#   decoder.up.I.upsample.conv, {encoder,decoder}.{norm_out,conv_out}, [post_]quant_conv.
#   Resnet: norm1, conv1, norm2, conv2, nin_shortcut. up.0 is the highest resolution.
# ---------------------------------------------------------------------------------------------

_VAE_LDM_MARKER = "decoder.conv_in.weight"
_VAE_DIFFUSERS_MARKER = "decoder.up_blocks.0.resnets.0.conv1.weight"


def vae_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The VAE in the original LDM layout (`first_stage_model.` in full checkpoints) or diffusers'."""
    keys = list(keys)
    # Both layouts end their decoder input convolution in `decoder.conv_in.weight`; diffusers is
    # told apart by its up_blocks.
    prefix, _ = find_prefix(keys, [_VAE_LDM_MARKER], "VAE", prefix)
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


# ---------------------------------------------------------------------------------------------
# Gemma (text encoder of Lumina-Next). Ours: transformers' GemmaModel names:
#   embed_tokens.weight, layers.N.self_attn.{q,k,v,o}_proj.weight,
#   layers.N.mlp.{gate,up,down}_proj.weight, layers.N.{input,post_attention}_layernorm.weight,
#   norm.weight. GemmaForCausalLM files put them under `model.`; its lm_head is tied and unused.
# ---------------------------------------------------------------------------------------------

def gemma_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    keys = list(keys)
    prefix, _ = find_prefix(keys, ["layers.0.mlp.gate_proj.weight"], "Gemma", prefix)
    return Layout("transformers Gemma", prefix, renamed(keys, prefix, []))


# ---------------------------------------------------------------------------------------------
# T5 v1.1 encoder (SD3's and FLUX's T5-XXL). Ours: transformers' T5EncoderModel names:
#   shared.weight, encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight,
#   encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight,
#   encoder.block.N.layer.{0,1}.layer_norm.weight, encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight,
#   encoder.final_layer_norm.weight. SD3's single files put them under `text_encoders.t5xxl.transformer.`.
# ---------------------------------------------------------------------------------------------

_T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"


def t5_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The T5 encoder in transformers' layout, alone or under a prefix (SD3: `text_encoders.t5xxl.transformer.`).

    The token table is tied: transformers saves `shared.weight` only, other files hold
    `encoder.embed_tokens.weight` too, or instead. `shared.weight` is read when present,
    else `encoder.embed_tokens.weight`; the other copy is ignored. A full T5 file's decoder
    and lm_head are ignored too.
    """
    keys = list(keys)
    prefix, _ = find_prefix(keys, [_T5_MARKER], "T5 encoder", prefix)
    ignore = (r"decoder\.", r"lm_head\.")
    if prefix + "shared.weight" in keys:
        ignore += (r"encoder\.embed_tokens\.weight$",)
    rules = [(r"^encoder\.embed_tokens\.weight$", "shared.weight")]
    return Layout("transformers T5", prefix, renamed(keys, prefix, rules, ignore), ignore)


# ---------------------------------------------------------------------------------------------
# Lumina-Next NextDiT. Ours: the original Lumina-T2X names (`consolidated*.safetensors`):
#   x_embedder, t_embedder.mlp.{0,2}, cap_embedder.{0,1}, pad_token, final_layer.{adaLN_modulation.1,linear},
#   layers.N.attention.{wq,wk,wv,wo,wk_y,wv_y,q_norm,k_norm,ky_norm,gate}, layers.N.attention_norm{1,2},
#   layers.N.ffn_norm{1,2}, layers.N.attention_y_norm, layers.N.adaLN_modulation.1, layers.N.feed_forward.w{1,2,3}.
# ---------------------------------------------------------------------------------------------

_NEXTDIT_ORIGINAL_MARKER = "layers.0.attention.wk_y.weight"
_NEXTDIT_DIFFUSERS_MARKER = "layers.0.attn2.to_k.weight"


def nextdit_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_NEXTDIT_ORIGINAL_MARKER, _NEXTDIT_DIFFUSERS_MARKER], "NextDiT", prefix)
    if marker == _NEXTDIT_ORIGINAL_MARKER:
        return Layout("Lumina-T2X NextDiT", prefix, renamed(keys, prefix, []))
    rules = [
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
    # diffusers stores the one shared wq and q_norm twice (attn1 and attn2); every converted
    # release holds equal copies, so attn1's are read and attn2's are not.
    ignore = (r"layers\.\d+\.attn2\.to_q\.", r"layers\.\d+\.attn2\.norm_q\.")
    return Layout("diffusers NextDiT", prefix, renamed(keys, prefix, rules, ignore), ignore)


# ---------------------------------------------------------------------------------------------
# SD3 MMDiT. Ours: the original SD3 names (sd3_medium.safetensors, under `model.diffusion_model.`):
#   x_embedder.proj, pos_embed, t_embedder.mlp.{0,2}, y_embedder.mlp.{0,2}, context_embedder,
#   joint_blocks.N.{x_block,context_block}.{attn.{qkv,proj,ln_q,ln_k},mlp.{fc1,fc2},adaLN_modulation.1},
#   joint_blocks.N.x_block.attn2.{qkv,proj,ln_q,ln_k} (SD3.5-M), final_layer.{linear,adaLN_modulation.1}.
#   The last block's context_block has only attn.qkv (+ ln_q/ln_k) and a 2-chunk adaLN_modulation.
# ---------------------------------------------------------------------------------------------

_MMDIT_ORIGINAL_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
# diffusers' FLUX transformer has transformer_blocks.0.attn.add_q_proj too; the stored crop
# table is SD3's own.
_MMDIT_DIFFUSERS_MARKER = "pos_embed.pos_embed"


def mmdit_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The SD3 MMDiT in its original layout or diffusers' (SD3Transformer2DModel)."""
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_MMDIT_ORIGINAL_MARKER, _MMDIT_DIFFUSERS_MARKER], "SD3 MMDiT", prefix)
    if marker == _MMDIT_ORIGINAL_MARKER:
        return Layout("original SD3 MMDiT", prefix, renamed(keys, prefix, []))
    if prefix + "transformer_blocks.0.attn.add_q_proj.weight" not in keys:
        raise CheckpointError(f"no SD3 MMDiT found under '{prefix}' (a pos_embed table without joint blocks); "
                              f"the file looks like: {describe(keys)}")

    block = r"^transformer_blocks\.(\d+)\."
    rules = [
        # q, k, v stored apart: renamed to a part of the fused qkv, joined below.
        (block + r"attn\.to_([qkv])\.", r"joint_blocks.\1.x_block.attn.qkv.\2."),
        (block + r"attn\.add_([qkv])_proj\.", r"joint_blocks.\1.context_block.attn.qkv.\2."),
        (block + r"attn2\.to_([qkv])\.", r"joint_blocks.\1.x_block.attn2.qkv.\2."),
        (block + r"attn\.norm_([qk])\.", r"joint_blocks.\1.x_block.attn.ln_\2."),
        (block + r"attn\.norm_added_([qk])\.", r"joint_blocks.\1.context_block.attn.ln_\2."),
        (block + r"attn2\.norm_([qk])\.", r"joint_blocks.\1.x_block.attn2.ln_\2."),
        (block + r"attn\.to_out\.0\.", r"joint_blocks.\1.x_block.attn.proj."),
        (block + r"attn\.to_add_out\.", r"joint_blocks.\1.context_block.attn.proj."),
        (block + r"attn2\.to_out\.0\.", r"joint_blocks.\1.x_block.attn2.proj."),
        (block + r"ff\.net\.0\.proj\.", r"joint_blocks.\1.x_block.mlp.fc1."),
        (block + r"ff\.net\.2\.", r"joint_blocks.\1.x_block.mlp.fc2."),
        (block + r"ff_context\.net\.0\.proj\.", r"joint_blocks.\1.context_block.mlp.fc1."),
        (block + r"ff_context\.net\.2\.", r"joint_blocks.\1.context_block.mlp.fc2."),
        (block + r"norm1\.linear\.", r"joint_blocks.\1.x_block.adaLN_modulation.1."),
        (block + r"norm1_context\.linear\.", r"joint_blocks.\1.context_block.adaLN_modulation.1."),
        (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
        (r"^proj_out\.", "final_layer.linear."),
        (r"^pos_embed\.proj\.", "x_embedder.proj."),
        (r"^pos_embed\.pos_embed$", "pos_embed"),
        (r"^time_text_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
        (r"^time_text_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
        (r"^time_text_embed\.text_embedder\.linear_1\.", "y_embedder.mlp.0."),
        (r"^time_text_embed\.text_embedder\.linear_2\.", "y_embedder.mlp.2."),
    ]
    # Where the text stream is pre_only (the last block: no to_add_out), diffusers' norm1_context
    # is an AdaLayerNormContinuous, which splits (scale, shift) where the original splits
    # (shift, scale); so is norm_out.
    pre_only = {m.group(1) for k in keys
                if (m := re.match(re.escape(prefix) + block[1:] + r"attn\.add_k_proj\.weight$", k))
                and f"{prefix}transformer_blocks.{m.group(1)}.attn.to_add_out.weight" not in keys}
    swapped = [r"^final_layer\.adaLN_modulation\.1\."] + [
        rf"^joint_blocks\.{i}\.context_block\.adaLN_modulation\.1\." for i in pre_only]

    mapping: dict[str, object] = {}
    fused: dict[str, dict[str, str]] = {}
    for name, source in renamed(keys, prefix, rules).items():
        part = re.match(r"(.+\.qkv)\.([qkv])\.(weight|bias)$", name)
        if part:
            fused.setdefault(f"{part.group(1)}.{part.group(3)}", {})[part.group(2)] = source.key
        elif any(re.match(pattern, name) for pattern in swapped):
            mapping[name] = SwappedHalves(source.key)
        else:
            mapping[name] = source
    for name, parts in fused.items():
        if set(parts) != set("qkv"):
            missing = ", ".join(sorted(set("qkv") - set(parts)))
            raise CheckpointError(f"the diffusers MMDiT file has only some of the q/k/v projections of {name} "
                                  f"(missing {missing}): it is incomplete")
        mapping[name] = Concat(tuple(parts[p] for p in "qkv"))
    return Layout("diffusers SD3 MMDiT", prefix, mapping)


# ---------------------------------------------------------------------------------------------
# FLUX.1 transformer. Ours: the original BFL names (`flux1-dev.safetensors`):
#   img_in, txt_in, {time_in,vector_in,guidance_in}.{in_layer,out_layer},
#   double_blocks.N.{img,txt}_mod.lin, double_blocks.N.{img,txt}_attn.{qkv,proj,norm.{query,key}_norm.scale},
#   double_blocks.N.{img,txt}_mlp.{0,2}, single_blocks.N.{linear1,linear2,modulation.lin,
#   norm.{query,key}_norm.scale}, final_layer.{adaLN_modulation.1,linear}.
# ---------------------------------------------------------------------------------------------

_FLUX_ORIGINAL_MARKER = "double_blocks.0.img_attn.qkv.weight"
_FLUX_DIFFUSERS_MARKER = "single_transformer_blocks.0.attn.to_q.weight"

# diffusers module -> ours, outside the blocks (the reverse of convert_flux_transformer_checkpoint_to_diffusers).
_FLUX_DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",   # halves swapped: diffusers splits (scale, shift)
    "proj_out": "final_layer.linear",
}
# Inside transformer_blocks.N -> double_blocks.N. A name ending in ".q", ".k", ".v" (".mlp") is a
# part of the fused tensor before it, concatenated in that order.
_FLUX_DIFFUSERS_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_q": "img_attn.qkv.q", "attn.to_k": "img_attn.qkv.k", "attn.to_v": "img_attn.qkv.v",
    "attn.add_q_proj": "txt_attn.qkv.q", "attn.add_k_proj": "txt_attn.qkv.k", "attn.add_v_proj": "txt_attn.qkv.v",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
# Inside single_transformer_blocks.N -> single_blocks.N.
_FLUX_DIFFUSERS_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.to_q": "linear1.q", "attn.to_k": "linear1.k", "attn.to_v": "linear1.v", "proj_mlp": "linear1.mlp",
    "proj_out": "linear2",
    "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
}
_FUSED_ORDER = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}


def _flux_name(name: str) -> str | None:
    """Our name (fused parts still marked) of a diffusers FLUX key, or None if it is no FLUX key."""
    if "." not in name:
        return None
    module, param = name.rsplit(".", 1)
    block = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if block:
        kind, index, inner = block.groups()
        ours_block, table = (("double_blocks", _FLUX_DIFFUSERS_DOUBLE) if kind == "transformer_blocks"
                             else ("single_blocks", _FLUX_DIFFUSERS_SINGLE))
        ours = table.get(inner)
        ours = ours and f"{ours_block}.{index}.{ours}"
    else:
        ours = _FLUX_DIFFUSERS_TOP.get(module)
    if ours is None:
        return None
    if ours.endswith("_norm") and param == "weight":  # torch RMSNorm's weight is BFL's scale
        param = "scale"
    return f"{ours}.{param}"


def flux_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The FLUX transformer in BFL's layout (alone or under `model.diffusion_model.`) or diffusers'."""
    keys = list(keys)
    prefix, marker = find_prefix(keys, [_FLUX_ORIGINAL_MARKER, _FLUX_DIFFUSERS_MARKER], "FLUX transformer", prefix)
    if marker == _FLUX_ORIGINAL_MARKER:
        return Layout("BFL FLUX", prefix, renamed(keys, prefix, []))

    mapping: dict[str, object] = {}
    parts: dict[tuple[str, str], dict[str, str]] = {}   # (fused name, weight|bias) -> {part: key}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = _flux_name(key[len(prefix):])
        if name is None:
            continue  # not ours: _check_keys reports it as unexpected
        fused = re.match(r"(.+\.(qkv|linear1))\.(\w+)\.(weight|bias)$", name)
        if fused:
            target, _, part, param = fused.groups()
            parts.setdefault((f"{target}.{param}", target.rsplit(".", 1)[1]), {})[part] = key
        elif name.startswith("final_layer.adaLN_modulation.1."):
            mapping[name] = SwappedHalves(key)
        else:
            mapping[name] = Key(key)
    for (name, kind), found in parts.items():
        order = _FUSED_ORDER[kind]
        # An incomplete set is left out: the missing fused tensor and its stray parts get reported.
        if set(found) == set(order):
            mapping[name] = Concat(tuple(found[part] for part in order))
    return Layout("diffusers FLUX", prefix, mapping)


# ---------------------------------------------------------------------------------------------
# What a file holds, for error messages.
# ---------------------------------------------------------------------------------------------

_SIGNATURES = [
    (_FLUX_ORIGINAL_MARKER, "a FLUX.1 transformer (original layout)"),
    (_FLUX_DIFFUSERS_MARKER, "a FLUX.1 transformer (diffusers layout)"),
    (_MMDIT_ORIGINAL_MARKER, "an SD3 MMDiT (original layout)"),
    (_MMDIT_DIFFUSERS_MARKER, "an SD3 MMDiT (diffusers layout)"),
    (_NEXTDIT_ORIGINAL_MARKER, "a Lumina-Next NextDiT (original layout)"),
    (_NEXTDIT_DIFFUSERS_MARKER, "a Lumina-Next NextDiT (diffusers layout)"),
    (_CLIP_HF_MARKER, "a CLIP text tower (transformers layout)"),
    (_CLIP_OPENCLIP_MARKER, "a CLIP text tower (OpenCLIP layout)"),
    (_T5_MARKER, "a T5 encoder"),
    ("layers.0.mlp.gate_proj.weight", "a decoder-only language model such as Gemma"),
    ("decoder.up.0.block.0.conv1.weight", "a VAE (LDM layout)"),
    (_VAE_DIFFUSERS_MARKER, "a VAE (diffusers layout)"),
]


def describe(keys: Iterable[str]) -> str:
    """Name the models a checkpoint holds, from marker keys, with the prefix they sit under."""
    keys = list(keys)
    found = []
    for marker, what in _SIGNATURES:
        for key in keys:
            if _ends_with_name(key, marker):
                prefix = key[: -len(marker)]
                found.append(what + (f" under '{prefix}'" if prefix else ""))
                break
    if found:
        return "; ".join(found)
    sample = ", ".join(sorted(keys)[:3])
    return f"no model this project knows ({len(keys)} tensors, such as {sample})" if keys else "an empty file"
