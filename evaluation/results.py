"""The image pairs of an evaluation and what they add up to.

A pair is one (prompt, seed) made dense and with one AccelAes configuration. Its line in
results.jsonl holds both images' files, every score of both, the differences AccelAes minus
dense, and both timings. Over a configuration's pairs:

  - the mean of each metric: each prompt's seeds averaged first, then the mean over prompts,
    with its 95% interval (prompts, not images, are the independent units: metrics/stats.py);
  - the paired difference AccelAes minus dense, averaged the same way (metrics.stats.paired_difference);
  - the speedup: dense's mean seconds per image over AccelAes', on the same pairs.

JSON has no infinity: the PSNR of two identical images (+inf) is written as null.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metrics.stats import paired_difference
from runs import Job, OutputFolder

from .configs import DENSE, Configuration
from .generate import MASKS
from .scoring import Scores, compares_with_dense


@dataclass(frozen=True)
class Pair:
    """One (prompt, seed): its dense image and its image with one AccelAes configuration."""
    configuration: str
    prompt_index: int
    prompt: str
    seed: int
    files: dict[str, str | None]        # dense, accelaes, mask: paths relative to OUT (mask None: none made)
    scores: dict[str, dict[str, float]]  # dense / accelaes -> metric -> score
    seconds: dict[str, float | None]     # dense / accelaes -> seconds of the image (runs/: its batch's share)
    evaluations: dict | None             # AccelAes' dense / sparse / extrapolated counts (manifest.jsonl)
    aesmask: str | None                  # what AesMask decided for the prompt; None: no mask built

    def difference(self, metric: str) -> float:
        return self.scores["accelaes"][metric] - self.scores["dense"][metric]

    @property
    def speedup(self) -> float | None:
        dense, fast = self.seconds["dense"], self.seconds["accelaes"]
        return dense / fast if dense and fast else None

    def record(self) -> dict:
        """Its line of results.jsonl."""
        differences = {metric: self.difference(metric) for metric in self.scores["accelaes"]
                       if metric in self.scores["dense"]}
        return json_safe({**asdict(self), "differences": differences, "speedup": self.speedup})


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def make_pairs(jobs: list[Job], out: Path, configurations: list[Configuration], scores: Scores) -> list[Pair]:
    """Every (configuration, job) pair, configuration after configuration, jobs in order."""
    records = {name: OutputFolder(out / name).records() for name in [DENSE, *(c.name for c in configurations)]}
    pairs = []
    for configuration in configurations:
        name = configuration.name
        for job in jobs:
            dense, fast = records[DENSE].get(job.file, {}), records[name].get(job.file, {})
            method = fast.get("accelaes") or {}
            mask = out / name / MASKS / job.file
            pairs.append(Pair(
                configuration=name, prompt_index=job.prompt_index, prompt=job.prompt, seed=job.seed,
                files={"dense": f"{DENSE}/{job.file}", "accelaes": f"{name}/{job.file}",
                       "mask": f"{name}/{MASKS}/{job.file}" if mask.is_file() else None},
                scores={"dense": scores[DENSE][job.file], "accelaes": scores[name][job.file]},
                seconds={"dense": dense.get("seconds"), "accelaes": fast.get("seconds")},
                evaluations=method.get("evaluations"), aesmask=method.get("aesmask")))
    return pairs


# ---- over prompts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A mean over prompts with its confidence interval (None where it has none)."""
    mean: float
    low: float | None
    high: float | None
    prompts: int
    note: str = ""       # why there is no interval

    def json(self) -> dict:
        return json_safe(asdict(self))


def prompt_means(values: list[tuple[int, float]]) -> dict[int, float]:
    """Each prompt's mean over its seeds, from (prompt index, value) per image; prompts in order."""
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for prompt, value in values:
        by_prompt[prompt].append(value)
    return {prompt: sum(seeds) / len(seeds) for prompt, seeds in sorted(by_prompt.items())}


def estimate(a: list[float], b: list[float] | None = None, confidence: float = 0.95) -> Estimate:
    """The mean of a - b (of a alone when b is None) over prompts, with its Student-t interval."""
    b = b if b is not None else [0.0] * len(a)
    differences = [x - y for x, y in zip(a, b)]
    if not all(math.isfinite(d) for d in differences):
        identical = sum(not math.isfinite(d) for d in differences)
        return Estimate(math.inf if any(d == math.inf for d in differences) else math.nan, None, None, len(a),
                        f"{identical} of {len(a)} prompts with an infinite value (identical images)")
    if len(a) < 2:
        return Estimate(differences[0], None, None, len(a), "one prompt: no interval")
    result = paired_difference(a, b, confidence)
    return Estimate(result.mean, result.low, result.high, result.n)


