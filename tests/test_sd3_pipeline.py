"""SD3 end to end: our pipeline and diffusers' StableDiffusion3Pipeline, same weights, prompt and seed.

A tiny random pipeline is saved with diffusers' save_pretrained (the layout of
stable-diffusion-3-medium-diffusers), with the real CLIP BPE vocabulary and a trained T5
SentencePiece model; ours loads that folder and must reach the same final latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from PIL import Image

import sample
from accelaes import AccelAes, AccelAesConfig
from pipelines.sd3 import SD3Pipeline, SD3Settings
from tests.common import randomize_, rel_err, save_state
from tests.test_clip import write_vocab_and_merges
from tests.test_mmdit import to_original as mmdit_original
from tests.test_t5 import reference_from_spm, train_tokenizer
from tests.test_vae import to_ldm

PROMPT = "a photorealistic lighthouse on a cliff, dramatic lighting"
HEIGHT, WIDTH = 64, 96


def clip_tower(projection_dim: int, hidden: int, seed: int):
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=hidden // 64, max_position_embeddings=77,
                                         projection_dim=projection_dim, hidden_act="gelu", bos_token_id=49406,
                                         eos_token_id=49407)
    return randomize_(transformers.CLIPTextModelWithProjection(config), seed=seed, std=0.1).eval()


def tiny_diffusers_pipeline(folder) -> StableDiffusion3Pipeline:
    """Sizes a config-less single file still tells apart: CLIP heads of 64, the MMDiT's head size
    from its qk-norm (SD3.5-style), T5's heads from its position table."""
    transformer = randomize_(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=192, caption_projection_dim=32, pooled_projection_dim=192, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm"), seed=1, std=0.1).eval()
    t5 = randomize_(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=800, d_model=192, d_kv=16, num_heads=4, d_ff=96, num_layers=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128)), seed=2, std=0.1).eval()
    vae = randomize_(AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
        seed=3, std=0.05).eval()
    write_vocab_and_merges(folder / "clip")
    files = (str(folder / "clip" / "vocab.json"), str(folder / "clip" / "merges.txt"))
    clip_l_tokenizer = transformers.CLIPTokenizer(*files, model_max_length=77)
    clip_g_tokenizer = transformers.CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    t5_tokenizer = reference_from_spm(train_tokenizer(folder / "t5"))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_tower(64, 64, seed=4), tokenizer=clip_l_tokenizer,
        text_encoder_2=clip_tower(128, 128, seed=5), tokenizer_2=clip_g_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    pipeline = tiny_diffusers_pipeline(folder)
    pipeline.save_pretrained(folder / "sd3-tiny-diffusers")
    return pipeline, folder / "sd3-tiny-diffusers"


def run_diffusers(pipeline, steps: int, guidance: float, seed: int = 0, output_type: str = "latent"):
    with torch.no_grad():
        return pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(seed), output_type=output_type).images


@pytest.mark.parametrize("steps, guidance", [(5, 7.0), (4, 1.0)])
def test_same_seed_same_latents_as_diffusers(saved, steps, guidance):
    reference, folder = saved
    expected = run_diffusers(reference, steps, guidance)
    ours = SD3Pipeline.from_folder(folder, dtype=torch.float32)
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH,
                               settings=SD3Settings(steps=steps, guidance=guidance))
    assert rel_err(latents, expected) < 1e-4
    assert rel_err(latents, expected.roll(1, dims=-1)) > 1e-2


def test_single_files_layout(saved, tmp_path):
    """sd3_medium.safetensors (MMDiT under model.diffusion_model., VAE under first_stage_model.)
    beside text_encoders/*.safetensors and the tokenizer folders, as the release's root holds them."""
    reference, folder = saved
    expected = run_diffusers(reference, 4, 7.0)
    root = tmp_path / "stable-diffusion-3-medium"
    main = {"model.diffusion_model." + k: v for k, v in mmdit_original(reference.transformer.state_dict()).items()}
    main.update({"first_stage_model." + k: v for k, v in to_ldm(reference.vae.state_dict(), 4).items()})
    save_state(main, root / "sd3_medium.safetensors")
    for name, encoder in (("clip_l", reference.text_encoder), ("clip_g", reference.text_encoder_2),
                          ("t5xxl_fp16", reference.text_encoder_3)):
        save_state(encoder.state_dict(), root / "text_encoders" / f"{name}.safetensors")
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (root / name).symlink_to(folder / name)
    ours = SD3Pipeline.from_folder(root, dtype=torch.float32)
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH, settings=SD3Settings(steps=4))
    assert rel_err(latents, expected) < 1e-4


