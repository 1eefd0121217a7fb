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

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.keys import read_json
from models.clip import CLIPParams, CLIPTextModel, CLIPTokenizer, load_clip
from models.flux import Flux, FluxParams, image_ids, load_flux, pack, unpack
from models.t5 import T5Encoder, T5Params, T5Tokenizer, load_t5
from models.vae import AutoencoderKL, load_vae, tiny_random_vae

from .aesmask_inputs import key_words
from .base import Pipeline, clip_and_t5_token_counts, decode_latents, draw_noise
from .random_parts import ByteCLIPTokenizer, ByteT5Tokenizer, randomized
from .sampling import FlowMatchSchedule

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


class FluxPipeline(Pipeline):
    """The released components of FLUX.1 [dev] or [schnell]."""
    title = "FLUX"
    Settings = FluxSettings
    classifier_free = False    # guidance-distilled: `guidance` is an input of the model
    text_encoders = ("clip_l", "t5")

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
        vae_config = (read_json(vae_path / "config.json")
                      if (vae_path / "config.json").is_file() else {})
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            schedule = FlowMatchSchedule.from_config(read_json(scheduler_config), scheduler_config)
        else:
            schedule = DEV_SCHEDULE if transformer.params.guidance_embed else SCHNELL_SCHEDULE
        return cls(transformer, load_clip(folder / "text_encoder", **text_load), load_t5(folder / "text_encoder_2", **text_load),
                   CLIPTokenizer.from_folder(folder / "tokenizer"), T5Tokenizer(folder / "tokenizer_2"),
                   load_vae(vae_path, dtype=torch.float32, device=device), schedule,
                   vae_config.get("scaling_factor", FLUX_VAE_SCALE), vae_config.get("shift_factor", FLUX_VAE_SHIFT))

    @classmethod
    def random(cls, seed: int = 0, layers: int | None = None) -> "FluxPipeline":
        """[dev] with byte tokenizers and small T5 and CLIP-L encoders, and a tiny transformer
        (layers None) or FLUX.1's widths with `layers` double and `layers` single blocks; the
        encoders' widths are what the transformer reads (T5: 4096, CLIP-L pooled: 768)."""
        generator = torch.Generator().manual_seed(seed)
        t5_width, clip_width = (64, 32) if layers is None else (4096, 768)
        clip_l = randomized(CLIPTextModel(CLIPParams(
            vocab_size=ByteCLIPTokenizer.vocab_size, width=clip_width, layers=2, heads=2, mlp_width=64,
            max_positions=77, activation="quick_gelu", projection_dim=None, eos_token_id=ByteCLIPTokenizer.eot_id)),
            generator, norms_near_one=True)
        t5 = randomized(T5Encoder(T5Params(vocab_size=ByteT5Tokenizer.vocab_size, width=t5_width, layers=1, heads=2,
                                           head_dim=32, mlp_width=64)), generator, norms_near_one=True)
        params = (FluxParams(hidden=64, heads=2, depth=1, depth_single=1, context_dim=64, vec_dim=32,
                             axes_dim=(8, 12, 12)) if layers is None else FluxParams(depth=layers, depth_single=layers))
        transformer = randomized(Flux(params), generator, 0.05 if layers is None else 0.02, norms_near_one=True)
        return cls(transformer, clip_l, t5, ByteCLIPTokenizer(), ByteT5Tokenizer(), tiny_random_vae(16, seed),
                   DEV_SCHEDULE)

    # ---- the steps of a generation ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    def resolve(self, settings: FluxSettings) -> FluxSettings:
        """The variant's defaults in the settings left None: dev 28 steps and 512 T5 tokens,
        schnell 4 steps and 256."""
        return replace(settings, steps=settings.steps or (28 if self.is_dev else 4),
                       max_sequence_length=settings.max_sequence_length or (512 if self.is_dev else 256))

    def encode(self, prompts: list[str], negative_prompts: list[str] | None, settings: FluxSettings) -> FluxConditioning:
        """T5 and CLIP-L features, on the transformer's device whichever device the encoders use.
        FLUX has no negative prompt (no CFG)."""
        text_device = self.t5.shared.weight.device
        with torch.no_grad():
            pooled = self.clip_l(self.clip_l_tokenizer(prompts).to(text_device)).pooled
            ids, _ = self.t5_tokenizer(prompts, max_length=settings.max_sequence_length)
            states = self.t5(ids.to(text_device))
        return FluxConditioning(states.to(self.device), pooled.to(self.device, states.dtype))

    def initial_noise(self, batch: int, height: int, width: int, seed: int | list[int],
                      text: FluxConditioning) -> torch.Tensor:
        """Packed noise [B, N, 64], drawn unpacked exactly as diffusers draws it."""
        shape = (batch, self.transformer.params.in_channels // 4, 2 * (height // 16), 2 * (width // 16))
        return pack(draw_noise(shape, seed, text.t5.dtype)).to(self.device)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text: FluxConditioning, settings: FluxSettings,
                size: tuple[int, int], *, probe=None, block_runner=None) -> torch.Tensor:
        """One evaluation at timestep = sigma * 1000: the velocity of the latents."""
        batch = latents.shape[0]
        t = timestep.expand(batch).to(latents.dtype) / 1000
        distilled = (torch.full((batch,), settings.guidance, device=self.device, dtype=torch.float32)
                     if self.is_dev else None)
        rows, cols = self.token_grid(*size)
        with torch.no_grad():
            return self.transformer(latents, image_ids(rows, cols, device=self.device, dtype=latents.dtype),
                                    text.t5, torch.zeros(text.t5.shape[1], 3, device=self.device, dtype=latents.dtype),
                                    t.to(self.device), text.pooled, distilled, probe=probe, block_runner=block_runner)

    def sigmas(self, settings: FluxSettings, size: tuple[int, int]) -> torch.Tensor:
        schedule = self.schedule.with_shift(settings.shift)
        grid = np.linspace(1.0, 1 / settings.steps, settings.steps)
        rows, cols = self.token_grid(*size)
        return schedule.sigmas(settings.steps, mu=schedule.mu(rows * cols), sigmas=grid)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Packed latents to images in [0, 1], [B, 3, H, W], float32."""
        latents = unpack(latents, 2 * (size[0] // 16), 2 * (size[1] // 16))
        return decode_latents(self.vae, latents, self.vae_scale, self.vae_shift)

    def token_counts(self, text: str, settings: FluxSettings) -> list[tuple[str, int, int]]:
        return clip_and_t5_token_counts(self.clip_l_tokenizer, self.t5_tokenizer, text, settings.max_sequence_length)

    # ---- what AesMask reads ---------------------------------------------------------------------

    def prompt_words(self, prompts: list[str], text: FluxConditioning, settings: FluxSettings):
        """The word of each T5 position (FLUX's text sequence holds T5 alone)."""
        t5_tokens, words = settings.max_sequence_length, []
        for prompt in prompts:
            pieces = self.t5_tokenizer.tokens(prompt, t5_tokens)[:-1]    # without </s>
            words.append(key_words([*pieces, *[None] * (t5_tokens - len(pieces))], "sentencepiece"))
        return words

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // 16, width // 16

    def text_tokens(self, text: FluxConditioning) -> int:
        return text.t5.shape[1]

    def aesmask_clip(self):
        return None if self.clip_l is None else (self.clip_l, self.clip_l_tokenizer)
