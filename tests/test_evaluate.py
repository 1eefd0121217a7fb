"""evaluate.py end to end on the tiny random Lumina-Next, with tiny random metric weights built
here as tests/test_metrics.py builds them (transformers' CLIP folders, an OpenCLIP .pt for HPS,
an aesthetic head), and its pieces against numbers worked out by hand.

What is checked against something evaluate.py does not compute itself: the scores against the
metrics called directly on the PNGs, the confidence intervals against a closed-form t quantile,
the mask pictures against a generation of the same (prompt, seed) alone, the page against
Python's HTML parser and the files on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel as RefCLIPModel

import evaluate
from accelaes import AccelAes
from evaluation.configs import CONFIGURATIONS
from evaluation.results import Pair, difference_over_prompts, mean_over_prompts
from metrics.clip_score import load_clip_score
from metrics.fidelity import psnr_of_images
from models.clip import CLIPTokenizer, load_clip
from pipelines import REGISTRY
from pipelines.aesmask_inputs import clip_phrase_embedder
from runs import read_prompts
from tests.common import randomize_
from tests.test_clip import write_vocab_and_merges
from tests.test_clip_vision import to_openclip_model
from tests.test_metrics import aesthetic_head, clip_config

ROOT = Path(__file__).resolve().parents[1]
# The third prompt would open an <i> that is never closed if the page did not escape it.
PROMPTS = ["a red fox in snow", "A cinematic portrait of an old sailor, highly detailed", 'cat <i>sitting & "waiting"']
SEEDS = [0, 1]
SIZE, STEPS = 64, 8
T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))   # Student's t quantile, 2 degrees of freedom, closed form


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' matrices are too small to share among threads (tests/test_runs.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny random metric weights in the released layouts: an OpenAI-like CLIP folder (CLIP score,
    the aesthetic predictor's tower, AesMask's text encoder), a PickScore-like folder, an
    HPS-like OpenCLIP .pt with a tokenizer folder, and an aesthetic head."""
    root = tmp_path_factory.mktemp("weights")
    for name, activation, seed in (("openai", "quick_gelu", 19), ("pick", "gelu", 11)):
        model = randomize_(RefCLIPModel(clip_config(activation)), seed=seed)
        model.save_pretrained(root / name)
        write_vocab_and_merges(root / name)
    hps = randomize_(RefCLIPModel(clip_config("gelu", width=128)), seed=12)
    torch.save({"state_dict": to_openclip_model(hps.state_dict())}, root / "HPS_like.pt")
    write_vocab_and_merges(root / "tokenizer")
    head = aesthetic_head(32, seed=13)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, root / "head.pth")
    return {"openai": root / "openai", "pick": root / "pick", "hps": root / "HPS_like.pt",
            "tokenizer": root / "tokenizer", "head": root / "head.pth"}


def metric_flags(weights: dict[str, Path]) -> list[str]:
    return ["--clip-score-weights", str(weights["openai"]), "--aesthetic-head", str(weights["head"]),
            "--aesthetic-clip", str(weights["openai"]), "--hps-weights", str(weights["hps"]),
            "--hps-tokenizer", str(weights["tokenizer"]), "--pickscore-weights", str(weights["pick"])]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_evaluate(argv: list[str]) -> Result:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main([str(a) for a in argv])
    return Result(code, stdout.getvalue(), stderr.getvalue())


def arguments(folder: Path, weights: dict[str, Path], out: Path) -> list[str]:
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    return ["--prompts", prompts, "--output-dir", out, "--seeds", ",".join(map(str, SEEDS)), "--height", SIZE,
            "--steps", STEPS, "--configs", "full,step-cache-only", "--batch-size", 4, "--clip", weights["openai"],
            *metric_flags(weights)]


