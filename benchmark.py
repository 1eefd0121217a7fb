"""How much faster AccelAes samples, measured honestly: every row runs in this one process, through
the same sampling loop (LuminaNextPipeline.denoise), the same weights and the same seed, timed
after a warm-up, as the median of repeated runs.

    python benchmark.py                      # Lumina-Next widths, 1 layer, 512x512, 30 steps, CFG
    python benchmark.py --layers 4 --repeats 5 --json results.json

The transformer has the released Lumina-Next-T2I widths (2304 wide, 32 heads, 8 KV heads,
Gemma features 2048 wide) with fewer layers and random weights, so it fits a CPU; every layer
costs the same, so the ratios carry over to 24. The text encoder is a 1-layer Gemma of the
real width and the VAE a small random one: their time is reported apart, not in the speedup.
With random weights the fidelity columns test the machinery, not picture quality.

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

import torch
from torch.utils.flop_counter import FlopCounterMode

from accelaes import AccelAes, AccelAesConfig, SkipSparse, build_focus_mask
from models.gemma import GemmaEncoder, GemmaParams
from models.lumina_next import NextDiT, NextDiTParams
from models.lumina_pipeline import ByteTokenizer, LuminaNextPipeline, LuminaSettings
from models.sampling import FlowMatchSchedule
from models.vae import tiny_random_vae

PROMPT = "a highly detailed portrait of an old fisherman, dramatic lighting, cinematic"

ROWS = {  # name -> AccelAes settings (None: dense)
    "dense": None,
    "StepCache only": AccelAesConfig(sparse=False, spatial_cfg=False),
    "spatial only": AccelAesConfig(step_cache=False),
    "AccelAes (full)": AccelAesConfig(),
}


def build_pipeline(layers: int, device: str, dtype: torch.dtype) -> LuminaNextPipeline:
    generator = torch.Generator().manual_seed(0)

    def randomized(module):
        with torch.no_grad():
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.1 * noise if param.dim() == 1 and "norm" in name else 0.02 * noise)
        return module.requires_grad_(False).eval().to(device, dtype)

    transformer = randomized(NextDiT(NextDiTParams(layers=layers)))
    text_encoder = randomized(GemmaEncoder(GemmaParams(vocab_size=ByteTokenizer.vocab_size, width=2048, layers=2,
                                                       heads=8, kv_heads=1, head_dim=256, mlp_width=2048)))
    return LuminaNextPipeline(transformer, text_encoder, ByteTokenizer(), tiny_random_vae(4).to(device),
                              FlowMatchSchedule())


def sparse_flop_ratio(params: NextDiTParams, grid: tuple[int, int], text_tokens: int, skip_ratio: float) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, counted on the meta device (shapes only)."""
    with torch.device("meta"):
        model = NextDiT(params)
        x = torch.randn(2, params.in_channels, 2 * grid[0], 2 * grid[1])
        args = (x, torch.full((2,), 0.5), torch.randn(2, text_tokens, params.caption_dim),
                torch.ones(2, text_tokens, dtype=torch.bool))
        runner = SkipSparse()
        with FlopCounterMode(display=False) as dense:
            model(*args, block_runner=runner)
    mask = build_focus_mask(torch.rand(1, grid[0] * grid[1]), grid, skip_ratio)
    runner.set_focus(mask.focus.repeat(2, 1).to("meta"), mask.background.repeat(2, 1).to("meta"))
    runner.dense = False
    with torch.device("meta"), FlopCounterMode(display=False) as sparse:
        model(*args, block_runner=runner)
    return sparse.get_total_flops() / dense.get_total_flops()


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