def mean_over_prompts(pairs: list[Pair], side: str, metric: str) -> Estimate:
    """One side's (dense or accelaes) mean of a metric: seeds averaged per prompt first."""
    return estimate(list(prompt_means([(p.prompt_index, p.scores[side][metric]) for p in pairs]).values()))


def difference_over_prompts(pairs: list[Pair], metric: str) -> Estimate:
    """AccelAes minus dense: each prompt's seeds averaged on both sides, then paired over prompts."""
    fast = prompt_means([(p.prompt_index, p.scores["accelaes"][metric]) for p in pairs])
    dense = prompt_means([(p.prompt_index, p.scores["dense"][metric]) for p in pairs])
    return estimate(list(fast.values()), list(dense.values()))


@dataclass
class ConfigurationSummary:
    name: str
    title: str
    overrides: dict
    images: int
    seconds_per_image: float | None         # AccelAes' mean, over the pairs timed on both sides
    dense_seconds_per_image: float | None   # dense's, over the same pairs
    means: dict[str, Estimate] = field(default_factory=dict)         # metric -> AccelAes' mean
    differences: dict[str, Estimate] = field(default_factory=dict)   # metric -> AccelAes minus dense

    @property
    def speedup(self) -> float | None:
        if self.seconds_per_image and self.dense_seconds_per_image:
            return self.dense_seconds_per_image / self.seconds_per_image
        return None

    def json(self) -> dict:
        return json_safe({"title": self.title, "overrides": self.overrides, "images": self.images,
                          "seconds_per_image": self.seconds_per_image,
                          "dense_seconds_per_image": self.dense_seconds_per_image, "speedup": self.speedup,
                          "means": {m: e.json() for m, e in self.means.items()},
                          "differences": {m: e.json() for m, e in self.differences.items()}})


def summarize_configuration(configuration: Configuration, pairs: list[Pair],
                            metrics: list[str]) -> ConfigurationSummary:
    """The row of one configuration: timings, means and paired differences over its pairs."""
    timed = [p for p in pairs if p.seconds["dense"] and p.seconds["accelaes"]]
    summary = ConfigurationSummary(
        configuration.name, configuration.title, dict(configuration.overrides), len(pairs),
        sum(p.seconds["accelaes"] for p in timed) / len(timed) if timed else None,
        sum(p.seconds["dense"] for p in timed) / len(timed) if timed else None)
    for metric in metrics:
        summary.means[metric] = mean_over_prompts(pairs, "accelaes", metric)
        if not compares_with_dense(metric):
            summary.differences[metric] = difference_over_prompts(pairs, metric)
    return summary


def dense_means(pairs: list[Pair], metrics: list[str]) -> dict[str, Estimate]:
    """Dense's mean of every metric that scores it alone (its pairs of any one configuration)."""
    first = [p for p in pairs if p.configuration == pairs[0].configuration] if pairs else []
    return {metric: mean_over_prompts(first, "dense", metric) for metric in metrics if not compares_with_dense(metric)}


@dataclass
class EvaluationSummary:
    """Everything summary.json, summary.md and report.html say of a run."""
    facts: dict                          # model, weights, prompt file, prompts, seeds, size, settings
    metrics: list[str]                   # the metrics that ran, registry order
    skipped: dict[str, str]              # metric -> why it did not run
    dense_seconds_per_image: float | None
    dense: dict[str, Estimate]           # dense's mean of every metric that scores it
    configurations: list[ConfigurationSummary]
    notes: list[str] = field(default_factory=list)   # what a reader of the numbers must know

    def json(self) -> dict:
        return json_safe({"facts": self.facts, "metrics": self.metrics, "did_not_run": self.skipped,
                          "dense": {"seconds_per_image": self.dense_seconds_per_image,
                                    "means": {m: e.json() for m, e in self.dense.items()}},
                          "configurations": {c.name: c.json() for c in self.configurations},
                          "notes": self.notes})


def summarize(pairs: list[Pair], configurations: list[Configuration], metrics: list[str], skipped: dict[str, str],
              facts: dict, notes: list[str]) -> EvaluationSummary:
    rows = [summarize_configuration(c, [p for p in pairs if p.configuration == c.name], metrics)
            for c in configurations]
    first = [p for p in pairs if p.configuration == configurations[0].name]
    dense_seconds = [p.seconds["dense"] for p in first if p.seconds["dense"]]
    dense_mean_seconds = sum(dense_seconds) / len(dense_seconds) if dense_seconds else None
    return EvaluationSummary(facts, metrics, skipped, dense_mean_seconds, dense_means(pairs, metrics), rows, notes)