@dataclass
class Evaluated:
    folder: Path
    out: Path
    argv: list[str]
    result: Result


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, weights) -> Evaluated:
    """One run: 3 prompts x 2 seeds, dense, full and step-cache-only, batches of 4 (4 + 2)."""
    folder = tmp_path_factory.mktemp("evaluate")
    argv = arguments(folder, weights, folder / "out")
    result = run_evaluate(argv)
    assert result.code == 0, result.stderr
    return Evaluated(folder, folder / "out", argv, result)


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def pictures(paths) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


# ---- what is written -------------------------------------------------------------------------

def test_every_file_is_written(evaluated):
    out = evaluated.out
    names = [f"{index:04d}-{slug}-s{seed}.png" for index, slug in
             enumerate(["a-red-fox-in-snow", "a-cinematic-portrait-of-an-old-sailor", "cat-i-sitting-waiting"])
             for seed in SEEDS]
    expected = {"results.jsonl", "summary.json", "summary.md", "report.html"}
    for folder in ("dense", "full", "step-cache-only"):
        expected |= {f"{folder}/manifest.jsonl", *(f"{folder}/{name}" for name in names)}
    expected |= {f"full/masks/{name}" for name in names}        # StepCache alone builds no mask
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    assert "wrote" in evaluated.result.stderr.splitlines()[-1]
    assert "| AccelAes (full) |" in evaluated.result.stdout      # summary.md, printed


def test_mask_pictures_are_those_of_each_image_made_alone(evaluated, weights):
    """The mask of the 6th image (the second batch's second row) is the mask its (prompt, seed)
    gives alone, beside the very picture written for it: the recorder matched batches to jobs."""
    out, name = evaluated.out, "0002-cat-i-sitting-waiting-s1.png"
    mask = np.asarray(Image.open(out / "full" / "masks" / name))
    picture = np.asarray(Image.open(out / "full" / name))
    assert mask.shape == (SIZE, 3 * SIZE, 3) and np.array_equal(mask[:, :SIZE], picture)
    pipeline = REGISTRY["lumina-next"].pipeline.random(seed=0)
    embed = clip_phrase_embedder(load_clip(weights["openai"], dtype=torch.float32),
                                 CLIPTokenizer.from_folder(weights["openai"]))
    accel = AccelAes.create(CONFIGURATIONS["full"].accelaes(REGISTRY["lumina-next"].accelaes), embed)
    pipeline.generate([PROMPTS[2]], [""], seed=[1], height=SIZE, width=SIZE, settings=pipeline.Settings(steps=STEPS),
                      accelerator=accel)
    rows, cols = accel.mask.grid
    token = SIZE // rows
    focus_panel = mask[:, 2 * SIZE:].astype(int)
    in_focus = [np.abs(focus_panel[r * token:(r + 1) * token, c * token:(c + 1) * token]
                       - picture[r * token:(r + 1) * token, c * token:(c + 1) * token]).max() <= 1
                for r in range(rows) for c in range(cols)]   # focus tokens keep the picture, the rest is darkened
    assert [i for i, kept in enumerate(in_focus) if kept] == accel.mask.focus[0].tolist()
    written = json.loads(Image.open(out / "full" / "masks" / name).info["parameters"])
    assert (written["prompt"], written["seed"], written["aesmask"]) == (PROMPTS[2], 1, accel.reports[0].describe())


