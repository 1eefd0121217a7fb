"""The peers of benchmark.py: the same weights in diffusers' transformer classes, run through our
sampling loop (pipelines/sampling.py), dense and with diffusers' cache hooks.

diffusers is a test dependency, never a run-time one: it is imported here, inside the functions
that need it, and this file only by `benchmark.py --peers` (and the tests).

The same weights. Each diffusers model is built on the meta device and given OUR tensors through
the inverse of our diffusers key layout (`diffusers_state`): a renamed key is the same tensor, a
fused one (our qkv) is cut back into diffusers' to_q, to_k, to_v as views, and a (shift, scale)
pair swaps back to diffusers' (scale, shift). Nothing is copied but the swapped pair, so both
models hold one set of weights and their peak memories compare.

The same loop. Each peer's `predict` makes the call diffusers' own pipeline makes at a step
(LuminaPipeline, StableDiffusion3Pipeline, FluxPipeline), and returns it in our pipeline's
convention, so the one `sample_flow` and the one CFG function run both.

The cache hooks, at their documented defaults. diffusers 0.42.1 offers FirstBlockCache,
TaylorSeerCache and FasterCache through `enable_cache` on the models that mix in CacheMixin
(FluxTransformer2DModel), and as `apply_*` functions on any model whose blocks its registries
know. Where a hook cannot run on a backbone, `not_run` says why instead of a row.
"""

from __future__ import annotations

import math
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import nn

from benchmarking.measure import TimedRow
from models.flux import image_ids
from models.flux_params import flux_layout
from models.keys import Concat, Key, SwappedHalves
from models.lumina_next import nextdit_layout
from models.mmdit import mmdit_layout
from pipelines.sampling import sample_flow

INSTALL = "pip install diffusers==0.42.1  (the version requirements-test.txt pins)"


def import_diffusers():
    """diffusers, or an ImportError whose message is the one line that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"--peers runs diffusers beside us, which is not installed: {INSTALL}") from None
    return diffusers


# ---------------------------------------------------------------------------------------------
# The same weights
# ---------------------------------------------------------------------------------------------

def diffusers_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], layout,
                    twin: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Our state dict under diffusers' keys: the inverse of `layout`, which reads diffusers' keys
    into our names. `theirs` gives diffusers' keys and shapes; `twin(key)` names the key holding
    the same tensor for a diffusers key no source reads (Lumina-Next's attn2.to_q is attn1's)."""
    out = {}
    for name, source in layout.mapping.items():
        tensor = ours[name]
        if isinstance(source, Concat):
            sizes = [theirs[key].shape[0] for key in source.parts]
            out.update(zip(source.parts, tensor.split(sizes)))
        elif isinstance(source, SwappedHalves):
            first, second = tensor.chunk(2)
            out[source.key] = torch.cat([second, first])
        elif type(source) is Key:
            out[source.key] = tensor
        else:
            raise TypeError(f"{name}: no inverse for a {type(source).__name__} source")
    for key in theirs:
        if key not in out:
            out[key] = out[twin(key)]
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(theirs[key].shape):
            raise ValueError(f"{key}: ours gives {tuple(tensor.shape)}, diffusers expects {tuple(theirs[key].shape)}")
    return out


def twin_model(ours: nn.Module, build: Callable[[], nn.Module], layout_of, twin=lambda key: None) -> nn.Module:
    """A diffusers model built by `build` (on the meta device) holding our model's tensors."""
    with torch.device("meta"):
        theirs = build()
    their_state = theirs.state_dict()
    state = diffusers_state(ours.state_dict(), their_state, layout_of(list(their_state)), twin)
    theirs.load_state_dict(state, strict=True, assign=True)
    return theirs.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# The same call, per backbone: the model built from our sizes, and `predict(latents, timestep)`
# as diffusers' pipeline calls it, returned as our pipeline's predict returns it.
# ---------------------------------------------------------------------------------------------

