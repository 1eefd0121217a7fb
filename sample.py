"""Turn a prompt into a picture.

    python sample.py --prompt "a lighthouse at dusk, oil painting"

Without --weights this runs a small built-in model with RANDOM weights, to show the
machinery end to end in seconds; the picture is noise-like by design. weights.md says which
released files to download and how to point --weights at them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from models.checkpoint import CheckpointError
from models.vae import tiny_random_vae

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """A mistake in the command line: the message names it and the fix."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate an image from a prompt. Without --weights, a small built-in model with "
                    "random weights runs instead (see weights.md for the real ones).")
    parser.add_argument("--prompt", default="a photo of a cat",
                        help="what to draw (default: %(default)r)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder of released weights (see weights.md); omit it to run the built-in "
                             "random model")
    parser.add_argument("--output", type=Path, default=Path("outputs/sample.png"),
                        help="PNG file to write (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it already exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    parser.add_argument("--height", type=int, default=256, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision of the model weights (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: %(default)s)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any work is done, so nothing is written half."""
    for side in ("height", "width"):
        value = getattr(args, side)
        if value < 64 or value % 16:
            raise UsageError(f"--{side} {value}: use a multiple of 16, at least 64")
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output {args.output}: the image is written as PNG; name it *.png")
    if args.output.exists() and not args.overwrite:
        raise UsageError(f"{args.output} already exists: pass --overwrite or choose another --output")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {args.device} is not usable here ({str(error).splitlines()[0]}); "
                         "try --device cpu") from None
    if args.weights is not None and not args.weights.exists():
        raise UsageError(f"--weights {args.weights} does not exist: download the files listed in weights.md")


def to_pil(images: torch.Tensor) -> Image.Image:
    """A decoded image in [-1, 1], [1, 3, H, W], as 8-bit RGB."""
    pixels = ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()))


def write_png(image: Image.Image, path: Path, parameters: dict) -> None:
    """Write the PNG whole: to a temporary file beside it, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    handle, temporary = tempfile.mkstemp(suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def run_random_demo(args: argparse.Namespace) -> Image.Image:
    """Random latents through a small random VAE: proves the install and the output path."""
    generator = torch.Generator().manual_seed(args.seed)
    vae = tiny_random_vae(latent_channels=4, seed=args.seed).to(args.device, DTYPES[args.dtype])
    latents = torch.randn(1, 4, args.height // 8, args.width // 8, generator=generator)
    with torch.no_grad():
        images = vae.decode(latents.to(args.device, DTYPES[args.dtype]))
    return to_pil(images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        started = time.perf_counter()
        if args.weights is None:
            print("No --weights given: running a small built-in model with RANDOM weights, so the picture "
                  "is noise. weights.md lists the released weights and where to download them.",
                  file=sys.stderr)
            image = run_random_demo(args)
            model = "built-in random model"
        else:
            raise UsageError("--weights: no released pipeline is wired into sample.py yet; "
                             "run without --weights for the built-in random model")
        parameters = {"model": model, "prompt": args.prompt, "seed": args.seed,
                      "height": args.height, "width": args.width, "dtype": args.dtype}
        write_png(image, args.output, parameters)
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
