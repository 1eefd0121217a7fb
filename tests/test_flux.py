"""FLUX against diffusers' FluxTransformer2DModel, called the way diffusers' FluxPipeline calls it.

Small random models (width 32, 2 heads of 16 split (4, 6, 6) over the RoPE axes, 2 double and
2 single blocks, T5 width 48, pooled width 32), one guidance-distilled like [dev] and one without
guidance like [schnell], are written in both key layouts and loaded with `load_flux`; outputs
must match diffusers' within 1e-5 relative in fp32, on square and non-square latents, for a
batch of 2 with different timesteps (and guidance values).

The original-layout file is written through our own renaming (`to_original`, which is
`flux_layout`). Our names, and that renaming, are checked against diffusers' own
single-file converter (BFL -> diffusers) at the released width (the converter hard-codes 3072),
on tensors that keep every row but only one column, and on a few keys written out here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from accelaes import SkipSparse
from models.checkpoint import Checkpoint, CheckpointError, build_on_meta
from models.flux import DoubleStreamBlock, Flux, SingleStreamBlock, image_ids, load_flux, pack, text_ids, unpack
from models.flux_params import FluxParams, flux_layout
from models.keys import Concat, SwappedHalves, describe
from tests.common import ProbeRecorder, randomize_, read_through, rel_err, save_state

TOL = 1e-5
AXES = (4, 6, 6)
SMALL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=AXES)
TEXT = 7
VARIANTS = {"dev": True, "schnell": False}   # guidance_embeds

# ---------------------------------------------------------------------------------------------
# Fixtures: one random diffusers model per variant, written in both layouts
# ---------------------------------------------------------------------------------------------

def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX state dict in BFL's layout, read through `flux_layout` (checked against
    diffusers' converter in test_renamings_agree_with_diffusers_converter)."""
    return read_through(flux_layout(state), state)


