"""The CLIP text tower (OpenAI ViT-L/14, LAION bigG/14) and its BPE tokenizer.

SD3, SDXL and FLUX condition on CLIP text features: SD3 takes the penultimate layer's token
states (before the final LayerNorm) and the pooled EOS state, FLUX the pooled state of CLIP-L.
The model is a pre-LN transformer with a causal mask and learned positions:

    x = token_embedding(ids) + position_embedding
    for each layer:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    last = final_layer_norm(x);  pooled = last[eos position];  projected = text_projection(pooled)

Parameters are named after transformers (`clip_layout` below also reads OpenCLIP files);
every size is inferred from the checkpoint's tensor shapes, with config.json (when
the file has one) settling what shapes cannot say. The image tower (models/clip_vision.py)
is built from the same encoder layers, without the causal mask, and reads OpenCLIP's blocks
with the same renaming.

The tokenizer is built on the `tokenizers` library and gives the ids transformers'
CLIPTokenizer gives: 77 ids = start-of-text, up to 75 BPE tokens, end-of-text, padding.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import nn

from .attention import attention, merge_heads, split_heads
from .checkpoint import Checkpoint, CheckpointError, load_model
from .keys import (Chunk, Key, Layout, Shapes, Source, Transposed,
                   ends_with_name, find_prefix, read_json, read_text, renamed)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CLIPParams:
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    max_positions: int
    activation: str             # "quick_gelu" (OpenAI ViT-L) or "gelu" (LAION bigG)
    projection_dim: int | None  # None: the file has no text_projection, projected = pooled
    eos_token_id: int
    eps: float = 1e-5

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> CLIPParams:
        """Infer the tower from its tensor shapes (in our parameter names) and, if given, config.json.

        Shapes fix every size but the head count and the activation; without a config those
        follow the two released towers: 64-wide heads, and quick_gelu only for OpenAI's width 768.
        """
        config = tower_config(config, "text_config")
        s = Shapes(shapes, config, "CLIP text tower")
        vocab_size, width = s["embeddings.token_embedding.weight"]
        max_positions = s["embeddings.position_embedding.weight"][0]
        mlp_width = s["encoder.layers.0.mlp.fc1.weight"][0]
        projection = s["text_projection.weight"][0] if "text_projection.weight" in s else None
        s.agree("hidden_size", width, "width")
        heads = config.get("num_attention_heads") or max(1, width // 64)
        if width % heads:
            raise CheckpointError(f"CLIP width {width} does not split into {heads} attention heads; "
                                  "fix num_attention_heads in config.json")
        activation = checked_activation(config.get("hidden_act") or ("quick_gelu" if width == 768 else "gelu"))
        # Configs written before transformers PR #24773 say eos_token_id 2; transformers then pools
        # at argmax(ids), which is the first end-of-text token because it is the largest id.
        eos = config.get("eos_token_id")
        eos = eos if isinstance(eos, int) and eos != 2 else vocab_size - 1
        return cls(vocab_size=vocab_size, width=width, layers=s.count("encoder.layers"), heads=heads,
                   mlp_width=mlp_width, max_positions=max_positions, activation=activation,
                   projection_dim=projection, eos_token_id=eos, eps=config.get("layer_norm_eps") or 1e-5)


def tower_config(config: dict | None, tower: str) -> dict:
    """One tower's part of a config.json ("text_config" or "vision_config"), or {} when it is not
    a CLIP config. A full CLIPModel's config nests both towers'; a single tower's is flat."""
    if not config or not str(config.get("model_type", "")).startswith("clip"):
        return {}
    return config.get(tower) or config


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU; its ViT-L/14 towers (text and image) were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def checked_activation(activation: str) -> str:
    """`activation`, if the towers can run it; a config.json naming another is refused."""
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"CLIP activation '{activation}' is not supported (only "
                              f"{', '.join(ACTIVATIONS)}); fix hidden_act in config.json")
    return activation


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. Ours: transformers' names without the `text_model.` level:
#   embeddings.{token,position}_embedding.weight, encoder.layers.N.self_attn.{q,k,v,out}_proj.*,
#   encoder.layers.N.layer_norm{1,2}.*, encoder.layers.N.mlp.fc{1,2}.*, final_layer_norm.*,
#   text_projection.weight (absent when the file has none).
# ---------------------------------------------------------------------------------------------

