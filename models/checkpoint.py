"""Reading released checkpoints lazily, and loading them into modules built on the meta device.

One job: turn a path into tensors, one tensor at a time, and put them into a model
without ever holding a second copy of the checkpoint.

A path can be
  - one `.safetensors` file,
  - a sharded set, named by its `*.safetensors.index.json`,
  - an HF / diffusers component folder (`config.json` beside its weights, sharded or not),
  - a legacy `.pth` / `.bin` / `.pt` file, read only with `torch.load(weights_only=True)`.

Safetensors files are opened with the safetensors library, which checks a header against its
file before anything is read and memory-maps the data. Each tensor is copied out of the map
when it is loaded, into memory the model owns: the anonymous memory of a load stays near one
copy of the weights (see `tests/test_checkpoint.py::test_peak_memory`), and the mapped pages of
the file are page cache the system can drop.

Which checkpoint key becomes which parameter is said by each model's layout (models/keys.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# CheckpointError lives in keys.py, the module every other imports; the models take it from here.
from .keys import CheckpointError, Layout, describe, read_json

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class _SafetensorsFile:
    """One .safetensors file, read through the safetensors library, one tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
        except SafetensorError as error:  # a short file: "incomplete metadata, file not fully covered"
            raise CheckpointError(f"{path} is truncated, damaged or not a safetensors file "
                                  f"({_first_line(error)}): download it again") from None
        except OSError as error:
            raise CheckpointError(f"{path} cannot be opened ({error.strerror or error})") from None

    def keys(self) -> Iterable[str]:
        return self._file.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def read(self, key: str) -> torch.Tensor:
        try:
            tensor = self._file.get_tensor(key)
        except SafetensorError as error:  # e.g. a dtype torch has no type for
            raise CheckpointError(f"{self.path}: tensor {key} cannot be read ({_first_line(error)}); "
                                  "use a file saved in fp32, fp16, bf16 or fp8") from None
        # get_tensor gives a view of the file's memory map: the copy is the model's own, so the
        # model neither pins the file's pages nor breaks if the file is replaced while it lives.
        return tensor.clone()


def _first_line(error: Exception) -> str:
    return str(error).strip().split("\n")[0]


class _TorchFile:
    """A legacy pickle checkpoint, read with weights_only=True (no code is run) and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a pickle with code in it, or a damaged zip
            raise CheckpointError(f"{path} cannot be read safely as a PyTorch checkpoint "
                                  f"({type(error).__name__}); prefer the .safetensors file") from None
        for wrapper in ("state_dict", "model", "module"):  # training checkpoints nest the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} holds no state dict (a {type(state).__name__} without tensors): use the "
                                  "release's weight file")
        self.tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone()


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unknown weight file type; expected .safetensors (or .pth/.bin)")


class Checkpoint:
    """Tensor names, shapes and lazy reads over one or more weight files, plus config.json if any."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config: dict | None = None
        self._file_of: dict[str, object] = {}
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist: check the path given to --weights")
        if self.path.is_dir():
            files = self._files_in_folder(self.path)
            config = self.path / "config.json"
            if config.is_file():
                self.config = read_json(config)
        elif self.path.name.endswith(".index.json"):
            files = self._files_of_index(self.path)
        else:
            files = [self.path]
        for file in map(_open_file, files):
            for key in file.keys():
                self._file_of[key] = file

    @staticmethod
    def _files_of_index(index: Path) -> list[Path]:
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files: download it again")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (index.parent / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not there: {', '.join(missing[:3])}; "
                                  "download every shard into the same folder")
        return [index.parent / n for n in names]

    @classmethod
    def _files_in_folder(cls, folder: Path) -> list[Path]:
        # Prefer the plain files over variants such as model.fp16.safetensors.
        def plain(p: Path) -> bool:
            return re.fullmatch(r"[^.]+\.(safetensors|bin|pth|pt)(\.index\.json)?", p.name) is not None

        for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pth"):
            found = sorted(folder.glob(pattern))
            if not found:
                continue
            found = [p for p in found if plain(p)] or found
            if pattern.endswith(".index.json"):
                if len(found) > 1:
                    raise CheckpointError(f"{folder} holds several shard indexes ({found[0].name}, "
                                          f"{found[1].name}); point --weights at one of them")
                return cls._files_of_index(found[0])
            if len(found) > 1:
                raise CheckpointError(f"{folder} holds several weight files ({', '.join(p.name for p in found[:3])}); "
                                      "point at one file, or keep one per folder")
            return found
        raise CheckpointError(f"{folder} holds no weight file (*.safetensors, *.bin or *.pth): "
                              "download the weights into it (see weights.md)")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of[key].shape(key)

    def read(self, key: str) -> torch.Tensor:
        return self._file_of[key].read(key)


