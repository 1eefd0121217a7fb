"""How much faster AccelAes samples, measured honestly: every row runs in this one process, through
the same sampling loop (pipelines/sampling.py), the same weights and the same seed, timed after a
warm-up, as the median of repeated runs.

    python benchmark.py                      # Lumina-Next widths, 1 layer, 512x512, 30 steps, CFG
    python benchmark.py --model sd3          # SD3-Medium widths, 1 block, 512x512, 28 steps, CFG
    python benchmark.py --model flux         # FLUX.1-dev widths, 1+1 blocks, 512x512, 28 steps
    python benchmark.py --layers 4 --repeats 5 --ablations --json results.json
    python benchmark.py --batch 4            # images per second at batch sizes 1, 2, 4, dense and AccelAes

The transformer has the released widths (each pipeline's `random(layers=N)`: Lumina-Next-T2I
2304 wide, SD3-Medium 1536, FLUX.1 3072) with fewer layers and random weights, so it fits a
CPU; every layer costs the same, so the ratios carry over to the full depth. The text encoders
are small, with the output widths and token counts the transformer reads (Lumina-Next: a
2-layer Gemma of the real width; SD3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5 tokens); the VAE
is a small random one. Text encoding and decoding are reported apart, not in the speedup. With
random weights the fidelity columns test the machinery, not picture quality.

Columns: seconds of sampling (median), speedup over dense, the schedule's theoretical ratio
T / (dense + sparse x the FLOP ratio of a sparse evaluation), evaluations dense/sparse/
extrapolated, seconds spent building the mask, peak memory above the start of the run, and
PSNR of the decoded image and relative L2 of the final latent against dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from accelaes import TOKEN_WEIGHTINGS, AccelAes, AccelAesConfig, SkipSparse, build_focus_mask
from pipelines import REGISTRY

PROMPT = "a highly detailed portrait of an old fisherman, dramatic lighting, cinematic"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sparse_flop_ratio(forward: Callable[[SkipSparse], object], grid: tuple[int, int], skip_ratio: float,
                      text_tokens: int = 0, batch: int = 2, sparse_ffn: bool = True) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, as torch's FlopCounterMode counts them.

    forward(block_runner) runs one evaluation of the model (on the meta device it costs nothing:
    only shapes are computed). The focus set is an arbitrary one of the budget's size, with the
    first `text_tokens` of the blocks' sequence in it, as AccelAes builds it.
    """
    runner = SkipSparse(text_tokens, grid[0] * grid[1], sparse_ffn)
    with FlopCounterMode(display=False) as dense:
        forward(runner)
    mask = build_focus_mask(torch.arange(grid[0] * grid[1], dtype=torch.float32)[None], grid, skip_ratio)
    device = next(iter(runner.increments.values())).device
    runner.set_focus(mask.focus.expand(batch, -1).to(device), mask.background.expand(batch, -1).to(device))
    runner.dense = False
    with FlopCounterMode(display=False) as sparse:
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


class PeakMemory:
    """Peak memory above the start of a block: the CUDA allocator's own count, or on the CPU the
    resident set sampled every few milliseconds."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, self._rss()) - self.start


def clock(device: str) -> float:
    """perf_counter once the device's queued work is done: CUDA runs asynchronously."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run_row(pipeline, config, settings, size, device):
    """One timed sampling run: (seconds, final latents, the AccelAes state or None, peak bytes)."""
    accel = AccelAes.create(config) if config is not None else None
    generation = pipeline.prepare([PROMPT], seed=0, height=size, width=size, settings=settings, accelerator=accel)
    with PeakMemory(device) as memory:
        started = clock(device)
        latents = pipeline.denoise(generation, accel)
        seconds = clock(device) - started
    return seconds, latents, accel, memory.bytes


