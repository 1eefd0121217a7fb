"""Checkpoint keys: which key of a released file becomes which parameter of our modules.

Every model here names its parameters after one release and keeps, beside its `from_shapes`,
the layouts it reads: `clip_layout` in models/clip.py, `flux_layout` in models/flux_params.py,
and so on. A layout is a `Layout`: the prefix the model sits under in the file, and for each
of our parameter names a source that says how to read it (a plain key, a chunk of a fused
tensor, a transpose, ...). This module holds what the layouts share, `Shapes` (what every
`from_shapes` asks of the shapes), and `describe`, which names what a file holds for the
error raised when a file does not fit. It imports no other module of the project.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

import torch


class CheckpointError(ValueError):
    """A problem with a user's weights: its message names the problem and the fix."""


def read_json(path: Path) -> dict:
    """A JSON object from a file of a download (config, scheduler, tokenizer, shard index): any
    problem with it is a CheckpointError naming the file, never a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}): check the download") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: download it again") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}): download it "
                              "again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object (it holds a {type(data).__name__}): download it again")
    return data


def read_text(path: Path) -> str:
    """A UTF-8 text file of a download (merges.txt, ...), with its problems named as read_json's."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}): check the download") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: download it again") from None


Read = Callable[[str], torch.Tensor]
ShapeOf = Callable[[str], tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# Sources: how one parameter is read from the file
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """A tensor stored as the model uses it.

    The other sources that read one key subclass it and say how they change its shape and values.
    """
    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        return tuple(shape_of(self.key))

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key)


@dataclass(frozen=True)
class Chunk(Key):
    """Part `index` of `parts` equal pieces of a fused tensor (e.g. OpenCLIP's q|k|v in_proj)."""
    parts: int
    index: int

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        rows, *rest = shape_of(self.key)
        return (rows // self.parts, *rest)

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key).chunk(self.parts, dim=0)[self.index].clone()


@dataclass(frozen=True)
class Transposed(Key):
    """A matrix stored as x @ P (OpenCLIP's text_projection) where the model keeps P^T."""

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        return tuple(reversed(shape_of(self.key)))

    def read(self, read: Read) -> torch.Tensor:
        return read(self.key).t().contiguous()


@dataclass(frozen=True)
class AsConv1x1(Key):
    """A Linear weight [out, in] used as a 1x1 convolution [out, in, 1, 1] (diffusers' VAE attention)."""

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        shape = tuple(shape_of(self.key))
        return shape + (1, 1) if len(shape) == 2 else shape

    def read(self, read: Read) -> torch.Tensor:
        tensor = read(self.key)
        return tensor[:, :, None, None] if tensor.dim() == 2 else tensor


@dataclass(frozen=True)
class SwappedHalves(Key):
    """diffusers' AdaLayerNormContinuous splits its modulation as (scale, shift) where the
    original code splits (shift, scale): the two halves of dim 0 trade places (same shape)."""

    def read(self, read: Read) -> torch.Tensor:
        first, second = read(self.key).chunk(2, dim=0)
        return torch.cat([second, first], dim=0)


@dataclass(frozen=True)
class Concat:
    """Tensors stored apart that the model keeps fused along dim 0 (diffusers' to_q, to_k, to_v
    -> one qkv; FLUX single blocks' q, k, v and proj_mlp -> linear1)."""
    parts: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parts

    def shape(self, shape_of: ShapeOf) -> tuple[int, ...]:
        shapes = [tuple(shape_of(key)) for key in self.parts]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read(self, read: Read) -> torch.Tensor:
        return torch.cat([read(key) for key in self.parts], dim=0)


Source = Union[Key, Concat]  # Key or one of its subclasses


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """How one model sits in one checkpoint."""
    name: str                       # the layout's name, for error messages
    prefix: str                     # every key of this model starts with it
    mapping: dict[str, Source]      # our parameter name -> where it is read from
    ignore: tuple[str, ...] = field(default=())  # regexes (after the prefix) of keys no parameter reads

    def shapes(self, shape_of: ShapeOf) -> dict[str, tuple[int, ...]]:
        """The shape each of our parameters will have, from the file's header alone (nothing is read)."""
        return {name: tuple(source.shape(shape_of)) for name, source in self.mapping.items()}

    def scope(self, keys: Iterable[str]) -> list[str]:
        """The checkpoint keys that belong to this model: every one of them must be read."""
        return [k for k in keys if k.startswith(self.prefix)
                and not any(re.match(p, k[len(self.prefix):]) for p in self.ignore)]


Rule = tuple[str, Union[str, Callable[[re.Match], str]]]


def renamed(keys: Iterable[str], prefix: str, rules: list[Rule], ignore: tuple[str, ...] = ()) -> dict[str, Key]:
    """Map every key under `prefix` through `rules` (regex, replacement), applied in order.

    Keys matching one of the `ignore` regexes (after the prefix) are left out."""
    mapping = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if any(re.match(pattern, name) for pattern in ignore):
            continue
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        mapping[name] = Key(key)
    return mapping