_HF_MARKER = "text_model.final_layer_norm.weight"
_OPENCLIP_MARKER = "transformer.resblocks.0.attn.in_proj_weight"
# transformers 5 saves a bare CLIPTextModel without the `text_model.` level: our names exactly.
_BARE_MARKER = "embeddings.token_embedding.weight"

# OpenCLIP's transformer blocks, named alike in both towers (models/clip_vision.py reads them
# too); their fused q|k|v in_proj is split by `openclip_sources`.
OPENCLIP_BLOCK_RULES = [
    (r"^transformer\.resblocks\.", "encoder.layers."),
    (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]
_OPENCLIP_RULES = [
    *OPENCLIP_BLOCK_RULES,
    (r"^ln_final\.", "final_layer_norm."),
    (r"^token_embedding\.", "embeddings.token_embedding."),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
]


def clip_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The CLIP text tower in a file of transformers' layout or of OpenCLIP's."""
    keys = list(keys)
    # The bare marker also ends the transformers layout's keys, so it is looked for only when
    # neither full layout is there.
    if any(ends_with_name(k, m) for k in keys for m in (_HF_MARKER, _OPENCLIP_MARKER)):
        prefix, marker = find_prefix(keys, [_HF_MARKER, _OPENCLIP_MARKER], "CLIP text", prefix)
    else:
        prefix, marker = find_prefix(keys, [_BARE_MARKER], "CLIP text", prefix)
    if marker == _BARE_MARKER:
        ignore = (r"embeddings\.position_ids$",)
        return Layout("transformers CLIP", prefix, renamed(keys, prefix, [], ignore), ignore)
    if marker == _HF_MARKER:
        # A full CLIPModel file also holds the image tower; position_ids is a stale buffer.
        ignore = (r"text_model\.embeddings\.position_ids$", r"vision_model\.", r"visual_projection\.",
                  r"logit_scale$")
        return Layout("transformers CLIP", prefix, renamed(keys, prefix, [(r"^text_model\.", "")], ignore), ignore)

    # OpenCLIP: fused q|k|v, a bare positional table, and text_projection applied as x @ P.
    ignore = (r"visual\.", r"logit_scale$", r"attn_mask$")
    names = renamed(keys, prefix, _OPENCLIP_RULES, ignore)
    return Layout("OpenCLIP", prefix, openclip_sources(names, "text_projection", "text_projection.weight"), ignore)


def openclip_sources(names: dict[str, Key], projection: str, ours: str) -> dict[str, Source]:
    """A tower renamed from OpenCLIP (`names`: our name -> key) with what renaming cannot do:
    each block's fused in_proj (rows q | k | v) read as our three projections, and the
    `projection` matrix, which OpenCLIP applies as x @ P, read transposed as our Linear `ours`."""
    mapping: dict[str, Source] = {}
    for name, source in names.items():
        fused = re.match(r"(encoder\.layers\.\d+)\.attn\.in_proj_(weight|bias)$", name)
        if fused:
            layer, kind = fused.groups()
            for index, part in enumerate("qkv"):
                mapping[f"{layer}.self_attn.{part}_proj.{kind}"] = Chunk(source.key, 3, index)
        elif name == projection:
            mapping[ours] = Transposed(source.key)
        else:
            mapping[name] = source
    return mapping


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class CLIPEmbeddings(nn.Module):
    def __init__(self, p: CLIPParams):
        super().__init__()
        self.token_embedding = nn.Embedding(p.vocab_size, p.width)
        self.position_embedding = nn.Embedding(p.max_positions, p.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions


class TowerShape(Protocol):
    """What the encoder layers read of a tower's parameters: CLIPParams, or the image tower's
    CLIPVisionParams (models/clip_vision.py)."""
    width: int
    heads: int
    mlp_width: int
    activation: str
    eps: float
    layers: int


class CLIPSelfAttention(nn.Module):
    def __init__(self, p: TowerShape, causal: bool):
        super().__init__()
        self.heads, self.causal = p.heads, causal
        self.q_proj = nn.Linear(p.width, p.width)
        self.k_proj = nn.Linear(p.width, p.width)
        self.v_proj = nn.Linear(p.width, p.width)
        self.out_proj = nn.Linear(p.width, p.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, causal=self.causal)))


class CLIPMLP(nn.Module):
    def __init__(self, p: TowerShape):
        super().__init__()
        self.fc1 = nn.Linear(p.width, p.mlp_width)
        self.fc2 = nn.Linear(p.mlp_width, p.width)
        self.activation = ACTIVATIONS[p.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    """One pre-LN block."""

    def __init__(self, p: TowerShape, causal: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(p.width, eps=p.eps)
        self.self_attn = CLIPSelfAttention(p, causal)
        self.layer_norm2 = nn.LayerNorm(p.width, eps=p.eps)
        self.mlp = CLIPMLP(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, p: TowerShape, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(p, causal) for _ in range(p.layers))


@dataclass
class CLIPOutput:
    """What either CLIP tower returns (the image tower's is in models/clip_vision.py)."""
    last_hidden_state: torch.Tensor  # [B, T, width]: text, after the final LN; image, before post_layernorm
    pooled: torch.Tensor             # [B, width]: text, at the EOS token; image, post_layernorm of the class token
    projected: torch.Tensor          # [B, projection_dim], or pooled when there is no projection
    hidden_states: tuple[torch.Tensor, ...] = ()  # text: embeddings, then every layer's output (no final LN)


class CLIPTextModel(nn.Module):
    def __init__(self, p: CLIPParams):
        super().__init__()
        self.params = p
        self.embeddings = CLIPEmbeddings(p)
        # Causal: each token sees itself and the tokens before it, so the padding after the
        # end-of-text token never changes the states up to it.
        self.encoder = CLIPEncoder(p, causal=True)
        self.final_layer_norm = nn.LayerNorm(p.width, eps=p.eps)
        self.text_projection = nn.Linear(p.width, p.projection_dim, bias=False) if p.projection_dim else None

    def forward(self, input_ids: torch.Tensor) -> CLIPOutput:
        """input_ids: [B, T] with T <= max_positions, as CLIPTokenizer makes them."""
        if input_ids.shape[1] > self.params.max_positions:
            raise ValueError(f"CLIP reads at most {self.params.max_positions} tokens, got {input_ids.shape[1]}; "
                             "truncate the ids (CLIPTokenizer does)")
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        # The first end-of-text token (position 0 if a row has none, as in transformers); the
        # padding after it may repeat the same id.
        eos = (input_ids == self.params.eos_token_id).int().argmax(dim=1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        projected = self.text_projection(pooled) if self.text_projection is not None else pooled
        return CLIPOutput(last, pooled, projected, tuple(hidden_states))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_clip(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> CLIPTextModel:
    """Load a CLIP text tower from a file or folder, in transformers' or OpenCLIP's layout.

    `prefix` picks one tower in a file that holds several (SD3's single files hold
    `text_encoders.clip_l.transformer.` and `text_encoders.clip_g.transformer.`); pass an open
    Checkpoint to read several models from one file without parsing it twice.
    """
    return load_model(path_or_checkpoint, clip_layout,
                      lambda shapes, config: CLIPTextModel(CLIPParams.from_shapes(shapes, config)),
                      prefix=prefix, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

# OpenAI's word pattern: the special tokens, English contractions, runs of letters, single
# digits, runs of anything else. Whitespace only separates and is dropped. (The text is
# lowercased first, so OpenAI's IGNORECASE flag changes nothing.)
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """CLIP's byte-level BPE: text -> [B, 77] ids, equal to transformers' CLIPTokenizer with
    padding="max_length", max_length=77, truncation=True (the call every pipeline makes)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = END_OF_TEXT,
                 max_length: int = 77):
        missing = [t for t in (START_OF_TEXT, END_OF_TEXT, pad_token) if t not in vocab]
        if missing:
            raise CheckpointError(f"the CLIP vocabulary lacks {', '.join(missing)}: this is not a CLIP "
                                  "tokenizer, or its pad_token is wrong; use the model's tokenizer folder")
        self.sot_id, self.eot_id, self.pad_id = vocab[START_OF_TEXT], vocab[END_OF_TEXT], vocab[pad_token]
        self.max_length = max_length

        # A word's last symbol carries "</w>", so "cat" alone and "cat" inside "cats" differ.
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                                  unk_token=END_OF_TEXT, fuse_unk=False))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            # Bytes -> the 256 printable symbols BPE works on. Its GPT-2 split changes one case
            # only, kept for equal ids with transformers: a special token typed in another case
            # ("<|ENDOFTEXT|>", lowercased above) becomes "<|", "endoftext", "|>".
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # transformers registers these as special tokens, matched verbatim in the text before any
        # normalization. That includes the pad token, so with SD3/SDXL's tokenizer_2 (pad "!")
        # a "!" in a prompt becomes id 0 rather than "!</w>"; we give the same ids.
        tokenizer.add_special_tokens(list(dict.fromkeys([START_OF_TEXT, END_OF_TEXT, pad_token])))
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """An HF tokenizer folder: tokenizer.json, or vocab.json + merges.txt; the pad token from
        special_tokens_map.json or tokenizer_config.json (default end-of-text)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder: point at the tokenizer folder "
                                  "(e.g. tokenizer/ or tokenizer_2/ of the model)")
        if (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        else:
            lacking = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
            raise CheckpointError(f"{folder} holds no CLIP tokenizer: it lacks tokenizer.json and "
                                  f"{' and '.join(lacking)}; download the model's tokenizer folder "
                                  "(e.g. tokenizer/ or tokenizer_2/) and point at it")
        return cls(vocab, merges, pad_token=_pad_token(folder))

    def tokens(self, text: str) -> list[str]:
        """The token strings the ids of `text` stand for, start- and end-of-text included, no padding.

        Position i here is position i of the model's input. A token ending in "</w>" ends a word;
        tokens are in the byte-level alphabet (non-ASCII bytes are shown as other symbols).
        """
        body = self._tokenizer.encode(text, add_special_tokens=False).tokens[: self.max_length - 2]
        return [START_OF_TEXT, *body, END_OF_TEXT]

    def length(self, text: str) -> int:
        """How many ids `text` takes, start- and end-of-text included, before any cut to max_length."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids) + 2

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """[B, max_length] long ids: SOT, the first max_length-2 tokens, EOT, then the pad id."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            row = [self.sot_id, *encoding.ids[: self.max_length - 2], self.eot_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), self.max_length)


def load_clip_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = read_json(path).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise CheckpointError(f"{path} is not a BPE tokenizer (model type {model.get('type')!r}): "
                              "point at the CLIP tokenizer folder")
    # Merges are "a b" strings in older files and ["a", "b"] pairs in newer ones.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = read_text(path).split("\n")
    if lines and lines[0].startswith("#version"):  # only the header: "#" itself is a CLIP symbol
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    bad = next((line for line in merges if len(line) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path} has a line that is not one merge ('{' '.join(bad)}'): download it again")
    return merges


def _pad_token(folder: Path) -> str:
    """transformers reads tokenizer_config.json, then lets special_tokens_map.json override it."""
    pad = END_OF_TEXT
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = read_json(path).get("pad_token")
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                pad = value
    return pad