@dataclass
class Peer:
    """A diffusers transformer holding our weights, and how our loop calls it."""
    model: nn.Module                                     # the diffusers transformer
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (latents, timestep) -> our pipeline's prediction
    stateful: bool = False           # its hooks keep state per named cache context (FirstBlockCache, TaylorSeerCache)
    timestep: torch.Tensor | None = None                 # the step being computed (FasterCache's callback reads it)
    calls: int = 0                                       # model calls since the last reset

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, probe=None, block_runner=None) -> torch.Tensor:
        """One step's prediction, as a pipeline's `predict` (sample_flow's). diffusers' pipelines
        wrap each call of a cached model in `cache_context("cond")`, where the stateful hooks
        keep their state; SD3Transformer2DModel, which does not mix in CacheMixin in 0.42.1,
        is given the same context by the same function."""
        from diffusers import CacheMixin
        self.timestep, self.calls = timestep, self.calls + 1
        with CacheMixin.cache_context(self.model, "cond") if self.stateful else nullcontext(), torch.no_grad():
            return self.call(latents, timestep)


def lumina_peer(pipeline, generation) -> Peer:
    """LuminaNextDiT2DModel called as LuminaPipeline calls it: the RoPE table of a 384x384 grid
    made at every step, [cond, uncond] rows, channels 0-3 of the output (learn_sigma)."""
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    p = pipeline.transformer.params
    base = p.base_image_size
    model = twin_model(pipeline.transformer, lambda: LuminaNextDiT2DModel(
        sample_size=base // 8, patch_size=p.patch_size, in_channels=p.in_channels, hidden_size=p.dim,
        num_layers=p.layers, num_attention_heads=p.heads, num_kv_heads=p.kv_heads, norm_eps=p.norm_eps,
        learn_sigma=p.out_channels == 2 * p.in_channels, qk_norm=p.qk_norm, cross_attention_dim=p.caption_dim),
        nextdit_layout, lambda key: key.replace(".attn2.", ".attn1."))
    text, settings, (height, width) = generation.text, generation.settings, generation.size
    scaling = math.sqrt(width * height / base ** 2)
    attention_kwargs = {"base_sequence_length": (base // 16) ** 2} if settings.proportional_attn else {}

    def call(latents, timestep):
        rows = torch.cat([latents, latents]) if pipeline.guided(settings) else latents
        t = 1 - timestep.to(torch.float32).expand(rows.shape[0]) / pipeline.schedule.num_train_timesteps
        factors = (scaling, 1.0) if t[0] < settings.scaling_watershed else (1.0, scaling)
        rope = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=factors[0],
                                              ntk_factor=factors[1])
        out = model(hidden_states=rows, timestep=t.to(rows.device), encoder_hidden_states=text.features,
                    encoder_mask=text.mask, image_rotary_emb=rope, cross_attention_kwargs=attention_kwargs,
                    return_dict=False)[0]
        return -out[:, :p.in_channels]

    return Peer(model, call)


def _uncond_first(rows: torch.Tensor) -> torch.Tensor:
    """Our [cond; uncond] rows as diffusers' CFG pipelines stack them, [uncond; cond] (and back):
    FasterCache reads the first half as the unconditional branch."""
    cond, uncond = rows.chunk(2)
    return torch.cat([uncond, cond])


def sd3_peer(pipeline, generation) -> Peer:
    """SD3Transformer2DModel called as StableDiffusion3Pipeline calls it: [uncond, cond] rows,
    timestep = sigma * 1000."""
    from diffusers import SD3Transformer2DModel
    p = pipeline.transformer.params
    model = twin_model(pipeline.transformer, lambda: SD3Transformer2DModel(
        sample_size=128, patch_size=p.patch_size, in_channels=p.in_channels, out_channels=p.out_channels,
        num_layers=p.depth, attention_head_dim=p.head_dim, num_attention_heads=p.heads,
        joint_attention_dim=p.context_dim, caption_projection_dim=p.hidden, pooled_projection_dim=p.pooled_dim,
        pos_embed_max_size=p.pos_embed_max, dual_attention_layers=p.dual_attention_layers,
        qk_norm="rms_norm" if p.qk_norm else None), mmdit_layout)
    text, settings = generation.text, generation.settings
    guided = pipeline.guided(settings)
    context, pooled = text.context, text.pooled
    if guided:
        context, pooled = _uncond_first(context), _uncond_first(pooled)

    def call(latents, timestep):
        rows = torch.cat([latents, latents]) if guided else latents
        out = model(hidden_states=rows, timestep=timestep.expand(rows.shape[0]).to(rows.device),
                    encoder_hidden_states=context, pooled_projections=pooled, return_dict=False)[0]
        return _uncond_first(out) if guided else out

    return Peer(model, call)


def flux_peer(pipeline, generation) -> Peer:
    """FluxTransformer2DModel called as FluxPipeline calls it: timestep / 1000, the guidance
    scale as an input ([dev]), 2-D ids."""
    from diffusers import FluxTransformer2DModel
    p = pipeline.transformer.params
    model = twin_model(pipeline.transformer, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single, attention_head_dim=p.head_dim, num_attention_heads=p.heads,
        joint_attention_dim=p.context_dim, pooled_projection_dim=p.vec_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim), flux_layout)
    text, settings = generation.text, generation.settings
    device, dtype = pipeline.device, generation.noise.dtype
    img_ids = image_ids(*pipeline.token_grid(*generation.size), device=device, dtype=dtype)
    txt_ids = torch.zeros(text.t5.shape[1], 3, device=device, dtype=dtype)

    def call(latents, timestep):
        batch = latents.shape[0]
        guidance = (torch.full([1], settings.guidance, device=device, dtype=torch.float32).expand(batch)
                    if p.guidance_embed else None)
        return model(hidden_states=latents, timestep=timestep.expand(batch).to(device, latents.dtype) / 1000,
                     guidance=guidance, pooled_projections=text.pooled, encoder_hidden_states=text.t5,
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    return Peer(model, call)


PEERS = {"lumina-next": lumina_peer, "sd3": sd3_peer, "flux": flux_peer}


# ---------------------------------------------------------------------------------------------
# The cache hooks: which run on each backbone, and why the others do not
# ---------------------------------------------------------------------------------------------

_NOT_ON_LUMINA = {
    "FirstBlockCache": "diffusers 0.42.1 has no block metadata for LuminaNextDiTBlock (its TransformerBlockRegistry), "
                       "which the hook needs to find the blocks' outputs",
    "TaylorSeerCache": "its default module patterns (^blocks.*attn, ^transformer_blocks.*attn, "
                       "^single_transformer_blocks.*attn) match no module of LuminaNextDiT2DModel (layers.N.attn1): "
                       "it would cache nothing",
    "FasterCache": "its attention patterns match no module of LuminaNextDiT2DModel (layers.N.attn1), and its "
                   "skipping of the unconditional branch reads the batch as [uncond, cond] where LuminaPipeline "
                   "stacks [cond, uncond]",
}


def _enable(peer: Peer, config) -> None:
    """`enable_cache` on a model that mixes in CacheMixin (FLUX); on the others (SD3 in 0.42.1) the
    hook's own `apply_*` function, which enable_cache calls."""
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_faster_cache,
                                 apply_first_block_cache, apply_taylorseer_cache)
    if hasattr(peer.model, "enable_cache"):
        peer.model.enable_cache(config)
    else:
        apply = {FirstBlockCacheConfig: apply_first_block_cache, TaylorSeerCacheConfig: apply_taylorseer_cache,
                 FasterCacheConfig: apply_faster_cache}[type(config)]
        apply(peer.model, config)
    peer.stateful = not isinstance(config, FasterCacheConfig)


