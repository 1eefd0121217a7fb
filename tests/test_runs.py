"""Many prompts (runs/): a prompt file's images, in batches, on several processes, interrupted and
resumed, are the images each (prompt, seed) gives alone; the prompt file's mistakes are one line.

Batching changes the shapes of the matrix products, and with them how their sums round: a
batched image may differ from the same image made alone by 1/255 in a few values (measured: at
most 2 of the 12288 of a 64x64 image, final latents within 1e-6 relative). A batch of one is the
very same computation as `pipeline.generate`, so those images are equal exactly. A leak of one
sample's state into another is larger: a shared seed changes whole pictures, and even a mask
handed to the wrong prompt, on the least sensitive tiny model (Lumina-Next's), changes 69 values
or more and the final latents by 1e-4 relative.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
from accelaes import ANCHORS, AccelAes, AccelAesConfig
from cli.files import to_pil
from pipelines import REGISTRY
from runs import (MANIFEST, Progress, PromptFileError, PromptLine, make_jobs, read_prompts, run_jobs,
                  seed_list)
from runs.distributed import Process, data_parallel, torchrun_ranks
from runs.runner import NonFiniteError, OtherRunError

ROOT = Path(__file__).resolve().parents[1]


def sample_py(prompts: Path, folder: Path, *flags: str, steps: int = 6) -> list[str]:
    """sample.py on a prompt file with the random Lumina-Next model, every AccelAes part on and its mask
    built early enough for a few steps."""
    return [str(ROOT / "sample.py"), "--prompts", str(prompts), "--output-dir", str(folder), "--height", "64",
            "--width", "64", "--steps", str(steps), "--sparse", "--spatial-cfg", "--mask-step", "2", "--warmup", "2",
            *flags]
SIZE, STEPS, TOKENS = 64, 6, 64     # TOKENS: T5's and Gemma's longest prompt (FLUX's own 512 would be slow)
ACCELAES = dict(sparse=True, spatial_cfg=True, mask_step=2, warmup=2)   # every part of the method in 6 steps
# Five prompts of different lengths (Lumina-Next pads a batch to its longest), one with a negative prompt.
PROMPTS = [PromptLine("test:1", "a red fox in snow"),
           PromptLine("test:2", "A cinematic portrait of an old sailor, highly detailed", "blurry, low quality"),
           PromptLine("test:3", "cat"),
           PromptLine("test:4", "a lighthouse at dusk, oil painting, waves breaking on the rocks below"),
           PromptLine("test:5", "ein Würfel aus Glas")]
SEEDS = [0, 7]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' matrices are too small to share among threads: on a busy machine the
    threads' waiting for each other costs more than the products (4x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def backbone(request):
    return request.param, REGISTRY[request.param].pipeline.random(seed=0)


def accelerator(name: str, embed=None):
    config = AccelAesConfig(**{**REGISTRY[name].accelaes, **ACCELAES})
    return lambda: AccelAes.create(config, embed)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def small(pipeline, steps: int = STEPS):
    return pipeline.Settings(steps=steps, max_sequence_length=TOKENS)


def run(pipeline, name, jobs, folder, **options):
    return run_jobs(pipeline, jobs, folder, settings=small(pipeline), height=SIZE, width=SIZE,
                    accelerator=accelerator(name), stream=io.StringIO(), **options)


# ---- batching ----------------------------------------------------------------------------------

def test_batch_size_changes_no_image(backbone, tmp_path):
    name, pipeline = backbone
    jobs = make_jobs(PROMPTS, SEEDS)
    assert len(jobs) == 10
    one = run(pipeline, name, jobs, tmp_path / "one", batch_size=1)
    three = run(pipeline, name, jobs, tmp_path / "three", batch_size=3)
    assert (one.written, three.written, one.manifest_lines, three.manifest_lines) == (10, 10, 10, 10)
    settings = small(pipeline)
    for job in jobs:
        _, alone = pipeline.generate([job.prompt], [job.negative_prompt], seed=job.seed, height=SIZE, width=SIZE,
                                     settings=settings, accelerator=accelerator(name)())
        alone = np.asarray(to_pil(alone[0])).astype(np.int16)
        batched = pixels(tmp_path / "three" / job.file)
        assert np.array_equal(pixels(tmp_path / "one" / job.file), alone), job.file   # the same computation
        assert np.abs(batched - alone).max() <= 1, job.file                             # rounding only
        assert (batched != alone).sum() <= 24, job.file
    # Another seed is another picture: the seeds reach the noise.
    assert np.abs(pixels(tmp_path / "one" / jobs[0].file) - pixels(tmp_path / "one" / jobs[1].file)).max() > 10
    lines = manifest(tmp_path / "three")
    assert [line["file"] for line in lines] == [job.file for job in jobs]
    assert {line["batch_size"] for line in lines} == {3, 1}      # 10 images: three batches of 3, one of 1
    png = json.loads(Image.open(tmp_path / "three" / jobs[3].file).info["parameters"])
    assert (png["prompt"], png["negative_prompt"], png["seed"], png["steps"]) == (
        jobs[3].prompt, "blurry, low quality", 7, STEPS)
    assert png["accelaes"]["evaluations"]["sparse"] > 0


def test_encode_first_frees_the_text_encoders_and_changes_no_image(backbone, tmp_path):
    name, _ = backbone
    pipeline = REGISTRY[name].pipeline.random(seed=0)    # this one loses its text encoders
    jobs = make_jobs(PROMPTS[:3], [5])
    run(pipeline, name, jobs, tmp_path / "plain", batch_size=2)
    run(pipeline, name, jobs, tmp_path / "first", batch_size=2, encode_first=True)
    for job in jobs:
        assert np.array_equal(pixels(tmp_path / "plain" / job.file), pixels(tmp_path / "first" / job.file))
    assert all(getattr(pipeline, encoder) is None for encoder in pipeline.text_encoders)
    assert pipeline.text_encoders and pipeline.aesmask_clip() is None
    with pytest.raises(RuntimeError, match="text encoders were freed"):
        pipeline.generate(["a cat"], height=SIZE, width=SIZE, settings=small(pipeline, 2))


def standin_embedder(anchors: tuple[str, ...]):
    """Each anchor phrase its own direction and every other phrase one more: a prompt word is
    aesthetic (similarity 1) exactly when it is an anchor."""
    index = {anchor: i for i, anchor in enumerate(anchors)}

    def embed(phrases: list[str]) -> torch.Tensor:
        vectors = torch.zeros(len(phrases), len(anchors) + 1)
        for row, phrase in enumerate(phrases):
            vectors[row, index.get(phrase, len(anchors))] = 1
        return vectors
    return embed


def test_each_prompt_of_a_batch_gets_its_own_mask(backbone):
    name, pipeline = backbone
    prompts, seeds = ["a cinematic portrait, highly detailed", "a cat sitting on a mat"], [3, 4]
    make = accelerator(name, standin_embedder(ANCHORS))
    settings = small(pipeline)
    together = make()
    latents, images = pipeline.generate(prompts, seed=seeds, height=SIZE, width=SIZE, settings=settings,
                                        accelerator=together)
    assert [report.mode for report in together.reports] == ["aesthetic", "uniform"]
    assert {word for word, _, _ in together.reports[0].matched} == {"cinematic", "portrait", "detailed"}
    assert not torch.equal(together.mask.focus[0], together.mask.focus[1])
    assert (together.guidance_map is None) == (name == "flux")       # FLUX runs no CFG, so no spatial CFG
    for b, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = make()
        latent, image = pipeline.generate([prompt], seed=seed, height=SIZE, width=SIZE, settings=settings,
                                          accelerator=alone)
        assert alone.reports[0].mode == together.reports[b].mode
        weights, in_batch = alone.token_weights[0], together.token_weights[b]   # Lumina-Next pads a batch
        assert torch.equal(in_batch[:len(weights)], weights) and not in_batch[len(weights):].any()  # further
        assert torch.equal(alone.mask.focus[0], together.mask.focus[b])
        torch.testing.assert_close(alone.mask.affinity[0], together.mask.affinity[b], rtol=1e-4, atol=1e-6)
        if alone.guidance_map is not None:
            assert torch.equal(alone.guidance_map[0], together.guidance_map[b])
        assert ((latent[0] - latents[b]).norm() / latent[0].norm()).item() < 1e-5     # rounding: 1e-6
        difference = np.abs(np.asarray(to_pil(image[0])).astype(int) - np.asarray(to_pil(images[b])).astype(int))
        assert difference.max() <= 1


def test_a_list_of_seeds_draws_each_sample_alone_and_one_seed_the_whole_batch(backbone):
    _, pipeline = backbone
    settings = pipeline.resolve(small(pipeline, 2))
    per_sample = pipeline.prepare(["a", "b"], seed=[11, 12], height=SIZE, width=SIZE, settings=settings).noise
    for b, seed in enumerate([11, 12]):
        alone = pipeline.prepare(["a"], seed=seed, height=SIZE, width=SIZE, settings=settings).noise
        assert torch.equal(per_sample[b], alone[0])
    shared = pipeline.prepare(["a", "b"], seed=11, height=SIZE, width=SIZE, settings=settings).noise
    assert torch.equal(shared[0], per_sample[0]) and not torch.equal(shared[1], per_sample[1])
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        pipeline.prepare(["a", "b"], seed=[1, 2, 3], height=SIZE, width=SIZE, settings=settings)
    with pytest.raises(ValueError, match="seed -1 is not a whole number"):
        pipeline.prepare(["a"], seed=[-1], height=SIZE, width=SIZE, settings=settings)


# ---- several processes, interruption, resume -----------------------------------------------------

def write_prompt_file(folder: Path, count: int) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(f"{line.prompt}\n" for line in (PROMPTS * 3)[:count]))
    return path


def quiet_environment() -> dict:
    """One thread per process: the subprocesses share the machine's cores with this one (torchrun sets
    the same for its processes)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_two_processes_write_what_one_writes(tmp_path):
    prompts = write_prompt_file(tmp_path, 3)
    flags = ["--seeds", "0,1", "--batch-size", "2"]
    alone = subprocess.run([sys.executable, *sample_py(prompts, tmp_path / "one", *flags)],
                           capture_output=True, text=True, timeout=300, env=quiet_environment())
    assert alone.returncode == 0, alone.stderr
    environment = {**quiet_environment(), "GLOO_SOCKET_IFNAME": "lo"}    # loopback only
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                            *sample_py(prompts, tmp_path / "two", *flags)],
                           capture_output=True, text=True, timeout=300, env=environment)
    assert ranks.returncode == 0, ranks.stderr
    assert "rank 0/2: 3 images to make" in ranks.stderr and "rank 1/2: 3 images to make" in ranks.stderr
    lines = manifest(tmp_path / "two")
    jobs = make_jobs(read_prompts(prompts), [0, 1])
    assert [line["file"] for line in lines] == [job.file for job in jobs]      # each image once, in order
    assert sorted(line["rank"] for line in lines) == [0] * 3 + [1] * 3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([MANIFEST] + [job.file for job in jobs])
    for job in jobs:
        assert np.abs(pixels(tmp_path / "one" / job.file) - pixels(tmp_path / "two" / job.file)).max() <= 1


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_run_resumes_with_the_missing_images_only(tmp_path, signal_number):
    prompts, folder = write_prompt_file(tmp_path, 4), tmp_path / "out"
    # 30 steps: slow enough that the signal lands before the last image.
    command = [sys.executable, *sample_py(prompts, folder, "--seeds", "0,1", steps=30)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=quiet_environment())
    deadline = time.monotonic() + 240
    while not ((folder / MANIFEST).is_file() and len((folder / MANIFEST).read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal_number)
    process.communicate(timeout=120)
    assert process.returncode != 0
    done = set()
    for line in (folder / MANIFEST).read_text().splitlines():
        try:
            done.add(json.loads(line)["file"])
        except json.JSONDecodeError:      # a line the kill cut short: its image is not done
            assert signal_number == signal.SIGKILL
    pngs = {path.name for path in folder.glob("*.png")}
    assert done <= pngs and 2 <= len(done) < 8       # killed midway; every line's image is whole
    if signal_number == signal.SIGINT:               # interrupted: it tidied up after itself
        assert done == pngs and not list(folder.glob(".*"))
    # What a kill while writing can leave: a temporary file, a manifest line cut short.
    (folder / ".0003-cat-s1.png.0badf00d.part").write_bytes(b"\x89PNG half")
    with open(folder / MANIFEST, "a") as file:
        file.write('{"index": 5, "file": "0002-cat-s1.p')
    before = {name: (folder / name).stat().st_mtime_ns for name in done}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=quiet_environment())
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {8 - len(done)} images, skipped {len(done)} of 8" in rerun.stderr
    assert all((folder / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    lines = manifest(folder)
    jobs = make_jobs(read_prompts(prompts), [0, 1])
    assert [line["file"] for line in lines] == [job.file for job in jobs]
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST] + [job.file for job in jobs])


