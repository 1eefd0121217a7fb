"""Turn a prompt into a picture, accelerated by AccelAes (or densely with --dense).

    python sample.py --prompt "a lighthouse at dusk, oil painting" --weights Lumina-Next-SFT-diffusers

Without --weights this runs a small built-in model with RANDOM weights, to show the
machinery end to end in seconds; the picture is noise-like by design. weights.md says which
released files to download and how to point --weights at them.

--compare runs dense and AccelAes with the same seed and prints what each cost and how far
apart the pictures are; --save-mask writes AccelAes' focus mask beside the picture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from accelaes import TOKEN_WEIGHTINGS, AccelAes, AccelAesConfig
from models.checkpoint import CheckpointError
from models.clip import CLIPTokenizer, load_clip
from pipelines import REGISTRY
from pipelines.aesmask_inputs import clip_phrase_embedder
from pipelines.sampling import check_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Help for every field of AccelAesConfig: each becomes a flag (--no-X for switches that are on).
ACCELAES_HELP = {
    "anchors": "text file of aesthetic anchor phrases, one a line (default: the paper's 34)",
    "threshold": "least CLIP similarity to an anchor for a prompt word to count as aesthetic",
    "top_k": "at most this many aesthetic prompt words weight the attention map",
    "token_weighting": "which prompt tokens weight the attention map: the aesthetic words (the method), every "
                       "token (uniform) or every token but the aesthetic words (non-aesthetic); the last two "
                       "are the paper's Table 8 ablations",
    "mask_step": "step (from 0) whose dense evaluation records the attention and builds the mask",
    "record_every": "record every n-th cross-attention layer (1: all, as the paper)",
    "skip_ratio": "share of image tokens left in the background (not recomputed)",
    "smooth_sigma": "Gaussian smoothing of the attention map, in tokens (0: off)",
    "sparse": "compute only the focus tokens after the mask step (SkipSparse)",
    "sparse_ffn": "SkipSparse skips the FFN of background tokens too; --no-sparse-ffn runs it for every token "
                  "(the paper's 'spatial only (attn)' ablation)",
    "sparse_refresh": "run every n-th evaluation after the mask step densely to refresh the background (0: never)",
    "spatial_cfg": "guide focus and background tokens with their own scales (spatial CFG)",
    "guidance_fg": "guidance scale on focus tokens, with spatial CFG (default: the backbone's: 7.0 Lumina-Next, "
                   "9.0 SD3)",
    "guidance_bg": "guidance scale on background tokens, with spatial CFG (default: the backbone's: 1.0 "
                   "Lumina-Next, 2.0 SD3)",
    "step_cache": "extrapolate the prediction of skipped steps (StepCache)",
    "warmup": "steps computed before StepCache starts skipping",
    "interval": "after the warmup, compute every n-th step and extrapolate the others",
}


class UsageError(ValueError):
    """A mistake in the command line: the message names it and the fix."""


# Flags that set a field of the pipeline's settings; each applies to the backbones whose
# settings have that field.
SETTINGS_FLAGS = {"steps": "steps", "guidance": "guidance", "shift": "shift", "solver": "solver",
                  "max_sequence_length": "max_sequence_length", "scaling_watershed": "scaling_watershed",
                  "no_proportional_attn": "proportional_attn"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate an image from a prompt. Without --weights, a small built-in model with "
                    "random weights runs instead (see weights.md for the real ones).")
    parser.add_argument("--model", choices=sorted(REGISTRY), default="lumina-next",
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
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's: 30 Lumina-Next, 28 SD3, 28 FLUX-dev, "
                             "4 FLUX-schnell)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, 1 turns it off (default: the model's: 4.0 "
                             "Lumina-Next, 7.0 SD3); for FLUX-dev the distilled guidance it is given (3.5)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="text tokens of the prompt: Gemma's (Lumina-Next) or T5's (SD3, FLUX); longer "
                             "prompts are cut (default: 256; FLUX-dev 512)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels, a multiple of 16 (default: 1024 with --weights, "
                             "256 for the random model)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels, a multiple of 16 (default: as --height)")
    parser.add_argument("--shift", type=float, default=None,
                        help="time shift of the noise schedule (default: the scheduler config's; without one "
                             "1.0 for Lumina-Next, 3.0 for SD3; the official Lumina-T2X demo uses 4)")
    parser.add_argument("--solver", choices=["euler", "midpoint"], default=None,
                        help="Lumina-Next: ODE solver; midpoint (the official demo's) costs two model calls "
                             "a step (default: euler)")
    parser.add_argument("--scaling-watershed", type=float, default=None,
                        help="Lumina-Next: time-aware RoPE scaling, linear before this t, NTK after "
                             "(default: 1.0, diffusers'; the official code uses 0.3)")
    parser.add_argument("--no-proportional-attn", action="store_true", default=None,
                        help="Lumina-Next: turn off proportional attention (on by default, as in diffusers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="precision of the transformer and text encoder; the VAE always runs in fp32 "
                             "(default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: %(default)s)")
    parser.add_argument("--text-device", default=None,
                        help="device of the text encoders, e.g. cpu to keep T5's 9.5 GB off the GPU "
                             "(default: as --device)")
    method = parser.add_argument_group("AccelAes (on by default; the defaults shown are Lumina-Next's: SD3 "
                                       "and FLUX run StepCache alone unless --sparse / --spatial-cfg is given)")
    method.add_argument("--dense", action="store_true", help="turn AccelAes off: every step runs the whole model")
    method.add_argument("--compare", action="store_true",
                        help="run dense and AccelAes with the same seed, write both pictures (the dense one "
                             "as NAME-dense.png) and print their cost and PSNR")
    method.add_argument("--save-mask", action="store_true",
                        help="write the focus mask beside the picture as NAME-mask.png: the picture, the "
                             "attention heat map, and the focus tokens over the picture")
    method.add_argument("--clip", type=Path, default=None,
                        help="folder of a CLIP ViT-L/14 text encoder with its tokenizer, to find the aesthetic "
                             "words of the prompt (default: WEIGHTS/clip-vit-large-patch14 if there; without "
                             "it every prompt token weighs the same)")
    defaults = AccelAesConfig()
    for name, text in ACCELAES_HELP.items():
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if name == "anchors":
            method.add_argument(flag, type=Path, default=None, help=text)
        elif name == "token_weighting":
            method.add_argument(flag, choices=TOKEN_WEIGHTINGS, default=None, help=f"{text} (default: {default})")
        elif name in ("guidance_fg", "guidance_bg"):
            method.add_argument(flag, type=float, default=None, help=text)
        elif isinstance(default, bool):
            method.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {'on' if default else 'off'})")
        else:
            method.add_argument(flag, type=type(default), default=None, help=f"{text} (default: {default})")
    return parser


def model_settings(args: argparse.Namespace):
    """The pipeline settings: the model's defaults, overridden by the flags given. A flag whose
    field this backbone's settings lack is refused, naming the backbones it applies to."""
    Settings = REGISTRY[args.model].pipeline.Settings
    given = {}
    for flag, name in SETTINGS_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if name not in Settings.__dataclass_fields__:
            takers = [model for model, backbone in REGISTRY.items() if name in backbone.pipeline.Settings.__dataclass_fields__]
            raise UsageError(f"--{flag.replace('_', '-')} applies to --model {' and '.join(takers)} only")
        given[name] = (not value) if flag.startswith("no_") else value
    return replace(Settings(), **given)