def hook_configs(peer: Peer, guided: bool) -> dict[str, object]:
    """Each hook's config at its documented defaults, with what it cannot do without: FasterCache
    needs the current timestep, the images' tensor layout (its default is video's), whether the
    model is guidance-distilled (FLUX-dev: no unconditional branch to skip), and, for SD3, that
    the pooled text is batched [uncond, cond] like the inputs it lists by default."""
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig
    batched = [*FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, "pooled_projections"]
    return {
        "FirstBlockCache": FirstBlockCacheConfig(),
        "TaylorSeerCache": TaylorSeerCacheConfig(),
        "FasterCache": FasterCacheConfig(current_timestep_callback=lambda: peer.timestep, tensor_format="BCHW",
                                         is_guidance_distilled=not guided,
                                         _unconditional_conditional_input_kwargs_identifiers=batched),
    }


_NOT_ON_SD3 = {
    "FirstBlockCache": "its hook on the last block subtracts that block's text output, which SD3's last block "
                       "(context_pre_only) does not return: a TypeError in diffusers 0.42.1, whose "
                       "SD3Transformer2DModel offers no enable_cache",
}


def not_run(model_name: str, peer: Peer) -> dict[str, str]:
    """The hooks that cannot run on this backbone (at this depth), and why."""
    if model_name == "lumina-next":
        return dict(_NOT_ON_LUMINA)
    if model_name == "sd3":
        return dict(_NOT_ON_SD3)
    blocks = sum(len(blocks) for name, blocks in peer.model.named_children() if name.endswith("transformer_blocks"))
    if blocks < 2:
        return {"FirstBlockCache": f"it always computes the first block and skips the others: {blocks} block(s) "
                                   "leave nothing to skip (--layers 2 or more)"}
    return {}


