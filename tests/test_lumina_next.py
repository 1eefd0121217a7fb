"""NextDiT against diffusers' LuminaNextDiT2DModel, called the way diffusers' LuminaPipeline calls it.

A small random model (width 128, 4 heads of 32, 2 key/value heads, 2 layers, caption width 64)
is written in both key layouts and loaded with `load_nextdit`; its outputs must match diffusers'
within 1e-5 relative in fp32, on square and non-square latents, with and without proportional
attention, with the linear and the NTK RoPE scaling, and with a padded caption.
"""

from __future__ import annotations

import re

from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from models.checkpoint import Checkpoint, CheckpointError, build_on_meta
from models.keys import describe
from models.lumina_next import NextDiT, NextDiTParams, load_nextdit, nextdit_layout, time_aware_rope_factors
from tests.common import randomize_, rel_err, save_state

TOL = 1e-5
SAMPLE_SIZE = 32          # latents: the pipeline's training size is 32*8 = 256 px, base (256/16)^2 = 256 tokens
WATERSHED = 0.3           # the official sampler's; t = 0.2 runs linear RoPE scaling, t = 0.7 NTK
SMALL = dict(sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, hidden_size=128, num_layers=2,
             num_attention_heads=4, num_kv_heads=2, multiple_of=64, norm_eps=1e-5, learn_sigma=True,
             qk_norm=True, cross_attention_dim=64)

