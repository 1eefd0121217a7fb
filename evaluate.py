"""Measure what the paper claims: dense and AccelAes images of a prompt file, scored and compared.

    python evaluate.py --weights Lumina-Next-SFT-diffusers --clip clip-vit-large-patch14 \\
        --prompts prompts/partiprompts-sample.txt --images-per-prompt 3 --output-dir eval/ \\
        --configs full,step-cache-only --clip-score-weights clip-vit-large-patch14 \\
        --aesthetic-head sac+logos+ava1-l14-linearMSE.pth --aesthetic-clip clip-vit-large-patch14

For every (prompt, seed) it makes the dense image and one image per AccelAes configuration, the
way `sample.py --prompts` makes them (runs/: batches, torchrun, resume), timed in the same
process; scores them with every metric whose weights are given (PSNR and SSIM against dense
always); and writes into the output folder:

    dense/, <config>/, <config>/masks/   the pictures (evaluation/generate.py)
    results.jsonl    one line per image pair: files, every score of both, differences, timings
    summary.json     the means, speedups and paired differences with their 95% intervals
    summary.md       the same as the paper's tables
    report.html      the tables, then every prompt's pictures side by side, largest differences first

Without --weights a small built-in model with RANDOM weights runs: the numbers then only show
that the machinery works. Every mistake that can be seen before a model loads is refused then,
in one line naming the flag or file and the fix (exit code 2), and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from cli.checks import UsageError, check_number, check_writable_folder
from cli.loading import load_embedder, load_pipeline
from cli.sample_args import add_generation_flags, add_model_flags, add_seed_flags, model_settings, parse_seeds
from cli.sample_args import check_generation as check_shared_generation
from evaluation.configs import CONFIGURATIONS, DENSE, Configuration, builds_mask, check_configuration, parse_configs
from evaluation.generate import RunSettings, generate_all
from evaluation.metric_flags import MetricPlan, add_metric_flags, check_metric_files, plan_metrics
from evaluation.report import SORT_ORDER, report_html, sort_metric
from evaluation.results import make_pairs, summarize
from evaluation.scoring import score_all
from evaluation.tables import markdown
from metrics.registry import METRICS
from pipelines import REGISTRY
from runs import Job, PromptFileError, data_parallel, make_jobs, read_prompts, seed_list
from runs.outputs import write_whole

ROOT = Path(__file__).resolve().parent
PROMPTS = ROOT / "prompts" / "partiprompts-sample.txt"
OUTPUTS = ("results.jsonl", "summary.json", "summary.md", "report.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate dense and AccelAes images of a prompt file, score them with the quality metrics "
                    "whose weights are given, and write results.jsonl, summary.json, summary.md and report.html. "
                    "Without --weights, a small built-in model with random weights runs.")
    parser.add_argument("--prompts", type=Path, default=PROMPTS,
                        help="prompt file: one prompt a line, or JSON Lines with prompt, negative_prompt, seed, name "
                             "(default: the 91 PartiPrompts shipped in prompts/)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/evaluate"),
                        help="folder of the pictures and the reports; a run into a folder of an earlier one "
                             "makes only the missing images (default: %(default)s)")
    add_model_flags(parser)
    parser.add_argument("--clip", type=Path, default=None,
                        help="folder of a CLIP ViT-L/14 text encoder with its tokenizer, for AesMask's aesthetic "
                             "words (default: WEIGHTS/clip-vit-large-patch14 if there; SD3 and FLUX use their own)")
    add_seed_flags(parser)
    parser.add_argument("--negative-prompt", default=None,
                        help="negative prompt of every prompt without its own (default: empty)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts through the model at a time (default: %(default)s)")
    parser.add_argument("--configs", default="full",
                        help="AccelAes configurations compared with dense, separated by commas: "
                             f"{', '.join(f'{c.name} ({c.title})' for c in CONFIGURATIONS.values())} "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="make every image again, instead of only those missing from --output-dir")
    parser.add_argument("--sort-by", choices=sorted(METRICS), default=None,
                        help="the metric report.html orders prompts by (default: the first that runs of "
                             f"{', '.join(SORT_ORDER)})")
    add_generation_flags(parser)
    add_metric_flags(parser.add_argument_group(
        "quality metrics (weights.md, Quality metrics); PSNR and SSIM against dense always run"))
    return parser


@dataclass(frozen=True)
class Request:
    """What the command line asks for, checked."""
    jobs: list[Job]
    seeds: list[int]
    configurations: list[Configuration]
    metrics: MetricPlan
    sort_by: str


def check_generation(args: argparse.Namespace) -> None:
    """The flags that shape an image, as sample.py checks them; and Euler, which AccelAes extrapolates."""
    check_shared_generation(args)
    check_number("--images-per-prompt", args.images_per_prompt, at_least=1)
    check_number("--batch-size", args.batch_size, at_least=1)
    settings = model_settings(args)
    if getattr(settings, "solver", "euler") != "euler":
        raise UsageError(f"--solver {settings.solver}: AccelAes extrapolates Euler steps; drop it")


def check_args(args: argparse.Namespace) -> Request:
    """Refuse bad input before any model is loaded: nothing is written, no minutes of loading lost."""
    check_generation(args)
    if args.seeds is not None and args.images_per_prompt is not None:
        raise UsageError("--seeds and --images-per-prompt both say how many seeds: give one of them")
    try:
        seeds = seed_list(parse_seeds(args.seeds), args.images_per_prompt or 1,
                          args.seed if args.seed is not None else 0)
        jobs = make_jobs(read_prompts(args.prompts), seeds, args.negative_prompt or "")
        configurations = parse_configs(args.configs)
        backbone, settings = REGISTRY[args.model], model_settings(args)
        guided = backbone.pipeline.classifier_free and settings.guidance > 1
        for configuration in configurations:
            check_configuration(configuration, backbone.accelaes, args.model, guided, settings.steps)
        metrics = plan_metrics(args)
        check_metric_files(metrics)
    except PromptFileError as error:
        raise UsageError(f"--prompts {error}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.sort_by is not None and args.sort_by not in metrics.files:
        raise UsageError(f"--sort-by {args.sort_by}: that metric does not run ({metrics.skipped.get(args.sort_by)}); "
                         f"give one that does: {', '.join(metrics.names)}")
    check_writable_folder("--output-dir", args.output_dir)
    return Request(jobs, seeds, configurations, metrics, sort_metric(metrics.names, args.sort_by))


def notes_of(args: argparse.Namespace, uniform_only: bool, skipped_images: int, world: int) -> list[str]:
    """What a reader of the numbers must know about this run."""
    notes = []
    if args.weights is None:
        notes.append("The built-in random model ran: the pictures are noise, and the numbers only show that the "
                     "machinery works (weights.md lists the released weights).")
    if uniform_only:
        notes.append("No CLIP text encoder for AesMask (--clip): every prompt token weighs the same, so full, "
                     "uniform-weights and non-aesthetic-weights make the same images.")
    if skipped_images:
        notes.append(f"{skipped_images} images were made by an earlier run into this folder: their seconds come "
                     "from that run (--overwrite makes and times every image in this one).")
    if world > 1:
        notes.append(f"Made by {world} processes (torchrun): each image is timed in the process that made it.")
    return notes


def facts_of(args: argparse.Namespace, request: Request, model: str, settings) -> dict:
    return {"model": args.model, "weights": str(args.weights) if args.weights else model,
            "prompt_file": str(args.prompts), "prompts": len({job.prompt_index for job in request.jobs}),
            "seeds": request.seeds, "height": args.height, "width": args.width, "dtype": args.dtype,
            "settings": asdict(settings),
            "configurations": {c.name: c.overrides for c in request.configurations}}


def generate(args: argparse.Namespace, request: Request) -> tuple[dict, list[str]] | None:
    """Every image of the run, in this process's share; (facts, notes) on the main process, else None."""
    backbone = REGISTRY[args.model]
    with data_parallel(args.device) as process:
        args.device = process.device
        pipeline, model = load_pipeline(args, say=process.main)
        settings = pipeline.resolve(model_settings(args))
        guided = pipeline.guided(settings)
        configs = {}
        for configuration in request.configurations:
            check_configuration(configuration, backbone.accelaes, args.model, guided, settings.steps)
            configs[configuration.name] = configuration.accelaes(backbone.accelaes)
        masked = any(builds_mask(config, guided) for config in configs.values())
        embed = load_embedder(args, pipeline) if masked else None
        prompts = list(dict.fromkeys(job.prompt for job in request.jobs))
        for note in pipeline.truncations(prompts, settings) if process.main else []:
            print(f"note: {note}", file=sys.stderr)
        run = RunSettings(settings, args.height, args.width, args.batch_size, args.overwrite,
                          {"model": model, "weights": str(args.weights) if args.weights else None,
                           "dtype": args.dtype}, process)
        summaries = generate_all(pipeline, request.jobs, args.output_dir, run, configs, embed)
        del pipeline
    if not process.main:
        return None
    skipped = sum(summary.skipped for summary in summaries.values())
    notes = notes_of(args, masked and embed is None, skipped, process.world)
    return facts_of(args, request, model, settings), notes


