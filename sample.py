"""Turn a prompt into a picture.

    python sample.py --prompt "a lighthouse at dusk, oil painting" --weights Lumina-Next-SFT-diffusers

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
from models.lumina_pipeline import LuminaNextPipeline, LuminaSettings, check_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """A mistake in the command line: the message names it and the fix."""


def build_parser() -> argparse.ArgumentParser:
    defaults = LuminaSettings()
    parser = argparse.ArgumentParser(
        description="Generate an image from a prompt. Without --weights, a small built-in model with "
                    "random weights runs instead (see weights.md for the real ones).")
    parser.add_argument("--model", choices=["lumina-next"], default="lumina-next",
                        help="which diffusion transformer to run (default: %(default)s)")
    parser.add_argument("--prompt", default="a photo of a cat", help="what to draw (default: %(default)r)")
    parser.add_argument("--negative-prompt", default="",
                        help="what to steer away from, through classifier-free guidance (default: empty)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder of released weights, as downloaded (see weights.md); omit it to run "
                             "the built-in random model")
    parser.add_argument("--output", type=Path, default=Path("outputs/sample.png"),
                        help="PNG file to write (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial noise; the same seed gives the same image (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="sampling steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=defaults.guidance,
                        help="classifier-free guidance scale; 1 turns it off (default: %(default)s)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels, a multiple of 16 (default: 1024 with --weights, "
                             "256 for the random model)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels, a multiple of 16 (default: as --height)")
    parser.add_argument("--solver", choices=["euler", "midpoint"], default=defaults.solver,
                        help="ODE solver; midpoint (the official demo's) costs two model calls a step "
                             "(default: %(default)s)")
    parser.add_argument("--shift", type=float, default=None,
                        help="time shift of the noise schedule (default: the scheduler config's, 1.0 "
                             "without one; the official Lumina-T2X demo uses 4)")
    parser.add_argument("--scaling-watershed", type=float, default=defaults.scaling_watershed,
                        help="time-aware RoPE scaling: linear before this t, NTK after (default: %(default)s, "
                             "diffusers'; the official code uses 0.3)")
    parser.add_argument("--no-proportional-attn", action="store_true",
                        help="turn off proportional attention (on by default, as in diffusers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="precision of the transformer and text encoder; the VAE always runs in fp32 "
                             "(default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: %(default)s)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any work is done, so nothing is written half."""
    args.height = args.height or (1024 if args.weights else 256)
    args.width = args.width or args.height
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    try:
        check_size(args.height, args.width)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: use at least 1")
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output {args.output}: the image is written as PNG; name it *.png")
    if args.output.exists() and not args.overwrite:
        raise UsageError(f"{args.output} already exists: pass --overwrite or choose another --output")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {args.device} is not usable here ({str(error).splitlines()[0]}); "
                         "try --device cpu") from None
    if args.weights is not None and not args.weights.is_dir():
        raise UsageError(f"--weights {args.weights} is not a folder: download the files listed in weights.md "
                         "into one")


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image in [0, 1], [3, H, W], as 8-bit RGB (rounded as diffusers rounds)."""
    pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(np.ascontiguousarray(pixels))


def progress_bar(done: int, total: int) -> None:
    """A one-line bar on stderr, redrawn each step."""
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\rsampling [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)


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


def load_pipeline(args: argparse.Namespace) -> tuple[LuminaNextPipeline, str]:
    if args.weights is None:
        print("No --weights given: running a small built-in model with RANDOM weights, so the picture "
              "is noise. weights.md lists the released weights and where to download them.",
              file=sys.stderr)
        pipeline = LuminaNextPipeline.tiny_random(seed=0)
        pipeline.transformer.to(args.device, DTYPES[args.dtype])
        pipeline.text_encoder.to(args.device, DTYPES[args.dtype])
        pipeline.vae.to(args.device)
        return pipeline, "built-in random model"
    print(f"loading {args.model} from {args.weights} ...", file=sys.stderr)
    return LuminaNextPipeline.from_folder(args.weights, DTYPES[args.dtype], args.device), args.model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        started = time.perf_counter()
        pipeline, model = load_pipeline(args)
        settings = LuminaSettings(steps=args.steps, guidance=args.guidance, solver=args.solver, shift=args.shift,
                                  scaling_watershed=args.scaling_watershed,
                                  proportional_attn=not args.no_proportional_attn)
        _, images = pipeline.generate([args.prompt], [args.negative_prompt], seed=args.seed, height=args.height,
                                      width=args.width, settings=settings, progress=progress_bar)
        parameters = {"model": model, "weights": str(args.weights) if args.weights else None,
                      "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
                      "height": args.height, "width": args.width, "dtype": args.dtype, **settings.__dict__}
        write_png(to_pil(images[0]), args.output, parameters)
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
