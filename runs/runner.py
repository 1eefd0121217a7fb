"""A run: its images generated in batches through the Pipeline interface (pipelines/base.py),
each written to the output folder as soon as it is done (runs/outputs.py).

    process   = data_parallel(device)                  runs/distributed.py (one process without torchrun)
    jobs      = make_jobs(read_prompts(file), seeds)   runs/prompts.py
    summary   = run_jobs(pipeline, jobs, folder, ...)  here

In `run_jobs`: the images already complete in the folder are skipped (unless overwrite); the
rest are shared among the processes, batch_size prompts go through the model at a time, each
with its own seed and a fresh AccelAes, and after the last, rank 0 merges the manifest.

A batch's samples never meet: each draws its noise from its own seed, and AccelAes keeps a mask,
token weights and guidance per prompt, so an image is the one its prompt and seed give alone
(up to the rounding of batched matrix products: tests/test_runs.py).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch

from accelaes import AccelAes
from cli.files import to_pil
from pipelines.base import Pipeline, text_to
from pipelines.sampling import cfg_negatives

from .distributed import Process
from .outputs import OutputFolder
from .progress import Progress
from .prompts import Job


class OtherRunError(ValueError):
    """The output folder holds images of these jobs made with other settings: skipping them would
    leave a folder of mixed runs."""


class NonFiniteError(ValueError):
    """A batch produced NaN or Inf values (an fp16 overflow, broken weights): nothing of it is written."""


@dataclass
class Summary:
    """What one process of a run did."""
    jobs: int                  # images of the run
    skipped: int               # of them, complete in the folder before the run
    written: int               # images this process generated
    seconds: float             # from its start to its last image (text encoding included)
    manifest_lines: int | None = None   # rank 0: images in the merged manifest.jsonl

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"wrote {self.written} images, skipped {self.skipped} of {self.jobs} already done, in "
                f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s)")
        return text if self.manifest_lines is None else f"{text}; manifest.jsonl lists {self.manifest_lines} images"


def run_jobs(pipeline: Pipeline, jobs: list[Job], output_dir: str | Path, *, settings, height: int, width: int,
             batch_size: int = 1, accelerator: Callable[[], AccelAes | None] | None = None,
             encode_first: bool = False, overwrite: bool = False, parameters: dict | None = None,
             process: Process = Process(), stream: TextIO | None = None,
             on_image: Callable[[Job, torch.Tensor, AccelAes | None, int], None] | None = None) -> Summary:
    """Generate the jobs' images into output_dir; every process of the run calls it with the same arguments.

    settings: the pipeline's settings; accelerator: makes a fresh AccelAes for each batch (None:
    dense); encode_first: encode every prompt of this process first, then free the text encoders
    before the transformer runs (their output waits on the CPU: FLUX-dev's T5 is 4 MB a prompt);
    overwrite: make every image again; parameters: what the caller knows of the run (model,
    weights, dtype), written into every PNG and manifest line; stream: where progress goes (stderr);
    on_image(job, image [3, H, W], accel, row): called once each image is in place, with the
    AccelAes that made it and its row in that batch (evaluate.py draws the mask pictures)."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: give at least 1")
    started = time.perf_counter()
    settings = pipeline.resolve(settings)
    folder = OutputFolder(output_dir, process.rank, process.world)
    folder.path.mkdir(parents=True, exist_ok=True)
    if process.main:
        folder.remove_leftovers()
    complete = set() if overwrite else folder.completed()
    if complete:
        check_same_run(folder, complete, jobs, accelerator() if accelerator else None, settings, height, width,
                       parameters or {})
    process.barrier()      # every rank has read the folder before any writes to it: they share the same work
    pending = [job for job in jobs if job.file not in complete]
    mine = pending[process.rank::process.world]
    batches = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    label = f"rank {process.rank}/{process.world}: " if process.world > 1 else ""
    print(f"{label}{len(mine)} images to make in {folder.path} ({len(jobs) - len(pending)} of {len(jobs)} "
          "already there)", file=stream or sys.stderr, flush=True)

    texts = encode_all(pipeline, batches, settings) if encode_first and batches else [None] * len(batches)
    progress = Progress(len(mine), label, stream)
    try:
        for index, batch in enumerate(batches):
            text, texts[index] = texts[index], None       # freed as it is used
            accel = accelerator() if accelerator else None
            images, seconds, peak = generate_batch(pipeline, batch, settings, height, width, text, accel)
            for row, (job, image) in enumerate(zip(batch, images)):
                png, record = image_parameters(job, row, accel, settings, height, width, parameters or {})
                record.update(seconds=seconds / len(batch), batch_size=len(batch), peak_memory_mb=peak,
                              rank=process.rank)
                folder.add(to_pil(image), png, record)
                if on_image is not None:
                    on_image(job, image, accel, row)
                progress.advance()
    except BaseException:            # Ctrl-C, an error: every file written so far is whole
        progress.interrupted()
        if process.world == 1:       # a rank cannot tidy the manifest: the others may still be writing
            folder.merge()
        raise
    process.barrier()                # every rank's images and manifest lines are in place
    lines = folder.merge() if process.main else None
    return Summary(len(jobs), len(jobs) - len(pending), len(mine), time.perf_counter() - started, lines)


