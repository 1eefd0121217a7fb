"""The LAION aesthetic predictor v2 (`sac+logos+ava1-l14-linearMSE.pth`), scores about 1-10.

An MLP on the L2-normalised image embedding of OpenAI's CLIP ViT-L/14 (`encode_image`: after
ln_post and the projection, 768-d). Its `simple_inference.py` builds

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
    Dropout(0.1), Linear(64, 16), Linear(16, 1)

with the ReLUs commented out, so at evaluation the head is one affine map 768 -> 1; its file
holds `layers.{0,2,4,6,7}.{weight,bias}` and nothing else. The head runs in float32 (the
reference casts the numpy-normalised embedding to a float tensor), whatever the tower's dtype.
Images go through OpenAI's `clip.load` transform (metrics/preprocess.py).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from models.checkpoint import Checkpoint, CheckpointError
from models.clip_vision import CLIPVisionModel, load_clip_vision

from .clip_features import unit
from .preprocess import preprocess_clip_openai

_LINEAR_INDICES = (0, 2, 4, 6, 7)  # the Sequential positions of the Linear layers; 1, 3, 5 are Dropouts


class AestheticHead(nn.Module):
    """The predictor's MLP, named as its file names it (`layers.N`)."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        d = list(sizes)  # 768, 1024, 128, 64, 16, 1 in the released file
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticHead:
    """The head from its .pth (a torch save of the state dict; storages on cuda:0 are mapped to the CPU)."""
    checkpoint = Checkpoint(path)
    expected = {f"layers.{i}.{kind}" for i in _LINEAR_INDICES for kind in ("weight", "bias")}
    if set(checkpoint.keys()) != expected:
        unexpected = sorted(set(checkpoint.keys()) - expected)[:3]
        missing = sorted(expected - set(checkpoint.keys()))[:3]
        raise CheckpointError(f"{path} is not the LAION aesthetic predictor's head (missing {missing}, "
                              f"unexpected {unexpected}); download sac+logos+ava1-l14-linearMSE.pth")
    shapes = [checkpoint.shape(f"layers.{i}.weight") for i in _LINEAR_INDICES]
    sizes = [shapes[0][1], *(shape[0] for shape in shapes)]
    if any(len(s) != 2 for s in shapes) or [s[1] for s in shapes] != sizes[:-1] or sizes[-1] != 1:
        raise CheckpointError(f"{path}: the head's layers do not chain into one score ({shapes}); "
                              "the file is damaged or of another predictor")
    head = AestheticHead(sizes)
    head.load_state_dict({key: checkpoint.read(key).float() for key in expected}, strict=True)
    return head.requires_grad_(False).eval()


class AestheticPredictor:
    def __init__(self, vision: CLIPVisionModel, head: AestheticHead, batch_size: int = 32):
        if vision.params.projection_dim != head.layers[0].in_features:
            raise CheckpointError(f"the aesthetic head reads {head.layers[0].in_features}-d embeddings but the CLIP "
                                  f"tower gives {vision.params.projection_dim}-d: it needs OpenAI's ViT-L/14")
        self.vision = vision
        self.head = head.to(vision.post_layernorm.weight.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B] float32 on the CPU: the predicted aesthetic score of each image."""
        weight = self.vision.post_layernorm.weight
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess_clip_openai(image) for image in images[start:start + self.batch_size]])
            embeds = self.vision(pixels.to(weight.device, weight.dtype)).projected
            scores.append(self.head(unit(embeds))[:, 0].cpu())
        return torch.cat(scores) if scores else torch.empty(0)


def load_aesthetic(head: str | os.PathLike, clip: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> AestheticPredictor:
    """`head`: `sac+logos+ava1-l14-linearMSE.pth`; `clip`: the folder `openai/clip-vit-large-patch14`
    (only its image tower is read)."""
    return AestheticPredictor(load_clip_vision(clip, dtype=dtype, device=device), load_aesthetic_head(head))