def run(args: argparse.Namespace, request: Request, written: list[Path]) -> None:
    made = generate(args, request)
    if made is None:       # another rank of a torchrun: rank 0 scores and writes the reports
        return
    facts, notes = made
    out = args.output_dir
    folders = [DENSE, *(c.name for c in request.configurations)]
    scores = score_all(request.metrics, request.jobs, out, folders, args.device)
    pairs = make_pairs(request.jobs, out, request.configurations, scores)
    summary = summarize(pairs, request.configurations, request.metrics.names, request.metrics.skipped, facts, notes)
    # allow_nan=False: JSON has no infinity (json_safe writes the PSNR of identical pictures as null)
    texts = {"results.jsonl": "".join(json.dumps(pair.record(), ensure_ascii=False, allow_nan=False) + "\n"
                                      for pair in pairs),
             "summary.json": json.dumps(summary.json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
             "summary.md": markdown(summary),
             "report.html": report_html(summary, pairs, request.sort_by)}
    for name in OUTPUTS:
        write_whole(out / name, texts[name].encode("utf-8"))
        written.append(out / name)
    print(markdown(summary))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started, written = time.perf_counter(), []
    try:
        request = check_args(args)
        run(args, request, written)
    except (ValueError, OSError) as error:   # UsageError, CheckpointError, OtherRunError are ValueErrors
        if isinstance(error, OSError):
            error = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: every image written so far is whole, and a rerun into {args.output_dir} makes only "
              "the missing ones", file=sys.stderr)
        return 130
    if written:
        print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
