"""The one interface every backbone's pipeline implements, and the one `generate` they share.

sample.py, benchmark.py and the tests drive every backbone through `Pipeline` alone: they never
ask which backbone runs. A backbone brings its network (models/), a subclass of `Pipeline`
here (pipelines/), and one line in the registry (pipelines/__init__.py).

A generation, in `generate`:
    settings  = resolve(settings)                   variant defaults (FLUX dev / schnell)
    text      = encode(prompts, negatives)          model batch [cond rows; uncond rows] under CFG
    noise     = initial_noise(...)                  as diffusers draws it, so seeds match
    accelerator.start(...)                          AccelAes, if any: prompt words, token grid, rows
    latents   = sample_flow(noise, sigmas, predict, guide)      pipelines/sampling.py
    images    = decode(latents)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    @abstractmethod
    def initial_noise(self, batch: int, height: int, width: int, seed: int, text) -> torch.Tensor:
        """Noise exactly as the reference pipeline draws it for `seed`."""

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

    def prepare(self, prompts: list[str], negative_prompts: list[str] | None = None, *, seed: int = 0,
                height: int = 1024, width: int = 1024, settings=None, accelerator=None) -> "Generation":
        """Everything before the first step: settings resolved and checked, the text encoded, the
        initial noise drawn, and the accelerator (AccelAes), if any, told the prompts' tokens,
        the token grid and the model batch's layout."""
        settings = self.resolve(settings or self.Settings())
        check_size(height, width, self.title)
        self.check(settings, accelerator is not None)
        guided = self.guided(settings)
        text = self.encode(prompts, cfg_negatives(prompts, negative_prompts, guided), settings)
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

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, *, seed: int = 0,
                 height: int = 1024, width: int = 1024, settings=None,
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
