"""The metrics by name: which files each loads, and what a score call needs besides the images.

    metric = load_metric("pickscore", {"weights": "PickScore_v1/", "tokenizer": "CLIP-ViT-H-14/"}, device="cuda")
    scores = metric(images, prompts=prompts, references=references)   # [B] float, one per image

A caller passes everything it has; each metric reads only its `inputs`. Scores are per image
(per image-prompt pair), in the metric's own units, on the CPU; aggregate them per prompt and
compare methods with metrics/stats.py.

Another metric is one more `Metric`: its files, its inputs, and a load function that returns
a scorer called as scorer(images, **inputs). ImageReward, for one, would list `weights`
(ImageReward.pt), `config` (med_config.json) and `tokenizer` (a bert-base-uncased folder),
and read images and prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image

from .aesthetic import load_aesthetic
from .clip_score import load_clip_score
from .fidelity import psnr_of_images, ssim_of_images
from .hps import load_hps
from .pickscore import load_pickscore

Scorer = Callable[..., torch.Tensor]
Files = Mapping[str, "str | os.PathLike"]


@dataclass(frozen=True)
class WeightFile:
    role: str            # its key in the `files` given to load_metric
    what: str            # what to download, for messages
    required: bool = True


@dataclass(frozen=True)
class Metric:
    name: str
    summary: str
    files: tuple[WeightFile, ...]
    inputs: tuple[str, ...]   # score-call arguments besides the images: "prompts", "references"
    higher_is_better: bool
    load: Callable[[Files, "torch.device | str", "torch.dtype | None"], Scorer]


def _load_clip_score(files: Files, device, dtype) -> Scorer:
    return load_clip_score(files["weights"], files.get("tokenizer"), device, dtype)


def _load_aesthetic(files: Files, device, dtype) -> Scorer:
    return load_aesthetic(files["head"], files["clip"], device, dtype)


def _load_hps(files: Files, device, dtype) -> Scorer:
    return load_hps(files["weights"], files["tokenizer"], device, dtype)


def _load_pickscore(files: Files, device, dtype) -> Scorer:
    return load_pickscore(files["weights"], files.get("tokenizer"), device, dtype)


def _load_psnr(files: Files, device, dtype) -> Scorer:
    return partial(psnr_of_images, device=device)


def _load_ssim(files: Files, device, dtype) -> Scorer:
    return partial(ssim_of_images, device=device)


_CLIP_TOKENIZER = "a CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json)"

METRICS: Mapping[str, Metric] = MappingProxyType({metric.name: metric for metric in (
    Metric("clip_score", "100 * cos(image, prompt), OpenAI CLIP ViT-L/14 (torchmetrics' CLIPScore)",
           (WeightFile("weights", "the folder openai/clip-vit-large-patch14"),
            WeightFile("tokenizer", _CLIP_TOKENIZER + ", if not in the weights folder", required=False)),
           ("prompts",), True, _load_clip_score),
    Metric("aesthetic", "LAION aesthetic predictor v2 on OpenAI CLIP ViT-L/14 image embeddings (about 1-10)",
           (WeightFile("head", "sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor)"),
            WeightFile("clip", "the folder openai/clip-vit-large-patch14")),
           (), True, _load_aesthetic),
    Metric("hps_v2.1", "HPS v2.1: cos(image, prompt) of its OpenCLIP ViT-H/14 (x100 in HPS's tables)",
           (WeightFile("weights", "HPS_v2.1_compressed.pt (xswu/HPSv2)"),
            WeightFile("tokenizer", _CLIP_TOKENIZER)),
           ("prompts",), True, _load_hps),
    Metric("pickscore", "PickScore v1: exp(logit_scale) * cos(image, prompt), CLIP-H",
           (WeightFile("weights", "the folder yuvalkirstain/PickScore_v1"),
            WeightFile("tokenizer", _CLIP_TOKENIZER + " (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), "
                       "if not in the weights folder", required=False)),
           ("prompts",), True, _load_pickscore),
    Metric("psnr", "PSNR (dB) against the reference image, data range 1, per image", (),
           ("references",), True, _load_psnr),
    Metric("ssim", "SSIM against the reference image (torchmetrics' gaussian 11 / 1.5, data range 1)", (),
           ("references",), True, _load_ssim),
)})


class LoadedMetric:
    """A metric with its model loaded: scores a batch of images with whatever inputs it needs."""

    def __init__(self, metric: Metric, scorer: Scorer):
        self.metric = metric
        self.scorer = scorer

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None,
                 references: Sequence[Image.Image] | None = None) -> torch.Tensor:
        given = {"prompts": prompts, "references": references}
        inputs = {}
        for name in self.metric.inputs:
            if given[name] is None:
                raise ValueError(f"the metric {self.metric.name} needs {name} (one per image)")
            if len(given[name]) != len(images):
                raise ValueError(f"{len(images)} images but {len(given[name])} {name}: give one per image")
            inputs[name] = given[name]
        return self.scorer(images, **inputs)


def load_metric(name: str, files: Files | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> LoadedMetric:
    """Load metric `name` from `files` (role -> path, as METRICS[name].files lists them)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    metric, files = METRICS[name], dict(files or {})
    roles = {f.role for f in metric.files}
    unknown = sorted(set(files) - roles)
    if unknown:
        reads = ", ".join(sorted(roles)) or "none"
        raise ValueError(f"the metric {name} reads no file {unknown[0]!r}; it reads: {reads}")
    missing = [f for f in metric.files if f.required and f.role not in files]
    if missing:
        raise ValueError(f"the metric {name} needs " + "; ".join(f"{f.role}: {f.what}" for f in missing))
    return LoadedMetric(metric, metric.load(files, device, dtype))
