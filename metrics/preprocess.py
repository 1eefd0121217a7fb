"""Images -> the pixels each metric's model reads, as each metric's reference code makes them.

Three references, three pipelines (all end in the OpenAI CLIP mean/std that OpenAI and LAION
towers share):

  - transformers' CLIPImageProcessor, PIL backend (CLIP score through torchmetrics, PickScore):
    resize the shortest side to 224 with PIL bicubic on uint8 (still uint8 after), center
    crop 224 with the offset rounded down, x/255, normalise.
  - OpenAI's `clip.load` transform (the LAION aesthetic predictor): the same resize (torchvision's
    Resize on a PIL image calls PIL with the same size), but torchvision's CenterCrop rounds the
    offset to nearest: a 97x133 image, resized to 224x307, is cropped from row 42, not 41.
  - HPS v2 (`light_augmentation`: open_clip's ResizeMaxSize): x/255 first, then scale the longest
    side to 224 with bicubic interpolation on the float tensor (antialiased, torchvision >= 0.17's
    default), pad with zeros (black) to 224x224 with the odd pixel at the right/bottom, normalise.

Every pipeline starts from an RGB image. An image with transparency is refused: the references
disagree on it (OpenAI drops alpha, transformers 5 composites onto white, HPS keeps 4 channels
and fails).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_SIZE = 224
# OpenAI's CLIP normalisation, also used by OpenCLIP for LAION's towers (open_clip constants.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; refuses transparency, on which the references disagree (see above)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        raise ValueError(f"the image has transparency (mode {image.mode}); the metrics' references treat it "
                         "differently: save the samples as RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def unit_pixels(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[3, H, W] in [0, 1]: uint8 / 255, as torchvision's ToTensor does."""
    array = np.asarray(rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(dtype) / 255


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, in the pixels' dtype."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean) / std


def resize_shortest_side(image: Image.Image, size: int = CLIP_SIZE) -> Image.Image:
    """Shortest side to `size`, the other truncated to int(size * long / short), PIL bicubic.

    transformers' get_resize_output_image_size and torchvision's Resize compute the same size.
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int, rounding: str) -> Image.Image:
    """A size x size crop from the middle. rounding "down": transformers' (margin // 2);
    "nearest": torchvision's int(round(margin / 2)), Python's round, so .5 goes to the even side."""
    width, height = image.size
    if rounding == "down":
        top, left = (height - size) // 2, (width - size) // 2
    elif rounding == "nearest":
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        raise ValueError(f"rounding must be 'down' or 'nearest', got {rounding!r}")
    return image.crop((left, top, left + size, top + size))


def preprocess_clip_transformers(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """[3, size, size] float32 as transformers' CLIPImageProcessor (PIL backend) makes it."""
    image = center_crop(resize_shortest_side(rgb(image), size), size, rounding="down")
    return normalize(unit_pixels(image))


def preprocess_clip_openai(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """[3, size, size] float32 as OpenAI's `clip.load(...)[1]` transform makes it (torchvision
    Resize, CenterCrop, ToTensor, Normalize on a PIL image)."""
    image = center_crop(resize_shortest_side(rgb(image), size), size, rounding="nearest")
    return normalize(unit_pixels(image))


def preprocess_hps(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """[3, size, size] float32 as HPS v2's evaluation transform makes it (open_clip's ResizeMaxSize).

    The reference skips the resize and the padding when the longest side is already `size`,
    which leaves a non-square image the ViT cannot read; it is padded here.
    """
    pixels = unit_pixels(image)
    height, width = pixels.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = (round(height * scale), round(width * scale))  # Python's round, as ResizeMaxSize
        pixels = F.interpolate(pixels[None], size=new_size, mode="bicubic", align_corners=False,
                               antialias=True)[0]
    pad_h, pad_w = size - pixels.shape[1], size - pixels.shape[2]
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # zeros: black
    return normalize(pixels)
