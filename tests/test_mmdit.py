"""MMDiT against diffusers' SD3Transformer2DModel, called the way diffusers' SD3 pipeline calls it.

Two small random models (width 64 = 2 heads of 32, 3 joint blocks, text width 48, pooled 40,
a 16x16 position table): an SD3-Medium-like one (no qk-norm, no attn2) and an SD3.5-like one
(RMS qk-norm, attn2 in blocks 0 and 1). Each is written in both key layouts (diffusers'
save_pretrained folder, and the original names under `model.diffusion_model.` beside unrelated
keys, as in sd3_medium.safetensors: written through `mmdit_layout`, which diffusers' own
single-file converter must undo exactly) and loaded with `load_mmdit`; its outputs must match
diffusers' within 1e-5 relative in fp32, on square and non-square latents, for a batch of two
timesteps. The AccelAes hooks (increment with a focus, block_runner, probe) are checked too.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.embeddings import get_timestep_embedding

from accelaes import SkipSparse
from models.attention import split_heads
from models.checkpoint import Checkpoint, CheckpointError, build_on_meta
from models.keys import describe
from models.layers import timestep_sinusoids
from models.mmdit import MMDiT, MMDiTParams, load_mmdit, mmdit_layout
from tests.common import ProbeRecorder, randomize_, read_through, rel_err, save_state

TOL = 1e-5
PREFIX = "model.diffusion_model."
SMALL = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=64, pooled_projection_dim=40,
             pos_embed_max_size=16)
VARIANTS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
TEXT_TOKENS = 7


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3 state dict in the original layout (our names), read through `mmdit_layout`;
    test_original_file_is_what_diffusers_converts checks it against diffusers' own converter."""
    return read_through(mmdit_layout(state), state)


# ---------------------------------------------------------------------------------------------
# Fixtures: one random diffusers model per variant, written in both layouts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references() -> dict[str, SD3Transformer2DModel]:
    out = {}
    for seed, (name, variant) in enumerate(VARIANTS.items()):
        model = randomize_(SD3Transformer2DModel(**SMALL, **variant), seed=seed).eval()
        with torch.no_grad():  # the sin-cos table is a buffer: make it random too, so a wrong crop shows
            model.pos_embed.pos_embed.normal_(0, 0.5, generator=torch.Generator().manual_seed(10 + seed))
        out[name] = model
    return out


