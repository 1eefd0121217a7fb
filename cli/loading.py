"""Loading what a command-line run needs: the pipeline (the released weights, or a random model
said so), and AesMask's CLIP phrase embedder."""

from __future__ import annotations

import argparse
import sys

import torch

from models.clip import CLIPTokenizer, load_clip
from pipelines import REGISTRY
from pipelines.aesmask_inputs import clip_phrase_embedder

from .sample_args import DTYPES


def load_embedder(args: argparse.Namespace, pipeline):
    """The CLIP phrase embedder for AesMask: --clip, or the pipeline's own CLIP-L (SD3, FLUX), or
    a clip-vit-large-patch14/ folder in --weights; None (uniform token weights) without one."""
    folder = args.clip
    if folder is None and pipeline.aesmask_clip() is not None:
        return clip_phrase_embedder(*pipeline.aesmask_clip())
    if folder is None and args.weights is not None and (args.weights / "clip-vit-large-patch14").is_dir():
        folder = args.weights / "clip-vit-large-patch14"
    if folder is None:
        return None
    print(f"loading CLIP from {folder} for AesMask ...", file=sys.stderr)
    model = load_clip(folder, dtype=torch.float32, device=args.device)
    return clip_phrase_embedder(model, CLIPTokenizer.from_folder(folder))


def load_pipeline(args: argparse.Namespace, say: bool = True):
    """The pipeline on args.device; say: print what is loaded (under torchrun, the first process only)."""
    pipeline = REGISTRY[args.model].pipeline
    print_ = print if say else (lambda *a, **k: None)
    if args.weights is None:
        print_(f"No --weights given: running a small built-in {pipeline.title} model with RANDOM weights, so the "
               "picture is noise. weights.md lists the released weights and where to download them.",
               file=sys.stderr)
        if args.text_device is not None:
            print_("note: the built-in random model keeps its text encoders with it; --text-device is ignored",
                   file=sys.stderr)
        return pipeline.random(seed=0).to(args.device, DTYPES[args.dtype]), "built-in random model"
    print_(f"loading {args.model} from {args.weights} ...", file=sys.stderr)
    return pipeline.from_folder(args.weights, DTYPES[args.dtype], args.device, text_device=args.text_device), args.model