def test_results_hold_every_score_and_the_differences(evaluated, weights):
    out, lines = evaluated.out, results(evaluated.out)
    assert [(r["configuration"], r["prompt"], r["seed"]) for r in lines] == [
        (c, p, s) for c in ("full", "step-cache-only") for p in PROMPTS for s in SEEDS]
    for line in lines:
        assert set(line["scores"]["dense"]) == {"clip_score", "aesthetic", "hps_v2.1", "pickscore"}
        assert set(line["scores"]["accelaes"]) == {"clip_score", "aesthetic", "hps_v2.1", "pickscore", "psnr", "ssim"}
        for metric, difference in line["differences"].items():
            assert difference == line["scores"]["accelaes"][metric] - line["scores"]["dense"][metric]
        manifest = {json.loads(m)["file"]: json.loads(m) for m in
                    (out / line["configuration"] / "manifest.jsonl").read_text().splitlines()}
        assert line["seconds"]["accelaes"] == manifest[Path(line["files"]["accelaes"]).name]["seconds"]
        assert line["speedup"] == pytest.approx(line["seconds"]["dense"] / line["seconds"]["accelaes"])
        assert all((out / path).is_file() for path in line["files"].values() if path is not None)
        assert (line["files"]["mask"] is None) == (line["configuration"] == "step-cache-only")
    full = [line for line in lines if line["configuration"] == "full"]
    fast, dense = (pictures(out / line["files"][side] for line in full) for side in ("accelaes", "dense"))
    prompts = [line["prompt"] for line in full]
    clip = load_clip_score(weights["openai"])
    for side, images in (("accelaes", fast), ("dense", dense)):
        expected = clip(images, prompts).tolist()
        assert [line["scores"][side]["clip_score"] for line in full] == pytest.approx(expected, abs=1e-5)
    assert [line["scores"]["accelaes"]["psnr"] for line in full] == pytest.approx(psnr_of_images(fast, dense).tolist())


def test_summary_is_the_paired_difference_over_prompts(evaluated):
    """summary.json's interval of Δ HPS, redone by hand from results.jsonl: seeds averaged per
    prompt, then Student's t with 2 degrees of freedom (3 prompts)."""
    lines = [line for line in results(evaluated.out) if line["configuration"] == "full"]
    per_prompt = [np.mean([line["differences"]["hps_v2.1"] for line in lines if line["prompt"] == p]) for p in PROMPTS]
    mean, sd = np.mean(per_prompt), np.std(per_prompt, ddof=1)
    half = T_975_DF2 * sd / math.sqrt(3)
    summary = json.loads((evaluated.out / "summary.json").read_text())
    full = summary["configurations"]["full"]
    hps = full["differences"]["hps_v2.1"]
    assert (hps["prompts"], hps["note"]) == (3, "")
    expected = [mean, mean - half, mean + half]
    assert [hps["mean"], hps["low"], hps["high"]] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    dense_seconds = np.mean([line["seconds"]["dense"] for line in lines])
    fast_seconds = np.mean([line["seconds"]["accelaes"] for line in lines])
    assert full["speedup"] == pytest.approx(dense_seconds / fast_seconds)
    assert summary["metrics"] == ["clip_score", "aesthetic", "hps_v2.1", "pickscore", "psnr", "ssim"]
    assert "imagereward" in summary["did_not_run"]
    table = (evaluated.out / "summary.md").read_text()
    assert f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]" in table
    assert "| dense |" in table and "| StepCache only |" in table and f"{dense_seconds / fast_seconds:.2f}x" in table


def pair(prompt: int, seed: int, accelaes: float, dense: float) -> Pair:
    return Pair("full", prompt, f"prompt {prompt}", seed, {"dense": "", "accelaes": "", "mask": None},
                {"dense": {"m": dense}, "accelaes": {"m": accelaes, "psnr": accelaes}}, {"dense": 1.0, "accelaes": 0.5},
                None, None)


def test_aggregation_averages_each_prompts_seeds_first():
    # Differences per image: prompt 0: 1, 3; prompt 1: -1; prompt 2: 4, 5, 6. Per prompt 2, -1, 5:
    # mean 2, sd 3, half width t(0.975, 2) * 3 / sqrt(3). Over images the mean would be 3.
    pairs = [pair(0, 0, 1.0, 0.0), pair(0, 1, 13.0, 10.0), pair(1, 0, 0.0, 1.0),
             pair(2, 0, 4.0, 0.0), pair(2, 1, 5.0, 0.0), pair(2, 2, 6.0, 0.0)]
    result = difference_over_prompts(pairs, "m")
    half = T_975_DF2 * 3 / math.sqrt(3)
    assert (result.mean, result.prompts) == (pytest.approx(2.0), 3)
    assert (result.low, result.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    fast = mean_over_prompts(pairs, "accelaes", "m")            # per prompt 7, 0, 5
    assert fast.mean == pytest.approx(4.0)
    assert difference_over_prompts(pairs[:2], "m").low is None  # one prompt: no interval
    identical = mean_over_prompts([pair(0, 0, math.inf, 0.0), pair(1, 0, 30.0, 0.0)], "accelaes", "psnr")
    assert identical.mean == math.inf and identical.low is None and "1 of 2 prompts" in identical.note


# ---- report.html -----------------------------------------------------------------------------

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}


