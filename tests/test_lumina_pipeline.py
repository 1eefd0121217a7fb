"""Lumina-Next end to end: our pipeline and diffusers' LuminaPipeline, same weights, prompt and seed.

A tiny random pipeline is saved with diffusers' save_pretrained (the layout of
Lumina-Next-SFT-diffusers); our sample.py loads that folder and must give the same final
latents and the same PNG.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
from PIL import Image

import sample
from models.checkpoint import CheckpointError
from pipelines.lumina_next import LuminaNextPipeline, LuminaSettings
from tests.common import randomize_, rel_err, save_state
from tests.test_gemma import train_tokenizer, transformers_tokenizer
from tests.test_lumina_next import to_original

PROMPT = "A Misty Forest at Dawn, golden light"
HEIGHT, WIDTH = 128, 192     # non-square; the tiny transformer's training size is 16*8 = 128 px


def tiny_diffusers_pipeline(folder) -> LuminaPipeline:
    torch.manual_seed(0)
    transformer = randomize_(LuminaNextDiT2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_kv_heads=2, multiple_of=32, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
        cross_attention_dim=32), seed=1, std=0.1)
    with torch.no_grad():  # one wq and q_norm are shared by both attentions in a real NextDiT
        for layer in transformer.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())
    text_encoder = randomize_(transformers.GemmaModel(transformers.GemmaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512)), seed=2, std=0.1)
    vae = randomize_(AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025), seed=3, std=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers_tokenizer(train_tokenizer(folder))
    return LuminaPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                          vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lumina")
    pipeline = tiny_diffusers_pipeline(folder / "spm")
    pipeline.save_pretrained(folder / "Lumina-Next-tiny-diffusers")
    # transformers 5 writes tokenizer.json (not tokenizer.model): our tokenizer reads that here.
    assert not (folder / "Lumina-Next-tiny-diffusers" / "tokenizer" / "tokenizer.model").exists()
    return pipeline, folder / "Lumina-Next-tiny-diffusers"


def run_diffusers(pipeline: LuminaPipeline, steps: int, guidance: float, watershed: float, seed: int = 0,
                  negative_prompt: str | None = None):
    final = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return {}

    with torch.no_grad():
        image = pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=guidance,
                         scaling_watershed=watershed, generator=torch.Generator().manual_seed(seed),
                         negative_prompt=negative_prompt,
                         clean_caption=False, output_type="pil", callback_on_step_end=keep_latents).images[0]
    return final["latents"], image


@pytest.mark.parametrize("steps, guidance, watershed", [(6, 4.0, 1.0), (5, 4.0, 0.3), (4, 1.0, 1.0)])
def test_same_seed_same_latents_as_diffusers(saved, steps, guidance, watershed):
    reference, folder = saved
    expected, _ = run_diffusers(reference, steps, guidance, watershed)
    ours = LuminaNextPipeline.from_folder(folder, dtype=torch.float32)
    settings = LuminaSettings(steps=steps, guidance=guidance, scaling_watershed=watershed)
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH, settings=settings)
    assert rel_err(latents, expected) < 1e-4
    assert rel_err(latents, expected.roll(1, dims=-1)) > 1e-2  # the comparison can fail


def test_negative_prompt_with_capitals_as_diffusers(saved):
    """diffusers lowercases the prompt but takes the negative prompt as it is."""
    reference, folder = saved
    negative = "Blurry, LOW Quality"
    expected, _ = run_diffusers(reference, 5, 4.0, 1.0, negative_prompt=negative)
    ours = LuminaNextPipeline.from_folder(folder, dtype=torch.float32)
    latents, _ = ours.generate([PROMPT], [negative], seed=0, height=HEIGHT, width=WIDTH, settings=LuminaSettings(steps=5))
    assert rel_err(latents, expected) < 1e-4
    lowered, _ = ours.generate([PROMPT], [negative.lower()], seed=0, height=HEIGHT, width=WIDTH,
                               settings=LuminaSettings(steps=5))
    assert rel_err(lowered, expected) > 1e-4  # the capitals matter, so the test can fail


def test_original_files_layout(saved, tmp_path):
    """consolidated_ema.00-of-01.safetensors beside gemma-2b/ and sdxl-vae/, as downloaded separately."""
    reference, folder = saved
    expected, _ = run_diffusers(reference, steps=4, guidance=4.0, watershed=1.0)
    original = tmp_path / "Lumina-Next-T2I"
    save_state(to_original(reference.transformer.state_dict()), original / "consolidated_ema.00-of-01.safetensors")
    save_state({k: torch.zeros_like(v) for k, v in to_original(reference.transformer.state_dict()).items()},
               original / "consolidated.00-of-01.safetensors")  # the non-EMA weights are not picked
    (original / "gemma-2b").mkdir()  # google/gemma-2b holds the weights and the tokenizer together
    for part in ("text_encoder", "tokenizer"):
        for file in (folder / part).iterdir():
            (original / "gemma-2b" / file.name).symlink_to(file)
    (original / "sdxl-vae").symlink_to(folder / "vae")
    ours = LuminaNextPipeline.from_folder(original, dtype=torch.float32)
    # The original release has no config.json: the training size is the release's 1024 px, so this
    # tiny model (trained at 128 px in diffusers' config) is told its base explicitly.
    assert ours.transformer.params.base_tokens == 4096
    ours.transformer.params = ours.transformer.params.__class__(**{**ours.transformer.params.__dict__,
                                                                   "base_tokens": 64})
    latents, _ = ours.generate([PROMPT], seed=0, height=HEIGHT, width=WIDTH, settings=LuminaSettings(steps=4))
    assert rel_err(latents, expected) < 1e-4


def test_sample_py_writes_the_same_png_as_diffusers(saved, tmp_path, capsys):
    reference, folder = saved
    _, expected = run_diffusers(reference, steps=5, guidance=4.0, watershed=1.0, seed=7)
    output = tmp_path / "lumina.png"
    assert sample.main(["--weights", str(folder), "--prompt", PROMPT, "--seed", "7", "--steps", "5",
                        "--height", str(HEIGHT), "--width", str(WIDTH), "--output", str(output), "--dense"]) == 0
    assert "5/5" in capsys.readouterr().err  # the progress bar reached the end
    ours = Image.open(output)
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int))
    assert ours.size == expected.size and difference.max() <= 1
    parameters = json.loads(ours.info["parameters"])
    assert parameters["prompt"] == PROMPT and parameters["seed"] == 7 and parameters["steps"] == 5


def test_midpoint_solver_costs_two_evaluations_per_step(saved):
    _, folder = saved
    ours = LuminaNextPipeline.from_folder(folder, dtype=torch.float32)
    calls = []
    forward = ours.transformer.forward
    ours.transformer.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    euler, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH, settings=LuminaSettings(steps=3))
    assert len(calls) == 3
    midpoint, _ = ours.generate([PROMPT], height=HEIGHT, width=WIDTH,
                                settings=LuminaSettings(steps=3, solver="midpoint", shift=4.0))
    assert len(calls) == 3 + 6 and rel_err(midpoint, euler) > 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--height", "120"], "height 120 is not a positive multiple of 16"),
    (["--width", "200"], "width 200 is not a positive multiple of 16"),
])
def test_bad_size_is_refused_before_loading(saved, tmp_path, capsys, flags, message):
    _, folder = saved
    assert sample.main(["--weights", str(folder), "--output", str(tmp_path / "x.png"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_missing_component_and_wrong_model(saved, tmp_path, capsys):
    _, folder = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        (broken / part).symlink_to(folder / part)
    assert sample.main(["--weights", str(broken), "--output", str(tmp_path / "x.png")]) == 2
    assert "has no vae (the vae): see weights.md" in capsys.readouterr().err

    (broken / "vae").symlink_to(folder / "text_encoder")  # a Gemma where the VAE should be
    with pytest.raises(CheckpointError, match="no VAE found.*decoder-only language model"):
        LuminaNextPipeline.from_folder(broken, dtype=torch.float32)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert sample.main(["--weights", str(empty), "--output", str(tmp_path / "x.png")]) == 2
    assert "neither the diffusers layout" in capsys.readouterr().err