@pytest.fixture(scope="module")
def files(references, tmp_path_factory) -> dict[str, dict[str, object]]:
    root = tmp_path_factory.mktemp("mmdit")
    out = {}
    for name, reference in references.items():
        reference.save_pretrained(root / name / "transformer")     # diffusion_pytorch_model.safetensors + config.json
        original = {PREFIX + k: v for k, v in to_original(reference.state_dict()).items()}
        # The single file also holds the VAE (and maybe text encoders), under other prefixes.
        original["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
        original["first_stage_model.decoder.conv_in.bias"] = torch.randn(8)
        original["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
        out[name] = {"diffusers": root / name / "transformer",
                     "original": save_state(original, root / name / "sd3_small.safetensors")}
    return out


@pytest.fixture(scope="module")
def models(files) -> dict[tuple[str, str], MMDiT]:
    out = {}
    for name, paths in files.items():
        out[name, "diffusers"] = load_mmdit(paths["diffusers"])
        # Without qk-norm weights or a config, nothing in the file says 2 heads of 32 (not 1 of 64).
        heads = 2 if VARIANTS[name]["qk_norm"] is None else None
        out[name, "original"] = load_mmdit(paths["original"], prefix=PREFIX, heads=heads)
    return out


def inputs(height: int, width: int, seed: int = 1):
    """A batch of 2 latents at two different timesteps (sigma * 1000, as the pipeline passes them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, height, width, generator=g)
    timestep = torch.tensor([937.5, 123.25])
    context = torch.randn(2, TEXT_TOKENS, SMALL["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, SMALL["pooled_projection_dim"], generator=g)
    return x, timestep, context, pooled


def diffusers_call(model, x, timestep, context, pooled):
    """One transformer call as StableDiffusion3Pipeline.__call__ makes it (timestep = t.expand(B))."""
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                     pooled_projections=pooled, return_dict=False)[0]


def dense_block_inputs(model: MMDiT, *args):
    """(tokens, step) that each block receives in a dense forward, from a recording block runner."""
    seen = []

    def runner(index, block, tokens, step):
        seen.append((tokens, step))
        return block(tokens, step)

    with torch.no_grad():
        model(*args, block_runner=runner)
    return seen


# ---------------------------------------------------------------------------------------------
# Numbers against diffusers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_matches_diffusers(references, models, variant, layout, size):
    model = models[variant, layout]
    assert model.params.heads == 2 and model.params.qk_norm == (VARIANTS[variant]["qk_norm"] is not None)
    assert model.params.dual_attention_layers == VARIANTS[variant]["dual_attention_layers"]
    args = inputs(*size)
    ref = diffusers_call(references[variant], *args)
    with torch.no_grad():
        ours = model(*args)
    assert ours.shape == (2, 16, *size)
    assert rel_err(ours, ref) < TOL


def test_the_cases_differ(references):
    """Guard against a vacuous comparison: the timestep, the text and the position crop all matter."""
    reference = references["sd35"]
    x, t, context, pooled = inputs(12, 20)
    out = diffusers_call(reference, x, t, context, pooled)
    assert rel_err(diffusers_call(reference, x, t.flip(0), context, pooled), out) > 1e-3
    # (Reordering the text tokens would change nothing: without RoPE the attention is order-free.)
    assert rel_err(diffusers_call(reference, x, t, context.flip(0), pooled), out) > 1e-3
    table = reference.pos_embed.pos_embed
    saved = table.clone()
    try:
        with torch.no_grad():
            table.copy_(table.view(1, 16, 16, -1).roll(1, dims=1).reshape(table.shape))
        assert rel_err(diffusers_call(reference, x, t, context, pooled), out) > 1e-3
    finally:
        with torch.no_grad():
            table.copy_(saved)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_file_is_what_diffusers_converts(references, files, variant):
    """The test's own original-layout file goes back through diffusers' single-file converter
    (which takes its sizes from the tensors, so it handles this small model) to the reference."""
    checkpoint = Checkpoint(files[variant]["original"])
    state = {k: checkpoint.read(k) for k in checkpoint.keys()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    expected = references[variant].state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_a_few_original_names_written_out(files):
    """Names of Stability AI's mmditx.py, as sd3_medium.safetensors holds them."""
    keys = set(Checkpoint(files["sd35"]["original"]).keys())
    for name in ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight",
                 "context_embedder.weight", "joint_blocks.0.x_block.attn.qkv.weight",
                 "joint_blocks.1.x_block.attn2.ln_q.weight", "joint_blocks.1.context_block.attn.proj.bias",
                 "joint_blocks.2.context_block.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert PREFIX + name in keys, name
    assert PREFIX + "joint_blocks.2.context_block.attn.proj.weight" not in keys  # the last text stream is pre_only


def test_heads_are_inferred(files):
    """Heads: from the qk-norm weights, else config.json, else the releases' heads of 64."""
    no_config = load_mmdit(files["sd3"]["original"], prefix=PREFIX)
    assert (no_config.params.heads, no_config.params.head_dim) == (1, 64)
    assert load_mmdit(files["sd3"]["diffusers"]).params.heads == 2
    assert load_mmdit(files["sd35"]["original"], prefix=PREFIX).params.heads == 2
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_mmdit(files["sd3"]["diffusers"], heads=4)


def test_timestep_embedding_is_diffusers():
    """SD3's Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0): [cos | sin], max period 1e4."""
    t = torch.tensor([0.0, 1.0, 123.25, 937.5, 1000.0])
    assert torch.equal(timestep_sinusoids(t), get_timestep_embedding(t, 256, flip_sin_to_cos=True,
                                                                     downscale_freq_shift=0))


@pytest.mark.parametrize("name, config, total", [
    ("SD3-Medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=192), 2.03e9),
    ("SD3.5-Medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                          qk_norm="rms_norm", dual_attention_layers=tuple(range(13))), 2.24e9),
    ("SD3.5-Large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, qk_norm="rms_norm"), 8.06e9),
])
def test_release_sizes(name, config, total):
    """The releases' sizes (on the meta device): both layouts give our shapes, and the shapes alone
    (the original file has no config) give the same params as the diffusers config."""
    config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048, **config)
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    layout = mmdit_layout(ref_shapes)
    shapes = layout.shapes(lambda key: ref_shapes[key])
    params = MMDiTParams.from_shapes(shapes, dict(ref.config))
    ours = build_on_meta(lambda: MMDiT(params))
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert MMDiTParams.from_shapes(shapes) == params
    assert describe(ref_shapes) == "an SD3 MMDiT (diffusers layout)"
    assert describe(shapes) == "an SD3 MMDiT (original layout)"
    assert params.hidden == 64 * params.depth and params.heads == params.depth
    assert params.pos_embed_max == config["pos_embed_max_size"]
    count = sum(v.numel() for k, v in ours.state_dict().items() if k != "pos_embed")
    assert round(count / 1e9, 2) == round(total / 1e9, 2)


def test_wrong_checkpoint(tmp_path, files):
    clip = save_state({"text_model.final_layer_norm.weight": torch.ones(8)}, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(CheckpointError, match="CLIP"):
        load_mmdit(clip)
    # The original file under the VAE's prefix: names what is there instead.
    with pytest.raises(CheckpointError, match="SD3 MMDiT \\(original layout\\) under 'model.diffusion_model.'"):
        load_mmdit(files["sd3"]["original"], prefix="first_stage_model.")
    # A config.json that contradicts the weights.
    folder = tmp_path / "bad"
    folder.mkdir()
    source = files["sd35"]["diffusers"]
    weights = "diffusion_pytorch_model.safetensors"
    (folder / weights).write_bytes((source / weights).read_bytes())
    config = (source / "config.json").read_text()
    assert '"num_layers": 3' in config
    (folder / "config.json").write_text(config.replace('"num_layers": 3', '"num_layers": 4'))
    with pytest.raises(CheckpointError, match="num_layers"):
        load_mmdit(folder)


def test_latent_larger_than_the_table(models):
    with pytest.raises(ValueError, match="position table"):
        models["sd3", "diffusers"](*inputs(34, 16))


def test_bf16_load(files, models):
    model = load_mmdit(files["sd35"]["diffusers"], dtype=torch.bfloat16)
    args = inputs(12, 20)
    with torch.no_grad():
        out = model(*args)
        ref = models["sd35", "diffusers"](*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.1


# ---------------------------------------------------------------------------------------------
# AccelAes hooks: increment with a focus, the block runner, the probe
# ---------------------------------------------------------------------------------------------

def image_focus(batch: int, tokens: int, keep: int, seed: int = 3) -> torch.Tensor:
    """A different ascending subset of image token indices (0..tokens-1) per sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(tokens, generator=g)[:keep].sort().values for _ in range(batch)])


def joint(rows: torch.Tensor, text_tokens: int, with_text: bool = True) -> torch.Tensor:
    """Image token indices -> rows of the joint [text | image] tensor, text rows first."""
    shifted = rows + text_tokens
    if not with_text:
        return shifted
    return torch.cat([torch.arange(text_tokens).expand(rows.shape[0], -1), shifted], dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_increment_with_focus(models, variant):
    """Per block (plain, attn2 and the pre_only last one): focus on every row is the dense increment;
    focus on a strict subset of image rows gives exactly those rows of it."""
    model = models[variant, "diffusers"]
    args = inputs(12, 20)
    n = 6 * 10
    for index, (tokens, step) in enumerate(dense_block_inputs(model, *args)):
        block = model.joint_blocks[index]
        with torch.no_grad():
            dense = block.increment(tokens, step)
            everything = block.increment(tokens, step, focus=joint(torch.arange(n).expand(2, -1), TEXT_TOKENS))
            focus = joint(image_focus(2, n, 17, seed=index), TEXT_TOKENS)
            some = block.increment(tokens, step, focus=focus)
        assert dense.shape == tokens.shape and some.shape == (2, TEXT_TOKENS + 17, tokens.shape[-1])
        assert rel_err(everything, dense) < TOL
        assert rel_err(some, dense.gather(1, focus[:, :, None].expand(-1, -1, dense.shape[-1]))) < TOL
        if index == model.params.depth - 1:  # pre_only: the text rows' output is dropped
            assert torch.equal(dense[:, :TEXT_TOKENS], torch.zeros_like(dense[:, :TEXT_TOKENS]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_skip_sparse_runs_the_model(models, variant):
    """AccelAes' block runner: dense it is the plain forward; sparse right after, at the same
    inputs, the cached background increments make it the plain forward again."""
    model = models[variant, "diffusers"]
    args = inputs(12, 20)
    runner = SkipSparse(TEXT_TOKENS, 60)
    with torch.no_grad():
        plain = model(*args)
        dense = model(*args, block_runner=runner)
        assert rel_err(dense, plain) < TOL
        focus = image_focus(2, 60, 25)
        background = torch.stack([torch.tensor(sorted(set(range(60)) - set(row.tolist()))) for row in focus])
        runner.set_focus(focus, background)   # image-token indices: the runner puts the text rows first
        runner.dense = False
        sparse = model(*args, block_runner=runner)
    assert rel_err(sparse, plain) < TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probe_sees_image_queries_against_text_keys(references, models, variant):
    """One call per joint block (attn2 is not shown), with the image queries [B, H, N, d] and the
    text keys [B, H, L, d], equal to those diffusers computes in the same block."""
    model, reference = models[variant, "diffusers"], references[variant]
    args = inputs(12, 20)
    seen = {}
    hooks = [block.attn.register_forward_pre_hook(
        lambda module, a, kw, i=i: seen.__setitem__(i, (module, kw["hidden_states"], kw["encoder_hidden_states"])),
        with_kwargs=True) for i, block in enumerate(reference.transformer_blocks)]
    try:
        diffusers_call(reference, *args)
    finally:
        for hook in hooks:
            hook.remove()
    probe = ProbeRecorder()
    with torch.no_grad():
        model(*args, probe=probe)
    assert len(probe.calls) == model.params.depth
    for index, (q, k, key_mask, scale, bias) in enumerate(probe.calls):
        assert q.shape == (2, 2, 60, 32) and k.shape == (2, 2, TEXT_TOKENS, 32)
        assert key_mask is None and bias is None and scale == pytest.approx(32 ** -0.5)
        attn, image, text = seen[index]
        with torch.no_grad():
            q_ref = split_heads(attn.to_q(image), 2)
            k_ref = split_heads(attn.add_k_proj(text), 2)
            if attn.norm_q is not None:
                q_ref, k_ref = attn.norm_q(q_ref), attn.norm_added_k(k_ref)
        assert rel_err(q, q_ref) < TOL and rel_err(k, k_ref) < TOL
