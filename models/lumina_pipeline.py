"""Lumina-Next-T2I, prompt to image: Gemma text features, the NextDiT sampler, the SDXL VAE.

By default this reproduces diffusers' LuminaPipeline, so the same seed gives the same image:
- the prompt is lowercased and stripped (diffusers' `clean_caption` does more, but only when
  the optional packages bs4 and ftfy are installed; without them it does exactly this);
- prompt and negative prompt ("" by default) are Gemma features of layer -2 with their masks,
  the negative tokenised to the prompt's padded length; batch [cond, uncond];
- the initial noise is `torch.randn` of shape [B, 4, H/8, W/8] from a CPU generator seeded with
  `seed`, in the text encoder's dtype, drawn before anything else uses the generator;
- flow-matching Euler over diffusers' sigmas (models/sampling.py); the model gets t = 1 - sigma
  (0 = noise) and predicts data - noise, so the velocity in sigma is its negation;
- CFG on latent channels 0-2 only, channel 3 keeping the conditional prediction (Lumina's
  convention, kept by diffusers "for exact reproducibility");
- the time-aware RoPE scaling recomputed every step, proportional attention on;
- decoding `latents / 0.13025` with the VAE in fp32 (the SDXL VAE overflows in fp16), then
  (x / 2 + 0.5) clamped to [0, 1].
The official Lumina-T2X settings are options: solver "midpoint", shift 4, watershed 0.3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError
from .gemma import GemmaEncoder, GemmaParams, GemmaTokenizer, load_gemma
from .lumina_next import NextDiT, NextDiTParams, load_nextdit, time_aware_rope_factors
from .sampling import FlowMatchSchedule, cfg_negatives, check_size, sample_flow
from .vae import AutoencoderKL, load_vae, tiny_random_vae

SDXL_VAE_SCALE = 0.13025   # latents are divided by it before decoding
LATENT_CHANNELS = 4
GUIDED_CHANNELS = 3        # CFG acts on latent channels 0-2 only


@dataclass
class LuminaSettings:
    """Everything that shapes one generation; the defaults are diffusers' LuminaPipeline's."""
    steps: int = 30
    guidance: float = 4.0                 # CFG scale; <= 1 runs the conditional branch alone
    scaling_watershed: float = 1.0        # t below it: linear RoPE scaling, above: NTK (official: 0.3)
    proportional_attn: bool = True
    max_text_tokens: int = 256
    solver: str = "euler"                 # or "midpoint": two model calls per step
    shift: float | None = None            # None: the scheduler config's (1.0 without one; official: 4)


@dataclass
class TextConditioning:
    """Gemma features of [prompts..., negative prompts...] and their masks."""
    features: torch.Tensor     # [2B or B, L, 2048]
    mask: torch.Tensor         # [2B or B, L], 1 = token
    input_ids: torch.Tensor    # [2B or B, L]: for AesMask's token scoring


class LuminaNextPipeline:
    """The released components of Lumina-Next-T2I, and the loop that turns noise into an image."""

    def __init__(self, transformer: NextDiT, text_encoder: GemmaEncoder, tokenizer, vae: AutoencoderKL,
                 schedule: FlowMatchSchedule, vae_scale: float = SDXL_VAE_SCALE):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.schedule = schedule
        self.vae_scale = vae_scale

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu") -> "LuminaNextPipeline":
        """Load the diffusers layout or the original files; see weights.md for both."""
        folder = Path(folder)
        if (folder / "transformer").is_dir():
            parts = {"transformer": folder / "transformer", "text_encoder": folder / "text_encoder",
                     "tokenizer": folder / "tokenizer", "vae": folder / "vae"}
        else:
            originals = sorted(p for p in folder.glob("consolidated*")
                               if p.suffix in (".safetensors", ".pth"))
            if not originals:
                raise CheckpointError(
                    f"{folder} holds neither the diffusers layout (transformer/, text_encoder/, tokenizer/, "
                    "vae/) nor an original consolidated*.safetensors / .pth: see weights.md")
            # Prefer the EMA weights (the released sampler uses them), then safetensors.
            originals.sort(key=lambda p: ("_ema" not in p.name, p.suffix != ".safetensors"))
            parts = {"transformer": originals[0], "text_encoder": folder / "gemma-2b",
                     "tokenizer": folder / "gemma-2b", "vae": folder / "sdxl-vae"}
        for name, path in parts.items():
            if not path.exists():
                raise CheckpointError(f"{folder} has no {path.name} (the {name.replace('_', ' ')}): "
                                      "see weights.md for the files Lumina-Next needs")
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        schedule = (FlowMatchSchedule.from_config(json.loads(scheduler_config.read_text()))
                    if scheduler_config.is_file() else FlowMatchSchedule())
        vae_config = parts["vae"] / "config.json"
        vae_scale = (json.loads(vae_config.read_text()).get("scaling_factor", SDXL_VAE_SCALE)
                     if vae_config.is_file() else SDXL_VAE_SCALE)
        return cls(transformer=load_nextdit(parts["transformer"], dtype=dtype, device=device),
                   text_encoder=load_gemma(parts["text_encoder"], dtype=dtype, device=device),
                   tokenizer=GemmaTokenizer(parts["tokenizer"]),
                   vae=load_vae(parts["vae"], dtype=torch.float32, device=device),
                   schedule=schedule, vae_scale=vae_scale)

    @classmethod
    def tiny_random(cls, seed: int = 0) -> "LuminaNextPipeline":
        """A small model with random weights and a byte tokenizer: runs in seconds, draws noise."""
        generator = torch.Generator().manual_seed(seed)

        def randomized(module: torch.nn.Module) -> torch.nn.Module:
            with torch.no_grad():
                for param in module.parameters():
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            return module.requires_grad_(False).eval()

        text = GemmaParams(vocab_size=ByteTokenizer.vocab_size, width=64, layers=3, heads=2, kv_heads=1,
                           head_dim=32, mlp_width=128)
        dit = NextDiTParams(dim=96, layers=2, heads=4, kv_heads=2, ffn_dim=256, caption_dim=64, adaln_dim=96,
                            base_tokens=4096)
        return cls(transformer=randomized(NextDiT(dit)), text_encoder=randomized(GemmaEncoder(text)),
                   tokenizer=ByteTokenizer(), vae=tiny_random_vae(latent_channels=4, seed=seed),
                   schedule=FlowMatchSchedule())

    # ---- the steps of a generation ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None,
                       max_tokens: int = 256) -> TextConditioning:
        """Gemma layer -2 features of the prompts, then (for CFG) of the negative prompts."""
        prompts = [p.lower().strip() for p in prompts]
        ids, mask = self.tokenizer(prompts, max_length=max_tokens, pad_to_multiple_of=8)
        if negative_prompts is not None:
            negative_prompts = [p.lower().strip() for p in negative_prompts]
            negative_ids, negative_mask = self.tokenizer(negative_prompts, length=ids.shape[1])
            ids, mask = torch.cat([ids, negative_ids]), torch.cat([mask, negative_mask])
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            features = self.text_encoder(ids, attention_mask=mask, layer=-2)
        return TextConditioning(features=features, mask=mask, input_ids=ids)

    def initial_noise(self, batch: int, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """Noise as diffusers draws it: CPU generator, the final shape and dtype, then moved."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
        return torch.randn(shape, generator=generator, dtype=dtype).to(self.device)

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                 settings: LuminaSettings, image_size: tuple[int, int], *,
                 guidance: float | torch.Tensor | None = None, probe=None, block_runner=None) -> torch.Tensor:
        """One guided model evaluation: d latents / d sigma at timestep = sigma * 1000, CFG applied.

        guidance: the CFG scale, settings.guidance by default; a tensor [B, 1, H, W] guides each
        latent position with its own scale (AccelAes' spatial CFG). probe and block_runner go to
        the transformer (AccelAes' attention recording and sparse blocks)."""
        guided = settings.guidance > 1
        scale = settings.guidance if guidance is None else guidance
        model_input = torch.cat([latents, latents]) if guided else latents
        # Lumina counts time from noise (0) to data (1): t = 1 - sigma, computed as diffusers does.
        t = 1 - timestep.to(torch.float32) / self.schedule.num_train_timesteps
        linear, ntk = time_aware_rope_factors(t.item(), *image_size, settings.scaling_watershed,
                                              self.transformer.params.base_image_size)
        with torch.no_grad():
            prediction = self.transformer(
                model_input, t.expand(model_input.shape[0]).to(self.device), text.features, text.mask,
                rope_linear_factor=linear, rope_ntk_factor=ntk, proportional_attn=settings.proportional_attn,
                probe=probe, block_runner=block_runner)[:, :LATENT_CHANNELS]
        if guided:
            cond, uncond = prediction.chunk(2)
            if torch.is_tensor(scale):
                scale = scale.to(cond.device, cond.dtype)
            guided_part = uncond[:, :GUIDED_CHANNELS] + scale * (
                cond[:, :GUIDED_CHANNELS] - uncond[:, :GUIDED_CHANNELS])
            prediction = torch.cat([guided_part, cond[:, GUIDED_CHANNELS:]], dim=1)
        return -prediction  # the model predicts data - noise = -d x / d sigma

    def sigmas(self, settings: LuminaSettings) -> torch.Tensor:
        schedule = self.schedule
        if settings.shift is not None:
            schedule = FlowMatchSchedule(**{**schedule.__dict__, "shift": settings.shift})
        return schedule.sigmas(settings.steps)

    def denoise(self, noise: torch.Tensor, text: TextConditioning, settings: LuminaSettings,
                image_size: tuple[int, int], progress: Callable[[int, int], None] | None = None,
                accelerator=None) -> torch.Tensor:
        """Integrate from sigma = 1 to 0 (models/sampling.py); accelerator: AccelAes, if any."""
        velocity = partial(self.velocity, text=text, settings=settings, image_size=image_size)
        return sample_flow(noise, self.sigmas(settings), velocity, solver=settings.solver,
                           num_train_timesteps=self.schedule.num_train_timesteps,
                           accelerator=accelerator, progress=progress)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], [B, 3, H, W], float32."""
        with torch.no_grad():
            images = self.vae.decode(latents.to(torch.float32) / self.vae_scale)
        return (images / 2 + 0.5).clamp(0, 1)

    def prepare(self, prompts: list[str], negative_prompts: list[str] | None, *, seed: int, height: int,
                width: int, settings: LuminaSettings, accelerator=None) -> tuple[TextConditioning, torch.Tensor]:
        """Text features and initial noise of a generation; tells the accelerator, if any, what
        the prompts' tokens are and how large the image is."""
        check_size(height, width, "Lumina-Next")
        if accelerator is not None and settings.solver != "euler":
            raise ValueError(f"AccelAes extrapolates Euler steps; --solver {settings.solver} runs only densely "
                             "(add --dense)")
        negative_prompts = cfg_negatives(prompts, negative_prompts, settings.guidance)
        text = self.encode_prompts(prompts, negative_prompts, settings.max_text_tokens)
        noise = self.initial_noise(len(prompts), height, width, seed, text.features.dtype)
        if accelerator is not None:
            patch = self.transformer.params.patch_size
            accelerator.start(segments=[(self.prompt_pieces(text, len(prompts)), "sentencepiece")],
                              grid=(noise.shape[2] // patch, noise.shape[3] // patch),
                              latent_size=tuple(noise.shape[2:]), steps=settings.steps,
                              guided=settings.guidance > 1)
        return text, noise

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, *, seed: int = 0,
                 height: int = 1024, width: int = 1024, settings: LuminaSettings | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents, images in [0, 1]) for a batch of prompts; accelerator: see `denoise`."""
        settings = settings or LuminaSettings()
        text, noise = self.prepare(prompts, negative_prompts, seed=seed, height=height, width=width,
                                   settings=settings, accelerator=accelerator)
        latents = self.denoise(noise, text, settings, (height, width), progress, accelerator)
        return latents, self.decode(latents)

    def prompt_pieces(self, text: TextConditioning, prompts: int) -> list[list[str | None]]:
        """The token text at each caption position of the prompts (not the negative prompts),
        None for BOS and padding: what AesMask groups into words."""
        pieces = []
        for ids, mask in zip(text.input_ids[:prompts].tolist(), text.mask[:prompts].tolist()):
            names = self.tokenizer.id_to_piece(ids)
            pieces.append([name if keep and token != self.tokenizer.bos_id else None
                           for name, token, keep in zip(names, ids, mask)])
        return pieces



class ByteTokenizer:
    """The random demo's tokenizer: UTF-8 bytes as ids after BOS, Gemma's padding rules."""
    pad_id, bos_id, offset = 0, 2, 4
    vocab_size = 256 + offset

    def id_to_piece(self, ids: list[int]) -> list[str]:
        """A space byte reads as SentencePiece's word marker, so words group as Gemma's do."""
        return [chr(i - self.offset).replace(" ", "▁") if i >= self.offset else "<special>" for i in ids]

    def __call__(self, texts: list[str], max_length: int = 256, pad_to_multiple_of: int | None = 8,
                 length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [([self.bos_id] + [b + self.offset for b in t.encode()])[:length or max_length] for t in texts]
        if length is None:
            length = -(-max(map(len, rows)) // (pad_to_multiple_of or 1)) * (pad_to_multiple_of or 1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return ids, mask
