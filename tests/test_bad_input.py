"""Bad input, as a new user types it: each case exits with code 2, prints one line on stderr that
names the flag or the file (no traceback), and creates or changes no file."""

import hashlib
from pathlib import Path

import pytest

import sample

OUT = ["--height", "64", "--width", "64", "--steps", "8"]


def snapshot(folder: Path) -> dict:
    """Every path below `folder` with its content hash (folders: None), to see any change."""
    return {path: (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


def scenery(tmp: Path) -> None:
    """What the cases point at: a file where a folder should be, a folder where a file should be,
    an existing picture, anchor files in a wrong encoding or empty."""
    (tmp / "file.txt").write_text("not a folder")
    (tmp / "folder.png").mkdir()
    (tmp / "taken.png").write_bytes(b"precious")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "blank.txt").write_text("\n \n")
    (tmp / "prompts.txt").write_text("a red fox\ntwo boats\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "a red fox"}\n{"prompt": "two boats", \n')
    (tmp / "twice.jsonl").write_text('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n')


CASES = [
    # sizes and numbers
    (["--height", "100"], "--height 100 is not a positive multiple of 16"),
    (["--width", "40"], "--width 40 is not a positive multiple of 16"),
    (["--height", "0"], "--height 0 is not a positive multiple of 16"),
    (["--width", "-16"], "--width -16 is not a positive multiple of 16"),
    (["--steps", "0"], "--steps 0 is out of range: give a number at least 1"),
    (["--steps", "-3"], "--steps -3 is out of range"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--seed", str(2 ** 63)], f"--seed {2 ** 63} is out of range"),
    (["--guidance", "-1"], "--guidance -1.0 is out of range"),
    (["--guidance", "nan"], "--guidance nan is not a finite number"),
    (["--guidance", "inf"], "--guidance inf is not a finite number"),
    (["--shift", "0"], "--shift 0.0 is out of range: give a number above 0"),
    (["--shift", "-2"], "--shift -2.0 is out of range"),
    (["--shift", "nan"], "--shift nan is not a finite number"),
    (["--scaling-watershed", "2"], "--scaling-watershed 2.0 is out of range"),
    (["--max-sequence-length", "0"], "--max-sequence-length 0 is out of range"),
    (["--threshold", "1.5"], "--threshold 1.5 is out of range"),
    (["--threshold", "-2"], "--threshold -2.0 is out of range"),
    (["--guidance-fg", "-1"], "--guidance-fg -1.0 is out of range"),
    (["--guidance-bg", "nan"], "--guidance-bg nan is not a finite number"),
    (["--skip-ratio", "1.5"], "--skip-ratio 1.5 is out of range"),
    (["--skip-ratio", "0"], "--skip-ratio 0.0 is out of range"),
    (["--mask-step", "-1"], "--mask-step -1 is out of range"),
    (["--mask-step", "29"], "mask_step 29 must be at least 0 and before the last step (7)"),
    (["--warmup", "1"], "--warmup 1 is out of range"),
    (["--interval", "0"], "--interval 0 is out of range"),
    (["--top-k", "0"], "--top-k 0 is out of range"),
    (["--record-every", "0"], "--record-every 0 is out of range"),
    (["--smooth-sigma", "-1"], "--smooth-sigma -1.0 is out of range"),
    (["--sparse-refresh", "-1"], "--sparse-refresh -1 is out of range"),
    (["--steps", "1"], "1 step leaves no step after the mask step"),
    # text
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),
    (["--negative-prompt", "blurry \udcff"], "--negative-prompt is not valid UTF-8"),
    # paths
    (["--output", "{tmp}/picture.jpg"], "name it *.png"),
    (["--output", "{tmp}/folder.png"], "folder.png is a folder"),
    (["--output", "{tmp}/folder.png", "--overwrite"], "folder.png is a folder"),
    (["--output", "{tmp}/file.txt/out.png"], "file.txt is a file"),
    (["--output", "{tmp}/taken.png"], "taken.png already exists: pass --overwrite"),
    (["--output", "{tmp}/new.png", "--compare", "--output", "{tmp}/taken.png"], "taken.png already exists"),
    (["--output", "/proc/sample.png"], "--output: cannot write in /proc"),
    (["--weights", "{tmp}/missing"], "--weights {tmp}/missing does not exist"),
    (["--weights", "{tmp}/file.txt"], "--weights {tmp}/file.txt is a file, not a folder"),
    (["--clip", "{tmp}/missing"], "--clip {tmp}/missing does not exist"),
    (["--anchors", "{tmp}/missing.txt"], "--anchors {tmp}/missing.txt does not exist"),
    (["--anchors", "{tmp}"], "is a folder: give a text file"),
    (["--anchors", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["--anchors", "{tmp}/empty.txt"], "empty.txt holds no phrase"),
    (["--device", "nosuchdevice"], "try --device cpu"),
    # flags that would do nothing, or cannot run together
    (["--dense", "--compare"], "--compare does nothing with --dense"),
    (["--dense", "--mask-step", "3"], "--mask-step does nothing with --dense"),
    (["--dense", "--no-step-cache"], "--step-cache does nothing with --dense"),
    (["--no-step-cache", "--warmup", "3"], "--warmup acts only with StepCache"),
    (["--no-sparse", "--sparse-refresh", "2"], "--sparse-refresh acts only with SkipSparse"),
    (["--no-sparse", "--no-spatial-cfg", "--save-mask"], "--no-sparse and --no-spatial-cfg turned off what builds it"),
    (["--no-sparse", "--no-spatial-cfg", "--skip-ratio", "0.3"], "--skip-ratio acts only with a focus mask"),
    (["--guidance", "1", "--negative-prompt", "blurry"], "--negative-prompt acts through classifier-free guidance"),
    (["--guidance", "1", "--spatial-cfg"], "--spatial-cfg needs classifier-free guidance"),
    (["--solver", "midpoint"], "--solver midpoint: AccelAes extrapolates Euler steps; add --dense"),
    (["--model", "sd3", "--save-mask"], "SD3 runs StepCache alone by default"),
    (["--model", "sd3", "--guidance-fg", "8"], "--guidance-fg acts only with spatial CFG"),
    (["--model", "sd3", "--solver", "midpoint"], "--solver applies to --model lumina-next only"),
    (["--model", "sd3", "--scaling-watershed", "0.3"], "--scaling-watershed applies to --model lumina-next only"),
    (["--model", "flux", "--spatial-cfg"], "--spatial-cfg needs classifier-free guidance"),
    (["--model", "flux", "--negative-prompt", "blurry"], "FLUX is guidance-distilled"),
    # many prompts
    (["--seeds", "0,1"], "--seeds acts only with --prompts FILE --output-dir DIR"),
    (["--batch-size", "2"], "--batch-size acts only with --prompts FILE --output-dir DIR"),
    (["--prompts", "{tmp}/prompts.txt"], "--prompts and --output-dir go together"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--compare"], "--compare works with one prompt"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--prompt", "x"], "--prompt works with one prompt"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--seeds", "a,b"], "--seeds a,b: give whole numbers"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--seeds", "1,1"], "seed 1 is given twice"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--seeds", "0", "--images-per-prompt", "2"],
     "--seeds and --images-per-prompt both"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--images-per-prompt", "0"],
     "--images-per-prompt 0 is out of range"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out", "--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/file.txt"], "--output-dir {tmp}/file.txt is a file"),
    (["--prompts", "{tmp}/missing.txt", "--output-dir", "{tmp}/out"], "missing.txt"),
    (["--prompts", "{tmp}/blank.txt", "--output-dir", "{tmp}/out"], "blank.txt"),
    (["--prompts", "{tmp}/bad.jsonl", "--output-dir", "{tmp}/out"], "bad.jsonl:2"),
    (["--prompts", "{tmp}/twice.jsonl", "--output-dir", "{tmp}/out"], "twice.jsonl:2"),
    (["--prompts", "{tmp}/latin1.txt", "--output-dir", "{tmp}/out"], "latin1.txt"),
]


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join(flags)[:60] for flags, _ in CASES])
def test_bad_command_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    scenery(tmp_path)
    before = snapshot(tmp_path)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    if "--output" not in flags and "--prompts" not in flags:
        flags += ["--output", str(tmp_path / "out.png")]
    assert sample.main(OUT + flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert message.replace("{tmp}", str(tmp_path)) in error
    assert "Traceback" not in error
    assert snapshot(tmp_path) == before


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_files_follow_the_umask_and_the_last_line_lists_them(tmp_path, capsys):
    import os
    output = tmp_path / "out.png"
    output.write_bytes(b"old")
    output.chmod(0o644)
    previous = os.umask(0o022)
    try:
        assert sample.main(OUT + ["--output", str(output), "--overwrite", "--compare", "--save-mask",
                                  "--mask-step", "3", "--warmup", "3"]) == 0
    finally:
        os.umask(previous)
    names = ["out.png", "out-dense.png", "out-mask.png"]
    assert [oct((tmp_path / name).stat().st_mode & 0o777) for name in names] == [oct(0o644)] * 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("wrote ") and all(str(tmp_path / name) in last for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)   # no temporary file left


def test_progress_in_a_log_is_a_line_every_tenth(tmp_path, capsys):
    assert sample.main(["--height", "64", "--width", "64", "--steps", "20", "--dense",
                        "--output", str(tmp_path / "out.png")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sampling")]
    assert lines == [f"sampling: step {i}/20" for i in range(2, 21, 2)] and "\r" not in "".join(lines)


def test_ctrl_c_ends_with_one_line_and_writes_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, str(root / "sample.py"), "--steps", "400", "--dense", "--height", "64",
                                "--width", "64", "--output", str(tmp_path / "out.png")],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:           # wait until sampling has started
        if line.startswith("sampling: step"):
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert [line for line in rest.splitlines() if line and not line.startswith("sampling")] == \
        ["interrupted: nothing written"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Broken downloads: a real (tiny) Lumina-Next folder as diffusers saves it, damaged one way per case
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def download(tmp_path_factory):
    from tests.test_lumina_pipeline import tiny_diffusers_pipeline
    folder = tmp_path_factory.mktemp("download")
    tiny_diffusers_pipeline(folder / "spm").save_pretrained(folder / "Lumina-Next-tiny")
    return folder / "Lumina-Next-tiny"


def nan_weights(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, path)


DAMAGE = [  # (what to do to the download, words the one line must hold)
    (lambda d: (d / "scheduler/scheduler_config.json").write_text("{not json"),
     "scheduler_config.json is not valid JSON (line 1"),
    (lambda d: (d / "scheduler/scheduler_config.json").write_text("[1, 2]"),
     "scheduler_config.json is not a JSON object (it holds a list)"),
    (lambda d: (d / "scheduler/scheduler_config.json").write_text('{"shift": "three"}'),
     "scheduler_config.json: shift is 'three', not a positive number"),
    (lambda d: (d / "transformer/config.json").write_text("{"), "transformer/config.json is not valid JSON"),
    (lambda d: (d / "vae/config.json").write_bytes(b"\xff\xfe{}"), "vae/config.json is not UTF-8 text"),
    (lambda d: (d / "tokenizer/tokenizer.json").write_text("42"), "tokenizer/tokenizer.json is not a JSON object"),
    (lambda d: (d / "transformer/diffusion_pytorch_model.safetensors").write_bytes(b"<html>error</html>"),
     "diffusion_pytorch_model.safetensors is truncated, damaged or not a safetensors file"),
    (lambda d: (d / "transformer/diffusion_pytorch_model.safetensors").unlink(), "transformer holds no weight file"),
    (lambda d: __import__("shutil").rmtree(d / "vae"), "has no vae (the vae)"),
    (lambda d: __import__("torch").save([1, 2], d / "transformer/diffusion_pytorch_model.bin")
     or (d / "transformer/diffusion_pytorch_model.safetensors").unlink(),
     "diffusion_pytorch_model.bin holds no state dict (a list without tensors)"),
    (lambda d: nan_weights(d / "transformer/diffusion_pytorch_model.safetensors"),
     "the generation produced NaN or Inf values, so no picture was written"),
]


@pytest.mark.parametrize("damage, message", DAMAGE, ids=[m.split(" ")[0][:40] + str(i) for i, (_, m) in enumerate(DAMAGE)])
def test_broken_download(download, tmp_path, capsys, damage, message):
    import shutil
    weights = tmp_path / "weights"
    shutil.copytree(download, weights)
    damage(weights)
    before = snapshot(tmp_path)
    assert sample.main(["--weights", str(weights), "--height", "64", "--width", "64", "--steps", "2", "--dense",
                        "--output", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: ") and message in error, error
    assert snapshot(tmp_path) == before


def test_empty_weights_folder(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    assert sample.main(["--weights", str(tmp_path / "weights"), "--output", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"{tmp_path / 'weights'} holds neither the diffusers layout" in error
