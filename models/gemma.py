"""Gemma as a text encoder: the caption features of Lumina-Next, and Gemma's tokenizer.

Lumina-Next conditions on `hidden_states[-2]` of transformers' GemmaModel: the output of the
second-to-last decoder layer (layer 16 of 0..17 for Gemma-2B), taken BEFORE the final norm,
together with the attention mask of the right-padded prompt. transformers numbers its hidden
states as

    hidden_states[0]      = the scaled token embeddings
    hidden_states[i]      = the output of decoder layer i-1, for i = 1 .. L-1
    hidden_states[L]      = norm(output of decoder layer L-1)

so `GemmaEncoder.forward(..., layer=-2)` runs L-1 layers and stops (the last layer is never run).

The model is a pre-norm decoder: RMSNorm with zero-centred weights (x̂ * (1 + w), in fp32),
multi-query attention with rotate-half RoPE, a causal mask combined with the padding mask,
and a GELU(tanh)-gated MLP. Parameter names are transformers' GemmaModel names (see
`gemma_layout`), so released files load without renaming.

`GemmaTokenizer` reproduces transformers' GemmaTokenizer (v5) from the released
`tokenizer.model` (SentencePiece BPE) or `tokenizer.json`; see its docstring for the rules.
"""

from __future__ import annotations

import heapq
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, merge_heads, split_heads
from .checkpoint import Checkpoint, CheckpointError, find_file, load_model
from .keys import Layout, Shapes, find_prefix, read_json, renamed
from .sentencepiece_model import BPE, CONTROL, UNKNOWN, USER_DEFINED, read_sentencepiece_model


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass
class GemmaParams:
    """Gemma's shape. The defaults are Gemma-2B, the text encoder of Lumina-Next."""
    vocab_size: int = 256000
    width: int = 2048            # hidden_size
    layers: int = 18
    heads: int = 8               # query heads
    kv_heads: int = 1            # key/value heads (1: multi-query attention)
    head_dim: int = 256
    mlp_width: int = 16384       # intermediate_size
    eps: float = 1e-6            # rms_norm_eps
    rope_theta: float = 10000.0

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> "GemmaParams":
        """Infer the shape from parameter shapes (our names) and, where given, config.json.

        The widths of q_proj and k_proj are heads*head_dim and kv_heads*head_dim, so the shapes
        alone cannot split them into a head count and a head size (Gemma-7B even has
        heads*head_dim != width). config.json's `head_dim` decides; without it, its
        `num_attention_heads`; without a config, Gemma-2B's head_dim of 256.
        """
        s = Shapes(shapes, config, "Gemma (GemmaModel or GemmaForCausalLM)")
        config = s.config
        vocab_size, width = s["embed_tokens.weight"]
        q_width = s["layers.0.self_attn.q_proj.weight"][0]
        kv_width = s["layers.0.self_attn.k_proj.weight"][0]
        if config.get("head_dim"):
            head_dim = int(config["head_dim"])
        elif config.get("num_attention_heads"):
            head_dim = q_width // int(config["num_attention_heads"])
        else:
            head_dim = 256
        if q_width % head_dim or kv_width % head_dim or (q_width // head_dim) % (kv_width // head_dim):
            raise CheckpointError(f"Gemma q_proj has {q_width} rows and k_proj {kv_width}, which do not split "
                                  f"into heads of {head_dim}: give the model's config.json (its head_dim)")
        rope = config.get("rope_parameters") or {}
        return cls(
            vocab_size=vocab_size, width=width, layers=s.count("layers"),
            heads=q_width // head_dim, kv_heads=kv_width // head_dim, head_dim=head_dim,
            mlp_width=s["layers.0.mlp.gate_proj.weight"][0],
            eps=float(config.get("rms_norm_eps", cls.eps)),
            # transformers 5 writes rope_parameters.rope_theta; older config.json files rope_theta.
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta))),
        )


