"""Turn a prompt into a picture, accelerated by AccelAes (or densely with --dense).

    python sample.py --prompt "a lighthouse at dusk, oil painting" --weights Lumina-Next-SFT-diffusers

Without --weights this runs a small built-in model with RANDOM weights, to show the
machinery end to end in seconds; the picture is noise-like by design. weights.md says which
released files to download and how to point --weights at them.

--compare runs dense and AccelAes with the same seed and prints what each cost and how far
apart the pictures are; --save-mask writes AccelAes' focus mask beside the picture.

Every mistake that can be seen before a model loads is refused then, in one line naming the
flag or file and the fix (exit code 2), and nothing is written; files are written whole.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from accelaes import AccelAes, AestheticScorer
from cli.checks import UsageError
from cli.files import mask_picture, to_pil, write_png
from cli.loading import load_embedder, load_pipeline
from cli.sample_args import accelaes_config, build_parser, check_args, extra_outputs, model_settings
from metrics.fidelity import psnr
from runs import data_parallel, run_jobs

def progress_bar(done: int, total: int) -> None:
    """On a terminal, one line on stderr redrawn each step; in a log, a line every tenth of the run."""
    if sys.stderr.isatty():
        filled = 30 * done // total
        print(f"\rsampling [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="\n" if done == total else "",
              file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(f"sampling: step {done}/{total}", file=sys.stderr, flush=True)


def clock(device: str) -> float:
    """perf_counter once the device's queued work is done: CUDA runs asynchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(pipeline, args, settings, accel: AccelAes | None) -> tuple[torch.Tensor, float]:
    """One picture [3, H, W] and its seconds; refused when the run produced NaN or Inf."""
    started = clock(args.device)
    latents, images = pipeline.generate([args.prompt], [args.negative_prompt or ""], seed=args.seed,
                                        height=args.height, width=args.width, settings=settings,
                                        progress=progress_bar, accelerator=accel)
    if not (torch.isfinite(latents).all() and torch.isfinite(images).all()):
        cause = ("fp16 overflowed: try --dtype bf16 or --dtype fp32" if args.dtype == "fp16" else
                 f"the weights in {args.weights} hold NaN or Inf values: download them again (weights.md, "
                 "Troubleshooting)" if args.weights else "the model's numbers overflowed: try --dtype fp32")
        raise UsageError(f"the generation produced NaN or Inf values, so no picture was written: {cause}")
    return images[0], clock(args.device) - started


def print_comparison(dense_seconds: float, fast_seconds: float, accel: AccelAes, quality: float, steps: int) -> None:
    stats = accel.stats
    rows = [("dense", dense_seconds, f"{steps}/0/0", 1.0, "-"),
            ("AccelAes", fast_seconds, f"{stats.dense}/{stats.sparse}/{stats.extrapolated}",
             dense_seconds / fast_seconds, f"{quality:.2f} dB")]
    print(f"{'run':<10}{'seconds':>9}  {'evaluations dense/sparse/extrapolated':<40}{'speedup':>8}  PSNR vs dense")
    for name, seconds, counts, speedup, db in rows:
        print(f"{name:<10}{seconds:>9.2f}  {counts:<40}{speedup:>7.2f}x  {db}")


def report(accel: AccelAes, settings, seconds: float) -> dict:
    """Tell the user what AccelAes did; the PNG's record of it."""
    for note in accel.notes:
        print(note, file=sys.stderr)
    if accel.mask is not None:
        print(f"AesMask: {accel.reports[0].describe()}", file=sys.stderr)
    if accel.guidance_map is not None:
        print(f"spatial CFG: {accel.config.guidance_fg} on focus tokens, {accel.config.guidance_bg} on the "
              f"background (base scale {settings.guidance})", file=sys.stderr)
    print(f"AccelAes: {accel.stats.dense} dense, {accel.stats.sparse} sparse evaluations, "
          f"{accel.stats.extrapolated} steps extrapolated ({seconds:.1f} s)", file=sys.stderr)
    return {"config": {k: v for k, v in accel.config.__dict__.items() if k != "anchors"},
            "evaluations": accel.stats.__dict__, "aesmask": accel.reports[0].describe() if accel.mask else None}


def run(args: argparse.Namespace, written: list[Path]) -> None:
    pipeline, model = load_pipeline(args)
    settings = pipeline.resolve(model_settings(args))
    for note in pipeline.truncations([args.prompt, args.negative_prompt or ""], settings):
        print(f"note: {note}", file=sys.stderr)
    parameters = {"model": model, "weights": str(args.weights) if args.weights else None,
                  "prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "seed": args.seed,
                  "height": args.height, "width": args.width, "dtype": args.dtype, **settings.__dict__}
    accel = None if args.dense else AccelAes.create(accelaes_config(args), load_embedder(args, pipeline))
    if accel is not None:
        accel.config.check(settings.steps)
    if args.compare:  # one step first, so neither timed run pays the one-time start-up costs
        pipeline.generate([args.prompt], [args.negative_prompt or ""], height=args.height, width=args.width,
                          settings=replace(settings, steps=1))
    image, seconds = generate(pipeline, args, settings, accel)
    parameters["accelaes"] = None if accel is None else report(accel, settings, seconds)
    outputs = []
    if args.compare:
        dense_image, dense_seconds = generate(pipeline, args, settings, None)
        print_comparison(dense_seconds, seconds, accel, psnr(image[None], dense_image[None]).item(), settings.steps)
        outputs.append((to_pil(dense_image), {**parameters, "accelaes": None}))
    if args.save_mask:
        mask = accel.mask
        outputs.append((mask_picture(image, mask.affinity[0], mask.soft[0], mask.grid), parameters))
    for (picture, record), path in zip([(to_pil(image), parameters), *outputs], [args.output, *extra_outputs(args)]):
        write_png(picture, path, record)
        written.append(path)


def run_prompt_file(args: argparse.Namespace) -> None:
    """Every (prompt, seed) of --prompts into --output-dir, in batches, shared among torchrun's processes."""
    with data_parallel(args.device) as process:
        args.device = process.device
        pipeline, model = load_pipeline(args, say=process.main)
        settings = pipeline.resolve(model_settings(args))
        accelerator = None
        if not args.dense:
            config = accelaes_config(args)
            config.check(settings.steps)
            # One scorer for the run: the anchors are embedded once, not once per batch.
            scorer = AestheticScorer(load_embedder(args, pipeline), config.anchors, config.threshold, config.top_k,
                                     config.token_weighting)
            accelerator = lambda: AccelAes(config, scorer)  # noqa: E731
        summary = run_jobs(pipeline, args.jobs, args.output_dir, settings=settings, height=args.height,
                           width=args.width, batch_size=args.batch_size or 1, accelerator=accelerator,
                           encode_first=bool(args.encode_first), overwrite=args.overwrite,
                           parameters={"model": model, "weights": str(args.weights) if args.weights else None,
                                       "dtype": args.dtype}, process=process)
        label = f"rank {process.rank}: " if process.world > 1 else ""
        print(f"{label}{summary.describe()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started, written = time.perf_counter(), []
    try:
        check_args(args)
        if args.prompts is not None:
            run_prompt_file(args)
            return 0
        run(args, written)
    except (ValueError, OSError) as error:  # UsageError and CheckpointError are ValueErrors
        if isinstance(error, OSError):
            error = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = f"wrote {', '.join(map(str, written))}" if written else "nothing written"
        print(f"\ninterrupted: {done}", file=sys.stderr)
        return 130
    print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
