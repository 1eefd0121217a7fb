"""Pictures as files: tensors to 8-bit RGB, PNGs written whole with their generation
parameters, and the focus-mask picture AccelAes' --save-mask writes."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image in [0, 1], [3, H, W], as 8-bit RGB (rounded as diffusers rounds)."""
    pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(np.ascontiguousarray(pixels))


def write_png(image: Image.Image, path: Path, parameters: dict) -> None:
    """Write the PNG whole, with `parameters` in its "parameters" text chunk: into a new file
    beside it, then an atomic rename, so a reader never sees half a file. The file gets the
    permissions any file the user creates gets (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def mask_picture(image: torch.Tensor, affinity: torch.Tensor, soft: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """Three panels: the picture [3, H, W], the attention map A [N] as a heat map over it, and
    the focus tokens (soft mask [N]) over it."""
    size = image.shape[1:]
    heat = affinity.view(1, 1, *grid).float().cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = F.interpolate(heat, size=size, mode="nearest")[0, 0]
    colour = torch.stack([(2 * heat).clamp(0, 1), (2 * heat - 1).clamp(0, 1), 0.25 * (1 - heat)])
    focus = F.interpolate(soft.view(1, 1, *grid).float().cpu(), size=size, mode="nearest")[0]
    picture = image.float().cpu()
    return to_pil(torch.cat([picture, 0.4 * picture + 0.6 * colour, picture * (0.25 + 0.75 * focus)], dim=2))
