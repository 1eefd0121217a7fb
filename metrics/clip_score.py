"""CLIP score, as torchmetrics' CLIPScore defines it (default model: OpenAI's ViT-L/14).

Per image-prompt pair: 100 * cos(image embedding, prompt embedding), the embeddings being
transformers' get_image_features / get_text_features. torchmetrics reports max(mean, 0) over a
set: the clamp acts on the mean, not on each pair, so the per-pair values here are not clamped
(a paired difference needs them as they are); `clip_score_of_set` gives torchmetrics' number.

Images go through transformers' CLIPImageProcessor (PIL backend), as torchmetrics passes them
to CLIPProcessor. One deviation: a prompt longer than 75 tokens is cut to 75 and keeps its
end-of-text token (see metrics/clip_features.py), where torchmetrics cuts the ids at 77 and
pools wherever the largest id falls.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image

from .clip_features import CLIPEmbedder, load_clip_embedder
from .preprocess import preprocess_clip_transformers


class CLIPScore:
    def __init__(self, embedder: CLIPEmbedder):
        self.embedder = embedder

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B]: 100 * cos per pair, not clamped."""
        return 100 * self.embedder.cosine(images, prompts)


def load_clip_score(weights: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CLIPScore:
    """`weights`: the transformers folder `openai/clip-vit-large-patch14` (config.json,
    model.safetensors, vocab.json, merges.txt), or any CLIP file with `tokenizer` beside it."""
    return CLIPScore(load_clip_embedder(weights, preprocess_clip_transformers, tokenizer, device, dtype))


def clip_score_of_set(scores: torch.Tensor | Sequence[float]) -> float:
    """torchmetrics' CLIPScore.compute(): max(mean of the per-pair scores, 0)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.numel() == 0:
        raise ValueError("no scores: a CLIP score needs at least one image-prompt pair")
    return max(scores.mean().item(), 0.0)