class PageChecker(HTMLParser):
    """Every tag closed in order; every link and image source collected; ids and script tags noted."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.problems: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in ("script", "iframe", "object") or any(name.startswith("on") for name in attributes):
            self.problems.append(f"<{tag}> with script")
        self.links += [attributes[a] for a in ("src", "href") if a in attributes]
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
        else:
            self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(path: Path) -> PageChecker:
    checker = PageChecker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.problems == [] and checker.open == []
    return checker


def test_report_is_valid_html_that_links_only_files_that_exist(evaluated):
    out = evaluated.out
    page = check_page(out / "report.html")
    for link in page.links:
        if link.startswith("#"):
            assert link[1:] in page.ids
        else:
            assert "://" not in link and not link.startswith("/") and (out / link).is_file(), link
    lines = results(out)
    shown = {link for link in page.links if not link.startswith("#")}
    assert shown == {path for line in lines for path in line["files"].values() if path is not None}
    assert any(PROMPTS[2] in text for text in page.text)          # escaped, so shown as typed


def test_report_orders_prompts_by_the_largest_difference_first(evaluated):
    html = (evaluated.out / "report.html").read_text(encoding="utf-8")
    full = html[html.index('<h2 id="full">'):html.index('<h2 id="step-cache-only">')]
    lines = [line for line in results(evaluated.out) if line["configuration"] == "full"]
    size = {p: abs(np.mean([line["differences"]["hps_v2.1"] for line in lines if line["prompt"] == p]))
            for p in PROMPTS}
    expected = sorted(PROMPTS, key=size.get, reverse=True)
    shown = [full.index(f"0{PROMPTS.index(p):03d}-") for p in expected]     # each prompt's first picture
    assert shown == sorted(shown)


def browser() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(browser() is None, reason="no chromium here (apt-get install chromium-headless-shell)")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", (evaluated.out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 2000     # the pictures drew: a page of text and tables alone has a few hundred


# ---- resume ----------------------------------------------------------------------------------

def digests(folder: Path) -> dict[str, tuple[str, int]]:
    """Every picture's content and time of writing: an image made again has a new time, even if equal."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*.png"))}


def test_a_resumed_run_makes_only_the_missing_images(evaluated, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated.out, out)
    argv = [*evaluated.argv[:3], out, *evaluated.argv[4:]]      # the same run, into the copy
    before = digests(out)
    again = run_evaluate(argv)
    assert again.code == 0, again.stderr
    assert again.stderr.count("0 images to make") == 3 and digests(out) == before
    name = "0001-a-cinematic-portrait-of-an-old-sailor-s0.png"
    (out / "full" / name).unlink()
    (out / "full" / "masks" / name).unlink()
    third = run_evaluate(argv)
    assert third.code == 0, third.stderr
    assert "1 images to make" in third.stderr and third.stderr.count("0 images to make") == 2
    after = digests(out)
    assert set(after) == set(before) and (out / "full" / "masks" / name).is_file()
    assert {k: v for k, v in after.items() if name not in k} == {k: v for k, v in before.items() if name not in k}
    assert len(results(out)) == 12