# The original Lumina-T2X names (lumina_next_t2i/models/model.py) of each diffusers key, written out
# here independently of nextdit_layout so that the test checks the layout rather than repeating it.
_ORIGINAL_BLOCK = {
    "attn1.to_q.weight": "attention.wq.weight",
    "attn1.to_k.weight": "attention.wk.weight",
    "attn1.to_v.weight": "attention.wv.weight",
    "attn2.to_k.weight": "attention.wk_y.weight",
    "attn2.to_v.weight": "attention.wv_y.weight",
    "attn2.to_out.0.weight": "attention.wo.weight",
    "attn1.norm_q.weight": "attention.q_norm.weight", "attn1.norm_q.bias": "attention.q_norm.bias",
    "attn1.norm_k.weight": "attention.k_norm.weight", "attn1.norm_k.bias": "attention.k_norm.bias",
    "attn2.norm_k.weight": "attention.ky_norm.weight", "attn2.norm_k.bias": "attention.ky_norm.bias",
    "gate": "attention.gate",
    "norm1.norm.weight": "attention_norm1.weight",
    "norm1.linear.weight": "adaLN_modulation.1.weight", "norm1.linear.bias": "adaLN_modulation.1.bias",
    "norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight", "ffn_norm2.weight": "ffn_norm2.weight",
    "norm1_context.weight": "attention_y_norm.weight",
    "feed_forward.linear_1.weight": "feed_forward.w1.weight",
    "feed_forward.linear_2.weight": "feed_forward.w2.weight",
    "feed_forward.linear_3.weight": "feed_forward.w3.weight",
}
_ORIGINAL_GLOBAL = {
    "pad_token": "pad_token",
    "patch_embedder.proj.weight": "x_embedder.weight", "patch_embedder.proj.bias": "x_embedder.bias",
    "time_caption_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_caption_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_caption_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_caption_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_caption_embed.caption_embedder.0.weight": "cap_embedder.0.weight",
    "time_caption_embed.caption_embedder.0.bias": "cap_embedder.0.bias",
    "time_caption_embed.caption_embedder.1.weight": "cap_embedder.1.weight",
    "time_caption_embed.caption_embedder.1.bias": "cap_embedder.1.bias",
    "norm_out.linear_1.weight": "final_layer.adaLN_modulation.1.weight",
    "norm_out.linear_1.bias": "final_layer.adaLN_modulation.1.bias",
    "norm_out.linear_2.weight": "final_layer.linear.weight",
    "norm_out.linear_2.bias": "final_layer.linear.bias",
}


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers NextDiT state dict in the original layout (one shared wq / q_norm per layer)."""
    out = {}
    for key, value in state.items():
        block = re.match(r"layers\.(\d+)\.(.+)$", key)
        if block is None:
            out[_ORIGINAL_GLOBAL[key]] = value
        elif block.group(2).startswith(("attn2.to_q.", "attn2.norm_q.")):
            twin = key.replace("attn2.", "attn1.")
            assert torch.equal(value, state[twin]), f"{key} differs from {twin}: not a faithful NextDiT"
        else:
            out[f"layers.{block.group(1)}.{_ORIGINAL_BLOCK[block.group(2)]}"] = value
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures: one random diffusers model, written in both layouts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference() -> LuminaNextDiT2DModel:
    model = randomize_(LuminaNextDiT2DModel(**SMALL), seed=0).eval()
    with torch.no_grad():  # a converted release holds one wq and q_norm, shared by both attentions
        for layer in model.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            layer.attn2.norm_q.weight.copy_(layer.attn1.norm_q.weight)
            layer.attn2.norm_q.bias.copy_(layer.attn1.norm_q.bias)
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("nextdit")
    reference.save_pretrained(root / "transformer")   # diffusion_pytorch_model.safetensors + config.json
    original = to_original(reference.state_dict())
    save_state(original, root / "consolidated_ema.00-of-01.safetensors")  # no config: as released
    torch.save({k: v.clone() for k, v in original.items()}, root / "consolidated.00-of-01.pth")
    return {"diffusers": root / "transformer", "original": root / "consolidated_ema.00-of-01.safetensors",
            "pth": root / "consolidated.00-of-01.pth", "root": root}


@pytest.fixture(scope="module")
def models(files) -> dict[str, NextDiT]:
    return {"diffusers": load_nextdit(files["diffusers"]), "original": load_nextdit(files["original"])}


def inputs(height: int, width: int, seed: int = 1):
    """Batch of 2 latents, a caption of 7 tokens whose second row has 3 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, height, width, generator=g)
    feats = torch.randn(2, 7, SMALL["cross_attention_dim"], generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return x, feats, mask


def diffusers_call(model, x, t, feats, mask, *, proportional_attn, base_sequence_length):
    """One model call exactly as LuminaPipeline.__call__ makes it (pipeline_lumina.py, denoising loop)."""
    height_px, width_px = x.shape[2] * 8, x.shape[3] * 8
    default_image_size = model.config.sample_size * 8
    scaling_factor = (width_px * height_px / default_image_size ** 2) ** 0.5
    timestep = torch.full((x.shape[0],), t)
    if timestep[0] < WATERSHED:
        linear_factor, ntk_factor = scaling_factor, 1.0
    else:
        linear_factor, ntk_factor = 1.0, scaling_factor
    rope = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=linear_factor, ntk_factor=ntk_factor)
    kwargs = {"base_sequence_length": base_sequence_length} if proportional_attn else {}
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=feats, encoder_mask=mask,
                     image_rotary_emb=rope, cross_attention_kwargs=kwargs, return_dict=False)[0]


def our_call(model: NextDiT, x, t, feats, mask, *, proportional_attn):
    linear, ntk = time_aware_rope_factors(t, x.shape[2] * 8, x.shape[3] * 8, WATERSHED,
                                          base_image_size=SAMPLE_SIZE * 8)
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t), feats, mask, rope_linear_factor=linear,
                     rope_ntk_factor=ntk, proportional_attn=proportional_attn)


