"""The CLIP image tower (OpenAI ViT-L/14, LAION ViT-H/14) and the full CLIP model around it.

The image-quality metrics embed images with these towers: CLIP score and the LAION aesthetic
predictor with OpenAI's ViT-L/14, HPS v2.1 and PickScore with a LAION ViT-H/14. The tower is a
pre-LN ViT without attention masks, read out at its class token:

    x = [class_embedding, patch_embedding(pixels)] + position_embedding
    x = pre_layrnorm(x)
    for each layer:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    pooled = post_layernorm(x[:, 0]);  projected = visual_projection(pooled)

Parameters are named after transformers' CLIPVisionModelWithProjection, without its
`vision_model.` level (and `pre_layrnorm` keeps transformers' spelling). Its encoder layers
are the text tower's (models/clip.py), named alike in every release. OpenCLIP's files
(`visual.*`, with a fused q|k|v `in_proj_weight` and a projection applied as x @ proj) are
renamed on loading. OpenCLIP and OpenAI take the class token before ln_post, transformers
applies post_layernorm to the class token only: the same pooled vector either way.

`CLIPModel` is the pair of towers plus `logit_scale` (a log: the score scale is its exp), as
transformers' CLIPModel and an OpenCLIP `CLIP` hold them; it loads from one file or folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from .checkpoint import Checkpoint, load_model
from .clip import (ACTIVATIONS, OPENCLIP_BLOCK_RULES, CLIPEncoder, CLIPOutput, CLIPParams, CLIPTextModel,
                   checked_activation, clip_layout, openclip_sources, tower_config)
from .keys import CheckpointError, Key, Layout, Shapes, Source, ends_with_name, find_prefix, renamed


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

# The released towers' head counts, which their widths do not imply: OpenCLIP's ViT-H-14 and
# ViT-bigG-14 configs set head_width 80 and 104, giving 16 heads like ViT-L/14's 16 of 64.
_RELEASED_HEADS = {1024: 16, 1280: 16, 1664: 16}


@dataclass(frozen=True)
class CLIPVisionParams:
    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    activation: str             # "quick_gelu" (OpenAI ViT-L/14) or "gelu" (LAION ViT-H/14, bigG/14)
    projection_dim: int | None  # None: the file has no projection, projected = pooled
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None,
                    default_activation: str | None = None) -> CLIPVisionParams:
        """Infer the tower from its tensor shapes (in our parameter names) and, if given, config.json.

        Shapes fix every size but the head count and the activation. config.json settles them;
        without one, the released towers' head counts (else 64-wide heads), and
        `default_activation`, else quick_gelu only at OpenAI ViT-L/14's width 1024 (OpenCLIP
        files do not record it: open_clip's pretrained tag sets quick_gelu for `ViT-L-14/openai`).
        """
        config = tower_config(config, "vision_config")
        s = Shapes(shapes, config, "CLIP image tower")
        width, _, patch, _ = s["embeddings.patch_embedding.weight"]
        positions = s["embeddings.position_embedding.weight"][0]
        grid = math.isqrt(positions - 1)
        if grid * grid != positions - 1:
            raise CheckpointError(f"the CLIP image tower has {positions} positions, which is not a class token "
                                  "plus a square grid of patches; the file is damaged or not a CLIP ViT")
        projection = s["visual_projection.weight"][0] if "visual_projection.weight" in s else None
        s.agree("hidden_size", width, "width")
        heads = config.get("num_attention_heads") or _RELEASED_HEADS.get(width) or max(1, width // 64)
        if width % heads:
            raise CheckpointError(f"CLIP image width {width} does not split into {heads} attention heads; "
                                  "fix num_attention_heads in config.json")
        activation = checked_activation(config.get("hidden_act") or default_activation
                                        or ("quick_gelu" if width == 1024 else "gelu"))
        return cls(width=width, layers=s.count("encoder.layers"), heads=heads,
                   mlp_width=s["encoder.layers.0.mlp.fc1.weight"][0], patch_size=patch, image_size=grid * patch,
                   activation=activation, projection_dim=projection, eps=config.get("layer_norm_eps") or 1e-5)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, p: CLIPVisionParams):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, p.width, p.patch_size, stride=p.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(p.width))
        self.position_embedding = nn.Embedding(p.tokens, p.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)   # [B, grid*grid, width]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    def __init__(self, p: CLIPVisionParams):
        super().__init__()
        self.params = p
        self.embeddings = CLIPVisionEmbeddings(p)
        self.pre_layrnorm = nn.LayerNorm(p.width, eps=p.eps)  # (sic: transformers' name)
        # The text tower's layers (models/clip.py), without its causal mask: every patch sees every patch.
        self.encoder = CLIPEncoder(p, causal=False)
        self.post_layernorm = nn.LayerNorm(p.width, eps=p.eps)
        self.visual_projection = nn.Linear(p.width, p.projection_dim, bias=False) if p.projection_dim else None

    def forward(self, pixels: torch.Tensor) -> CLIPOutput:
        """pixels: [B, 3, image_size, image_size], normalised as the metric's preprocessing does."""
        size = self.params.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"this CLIP image tower reads [B, 3, {size}, {size}] pixels, got "
                             f"{list(pixels.shape)}; preprocess the images first (metrics/preprocess.py)")
        x = self.pre_layrnorm(self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.encoder.layers:
            x = layer(x)
        pooled = self.post_layernorm(x[:, 0])
        projected = self.visual_projection(pooled) if self.visual_projection is not None else pooled
        return CLIPOutput(x, pooled, projected)


class CLIPModel(nn.Module):
    """Both towers and the learned temperature, as one released CLIP file holds them."""

    def __init__(self, vision: CLIPVisionParams, text: CLIPParams):
        super().__init__()
        if vision.projection_dim is None or vision.projection_dim != text.projection_dim:
            raise CheckpointError(f"the image tower projects to {vision.projection_dim} dimensions and the text "
                                  f"tower to {text.projection_dim}: these towers do not form one CLIP model")
        self.vision_model = CLIPVisionModel(vision)
        self.text_model = CLIPTextModel(text)
        self.logit_scale = nn.Parameter(torch.empty(()))  # a log; exp(logit_scale) scales the cosines

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, projection_dim], not normalised (transformers' get_image_features)."""
        return self.vision_model(pixels).projected

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, projection_dim], not normalised (transformers' get_text_features)."""
        return self.text_model(input_ids).projected


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours (image tower): transformers' names without `vision_model.`:
#   embeddings.{patch_embedding.weight, class_embedding, position_embedding.weight}, pre_layrnorm.*,
#   encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}.*,
#   post_layernorm.*, visual_projection.weight (absent when the file has none).
# ---------------------------------------------------------------------------------------------

_VISION_HF_MARKER = "vision_model.pre_layrnorm.weight"
_VISION_OPENCLIP_MARKER = "visual.ln_post.weight"
# transformers 5 saves a bare CLIPVisionModel without the `vision_model.` level: our names exactly.
_VISION_BARE_MARKER = "pre_layrnorm.weight"
_TEXT_KEYS_OF_HF = (r"text_model\.", r"text_projection\.", r"logit_scale$")

# OpenCLIP (and OpenAI) module -> ours, inside `visual.`; q|k|v and proj are handled apart.
_OPENCLIP_VISION_RULES = [
    (r"^conv1\.", "embeddings.patch_embedding."),
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    *OPENCLIP_BLOCK_RULES,
    (r"^ln_post\.", "post_layernorm."),
]


def _find_vision(keys: list[str], prefix: str | None) -> tuple[str, str]:
    """The prefix before `vision_model.` / `visual.` (or before a bare tower's names), and the marker found."""
    # The bare marker also ends the transformers layout's keys: it is looked for only when
    # neither full layout is there.
    full = [_VISION_HF_MARKER, _VISION_OPENCLIP_MARKER]
    if any(ends_with_name(k, m) for k in keys for m in full):
        return find_prefix(keys, full, "CLIP image tower", prefix)
    return find_prefix(keys, [_VISION_BARE_MARKER], "CLIP image tower", prefix)


def _vision_mapping(keys: list[str], outer: str, marker: str) -> tuple[str, dict[str, Source], tuple[str, ...]]:
    """The layout's name, our name -> source, and the keys to skip, for the image tower under `outer`."""
    if marker != _VISION_OPENCLIP_MARKER:
        # A full CLIPModel file also holds the text tower; position_ids is a stale buffer.
        ignore = (r"(vision_model\.)?embeddings\.position_ids$", *_TEXT_KEYS_OF_HF)
        return "transformers CLIP", renamed(keys, outer, [(r"^vision_model\.", "")], ignore), ignore

    names = renamed(keys, outer + "visual.", _OPENCLIP_VISION_RULES)
    return "OpenCLIP", openclip_sources(names, "proj", "visual_projection.weight"), ()


def clip_vision_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The CLIP image tower in a file of transformers' layout or of OpenCLIP's (OpenAI's keys are OpenCLIP's).

    `prefix` is what comes before `vision_model.` / `visual.`, for files that hold more than CLIP.
    """
    keys = list(keys)
    outer, marker = _find_vision(keys, prefix)
    name, mapping, ignore = _vision_mapping(keys, outer, marker)
    # OpenCLIP's image tower is all of `visual.`; the keys around it are the text tower's.
    return Layout(name, outer + "visual." if marker == _VISION_OPENCLIP_MARKER else outer, mapping, ignore)


def clip_model_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """Both towers and logit_scale, as transformers' CLIPModel or an OpenCLIP `CLIP` saves them.

    Ours: `vision_model.` + the image tower's names, `text_model.` + the text tower's
    (models/clip.py), `logit_scale`.
    """
    keys = list(keys)
    outer, marker = find_prefix(keys, [_VISION_HF_MARKER, _VISION_OPENCLIP_MARKER], "CLIP model", prefix)
    name, vision, _ = _vision_mapping(keys, outer, marker)
    # OpenCLIP's image blocks also end in the text tower's marker (`visual.transformer.resblocks.0...`):
    # the prefix tells the text tower apart.
    text = clip_layout(keys, outer)
    mapping = {**{f"vision_model.{k}": source for k, source in vision.items()},
               **{f"text_model.{k}": source for k, source in text.mapping.items()}}
    if outer + "logit_scale" in keys:  # else reported as missing
        mapping["logit_scale"] = Key(outer + "logit_scale")
    ignore = (r"(text_model|vision_model)\.embeddings\.position_ids$", r"attn_mask$")
    return Layout(name, outer, mapping, ignore)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _check_activation(activation: str | None) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def load_clip_vision(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
                     activation: str | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> CLIPVisionModel:
    """Load the CLIP image tower from a file or folder, in transformers' or OpenCLIP's layout.

    A full CLIP file or folder is fine: the text tower is left unread. `activation` overrides
    what config.json (or, without one, the width) says; OpenCLIP files need it for towers other
    than the released ones (e.g. "gelu" for LAION's ViT-L/14).
    """
    _check_activation(activation)

    def build(shapes: dict[str, tuple[int, ...]], config: dict | None) -> CLIPVisionModel:
        params = CLIPVisionParams.from_shapes(shapes, config)
        return CLIPVisionModel(replace(params, activation=activation or params.activation))

    return load_model(path_or_checkpoint, clip_vision_layout, build, prefix=prefix, dtype=dtype, device=device)


def load_clip_model(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
                    activation: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> CLIPModel:
    """Load a whole CLIP model: a transformers folder (config.json + model.safetensors) or file,
    or an OpenCLIP file (`visual.*`, `transformer.*`, `token_embedding`, ..., `logit_scale`).

    Without config.json the image tower takes the text tower's activation (OpenCLIP applies
    its quick_gelu flag to both), which models/clip.py infers from the text width; `activation`
    overrides both towers'.
    """
    _check_activation(activation)

    def build(shapes: dict[str, tuple[int, ...]], config: dict | None) -> CLIPModel:
        towers = {tower: {k[len(tower):]: shape for k, shape in shapes.items() if k.startswith(tower)}
                  for tower in ("vision_model.", "text_model.")}
        text = CLIPParams.from_shapes(towers["text_model."], config)
        text = replace(text, activation=activation or text.activation)
        vision = CLIPVisionParams.from_shapes(towers["vision_model."], config, default_activation=text.activation)
        return CLIPModel(replace(vision, activation=activation or vision.activation), text)

    return load_model(path_or_checkpoint, clip_model_layout, build, prefix=prefix, dtype=dtype, device=device)