def load_anchors(path: Path) -> tuple[str, ...]:
    """Anchor phrases from a text file, one a line (blank lines and # comments skipped)."""
    if path.is_dir():
        raise UsageError(f"--anchors {path} is a folder: give a text file with one phrase a line")
    if not path.is_file():
        raise UsageError(f"--anchors {path} does not exist: give a text file with one phrase a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--anchors {path} is not UTF-8 text: save it as UTF-8") from None
    anchors = tuple(phrase for phrase in (line.split("#", 1)[0].strip() for line in lines) if phrase)
    if not anchors:
        raise UsageError(f"--anchors {path} holds no phrase: write one phrase a line")
    return anchors


def accelaes_config(args: argparse.Namespace) -> AccelAesConfig:
    config = AccelAesConfig(**REGISTRY[args.model].accelaes)
    given = {name: getattr(args, name) for name in ACCELAES_HELP if name != "anchors"}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    if args.anchors is not None:
        config.anchors = load_anchors(args.anchors)
    steps = model_settings(args).steps
    if steps is not None:  # FLUX's default depends on the variant: checked once it is loaded
        config.check(steps)
    return config


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any work is done, so nothing is written half."""
    args.height = args.height or (1024 if args.weights else 256)
    args.width = args.width or args.height
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    pipeline = REGISTRY[args.model].pipeline
    try:
        check_size(args.height, args.width, pipeline.title)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: use at least 1")
    model_settings(args)
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
    if args.clip is not None and not args.clip.is_dir():
        raise UsageError(f"--clip {args.clip} is not a folder: give a CLIP ViT-L/14 text encoder folder "
                         "(see weights.md)")
    if args.dense and (args.compare or args.save_mask):
        raise UsageError("--dense runs no AccelAes: drop it to --compare or --save-mask")
    if not args.dense:
        try:
            config = accelaes_config(args)
        except ValueError as error:
            raise UsageError(str(error)) from None
        # Without CFG (FLUX) spatial CFG builds no mask.
        if args.save_mask and not (config.sparse or (config.spatial_cfg and pipeline.classifier_free)):
            raise UsageError(f"--save-mask: this run builds no mask ({pipeline.title} runs StepCache alone "
                             "by default); add --sparse")
        if args.solver not in (None, "euler"):
            raise UsageError(f"--solver {args.solver}: AccelAes extrapolates Euler steps; add --dense")
    for extra in extra_outputs(args):
        if extra.exists() and not args.overwrite:
            raise UsageError(f"{extra} already exists: pass --overwrite or choose another --output")


def extra_outputs(args: argparse.Namespace) -> list[Path]:
    """Files written beside --output."""
    stem = args.output.with_suffix("")
    return ([Path(f"{stem}-dense.png")] if args.compare else []) + ([Path(f"{stem}-mask.png")] if args.save_mask else [])


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


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio, in dB, of images in [0, 1]."""
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def mask_picture(image: torch.Tensor, accel: AccelAes) -> Image.Image:
    """Three panels: the picture, the attention heat map over it, the focus tokens over it."""
    mask = accel.mask
    size = image.shape[1:]
    heat = mask.affinity[0].view(1, 1, *mask.grid).float()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = torch.nn.functional.interpolate(heat, size=size, mode="nearest")[0, 0]
    colour = torch.stack([(2 * heat).clamp(0, 1), (2 * heat - 1).clamp(0, 1), 0.25 * (1 - heat)])
    focus = torch.nn.functional.interpolate(mask.soft[0].view(1, 1, *mask.grid).float(), size=size,
                                            mode="nearest")[0]
    picture = image.float().cpu()
    panels = [picture, 0.4 * picture + 0.6 * colour, picture * (0.25 + 0.75 * focus)]
    return to_pil(torch.cat(panels, dim=2))


