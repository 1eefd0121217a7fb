"""models/clip_vision.py against transformers: the CLIP image tower and the whole CLIP model,
in transformers' layout and in OpenCLIP's (written here from transformers' state dicts).

The towers are small and random, with the released towers' rules: quick_gelu for OpenAI's
ViT-L/14, gelu and 80-wide heads for LAION's ViT-H/14; two tests use the released widths
(1024, 1280) with one layer, to prove the head counts and activations read without a config.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPVisionConfig
from transformers import CLIPModel as RefCLIPModel
from transformers import CLIPVisionModel as RefVisionModel
from transformers import CLIPVisionModelWithProjection as RefVisionModelWithProjection

from models.checkpoint import CheckpointError
from models.clip_vision import CLIPVisionParams, load_clip_model, load_clip_vision
from tests.common import clip_tower, randomize_, rel_err, save_state
from tests.test_clip import openclip_blocks, ref_config, sample_ids
from tests.test_clip import to_openclip as text_to_openclip

IMAGE, PATCH = 56, 14  # a 4x4 grid of patches: 17 tokens
# OpenAI ViT-L/14's activation at a small width, and LAION ViT-H/14's 80-wide heads and gelu,
# whose non-square projection catches a transposed proj.
TOWERS = {"quick_gelu": clip_tower(128, heads=2, layers=2, mlp=256, activation="quick_gelu", projection=48),
          "gelu": clip_tower(160, heads=2, layers=3, mlp=320, activation="gelu", projection=96)}
TOLERANCE = 1e-5


def vision_config(image_size: int = IMAGE, **tower) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=image_size, patch_size=PATCH, **tower)


@pytest.fixture(scope="module")
def references() -> dict[str, RefVisionModelWithProjection]:
    return {name: randomize_(RefVisionModelWithProjection(vision_config(**tower)), seed=seed).eval()
            for seed, (name, tower) in enumerate(TOWERS.items())}


def sample_pixels(size: int = IMAGE, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def assert_tower_matches(model, ref, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(pixels)
        expected = ref(pixels)
        pooled = ref.vision_model(pixels).pooler_output
    errors = {"last_hidden_state": rel_err(out.last_hidden_state, expected.last_hidden_state),
              "pooled": rel_err(out.pooled, pooled),
              "image_embeds": rel_err(out.projected, expected.image_embeds)}
    assert max(errors.values()) < TOLERANCE, errors


def to_openclip_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPVisionModelWithProjection keys -> OpenCLIP's `visual.*` (as in open_clip's CLIP)."""
    hf = "vision_model."
    out = openclip_blocks(state, hf, "visual.transformer.resblocks.")
    out["visual.conv1.weight"] = state[hf + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = state[hf + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = state[hf + "embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[hf + f"pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[hf + f"post_layernorm.{kind}"]
    out["visual.proj"] = state["visual_projection.weight"].t()  # OpenCLIP applies x @ proj
    return out


# ---------------------------------------------------------------------------------------------
# The image tower
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["transformers", "transformers_folder", "openclip"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_matches_transformers(name, layout, references, tmp_path):
    ref, tower = references[name], TOWERS[name]
    # Only config.json records the activation; a lone file of a width no released tower has must say it.
    activation = "quick_gelu" if name == "quick_gelu" and layout != "transformers_folder" else None
    if layout == "transformers":
        state = dict(ref.state_dict(), **{"vision_model.embeddings.position_ids": torch.arange(17)[None]})
        source = save_state(state, tmp_path / "model.safetensors")
    elif layout == "transformers_folder":
        ref.save_pretrained(tmp_path)
        source = tmp_path
    else:
        source = save_state(to_openclip_visual(ref.state_dict()), tmp_path / "open_clip_model.safetensors")
    model = load_clip_vision(source, activation=activation)
    assert model.params.heads == tower["num_attention_heads"]
    assert model.params.activation == tower["hidden_act"]
    assert (model.params.image_size, model.params.patch_size) == (IMAGE, PATCH)
    assert_tower_matches(model, ref, sample_pixels())


@pytest.mark.parametrize("width, activation", [(1024, "quick_gelu"), (1280, "gelu")])
def test_released_widths_need_no_config(width, activation, tmp_path):
    """OpenAI ViT-L/14 (1024 wide: 16 heads of 64, quick_gelu) and LAION ViT-H/14 (1280: 16 of 80, gelu)."""
    config = vision_config(image_size=28, hidden_size=width, num_attention_heads=16, num_hidden_layers=1,
                           intermediate_size=64, hidden_act=activation, projection_dim=32)
    ref = randomize_(RefVisionModelWithProjection(config), seed=3, std=0.05).eval()
    model = load_clip_vision(save_state(to_openclip_visual(ref.state_dict()), tmp_path / "visual.safetensors"))
    assert (model.params.heads, model.params.activation) == (16, activation)
    assert_tower_matches(model, ref, sample_pixels(28, batch=2))


def test_tower_inside_a_full_clip_file_and_bare_tower(tmp_path):
    """A CLIPModel folder (the text tower is left unread), and transformers 5's bare CLIPVisionModel."""
    full = randomize_(RefCLIPModel(clip_config("gelu")), seed=4).eval()
    full.save_pretrained(tmp_path / "full")
    pixels = sample_pixels()
    with torch.no_grad():
        expected = full.get_image_features(pixels).pooler_output
        ours = load_clip_vision(tmp_path / "full")(pixels).projected
    assert rel_err(ours, expected) < TOLERANCE

    bare = randomize_(RefVisionModel(vision_config(**TOWERS["gelu"])), seed=5).eval()
    bare.save_pretrained(tmp_path / "bare")
    model = load_clip_vision(tmp_path / "bare")
    assert model.visual_projection is None
    with torch.no_grad():
        out, ref = model(pixels), bare(pixels)
    assert rel_err(out.pooled, ref.pooler_output) < TOLERANCE and out.projected is out.pooled


def test_params_from_shapes_and_config():
    def shapes(width, layers, mlp, projection):
        return {"embeddings.patch_embedding.weight": (width, 3, 14, 14),
                "embeddings.position_embedding.weight": (257, width),
                **{f"encoder.layers.{n}.mlp.fc1.weight": (mlp, width) for n in range(layers)},
                "visual_projection.weight": (projection, width)}

    vit_l_shapes = shapes(1024, 24, 4096, 768)
    vit_l = CLIPVisionParams.from_shapes(vit_l_shapes)
    assert vit_l == CLIPVisionParams(width=1024, layers=24, heads=16, mlp_width=4096, patch_size=14, image_size=224,
                                     activation="quick_gelu", projection_dim=768)
    vit_h = CLIPVisionParams.from_shapes(shapes(1280, 32, 5120, 1024))
    assert (vit_h.heads, vit_h.activation, vit_h.tokens) == (16, "gelu", 257)
    assert CLIPVisionParams.from_shapes(shapes(1664, 48, 8192, 1280)).heads == 16  # bigG: 16 heads of 104
    # A CLIPModel config nests the image tower's; a config of another model is not read.
    nested = {"model_type": "clip", "vision_config": {"hidden_act": "gelu", "num_attention_heads": 8}}
    assert CLIPVisionParams.from_shapes(vit_l_shapes, nested).activation == "gelu"
    assert CLIPVisionParams.from_shapes(vit_l_shapes, nested).heads == 8
    assert CLIPVisionParams.from_shapes(vit_l_shapes, {"model_type": "t5", "hidden_act": "relu"}).heads == 16
    with pytest.raises(CheckpointError, match="hidden_size=768 but the weights have width 1024"):
        CLIPVisionParams.from_shapes(vit_l_shapes, {"model_type": "clip_vision_model", "hidden_size": 768})
    with pytest.raises(CheckpointError, match="square grid"):
        CLIPVisionParams.from_shapes({**shapes(1024, 1, 64, 8), "embeddings.position_embedding.weight": (250, 1024)})


def test_wrong_pixels_are_refused(references, tmp_path):
    model = load_clip_vision(save_state(dict(references["gelu"].state_dict()), tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"reads \[B, 3, 56, 56\] pixels"):
        model(torch.zeros(1, 3, 224, 224))


# ---------------------------------------------------------------------------------------------
# The whole CLIP model
# ---------------------------------------------------------------------------------------------

TEXT = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=256)  # either activation


def clip_config(name: str) -> CLIPConfig:
    tower = dict(TOWERS[name])
    projection = tower.pop("projection_dim")
    text = ref_config(hidden_act=tower["hidden_act"], **TEXT)  # the vocabulary of sample_ids
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(**tower).to_dict(),
                      projection_dim=projection)


def to_openclip_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel keys -> an OpenCLIP CLIP's (as HPS's checkpoint holds them)."""
    text = text_to_openclip({k: v for k, v in state.items() if k.startswith("text_")})
    return {**text, **to_openclip_visual(state), "logit_scale": state["logit_scale"]}


@pytest.mark.parametrize("layout", ["transformers_folder", "openclip_pt"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_clip_model_matches_transformers(name, layout, tmp_path):
    ref = randomize_(RefCLIPModel(clip_config(name)), seed=6).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(100.0))
    activation = None
    if layout == "transformers_folder":
        ref.save_pretrained(tmp_path)
        source = tmp_path
    else:  # HPS's checkpoint: a torch save of {"state_dict": OpenCLIP keys}
        source = tmp_path / "HPS_like.pt"
        torch.save({"state_dict": to_openclip_model(ref.state_dict())}, source)
        activation = "quick_gelu" if name == "quick_gelu" else None  # gelu: inferred from the text width
    model = load_clip_model(source, activation=activation)
    assert model.vision_model.params.activation == model.text_model.params.activation == TOWERS[name]["hidden_act"]
    pixels, ids = sample_pixels(), sample_ids()
    with torch.no_grad():
        errors = {"image": rel_err(model.image_embeds(pixels), ref.get_image_features(pixels).pooler_output),
                  "text": rel_err(model.text_embeds(ids), ref.get_text_features(ids).pooler_output)}
    assert max(errors.values()) < TOLERANCE, errors
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_clip_model_needs_both_towers_and_logit_scale(references, tmp_path):
    vision_only = save_state(to_openclip_visual(references["gelu"].state_dict()), tmp_path / "visual.safetensors")
    with pytest.raises(CheckpointError, match="no CLIP text"):
        load_clip_model(vision_only)
    ref = randomize_(RefCLIPModel(clip_config("gelu")), seed=7)
    state = to_openclip_model(ref.state_dict())
    del state["logit_scale"]
    with pytest.raises(CheckpointError, match="Missing 1 .*logit_scale"):
        load_clip_model(save_state(state, tmp_path / "no_scale.safetensors"))