def run_row(pipeline, config, settings, size, device):
    accel = AccelAes.create(config) if config is not None else None
    text, noise = pipeline.prepare([PROMPT], [""], seed=0, height=size, width=size, settings=settings,
                                   accelerator=accel)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        latents = pipeline.denoise(noise, text, settings, (size, size), accelerator=accel)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds, latents, accel, memory.bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="transformer layers (the release has 24; default: 1)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512: 1024 tokens)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is shown (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="weights' precision (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or args.size % 16 or args.size < 64:
        print("error: --layers and --repeats must be at least 1, --size a multiple of 16 (at least 64)",
              file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    pipeline = build_pipeline(args.layers, args.device, dtype)
    settings = LuminaSettings(steps=args.steps, guidance=4.0)
    grid = (args.size // 16, args.size // 16)
    print(f"Lumina-Next widths, {args.layers} layer(s), {args.size}x{args.size} ({grid[0] * grid[1]} tokens), "
          f"{args.steps} steps, CFG 4.0, {dtype}, on {device_name}", file=sys.stderr)

    started = time.perf_counter()
    text, _ = pipeline.prepare([PROMPT], [""], seed=0, height=args.size, width=args.size, settings=settings)
    text_seconds = time.perf_counter() - started
    flop_ratio = sparse_flop_ratio(pipeline.transformer.params, grid, text.features.shape[1],
                                   AccelAesConfig().skip_ratio)
    print(f"a sparse evaluation does {flop_ratio:.1%} of a dense one's matmul FLOPs", file=sys.stderr)

    warm = replace(settings, steps=8)  # every code path once, untimed
    for config in ROWS.values():
        run_row(pipeline, config and replace(config, warmup=2, mask_step=2), warm, args.size, args.device)

    results, dense_latents, dense_image = [], None, None
    for name, config in ROWS.items():
        runs = [run_row(pipeline, config, settings, args.size, args.device) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        _, latents, accel, _ = runs[-1]
        started = time.perf_counter()
        image = pipeline.decode(latents)
        decode_seconds = time.perf_counter() - started
        stats = accel.stats if accel else None
        dense, sparse, skipped = (stats.dense, stats.sparse, stats.extrapolated) if stats else (args.steps, 0, 0)
        if config is None:
            dense_seconds, dense_latents, dense_image = seconds, latents, image
        mse = (image - dense_image).pow(2).mean().item()
        results.append({
            "row": name, "seconds": seconds, "all_seconds": [r[0] for r in runs],
            "speedup": dense_seconds / seconds,
            "theoretical": args.steps / (dense + sparse * flop_ratio),
            "dense": dense, "sparse": sparse, "extrapolated": skipped,
            "mask_seconds": stats.mask_seconds if stats else 0.0,
            "peak_memory_mb": max(r[3] for r in runs) / 2 ** 20,
            "psnr_db": float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item(),
            "latent_rel_l2": ((latents.float() - dense_latents.float()).norm() / dense_latents.float().norm()).item(),
            "decode_seconds": decode_seconds,
        })
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr)

    header = (f"{'row':<17}{'seconds':>9}{'speedup':>9}{'theory':>8}  {'dense/sparse/extrap':<20}{'mask s':>8}"
              f"{'peak MB':>9}{'PSNR dB':>9}{'latent L2':>11}")
    print(header)
    for r in results:
        counts = f"{r['dense']}/{r['sparse']}/{r['extrapolated']}"
        print(f"{r['row']:<17}{r['seconds']:>9.2f}{r['speedup']:>8.2f}x{r['theoretical']:>7.2f}x  {counts:<20}"
              f"{r['mask_seconds']:>8.3f}{r['peak_memory_mb']:>9.0f}{r['psnr_db']:>9.2f}{r['latent_rel_l2']:>11.4f}")
    print(f"text encoding {text_seconds:.2f} s and VAE decoding {results[0]['decode_seconds']:.2f} s per image are "
          "not in the sampling seconds.")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "layers": args.layers, "size": args.size,
                                         "steps": args.steps, "dtype": str(dtype), "repeats": args.repeats,
                                         "sparse_flop_ratio": flop_ratio, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
