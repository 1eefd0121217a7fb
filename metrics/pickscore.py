"""PickScore v1: a CLIP-H (transformers' layout) fine-tuned on Pick-a-Pic preferences.

As its README computes it: exp(logit_scale) * cos(image, prompt) with L2-normalised
get_image_features / get_text_features, images through transformers' CLIPImageProcessor
(PIL backend), prompts truncated to 77 tokens. The reported value is this unsoftmaxed score
(a softmax over the images of one prompt gives preference probabilities; not done here).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image

from .clip_features import CLIPEmbedder, load_clip_embedder
from .preprocess import preprocess_clip_transformers


class PickScore:
    def __init__(self, embedder: CLIPEmbedder):
        self.embedder = embedder

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B]: exp(logit_scale) * cos per pair."""
        scale = self.embedder.model.logit_scale.detach().float().exp().cpu()
        return scale * self.embedder.cosine(images, prompts)


def load_pickscore(weights: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> PickScore:
    """`weights`: the folder `yuvalkirstain/PickScore_v1` (config.json + model.safetensors).
    `tokenizer`: a CLIP tokenizer folder when the weights folder has none (the README takes the
    processor from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; every CLIP shares the BPE)."""
    return PickScore(load_clip_embedder(weights, preprocess_clip_transformers, tokenizer, device, dtype))
