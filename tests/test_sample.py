"""End-to-end tests of the command line: what a user sees and what lands on disk.

Per-model parity tests against diffusers / transformers live in tests/.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from cli.sample_args import load_anchors

ROOT = Path(__file__).resolve().parents[1]


def test_no_arguments_writes_a_png_and_says_the_weights_are_random(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "weights.md" in result.stderr
    image = Image.open(tmp_path / "outputs" / "sample.png")
    assert image.size == (256, 256) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 1  # something was decoded, not a constant
    assert json.loads(image.info["parameters"])["model"] == "built-in random model"
    assert list((tmp_path / "outputs").iterdir()) == [tmp_path / "outputs" / "sample.png"]


def test_same_seed_same_picture_other_seed_other_picture(tmp_path):
    for name, seed in (("a.png", 1), ("b.png", 1), ("c.png", 2)):
        assert sample.main(["--output", str(tmp_path / name), "--seed", str(seed), "--height", "64",
                            "--width", "96", "--steps", "3", "--dense"]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert a.shape == (64, 96, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    output = tmp_path / "out.png"
    output.write_bytes(b"precious")
    assert sample.main(["--output", str(output), "--height", "64", "--width", "64", "--steps", "2",
                        "--dense"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists: pass --overwrite" in error
    assert output.read_bytes() == b"precious"
    assert sample.main(["--output", str(output), "--height", "64", "--width", "64", "--steps", "2",
                        "--dense", "--overwrite"]) == 0
    assert Image.open(output).size == (64, 64)


def test_every_flag_has_help():
    for action in sample.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_every_accelaes_setting_is_a_flag():
    from accelaes import AccelAesConfig
    dests = {action.dest for action in sample.build_parser()._actions}
    assert set(AccelAesConfig.__dataclass_fields__) <= dests
    args = sample.build_parser().parse_args(["--skip-ratio", "0.3", "--no-step-cache", "--mask-step", "3"])
    config = sample.accelaes_config(args)
    assert (config.skip_ratio, config.step_cache, config.mask_step, config.sparse) == (0.3, False, 3, True)
    args = sample.build_parser().parse_args(["--model", "sd3", "--sparse"])
    config = sample.accelaes_config(args)
    assert (config.sparse, config.spatial_cfg, config.step_cache) == (True, False, True)


def test_compare_and_save_mask(tmp_path, capsys):
    output = tmp_path / "out.png"
    assert sample.main(["--output", str(output), "--height", "64", "--width", "96", "--steps", "10",
                        "--compare", "--save-mask", "--mask-step", "3", "--warmup", "3"]) == 0
    printed = capsys.readouterr()
    assert "6/4/0" not in printed.out and "30/0/0" not in printed.out
    assert "10/0/0" in printed.out and "4/3/3" in printed.out and "PSNR vs dense" in printed.out
    assert "uniform token weights (no CLIP text encoder given)" in printed.err
    dense, mask = Image.open(tmp_path / "out-dense.png"), Image.open(tmp_path / "out-mask.png")
    assert dense.size == (96, 64) and mask.size == (3 * 96, 64)
    assert json.loads(Image.open(output).info["parameters"])["accelaes"]["evaluations"]["sparse"] == 3
    assert json.loads(dense.info["parameters"])["accelaes"] is None


def test_anchor_file(tmp_path):
    with pytest.raises(sample.UsageError, match="--anchors .* does not exist"):
        load_anchors(tmp_path / "missing.txt")
    with pytest.raises(sample.UsageError, match="is a folder"):
        load_anchors(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(sample.UsageError, match="latin1.txt is not UTF-8 text"):
        load_anchors(tmp_path / "latin1.txt")
    (tmp_path / "anchors.txt").write_text("# mine\nglowing\n\nserene  # calm\n")
    assert load_anchors(tmp_path / "anchors.txt") == ("glowing", "serene")


def test_prompt_file_images_equal_single_prompt_images(tmp_path):
    """sample.py --prompts writes, for each (prompt, seed), the image sample.py --prompt makes."""
    prompts = ["a cinematic photo of a red fox", "two boats at sea", "a bowl of soup"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = ["--height", "64", "--width", "64", "--steps", "8", "--mask-step", "3", "--warmup", "3"]
    assert sample.main(["--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "out"),
                        "--seeds", "4,9", "--batch-size", "1", *common]) == 0
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted((m["prompt"], m["seed"]) for m in manifest) == sorted((p, s) for p in prompts for s in (4, 9))
    for record in manifest[:3]:
        single = tmp_path / f"single-{record['index']}.png"
        assert sample.main(["--prompt", record["prompt"], "--seed", str(record["seed"]), "--output", str(single),
                            *common]) == 0
        assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(tmp_path / "out" / record["file"])))