def find_file(path: str | os.PathLike, names: tuple[str, ...], what: str, fix: str) -> Path:
    """`path` itself if it is a file, else the first of `names` inside the folder `path`.

    For files that come in several forms (a tokenizer's .model or .json): the error names what
    was looked for and `fix`, the download that provides it."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist: {fix}")
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} holds no {' or '.join(names)}: {fix}")


def load_into(model: nn.Module, checkpoint: Checkpoint, layout: Layout, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> nn.Module:
    """Fill `model` (usually built on the meta device) from `checkpoint` through `layout`.

    `layout` (see models/keys.py) maps each parameter name of the model to the checkpoint
    key(s) it is read from. Keys are checked strictly first, so nothing is read from a file
    that does not fit. Floating-point tensors are cast to `dtype` one at a time.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _check_keys(model, checkpoint, layout, expected)
    state = {}
    for name, source in layout.mapping.items():
        tensor = source.read(checkpoint.read)
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{checkpoint.path}: {name} has shape {tuple(tensor.shape)} in the file but the "
                f"{type(model).__name__} inferred from the same file expects {expected[name]}; "
                "the file is inconsistent or of an unsupported variant")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _check_keys(model: nn.Module, checkpoint: Checkpoint, layout: Layout, expected: dict) -> None:
    missing = [name for name in expected if name not in layout.mapping]
    used = {key for source in layout.mapping.values() for key in source.keys}
    unexpected = [k for k in layout.scope(checkpoint.keys()) if k not in used]
    extra_targets = [name for name in layout.mapping if name not in expected]
    if not (missing or unexpected or extra_targets):
        return

    def first(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    parts = [f"{checkpoint.path} does not fit {type(model).__name__} (read as the {layout.name} layout"
             + (f" under '{layout.prefix}'" if layout.prefix else "") + ")."]
    if missing:
        parts.append(f"Missing {len(missing)} (named as this project's model names them): {first(missing)}.")
    if unexpected or extra_targets:
        parts.append(f"Unexpected {len(unexpected) + len(extra_targets)}: {first(unexpected + extra_targets)}.")
    parts.append(f"The file looks like: {describe(checkpoint.keys())}.")
    raise CheckpointError(" ".join(parts))


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating its weights; `load_into` then assigns the real tensors."""
    with torch.device("meta"):
        return factory()


def load_model(path_or_checkpoint: str | os.PathLike | Checkpoint,
               find_layout: Callable[[list[str], str | None], Layout],
               build: Callable[[dict[str, tuple[int, ...]], dict | None], nn.Module],
               prefix: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """The one way every model here is loaded.

    find_layout(keys, prefix) -> Layout says where the model sits in the file and how its keys
    map onto our names; build(shapes, config) -> nn.Module infers the configuration from the
    shapes (our names) and config.json, and builds the model, which is built on the meta device
    and filled from the file. Pass an open Checkpoint to read several models from one file.
    """
    checkpoint = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else Checkpoint(path_or_checkpoint)
    try:
        layout = find_layout(checkpoint.keys(), prefix)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None
    shapes = layout.shapes(checkpoint.shape)
    try:
        model = build_on_meta(lambda: build(shapes, checkpoint.config))
    except CheckpointError as error:  # say which file, and that the names are ours, not the file's
        where = f" under '{layout.prefix}'" if layout.prefix else ""
        raise CheckpointError(f"{checkpoint.path} (read as the {layout.name} layout{where}; "
                              f"tensors named as this project names them): {error}") from None
    return load_into(model, checkpoint, layout, dtype=dtype, device=device)
