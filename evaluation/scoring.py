"""Every image of an evaluation scored by every metric that runs, read back from its PNG (the
8-bit picture a user sees, which is what the metrics' reference code reads too).

One metric is loaded at a time, scores every folder, and is freed before the next: HPS and
PickScore are ViT-H models of 2-4 GB each. Metrics that compare with a reference (PSNR, SSIM)
score each AccelAes image against the dense image of the same prompt and seed, and do not
score dense itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from metrics.registry import METRICS, load_metric
from runs import Job

from .configs import DENSE
from .metric_flags import MetricPlan

CHUNK = 32      # images read and scored at a time: a 1024x1024 picture is 3 MB in memory

# folder (dense or a configuration) -> image file -> metric -> score
Scores = dict[str, dict[str, dict[str, float]]]


def compares_with_dense(metric: str) -> bool:
    """Whether the metric scores an image against a reference (dense's picture) rather than alone."""
    return "references" in METRICS[metric].inputs


def read_picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


def score_all(plan: MetricPlan, jobs: list[Job], out: Path, folders: list[str], device: str,
              stream: TextIO | None = None) -> Scores:
    """The score of every image of every folder by every metric of the plan."""
    stream = stream or sys.stderr
    scores: Scores = {folder: {job.file: {} for job in jobs} for folder in folders}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()     # what the pipeline left cached goes back before the first metric loads
    for name, files in plan.files.items():
        print(f"scoring with {name} ...", file=stream, flush=True)
        metric = load_metric(name, files, device=device, dtype=torch.float32)
        for folder in folders:
            if folder == DENSE and compares_with_dense(name):
                continue
            for start in range(0, len(jobs), CHUNK):
                chunk = jobs[start:start + CHUNK]
                references = ([read_picture(out / DENSE / job.file) for job in chunk]
                              if compares_with_dense(name) else None)
                values = metric([read_picture(out / folder / job.file) for job in chunk],
                                prompts=[job.prompt for job in chunk], references=references)
                for job, value in zip(chunk, values.tolist()):
                    scores[folder][job.file][name] = float(value)
        del metric
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores
