"""The checkpoint reader and loader: layouts of files, dtype casts, clear errors, peak memory."""

import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoint import Checkpoint, CheckpointError, build_on_meta, load_into
from models.keys import Concat, Key, Layout, SwappedHalves, describe, fused, renamed
from models.vae import load_vae
from tests.common import save_state


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 4, bias=False)
        self.register_buffer("table", torch.zeros(3, 5))


def toy_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"first.weight": torch.randn(16, 8, generator=generator), "first.bias": torch.randn(16, generator=generator),
            "second.weight": torch.randn(4, 16, generator=generator), "table": torch.randn(3, 5, generator=generator)}


def load_toy(path, dtype=None, prefix=""):
    checkpoint = Checkpoint(path)
    layout = Layout("toy", prefix, renamed(checkpoint.keys(), prefix, []))
    return load_into(build_on_meta(Toy), checkpoint, layout, dtype=dtype)


def assert_loaded(model, state, dtype=torch.float32):
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and tensor.dtype == dtype
        torch.testing.assert_close(tensor, state[name].to(dtype), rtol=0, atol=0)


def test_single_file_in_every_stored_dtype(tmp_path):
    state = toy_state()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        path = save_state({k: v.to(dtype) for k, v in state.items()}, tmp_path / f"toy_{dtype}.safetensors")
        assert_loaded(load_toy(path), {k: v.to(dtype) for k, v in state.items()}, dtype)


def test_cast_on_load(tmp_path):
    state = toy_state()
    path = save_state(state, tmp_path / "toy.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        model = load_toy(path, dtype=dtype)
        assert_loaded(model, state, dtype)
        assert not any(p.requires_grad for p in model.parameters())


def test_fp8_file_is_read(tmp_path):
    state = toy_state()
    path = save_state({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, tmp_path / "toy.safetensors")
    model = load_toy(path, dtype=torch.float32)
    assert_loaded(model, {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, torch.float32)


def test_shards_with_index_and_folder(tmp_path):
    state = toy_state()
    folder = tmp_path / "transformer"
    shards = {"model-00001-of-00002.safetensors": ["first.weight", "first.bias"],
              "model-00002-of-00002.safetensors": ["second.weight", "table"]}
    for name, keys in shards.items():
        save_state({k: state[k] for k in keys}, folder / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"answer": 42}))
    assert_loaded(load_toy(folder / "model.safetensors.index.json"), state)
    assert_loaded(load_toy(folder), state)
    assert Checkpoint(folder).config == {"answer": 42}
    # A variant file beside the plain one is not picked.
    save_state({k: v.half() for k, v in state.items()}, folder / "model.fp16.safetensors")
    assert_loaded(load_toy(folder), state)


def test_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        Checkpoint(tmp_path)


def test_legacy_pth_read_with_weights_only(tmp_path):
    state = toy_state()
    torch.save({"model": state}, tmp_path / "consolidated.00-of-01.pth")
    assert_loaded(load_toy(tmp_path / "consolidated.00-of-01.pth"), state)

    class Payload:  # a pickle that would run code: refused, not executed
        def __reduce__(self):
            return (print, ("executed",))
    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        Checkpoint(tmp_path / "evil.pth")


def test_prefix_selects_one_model(tmp_path):
    state = toy_state()
    other = {"model.diffusion_model.x_embedder.weight": torch.ones(2)}
    path = save_state({**{"vae." + k: v for k, v in state.items()}, **other}, tmp_path / "full.safetensors")
    assert_loaded(load_toy(path, prefix="vae."), state)


def test_truncated_file(tmp_path):
    path = save_state(toy_state(), tmp_path / "toy.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated.*download it again"):
        Checkpoint(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="download it again"):
        Checkpoint(path)


def test_errors_name_the_file(tmp_path):
    """Every error names the file it read: a tensor of a dtype torch cannot hold, a file that holds
    no model of the kind asked for (the error says what it holds instead)."""
    header = json.dumps({"x": {"dtype": "F6_E2M3", "shape": [8], "data_offsets": [0, 6]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "fp6.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(6))
    checkpoint = Checkpoint(path)
    assert checkpoint.shape("x") == (8,)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: tensor x cannot be read")):
        checkpoint.read("x")
    path = save_state(toy_state(), tmp_path / "toy.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: no VAE found") + ".*no model this project knows"):
        load_vae(path)


def test_file_of_another_model(tmp_path):
    flux_like = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2), "img_in.weight": torch.zeros(2)}
    path = save_state(flux_like, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_toy(path)
    message = str(error.value)
    assert "Missing 4 (named as this project's model names them): table, first.weight" in message and "Unexpected 2" in message
    assert "FLUX.1 transformer (original layout)" in message and "\n" not in message


def test_missing_and_wrong_shape(tmp_path):
    state = toy_state()
    path = save_state({k: v for k, v in state.items() if k != "table"}, tmp_path / "toy.safetensors")
    with pytest.raises(CheckpointError, match=r"Missing 1 \(.*\): table"):
        load_toy(path)
    state["second.weight"] = torch.zeros(4, 17)
    path = save_state(state, tmp_path / "toy.safetensors")
    with pytest.raises(CheckpointError, match=r"second.weight has shape \(4, 17\)"):
        load_toy(path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no weight file"):
        Checkpoint(tmp_path)


def test_describe_names_several_models():
    keys = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight",
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"]
    text = describe(keys)
    assert "SD3 MMDiT (original layout) under 'model.diffusion_model.'" in text
    assert "VAE (LDM layout) under 'first_stage_model.'" in text
    assert "CLIP text tower (transformers layout) under 'text_encoders.clip_l.transformer.'" in text


PEAK_SCRIPT = textwrap.dedent("""
    import sys, threading, torch
    from torch import nn
    from models.checkpoint import Checkpoint, build_on_meta, load_into
    from models.keys import Layout, renamed

    def anonymous_bytes():  # RssAnon: this process's own memory; mapped file pages (page cache) not counted
        line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(50))

    checkpoint = Checkpoint(sys.argv[1])
    model = build_on_meta(Big)
    layout = Layout("big", "", renamed(checkpoint.keys(), "", []))
    before = anonymous_bytes()
    peak, done = before, threading.Event()

    def watch():  # the kernel keeps a peak of all resident memory only (VmHWM): sample RssAnon
        global peak
        while not done.is_set():
            peak = max(peak, anonymous_bytes())
            done.wait(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    load_into(model, checkpoint, layout)
    done.set()
    watcher.join()
    print(max(peak, anonymous_bytes()) - before)
""")


def test_peak_memory(tmp_path):
    """Loading a ~210 MB checkpoint raises the peak anonymous memory by less than 1.3x its size.

    Anonymous memory, not all resident memory: the file is memory-mapped, and its pages are
    page cache the system can drop; the weights the model keeps are the one copy that counts.
    """
    state = {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(50)}
    path = save_state(state, tmp_path / "big.safetensors")
    size = path.stat().st_size
    del state
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=root,
                            capture_output=True, text=True, check=True)
    growth = int(result.stdout.strip())
    assert size * 0.9 < growth < 1.3 * size, f"peak grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def test_fused_and_swapped_sources(tmp_path):
    generator = torch.Generator().manual_seed(0)
    q, k, v, mod = (torch.randn(rows, 3, generator=generator) for rows in (4, 2, 2, 6))
    checkpoint = Checkpoint(save_state({"q": q, "k": k, "v": v, "mod": mod}, tmp_path / "parts.safetensors"))
    fused = Concat(("q", "k", "v"))
    assert fused.shape(checkpoint.shape) == (8, 3) and fused.keys == ("q", "k", "v")
    assert torch.equal(fused.read(checkpoint.read), torch.cat([q, k, v]))
    swapped = SwappedHalves("mod")
    assert swapped.shape(checkpoint.shape) == (6, 3)
    assert torch.equal(swapped.read(checkpoint.read), torch.cat([mod[3:], mod[:3]]))


def test_fused_parts():
    """fused() joins the parts a layout named `<fused>.<part>.<param>`, in the given order; a
    fused tensor with a part missing is left out, for the loader to report."""
    mapping = {"a.qkv.v.weight": Key("v"), "a.qkv.q.weight": Key("q"), "a.qkv.k.weight": Key("k"),
               "b.qkv.q.weight": Key("q2"), "a.proj.weight": Key("p")}
    assert fused(mapping, {"qkv": ("q", "k", "v")}) == {"a.qkv.weight": Concat(("q", "k", "v")),
                                                        "a.proj.weight": Key("p")}
