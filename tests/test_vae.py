"""AutoencoderKL against diffusers' AutoencoderKL, with random weights, from both key layouts."""

from __future__ import annotations

import re

import diffusers
import pytest
import torch

from models.checkpoint import Checkpoint, CheckpointError, build_on_meta
from models.keys import AsConv1x1, Key, describe
from models.vae import AutoencoderKL, VAEParams, load_vae, tiny_random_vae, vae_layout
from tests.common import read_through, rel_err, randomize_, save_state


TOL = 1e-5
LDM_PREFIX = "first_stage_model."

# Two small variants: SD-like (4 channels, quant convs, 3 levels) and SD3/FLUX-like (16, none, 2 levels).
VARIANTS = {
    "sd": dict(block_out_channels=(32, 64, 64), latent_channels=4,
               use_quant_conv=True, use_post_quant_conv=True),
    "flux": dict(block_out_channels=(32, 64), latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False),
}


def diffusers_vae(variant: str):
    config = VARIANTS[variant]
    levels = len(config["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=2, norm_num_groups=32, **config)
    return randomize_(vae, seed=len(variant)).eval()


def to_ldm(state: dict[str, torch.Tensor], up_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the LDM layout, read through `vae_layout` (which counts the
    up blocks itself: `up_blocks` is only checked)."""
    ldm = read_through(vae_layout(state), state)
    assert up_blocks is None or f"decoder.up.{up_blocks - 1}.block.0.conv1.weight" in ldm
    return ldm


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    """A random diffusers VAE, saved as a diffusers folder and as an SD-style LDM single file.

    The LDM file is written through our own renaming (`to_ldm`); that it is what diffusers
    means by the LDM layout is checked through diffusers' converter
    (test_ldm_file_is_what_diffusers_converts).
    """
    variant = request.param
    reference = diffusers_vae(variant)
    folder = tmp_path_factory.mktemp(f"vae_{variant}")
    reference.save_pretrained(folder / "diffusers", safe_serialization=True)

    ldm = to_ldm(reference.state_dict())
    full = {LDM_PREFIX + k: v for k, v in ldm.items()}
    full["model.diffusion_model.x"] = torch.zeros(2)  # another model in the same file
    save_state(full, folder / "ldm.safetensors")
    return variant, reference, folder, ldm, full


def inputs(reference, seed=0):
    generator = torch.Generator().manual_seed(seed)
    factor = 2 ** (len(reference.config.block_out_channels) - 1)
    images = torch.rand(2, 3, 10 * factor, 6 * factor, generator=generator) * 2 - 1  # non-square
    latents = torch.randn(2, reference.config.latent_channels, 10, 6, generator=generator)
    return images, latents


def check_against_diffusers(ours: AutoencoderKL, reference, encode: bool = True):
    images, latents = inputs(reference)
    with torch.no_grad():
        assert rel_err(ours.decode(latents), reference.decode(latents).sample) < TOL
        if encode:
            posterior = reference.encode(images).latent_dist
            mean, logvar = ours.encode(images)
            assert rel_err(mean, posterior.mean) < TOL
            assert rel_err(logvar, posterior.logvar) < TOL


def test_ldm_file_is_what_diffusers_converts(case):
    """The LDM file goes through diffusers' own LDM -> diffusers converter back to the
    reference's state dict, tensor for tensor."""
    _, reference, _, _, full = case
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(full, dict(reference.config))
    expected = reference.state_dict()
    assert sorted(converted) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


def test_renamings_written_out():
    """A few diffusers keys and the LDM names they become, spelled out: diffusers counts the
    decoder's levels from the lowest resolution, LDM from the highest; older diffusers files
    name the attention query / key / value / proj_attn; diffusers' attention uses Linears."""
    keys = ["decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
            "decoder.up_blocks.2.upsamplers.0.conv.bias", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.mid_block.attentions.0.query.weight", "decoder.mid_block.attentions.0.to_out.0.weight",
            "decoder.mid_block.attentions.0.group_norm.bias", "decoder.conv_norm_out.weight"]
    assert vae_layout(keys).mapping == {
        "decoder.conv_in.weight": Key("decoder.conv_in.weight"),
        "decoder.up.2.block.0.conv1.weight": Key("decoder.up_blocks.0.resnets.0.conv1.weight"),
        "decoder.up.0.upsample.conv.bias": Key("decoder.up_blocks.2.upsamplers.0.conv.bias"),
        "encoder.down.1.block.0.nin_shortcut.weight": Key("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
        "encoder.mid.attn_1.q.weight": AsConv1x1("encoder.mid_block.attentions.0.query.weight"),
        "decoder.mid.attn_1.proj_out.weight": AsConv1x1("decoder.mid_block.attentions.0.to_out.0.weight"),
        "decoder.mid.attn_1.norm.bias": Key("decoder.mid_block.attentions.0.group_norm.bias"),
        "decoder.norm_out.weight": Key("decoder.conv_norm_out.weight"),
    }


def test_files_are_described(case):
    _, _, folder, _, full = case
    assert describe(full) == "a VAE (LDM layout) under 'first_stage_model.'"
    assert describe(Checkpoint(folder / "diffusers").keys()) == "a VAE (diffusers layout)"


def test_diffusers_folder(case):
    variant, reference, folder, _, _ = case
    ours = load_vae(folder / "diffusers")
    config = VARIANTS[variant]
    assert ours.params == VAEParams(
        latent_channels=config["latent_channels"], base_channels=32,
        channel_multipliers=tuple(c // 32 for c in config["block_out_channels"]),
        use_quant_conv=config["use_quant_conv"])
    check_against_diffusers(ours, reference)


def test_ldm_single_file(case):
    _, reference, folder, _, _ = case
    ours = load_vae(folder / "ldm.safetensors", prefix=LDM_PREFIX)
    assert ours.params.has_encoder
    check_against_diffusers(ours, reference)
    # The parameters carry exactly the LDM names.
    assert sorted(ours.state_dict()) == sorted(case[3])


def test_open_checkpoint_and_found_prefix(case):
    """An already-open Checkpoint is accepted, and a single VAE in a file is found without a prefix."""
    _, reference, folder, _, _ = case
    ours = load_vae(Checkpoint(folder / "ldm.safetensors"))
    check_against_diffusers(ours, reference, encode=False)


def test_decoder_only_file(case, tmp_path):
    _, reference, _, ldm, _ = case
    decoder_only = {k: v for k, v in ldm.items() if not k.startswith(("encoder.", "quant_conv."))}
    ours = load_vae(save_state(decoder_only, tmp_path / "decoder.safetensors"))
    assert not ours.params.has_encoder
    assert ours.params.use_quant_conv == reference.config.use_post_quant_conv
    check_against_diffusers(ours, reference, encode=False)
    with pytest.raises(RuntimeError, match="decoder-only"):
        ours.encode(torch.zeros(1, 3, 16, 16))


def test_low_precision_load(case):
    _, reference, folder, _, _ = case
    ours = load_vae(folder / "ldm.safetensors", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    _, latents = inputs(reference)
    with torch.no_grad():
        assert rel_err(ours.decode(latents).float(), reference.decode(latents).sample) < 5e-2


def test_released_shapes_round_trip():
    """FLUX's ae (244 tensors, 83.8M parameters) and the SD VAE: params -> shapes -> the same params."""
    for params, tensors, count in [(VAEParams(), 244, 83_819_683),
                                   (VAEParams(latent_channels=4, use_quant_conv=True), 248, 83_653_863)]:
        state = build_on_meta(lambda: AutoencoderKL(params)).state_dict()
        assert (len(state), sum(t.numel() for t in state.values())) == (tensors, count)
        assert VAEParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}) == params


def test_other_model_is_refused(tmp_path):
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}
    path = save_state(flux, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="FLUX.1 transformer"):
        load_vae(path)


def test_missing_key_is_named(case, tmp_path):
    _, _, _, _, full = case
    dropped = LDM_PREFIX + "decoder.up.1.block.2.conv2.bias"
    broken = {k: v for k, v in full.items() if k != dropped}
    path = save_state(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("decoder.up.1.block.2.conv2.bias")):
        load_vae(path, prefix=LDM_PREFIX)
    # A tensor whose shape says the architecture is named too, before anything is built.
    shaping = LDM_PREFIX + "decoder.up.0.block.0.conv1.weight"
    path = save_state({k: v for k, v in full.items() if k != shaping}, tmp_path / "broken2.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("decoder.up.0.block.0.conv1.weight")):
        load_vae(path, prefix=LDM_PREFIX)


def test_groups_from_config(tmp_path):
    """What shapes cannot say (GroupNorm groups) comes from the diffusers config.json."""
    reference = randomize_(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8), seed=5).eval()
    reference.save_pretrained(tmp_path)
    ours = load_vae(tmp_path)
    assert ours.params.groups == 8
    check_against_diffusers(ours, reference)


def test_tiny_random_vae():
    vae = tiny_random_vae(latent_channels=16, seed=3)
    again = tiny_random_vae(latent_channels=16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        images = vae.decode(torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0)))
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
        mean, logvar = vae.encode(images)
        assert mean.shape == logvar.shape == (1, 16, 32, 32)
    assert tiny_random_vae().params.use_quant_conv
