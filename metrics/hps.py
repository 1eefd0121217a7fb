"""HPS v2.1 (Human Preference Score): a whole OpenCLIP ViT-H/14 fine-tuned on human preferences.

As `hpsv2.score` computes it: the cosine of the L2-normalised image and prompt embeddings (no
logit_scale, no clamp), images through HPS's resize-longest-side-and-pad transform
(metrics/preprocess.py), prompts through open_clip's tokenizer. `hpsv2.score` returns the raw
cosine (about 0.2-0.35); HPS's benchmark tables print it times 100.

The checkpoint, `HPS_v2.1_compressed.pt`, is a torch save whose `state_dict` holds an
OpenCLIP model (`visual.*`, `transformer.*`, `token_embedding`, ..., `logit_scale`), read with
torch.load(weights_only=True). It carries no tokenizer: any CLIP tokenizer folder serves (the
BPE is CLIP's; open_clip pads with zeros where ours pads with the folder's pad token, which
the causal text tower never reads past end-of-text).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from models.checkpoint import CheckpointError

from .clip_features import CLIPEmbedder, load_clip_embedder
from .preprocess import preprocess_hps


class HPS:
    def __init__(self, embedder: CLIPEmbedder):
        self.embedder = embedder

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B]: cos per pair (x100 for HPS's tables)."""
        return self.embedder.cosine(images, prompts)


def load_hps(weights: str | os.PathLike, tokenizer: str | os.PathLike | None,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> HPS:
    """`weights`: `HPS_v2.1_compressed.pt` (HF `xswu/HPSv2`); `tokenizer`: a CLIP tokenizer folder
    (vocab.json + merges.txt or tokenizer.json, e.g. that of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`)."""
    if tokenizer is None:
        raise CheckpointError(f"HPS's checkpoint {Path(weights).name} has no tokenizer: also give a CLIP "
                              "tokenizer folder (e.g. that of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    return HPS(load_clip_embedder(weights, preprocess_hps, tokenizer, device, dtype))