# ---------------------------------------------------------------------------------------------
# Numbers against diffusers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
@pytest.mark.parametrize("proportional_attn", [True, False])
@pytest.mark.parametrize("t", [0.2, 0.7])
def test_matches_diffusers(reference, models, layout, size, proportional_attn, t):
    model = models[layout]
    # diffusers' folder carries sample_size, hence the pipeline's base (32*8/16)^2 = 256; an
    # original file has no config and gets the release's (1024/16)^2 = 4096.
    base = (SAMPLE_SIZE * 8 // 16) ** 2 if layout == "diffusers" else 4096
    assert model.params.base_tokens == base
    x, feats, mask = inputs(*size)
    ref = diffusers_call(reference, x, t, feats, mask, proportional_attn=proportional_attn, base_sequence_length=base)
    ours = our_call(model, x, t, feats, mask, proportional_attn=proportional_attn)
    assert ours.shape == (2, 8, *size)
    assert rel_err(ours, ref) < TOL


def test_the_cases_differ(reference):
    """Guard against a vacuous comparison: each option changes diffusers' output."""
    x, feats, mask = inputs(16, 24)
    base = dict(proportional_attn=True, base_sequence_length=256)
    out = diffusers_call(reference, x, 0.2, feats, mask, **base)
    assert rel_err(diffusers_call(reference, x, 0.7, feats, mask, **base), out) > 1e-3  # t and RoPE mode
    assert rel_err(diffusers_call(reference, x, 0.2, feats, mask, proportional_attn=False,
                                  base_sequence_length=None), out) > 1e-3
    padded = mask.clone()
    padded[0, -2:] = 0
    assert rel_err(diffusers_call(reference, x, 0.2, feats, padded, **base), out) > 1e-3


def test_legacy_pth(reference, files):
    model = load_nextdit(files["pth"])
    x, feats, mask = inputs(16, 24)
    ref = diffusers_call(reference, x, 0.7, feats, mask, proportional_attn=True, base_sequence_length=4096)
    assert rel_err(our_call(model, x, 0.7, feats, mask, proportional_attn=True), ref) < TOL


def test_inside_the_pipeline(reference, models):
    """Run LuminaPipeline itself and replay each transformer call it makes with our model.

    Checks the conventions the sampler relies on: t = 1 - timestep/1000 (0 = noise), RoPE
    factors per call from time_aware_rope_factors, base_sequence_length = our base_tokens,
    and our output equal to what the pipeline received.
    """
    calls = []
    hook = reference.register_forward_hook(lambda module, args, kwargs, out: calls.append((kwargs, out[0])),
                                           with_kwargs=True)
    try:
        pipe = LuminaPipeline(transformer=reference, scheduler=FlowMatchEulerDiscreteScheduler(),
                              vae=None, text_encoder=None, tokenizer=None)
        _, feats, mask = inputs(16, 24)
        with torch.no_grad():
            pipe(prompt_embeds=feats[:1], prompt_attention_mask=mask[:1], negative_prompt_embeds=feats[1:],
                 negative_prompt_attention_mask=mask[1:], height=128, width=192, num_inference_steps=4,
                 guidance_scale=4.0, scaling_watershed=WATERSHED, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    model = models["diffusers"]
    assert len(calls) == 4
    sched = pipe.scheduler.timesteps
    ts = []
    for (kwargs, out), step_t in zip(calls, sched):
        t = kwargs["timestep"]
        assert torch.allclose(t, 1 - step_t / 1000)
        ts.append(float(t[0]))
        linear, ntk = time_aware_rope_factors(float(t[0]), 128, 192, WATERSHED, base_image_size=256)
        expected = get_2d_rotary_pos_embed_lumina(model.params.head_dim, 384, 384, linear_factor=linear, ntk_factor=ntk)
        assert torch.equal(kwargs["image_rotary_emb"], expected)
        assert kwargs["cross_attention_kwargs"] == {"base_sequence_length": model.params.base_tokens}
        with torch.no_grad():
            ours = model(kwargs["hidden_states"], t, kwargs["encoder_hidden_states"], kwargs["encoder_mask"],
                         rope_linear_factor=linear, rope_ntk_factor=ntk, proportional_attn=True)
        assert rel_err(ours, out) < TOL
    assert ts[0] == 0.0 and ts == sorted(ts)              # starts at pure noise, moves towards data
    assert min(ts) < WATERSHED <= max(ts)                 # both RoPE modes were replayed


# ---------------------------------------------------------------------------------------------
# Conventions and sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, height, width, watershed, base", [
    (0.1, 1024, 1024, 0.3, 1024), (0.5, 1024, 1024, 0.3, 1024), (0.2, 2048, 1024, 0.3, 1024),
    (0.3, 2048, 2048, 0.3, 1024), (0.9, 512, 768, 1.0, 1024), (0.99, 1536, 1024, 1.0, 1024), (0.5, 128, 192, 0.3, 256)])
