"""FLUX end to end: our pipeline and diffusers' FluxPipeline, same weights, prompt and seed.

A tiny random FLUX.1-dev-like (guidance embedding) and a schnell-like pipeline are saved with
diffusers' save_pretrained, with the real CLIP BPE vocabulary and a trained T5 SentencePiece
model; ours loads each folder and must reach the same final (packed) latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline as ReferencePipeline
from diffusers import FluxTransformer2DModel
from PIL import Image

import sample
from accelaes import AccelAes, AccelAesConfig
from pipelines.flux import FluxPipeline, FluxSettings
from tests.common import randomize_, rel_err, save_state
from tests.test_clip import write_vocab_and_merges
from tests.test_flux import to_original as flux_original
from tests.test_t5 import reference_from_spm, train_tokenizer
from tests.test_vae import to_ldm

PROMPT = "a cinematic photo of a red fox in the snow, highly detailed"
HEIGHT, WIDTH = 64, 96


def tiny_diffusers_pipeline(folder, dev: bool) -> ReferencePipeline:
    """The release's head size (128, RoPE axes 16/56/56) and CLIP heads of 64, so the original
    single files, which carry no config, say their own sizes."""
    transformer = randomize_(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=dev,
        axes_dims_rope=(16, 56, 56)), seed=1, std=0.1).eval()
    clip = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407)),
        seed=2, std=0.1).eval()
    t5 = randomize_(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=800, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2, feed_forward_proj="gated-gelu")),
        seed=3, std=0.1).eval()
    vae = randomize_(AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        seed=4, std=0.05).eval()
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
                 if dev else FlowMatchEulerDiscreteScheduler(shift=1.0))
    write_vocab_and_merges(folder / "clip")
    clip_tokenizer = transformers.CLIPTokenizer(str(folder / "clip" / "vocab.json"), str(folder / "clip" / "merges.txt"),
                                                model_max_length=77)
    return ReferencePipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip,
                             tokenizer=clip_tokenizer, text_encoder_2=t5,
                             tokenizer_2=reference_from_spm(train_tokenizer(folder / "t5")))


@pytest.fixture(scope="module", params=["dev", "schnell"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"flux_{request.param}")
    pipeline = tiny_diffusers_pipeline(folder, dev=request.param == "dev")
    pipeline.save_pretrained(folder / "flux-tiny")
    return request.param, pipeline, folder / "flux-tiny"


def run_diffusers(pipeline, variant: str, steps: int, seed: int = 0, output_type: str = "latent"):
    tokens = 512 if variant == "dev" else 256
    with torch.no_grad():
        return pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=3.5,
                        max_sequence_length=tokens, generator=torch.Generator().manual_seed(seed),
                        output_type=output_type).images


def test_same_seed_same_latents_as_diffusers(saved):
    variant, reference, folder = saved
    expected = run_diffusers(reference, variant, steps=5)
    ours = FluxPipeline.from_folder(folder, dtype=torch.float32)
    assert ours.is_dev == (variant == "dev")
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH, settings=FluxSettings(steps=5))
    assert latents.shape == expected.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 64)
    assert rel_err(latents, expected) < 1e-4
    assert rel_err(latents, expected.roll(1, dims=1)) > 1e-2


def test_original_files_layout(saved, tmp_path):
    """flux1-dev.safetensors (BFL names) and ae.safetensors (LDM names) at the repository's root,
    beside the text encoders' and tokenizers' folders, and no scheduler config."""
    variant, reference, folder = saved
    expected = run_diffusers(reference, variant, steps=4)
    root = tmp_path / f"FLUX.1-{variant}"
    save_state(flux_original(reference.transformer.state_dict()), root / f"flux1-{variant}.safetensors")
    save_state(to_ldm(reference.vae.state_dict(), 4), root / "ae.safetensors")
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (root / name).symlink_to(folder / name)
    ours = FluxPipeline.from_folder(root, dtype=torch.float32, text_device="cpu")
    assert ours.t5.shared.weight.device.type == "cpu"
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH, settings=FluxSettings(steps=4))
    assert rel_err(latents, expected) < 1e-4


def test_sample_py_writes_the_same_png_as_diffusers(saved, tmp_path):
    variant, reference, folder = saved
    expected = run_diffusers(reference, variant, steps=4, seed=5, output_type="pil")[0]
    output = tmp_path / "flux.png"
    assert sample.main(["--model", "flux", "--weights", str(folder), "--prompt", PROMPT, "--seed", "5",
                        "--steps", "4", "--height", str(HEIGHT), "--width", str(WIDTH), "--output", str(output),
                        "--dense"]) == 0
    ours = Image.open(output)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert json.loads(ours.info["parameters"])["model"] == "flux"


def test_step_cache_and_the_spatial_path(saved):
    variant, _, folder = saved
    if variant != "dev":
        pytest.skip("one variant is enough")
    ours = FluxPipeline.from_folder(folder, dtype=torch.float32)
    settings = FluxSettings(steps=12)
    dense, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings)
    cached = AccelAes.create(AccelAesConfig(sparse=False, spatial_cfg=False))
    step_cache, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings, accelerator=cached)
    assert (cached.stats.dense, cached.stats.sparse, cached.stats.extrapolated) == (9, 0, 3)
    spatial = AccelAes.create(AccelAesConfig(spatial_cfg=False, mask_step=3))
    sparse, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings, accelerator=spatial)
    assert (spatial.stats.dense, spatial.stats.sparse, spatial.stats.extrapolated) == (4, 5, 3)
    assert spatial.mask.focus.shape == (1, 12)   # 24 image tokens, half in focus
    assert 0 < rel_err(step_cache, dense) < 0.5 and 0 < rel_err(sparse, dense) < 1