def test_overwrite_makes_every_image_again_and_files_follow_the_umask(tmp_path):
    pipeline = REGISTRY["lumina-next"].pipeline.random(seed=0)
    jobs = make_jobs(PROMPTS[:2], [0])
    previous = os.umask(0o027)
    try:
        first = run(pipeline, "lumina-next", jobs, tmp_path, batch_size=2)
    finally:
        os.umask(previous)
    assert {path.stat().st_mode & 0o777 for path in tmp_path.iterdir()} == {0o640}   # not mkstemp's 0600
    again = run(pipeline, "lumina-next", jobs, tmp_path, batch_size=2)
    forced = run(pipeline, "lumina-next", jobs, tmp_path, batch_size=2, overwrite=True)
    assert (first.written, again.written, again.skipped, forced.written) == (2, 0, 2, 2)
    assert len(manifest(tmp_path)) == 2
    with pytest.raises(OtherRunError, match=r"0000-a-red-fox-in-snow-s0.png was made with other settings "
                                            r"\(settings.steps 6 there, 5 now\): make the images again"):
        run_jobs(pipeline, jobs, tmp_path, settings=small(pipeline, steps=5), height=SIZE, width=SIZE,
                 accelerator=accelerator("lumina-next"), stream=io.StringIO())
    with pytest.raises(OtherRunError, match=r"\(AccelAes there, dense now\)"):
        run_jobs(pipeline, jobs, tmp_path, settings=small(pipeline), height=SIZE, width=SIZE, accelerator=None,
                 stream=io.StringIO())


