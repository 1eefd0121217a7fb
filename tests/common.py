"""Helpers shared by the tests: tolerances, saving state dicts in released layouts, an attention
probe that keeps what it is shown, the real CLIP BPE file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: one number per comparison, robust to near-zero entries."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def save_state(state: dict[str, torch.Tensor], path: Path, config: dict | None = None) -> Path:
    """Write a state dict as one .safetensors file (contiguous copies, shared storage broken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def read_through(layout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a diffusers state dict) under our parameter names, read through one of our layouts.

    For fixtures that need a file in a model's original layout. The layouts themselves are
    checked against diffusers' own converters, and on keys written out, in each model's tests.
    """
    return {name: source.read(state.__getitem__) for name, source in layout.mapping.items()}


def clip_tower(width: int, heads: int, layers: int, mlp: int, activation: str, projection: int) -> dict:
    """A CLIP tower's shape in transformers' config names, which its text and vision configs share."""
    return dict(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=mlp,
                hidden_act=activation, projection_dim=projection)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised layers (gates, norms) are exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("weight") and param.dim() == 1:  # norm scales stay near 1
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return module


class ProbeRecorder:
    """An AttentionProbe (models/attention.py) for every layer: keeps each call's arguments, in
    order, as (q, k, key_mask, scale, bias), with copies of q and k."""

    def __init__(self):
        self.calls = []

    def for_layer(self, index: int) -> "ProbeRecorder":
        return self

    def record(self, q, k, key_mask, scale, bias=None) -> None:
        self.calls.append((q.clone(), k.clone(), key_mask, scale, bias))


def clip_bpe_file() -> Path:
    """The real CLIP BPE merges shipped in the open_clip_torch wheel (located, never imported)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps open_clip_torch"
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
