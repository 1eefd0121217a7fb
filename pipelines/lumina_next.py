"""Lumina-Next-T2I, prompt to image: Gemma text features, the NextDiT sampler, the SDXL VAE.

By default this reproduces diffusers' LuminaPipeline, so the same seed gives the same image:
- the prompt is lowercased and stripped (diffusers' `clean_caption` does more, but only when
  the optional packages bs4 and ftfy are installed; without them it does exactly this); the
  negative prompt is taken as it is, as diffusers does;
- prompt and negative prompt ("" by default) are Gemma features of layer -2 with their masks,
  the negative tokenised to the prompt's padded length; batch [cond, uncond];
- the initial noise is `torch.randn` of shape [B, 4, H/8, W/8] from a CPU generator seeded with
  `seed`, in the text encoder's dtype, drawn before anything else uses the generator;
- flow-matching Euler over diffusers' sigmas (pipelines/sampling.py); the model gets t = 1 - sigma
  (0 = noise) and predicts data - noise, so the velocity in sigma is its negation;
- CFG on latent channels 0-2 only, channel 3 keeping the conditional prediction (Lumina's
  convention, kept by diffusers "for exact reproducibility");
- the time-aware RoPE scaling recomputed every step, proportional attention on;
- decoding `latents / 0.13025` with the VAE in fp32 (the SDXL VAE overflows in fp16), then
  (x / 2 + 0.5) clamped to [0, 1].
The official Lumina-T2X settings are options: solver "midpoint", shift 4, watershed 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.checkpoint import CheckpointError
from models.keys import read_json
from models.gemma import GemmaEncoder, GemmaParams, GemmaTokenizer, load_gemma
from models.lumina_next import NextDiT, NextDiTParams, load_nextdit, time_aware_rope_factors
from models.vae import AutoencoderKL, load_vae, tiny_random_vae

from .aesmask_inputs import key_words
from .base import Pipeline, decode_latents, draw_noise
from .random_parts import ByteTokenizer, randomized
from .sampling import FlowMatchSchedule

SDXL_VAE_SCALE = 0.13025   # latents are divided by it before decoding
LATENT_CHANNELS = 4


@dataclass
class LuminaSettings:
    """Everything that shapes one generation; the defaults are diffusers' LuminaPipeline's."""
    steps: int = 30
    guidance: float = 4.0                 # CFG scale; <= 1 runs the conditional branch alone
    scaling_watershed: float = 1.0        # t below it: linear RoPE scaling, above: NTK (official: 0.3)
    proportional_attn: bool = True
    max_sequence_length: int = 256        # Gemma tokens of the prompt
    solver: str = "euler"                 # or "midpoint": two model calls per step
    shift: float | None = None            # None: the scheduler config's (1.0 without one; official: 4)


@dataclass
class TextConditioning:
    """Gemma features of [prompts..., negative prompts...] and their masks."""
    features: torch.Tensor     # [2B or B, L, 2048]
    mask: torch.Tensor         # [2B or B, L], 1 = token
    input_ids: torch.Tensor    # [2B or B, L]: for AesMask's token scoring
    caption_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # every layer's caption keys /
                                                                        # values, once (`precompute`)


class LuminaNextPipeline(Pipeline):
    """The released components of Lumina-Next-T2I."""
    title = "Lumina-Next"
    Settings = LuminaSettings
    guided_channels = 3        # CFG acts on latent channels 0-2 only
    text_encoders = ("text_encoder",)

    def __init__(self, transformer: NextDiT, text_encoder: GemmaEncoder, tokenizer, vae: AutoencoderKL,
                 schedule: FlowMatchSchedule, vae_scale: float = SDXL_VAE_SCALE):
        self.transformer, self.text_encoder, self.tokenizer = transformer, text_encoder, tokenizer
        self.vae, self.schedule, self.vae_scale = vae, schedule, vae_scale

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    text_device: str | torch.device | None = None) -> "LuminaNextPipeline":
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
        schedule = (FlowMatchSchedule.from_config(read_json(scheduler_config), scheduler_config)
                    if scheduler_config.is_file() else FlowMatchSchedule())
        vae_config = parts["vae"] / "config.json"
        vae_scale = (read_json(vae_config).get("scaling_factor", SDXL_VAE_SCALE)
                     if vae_config.is_file() else SDXL_VAE_SCALE)
        return cls(transformer=load_nextdit(parts["transformer"], dtype=dtype, device=device),
                   text_encoder=load_gemma(parts["text_encoder"], dtype=dtype, device=text_device or device),
                   tokenizer=GemmaTokenizer(parts["tokenizer"]),
                   vae=load_vae(parts["vae"], dtype=torch.float32, device=device),
                   schedule=schedule, vae_scale=vae_scale)

    @classmethod
    def random(cls, seed: int = 0, layers: int | None = None) -> "LuminaNextPipeline":
        """A byte tokenizer, and a tiny NextDiT and Gemma (layers None), or NextDiT at the release's
        widths with `layers` layers beside a 2-layer Gemma of the real width."""
        generator = torch.Generator().manual_seed(seed)
        if layers is None:
            dit = NextDiTParams(dim=96, layers=2, heads=4, kv_heads=2, ffn_dim=256, caption_dim=64, adaln_dim=96,
                                base_tokens=4096)
            text = GemmaParams(vocab_size=ByteTokenizer.vocab_size, width=64, layers=3, heads=2, kv_heads=1,
                               head_dim=32, mlp_width=128)
            transformer, text_encoder = (randomized(NextDiT(dit), generator),
                                         randomized(GemmaEncoder(text), generator))
        else:
            text = GemmaParams(vocab_size=ByteTokenizer.vocab_size, width=2048, layers=2, heads=8, kv_heads=1,
                               head_dim=256, mlp_width=2048)
            transformer = randomized(NextDiT(NextDiTParams(layers=layers)), generator, 0.02, norms_near_one=True)
            text_encoder = randomized(GemmaEncoder(text), generator, 0.02, norms_near_one=True)
        return cls(transformer, text_encoder, ByteTokenizer(), tiny_random_vae(latent_channels=4, seed=seed),
                   FlowMatchSchedule())

    # ---- the steps of a generation ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    def check(self, settings: LuminaSettings, accelerated: bool) -> None:
        if accelerated and settings.solver != "euler":
            raise ValueError(f"AccelAes extrapolates Euler steps; --solver {settings.solver} runs only densely "
                             "(add --dense)")

    def encode(self, prompts: list[str], negative_prompts: list[str] | None,
               settings: LuminaSettings) -> TextConditioning:
        """Gemma layer -2 features of the prompts (lowercased and stripped, as diffusers), then (for
        CFG) of the negative prompts as given."""
        prompts = [p.lower().strip() for p in prompts]
        ids, mask = self.tokenizer(prompts, max_length=settings.max_sequence_length, pad_to_multiple_of=8)
        if negative_prompts is not None:
            negative_ids, negative_mask = self.tokenizer(negative_prompts, length=ids.shape[1])
            ids, mask = torch.cat([ids, negative_ids]), torch.cat([mask, negative_mask])
        text_device = self.text_encoder.embed_tokens.weight.device
        with torch.no_grad():
            features = self.text_encoder(ids.to(text_device), attention_mask=mask.to(text_device), layer=-2)
        return TextConditioning(features=features.to(self.device), mask=mask.to(self.device),
                                input_ids=ids.to(self.device))

    def precompute(self, text: TextConditioning) -> TextConditioning:
        """Every layer's caption keys / values: the same at every step, so computed once."""
        with torch.no_grad():
            return replace(text, caption_kv=self.transformer.caption_keys_values(text.features))

    def initial_noise(self, batch: int, height: int, width: int, seed: int | list[int],
                      text: TextConditioning) -> torch.Tensor:
        """Noise as diffusers draws it: CPU generator(s), the final shape, the text encoder's dtype."""
        shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
        return draw_noise(shape, seed, text.features.dtype).to(self.device)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                settings: LuminaSettings, size: tuple[int, int], *, probe=None, block_runner=None) -> torch.Tensor:
        """One model evaluation at timestep = sigma * 1000: d latents / d sigma of every row."""
        model_input = torch.cat([latents, latents]) if self.guided(settings) else latents
        # Lumina counts time from noise (0) to data (1): t = 1 - sigma, computed as diffusers does.
        t = 1 - timestep.to(torch.float32) / self.schedule.num_train_timesteps
        linear, ntk = time_aware_rope_factors(t.item(), *size, settings.scaling_watershed,
                                              self.transformer.params.base_image_size)
        with torch.no_grad():
            prediction = self.transformer(
                model_input, t.expand(model_input.shape[0]).to(self.device), text.features, text.mask,
                rope_linear_factor=linear, rope_ntk_factor=ntk, proportional_attn=settings.proportional_attn,
                probe=probe, block_runner=block_runner, caption_kv=text.caption_kv)[:, :LATENT_CHANNELS]
        return -prediction  # the model predicts data - noise = -d x / d sigma

    def sigmas(self, settings: LuminaSettings, size: tuple[int, int]) -> torch.Tensor:
        return self.schedule.with_shift(settings.shift).sigmas(settings.steps)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return decode_latents(self.vae, latents, self.vae_scale)

    def token_counts(self, text: str, settings: LuminaSettings) -> list[tuple[str, int, int]]:
        return [("Gemma", len(self.tokenizer.encode(text.lower().strip())) + 1, settings.max_sequence_length)]

    # ---- what AesMask reads ---------------------------------------------------------------------

    def prompt_words(self, prompts: list[str], text: TextConditioning, settings: LuminaSettings):
        """The word of each caption position of the prompts (not the negative prompts); Gemma's
        BOS and padding are special."""
        words = []
        for ids, mask in zip(text.input_ids[:len(prompts)].tolist(), text.mask[:len(prompts)].tolist()):
            names = self.tokenizer.id_to_piece(ids)
            words.append(key_words([name if keep and token != self.tokenizer.bos_id else None
                                    for name, token, keep in zip(names, ids, mask)], "sentencepiece"))
        return words

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        patch = self.transformer.params.patch_size
        return height // 8 // patch, width // 8 // patch