def flop_ratio(pipeline, settings, size, sparse_ffn: bool) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, counted on one real evaluation each."""
    generation = pipeline.prepare([PROMPT], seed=0, height=size, width=size, settings=settings)
    batch = 2 if pipeline.guided(settings) else 1
    timestep = torch.tensor(500.0)
    forward = lambda runner: pipeline.predict(generation.noise, timestep, generation.text, settings,  # noqa: E731
                                              generation.size, block_runner=runner)
    return sparse_flop_ratio(forward, pipeline.token_grid(size, size), 0.5,
                             text_tokens=pipeline.text_tokens(generation.text), batch=batch, sparse_ffn=sparse_ffn)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REGISTRY), default="lumina-next",
                        help="which backbone's widths to measure (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=1,
                        help="transformer layers / blocks (FLUX: double and single each; default: 1)")
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
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    parser.add_argument("--batch", type=int, default=None,
                        help="measure throughput instead: images per second, dense and with AccelAes (the "
                             "backbone's defaults), at batch sizes 1, 2, 4, ... up to this one")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or args.size % 16 or args.size < 64:
        parser.error("--layers and --repeats must be at least 1, --size a multiple of 16 (at least 64)")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch {args.batch}: give at least 1")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    backbone = REGISTRY[args.model]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    layers = None if args.tiny else args.layers
    pipeline = backbone.pipeline.random(seed=0, layers=layers).to(args.device, DTYPES[args.dtype])
    settings = pipeline.resolve(backbone.pipeline.Settings())
    settings = replace(settings, steps=args.steps or settings.steps)
    rows = benchmark_rows(AccelAesConfig(**backbone.accelaes, token_weighting=args.token_weighting), args.ablations)
    tokens = pipeline.token_grid(args.size, args.size)
    print(f"{pipeline.title} {'tiny' if args.tiny else 'widths'}, {args.layers} layer(s), {args.size}x{args.size} ({tokens[0] * tokens[1]} tokens), "
          f"{settings.steps} steps, guidance {settings.guidance}, {args.dtype}, on {device_name}", file=sys.stderr)
    if args.batch is not None:
        config = AccelAesConfig(**backbone.accelaes, token_weighting=args.token_weighting)
        results = throughput(pipeline, config, settings, args.size, args.device, args.batch, args.repeats)
        print_throughput(results)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "device": device_name, "layers": args.layers,
                                             "size": args.size, "steps": settings.steps, "dtype": args.dtype,
                                             "repeats": args.repeats, "throughput": results}, indent=2))
        return 0

    started = clock(args.device)
    pipeline.prepare([PROMPT], seed=0, height=args.size, width=args.size, settings=settings)
    text_seconds = clock(args.device) - started
    ratios = {sparse_ffn: flop_ratio(pipeline, settings, args.size, sparse_ffn) for sparse_ffn in (True, False)}
    print(f"a sparse evaluation does {ratios[True]:.1%} of a dense one's matmul FLOPs "
          f"({ratios[False]:.1%} with attention-only SkipSparse)", file=sys.stderr)

    warm = replace(settings, steps=8)  # every code path once, untimed
    for config in rows.values():
        run_row(pipeline, config and replace(config, warmup=2, mask_step=2), warm, args.size, args.device)

    results = []
    for name, config in rows.items():
        runs = [run_row(pipeline, config, settings, args.size, args.device) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        _, latents, accel, _ = runs[-1]
        started = clock(args.device)
        image = pipeline.decode(latents, (args.size, args.size))
        decode_seconds = clock(args.device) - started
        stats = accel.stats if accel else None
        dense, sparse, skipped = (stats.dense, stats.sparse, stats.extrapolated) if stats else (settings.steps, 0, 0)
        if config is None:
            dense_seconds, dense_latents, dense_image = seconds, latents, image
        mse = (image - dense_image).pow(2).mean().item()
        results.append({
            "row": name, "seconds": seconds, "all_seconds": [r[0] for r in runs],
            "speedup": dense_seconds / seconds,
            "theoretical": settings.steps / (dense + sparse * ratios[config is None or config.sparse_ffn]),
            "dense": dense, "sparse": sparse, "extrapolated": skipped,
            "mask_seconds": stats.mask_seconds if stats else 0.0,
            "peak_memory_mb": max(r[3] for r in runs) / 2 ** 20,
            "psnr_db": float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item(),
            "latent_rel_l2": ((latents.float() - dense_latents.float()).norm() / dense_latents.float().norm()).item(),
            "decode_seconds": decode_seconds,
        })
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr)

    print_table(results)
    print(f"text encoding {text_seconds:.2f} s and VAE decoding {results[0]['decode_seconds']:.2f} s per image are "
          "not in the sampling seconds.")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": device_name, "layers": args.layers,
                                         "size": args.size, "steps": settings.steps, "dtype": args.dtype,
                                         "repeats": args.repeats, "sparse_flop_ratio": ratios[True],
                                         "attention_only_flop_ratio": ratios[False], "rows": results}, indent=2))
    return 0


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
    """One timed sampling run of a batch, prompt b with seed b: (seconds, peak bytes)."""
    accel = AccelAes.create(config) if config is not None else None
    generation = pipeline.prepare(prompts, seed=list(range(len(prompts))), height=size, width=size,
                                  settings=settings, accelerator=accel)
    with PeakMemory(device) as memory:
        started = clock(device)
        pipeline.denoise(generation, accel)
        seconds = clock(device) - started
    return seconds, memory.bytes


def throughput(pipeline, config: AccelAesConfig, settings, size: int, device: str, largest: int,
               repeats: int) -> list[dict]:
    """Images per second of sampling (text encoding and decoding apart, as in the main table),
    dense and with AccelAes, at each batch size: the median of `repeats` timed runs after one
    untimed run (the first, dropped); each sample of a batch has its own prompt and seed."""
    rows = {"dense": None, "AccelAes": config}
    results = []
    for batch in batch_sizes(largest):
        prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(batch)]
        for name, row_config in rows.items():
            runs = [run_batch(pipeline, prompts, row_config, settings, size, device) for _ in range(repeats + 1)][1:]
            seconds = statistics.median(r[0] for r in runs)
            results.append({"batch": batch, "row": name, "seconds": seconds, "images_per_second": batch / seconds,
                            "peak_memory_mb": max(r[1] for r in runs) / 2 ** 20})
            print(f"  batch {batch}, {name}: {seconds:.2f} s", file=sys.stderr)
    for result in results:
        same_row = [r for r in results if r["row"] == result["row"] and r["batch"] == 1][0]
        dense = [r for r in results if r["row"] == "dense" and r["batch"] == result["batch"]][0]
        result["over_batch_1"] = result["images_per_second"] / same_row["images_per_second"]
        result["over_dense"] = result["images_per_second"] / dense["images_per_second"]
    return results


def print_throughput(results: list[dict]) -> None:
    print(f"{'batch':>5}  {'row':<10}{'seconds':>9}{'images/s':>10}{'vs dense':>10}{'vs batch 1':>12}{'peak MB':>9}")
    for r in results:
        print(f"{r['batch']:>5}  {r['row']:<10}{r['seconds']:>9.2f}{r['images_per_second']:>10.3f}"
              f"{r['over_dense']:>9.2f}x{r['over_batch_1']:>11.2f}x{r['peak_memory_mb']:>9.0f}")


def print_table(results: list[dict]) -> None:
    print(f"{'row':<38}{'seconds':>9}{'speedup':>9}{'theory':>8}  {'dense/sparse/extrap':<20}{'mask s':>8}"
          f"{'peak MB':>9}{'PSNR dB':>9}{'latent L2':>11}")
    for r in results:
        counts = f"{r['dense']}/{r['sparse']}/{r['extrapolated']}"
        print(f"{r['row']:<38}{r['seconds']:>9.2f}{r['speedup']:>8.2f}x{r['theoretical']:>7.2f}x  {counts:<20}"
              f"{r['mask_seconds']:>8.3f}{r['peak_memory_mb']:>9.0f}{r['psnr_db']:>9.2f}{r['latent_rel_l2']:>11.4f}")


if __name__ == "__main__":
    sys.exit(main())