def load_embedder(args: argparse.Namespace, pipeline):
    """The CLIP phrase embedder for AesMask: --clip, or the pipeline's own CLIP-L (SD3, FLUX), or
    a clip-vit-large-patch14/ folder in --weights; None (uniform token weights) without one."""
    folder = args.clip
    if folder is None and pipeline.aesmask_clip() is not None:
        return clip_phrase_embedder(*pipeline.aesmask_clip())
    if folder is None and args.weights is not None and (args.weights / "clip-vit-large-patch14").is_dir():
        folder = args.weights / "clip-vit-large-patch14"
    if folder is None:
        return None
    print(f"loading CLIP from {folder} for AesMask ...", file=sys.stderr)
    model = load_clip(folder, dtype=torch.float32, device=args.device)
    return clip_phrase_embedder(model, CLIPTokenizer.from_folder(folder))


def load_pipeline(args: argparse.Namespace):
    pipeline = REGISTRY[args.model].pipeline
    if args.weights is None:
        print(f"No --weights given: running a small built-in {pipeline.title} model with RANDOM weights, so the "
              "picture is noise. weights.md lists the released weights and where to download them.",
              file=sys.stderr)
        return pipeline.random(seed=0).to(args.device, DTYPES[args.dtype]), "built-in random model"
    print(f"loading {args.model} from {args.weights} ...", file=sys.stderr)
    return pipeline.from_folder(args.weights, DTYPES[args.dtype], args.device, text_device=args.text_device), args.model


