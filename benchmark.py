"""How much faster AccelAes samples, measured honestly: every row runs in this one process, through
the same sampling loop (pipelines/sampling.py), the same weights and the same seed, timed after a
warm-up, as the median of repeated runs. The rows take turns (every row's first run, then every
row's second, ...), so a machine whose speed drifts while the table is made moves all rows alike.

    python benchmark.py                      # Lumina-Next widths, 1 layer, 512x512, 30 steps, CFG
    python benchmark.py --model sd3          # SD3-Medium widths, 1 block, 512x512, 28 steps, CFG
    python benchmark.py --model flux         # FLUX.1-dev widths, 1+1 blocks, 512x512, 28 steps
    python benchmark.py --layers 4 --repeats 5 --ablations --json results.json
    python benchmark.py --peers              # + the same weights in diffusers: dense, and its cache hooks
    python benchmark.py --compile            # + the dense and AccelAes rows again under torch.compile
    python benchmark.py --floor              # + our dense forward's matmuls and attention alone
    python benchmark.py --batch 4            # images per second at batch sizes 1, 2, 4, dense and AccelAes
    python benchmark.py --device cuda --layers full --size 1024 --dtype bf16    # the released depth, on a GPU

The transformer has the released widths (each pipeline's `random(layers=N)`: Lumina-Next-T2I
2304 wide, SD3-Medium 1536, FLUX.1 3072) with fewer layers and random weights, so it fits a
CPU; every layer costs the same, so the ratios of AccelAes' rows carry over to the full depth.
`--layers full` builds the released depth instead (Lumina-Next 24 layers, SD3-Medium 24 blocks,
FLUX.1 19 + 38), on the meta device and then with random weights drawn on the target device
itself: no copy of it is ever made on the CPU. The text encoders are small, with the output
widths and token counts the transformer reads (Lumina-Next: a 2-layer Gemma of the real width;
SD3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5 tokens); the VAE is a small random one. Text encoding
and decoding are reported apart, not in the speedup. With random weights the fidelity columns
test the machinery, not picture quality.

Columns: seconds of sampling (median), speedup over our dense row, the theoretical ratio (ours:
T / (dense + sparse x the FLOP ratio of a sparse evaluation); diffusers' cache hooks: the dense
run's Linear FLOPs over theirs, counted on every nn.Linear), model evaluations (ours: dense/
sparse/extrapolated; diffusers: calls and the share of dense Linear FLOPs they did), seconds
spent building the mask, peak memory of the run (the weights included: on CUDA the allocator's
max_memory_allocated, on the CPU the process's resident anonymous memory, sampled) and "+MB", its
excess over the run's start, and PSNR of the decoded image and relative L2 of the final latent
against our dense row.

--peers (diffusers installed, see benchmarking/peers.py) adds the same weights run by diffusers'
transformer classes through the same loop: dense, and each of diffusers' cache hooks that runs on
the backbone, at its documented defaults; the ones that cannot run are named with the reason.
With fewer layers than released, FirstBlockCache (which always computes its first block) saves
less than at full depth. --floor adds the floor (benchmarking/floor.py): the matrix products and
attention calls of our dense evaluation, replayed alone as many times as the dense row evaluates,
the time that an implementation of these FLOPs with torch's kernels cannot go below. --json
writes strict JSON (an infinite PSNR is null, with a note).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from accelaes import TOKEN_WEIGHTINGS, AccelAes, AccelAesConfig, SkipSparse, build_focus_mask
from benchmarking import floor
from benchmarking.measure import PeakMemory, TimedRow, clock, flop_counter, measure_interleaved, peak_megabytes
from pipelines import REGISTRY

PROMPT = "a highly detailed portrait of an old fisherman, dramatic lighting, cinematic"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sparse_flop_ratio(forward: Callable[[SkipSparse], object], grid: tuple[int, int], skip_ratio: float,
                      text_tokens: int = 0, batch: int = 2, sparse_ffn: bool = True) -> float:
    """Matmul FLOPs (attention's included) of a sparse evaluation over a dense one, counted by
    torch's FlopCounterMode (benchmarking.measure.flop_counter).

    forward(block_runner) runs one evaluation of the model (on the meta device it costs nothing:
    only shapes are computed). The focus set is an arbitrary one of the budget's size, with the
    first `text_tokens` of the blocks' sequence in it, as AccelAes builds it.
    """
    runner = SkipSparse(text_tokens, grid[0] * grid[1], sparse_ffn)
    with flop_counter() as dense:
        forward(runner)
    mask = build_focus_mask(torch.arange(grid[0] * grid[1], dtype=torch.float32)[None], grid, skip_ratio)
    device = next(iter(runner.increments.values())).device
    runner.set_focus(mask.focus.expand(batch, -1).to(device), mask.background.expand(batch, -1).to(device))
    runner.dense = False
    with flop_counter() as sparse:
        forward(runner)
    return sparse.get_total_flops() / dense.get_total_flops()


def benchmark_rows(defaults: AccelAesConfig, ablations: bool) -> dict[str, AccelAesConfig | None]:
    """The rows for a backbone whose AccelAes defaults are `defaults`: the full method where the
    backbone runs it (Lumina-Next), StepCache and StepCache + the spatial path where it keeps
    the spatial path an option (SD3, FLUX, as the paper does). --ablations adds SkipSparse on
    attention only (the paper's Table 7 "spatial only (attn)")."""
    step_cache = replace(defaults, sparse=False, spatial_cfg=False)
    if defaults.sparse:
        rows = {"dense": None, "StepCache only": step_cache, "spatial only": replace(defaults, step_cache=False),
                "AccelAes (full)": defaults}
    else:
        rows = {"dense": None, "StepCache only": step_cache, "StepCache + spatial": replace(defaults, sparse=True)}
    if ablations:
        rows.update({f"{name}, attn-only sparse": replace(config, sparse_ffn=False)
                     for name, config in list(rows.items()) if config is not None and config.sparse})
    return rows


# ---- building the pipeline --------------------------------------------------------------------

def materialise(factory: Callable[[], nn.Module], device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The module `factory` builds, built on the meta device (no memory), then given storage on
    `device` in `dtype` and random weights drawn there as pipelines/random_parts.py draws them
    (std 0.02; 1-D norm weights around 1): a full-size model never exists in fp32 on the CPU."""
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module.requires_grad_(False).eval()


def build_pipeline(backbone, layers: int | str | None, device: str, dtype: torch.dtype, seed: int = 0):
    """The backbone's random pipeline on `device`: tiny (layers None), the released widths with
    `layers` layers, or (layers "full") the released model, whose parameters' defaults are the
    release's, materialised on the device. Its text encoders and VAE are those of the 1-layer
    pipeline (the widths the transformer reads), whose own transformer is replaced."""
    pipeline = backbone.pipeline.random(seed=seed, layers=1 if layers == "full" else layers)
    if layers == "full":
        small = pipeline.transformer
        pipeline.transformer = materialise(lambda: type(small)(type(small.params)()), device, dtype, seed)
        del small
    return pipeline.to(device, dtype)


# ---- our rows ---------------------------------------------------------------------------------

def run_row(pipeline, config, settings, reference: "Reference"):
    """One timed sampling run: (seconds, final latents, the AccelAes state or None, its PeakMemory)."""
    accel = AccelAes.create(config) if config is not None else None
    generation = pipeline.prepare([PROMPT], seed=0, height=reference.size, width=reference.size, settings=settings,
                                  accelerator=accel)
    seconds, latents, memory = reference.timed(lambda: pipeline.denoise(generation, accel))
    return seconds, latents, accel, memory


def one_evaluation(pipeline, generation, block_runner=None) -> torch.Tensor:
    """One dense model evaluation of `generation` at a mid-schedule timestep: every step of a
    dense run has these shapes (what the FLOP ratio and the floor need)."""
    return pipeline.predict(generation.noise, torch.tensor(500.0), generation.text, generation.settings,
                            generation.size, block_runner=block_runner)


def flop_ratio(pipeline, generation, sparse_ffn: bool) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, counted on one real evaluation each."""
    height, width = generation.size
    return sparse_flop_ratio(partial(one_evaluation, pipeline, generation), pipeline.token_grid(height, width), 0.5,
                             text_tokens=pipeline.text_tokens(generation.text),
                             batch=2 if pipeline.guided(generation.settings) else 1, sparse_ffn=sparse_ffn)


class Reference:
    """Our dense row (its seconds, final latents and decoded image), which every row is compared
    with, and the measures every row takes: a timed run, its peak memory, the decoding."""

    def __init__(self, pipeline, size: int, device: str):
        self.pipeline, self.size, self.device = pipeline, size, device
        self.latents = self.image = self.seconds = None

    def timed(self, run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor, PeakMemory]:
        """(seconds, result, PeakMemory) of run(), the clock read once the device is done."""
        with PeakMemory(self.device) as memory:
            started = clock(self.device)
            result = run()
            seconds = clock(self.device) - started
        return seconds, result, memory

    @staticmethod
    def memory(memories: list[PeakMemory]) -> dict:
        """The largest of several runs' peaks and growths, in MB (None where unknown)."""
        return peak_megabytes(memories)

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        started = clock(self.device)
        image = self.pipeline.decode(latents, (self.size, self.size))
        return image, clock(self.device) - started

    def fidelity(self, latents: torch.Tensor, image: torch.Tensor) -> dict:
        """PSNR of the image (None when it equals the dense one: JSON has no infinity) and the
        relative L2 of the final latent, against our dense row."""
        mse = (image - self.image).pow(2).mean().item()
        psnr = None if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()
        reference = self.latents.float()
        return {"psnr_db": psnr, "psnr_note": "identical images: PSNR is infinite" if psnr is None else None,
                "latent_rel_l2": ((latents.float() - reference).norm() / reference.norm()).item()}


def our_rows(pipeline, rows: dict, settings, ratios: dict, reference: Reference, suffix: str = "") -> list[TimedRow]:
    """Our rows (name -> AccelAes config, None for dense) on `pipeline`; the warm-up is 8 steps
    with the mask and StepCache early enough to run every path."""
    warm = replace(settings, steps=8)
    return [TimedRow(name + suffix,
                     partial(run_row, pipeline, config and replace(config, warmup=2, mask_step=2), warm, reference),
                     partial(run_row, pipeline, config, settings, reference),
                     partial(our_summary, name + suffix, config, settings, ratios, reference))
            for name, config in rows.items()]


def our_summary(name: str, config, settings, ratios: dict, reference: Reference, runs: list[tuple]) -> dict:
    seconds = statistics.median(r[0] for r in runs)
    _, latents, accel, _ = runs[-1]
    image, decode_seconds = reference.decode(latents)
    if reference.latents is None:      # the first row of the table: our dense run
        reference.latents, reference.image, reference.seconds = latents, image, seconds
    stats = accel.stats if accel else None
    dense, sparse, skipped = (stats.dense, stats.sparse, stats.extrapolated) if stats else (settings.steps, 0, 0)
    return {
        "row": name, "kind": "ours", "seconds": seconds, "all_seconds": [r[0] for r in runs],
        "speedup": reference.seconds / seconds,
        "theoretical": settings.steps / (dense + sparse * ratios[config is None or config.sparse_ffn]),
        "evaluations": f"{dense}/{sparse}/{skipped}", "dense": dense, "sparse": sparse, "extrapolated": skipped,
        "mask_seconds": stats.mask_seconds if stats else 0.0,
        **reference.memory([r[3] for r in runs]),
        **reference.fidelity(latents, image), "decode_seconds": decode_seconds,
    }


# ---- the command line -------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REGISTRY), default="lumina-next",
                        help="which backbone's widths to measure (default: %(default)s)")
    parser.add_argument("--layers", type=layers_arg, default=1,
                        help="transformer layers / blocks (FLUX: double and single each), or 'full': the "
                             "released depth, built on the target device (default: 1)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random transformer instead of the released widths: checks the machinery in "
                             "seconds, measures nothing")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512: 1024 tokens)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 30 or 28)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is shown (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' precision (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--ablations", action="store_true",
                        help="add the paper's ablation rows: SkipSparse on attention only (--no-sparse-ffn)")
    parser.add_argument("--token-weighting", choices=TOKEN_WEIGHTINGS, default="aesthetic",
                        help="AesMask's token weights in every AccelAes row (the random text encoders make this "
                             "change the mask, not the speed; default: %(default)s)")
    parser.add_argument("--peers", action="store_true",
                        help="add the same weights run by diffusers: dense and with its cache hooks (needs diffusers)")
    parser.add_argument("--floor", action="store_true",
                        help="add the floor: our dense evaluation's matmuls and attention calls replayed alone, the "
                             "time no implementation of these FLOPs goes below with torch's kernels")
    parser.add_argument("--compile", action="store_true",
                        help="add the dense and AccelAes rows again with the transformer under torch.compile")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    parser.add_argument("--batch", type=int, default=None,
                        help="measure throughput instead: images per second, dense and with AccelAes (the "
                             "backbone's defaults), at batch sizes 1, 2, 4, ... up to this one")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size % 16 or args.size < 64:
        parser.error("--repeats must be at least 1, --size a multiple of 16 (at least 64)")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch {args.batch}: give at least 1")
    if args.tiny and args.layers == "full":
        parser.error("--tiny and --layers full contradict each other: choose one")
    if args.batch is not None and (args.peers or args.compile or args.floor):
        parser.error("--batch measures throughput alone: drop --peers, --compile and --floor")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def layers_arg(text: str) -> int | str:
    """--layers: a positive whole number, or 'full'."""
    if text == "full":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of layers (1 or more) nor 'full'")
    return int(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peers:
        try:
            from benchmarking import peers  # diffusers is imported there, and only there
            peers.import_diffusers()
        except ImportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    backbone = REGISTRY[args.model]
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    pipeline = build_pipeline(backbone, None if args.tiny else args.layers, args.device, DTYPES[args.dtype])
    settings = pipeline.resolve(backbone.pipeline.Settings())
    settings = replace(settings, steps=args.steps or settings.steps)
    tokens = pipeline.token_grid(args.size, args.size)
    depth = "tiny" if args.tiny else "released depth" if args.layers == "full" else f"{args.layers} layer(s)"
    print(f"{pipeline.title} {'tiny' if args.tiny else 'widths'}, {depth}, {args.size}x{args.size} "
          f"({tokens[0] * tokens[1]} tokens), {settings.steps} steps, guidance {settings.guidance}, {args.dtype}, "
          f"on {device_name}", file=sys.stderr)
    report = {"model": args.model, "device": device_name, "layers": "tiny" if args.tiny else args.layers,
              "size": args.size, "steps": settings.steps, "dtype": args.dtype, "repeats": args.repeats}
    config = AccelAesConfig(**backbone.accelaes, token_weighting=args.token_weighting)
    if args.batch is not None:
        report["throughput"] = throughput(pipeline, config, settings, args.size, args.device, args.batch, args.repeats)
        print_throughput(report["throughput"])
    else:
        report.update(run_table(args, pipeline, settings, config))
        print_table(report["rows"])
        for skipped in report["peers_not_run"]:
            print(f"diffusers {skipped['row']}: not run: {skipped['reason']}")
        print(f"text encoding {report['text_seconds']:.2f} s and VAE decoding "
              f"{report['rows'][0]['decode_seconds']:.2f} s per image are not in the sampling seconds.")
    if args.json:
        write_json(args.json, report)
    return 0


def run_table(args, pipeline, settings, config: AccelAesConfig) -> dict:
    """Every row of the table, and what they share: our rows, then the compiled ones, diffusers',
    and the floor."""
    started = clock(args.device)
    generation = pipeline.prepare([PROMPT], seed=0, height=args.size, width=args.size, settings=settings)
    text_seconds = clock(args.device) - started
    ratios = {sparse_ffn: flop_ratio(pipeline, generation, sparse_ffn) for sparse_ffn in (True, False)}
    print(f"a sparse evaluation does {ratios[True]:.1%} of a dense one's matmul FLOPs "
          f"({ratios[False]:.1%} with attention-only SkipSparse)", file=sys.stderr)
    reference = Reference(pipeline, args.size, args.device)
    rows = our_rows(pipeline, benchmark_rows(config, args.ablations), settings, ratios, reference)
    if args.compile:
        # The same weights under torch.compile, in a second pipeline object (compiled at the
        # first call of its warm-up), so that compiled and eager rows interleave.
        compiled = copy.copy(pipeline)
        compiled.transformer = torch.compile(pipeline.transformer)
        rows += our_rows(compiled, {"dense": None, "AccelAes": config}, settings, ratios, reference,
                         suffix=" (compiled)")
    skipped = []
    if args.peers:
        from benchmarking import peers
        peer_rows, skipped = peers.rows(pipeline, args.model, generation, reference)
        rows += peer_rows
    if args.floor:
        rows.append(floor.row(partial(one_evaluation, pipeline, generation), settings.steps, reference))
    rows = measure_interleaved(rows, args.repeats)
    return {"text_seconds": text_seconds, "sparse_flop_ratio": ratios[True], "attention_only_flop_ratio": ratios[False],
            "rows": rows, "peers_not_run": skipped}


def write_json(path: Path, report: dict) -> None:
    """Strict JSON: allow_nan=False refuses NaN and infinity, which JSON does not have (an infinite
    PSNR is written as null, with a note), so a mistake fails here instead of in a reader."""
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


# Distinct prompts, so that each sample of a batch builds its own mask.
BATCH_PROMPTS = (PROMPT, "a lighthouse at dusk, oil painting", "a red fox in snow, soft bokeh",
                 "a cinematic photo of an owl", "a bowl of fruit on a wooden table", "a city street at night, rain")


def batch_sizes(largest: int) -> list[int]:
    """1, 2, 4, ... below `largest`, then `largest`."""
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    return sizes + [largest] if largest > 1 else sizes


def run_batch(pipeline, prompts: list[str], config: AccelAesConfig | None, settings, size: int,
              device: str) -> tuple[float, int]:
    """One timed sampling run of a batch, prompt b with seed b: (seconds, its PeakMemory)."""
    accel = AccelAes.create(config) if config is not None else None
    generation = pipeline.prepare(prompts, seed=list(range(len(prompts))), height=size, width=size,
                                  settings=settings, accelerator=accel)
    with PeakMemory(device) as memory:
        started = clock(device)
        pipeline.denoise(generation, accel)
        seconds = clock(device) - started
    return seconds, memory


def throughput(pipeline, config: AccelAesConfig, settings, size: int, device: str, largest: int,
               repeats: int) -> list[dict]:
    """Images per second of sampling (text encoding and decoding apart, as in the main table),
    dense and with AccelAes, at each batch size: the median of `repeats` timed runs after an
    untimed one, the rows taking turns as in the main table (measure_interleaved); each sample
    of a batch has its own prompt and seed."""
    rows = []
    for batch in batch_sizes(largest):
        prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(batch)]
        for name, row_config in {"dense": None, "AccelAes": config}.items():
            run = partial(run_batch, pipeline, prompts, row_config, settings, size, device)
            rows.append(TimedRow(f"batch {batch}, {name}", run, run, partial(throughput_summary, batch, name)))
    results = measure_interleaved(rows, repeats)
    for result in results:
        same_row = [r for r in results if r["row"] == result["row"] and r["batch"] == 1][0]
        dense = [r for r in results if r["row"] == "dense" and r["batch"] == result["batch"]][0]
        result["over_batch_1"] = result["images_per_second"] / same_row["images_per_second"]
        result["over_dense"] = result["images_per_second"] / dense["images_per_second"]
    return results


