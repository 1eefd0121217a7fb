"""How much faster AccelAes samples, measured honestly: every row runs in this one process, through
the same sampling loop (models/sampling.py), the same weights and the same seed, timed after a
warm-up, as the median of repeated runs.

    python benchmark.py                      # Lumina-Next widths, 1 layer, 512x512, 30 steps, CFG
    python benchmark.py --model sd3          # SD3-Medium widths, 1 block, 512x512, 28 steps, CFG
    python benchmark.py --model flux         # FLUX.1-dev widths, 1+1 blocks, 512x512, 28 steps
    python benchmark.py --layers 4 --repeats 5 --json results.json

The transformer has the released widths (Lumina-Next-T2I: 2304 wide, 32 heads, 8 KV heads,
Gemma features 2048 wide; SD3-Medium: 1536 wide, 24 heads, 77 + 256 text tokens 4096 wide)
with fewer layers and random weights, so it fits a CPU; every layer costs the same, so the
ratios carry over to the full depth. Lumina-Next's text encoder is a 2-layer Gemma of the real
width; SD3's text states are random (its three encoders would dwarf one block); the VAE is a
small random one. Text encoding and decoding are reported apart, not in the speedup. With
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

import torch

from accelaes import AccelAes, AccelAesConfig, sparse_flop_ratio
from models.flux import Flux, FluxParams, image_ids
from models.flux_pipeline import DEV_SCHEDULE, FluxConditioning, FluxPipeline, FluxSettings
from models.gemma import GemmaEncoder, GemmaParams
from models.lumina_next import NextDiT, NextDiTParams
from models.lumina_pipeline import ByteTokenizer, LuminaNextPipeline, LuminaSettings
from models.mmdit import MMDiT, MMDiTParams
from models.sampling import FlowMatchSchedule
from models.sd3_pipeline import SD3Conditioning, SD3Pipeline, SD3Settings
from models.vae import tiny_random_vae

PROMPT = "a highly detailed portrait of an old fisherman, dramatic lighting, cinematic"

def randomized(module, device, dtype, seed=0):
    """Random weights of a sensible scale: norms near 1, the rest small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.dim() == 1 and "norm" in name else 0.02 * noise)
    return module.requires_grad_(False).eval().to(device, dtype)


