"""sample.py's command line: its flags, and every check of them that can be made before a model
loads (cli/checks.py's UsageError: one line naming the flag or file, and the fix)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from accelaes import TOKEN_WEIGHTINGS, AccelAesConfig
from pipelines import REGISTRY
from pipelines.sampling import check_size
from runs import PromptFileError, make_jobs, read_prompts, seed_list

from .checks import UsageError, check_folder, check_number, check_text, check_writable_file, check_writable_folder

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


# Flags that set a field of the pipeline's settings; each applies to the backbones whose
# settings have that field.
SETTINGS_FLAGS = {"steps": "steps", "guidance": "guidance", "shift": "shift", "solver": "solver",
                  "max_sequence_length": "max_sequence_length", "scaling_watershed": "scaling_watershed",
                  "no_proportional_attn": "proportional_attn"}

# The range of every numeric flag (see cli.checks.check_number).
NUMBER_RANGES = {
    "seed": dict(at_least=0, below=2 ** 63), "steps": dict(at_least=1), "guidance": dict(at_least=0),
    "max_sequence_length": dict(at_least=1), "shift": dict(above=0), "scaling_watershed": dict(at_least=0, at_most=1),
    "threshold": dict(at_least=-1, at_most=1), "top_k": dict(at_least=1), "mask_step": dict(at_least=0),
    "record_every": dict(at_least=1), "skip_ratio": dict(above=0, below=1), "smooth_sigma": dict(at_least=0),
    "sparse_refresh": dict(at_least=0), "guidance_fg": dict(at_least=0), "guidance_bg": dict(at_least=0),
    "warmup": dict(at_least=2), "interval": dict(at_least=1), "images_per_prompt": dict(at_least=1),
    "batch_size": dict(at_least=1),
}
PROMPT_FILE_FLAGS = ("seeds", "images_per_prompt", "batch_size", "encode_first")

# AccelAes flags that only act when a part of the method runs (the rest would be ignored silently).
NEEDS = {
    "a focus mask (--sparse or --spatial-cfg)": ("threshold", "top_k", "token_weighting", "anchors", "clip",
                                                 "mask_step", "record_every", "skip_ratio", "smooth_sigma"),
    "SkipSparse (--sparse)": ("sparse_ffn", "sparse_refresh"),
    "spatial CFG (--spatial-cfg, with CFG on)": ("guidance_fg", "guidance_bg"),
    "StepCache (--step-cache)": ("warmup", "interval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate an image from a prompt. Without --weights, a small built-in model with "
                    "random weights runs instead (see weights.md for the real ones).")
    add_model_flags(parser)
    parser.add_argument("--prompt", default=None, help="what to draw (default: 'a photo of a cat')")
    parser.add_argument("--negative-prompt", default=None,
                        help="what to steer away from, through classifier-free guidance (default: empty)")
    parser.add_argument("--output", type=Path, default=None,
                        help="PNG file to write (default: outputs/sample.png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it already exists; with --prompts, make every image again")
    add_prompt_file_flags(parser.add_argument_group(
        "Many prompts (python sample.py --prompts FILE --output-dir DIR; under torchrun the processes share "
        "the work)"))
    add_generation_flags(parser)
    add_method_flags(parser.add_argument_group(
        "AccelAes (on by default; the defaults shown are Lumina-Next's: SD3 and FLUX run StepCache alone unless "
        "--sparse / --spatial-cfg is given)"))
    return parser


def add_model_flags(parser) -> None:
    """Which backbone runs and from which weights (sample.py and evaluate.py)."""
    parser.add_argument("--model", choices=sorted(REGISTRY), default="lumina-next",
                        help="which diffusion transformer to run (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder of released weights, as downloaded (see weights.md); omit it to run "
                             "the built-in random model")


def add_seed_flags(group) -> None:
    """The seeds of every prompt of a prompt file (sample.py --prompts and evaluate.py)."""
    group.add_argument("--seeds", default=None,
                       help="comma-separated seeds, e.g. 0,1,2: one image of every prompt for each (default: "
                            "--seed, or --images-per-prompt seeds from it)")
    group.add_argument("--images-per-prompt", type=int, default=None,
                       help="this many images of every prompt, seeds --seed, --seed + 1, ... (instead of "
                            "--seeds; default: 1)")


def add_prompt_file_flags(group) -> None:
    group.add_argument("--prompts", type=Path, default=None,
                       help="a text file with one prompt a line, or JSON Lines with prompt and optional "
                            "negative_prompt, seed, name; one PNG per (prompt, seed) in --output-dir")
    group.add_argument("--output-dir", type=Path, default=None,
                       help="folder of the PNGs and manifest.jsonl; a second run with the same arguments makes only "
                            "the images that are missing")
    add_seed_flags(group)
    group.add_argument("--batch-size", type=int, default=None,
                       help="prompts per model call; an image does not depend on it (default: 1)")
    group.add_argument("--encode-first", action="store_true", default=None,
                       help="encode every prompt first, then free the text encoders before the transformer runs "
                            "(FLUX-dev on a 24 GB GPU)")


# What shapes a generation: (flag, type or choices, default, help). None: the model's own.
GENERATION_FLAGS = [
    ("--seed", int, 0, "seed of the initial noise; the same seed gives the same image (default: 0)"),
    ("--steps", int, None, "sampling steps (default: the model's: 30 Lumina-Next, 28 SD3, 28 FLUX-dev, 4 FLUX-schnell)"),
    ("--guidance", float, None, "classifier-free guidance scale, 1 turns it off (default: the model's: 4.0 "
                                "Lumina-Next, 7.0 SD3); for FLUX-dev the distilled guidance it is given (3.5)"),
    ("--max-sequence-length", int, None, "text tokens of the prompt: Gemma's (Lumina-Next) or T5's (SD3, FLUX); "
                                         "longer prompts are cut, and said so (default: 256; FLUX-dev 512)"),
    ("--height", int, None, "image height in pixels, a multiple of 16 (default: 1024 with --weights, 256 for the "
                            "random model)"),
    ("--width", int, None, "image width in pixels, a multiple of 16 (default: as --height)"),
    ("--shift", float, None, "time shift of the noise schedule (default: the scheduler config's; without one 1.0 "
                             "for Lumina-Next, 3.0 for SD3; the official Lumina-T2X demo uses 4)"),
    ("--solver", ["euler", "midpoint"], None, "Lumina-Next: ODE solver; midpoint (the official demo's) costs two "
                                              "model calls a step (default: euler)"),
    ("--scaling-watershed", float, None, "Lumina-Next: time-aware RoPE scaling, linear before this t, NTK after "
                                         "(default: 1.0, diffusers'; the official code uses 0.3)"),
    ("--dtype", sorted(DTYPES), None, "precision of the transformer and text encoder; the VAE always runs in fp32 "
                                      "(default: bf16 on a GPU, fp32 on the CPU)"),
    ("--device", str, "cuda" if torch.cuda.is_available() else "cpu", "torch device to run on (default: cuda "
                                                                      "when there is one, else cpu)"),
    ("--text-device", str, None, "device of the text encoders, e.g. cpu to keep T5's 9.5 GB off the GPU "
                                 "(default: as --device)"),
]


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind, default, text in GENERATION_FLAGS:
        typed = {"choices": kind} if isinstance(kind, list) else {"type": kind}
        parser.add_argument(name, default=default, help=text, **typed)
    parser.add_argument("--no-proportional-attn", action="store_true", default=None,
                        help="Lumina-Next: turn off proportional attention (on by default, as in diffusers)")


def add_method_flags(method) -> None:
    """AccelAes' switches, and a flag for every field of AccelAesConfig (--no-X for switches that are on)."""
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


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_settings(args: argparse.Namespace):
    """The pipeline settings: the model's defaults, overridden by the flags given. A flag whose
    field this backbone's settings lack is refused, naming the backbones it applies to."""
    Settings = REGISTRY[args.model].pipeline.Settings
    given = {}
    for name, field in SETTINGS_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if field not in Settings.__dataclass_fields__:
            takers = [model for model, backbone in REGISTRY.items() if field in backbone.pipeline.Settings.__dataclass_fields__]
            raise UsageError(f"{flag(name)} applies to --model {' and '.join(takers)} only")
        given[field] = (not value) if name.startswith("no_") else value
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
    return config


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any model is loaded, so nothing is written half and no minutes of
    loading are lost to a typo."""
    settings, guided = check_generation(args)
    if args.prompts is None and args.output_dir is None:
        idle = [name for name in PROMPT_FILE_FLAGS if getattr(args, name) is not None]
        if idle:
            raise UsageError(f"{flag(idle[0])} acts only with --prompts FILE --output-dir DIR: add them or drop it")
        args.output = args.output or Path("outputs/sample.png")
        for path in [args.output, *extra_outputs(args)]:
            check_writable_file("--output", path, args.overwrite)
        args.prompt = args.prompt if args.prompt is not None else "a photo of a cat"
    else:
        args.jobs = prompt_file_jobs(args)
    check_method_flags(args, settings, guided)


def check_generation(args: argparse.Namespace) -> tuple[object, bool]:
    """What every tool that generates checks (sample.py, evaluate.py): text, numbers, the size
    (filling in its defaults), a negative prompt that needs CFG, the device, the folders. Returns
    the pipeline settings and whether CFG runs."""
    pipeline = REGISTRY[args.model].pipeline
    for name in ("prompt", "negative_prompt"):
        check_text(flag(name), getattr(args, name, None))
    for name, bounds in NUMBER_RANGES.items():
        check_number(flag(name), getattr(args, name, None), **bounds)
    args.height = args.height if args.height is not None else (1024 if args.weights else 256)
    args.width = args.width if args.width is not None else args.height
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    try:
        check_size(args.height, args.width, pipeline.title)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    settings = model_settings(args)
    guided = pipeline.classifier_free and settings.guidance > 1
    if args.negative_prompt and not guided:
        why = f"{pipeline.title} is guidance-distilled" if not pipeline.classifier_free else f"--guidance {settings.guidance} <= 1"
        raise UsageError(f"--negative-prompt acts through classifier-free guidance, which this run has not ({why}): "
                         "drop it")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {args.device} is not usable here ({str(error).splitlines()[0]}); "
                         "try --device cpu") from None
    check_folder("--weights", args.weights, "the folder of released weights listed in weights.md")
    check_folder("--clip", args.clip, "a CLIP ViT-L/14 text encoder folder (see weights.md)")
    return settings, guided


def parse_seeds(text: str | None) -> list[int] | None:
    """--seeds 0,1,2 as a list (None when not given)."""
    try:
        return None if text is None else [int(seed) for seed in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text}: give whole numbers separated by commas, e.g. 0,1,2") from None


def prompt_file_jobs(args: argparse.Namespace) -> list:
    """The jobs of a --prompts run, read and checked before any model loads."""
    if args.prompts is None or args.output_dir is None:
        raise UsageError("--prompts and --output-dir go together: give both")
    clashing = [name for name, given in (("--prompt", args.prompt is not None), ("--output", args.output is not None),
                                         ("--compare", args.compare), ("--save-mask", args.save_mask)) if given]
    if clashing:
        raise UsageError(f"{clashing[0]} works with one prompt, not with --prompts (evaluate.py compares a prompt "
                         "file dense against AccelAes): drop it")
    if args.seeds is not None and args.images_per_prompt is not None:
        raise UsageError("--seeds and --images-per-prompt both say which seeds to use: give one of them")
    seeds = parse_seeds(args.seeds)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir} is a file: give a folder")
    check_writable_folder("--output-dir", args.output_dir)
    try:
        return make_jobs(read_prompts(args.prompts), seed_list(seeds, args.images_per_prompt or 1, args.seed),
                         negative_prompt=args.negative_prompt or "")
    except PromptFileError:
        raise
    except ValueError as error:
        raise UsageError(f"--seeds: {error}") from None


def check_method_flags(args: argparse.Namespace, settings, guided: bool) -> None:
    """AccelAes' settings: valid for this run's steps, and none given that would do nothing."""
    given = [name for name in (*ACCELAES_HELP, "clip") if getattr(args, name) is not None]
    if args.dense:
        if given or args.compare or args.save_mask:
            extra = flag(given[0]) if given else "--compare" if args.compare else "--save-mask"
            raise UsageError(f"{extra} does nothing with --dense (AccelAes off): drop one of them")
        return
    config = accelaes_config(args)
    title = REGISTRY[args.model].pipeline.title
    if args.spatial_cfg and not guided:
        raise UsageError(f"--spatial-cfg needs classifier-free guidance, which this run has not ({title}, guidance "
                         f"{settings.guidance}): drop it")
    acting = {"a focus mask (--sparse or --spatial-cfg)": config.sparse or (config.spatial_cfg and guided),
              "SkipSparse (--sparse)": config.sparse,
              "spatial CFG (--spatial-cfg, with CFG on)": config.spatial_cfg and guided,
              "StepCache (--step-cache)": config.step_cache}
    for part, names in NEEDS.items():
        idle = [name for name in names if name in given]
        if idle and not acting[part]:
            raise UsageError(f"{flag(idle[0])} acts only with {part}, which this {title} run does not use: "
                             "drop it or turn that part on")
    if args.save_mask and not acting["a focus mask (--sparse or --spatial-cfg)"]:
        turned_off = [f"--no-{name.replace('_', '-')}" for name in ("sparse", "spatial_cfg") if getattr(args, name) is False]
        why = (f"{' and '.join(turned_off)} turned off what builds it" if turned_off else
               f"{title} runs StepCache alone by default")
        raise UsageError(f"--save-mask: this run builds no focus mask ({why}): add --sparse")
    if settings.steps is not None:  # FLUX's default depends on the variant: checked once it is loaded
        try:
            config.check(settings.steps)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if getattr(settings, "solver", "euler") != "euler":
        raise UsageError(f"--solver {settings.solver}: AccelAes extrapolates Euler steps; add --dense")


def extra_outputs(args: argparse.Namespace) -> list[Path]:
    """Files written beside --output."""
    stem = args.output.with_suffix("")
    return ([Path(f"{stem}-dense.png")] if args.compare else []) + ([Path(f"{stem}-mask.png")] if args.save_mask else [])