def test_sample_py_writes_the_same_png_as_diffusers(saved, tmp_path):
    reference, folder = saved
    expected = run_diffusers(reference, 4, 7.0, seed=3, output_type="pil")[0]
    output = tmp_path / "sd3.png"
    assert sample.main(["--model", "sd3", "--weights", str(folder), "--prompt", PROMPT, "--seed", "3", "--steps", "4",
                        "--height", str(HEIGHT), "--width", str(WIDTH), "--output", str(output), "--dense"]) == 0
    ours = Image.open(output)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert json.loads(ours.info["parameters"])["model"] == "sd3"


def test_step_cache_by_default_and_the_spatial_path_on_request(saved):
    _, folder = saved
    ours = SD3Pipeline.from_folder(folder, dtype=torch.float32)
    settings = SD3Settings(steps=12)
    dense, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings)
    cached = AccelAes.create(AccelAesConfig(sparse=False, spatial_cfg=False, mask_step=3))
    step_cache, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings, accelerator=cached)
    # 12 steps, warmup 5, interval 2: steps 0-4, 5, 7, 9 and the last computed, 6, 8, 10 extrapolated.
    assert (cached.stats.dense, cached.stats.sparse, cached.stats.extrapolated) == (9, 0, 3) and cached.mask is None
    spatial = AccelAes.create(AccelAesConfig(sparse=True, spatial_cfg=False, mask_step=3))
    sparse, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=settings, accelerator=spatial)
    # Steps 0-3 dense (3 records the mask), then 4, 5, 7, 9, 11 sparse.
    assert (spatial.stats.dense, spatial.stats.sparse, spatial.stats.extrapolated) == (4, 5, 3)
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    assert spatial.mask.focus.shape == (1, tokens - round(0.5 * tokens))
    assert 0 < rel_err(step_cache, dense) < 0.5 and 0 < rel_err(sparse, dense) < 1


def test_words_of_every_segment_are_scored(saved):
    """AesMask reads CLIP's 77 positions then T5's, each with its own tokenizer's word grouping."""
    _, folder = saved
    ours = SD3Pipeline.from_folder(folder, dtype=torch.float32)
    (words,) = ours.prompt_words([PROMPT], None, SD3Settings())
    clip, t5 = words[:77], words[77:]
    assert len(t5) == 256 and clip[0] is None and t5[-1] is None   # start of text, padding
    assert "photorealistic" in clip and "lighthouse" in t5          # each tokenizer's words, whole


def test_missing_parts(saved, tmp_path, capsys):
    _, folder = saved
    assert sample.main(["--model", "sd3", "--weights", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "has no tokenizer/ folder" in capsys.readouterr().err
    assert sample.main(["--model", "sd3", "--weights", str(folder), "--solver", "midpoint",
                        "--output", str(tmp_path / "x.png")]) == 2
    assert "--solver applies to --model lumina-next only" in capsys.readouterr().err
    assert sample.main(["--model", "sd3", "--weights", str(folder), "--save-mask", "--output", str(tmp_path / "x.png")]) == 2
    assert "--save-mask: this run builds no focus mask (SD3 runs StepCache alone by default): add --sparse" in \
        capsys.readouterr().err
    assert sample.main(["--model", "sd3", "--weights", str(folder), "--scaling-watershed", "0.3",
                        "--output", str(tmp_path / "x.png")]) == 2
    assert "--scaling-watershed applies to --model lumina-next only" in capsys.readouterr().err