class LuminaBench:
    """Lumina-Next: the full method by default (the paper's spatial backbone)."""
    rows = {"dense": None,
            "StepCache only": AccelAesConfig(sparse=False, spatial_cfg=False),
            "spatial only": AccelAesConfig(step_cache=False),
            "AccelAes (full)": AccelAesConfig()}

    def __init__(self, layers, size, steps, device, dtype):
        text_encoder = GemmaEncoder(GemmaParams(vocab_size=ByteTokenizer.vocab_size, width=2048, layers=2, heads=8,
                                                kv_heads=1, head_dim=256, mlp_width=2048))
        self.pipeline = LuminaNextPipeline(randomized(NextDiT(NextDiTParams(layers=layers)), device, dtype),
                                           randomized(text_encoder, device, dtype), ByteTokenizer(),
                                           tiny_random_vae(4).to(device), FlowMatchSchedule())
        self.settings, self.size = LuminaSettings(steps=steps or 30, guidance=4.0), size
        self.description = f"Lumina-Next widths, {layers} layer(s)"

    def prepare(self, accel, settings):
        return self.pipeline.prepare([PROMPT], [""], seed=0, height=self.size, width=self.size, settings=settings,
                                     accelerator=accel)

    def denoise(self, text, noise, accel, settings):
        return self.pipeline.denoise(noise, text, settings, (self.size, self.size), accelerator=accel)

    def flop_ratio(self, text_tokens):
        params, grid = self.pipeline.transformer.params, (self.size // 16, self.size // 16)
        with torch.device("meta"):
            model = NextDiT(params)
            args = (torch.randn(2, 4, 2 * grid[0], 2 * grid[1]), torch.full((2,), 0.5),
                    torch.randn(2, text_tokens, params.caption_dim), torch.ones(2, text_tokens, dtype=torch.bool))
            return sparse_flop_ratio(lambda runner: model(*args, block_runner=runner), grid, 0.5)


class SD3Bench:
    """SD3: StepCache by default, the spatial path an option (the paper keeps SD3 on StepCache)."""
    rows = {"dense": None,
            "StepCache only": AccelAesConfig(sparse=False, spatial_cfg=False),
            "StepCache + spatial": AccelAesConfig(spatial_cfg=False)}
    text_tokens = 77 + 256

    def __init__(self, layers, size, steps, device, dtype):
        transformer = randomized(MMDiT(MMDiTParams(depth=layers, hidden=1536, heads=24)), device, dtype)
        self.pipeline = SD3Pipeline(transformer, None, None, None, None, None, None,
                                    tiny_random_vae(16).to(device), FlowMatchSchedule(shift=3.0))
        generator = torch.Generator().manual_seed(1)
        self.text = SD3Conditioning(torch.randn(2, self.text_tokens, 4096, generator=generator).to(device, dtype),
                                    torch.randn(2, 2048, generator=generator).to(device, dtype))
        self.settings, self.size = SD3Settings(steps=steps or 28, guidance=7.0), size
        self.description = f"SD3-Medium widths, {layers} block(s)"

    def prepare(self, accel, settings):
        noise = self.pipeline.initial_noise(1, self.size, self.size, 0, self.text.context.dtype)
        if accel is not None:  # random text states: every prompt token weighs the same
            words = [(["a</w>"] * 10 + [None] * 67, "bpe"), (["▁a"] * 10 + [None] * 246, "sentencepiece")]
            accel.start(segments=[([w], style) for w, style in words], grid=(self.size // 16, self.size // 16),
                        latent_size=tuple(noise.shape[2:]), steps=settings.steps, guided=True,
                        text_tokens=self.text_tokens)
        return self.text, noise

    def denoise(self, text, noise, accel, settings):
        return self.pipeline.denoise(noise, text, settings, accelerator=accel)

    def flop_ratio(self, text_tokens):
        params, grid = self.pipeline.transformer.params, (self.size // 16, self.size // 16)
        with torch.device("meta"):
            model = MMDiT(params)
            args = (torch.randn(2, 16, 2 * grid[0], 2 * grid[1]), torch.full((2,), 500.0),
                    torch.randn(2, text_tokens, 4096), torch.randn(2, 2048))
            return sparse_flop_ratio(lambda runner: model(*args, block_runner=runner), grid, 0.5,
                                     text_tokens=text_tokens)


class FluxBench:
    """FLUX.1-dev: StepCache by default, the spatial path an option; no CFG (guidance-distilled).
    --layers N builds N double and N single blocks."""
    rows = {"dense": None,
            "StepCache only": AccelAesConfig(sparse=False, spatial_cfg=False),
            "StepCache + spatial": AccelAesConfig(spatial_cfg=False)}
    text_tokens = 512

    def __init__(self, layers, size, steps, device, dtype):
        transformer = randomized(Flux(FluxParams(depth=layers, depth_single=layers)), device, dtype)
        self.pipeline = FluxPipeline(transformer, None, None, None, None, tiny_random_vae(16).to(device),
                                     DEV_SCHEDULE)
        generator = torch.Generator().manual_seed(1)
        self.text = FluxConditioning(torch.randn(1, self.text_tokens, 4096, generator=generator).to(device, dtype),
                                     torch.randn(1, 768, generator=generator).to(device, dtype))
        self.settings = FluxSettings(steps=steps or 28, max_sequence_length=self.text_tokens)
        self.size = size
        self.description = f"FLUX.1-dev widths, {layers} double + {layers} single block(s)"

    def prepare(self, accel, settings):
        noise = self.pipeline.initial_noise(1, self.size, self.size, 0, self.text.t5.dtype)
        if accel is not None:  # random text states: every prompt token weighs the same
            words = [["▁a"] * 10 + [None] * (self.text_tokens - 10)]
            grid = (self.size // 16, self.size // 16)
            accel.start(segments=[(words, "sentencepiece")], grid=grid, latent_size=grid, steps=settings.steps,
                        guided=False, text_tokens=self.text_tokens)
        return self.text, noise

    def denoise(self, text, noise, accel, settings):
        return self.pipeline.denoise(noise, text, settings, (self.size, self.size), accelerator=accel)

    def decode(self, latents):
        return self.pipeline.decode(latents, (self.size, self.size))

    def flop_ratio(self, text_tokens):
        params, grid = self.pipeline.transformer.params, (self.size // 16, self.size // 16)
        with torch.device("meta"):
            model = Flux(params)
            args = (torch.randn(1, grid[0] * grid[1], 64), image_ids(*grid), torch.randn(1, text_tokens, 4096),
                    torch.zeros(text_tokens, 3), torch.full((1,), 0.5), torch.randn(1, 768), torch.full((1,), 3.5))
            return sparse_flop_ratio(lambda runner: model(*args, block_runner=runner), grid, 0.5,
                                     text_tokens=text_tokens, batch=1)


BENCHES = {"lumina-next": LuminaBench, "sd3": SD3Bench, "flux": FluxBench}


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


def run_row(bench, config, settings, device):
    accel = AccelAes.create(config) if config is not None else None
    text, noise = bench.prepare(accel, settings)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        latents = bench.denoise(text, noise, accel, settings)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds, latents, accel, memory.bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BENCHES), default="lumina-next",
                        help="which backbone's widths to measure (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=1,
                        help="transformer layers / blocks (the releases have 24; default: 1)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512: 1024 tokens)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 30 or 28)")
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
    bench = BENCHES[args.model](args.layers, args.size, args.steps, args.device, dtype)
    pipeline, settings = bench.pipeline, bench.settings
    args.steps = settings.steps
    grid = (args.size // 16, args.size // 16)
    print(f"{bench.description}, {args.size}x{args.size} ({grid[0] * grid[1]} tokens), {args.steps} steps, "
          f"guidance {settings.guidance}, {dtype}, on {device_name}", file=sys.stderr)

    started = time.perf_counter()
    text, _ = bench.prepare(None, settings)
    text_seconds = time.perf_counter() - started
    text_tokens = next(getattr(text, name).shape[1] for name in ("features", "context", "t5") if hasattr(text, name))
    flop_ratio = bench.flop_ratio(text_tokens)
    print(f"a sparse evaluation does {flop_ratio:.1%} of a dense one's matmul FLOPs", file=sys.stderr)

    warm = replace(settings, steps=8)  # every code path once, untimed
    for config in bench.rows.values():
        run_row(bench, config and replace(config, warmup=2, mask_step=2), warm, args.device)

    results, dense_latents, dense_image = [], None, None
    for name, config in bench.rows.items():
        runs = [run_row(bench, config, settings, args.device) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        _, latents, accel, _ = runs[-1]
        started = time.perf_counter()
        image = bench.decode(latents) if hasattr(bench, "decode") else pipeline.decode(latents)
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

    header = (f"{'row':<21}{'seconds':>9}{'speedup':>9}{'theory':>8}  {'dense/sparse/extrap':<20}{'mask s':>8}"
              f"{'peak MB':>9}{'PSNR dB':>9}{'latent L2':>11}")
    print(header)
    for r in results:
        counts = f"{r['dense']}/{r['sparse']}/{r['extrapolated']}"
        print(f"{r['row']:<21}{r['seconds']:>9.2f}{r['speedup']:>8.2f}x{r['theoretical']:>7.2f}x  {counts:<20}"
              f"{r['mask_seconds']:>8.3f}{r['peak_memory_mb']:>9.0f}{r['psnr_db']:>9.2f}{r['latent_rel_l2']:>11.4f}")
    print(f"text encoding {text_seconds:.2f} s and VAE decoding {results[0]['decode_seconds']:.2f} s per image are "
          "not in the sampling seconds.")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": device_name, "layers": args.layers,
                                         "size": args.size,
                                         "steps": args.steps, "dtype": str(dtype), "repeats": args.repeats,
                                         "sparse_flop_ratio": flop_ratio, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