# ---------------------------------------------------------------------------------------------
# Checkpoint layout. Ours: transformers' GemmaModel names:
#   embed_tokens.weight, layers.N.self_attn.{q,k,v,o}_proj.weight,
#   layers.N.mlp.{gate,up,down}_proj.weight, layers.N.{input,post_attention}_layernorm.weight,
#   norm.weight. GemmaForCausalLM files put them under `model.`; its lm_head is tied and unused.
# ---------------------------------------------------------------------------------------------

def gemma_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    keys = list(keys)
    prefix, _ = find_prefix(keys, ["layers.0.mlp.gate_proj.weight"], "Gemma", prefix)
    return Layout("transformers Gemma", prefix, renamed(keys, prefix, []))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32 and scaled by (1 + weight) before casting back.

    The weights are stored zero-centred, and the cast happens after the scaling (Llama casts
    first), which changes bf16 results; both details are copied from the released model.
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def rope_tables(length: int, head_dim: int, theta: float, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for positions 0..length-1, in the rotate-half layout.

    Angles are computed in fp32 on the CPU, as transformers computes them, then cast to the
    activation dtype (the rotation itself runs in that dtype, as in transformers).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1).to(device)  # frequency k drives dims k and k + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[k], x[k + D/2]) of x [B, H, N, D] by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class GemmaAttention(nn.Module):
    def __init__(self, p: GemmaParams):
        super().__init__()
        self.p = p
        self.q_proj = nn.Linear(p.width, p.heads * p.head_dim, bias=False)
        self.k_proj = nn.Linear(p.width, p.kv_heads * p.head_dim, bias=False)
        self.v_proj = nn.Linear(p.width, p.kv_heads * p.head_dim, bias=False)
        self.o_proj = nn.Linear(p.heads * p.head_dim, p.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.p.heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(x), self.p.kv_heads), cos, sin)
        v = split_heads(self.v_proj(x), self.p.kv_heads)
        # Causal and padding masks together: with right padding every query still sees its
        # prompt's first token (BOS), so no row is fully masked, padding rows included.
        out = attention(q, k, v, key_mask=key_mask, causal=True, scale=self.p.head_dim ** -0.5)
        return self.o_proj(merge_heads(out))


class GemmaMLP(nn.Module):
    def __init__(self, p: GemmaParams):
        super().__init__()
        self.gate_proj = nn.Linear(p.width, p.mlp_width, bias=False)
        self.up_proj = nn.Linear(p.width, p.mlp_width, bias=False)
        self.down_proj = nn.Linear(p.mlp_width, p.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Released configs say hidden_act "gelu" but mean (and transformers runs) the tanh approximation.
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, p: GemmaParams):
        super().__init__()
        self.input_layernorm = RMSNorm(p.width, p.eps)
        self.self_attn = GemmaAttention(p)
        self.post_attention_layernorm = RMSNorm(p.width, p.eps)
        self.mlp = GemmaMLP(p)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaEncoder(nn.Module):
    """Gemma's decoder stack, returning one hidden state (transformers' numbering) instead of logits."""

    def __init__(self, p: GemmaParams):
        super().__init__()
        self.p = p
        self.embed_tokens = nn.Embedding(p.vocab_size, p.width)
        self.layers = nn.ModuleList(GemmaLayer(p) for _ in range(p.layers))
        self.norm = RMSNorm(p.width, p.eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layer: int = -2) -> torch.Tensor:
        """input_ids [B, T], attention_mask [B, T] (1/True = token, 0 = padding) -> [B, T, width].

        Returns what transformers' `hidden_states[layer]` is: -2 (Lumina-Next) is the output of
        the second-to-last layer, un-normed; -1 is the final-normed output; 0 the embeddings.
        Rows of padding tokens are computed too (they attend to the prompt's tokens).
        """
        states = self.p.layers + 1
        if not -states <= layer < states:
            raise ValueError(f"layer {layer} is out of range for a Gemma with {self.p.layers} layers "
                             f"({states} hidden states)")
        layer %= states
        weight = self.embed_tokens.weight
        # sqrt(width) is rounded to the weight dtype first (45.25 in bf16 for Gemma-2B), as released.
        scale = torch.tensor(self.p.width ** 0.5, dtype=weight.dtype, device=weight.device)
        x = self.embed_tokens(input_ids) * scale
        cos, sin = rope_tables(input_ids.shape[1], self.p.head_dim, self.p.rope_theta, x.dtype, x.device)
        key_mask = None if attention_mask is None else attention_mask.to(device=x.device, dtype=torch.bool)
        for block in self.layers[:layer]:
            x = block(x, cos, sin, key_mask)
        return self.norm(x) if layer == self.p.layers else x