def throughput_summary(batch: int, name: str, runs: list[tuple]) -> dict:
    seconds = statistics.median(r[0] for r in runs)
    return {"batch": batch, "row": name, "seconds": seconds, "images_per_second": batch / seconds,
            **peak_megabytes([r[1] for r in runs])}


def print_throughput(results: list[dict]) -> None:
    print(f"{'batch':>5}  {'row':<10}{'seconds':>9}{'images/s':>10}{'vs dense':>10}{'vs batch 1':>12}{'peak MB':>9}")
    for r in results:
        print(f"{r['batch']:>5}  {r['row']:<10}{r['seconds']:>9.2f}{r['images_per_second']:>10.3f}"
              f"{r['over_dense']:>9.2f}x{r['over_batch_1']:>11.2f}x{_cell(r['peak_memory_mb'], '.0f', 9)}")


def _cell(value, form: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{form}}"


def print_table(results: list[dict]) -> None:
    print(f"{'row':<38}{'seconds':>9}{'speedup':>9}{'theory':>8}  {'evaluations':<22}{'mask s':>8}"
          f"{'peak MB':>9}{'+MB':>7}{'PSNR dB':>9}{'latent L2':>11}")
    for r in results:        # the floor row has no image: "-" in its fidelity columns
        psnr = "-" if "psnr_db" not in r else "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        theory = "-" if r["theoretical"] is None else f"{r['theoretical']:.2f}x"
        print(f"{r['row']:<38}{r['seconds']:>9.2f}{r['speedup']:>8.2f}x{theory:>8}  "
              f"{r['evaluations']:<22}{r['mask_seconds']:>8.3f}{_cell(r['peak_memory_mb'], '.0f', 9)}"
              f"{_cell(r['peak_growth_mb'], '.0f', 7)}{psnr:>9}{_cell(r.get('latent_rel_l2'), '.4f', 11)}")


if __name__ == "__main__":
    sys.exit(main())