def fused(mapping: dict[str, Source], parts: dict[str, tuple[str, ...]]) -> dict[str, Source]:
    """Join the tensors a layout named `<X>.<fused>.<part>.<weight|bias>` into one Concat named
    `<X>.<fused>.<weight|bias>`, in the order `parts[fused]` lists them.

    For the files that keep apart what the original fuses (diffusers' to_q, to_k, to_v of one
    qkv). A fused tensor with a part missing is left out: the loader then names it missing,
    and the parts that are there unexpected.
    """
    out: dict[str, Source] = {}
    groups: dict[tuple[str, str], dict[str, str]] = {}    # (fused name, its last component) -> {part: key}
    for name, source in mapping.items():
        match = re.match(r"(.+\.(\w+))\.(\w+)\.(weight|bias)$", name)
        if match and match.group(3) in parts.get(match.group(2), ()):
            target, kind, part, param = match.groups()
            groups.setdefault((f"{target}.{param}", kind), {})[part] = source.key
        else:
            out[name] = source
    for (name, kind), found in groups.items():
        if set(found) == set(parts[kind]):
            out[name] = Concat(tuple(found[part] for part in parts[kind]))
    return out


def ends_with_name(key: str, marker: str) -> bool:
    """`key` is `marker` under some prefix ending in '.' (so 'xdecoder.conv_in' is not 'decoder.conv_in')."""
    return key == marker or (key.endswith(marker) and key[-len(marker) - 1] == ".")


def find_prefix(keys: Iterable[str], markers: Iterable[str], what: str, prefix: str | None) -> tuple[str, str]:
    """Find where a model sits in a file: the prefix before one of `markers`, and which marker.

    A file may hold several models (SD3's `_incl_clips` files hold CLIP-L, CLIP-G and T5); then
    `prefix` says which one, and it must be there.
    """
    keys = list(keys)
    found = []
    for marker in markers:
        found += [(k[: -len(marker)], marker) for k in keys if ends_with_name(k, marker)]
    if prefix is not None:
        found = [f for f in found if f[0] == prefix]
    if len(found) == 1:
        return found[0]
    if not found:
        where = f" under '{prefix}'" if prefix else ""
        raise CheckpointError(f"no {what} found{where} in this checkpoint; it looks like: {describe(keys)}")
    raise CheckpointError(f"this checkpoint holds several {what} models (under "
                          f"{', '.join(repr(f[0]) for f in found)}); say which prefix to load")


# ---------------------------------------------------------------------------------------------
# Shapes: what every from_shapes asks
# ---------------------------------------------------------------------------------------------

class Shapes:
    """The shapes of a model's parameters (in our names) and its config.json, as `from_shapes`
    reads them: `shapes[name]`, `name in shapes`, `count` of numbered blocks, and `agree` to
    cross-check config.json. Every answer a file cannot give is one clear CheckpointError.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], config: dict | None, what: str):
        self.shapes, self.config, self.what = shapes, config or {}, what

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise CheckpointError(f"the checkpoint has no {name}: it is not a complete {self.what}")
        return tuple(self.shapes[name])

    def count(self, blocks: str) -> int:
        """How many numbered blocks `blocks.0.`, `blocks.1.`, ... there are: one more than the
        highest number (0 if none). A block missing below it is named when the file is checked
        against the model built (its tensors are missing)."""
        pattern = re.escape(blocks) + r"\.(\d+)\."
        return 1 + max((int(m.group(1)) for name in self.shapes if (m := re.match(pattern, name))), default=-1)

    def agree(self, key: str, value, what: str) -> None:
        """Refuse a config.json whose `key` says other than `value`, which the shapes gave (`what`)."""
        said = self.config.get(key)
        if isinstance(said, list):  # JSON has no tuples
            said = tuple(said)
        if said is not None and said != value:
            raise CheckpointError(f"config.json says {key}={self.config[key]} but the weights have {what} "
                                  f"{value}: the config belongs to another model")


# ---------------------------------------------------------------------------------------------
# What a file holds, for error messages: one key that every file of a released layout has.
# (The layouts look for the same keys; each model's tests check that describe() names its files.)
# ---------------------------------------------------------------------------------------------

_SIGNATURES = [
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX.1 transformer (original layout)"),
    ("single_transformer_blocks.0.attn.to_q.weight", "a FLUX.1 transformer (diffusers layout)"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 MMDiT (original layout)"),
    ("pos_embed.pos_embed", "an SD3 MMDiT (diffusers layout)"),
    ("layers.0.attention.wk_y.weight", "a Lumina-Next NextDiT (original layout)"),
    ("layers.0.attn2.to_k.weight", "a Lumina-Next NextDiT (diffusers layout)"),
    ("text_model.final_layer_norm.weight", "a CLIP text tower (transformers layout)"),
    ("transformer.resblocks.0.attn.in_proj_weight", "a CLIP text tower (OpenCLIP layout)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
    ("layers.0.mlp.gate_proj.weight", "a decoder-only language model such as Gemma"),
    ("decoder.up.0.block.0.conv1.weight", "a VAE (LDM layout)"),
    ("decoder.up_blocks.0.resnets.0.conv1.weight", "a VAE (diffusers layout)"),
]


def describe(keys: Iterable[str]) -> str:
    """Name the models a checkpoint holds, from marker keys, with the prefix they sit under."""
    keys = list(keys)
    found = []
    for marker, what in _SIGNATURES:
        for key in keys:
            if ends_with_name(key, marker):
                prefix = key[: -len(marker)]
                found.append(what + (f" under '{prefix}'" if prefix else ""))
                break
    if found:
        return "; ".join(found)
    sample = ", ".join(sorted(keys)[:3])
    return f"no model this project knows ({len(keys)} tensors, such as {sample})" if keys else "an empty file"
