"""Every registered backbone through the one interface: generate(), AccelAes on it, sample.py's
random demo and benchmark.py's code path, each on the pipeline's tiny random model."""

import json

import pytest
import torch
from PIL import Image

import benchmark
import sample
from accelaes import AccelAes, AccelAesConfig
from pipelines import REGISTRY
from pipelines.base import Pipeline


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def backbone(request):
    return request.param, REGISTRY[request.param].pipeline.random(seed=0)


def test_generate_dense_and_accelerated(backbone):
    name, pipeline = backbone
    assert isinstance(pipeline, Pipeline)
    settings = pipeline.resolve(pipeline.Settings(steps=12))
    dense, images = pipeline.generate(["a cinematic photo of a cat"], seed=3, height=64, width=96, settings=settings)
    assert images.shape == (1, 3, 64, 96) and torch.isfinite(images).all()
    again, _ = pipeline.generate(["a cinematic photo of a cat"], seed=3, height=64, width=96, settings=settings)
    assert torch.equal(dense, again)
    config = AccelAesConfig(**{**REGISTRY[name].accelaes, "sparse": True, "mask_step": 3, "warmup": 3})
    accel = AccelAes.create(config)
    fast, _ = pipeline.generate(["a cinematic photo of a cat"], seed=3, height=64, width=96, settings=settings,
                                accelerator=accel)
    assert (accel.stats.dense, accel.stats.sparse, accel.stats.extrapolated) == (4, 4, 4)
    assert accel.mask.focus.shape == (1, 24 - 12)
    assert 0 < (fast - dense).norm() / dense.norm() < 1


def test_sample_py_runs_every_backbone_without_weights(backbone, tmp_path, capsys):
    name, _ = backbone
    output = tmp_path / f"{name}.png"
    assert sample.main(["--model", name, "--output", str(output), "--height", "64", "--width", "64",
                        "--steps", "8", "--mask-step", "2", "--sparse"]) == 0
    error = capsys.readouterr().err
    assert "RANDOM weights" in error and f"wrote {output}" in error
    assert json.loads(Image.open(output).info["parameters"])["model"] == "built-in random model"


def test_benchmark_code_path(backbone, capsys):
    name, _ = backbone
    assert benchmark.main(["--model", name, "--tiny", "--size", "64", "--steps", "8", "--repeats", "1",
                           "--ablations"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].startswith("dense") and "attn-only sparse" in table
