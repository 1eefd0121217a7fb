"""The images of an evaluation: dense and every configuration, for every (prompt, seed), made by
runs.run_jobs, the code path of `sample.py --prompts` (batches, torchrun, resume, manifest.jsonl),
each into its own folder of OUT; and beside every AccelAes image its mask picture.

    OUT/dense/NAME.png             the baseline
    OUT/<config>/NAME.png          the same prompt and seed with AccelAes in that configuration
    OUT/<config>/masks/NAME.png    the AccelAes picture, its attention heat map, its focus tokens

All are made in one process (one per GPU under torchrun), one folder after the other, so their
seconds (runs/: from text encoding to the decoded image, per image of a batch) compare.

The mask of a batch lives in the AccelAes that made it: run_jobs hands each image, with that
AccelAes and its row, to `MaskPictures.write` once the image is in place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import torch

from accelaes import AccelAes, AccelAesConfig, AestheticScorer, Embed
from cli.files import mask_picture, write_png
from pipelines.base import Pipeline
from runs import Job, OutputFolder, Process, Summary, run_jobs
from runs.runner import check_same_run

from .configs import DENSE

MASKS = "masks"


@dataclass(frozen=True)
class RunSettings:
    """What every folder of the evaluation is generated with."""
    settings: object           # the pipeline's settings, resolved
    height: int
    width: int
    batch_size: int
    overwrite: bool
    parameters: dict           # model, weights, dtype: into every PNG and manifest line
    process: Process


def jobs_of_this_process(jobs: list[Job], folder: Path, process: Process, overwrite: bool) -> list[Job]:
    """The jobs run_jobs will make in this process, in its order: those not complete in `folder`,
    every world-th from this rank on."""
    done = set() if overwrite else OutputFolder(folder).completed()
    return [job for job in jobs if job.file not in done][process.rank::process.world]


class MaskPictures:
    """run_jobs' AccelAes factory and its per-image hook: a fresh AccelAes per batch (one scorer
    for all: the anchors are embedded once, as sample.py --prompts does), and each image's mask
    picture, drawn from the AccelAes that made it, into the folder's masks/."""

    def __init__(self, name: str, config: AccelAesConfig, embed: Embed | None, folder: Path):
        self.name, self.config, self.folder = name, config, folder
        self.scorer = AestheticScorer(embed, config.anchors, config.threshold, config.top_k, config.token_weighting)

    def new_accelaes(self) -> AccelAes:
        return AccelAes(self.config, self.scorer)

    def write(self, job: Job, image: torch.Tensor, accel: AccelAes | None, row: int) -> None:
        mask = accel.mask if accel is not None else None
        if mask is None:             # this configuration builds no mask (StepCache alone)
            return
        picture = mask_picture(image, mask.affinity[row].cpu(), mask.soft[row].cpu(), mask.grid)
        write_png(picture, self.folder / MASKS / job.file,
                  {"prompt": job.prompt, "seed": job.seed, "configuration": self.name, "image": job.file,
                   "aesmask": accel.reports[row].describe()})


def check_folders(jobs: list[Job], out: Path, run: RunSettings, configs: dict[str, AccelAesConfig]) -> None:
    """Refuse, before anything is made, to resume into a folder whose images were made otherwise
    (runs.runner.OtherRunError): run_jobs would find out only when that folder's turn came."""
    for name, config in {DENSE: None, **configs}.items():
        folder = OutputFolder(out / name)
        complete = set() if run.overwrite or not folder.path.is_dir() else folder.completed()
        if complete:
            accel = None if config is None else AccelAes.create(config)
            check_same_run(folder, complete, jobs, accel, run.settings, run.height, run.width, run.parameters)


def warm_up(pipeline: Pipeline, job: Job, run: RunSettings) -> None:
    """One step of one image, so that no timed image pays the one-time start-up costs (CUDA
    kernels, allocator growth): sample.py --compare does the same."""
    pipeline.generate([job.prompt], [job.negative_prompt], seed=job.seed, height=run.height, width=run.width,
                      settings=replace(run.settings, steps=1))


def generate_all(pipeline: Pipeline, jobs: list[Job], out: Path, run: RunSettings, configs: dict[str, AccelAesConfig],
                 embed: Embed | None, stream: TextIO | None = None) -> dict[str, Summary]:
    """Dense, then every configuration (name -> its AccelAes settings): each folder's missing
    images (all of them with overwrite)."""
    stream = stream or sys.stderr
    check_folders(jobs, out, run, configs)
    todo = {name: jobs_of_this_process(jobs, out / name, run.process, run.overwrite) for name in [DENSE, *configs]}
    if any(todo.values()):
        warm_up(pipeline, jobs[0], run)
    summaries = {}
    label = f"rank {run.process.rank}: " if run.process.world > 1 else ""
    for name in [DENSE, *configs]:
        masks = None if name == DENSE else MaskPictures(name, configs[name], embed, out / name)
        if run.process.main:
            print(f"{name}:", file=stream, flush=True)
        summaries[name] = run_jobs(pipeline, jobs, out / name, settings=run.settings, height=run.height,
                                   width=run.width, batch_size=run.batch_size,
                                   accelerator=masks and masks.new_accelaes, overwrite=run.overwrite,
                                   parameters=run.parameters, process=run.process, stream=stream,
                                   on_image=masks and masks.write)
        print(f"{label}{name}: {summaries[name].describe()}", file=stream, flush=True)
    return summaries