def test_time_aware_rope_factors(t, height, width, watershed, base):
    # LuminaPipeline.__call__: scaling_factor = sqrt(width * height / default_image_size**2), then
    # linear when current_timestep[0] < scaling_watershed, else NTK.
    scale = (width * height / base ** 2) ** 0.5
    expected = (scale, 1.0) if torch.tensor([t])[0] < watershed else (1.0, scale)
    assert time_aware_rope_factors(t, height, width, watershed, base_image_size=base) == pytest.approx(expected, abs=0)


def test_release_sizes():
    """The 2B release in both layouts (on the meta device): key counts and inferred sizes."""
    ours = build_on_meta(lambda: NextDiT(NextDiTParams()))
    state = ours.state_dict()
    assert len(state) == 567
    assert sum(p.numel() for p in ours.parameters()) == 1_627_386_400

    with torch.device("meta"):
        ref = LuminaNextDiT2DModel(sample_size=128, hidden_size=2304, num_layers=24, num_attention_heads=32,
                                   num_kv_heads=8, cross_attention_dim=2048)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ref_shapes) == 639
    layout = nextdit_layout(ref_shapes)
    shapes = {name: ref_shapes[source.key] for name, source in layout.mapping.items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert NextDiTParams.from_shapes(shapes, dict(ref.config)) == NextDiTParams()
    assert NextDiTParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}) == NextDiTParams()
    assert describe(ref_shapes) == "a Lumina-Next NextDiT (diffusers layout)"
    assert describe(state) == "a Lumina-Next NextDiT (original layout)"


def test_our_names_are_the_original_ones(files, models):
    assert set(models["original"].state_dict()) == set(Checkpoint(files["original"]).keys())


def test_wrong_checkpoint(tmp_path, files):
    clip = save_state({"text_model.final_layer_norm.weight": torch.ones(8)}, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(CheckpointError, match="CLIP"):
        load_nextdit(clip)
    # A config.json that contradicts the weights.
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (files["diffusers"] / "diffusion_pytorch_model.safetensors").read_bytes())
    config = (files["diffusers"] / "config.json").read_text().replace('"num_attention_heads": 4', '"num_attention_heads": 8')
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_nextdit(folder)


def test_bf16_load(files, models):
    """Weights cast to bf16 on load: the forward runs in bf16 (RoPE and norms in fp32) and stays near fp32."""
    model = load_nextdit(files["diffusers"], dtype=torch.bfloat16)
    x, feats, mask = inputs(16, 24)
    out = our_call(model, x, 0.7, feats, mask, proportional_attn=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, our_call(models["diffusers"], x, 0.7, feats, mask, proportional_attn=True)) < 0.1


def test_block_pieces_take_a_subset_of_queries(models):
    """The pieces a sparse path will call: queries for some tokens against keys/values of all
    tokens give exactly those rows of the dense block (the sparse path itself is not here)."""
    model = models["diffusers"]
    x, feats, mask = inputs(16, 24)
    block = model.layers[0]
    step = model.step_inputs(torch.tensor([0.4, 0.4]), feats, mask, (8, 12), rope_linear_factor=0.7)
    step = replace(step, text_kv=block.caption_keys_values(feats))
    tokens = model.x_embedder(model.patchify(x))
    focus = torch.tensor([0, 5, 17, 40, 95])
    with torch.no_grad():
        dense = block(tokens, step)
        sub = tokens[:, focus] + block.increment(tokens, step, focus=focus.expand(2, -1))
    assert rel_err(sub, dense[:, focus]) < TOL
