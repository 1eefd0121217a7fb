"""Stable Diffusion 3 (and 3.5), prompt to image: CLIP-L + CLIP-G + T5-XXL, the MMDiT sampler, the VAE.

By default this reproduces diffusers' StableDiffusion3Pipeline, so the same seed gives the same
image:
- text: CLIP-L's and CLIP-G's penultimate hidden states (before the final LayerNorm, 77 tokens
  each) side by side (768 + 1280 = 2048 features), zero-padded to 4096 features and followed
  by T5-XXL's 256 token states: a [333, 4096] context. Pooled: CLIP-L's and CLIP-G's projected
  EOS states side by side (2048); a CLIP-L without a stored projection (the single-file
  release's) uses the identity, as diffusers does. No attention mask anywhere; without T5
  weights its part of the context is zeros, as diffusers does then. The negative prompt ("" by
  default) is encoded the same way;
- the initial noise is `torch.randn` [B, 16, H/8, W/8] from a CPU generator, in the text
  encoders' dtype;
- flow-matching Euler over diffusers' sigmas with the scheduler's shift (3.0); the model gets
  timestep = sigma * 1000 and predicts the velocity noise - data directly;
- CFG uncond + s (cond - uncond) on every channel, scale 7.0, 28 steps. The batch is [cond,
  uncond] (diffusers stacks [uncond, cond]; each sample is computed alone, so the numbers are
  the same, and AccelAes finds the conditional rows first as on every backbone);
- decoding z / 1.5305 + 0.0609 (the VAE config's scaling and shift factors), the VAE in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.checkpoint import Checkpoint, CheckpointError
from models.keys import read_json
from models.clip import CLIPParams, CLIPTextModel, CLIPTokenizer, load_clip
from models.mmdit import MMDiT, MMDiTParams, load_mmdit
from models.t5 import T5Encoder, T5Params, T5Tokenizer, load_t5
from models.vae import AutoencoderKL, load_vae, tiny_random_vae

from .aesmask_inputs import key_words
from .base import Pipeline, clip_and_t5_token_counts, decode_latents, draw_noise
from .random_parts import ByteCLIPTokenizer, ByteT5Tokenizer, randomized
from .sampling import FlowMatchSchedule

SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609
T5_WIDTH = 4096


@dataclass
class SD3Settings:
    """What shapes one generation; the defaults are diffusers' StableDiffusion3Pipeline's."""
    steps: int = 28
    guidance: float = 7.0          # CFG scale; <= 1 runs the conditional branch alone
    max_sequence_length: int = 256  # T5 tokens of the prompt
    shift: float | None = None     # None: the scheduler config's (3.0 for the releases)


@dataclass
class SD3Conditioning:
    context: torch.Tensor      # [B or 2B, 77 + T5 tokens, 4096]: prompts first, then negative prompts
    pooled: torch.Tensor       # [B or 2B, 2048]


class SD3Pipeline(Pipeline):
    """The released components of SD3 / SD3.5."""
    title = "SD3"
    Settings = SD3Settings
    text_encoders = ("clip_l", "clip_g", "t5")

    def __init__(self, transformer: MMDiT, clip_l: CLIPTextModel, clip_g: CLIPTextModel, t5: T5Encoder | None,
                 clip_l_tokenizer: CLIPTokenizer, clip_g_tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer,
                 vae: AutoencoderKL, schedule: FlowMatchSchedule, vae_scale: float = SD3_VAE_SCALE,
                 vae_shift: float = SD3_VAE_SHIFT):
        self.transformer, self.clip_l, self.clip_g, self.t5 = transformer, clip_l, clip_g, t5
        self.clip_l_tokenizer, self.clip_g_tokenizer, self.t5_tokenizer = clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer
        self.vae, self.schedule, self.vae_scale, self.vae_shift = vae, schedule, vae_scale, vae_shift

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float16,
                    device: str | torch.device = "cpu", text_device: str | torch.device | None = None) -> "SD3Pipeline":
        """The diffusers layout, or the single files of the release; see weights.md for both.
        text_device: where the three text encoders live (default: `device`)."""
        folder = Path(folder)
        load = dict(dtype=dtype, device=device)
        text_load = dict(dtype=dtype, device=text_device or device)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder} has no {name}/ folder (the CLIP-L, CLIP-G and T5 tokenizers): "
                                      "download it from the model's repository, see weights.md")
        tokenizers = (CLIPTokenizer.from_folder(folder / "tokenizer"),
                      CLIPTokenizer.from_folder(folder / "tokenizer_2"), T5Tokenizer(folder / "tokenizer_3"))
        if (folder / "transformer").is_dir():
            for name in ("text_encoder", "text_encoder_2", "vae"):
                if not (folder / name).is_dir():
                    raise CheckpointError(f"{folder} has no {name}/ folder: see weights.md for what SD3 needs")
            transformer = load_mmdit(folder / "transformer", **load)
            clip_l = load_clip(folder / "text_encoder", **text_load)
            clip_g = load_clip(folder / "text_encoder_2", **text_load)
            t5 = load_t5(folder / "text_encoder_3", **text_load) if (folder / "text_encoder_3").is_dir() else None
            vae_path = folder / "vae"
            vae = load_vae(vae_path, dtype=torch.float32, device=device)
        else:
            transformer, clip_l, clip_g, t5, vae = cls._load_single_files(folder, load, text_load)
            vae_path = folder / "vae"
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        schedule = (FlowMatchSchedule.from_config(read_json(scheduler_config), scheduler_config)
                    if scheduler_config.is_file() else FlowMatchSchedule(shift=3.0))
        vae_config = read_json(vae_path / "config.json") if (vae_path / "config.json").is_file() else {}
        return cls(transformer, clip_l, clip_g, t5, *tokenizers, vae, schedule,
                   vae_scale=vae_config.get("scaling_factor", SD3_VAE_SCALE),
                   vae_shift=vae_config.get("shift_factor", SD3_VAE_SHIFT))

    @staticmethod
    def _load_single_files(folder: Path, load: dict, text_load: dict):
        """sd3*.safetensors (MMDiT + VAE, maybe the text encoders) beside text_encoders/*.safetensors."""
        mains = sorted(folder.glob("sd3*.safetensors"), key=lambda p: len(p.name))
        if not mains:
            raise CheckpointError(f"{folder} holds neither the diffusers layout (transformer/, text_encoder*/, "
                                  "vae/) nor a single-file sd3*.safetensors: see weights.md")
        main = Checkpoint(mains[0])
        transformer = load_mmdit(main, prefix="model.diffusion_model.", **load)
        vae = load_vae(main, prefix="first_stage_model.", dtype=torch.float32, device=load["device"])

        def text_encoder(name: str, files: tuple[str, ...], loader):
            for file in files:
                if (folder / "text_encoders" / file).is_file():
                    return loader(folder / "text_encoders" / file, **text_load)
            prefix = f"text_encoders.{name}.transformer."
            if any(key.startswith(prefix) for key in main.keys()):
                return loader(main, prefix=prefix, **text_load)
            return None

        clip_l = text_encoder("clip_l", ("clip_l.safetensors",), load_clip)
        clip_g = text_encoder("clip_g", ("clip_g.safetensors",), load_clip)
        t5 = text_encoder("t5xxl", ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                                    "t5xxl.safetensors"), load_t5)
        if clip_l is None or clip_g is None:
            raise CheckpointError(f"{folder} has no CLIP-L / CLIP-G weights: download text_encoders/clip_l.safetensors "
                                  "and clip_g.safetensors, or an sd3*_incl_clips*.safetensors file (weights.md)")
        return transformer, clip_l, clip_g, t5, vae

    @classmethod
    def random(cls, seed: int = 0, layers: int | None = None) -> "SD3Pipeline":
        """Byte tokenizers and small CLIP-L, CLIP-G and T5 encoders, with a tiny MMDiT (layers None)
        or SD3-Medium's widths with `layers` blocks; the encoders' widths are what the MMDiT reads
        (CLIP states side by side, padded to T5's width)."""
        generator = torch.Generator().manual_seed(seed)
        widths = (32, 32, 64) if layers is None else (768, 1280, T5_WIDTH)     # CLIP-L, CLIP-G, T5
        clip_l, clip_g = (randomized(CLIPTextModel(CLIPParams(
            vocab_size=ByteCLIPTokenizer.vocab_size, width=width, layers=2, heads=2, mlp_width=64,
            max_positions=77, activation="quick_gelu", projection_dim=width, eos_token_id=ByteCLIPTokenizer.eot_id)),
            generator, norms_near_one=True) for width in widths[:2])
        t5 = randomized(T5Encoder(T5Params(vocab_size=ByteT5Tokenizer.vocab_size, width=widths[2], layers=1, heads=2,
                                           head_dim=32, mlp_width=64)), generator, norms_near_one=True)
        params = (MMDiTParams(depth=2, hidden=64, heads=2, context_dim=64, pooled_dim=64, pos_embed_max=64)
                  if layers is None else MMDiTParams(depth=layers))
        transformer = randomized(MMDiT(params), generator, 0.05 if layers is None else 0.02, norms_near_one=True)
        return cls(transformer, clip_l, clip_g, t5, ByteCLIPTokenizer(), ByteCLIPTokenizer(), ByteT5Tokenizer(),
                   tiny_random_vae(16, seed), FlowMatchSchedule(shift=3.0))

    # ---- the steps of a generation ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.context_embedder.weight.device

    def encode(self, prompts: list[str], negative_prompts: list[str] | None, settings: SD3Settings) -> SD3Conditioning:
        texts = prompts + (negative_prompts or [])
        weight = self.clip_l.embeddings.token_embedding.weight
        dtype, text_device = weight.dtype, weight.device
        length = settings.max_sequence_length
        with torch.no_grad():
            clip_l = self.clip_l(self.clip_l_tokenizer(texts).to(text_device))
            clip_g = self.clip_g(self.clip_g_tokenizer(texts).to(text_device))
            t5_ids, _ = self.t5_tokenizer(texts, max_length=length)
            if self.t5 is not None:
                t5_states = self.t5(t5_ids.to(text_device))
            else:  # diffusers without text_encoder_3: zeros in T5's place
                width = self.transformer.params.context_dim
                t5_states = torch.zeros(len(texts), length, width, device=text_device, dtype=dtype)
        clip_states = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2].to(dtype)], dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        context = torch.cat([clip_states, t5_states.to(dtype)], dim=1)
        pooled = torch.cat([clip_l.projected, clip_g.projected.to(dtype)], dim=-1)
        return SD3Conditioning(context.to(self.device), pooled.to(self.device))

    def initial_noise(self, batch: int, height: int, width: int, seed: int | list[int],
                      text: SD3Conditioning) -> torch.Tensor:
        shape = (batch, self.transformer.params.in_channels, height // self.vae.downscale, width // self.vae.downscale)
        return draw_noise(shape, seed, text.context.dtype).to(self.device)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text: SD3Conditioning, settings: SD3Settings,
                size: tuple[int, int], *, probe=None, block_runner=None) -> torch.Tensor:
        """One evaluation at timestep = sigma * 1000: the velocity noise - data of every row."""
        model_input = torch.cat([latents, latents]) if self.guided(settings) else latents
        with torch.no_grad():
            return self.transformer(model_input, timestep.expand(model_input.shape[0]).to(self.device),
                                    text.context, text.pooled, probe=probe, block_runner=block_runner)

    def sigmas(self, settings: SD3Settings, size: tuple[int, int]) -> torch.Tensor:
        schedule = self.schedule.with_shift(settings.shift)
        if schedule.use_dynamic_shifting:  # SD3.5 configs may shift with the image size
            raise CheckpointError("this scheduler_config.json shifts with the image size, which SD3 here does not "
                                  "implement; pass --shift")
        return schedule.sigmas(settings.steps)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return decode_latents(self.vae, latents, self.vae_scale, self.vae_shift)

    def token_counts(self, text: str, settings: SD3Settings) -> list[tuple[str, int, int]]:
        return clip_and_t5_token_counts(self.clip_l_tokenizer, self.t5_tokenizer, text, settings.max_sequence_length)

    # ---- what AesMask reads ---------------------------------------------------------------------

    def prompt_words(self, prompts: list[str], text: SD3Conditioning, settings: SD3Settings):
        """The word of each context position of the prompts: CLIP's 77 (the same words for CLIP-L
        and CLIP-G, side by side) then T5's; start, end and padding positions are special."""
        clip_length, t5_tokens = self.clip_l_tokenizer.max_length, settings.max_sequence_length
        words = []
        for prompt in prompts:
            clip = self.clip_l_tokenizer.tokens(prompt)[1:-1]          # without start / end of text
            t5 = self.t5_tokenizer.tokens(prompt, t5_tokens)[:-1]      # without </s>
            words.append(key_words([None, *clip, *[None] * (clip_length - 1 - len(clip))], "bpe")
                         + key_words([*t5, *[None] * (t5_tokens - len(t5))], "sentencepiece"))
        return words

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        patch = self.transformer.params.patch_size * self.vae.downscale
        return height // patch, width // patch

    def text_tokens(self, text: SD3Conditioning) -> int:
        return text.context.shape[1]

    def aesmask_clip(self):
        return None if self.clip_l is None else (self.clip_l, self.clip_l_tokenizer)