def test_a_folder_of_another_configuration_is_refused_before_anything_is_made(evaluated, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated.out, out)
    shutil.rmtree(out / "dense")
    manifest = out / "full" / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace('"skip_ratio": 0.5', '"skip_ratio": 0.4'))
    before = snapshot(tmp_path)
    result = run_evaluate([*evaluated.argv[:3], out, *evaluated.argv[4:]])
    assert result.code == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert "made with other settings (accelaes.skip_ratio 0.4 there, 0.5 now)" in result.stderr
    assert snapshot(tmp_path) == before      # dense was not made again first


# ---- bad input -------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict:
    return {path: (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


BAD = [
    (["--hps-weights", "{tmp}/missing.pt", "--hps-tokenizer", "{tokenizer}"],
     "--hps-weights {tmp}/missing.pt does not exist"),
    (["--configs", "full,fast"], "--configs: unknown configuration 'fast'; known: full, step-cache-only"),
    (["--configs", "full,full"], "--configs names full twice"),
    (["--configs", "full,"], "has an empty name"),
    (["--aesthetic-head", "{head}"], "--aesthetic-head given without --aesthetic-clip"),
    (["--pickscore-tokenizer", "{tokenizer}"], "--pickscore-tokenizer given without --pickscore-weights"),
    (["--clip-score-weights", "{tmp}/broken.safetensors"], "broken.safetensors is truncated, damaged"),
    (["--pickscore-weights", "{tmp}/no-tokenizer"], "holds no CLIP tokenizer"),
    (["--sort-by", "pickscore"], "--sort-by pickscore: that metric does not run (no --pickscore-weights given)"),
    (["--model", "sd3", "--configs", "full,uniform-weights"], "--configs uniform-weights: --model sd3 builds no focus"),
    (["--steps", "5"], "--configs full: mask_step 5 must be at least 0 and before the last step (4)"),
    (["--seeds", "a,b"], "--seeds a,b: give whole numbers"),
    (["--seeds", "1,1"], "seed 1 is given twice"),
    (["--seeds", "0", "--images-per-prompt", "2"], "--seeds and --images-per-prompt both"),
    (["--images-per-prompt", "0"], "--images-per-prompt 0 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--prompts", "{tmp}/missing.txt"], "missing.txt is not a file"),
    (["--output-dir", "{tmp}/file.txt"], "file.txt is a file"),
    (["--solver", "midpoint"], "AccelAes extrapolates Euler steps"),
    (["--height", "100"], "--height 100 is not a positive multiple of 16"),
    (["--weights", "{tmp}/missing"], "--weights {tmp}/missing does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, weights, flags, message):
    (tmp_path / "prompts.txt").write_text("a red fox\ntwo boats\n")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "no-tokenizer").mkdir()
    shutil.copy(weights["pick"] / "model.safetensors", tmp_path / "no-tokenizer")
    before = snapshot(tmp_path)
    values = {"tmp": tmp_path, "tokenizer": weights["tokenizer"], "head": weights["head"]}
    argv = ["--prompts", tmp_path / "prompts.txt", "--output-dir", tmp_path / "out", "--height", "64",
            *(flag.format(**values) for flag in flags)]
    result = run_evaluate(argv)
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message.format(**values) in result.stderr
    assert snapshot(tmp_path) == before


def test_every_flag_has_help():
    for action in evaluate.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


# ---- the shipped prompts ---------------------------------------------------------------------

def test_the_shipped_prompt_set_reads_and_its_readme_says_where_it_comes_from():
    prompts = read_prompts(ROOT / "prompts" / "partiprompts-sample.txt")
    texts = [line.prompt for line in prompts]
    assert 50 <= len(texts) <= 100 and len(set(texts)) == len(texts)
    readme = (ROOT / "prompts" / "README.md").read_text(encoding="utf-8")
    assert f"{len(texts)} prompts" in readme
    for fact in ("google-research/parti", "Apache", "Scaling Autoregressive Models for Content-Rich Text-to-Image "
                 "Generation", "Pick-a-Pic", "DrawBench"):
        assert fact in readme
    assert evaluate.PROMPTS == ROOT / "prompts" / "partiprompts-sample.txt"
