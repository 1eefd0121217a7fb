"""The one interface every backbone's pipeline implements, and the one `generate` they share.

sample.py, benchmark.py and the tests drive every backbone through `Pipeline` alone: they never
ask which backbone runs. A backbone brings its network (models/), a subclass of `Pipeline`
here (pipelines/), and one line in the registry (pipelines/__init__.py).

A generation, in `generate`:
    settings  = resolve(settings)                   variant defaults (FLUX dev / schnell)
    text      = encode(prompts, negatives)          model batch [cond rows; uncond rows] under CFG
    text      = precompute(text)                    what the transformer derives from it once
    noise     = initial_noise(..., seeds)           as diffusers draws it, so seeds match; one seed per sample
    accelerator.start(...)                          AccelAes, if any: prompt words, token grid, rows
    latents   = sample_flow(noise, sigmas, predict, guide)      pipelines/sampling.py
    images    = decode(latents)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .sampling import BatchRows, cfg_negatives, check_size, classifier_free_guidance, sample_flow


class Pipeline(ABC):
    """A backbone's released components and how a prompt becomes an image."""

    title: ClassVar[str]                        # the name a user reads: "Lumina-Next"
    Settings: ClassVar[type]                    # dataclass with at least steps, guidance, shift
    classifier_free: ClassVar[bool] = True      # False: guidance-distilled (FLUX), one row per prompt
    guided_channels: ClassVar[int | None] = None   # CFG on the first channels only (Lumina-Next: 3)
    text_encoders: ClassVar[tuple[str, ...]] = ()  # the attributes holding the text encoders
    text_encoders_freed: bool = False              # True once `free_text_encoders` ran: `encode` cannot

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype, device: str | torch.device,
                    text_device: str | torch.device | None = None) -> "Pipeline":
        """The released weights as downloaded (weights.md); text_device: where the text encoders live."""

    @classmethod
    @abstractmethod
    def random(cls, seed: int = 0, layers: int | None = None) -> "Pipeline":
        """Random weights on the CPU in fp32: a tiny model that runs in seconds (layers None), or
        the transformer at the release's widths with `layers` layers (benchmark.py); the text
        encoders are always small, with the output widths the transformer reads."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the transformer runs, and the model batch lives."""

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "Pipeline":
        """Move the networks (the VAE stays fp32: the SDXL VAE overflows in half precision)."""
        for name, module in vars(self).items():
            if isinstance(module, torch.nn.Module):
                module.to(device, torch.float32 if name == "vae" else dtype)
        return self

    # ---- the steps of a generation --------------------------------------------------------------

    def resolve(self, settings) -> Any:
        """The settings with the defaults that depend on the loaded weights filled in."""
        return settings

    def check(self, settings, accelerated: bool) -> None:
        """Refuse settings this backbone cannot run (ValueError naming the fix)."""

    @abstractmethod
    def encode(self, prompts: list[str], negative_prompts: list[str] | None, settings) -> Any:
        """Text conditioning of the model batch: prompts, then negative prompts (when guided)."""

    def precompute(self, text) -> Any:
        """What the transformer derives from the text once per generation, before the first step
        (Lumina-Next: every layer's caption keys and values); the text as it is by default. Apart
        from `encode` so that an encode-first run keeps only the text encoders' output."""
        return text

    def free_text_encoders(self) -> None:
        """Drop the text encoders, to give their memory to the transformer once every prompt of a
        run is encoded (runs/: encode_first; FLUX-dev's T5 is 9.5 GB). `encode` cannot run after."""
        for name in self.text_encoders:
            setattr(self, name, None)
        self.text_encoders_freed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @abstractmethod
    def initial_noise(self, batch: int, height: int, width: int, seed: int | list[int], text) -> torch.Tensor:
        """Noise exactly as the reference pipeline draws it for `seed` (`draw_noise`)."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text, settings, size: tuple[int, int], *,
                probe=None, block_runner=None) -> torch.Tensor:
        """One model evaluation: d latents / d sigma of every row of the model batch, unguided."""

    @abstractmethod
    def sigmas(self, settings, size: tuple[int, int]) -> torch.Tensor:
        """steps + 1 sigmas from about 1 down to 0."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents to images in [0, 1], [B, 3, H, W], float32."""

    # ---- what AesMask reads -----------------------------------------------------------------

    @abstractmethod
    def prompt_words(self, prompts: list[str], text, settings) -> list[list[str | None]]:
        """Per prompt, the word of every text key the image attends to, in order (see
        pipelines/aesmask_inputs.py's key_words)."""

    @abstractmethod
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Image tokens (rows, cols) of an image of this size."""

    def text_tokens(self, text) -> int:
        """How many text tokens precede the image tokens in the blocks' sequence (joint attention)."""
        return 0

    def token_counts(self, text: str, settings) -> list[tuple[str, int, int]]:
        """(text encoder, tokens `text` takes there, tokens it keeps) for each text encoder."""
        return []

    def truncations(self, texts: list[str], settings) -> list[str]:
        """One note for each text a text encoder cuts, saying how many tokens it kept."""
        return [f"{encoder} keeps {kept} of the {tokens} tokens of {text[:40]!r}{'...' if len(text) > 40 else ''}"
                for text in dict.fromkeys(t for t in texts if t)
                for encoder, tokens, kept in self.token_counts(text, settings) if tokens > kept]

    def aesmask_clip(self) -> tuple[torch.nn.Module, Any] | None:
        """A CLIP ViT-L/14 text tower and its tokenizer this pipeline already holds (SD3, FLUX),
        for AesMask's phrase embedding; None when it must be given apart."""
        return None

    # ---- shared -----------------------------------------------------------------------------

    def guided(self, settings) -> bool:
        """Whether classifier-free guidance runs: two rows per prompt."""
        return self.classifier_free and settings.guidance > 1

    def guide(self, prediction: torch.Tensor, scale: torch.Tensor | None, settings) -> torch.Tensor:
        """The velocity of the latents from the model batch's predictions: CFG at `scale`
        (settings.guidance when None), or the prediction itself without CFG."""
        if not self.guided(settings):
            return prediction
        return classifier_free_guidance(prediction, settings.guidance if scale is None else scale,
                                        self.guided_channels)

    def prepare(self, prompts: list[str], negative_prompts: list[str] | None = None, *,
                seed: int | list[int] = 0, height: int = 1024, width: int = 1024, settings=None,
                accelerator=None, text=None) -> "Generation":
        """Everything before the first step: settings resolved and checked, the text encoded, the
        initial noise drawn, and the accelerator (AccelAes), if any, told the prompts' tokens,
        the token grid and the model batch's layout.

        seed: one per prompt (each sample's noise as if it were generated alone), or one for the
        whole batch (drawn from one generator, as diffusers does with one generator).
        text: `encode(prompts, cfg_negatives(prompts, negative_prompts, guided), settings)` done
        earlier with these settings, on this pipeline's device (`text_to`): an encode-first run
        (runs/runner.py); None: encoded here."""
        settings = self.resolve(settings or self.Settings())
        check_size(height, width, self.title)
        self.check(settings, accelerator is not None)
        check_seeds(seed, len(prompts))
        guided = self.guided(settings)
        if text is None:
            if self.text_encoders_freed:
                raise RuntimeError(f"the {self.title} text encoders were freed (encode-first): pass the text "
                                   "encoded before, prepare(..., text=...)")
            text = self.encode(prompts, cfg_negatives(prompts, negative_prompts, guided), settings)
        text = self.precompute(text)
        noise = self.initial_noise(len(prompts), height, width, seed, text)
        if accelerator is not None:
            grid = self.token_grid(height, width)
            accelerator.start(words=self.prompt_words(prompts, text, settings), grid=grid,
                              latent_size=tuple(noise.shape[2:]) if noise.dim() == 4 else grid,
                              steps=settings.steps, rows=BatchRows.cond_then_uncond(len(prompts), guided),
                              text_tokens=self.text_tokens(text))
        return Generation(text, noise, settings, (height, width))

    def denoise(self, generation: "Generation", accelerator=None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The sampling loop from the initial noise to the final latents (pipelines/sampling.py)."""
        text, settings, size = generation.text, generation.settings, generation.size
        return sample_flow(generation.noise, self.sigmas(settings, size),
                           partial(self.predict, text=text, settings=settings, size=size),
                           partial(self.guide, settings=settings), solver=getattr(settings, "solver", "euler"),
                           num_train_timesteps=self.schedule.num_train_timesteps, accelerator=accelerator,
                           progress=progress)

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, *,
                 seed: int | list[int] = 0, height: int = 1024, width: int = 1024, settings=None,
                 progress: Callable[[int, int], None] | None = None,
                 accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents, images in [0, 1]) for a batch of prompts; accelerator: AccelAes, if any."""
        generation = self.prepare(prompts, negative_prompts, seed=seed, height=height, width=width,
                                  settings=settings, accelerator=accelerator)
        latents = self.denoise(generation, accelerator, progress)
        return latents, self.decode(latents, generation.size)


@dataclass
class Generation:
    """One generation's inputs once prepared: what `denoise` integrates."""
    text: Any                  # the pipeline's text conditioning of the model batch
    noise: torch.Tensor        # the initial latents
    settings: Any              # resolved
    size: tuple[int, int]      # (height, width) in pixels


MAX_SEED = 2 ** 63   # seeds lie in [0, 2**63): non-negative, and a signed 64-bit integer anywhere


def check_seeds(seed: int | list[int], batch: int) -> None:
    """Refuse a seed list that does not give one seed to each prompt, and seeds out of range."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not isinstance(seed, int) and len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts: give one seed per prompt, or one for the batch")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SEED:
            raise ValueError(f"seed {value!r} is not a whole number from 0 to 2**63 - 1")


def draw_noise(shape: tuple[int, ...], seed: int | list[int], dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise [B, ...] from CPU generators, as diffusers draws it: for one seed,
    the whole batch from one generator; for a list, sample b from its own generator seeded
    seed[b], drawn [1, ...] (diffusers' list of generators), so each sample is the noise it would
    have alone and batching prompts changes no picture."""
    if isinstance(seed, int):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s), dtype=dtype)
                      for s in seed])


def text_to(text, device: str | torch.device):
    """A text conditioning (a pipeline's dataclass of tensors) with its tensors on `device`: an
    encode-first run keeps every batch's text on the CPU until its turn."""
    return replace(text, **{f.name: getattr(text, f.name).to(device) for f in fields(text)
                            if torch.is_tensor(getattr(text, f.name))})


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """Images in [0, 1], [B, 3, H, W], float32: the VAE (fp32) decodes latents / scale + shift."""
    with torch.no_grad():
        images = vae.decode(latents.to(torch.float32) / scale + shift)
    return (images.float() / 2 + 0.5).clamp(0, 1)


def clip_and_t5_token_counts(clip_tokenizer, t5_tokenizer, text: str, t5_tokens: int) -> list[tuple[str, int, int]]:
    """SD3's and FLUX's text encoders: CLIP (77 tokens) and T5 (`t5_tokens`, EOS included)."""
    return [("CLIP", clip_tokenizer.length(text), clip_tokenizer.max_length),
            ("T5", len(t5_tokenizer.encode(text)) + 1, t5_tokens)]