@pytest.fixture(scope="module")
def references() -> dict[str, FluxTransformer2DModel]:
    return {name: randomize_(FluxTransformer2DModel(**SMALL, guidance_embeds=guided), seed=i).eval()
            for i, (name, guided) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def files(references, tmp_path_factory) -> dict[tuple[str, str], object]:
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for name, reference in references.items():
        reference.save_pretrained(root / name / "transformer")   # diffusion_pytorch_model.safetensors + config.json
        out[name, "diffusers"] = root / name / "transformer"
        out[name, "original"] = save_state(to_original(reference.state_dict()),
                                           root / name / f"flux1-{name}.safetensors")
    return out


@pytest.fixture(scope="module")
def models(files) -> dict[tuple[str, str], Flux]:
    # An original file carries no config: the head's RoPE split must be given.
    return {(name, layout): load_flux(path, axes_dim=AXES) if layout == "original" else load_flux(path)
            for (name, layout), path in files.items()}


def inputs(height: int, width: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of 2 latents [2, 16, height, width], packed, with different timesteps and guidance."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, height, width, generator=g)
    return dict(latents=latents, txt=torch.randn(2, TEXT, SMALL["joint_attention_dim"], generator=g),
                y=torch.randn(2, SMALL["pooled_projection_dim"], generator=g),
                t=torch.tensor([0.83, 0.27]), guidance=torch.tensor([3.5, 1.5]))


def diffusers_call(reference, x: dict, guidance: torch.Tensor | None) -> torch.Tensor:
    """One transformer call as FluxPipeline.__call__ makes it: packed latents, 2-D ids, the
    scheduler's timestep / 1000 (so t in [0, 1]), the raw guidance scale."""
    height, width = x["latents"].shape[2:]
    img_ids = FluxPipeline._prepare_latent_image_ids(2, height // 2, width // 2, "cpu", torch.float32)
    packed = FluxPipeline._pack_latents(x["latents"], 2, 16, height, width)
    with torch.no_grad():
        return reference(hidden_states=packed, timestep=x["t"], guidance=guidance, pooled_projections=x["y"],
                         encoder_hidden_states=x["txt"], txt_ids=torch.zeros(TEXT, 3), img_ids=img_ids,
                         return_dict=False)[0]


def our_call(model: Flux, x: dict, guidance: torch.Tensor | None, **kwargs) -> torch.Tensor:
    height, width = x["latents"].shape[2:]
    with torch.no_grad():
        return model(pack(x["latents"]), image_ids(height // 2, width // 2), x["txt"], text_ids(TEXT), x["t"],
                     x["y"], guidance, **kwargs)


# ---------------------------------------------------------------------------------------------
# Numbers against diffusers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_matches_diffusers(references, models, variant, layout, size):
    model = models[variant, layout]
    assert model.params.guidance_embed == VARIANTS[variant] and model.params.axes_dim == AXES
    x = inputs(*size)
    guidance = x["guidance"] if VARIANTS[variant] else None
    ref = diffusers_call(references[variant], x, guidance)
    ours = our_call(model, x, guidance)
    assert ours.shape == (2, size[0] * size[1] // 4, 64)
    assert rel_err(ours, ref) < TOL


def test_the_cases_differ(references):
    """Guard against a vacuous comparison: timestep, guidance and positions each change diffusers' output."""
    reference = references["dev"]
    x = inputs(12, 20)
    out = diffusers_call(reference, x, x["guidance"])
    assert rel_err(diffusers_call(reference, x, x["guidance"].flip(0)), out) > 1e-3
    assert rel_err(diffusers_call(reference, {**x, "t": x["t"].flip(0)}, x["guidance"]), out) > 1e-3
    # The same tokens at transposed positions: RoPE matters.
    swapped = {**x, "latents": x["latents"].transpose(2, 3)}
    transposed = diffusers_call(reference, swapped, x["guidance"])
    back = unpack(transposed, 20, 12).transpose(2, 3)
    assert rel_err(pack(back), out) > 1e-3


def test_inside_the_pipeline(references, models):
    """Run FluxPipeline itself and replay each transformer call it makes with our model.

    Checks the conventions a sampler relies on: timestep = the scheduler's sigma (the pipeline
    divides by 1000, the model multiplies back), guidance the raw scale, img_ids our
    `image_ids`, txt_ids zeros, and our output equal to what the pipeline received.
    """
    reference, model = references["dev"], models["dev", "diffusers"]
    calls = []
    hook = reference.register_forward_hook(lambda module, args, kwargs, out: calls.append((kwargs, out[0])),
                                           with_kwargs=True)
    try:
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=reference)
        x = inputs(12, 20)
        with torch.no_grad():
            pipe(prompt_embeds=x["txt"][:1], pooled_prompt_embeds=x["y"][:1], height=96, width=160,
                 num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 3
    for (kwargs, out), sigma in zip(calls, pipe.scheduler.sigmas):
        assert torch.allclose(kwargs["timestep"], sigma[None])
        assert torch.equal(kwargs["guidance"], torch.tensor([3.5]))
        assert torch.equal(kwargs["img_ids"], image_ids(6, 10)) and torch.equal(kwargs["txt_ids"], text_ids(TEXT))
        with torch.no_grad():
            ours = model(kwargs["hidden_states"], kwargs["img_ids"], kwargs["encoder_hidden_states"],
                         kwargs["txt_ids"], kwargs["timestep"], kwargs["pooled_projections"], kwargs["guidance"])
        assert rel_err(ours, out) < TOL
    assert float(calls[0][0]["timestep"]) == 1.0          # starts at pure noise


def test_packing_matches_the_pipeline():
    latents = torch.randn(2, 16, 12, 20)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 12, 20))
    assert torch.equal(unpack(packed, 12, 20), latents)
    # The pipeline unpacks from the image size in pixels (vae_scale_factor 8).
    assert torch.equal(unpack(packed, 12, 20), FluxPipeline._unpack_latents(packed, 96, 160, 8))
    for h, w in ((8, 8), (6, 10), (1, 3)):
        assert torch.equal(image_ids(h, w), FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32))


# ---------------------------------------------------------------------------------------------
# Layouts and sizes
# ---------------------------------------------------------------------------------------------

def _narrow(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with every row of `state`'s shapes but one column: what renaming, splitting,
    concatenating and swapping halves along dim 0 see, at a fraction of the memory."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape[0], *([1] if v.dim() == 2 else []), generator=g) for k, v in state.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_renamings_agree_with_diffusers_converter(variant):
    """At the released width, diffusers' converter (BFL -> diffusers) takes our names to exactly
    diffusers' keys, and `flux_layout` (diffusers -> BFL) reads its output back, tensor for tensor."""
    params = FluxParams(guidance_embed=VARIANTS[variant])
    original = _narrow(build_on_meta(lambda: Flux(params)).state_dict())
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=VARIANTS[variant])
    assert {k: v.shape[0] for k, v in converted.items()} == {k: v.shape[0] for k, v in reference.state_dict().items()}

    layout = flux_layout(converted.keys())
    read = {name: source.read(converted.__getitem__) for name, source in layout.mapping.items()}
    assert set(read) == set(original) and all(torch.equal(read[k], original[k]) for k in original)


def test_fused_keys_written_out():
    """The keys diffusers keeps apart and BFL fuses, spelled out: a double block's q, k, v per
    stream (qkv), a single block's q, k, v and MLP input (linear1); and norm_out's halves swapped."""
    double = [f"transformer_blocks.0.attn.{name}.weight" for name in ("to_q", "to_k", "to_v", "add_q_proj",
                                                                      "add_k_proj", "add_v_proj")]
    single = [f"single_transformer_blocks.0.{name}.weight" for name in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                       "proj_mlp")]
    mapping = flux_layout([*double, *single, "norm_out.linear.bias"]).mapping
    assert mapping == {"double_blocks.0.img_attn.qkv.weight": Concat(tuple(double[:3])),
                       "double_blocks.0.txt_attn.qkv.weight": Concat(tuple(double[3:])),
                       "single_blocks.0.linear1.weight": Concat(tuple(single)),
                       "final_layer.adaLN_modulation.1.bias": SwappedHalves("norm_out.linear.bias")}


def test_release_sizes():
    """FLUX.1 [dev] and [schnell] (on the meta device): key counts, parameter counts, inferred sizes."""
    for guided, keys in ((True, 780), (False, 776)):
        ours = build_on_meta(lambda: Flux(FluxParams(guidance_embed=guided)))
        state = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert len(state) == keys
        with torch.device("meta"):
            reference = FluxTransformer2DModel(guidance_embeds=guided)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
        ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        layout = flux_layout(ref_shapes)
        assert layout.shapes(ref_shapes.__getitem__) == state
        assert describe(ref_shapes) == "a FLUX.1 transformer (diffusers layout)"
        assert describe(state) == "a FLUX.1 transformer (original layout)"
        assert FluxParams.from_shapes(state) == FluxParams(guidance_embed=guided)   # no config: head 128, (16, 56, 56)
        assert FluxParams.from_shapes(state, dict(reference.config)) == FluxParams(guidance_embed=guided)
    assert sum(p.numel() for p in build_on_meta(lambda: Flux(FluxParams())).parameters()) == 11_901_408_320


def test_our_names_are_the_original_ones(files, models):
    for variant in VARIANTS:
        assert set(models[variant, "original"].state_dict()) == set(Checkpoint(files[variant, "original"]).keys())


def test_prefixed_original_file(references, tmp_path):
    """BFL files have no prefix; files saved from ComfyUI-like tools put the model under `model.diffusion_model.`."""
    state = {"model.diffusion_model." + k: v for k, v in to_original(references["schnell"].state_dict()).items()}
    model = load_flux(save_state(state, tmp_path / "prefixed.safetensors"), axes_dim=AXES)
    x = inputs(12, 20)
    assert rel_err(our_call(model, x, None), diffusers_call(references["schnell"], x, None)) < TOL


def test_wrong_checkpoint(tmp_path, files):
    clip = save_state({"text_model.final_layer_norm.weight": torch.ones(8)}, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(CheckpointError, match="CLIP"):
        load_flux(clip)
    # A small head in a file without config: the RoPE split cannot be guessed.
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_flux(files["dev", "original"])
    # A config.json that contradicts the weights.
    folder = tmp_path / "bad"
    folder.mkdir()
    source = files["dev", "diffusers"]
    weights = "diffusion_pytorch_model.safetensors"
    (folder / weights).write_bytes((source / weights).read_bytes())
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_flux(folder)


def test_bf16_load(references, files):
    """Weights cast to bf16 on load: the forward runs in bf16 (RoPE and QK norms in fp32) like
    diffusers' model in bf16. (This random model is far from fp32 in bf16, for both.)"""
    model = load_flux(files["dev", "diffusers"], dtype=torch.bfloat16)
    reference = copy.deepcopy(references["dev"]).to(torch.bfloat16)
    x = inputs(12, 20)
    out = our_call(model, x, x["guidance"])
    assert out.dtype == torch.bfloat16
    x16 = {k: v.to(torch.bfloat16) for k, v in x.items()}
    assert rel_err(out, diffusers_call(reference, x16, x16["guidance"])) < 0.05


# ---------------------------------------------------------------------------------------------
# The AccelAes hooks: increments of a subset of rows, the block runner, the probe
# ---------------------------------------------------------------------------------------------

def _block_inputs(model: Flux, x: dict):
    height, width = x["latents"].shape[2:]
    step = model.step_inputs(x["t"], x["y"], x["guidance"], text_ids(TEXT), image_ids(height // 2, width // 2))
    tokens = torch.cat([model.txt_in(x["txt"]), model.img_in(pack(x["latents"]))], dim=1)
    return tokens, step


def _focus(image_tokens: int) -> torch.Tensor:
    """All text rows, then a different strict subset of image rows per sample (ascending)."""
    picks = [torch.tensor([0, 3, 4, 17, 31, image_tokens - 1]), torch.tensor([1, 2, 8, 40, 41, 50])]
    return torch.stack([torch.cat([torch.arange(TEXT), TEXT + p]) for p in picks])


@pytest.mark.parametrize("kind", [DoubleStreamBlock, SingleStreamBlock])
def test_increment_of_focus_rows(models, kind):
    model = models["dev", "diffusers"]
    x = inputs(12, 20)
    tokens, step = _block_inputs(model, x)
    block = next(b for b in model.blocks() if isinstance(b, kind))
    everything = torch.arange(tokens.shape[1]).expand(2, -1)
    focus = _focus(tokens.shape[1] - TEXT)
    with torch.no_grad():
        dense = block.increment(tokens, step)
        assert torch.equal(block(tokens, step), tokens + dense)
        assert rel_err(block.increment(tokens, step, focus=everything), dense) < TOL
        sub = block.increment(tokens, step, focus=focus)
    rows = focus[:, :, None].expand(-1, -1, tokens.shape[2])
    assert sub.shape == (2, focus.shape[1], tokens.shape[2])
    assert rel_err(sub, dense.gather(1, rows)) < TOL


def test_block_runner_and_skip_sparse(models):
    """The runner sees every block in order (double, then single); AccelAes' SkipSparse with the
    increments kept at the same inputs reproduces the dense output from focus rows alone."""
    model = models["dev", "diffusers"]
    x = inputs(12, 20)
    dense = our_call(model, x, x["guidance"])
    seen = []

    def runner(index, block, tokens, step):
        seen.append((index, type(block).__name__))
        return block(tokens, step)

    assert torch.equal(our_call(model, x, x["guidance"], block_runner=runner), dense)
    assert seen == [(0, "DoubleStreamBlock"), (1, "DoubleStreamBlock"), (2, "SingleStreamBlock"),
                    (3, "SingleStreamBlock")]

    sparse = SkipSparse(TEXT, 60)
    assert torch.equal(our_call(model, x, x["guidance"], block_runner=sparse), dense)   # dense: keeps increments
    focus = _focus(60)[:, TEXT:] - TEXT                  # image rows only: SkipSparse adds the text rows
    background = torch.stack([torch.tensor([i for i in range(60) if i not in set(row.tolist())]) for row in focus])
    sparse.set_focus(focus, background)
    sparse.dense = False
    assert rel_err(our_call(model, x, x["guidance"], block_runner=sparse), dense) < TOL


def test_probe_sees_image_queries_against_text_keys(models):
    """Every double block (and no single block) shows the probe image queries [B, H, N, D] and
    the text keys [B, H, L, D], after QK norm and RoPE."""
    model = models["dev", "diffusers"]
    x = inputs(12, 20)
    probe = ProbeRecorder()
    out = our_call(model, x, x["guidance"], probe=probe)
    assert torch.equal(out, our_call(model, x, x["guidance"]))
    assert len(probe.calls) == model.params.depth
    for q, k, key_mask, scale, bias in probe.calls:
        assert q.shape == (2, 2, 60, 16) and k.shape == (2, 2, TEXT, 16)
        assert key_mask is None and bias is None and scale == pytest.approx(16 ** -0.5)
    # Text ids are zero, so RoPE leaves the text keys as QKNorm made them.
    first = model.double_blocks[0]
    tokens, step = _block_inputs(model, x)
    with torch.no_grad():
        txt_h = first.txt_mod(step.vec)[0].modulate_(first.txt_norm1(tokens[:, :TEXT]))
        k, _ = first.txt_attn.keys_values(txt_h)
    assert rel_err(probe.calls[0][1], k) < TOL