# ---------------------------------------------------------------------------------------------
# Measuring: the rows of benchmark.py's table
# ---------------------------------------------------------------------------------------------

class LinearFlops:
    """FLOPs of every nn.Linear a model runs (2 x rows x weight size), counted by forward hooks:
    the work a cache hook saves, whichever layers it skips."""

    def __init__(self, model: nn.Module):
        self.flops = 0
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.flops += 2 * (output.numel() // output.shape[-1]) * module.weight.numel()


def run_peer(pipeline, generation, peer: Peer, counter: LinearFlops, steps: int, reference):
    """One timed run of the loop through the peer: (seconds, final latents, its PeakMemory); its
    hooks' state is reset first, as diffusers' pipelines do at the start of a generation."""
    from diffusers.hooks import HookRegistry
    settings = replace(generation.settings, steps=steps)
    HookRegistry.check_if_exists_or_initialize(peer.model).reset_stateful_hooks(recurse=True)
    peer.calls, counter.flops = 0, 0
    return reference.timed(lambda: sample_flow(
        generation.noise, pipeline.sigmas(settings, generation.size), peer.predict,
        partial(pipeline.guide, settings=settings), solver=getattr(settings, "solver", "euler"),
        num_train_timesteps=pipeline.schedule.num_train_timesteps))


def rows(pipeline, model_name: str, generation, reference) -> tuple[list[TimedRow], list[dict]]:
    """diffusers' rows (dense, then each hook that runs here) for `generation` (the prompt, seed
    and settings of our rows), each on a fresh twin of our model, measured by benchmark.py's
    `reference`; and the hooks not run, with the reason."""
    build = PEERS[model_name]
    skipped = not_run(model_name, build(pipeline, generation))
    out, dense_flops = [], {}
    for name in ["dense", "FirstBlockCache", "TaylorSeerCache", "FasterCache"]:
        if name in skipped:
            continue
        peer = build(pipeline, generation)     # a fresh twin: one row's hooks never reach another's
        config = None if name == "dense" else hook_configs(peer, pipeline.guided(generation.settings))[name]
        if config is not None:
            _enable(peer, config)
        counter = LinearFlops(peer.model)
        run = partial(run_peer, pipeline, generation, peer, counter)
        out.append(TimedRow(f"diffusers {name}", partial(run, 8, reference),
                            partial(run, generation.settings.steps, reference),
                            partial(_summary, f"diffusers {name}", config, peer, counter, dense_flops, reference)))
    return out, [{"row": name, "reason": reason} for name, reason in skipped.items()]


def _summary(name: str, config, peer: Peer, counter: LinearFlops, dense_flops: dict, reference,
             runs: list[tuple]) -> dict:
    """A diffusers row from its timed runs; the dense row (summarized first) sets the FLOPs the
    hooks' rows are a share of. The counter holds the last run's FLOPs (run_peer resets it)."""
    seconds = statistics.median(r[0] for r in runs)
    dense_flops.setdefault("flops", counter.flops)
    image, decode_seconds = reference.decode(runs[-1][1])
    share = counter.flops / dense_flops["flops"]
    return {
        "row": name, "kind": "diffusers", "hook": None if config is None else repr(config),
        "seconds": seconds, "all_seconds": [r[0] for r in runs], "speedup": reference.seconds / seconds,
        "theoretical": 1 / share, "evaluations": f"{peer.calls} calls, {share:.0%} FLOPs",
        "model_calls": peer.calls, "linear_flop_share": share, "mask_seconds": 0.0,
        **reference.memory([r[2] for r in runs]),
        **reference.fidelity(runs[-1][1], image), "decode_seconds": decode_seconds,
    }