def test_a_batch_with_nan_writes_nothing(tmp_path):
    pipeline = REGISTRY["sd3"].pipeline.random(seed=0)
    with torch.no_grad():
        next(pipeline.transformer.parameters()).fill_(float("nan"))     # as broken weights would be
    with pytest.raises(NonFiniteError, match="0000-a-red-fox-in-snow-s0.png, 0001-.* produced NaN or Inf"):
        run(pipeline, "sd3", make_jobs(PROMPTS[:2], [0]), tmp_path, batch_size=2)
    assert list(tmp_path.iterdir()) == []


def test_torchrun_environment():
    with data_parallel("cpu") as process:     # pytest is not under torchrun: one process, no group
        assert process == Process(device="cpu") and not torch.distributed.is_initialized()
    assert torchrun_ranks({}) is None
    assert torchrun_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        torchrun_ranks({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="must all be whole numbers"):
        torchrun_ranks({"RANK": "0"})


def test_progress_redraws_on_a_terminal_and_writes_lines_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        progress = Progress(25, "rank 1/2: ", stream, every=10)
        for _ in range(25):
            progress.advance()
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == [
        "rank 1/2: images 10/25", "rank 1/2: images 20/25", "rank 1/2: images 25/25"]
    assert terminal.getvalue().count("\r") == 25 and terminal.getvalue().count("\n") == 1


def test_benchmark_batch_table(capsys):
    assert benchmark.main(["--model", "lumina-next", "--tiny", "--size", "64", "--steps", "8", "--repeats", "1",
                           "--batch", "3"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["1", "dense"], ["1", "AccelAes"], ["2", "dense"], ["2", "AccelAes"], ["3", "dense"],
                    ["3", "AccelAes"]]


# ---- the prompt file -------------------------------------------------------------------------

def test_prompt_files_and_job_names(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_bytes("\ufeffa red fox in snow\r\n\r\n  Ein Würfel, über alles!  \r\n".encode())
    lines = read_prompts(text)
    assert [(line.where, line.prompt) for line in lines] == [(f"{text}:1", "a red fox in snow"),
                                                             (f"{text}:3", "Ein Würfel, über alles!")]
    assert [job.file for job in make_jobs(lines, seed_list(images_per_prompt=2, base_seed=1))] == [
        "0000-a-red-fox-in-snow-s1.png", "0000-a-red-fox-in-snow-s2.png",
        "0001-ein-wurfel-uber-alles-s1.png", "0001-ein-wurfel-uber-alles-s2.png"]
    jsonl = tmp_path / "prompts.txt"     # JSON Lines by its content
    jsonl.write_text('{"prompt": "a cat", "negative_prompt": "dogs", "seed": 40, "name": "cat.v2"}\n'
                     '{"prompt": "' + "a very long prompt " * 5 + '"}\n')
    jobs = make_jobs(read_prompts(jsonl), seed_list([0, 5]), negative_prompt="blurry")
    assert [(job.index, job.negative_prompt, job.seed, job.file) for job in jobs] == [
        (0, "dogs", 40, "0000-cat.v2-s40.png"), (1, "dogs", 41, "0000-cat.v2-s41.png"),
        (2, "blurry", 0, "0001-a-very-long-prompt-a-very-long-prompt-a-s0.png"),     # 40 characters at most
        (3, "blurry", 5, "0001-a-very-long-prompt-a-very-long-prompt-a-s5.png")]
    with pytest.raises(ValueError, match="seed 3 is given twice"):
        seed_list([3, 1, 3])
    with pytest.raises(ValueError, match="images per prompt 0"):
        seed_list(images_per_prompt=0)


@pytest.mark.parametrize("file, content, line, message", [
    ("empty.txt", b"", None, "the file holds no prompt: write one prompt a line"),
    ("blank.jsonl", b"\n   \n", None, "the file holds no prompt"),
    ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', 2, "not valid JSON"),
    ("list.jsonl", b'{"prompt": "a"}\n["b"]\n', 2, "a JSON list where an object is needed"),
    ("missing.jsonl", b'{"prompt": "a"}\n\n{"seed": 1}\n', 3, 'no "prompt": give each line a prompt'),
    ("empty-prompt.jsonl", b'{"prompt": "  "}\n', 1, "is not a non-empty string"),
    ("number-prompt.jsonl", b'{"prompt": 3}\n', 1, "is not a non-empty string"),
    ("float-seed.jsonl", b'{"prompt": "a", "seed": 1.5}\n', 1, "seed 1.5 is not a whole number"),
    ("text-seed.jsonl", b'{"prompt": "a", "seed": "3"}\n', 1, 'seed "3" is not a whole number'),
    ("big-seed.jsonl", b'{"prompt": "a", "seed": 9223372036854775808}\n', 1, "from 0 to 2**63 - 1"),
    ("negative-seed.jsonl", b'{"prompt": "a", "seed": -1}\n', 1, "seed -1 is not a whole number"),
    ("twice.jsonl", b'{"prompt": "a", "name": "fox"}\n{"prompt": "b", "name": "fox"}\n', 2,
     "name 'fox' is already used at"),
    ("path.jsonl", b'{"prompt": "a", "name": "../fox"}\n', 1, "cannot be part of a file name"),
    ("typo.jsonl", b'{"prompt": "a", "negative": "b"}\n', 1, "unknown field 'negative': the fields are"),
    ("latin1.txt", b"a cat\ncaf\xe9 au lait\n", 2, "not UTF-8 text (byte 0xe9): save the file as UTF-8"),
])
def test_prompt_file_mistakes_are_one_line_naming_file_and_line(tmp_path, file, content, line, message):
    path = tmp_path / file
    path.write_bytes(content)
    with pytest.raises(PromptFileError) as error:
        read_prompts(path)
    text = str(error.value)
    assert "\n" not in text and message in text
    assert text.startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_prompt_file_that_is_missing_or_overflows_its_seeds(tmp_path):
    with pytest.raises(PromptFileError, match="is not a file: give a text file"):
        read_prompts(tmp_path / "none.txt")
    path = tmp_path / "last.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": 9223372036854775807}\n')
    lines = read_prompts(path)
    assert make_jobs(lines, [0])[-1].seed == 2 ** 63 - 1
    with pytest.raises(PromptFileError, match=f"^{path}:2: seed .* passes 2\\*\\*63 - 1"):
        make_jobs(lines, [0, 1])