def load_gemma(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> GemmaEncoder:
    """A GemmaEncoder with the weights of a GemmaModel or GemmaForCausalLM (`model.`) file or folder.

    The lm_head of a causal-LM file is not read. Lumina-Next runs Gemma in bf16.
    """
    def build(shapes: dict[str, tuple[int, ...]], config: dict | None) -> GemmaEncoder:
        return GemmaEncoder(GemmaParams.from_shapes(shapes, config))

    return load_model(path_or_checkpoint, gemma_layout, build, prefix=prefix, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

class GemmaTokenizer:
    """Gemma's tokenizer as transformers 5 runs it (`GemmaTokenizer`), for Lumina-Next prompts.

    What transformers does, and so what this does:
      - Added tokens first: the text is split at occurrences of the special and user-defined
        pieces (<pad> <eos> <bos> <unk> <mask>, control pieces, and user-defined pieces such as
        Gemma's runs of spaces and newlines), matched literally in the raw text, leftmost and
        longest first; each becomes its own id.
      - Every other span: each space is replaced by "▁". No dummy "▁" is prepended (whatever
        the .model's add_dummy_prefix says), runs of spaces are kept, and the span is not split
        into words: the whole span is one BPE sequence.
      - BPE: start from characters; a character missing from the vocabulary becomes the
        pieces of its UTF-8 bytes ("<0xF0>", ...: byte fallback), or <unk> if those are missing.
        Then repeatedly merge the adjacent pair of highest priority, leftmost first. From a
        `.model`, a pair's priority is the id of the merged piece (lower id first; SentencePiece
        BPE ids follow merge order), then the length of its left part; from a `tokenizer.json`,
        the pair's position in the file's merge list.
      - `__call__`: BOS (id 2) first, no EOS; truncation to `max_length` tokens counting BOS;
        right padding with <pad> (id 0) to the longest row rounded up to a multiple of 8.
    These are the settings of Lumina-Next (padding=True, pad_to_multiple_of=8, max_length=256,
    truncation=True, padding_side="right"). Note that transformers' GemmaTokenizer pads on the
    left unless told otherwise; the original Lumina-Next code sets "right".
    The BPE is ours, not the sentencepiece library's, whose ids differ from transformers': see
    models/sentencepiece_model.py.
    """

    def __init__(self, path: str | os.PathLike):
        path = find_file(path, ("tokenizer.model", "tokenizer.json"), "Gemma tokenizer",
                         "download Gemma's tokenizer (google/gemma-2b, or the tokenizer/ folder of Lumina-Next)")
        self.path = path
        if path.suffix == ".json":
            self._load_json(path)
        else:
            self._load_sentencepiece(path)
        self.vocab = {piece: index for index, piece in enumerate(self.pieces) if piece}
        for name in ("pad", "eos", "bos", "unk"):
            if f"<{name}>" not in self.vocab:
                raise CheckpointError(f"{path} has no <{name}> piece: it is not Gemma's tokenizer")
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
            self.vocab[f"<{name}>"] for name in ("pad", "eos", "bos", "unk"))
        # The special tokens are added tokens too, whatever their piece type.
        added = set(self._added) | {p for p in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>") if p in self.vocab}
        # Longest first, so that the regex alternation takes the longest match at each position.
        self._added_pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))))

    def _load_sentencepiece(self, path: Path) -> None:
        model = read_sentencepiece_model(path)
        if model.model_type != BPE:
            raise CheckpointError(f"{path} is a SentencePiece model of type {model.model_type}, not BPE (2): it is "
                                  "not Gemma's tokenizer.model (T5's spiece.model is a unigram model)")
        self.pieces = model.pieces
        self._added = [piece for piece, kind in zip(model.pieces, model.types)
                       if kind in (UNKNOWN, CONTROL, USER_DEFINED)]
        self._merge_ranks = None  # priorities come from piece ids, see _rank

    def _load_json(self, path: Path) -> None:
        data = read_json(path)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise CheckpointError(f"{path} is a tokenizer.json of a {model.get('type')} model, not Gemma's BPE")
        vocab = model["vocab"]
        self.pieces = [""] * (max(vocab.values()) + 1)
        for piece, index in vocab.items():
            self.pieces[index] = piece
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self._merge_ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}
        self._added = [t["content"] for t in data.get("added_tokens", []) if t["content"] in vocab]

    # -- pieces --------------------------------------------------------------------------------

    def _rank(self, left: str, right: str):
        """Priority of merging two adjacent pieces (lower first), or None if they do not merge."""
        if self._merge_ranks is not None:
            return self._merge_ranks.get((left, right))
        merged = self.vocab.get(left + right)
        if merged is None or left not in self.vocab or right not in self.vocab:
            return None
        return merged, len(left)

    def _characters(self, text: str) -> list[str]:
        """The starting symbols of BPE: characters, or their byte pieces, or <unk>."""
        symbols = []
        for char in text:
            if char in self.vocab:
                symbols.append(char)
                continue
            fallback = [f"<0x{byte:02X}>" for byte in char.encode("utf-8")]
            if all(piece in self.vocab for piece in fallback):
                symbols += fallback
            elif not symbols or symbols[-1] != "<unk>":  # consecutive unknowns fuse into one <unk>
                symbols.append("<unk>")
        return symbols

    def _bpe(self, text: str) -> list[str]:
        """Merge the symbols of `text` pair by pair, best priority first (ties: leftmost)."""
        symbols = self._characters(text)
        after = list(range(1, len(symbols))) + [-1]        # linked list over merged symbols
        before = list(range(-1, len(symbols) - 1))
        queue = []

        def push(i: int) -> None:
            j = after[i]
            if j != -1 and (rank := self._rank(symbols[i], symbols[j])) is not None:
                heapq.heappush(queue, (rank, i, symbols[i] + symbols[j]))

        for i in range(len(symbols) - 1):
            push(i)
        while queue:
            _, i, merged = heapq.heappop(queue)
            j = after[i] if symbols[i] is not None else -1
            if j == -1 or symbols[i] + symbols[j] != merged:  # outdated by an earlier merge
                continue
            symbols[i], symbols[j] = merged, None
            after[i] = after[j]
            if after[j] != -1:
                before[after[j]] = i
            if before[i] != -1:
                push(before[i])
            push(i)
        return [s for s in symbols if s is not None]

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text`, without BOS, as transformers' `tokenize()` gives them.

        A piece that starts a new word begins with "▁" (a space in the text).
        """
        pieces, start = [], 0
        for match in self._added_pattern.finditer(text):
            pieces += self._bpe(text[start:match.start()].replace(" ", "▁"))
            pieces.append(match.group())
            start = match.end()
        return pieces + self._bpe(text[start:].replace(" ", "▁"))

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS."""
        return [self.vocab[piece] if piece in self.vocab else self.unk_id for piece in self.tokenize(text)]

    def id_to_piece(self, ids) -> list[str]:
        return [self.pieces[int(i)] for i in ids]

    # -- batches -------------------------------------------------------------------------------

    def __call__(self, texts: str | list[str], max_length: int = 256, pad_to_multiple_of: int | None = 8,
                 length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] and attention_mask [B, T] (int64, 1 = token) of a batch of prompts.

        Each row is BOS + the prompt's ids, truncated to `max_length` tokens (BOS counted), right
        padded with <pad> to the longest row rounded up to a multiple of `pad_to_multiple_of`.
        `length` instead truncates and pads every row to exactly that many tokens (diffusers'
        LuminaPipeline tokenises the negative prompt so, to the prompt's length).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        limit = max_length if length is None else length
        rows = [([self.bos_id] + self.encode(text))[:limit] for text in texts]
        if length is None:
            length = max(map(len, rows))
            if pad_to_multiple_of:
                length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, :len(row)] = 1
        return input_ids, attention_mask
