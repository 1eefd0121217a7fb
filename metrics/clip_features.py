"""A CLIP model with its tokenizer and its preprocessing: images and prompts -> unit embeddings.

CLIP score, HPS v2.1 and PickScore all compare L2-normalised image and prompt embeddings of a
CLIP model; they differ in the model, the image preprocessing and the scale of the cosine.

Prompts are tokenized as transformers' CLIPTokenizer with truncation does (models/clip.py):
start-of-text, at most 75 tokens, end-of-text. This is what PickScore (`truncation=True`) and
HPS (open_clip's `tokenize`, which also ends a cut caption with end-of-text) read; torchmetrics'
CLIP score cuts longer captions after 77 ids instead, losing their end-of-text token.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from PIL import Image

from models.clip import CLIPTokenizer
from models.clip_vision import CLIPModel, load_clip_model

Preprocess = Callable[[Image.Image], torch.Tensor]


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dimension, in float32; a zero vector stays zero (its norm counts as 1,
    as the aesthetic predictor's numpy `normalized` does)."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


class CLIPEmbedder:
    """Embeds images and prompts with one CLIP model; every embedding is unit length, float32."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, preprocess: Preprocess, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.batch_size = batch_size

    @property
    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.model.logit_scale
        return weight.device, weight.dtype

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, projection_dim], unit length."""
        device, dtype = self._device_and_dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[start:start + self.batch_size]])
            out.append(unit(self.model.image_embeds(pixels.to(device, dtype))))
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, projection_dim], unit length."""
        device, _ = self._device_and_dtype
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(list(prompts[start:start + self.batch_size]))
            out.append(unit(self.model.text_embeds(ids.to(device))))
        return torch.cat(out) if out else torch.empty(0)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B] float32 on the CPU: the cosine of image i and prompt i."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        return (self.images(images) * self.prompts(prompts)).sum(-1).cpu()


def load_clip_embedder(weights: str | os.PathLike, preprocess: Preprocess, tokenizer: str | os.PathLike | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                       batch_size: int = 32) -> CLIPEmbedder:
    """A CLIP model from `weights` (file or folder) and its tokenizer from the folder `tokenizer`
    (default: the weights folder, where transformers' CLIP repositories keep vocab.json/merges.txt)."""
    model = load_clip_model(weights, dtype=dtype, device=device)
    tokenizer = CLIPTokenizer.from_folder(tokenizer if tokenizer is not None else weights)
    return CLIPEmbedder(model, tokenizer, preprocess, batch_size)