def check_same_run(folder: OutputFolder, complete: set[str], jobs: list[Job], accel: AccelAes | None, settings,
                   height: int, width: int, parameters: dict) -> None:
    """Refuse to resume into a folder whose images of these jobs were made otherwise (other
    settings, model, AccelAes configuration): OtherRunError names the first difference."""
    records = folder.records()
    for job in (job for job in jobs if job.file in complete):
        _, record = image_parameters(job, 0, accel, settings, height, width, parameters)
        now, there = what_makes(json.loads(json.dumps(record))), what_makes(records[job.file])
        if now != there:
            raise OtherRunError(f"{folder.path / job.file} was made with other settings ({difference(there, now)}): "
                                "make the images again with overwrite (sample.py --overwrite), or write to another "
                                "folder")


def what_makes(record: dict) -> dict:
    """What decides an image, from its manifest line: all but the timings, counts and reports."""
    method = record.get("accelaes")
    decided = {key: value for key, value in record.items()
               if key not in ("index", "accelaes", "seconds", "batch_size", "peak_memory_mb", "rank")}
    return {**decided, "accelaes": method.get("config") if isinstance(method, dict) else method}


def difference(there: dict, now: dict, prefix: str = "") -> str:
    """The first setting that differs, as "settings.steps 30 there, 28 now" ("dense": no AccelAes)."""
    for key in dict.fromkeys([*now, *there]):
        old, new = there.get(key), now.get(key)
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                return difference(old, new, f"{prefix}{key}.")
            if key == "accelaes" and None in (old, new):
                return f"{'dense' if old is None else 'AccelAes'} there, {'dense' if new is None else 'AccelAes'} now"
            return f"{prefix}{key} {old!r} there, {new!r} now"
    return "none"


def encode_all(pipeline: Pipeline, batches: list[list[Job]], settings) -> list:
    """Every batch's text conditioning, kept on the CPU; then the text encoders are freed."""
    if pipeline.text_encoders_freed:
        raise RuntimeError(f"the {pipeline.title} text encoders were freed by an earlier encode-first run: load the "
                           "pipeline again")
    texts = []
    for batch in batches:
        prompts = [job.prompt for job in batch]
        negatives = cfg_negatives(prompts, [job.negative_prompt for job in batch], pipeline.guided(settings))
        texts.append(text_to(pipeline.encode(prompts, negatives, settings), "cpu"))
    pipeline.free_text_encoders()
    return texts


def generate_batch(pipeline: Pipeline, batch: list[Job], settings, height: int, width: int, text,
                   accel: AccelAes | None) -> tuple[torch.Tensor, float, float]:
    """(images [B, 3, H, W] in [0, 1], seconds, peak memory in MB) of one model batch: each prompt
    with its own seed and negative prompt; text: the batch's, encoded before (None: encode it)."""
    device = pipeline.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = _clock(device)
    generation = pipeline.prepare([job.prompt for job in batch], [job.negative_prompt for job in batch],
                                  seed=[job.seed for job in batch], height=height, width=width, settings=settings,
                                  accelerator=accel, text=None if text is None else text_to(text, device))
    latents = pipeline.denoise(generation, accel)
    images = pipeline.decode(latents, generation.size)
    seconds = _clock(device) - started
    if not (torch.isfinite(latents).all() and torch.isfinite(images).all()):
        raise NonFiniteError(f"the batch of {', '.join(job.file for job in batch)} produced NaN or Inf values, so "
                             "none of it was written: a wider --dtype (bf16, fp32) or other weights may help")
    return images, seconds, _peak_memory_mb(device)


def image_parameters(job: Job, row: int, accel: AccelAes | None, settings, height: int, width: int,
                     parameters: dict) -> tuple[dict, dict]:
    """(the PNG's parameters chunk, as sample.py writes it; the start of its manifest line)."""
    method = None if accel is None else {
        "config": {key: value for key, value in asdict(accel.config).items() if key != "anchors"},
        "evaluations": asdict(accel.stats),
        "aesmask": accel.reports[row].describe() if accel.mask is not None else None}   # None: no mask built
    png = {**parameters, "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
           "height": height, "width": width, **asdict(settings), "accelaes": method}
    record = {"index": job.index, "file": job.file, "prompt": job.prompt, "negative_prompt": job.negative_prompt,
              "seed": job.seed, **parameters, "height": height, "width": width, "settings": asdict(settings),
              "accelaes": method}
    return png, record


def _clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_memory_mb(device: torch.device) -> float:
    """On CUDA the allocator's peak since the batch began; on the CPU the process's peak resident
    memory so far (Linux counts ru_maxrss in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
