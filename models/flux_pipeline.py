"""FLUX.1 [dev] and [schnell], prompt to image: T5-XXL + CLIP-L, the FLUX sampler, the 16-channel VAE.

By default this reproduces diffusers' FluxPipeline, so the same seed gives the same image:
- text: T5-XXL's last hidden states (512 tokens for dev, 256 for schnell as BFL runs it;
  --max-sequence-length changes it), no attention mask, text ids all zero; CLIP-L's pooled EOS
  state WITHOUT projection (pooler_output);
- the initial noise is `torch.randn` [B, 16, 2*(H//16), 2*(W//16)] from a CPU generator in the
  text encoders' dtype, then packed into 2x2 patches [B, N, 64] (channel order c, ph, pw);
- sigmas linspace(1, 1/N, N), shifted with the image size for dev (mu from the number of
  packed tokens, scheduler config base 0.5 / max 1.15) and not at all for schnell;
- the model gets t = timestep / 1000 and, for dev, the distilled guidance (3.5) through its
  guidance embedding: one evaluation per step, no classifier-free guidance;
- decoding: unpack, z / 0.3611 + 0.1159, the VAE in fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import CheckpointError
from .clip import CLIPTextModel, CLIPTokenizer, load_clip
from .flux import Flux, image_ids, load_flux, pack, unpack
from .sampling import FlowMatchSchedule, check_size, sample_flow
from .t5 import T5Encoder, T5Tokenizer, load_t5
from .vae import AutoencoderKL, load_vae

FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159
# The release's schedulers: dev shifts with the image size, schnell not at all.
DEV_SCHEDULE = FlowMatchSchedule(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                 base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
SCHNELL_SCHEDULE = FlowMatchSchedule(shift=1.0)


@dataclass
class FluxSettings:
    """What shapes one generation. None: the variant's default (dev: 28 steps, guidance 3.5, 512
    T5 tokens; schnell: 4 steps, 256 tokens, no guidance)."""
    steps: int | None = None
    guidance: float = 3.5                  # distilled guidance, embedded (dev only; schnell has none)
    max_sequence_length: int | None = None
    shift: float | None = None             # a fixed shift instead of the scheduler's


@dataclass
class FluxConditioning:
    t5: torch.Tensor        # [B, L, 4096]
    pooled: torch.Tensor    # [B, 768]


class FluxPipeline:
    """The released components of FLUX.1 and the loop that turns noise into an image."""

    def __init__(self, transformer: Flux, clip_l: CLIPTextModel | None, t5: T5Encoder | None,
                 clip_l_tokenizer: CLIPTokenizer | None, t5_tokenizer: T5Tokenizer | None, vae: AutoencoderKL,
                 schedule: FlowMatchSchedule, vae_scale: float = FLUX_VAE_SCALE, vae_shift: float = FLUX_VAE_SHIFT):
        self.transformer, self.clip_l, self.t5 = transformer, clip_l, t5
        self.clip_l_tokenizer, self.t5_tokenizer = clip_l_tokenizer, t5_tokenizer
        self.vae, self.schedule, self.vae_scale, self.vae_shift = vae, schedule, vae_scale, vae_shift

    @property
    def is_dev(self) -> bool:
        return self.transformer.params.guidance_embed

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", text_device: str | torch.device | None = None) -> "FluxPipeline":
        """The repository FLUX.1-dev or -schnell as downloaded: the diffusers folders, or the
        original flux1-*.safetensors and ae.safetensors at its root beside the text encoders'
        folders; see weights.md. text_device: where T5 and CLIP-L live (default: `device`); the
        CPU keeps their 10 GB off a 24 GB GPU, which the 23.8 GB transformer fills."""
        folder = Path(folder)
        load = dict(dtype=dtype, device=device)
        text_load = dict(dtype=dtype, device=text_device or device)
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder} has no {name}/ folder (CLIP-L, T5 and their tokenizers): "
                                      "download it from the model's repository, see weights.md")
        if (folder / "transformer").is_dir():
            transformer = load_flux(folder / "transformer", **load)
        else:
            originals = sorted(folder.glob("flux1-*.safetensors"))
            if not originals:
                raise CheckpointError(f"{folder} has neither transformer/ nor a flux1-*.safetensors: see weights.md")
            transformer = load_flux(originals[0], **load)
        if (folder / "vae").is_dir():
            vae_path = folder / "vae"
        elif (folder / "ae.safetensors").is_file():
            vae_path = folder / "ae.safetensors"
        else:
            raise CheckpointError(f"{folder} has neither vae/ nor ae.safetensors (the autoencoder): see weights.md")
        vae_config = (json.loads((vae_path / "config.json").read_text())
                      if (vae_path / "config.json").is_file() else {})
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            schedule = FlowMatchSchedule.from_config(json.loads(scheduler_config.read_text()))
        else:
            schedule = DEV_SCHEDULE if transformer.params.guidance_embed else SCHNELL_SCHEDULE
        return cls(transformer, load_clip(folder / "text_encoder", **text_load), load_t5(folder / "text_encoder_2", **text_load),
                   CLIPTokenizer.from_folder(folder / "tokenizer"), T5Tokenizer(folder / "tokenizer_2"),
                   load_vae(vae_path, dtype=torch.float32, device=device), schedule,
                   vae_config.get("scaling_factor", FLUX_VAE_SCALE), vae_config.get("shift_factor", FLUX_VAE_SHIFT))

    # ---- the steps of a generation ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    def defaults(self, settings: FluxSettings) -> FluxSettings:
        """Fill the variant's defaults into the settings left None."""
        return FluxSettings(steps=settings.steps or (28 if self.is_dev else 4), guidance=settings.guidance,
                            max_sequence_length=settings.max_sequence_length or (512 if self.is_dev else 256),
                            shift=settings.shift)

    def encode_prompts(self, prompts: list[str], max_sequence_length: int) -> FluxConditioning:
        """T5 and CLIP-L features, on the transformer's device whichever device the encoders use."""
        text_device = self.t5.shared.weight.device
        with torch.no_grad():
            pooled = self.clip_l(self.clip_l_tokenizer(prompts).to(text_device)).pooled
            ids, _ = self.t5_tokenizer(prompts, max_length=max_sequence_length)
            states = self.t5(ids.to(text_device))
        return FluxConditioning(states.to(self.device), pooled.to(self.device, states.dtype))

    def initial_noise(self, batch: int, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """Packed noise [B, N, 64], drawn unpacked exactly as diffusers draws it."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (batch, self.transformer.params.in_channels // 4, 2 * (height // 16), 2 * (width // 16))
        return pack(torch.randn(shape, generator=generator, dtype=dtype)).to(self.device)

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, text: FluxConditioning,
                 settings: FluxSettings, size: tuple[int, int], *, guidance=None, probe=None,
                 block_runner=None) -> torch.Tensor:
        """One evaluation at timestep = sigma * 1000 (no CFG: `guidance` is ignored, FLUX-dev's
        guidance is an input of the model)."""
        batch = latents.shape[0]
        t = timestep.expand(batch).to(latents.dtype) / 1000
        distilled = (torch.full((batch,), settings.guidance, device=self.device, dtype=torch.float32)
                     if self.is_dev else None)
        rows, cols = size[0] // 16, size[1] // 16
        with torch.no_grad():
            return self.transformer(latents, image_ids(rows, cols, device=self.device, dtype=latents.dtype),
                                    text.t5, torch.zeros(text.t5.shape[1], 3, device=self.device, dtype=latents.dtype),
                                    t.to(self.device), text.pooled, distilled, probe=probe, block_runner=block_runner)

    def sigmas(self, settings: FluxSettings, tokens: int) -> torch.Tensor:
        schedule = self.schedule
        if settings.shift is not None:
            schedule = FlowMatchSchedule(**{**schedule.__dict__, "use_dynamic_shifting": False,
                                            "shift": settings.shift})
        grid = np.linspace(1.0, 1 / settings.steps, settings.steps)
        return schedule.sigmas(settings.steps, mu=schedule.mu(tokens), sigmas=grid)

    def prompt_segments(self, prompts: list[str], t5_tokens: int) -> list[tuple[list[list[str | None]], str]]:
        """What AesMask reads: T5's token text at each text position (FLUX's sequence holds T5 alone)."""
        segment = []
        for prompt in prompts:
            pieces = self.t5_tokenizer.tokens(prompt, t5_tokens)[:-1]    # without </s>
            segment.append([*pieces, *[None] * (t5_tokens - len(pieces))])
        return [(segment, "sentencepiece")]

    def prepare(self, prompts: list[str], *, seed: int, height: int, width: int, settings: FluxSettings,
                accelerator=None) -> tuple[FluxConditioning, torch.Tensor]:
        check_size(height, width, "FLUX")
        text = self.encode_prompts(prompts, settings.max_sequence_length)
        noise = self.initial_noise(len(prompts), height, width, seed, text.t5.dtype)
        if accelerator is not None:
            accelerator.start(segments=self.prompt_segments(prompts, settings.max_sequence_length),
                              grid=(height // 16, width // 16), latent_size=(height // 16, width // 16),
                              steps=settings.steps, guided=False, text_tokens=text.t5.shape[1])
        return text, noise

    def denoise(self, noise: torch.Tensor, text: FluxConditioning, settings: FluxSettings, size: tuple[int, int],
                progress: Callable[[int, int], None] | None = None, accelerator=None) -> torch.Tensor:
        velocity = partial(self.velocity, text=text, settings=settings, size=size)
        return sample_flow(noise, self.sigmas(settings, noise.shape[1]), velocity,
                           num_train_timesteps=self.schedule.num_train_timesteps, accelerator=accelerator,
                           progress=progress)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Packed latents to images in [0, 1], [B, 3, H, W], float32."""
        latents = unpack(latents, 2 * (size[0] // 16), 2 * (size[1] // 16))
        with torch.no_grad():
            images = self.vae.decode((latents / self.vae_scale + self.vae_shift).to(torch.float32))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, *, seed: int = 0,
                 height: int = 1024, width: int = 1024, settings: FluxSettings | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final packed latents, images in [0, 1]). FLUX has no negative prompt: it is ignored."""
        settings = self.defaults(settings or FluxSettings())
        text, noise = self.prepare(prompts, seed=seed, height=height, width=width, settings=settings,
                                   accelerator=accelerator)
        latents = self.denoise(noise, text, settings, (height, width), progress, accelerator)
        return latents, self.decode(latents, (height, width))

