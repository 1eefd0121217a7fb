"""One command-line flag per file a metric reads (metrics.registry), and which metrics run.

A metric runs when every file it requires is given; PSNR and SSIM read none, so they always
run. Each flag is the metric's short name and the file's role: --clip-score-weights,
--aesthetic-head, --hps-weights, --pickscore-tokenizer, ... A metric added to the registry gets
its flags here without a change.

The files are looked at before any model loads: every path exists, weight files open (their
headers only; models.checkpoint), and the CLIP metrics' tokenizers read, so a wrong path costs
seconds, not the hours of generation before scoring.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from metrics.registry import METRICS, Metric, WeightFile
from models.checkpoint import Checkpoint, CheckpointError
from models.clip import CLIPTokenizer

# The flag's prefix where the metric's name does not make a good one.
FLAG_PREFIX = {"clip_score": "clip-score", "hps_v2.1": "hps"}
WEIGHT_ROLES = ("weights", "head", "clip")        # roles that name weight files or folders
CLIP_TOKENIZED = ("clip_score", "hps_v2.1", "pickscore")   # read their prompts with a CLIP tokenizer
# The paper's headline metric; metrics/registry.py says what it will need.
NOT_YET = {"imagereward": "ImageReward, the paper's headline metric, is not implemented yet"}


def flag_of(metric: Metric, weight_file: WeightFile) -> str:
    prefix = FLAG_PREFIX.get(metric.name, metric.name.replace("_", "-").replace(".", "-"))
    return f"--{prefix}-{weight_file.role}"


def dest_of(metric: Metric, weight_file: WeightFile) -> str:
    return flag_of(metric, weight_file)[2:].replace("-", "_")


def add_metric_flags(group) -> None:
    """The flags, on a parser or an argument group."""
    for metric in METRICS.values():
        for weight_file in metric.files:
            need = "required" if weight_file.required else "optional"
            group.add_argument(flag_of(metric, weight_file), dest=dest_of(metric, weight_file), type=Path,
                               default=None, metavar="PATH",
                               help=f"{metric.name} ({need}): {weight_file.what}; the metric runs when its "
                                    "required files are given")


@dataclass(frozen=True)
class MetricPlan:
    """Which metrics run with which files, and why each of the others does not."""
    files: dict[str, dict[str, Path]]      # metric -> role -> path, for the metrics that run, registry order
    skipped: dict[str, str]                # metric -> why it does not run

    @property
    def names(self) -> list[str]:
        return list(self.files)


def plan_metrics(args: argparse.Namespace) -> MetricPlan:
    """The metrics this run scores with, from the flags given (ValueError on an incomplete metric)."""
    files, skipped = {}, {}
    for metric in METRICS.values():
        given = {f.role: getattr(args, dest_of(metric, f)) for f in metric.files
                 if getattr(args, dest_of(metric, f)) is not None}
        missing = [f for f in metric.files if f.required and f.role not in given]
        if not missing:
            files[metric.name] = given
        elif given:
            raise ValueError(f"{', '.join(flag_of(metric, f) for f in metric.files if f.role in given)} given "
                             f"without {flag_of(metric, missing[0])}: the metric {metric.name} needs "
                             f"{missing[0].what} too (or drop the others)")
        else:
            skipped[metric.name] = f"no {' / '.join(flag_of(metric, f) for f in missing)} given"
    skipped.update(NOT_YET)
    return MetricPlan(files, skipped)


def check_metric_files(plan: MetricPlan) -> None:
    """Every file of every metric that runs is there and readable (CheckpointError / ValueError)."""
    for name, given in plan.files.items():
        metric = METRICS[name]
        for weight_file in metric.files:
            path = given.get(weight_file.role)
            if path is None:
                continue
            flag = flag_of(metric, weight_file)
            if not path.exists():
                raise ValueError(f"{flag} {path} does not exist: give {weight_file.what} (weights.md, Quality "
                                 "metrics)")
            if weight_file.role in WEIGHT_ROLES:
                _opens(flag, path)
        if name in CLIP_TOKENIZED:
            tokenizer = given.get("tokenizer", given.get("weights"))
            try:
                CLIPTokenizer.from_folder(tokenizer)
            except CheckpointError as error:
                fix = (f"give {flag_of(metric, _role(metric, 'tokenizer'))}" if "tokenizer" not in given
                       else "point at a CLIP tokenizer folder")
                raise ValueError(f"{name}: {error} ({fix})") from None


def _opens(flag: str, path: Path) -> None:
    try:
        Checkpoint(path)
    except CheckpointError as error:
        raise ValueError(f"{flag}: {error}") from None


def _role(metric: Metric, role: str) -> WeightFile:
    return next(f for f in metric.files if f.role == role)