def clock(device: str) -> float:
    """perf_counter once the device's queued work is done: CUDA runs asynchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(pipeline, args, settings, accel: AccelAes | None) -> tuple[torch.Tensor, float]:
    started = clock(args.device)
    _, images = pipeline.generate([args.prompt], [args.negative_prompt], seed=args.seed, height=args.height,
                                  width=args.width, settings=settings, progress=progress_bar, accelerator=accel)
    return images[0], clock(args.device) - started


def print_comparison(dense_seconds: float, fast_seconds: float, accel: AccelAes, quality: float, steps: int) -> None:
    stats = accel.stats
    rows = [("dense", dense_seconds, f"{steps}/0/0", 1.0, "-"),
            ("AccelAes", fast_seconds, f"{stats.dense}/{stats.sparse}/{stats.extrapolated}",
             dense_seconds / fast_seconds, f"{quality:.2f} dB")]
    print(f"{'run':<10}{'seconds':>9}  {'evaluations dense/sparse/extrapolated':<40}{'speedup':>8}  PSNR vs dense")
    for name, seconds, counts, speedup, db in rows:
        print(f"{name:<10}{seconds:>9.2f}  {counts:<40}{speedup:>7.2f}x  {db}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        started = time.perf_counter()
        pipeline, model = load_pipeline(args)
        settings = pipeline.resolve(model_settings(args))
        parameters = {"model": model, "weights": str(args.weights) if args.weights else None,
                      "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
                      "height": args.height, "width": args.width, "dtype": args.dtype, **settings.__dict__}
        accel = None if args.dense else AccelAes.create(accelaes_config(args), load_embedder(args, pipeline))
        if accel is not None:
            try:
                accel.config.check(settings.steps)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if args.compare:
            # One step first, so neither timed run pays the one-time start-up costs.
            pipeline.generate([args.prompt], [args.negative_prompt], height=args.height, width=args.width,
                              settings=replace(settings, steps=1))
        image, seconds = generate(pipeline, args, settings, accel)
        if accel is not None:
            for note in accel.notes:
                print(note, file=sys.stderr)
            print(f"AesMask: {accel.reports[0].describe()}", file=sys.stderr)
            if accel.guidance_map is not None:
                print(f"spatial CFG: {accel.config.guidance_fg} on focus tokens, {accel.config.guidance_bg} on the "
                      f"background (base scale {settings.guidance})", file=sys.stderr)
            print(f"AccelAes: {accel.stats.dense} dense, {accel.stats.sparse} sparse evaluations, "
                  f"{accel.stats.extrapolated} steps extrapolated ({seconds:.1f} s)", file=sys.stderr)
            parameters["accelaes"] = {"config": {k: v for k, v in accel.config.__dict__.items() if k != "anchors"},
                                      "evaluations": accel.stats.__dict__, "aesmask": accel.reports[0].describe()}
        else:
            parameters["accelaes"] = None
        if args.compare:
            dense_image, dense_seconds = generate(pipeline, args, settings, None)
            print_comparison(dense_seconds, seconds, accel, psnr(image, dense_image), settings.steps)
            write_png(to_pil(dense_image), extra_outputs(args)[0], {**parameters, "accelaes": None})
        if args.save_mask:
            write_png(mask_picture(image, accel), extra_outputs(args)[-1], parameters)
        write_png(to_pil(image), args.output, parameters)
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
