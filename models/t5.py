"""The T5 v1.1 encoder (SD3's and FLUX's third text encoder, T5-XXL) and its SentencePiece tokenizer.

SD3 and FLUX condition on `last_hidden_state`: the output of the last block after the final
norm. The encoder is a stack of pre-norm blocks

    x = shared(ids)                                   # no scaling, no learned positions
    bias = relative_attention_bias(bucket(key - query))   # block 0's table, used by every block
    for each block:  x = x + attn(norm(x), bias);  x = x + wo(gelu_tanh(wi_0 norm(x)) * wi_1 norm(x))
    last_hidden_state = final_layer_norm(x)

with three departures from a textbook transformer: the attention scores are NOT scaled by
1/sqrt(head_dim) (T5 folds that into its weights), positions enter only as an additive bias
on the scores, looked up from bucketed relative distances, and the norms are RMS norms (no
mean, no bias) whose statistics are computed in fp32.

Parameters are named after transformers' T5EncoderModel, so released files (the diffusers
`text_encoder_2/` / `text_encoder_3/` folders, `t5xxl_fp16.safetensors`, SD3's single files
under `text_encoders.t5xxl.transformer.`) load without renaming; see `t5_layout`.

Precision: run T5 in bf16 or fp32. T5 v1.1's feed-forward outputs overflow fp16; for fp16
we do what transformers does (it lists `wo` in `_keep_in_fp32_modules`): every `wo` weight is
kept in fp32 and its input cast up, so the residual stream is fp32 from block 0's feed-forward
on (fp16 + fp32 promotes), while the norms hand fp16 to the other projections.

`T5Tokenizer` reproduces transformers' T5Tokenizer (v5, the "fast" one) from `spiece.model`
(through the sentencepiece library) or `tokenizer.json`; see its docstring for the rules.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from sentencepiece import SentencePieceProcessor
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import Unigram
from torch import nn

from .attention import attention, merge_heads, split_heads
from .checkpoint import Checkpoint, CheckpointError, find_file, load_model
from .keys import Layout, Shapes, find_prefix, read_json, renamed


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class T5Params:
    """The encoder's shape. The defaults are T5 v1.1 XXL (google/t5-v1_1-xxl), as SD3 and FLUX use it."""
    vocab_size: int = 32128      # the tokenizer uses 32100 of these rows
    width: int = 4096            # d_model
    layers: int = 24
    heads: int = 64
    head_dim: int = 64           # d_kv; heads * head_dim need not equal width (it does for XXL)
    mlp_width: int = 10240       # d_ff
    buckets: int = 32            # relative_attention_num_buckets
    max_distance: int = 128      # relative_attention_max_distance: farther keys share the last bucket
    eps: float = 1e-6            # layer_norm_epsilon

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> "T5Params":
        """Infer the shape from parameter shapes (our names) and, where given, a T5 config.json.

        The relative-bias table [buckets, heads] gives the head count, and the rows of q give
        heads * head_dim; config.json's num_heads / d_kv win when present. max_distance and eps
        are not in any shape: they come from config.json or default to T5 v1.1's.
        """
        config = config if config and config.get("model_type") == "t5" else {}
        s = Shapes(shapes, config, "T5 v1.1 encoder (T5EncoderModel)")
        # The original T5 has one `wi` and ReLU; v1.1 (SD3's, FLUX's) gates: wi_0, wi_1 and GELU.
        ffn = ("relu (one wi)" if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in s
               else config.get("feed_forward_proj", "gated-gelu"))
        if ffn != "gated-gelu":
            raise CheckpointError(f"this T5 has a {ffn} feed-forward: only T5 v1.1's gated-gelu "
                                  "(the T5-XXL of SD3 and FLUX) is supported")
        vocab_size, width = s["shared.weight"]
        buckets, bias_heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = s["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        heads = int(config.get("num_heads") or bias_heads)
        head_dim = int(config.get("d_kv") or inner // heads)
        if heads != bias_heads or heads * head_dim != inner:
            raise CheckpointError(f"T5 attention has {inner} q rows and a relative bias for {bias_heads} heads, "
                                  f"which do not split into {heads} heads of {head_dim}: the config.json does "
                                  "not belong to these weights")
        return cls(vocab_size=vocab_size, width=width, layers=s.count("encoder.block"), heads=heads,
                   head_dim=head_dim, mlp_width=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                   buckets=buckets,
                   max_distance=int(config.get("relative_attention_max_distance", cls.max_distance)),
                   eps=float(config.get("layer_norm_epsilon", cls.eps)))


# ---------------------------------------------------------------------------------------------
# Checkpoint layout. Ours: transformers' T5EncoderModel names:
#   shared.weight, encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight,
#   encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight,
#   encoder.block.N.layer.{0,1}.layer_norm.weight, encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight,
#   encoder.final_layer_norm.weight. SD3's single files put them under `text_encoders.t5xxl.transformer.`.
# ---------------------------------------------------------------------------------------------

def t5_layout(keys: Iterable[str], prefix: str | None = None) -> Layout:
    """The T5 encoder in transformers' layout, alone or under a prefix (SD3: `text_encoders.t5xxl.transformer.`).

    The token table is tied: transformers saves `shared.weight` only, other files hold
    `encoder.embed_tokens.weight` too, or instead. `shared.weight` is read when present,
    else `encoder.embed_tokens.weight`; the other copy is ignored. A full T5 file's decoder
    and lm_head are ignored too.
    """
    keys = list(keys)
    prefix, _ = find_prefix(keys, ["encoder.block.0.layer.0.SelfAttention.q.weight"], "T5 encoder", prefix)
    ignore = (r"decoder\.", r"lm_head\.")
    if prefix + "shared.weight" in keys:
        ignore += (r"encoder\.embed_tokens\.weight$",)
    rules = [(r"^encoder\.embed_tokens\.weight$", "shared.weight")]
    return Layout("transformers T5", prefix, renamed(keys, prefix, rules, ignore), ignore)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class T5LayerNorm(nn.Module):
    """RMS norm: x / rms(x) * weight, no mean subtraction and no bias.

    The mean square is taken in fp32, so x / rms(x) comes out fp32 even for half inputs; it is
    cast to the weight's dtype when that is fp16 or bf16. So the projections of a half model
    get half inputs, also from the fp32 residual stream of an fp16 model (see T5GatedFeedForward).
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """The bucket of each relative position (key index - query index) of a bidirectional encoder.

    Half the buckets are for keys before or at the query, half for keys after it. In each
    half, the first half of the buckets hold the distances 0, 1, 2, ... exactly; the rest
    split the distances up to max_distance on a log scale, and every farther key shares the
    last one. (XXL: 16 per side, 8 exact, log-spaced from 8 to 128.) The float operations
    are done in the order of the original Mesh TensorFlow code, so bucket edges agree exactly.
    """
    half = buckets // 2
    bucket = (relative > 0).long() * half      # keys after the query use the upper half
    distance = relative.abs()
    exact = half // 2
    # clamp_min: log(0) would be -inf; those distances take the exact branch anyway.
    log_position = (torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
                    * (half - exact)).long()
    far = (exact + log_position).clamp_max(half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """Multi-head self-attention; only block 0's holds the relative position table."""

    def __init__(self, p: T5Params, has_position_table: bool):
        super().__init__()
        self.p = p
        inner = p.heads * p.head_dim
        self.q = nn.Linear(p.width, inner, bias=False)
        self.k = nn.Linear(p.width, inner, bias=False)
        self.v = nn.Linear(p.width, inner, bias=False)
        self.o = nn.Linear(inner, p.width, bias=False)
        if has_position_table:
            self.relative_attention_bias = nn.Embedding(p.buckets, p.heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, heads, length, length]: the bias of query i attending to key j, from bucket(j - i)."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]
        buckets = relative_position_bucket(relative, self.p.buckets, self.p.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.p.heads) for proj in (self.q, self.k, self.v))
        # Unscaled: T5 folds 1/sqrt(head_dim) into its weights.
        return self.o(merge_heads(attention(q, k, v, key_mask=key_mask, bias=bias, scale=1.0)))


class T5GatedFeedForward(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x).

    The activation is GELU's tanh approximation (transformers' "gelu_new", written out there
    in elementwise ops; F.gelu computes the same function in one kernel, so half-precision
    results differ from transformers' by rounding only).
    `wo` may be fp32 in an fp16 model (see `_keep_wo_in_fp32`): its input is then cast up and
    its fp32 output makes the residual stream fp32, which is what keeps T5 v1.1 finite in fp16.
    """

    def __init__(self, p: T5Params):
        super().__init__()
        self.wi_0 = nn.Linear(p.width, p.mlp_width, bias=False)
        self.wi_1 = nn.Linear(p.width, p.mlp_width, bias=False)
        self.wo = nn.Linear(p.mlp_width, p.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(hidden.to(self.wo.weight.dtype))


class T5SelfAttentionLayer(nn.Module):
    """block.N.layer.0: pre-norm self-attention with a residual."""

    def __init__(self, p: T5Params, has_position_table: bool):
        super().__init__()
        self.SelfAttention = T5Attention(p, has_position_table)
        self.layer_norm = T5LayerNorm(p.width, p.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias, key_mask)


class T5FeedForwardLayer(nn.Module):
    """block.N.layer.1: pre-norm feed-forward with a residual."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(p)  # transformers' name, whatever the activation
        self.layer_norm = T5LayerNorm(p.width, p.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard after each layer: ±inf becomes ±(max - 1000). No-op in other dtypes.

    With `wo` in fp32 the stream is fp16 only inside block 0 (before its feed-forward).
    """
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest)  # a tensor: no host sync
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, p: T5Params, has_position_table: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(p, has_position_table), T5FeedForwardLayer(p)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias, key_mask))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    """The `encoder.` part of the checkpoint. Its tied `embed_tokens` is the encoder's `shared`."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.block = nn.ModuleList(T5Block(p, has_position_table=(i == 0)) for i in range(p.layers))
        self.final_layer_norm = T5LayerNorm(p.width, p.eps)


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel without dropout, returning last_hidden_state."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.p = p
        self.shared = nn.Embedding(p.vocab_size, p.width)
        self.encoder = T5Stack(p)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], attention_mask [B, T] (1/True = token, 0 = padding) -> [B, T, width].

        SD3 and FLUX pass no mask: the padding tokens (id 0) are then attended like any other.
        With a mask, padded keys are hidden from every query; padded rows are still computed.
        """
        x = self.shared(input_ids)
        # Block 0's table gives one bias for the whole stack: positions are relative, never absolute.
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], x.device)
        key_mask = None if attention_mask is None else attention_mask.to(device=x.device, dtype=torch.bool)
        for block in self.encoder.block:
            x = block(x, bias, key_mask)
        return self.encoder.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_t5(path_or_checkpoint: str | os.PathLike | Checkpoint, prefix: str | None = None,
            dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> T5Encoder:
    """A T5Encoder from a T5EncoderModel file or folder (sharded diffusers `text_encoder_2/` included).

    `prefix` picks the encoder in a file that holds several models (SD3's single files keep it
    under `text_encoders.t5xxl.transformer.`; found by itself when there is only one T5). A
    full T5ForConditionalGeneration file works too: its decoder is not read. Pass an open
    Checkpoint to read several models from one file without parsing it twice.
    `dtype` None keeps the file's; use bf16 or fp32. With fp16, `wo` is kept in fp32 (see
    the module docstring).
    """
    def build(shapes: dict[str, tuple[int, ...]], config: dict | None) -> T5Encoder:
        return T5Encoder(T5Params.from_shapes(shapes, config))

    model = load_model(path_or_checkpoint, t5_layout, build, prefix=prefix, dtype=dtype, device=device)
    return _keep_wo_in_fp32(model)


def _keep_wo_in_fp32(model: T5Encoder) -> T5Encoder:
    """Upcast every fp16 `wo` weight to fp32, as transformers does when it loads T5 in fp16.

    The upcast is of the fp16 values, so it equals transformers' exactly for fp16 files (how
    fp16 T5 is released); from an fp32 or bf16 file, `wo` carries one fp16 rounding that
    transformers' loader skips. bf16 and fp32 models are left as they are.
    """
    for block in model.encoder.block:
        ffn = block.layer[1].DenseReluDense
        if ffn.wo.weight.dtype == torch.float16:
            ffn.wo.weight = nn.Parameter(ffn.wo.weight.float(), requires_grad=False)
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

class T5Tokenizer:
    """T5's tokenizer as transformers 5 runs it (`T5Tokenizer`, formerly T5TokenizerFast).

    What transformers does, and so what this does:
      - Added tokens first: <pad>, </s>, <unk>, the 100 sentinels <extra_id_0..99>, and the
        file's control pieces (from a tokenizer.json: its added tokens) are matched literally in
        the raw text, leftmost and longest first, and become their own ids; so a prompt's "</s>"
        is EOS.
      - Every other span goes to sentencepiece itself (from `spiece.model`), or (from a
        `tokenizer.json`) to the `tokenizers` library with the file's Unigram vocabulary and
        normalizer table, its pre-tokenizer ignored as transformers 5 does. Either runs the
        .model's normalizer (NFKC plus SentencePiece's rules: full-width forms, ligatures ...),
        reads runs of whitespace as one space, puts "▁" before each word ("a  cat" -> "▁a",
        "▁cat") and takes the most probable unigram split; a character outside the vocabulary
        becomes <unk> (id 2), consecutive ones a single <unk>.
      - Ids: the vocabulary of the .model (pad 0, EOS 1, unk 2, ...), then the sentinels in
        reverse: <extra_id_99> = 32000 ... <extra_id_0> = 32099 for T5's 32000 pieces.
      - `__call__`: EOS appended, no BOS; truncation keeps the first max_length-1 pieces then
        EOS; right padding with <pad> (0) to exactly max_length; mask 1 on pieces and EOS.
    A `.model`'s user-defined pieces (T5's has none) are matched by sentencepiece within the
    spans: its API does not say which pieces are user-defined, so they are not split off first.
    """

    def __init__(self, path: str | os.PathLike):
        # transformers reads tokenizer.json when a folder has both.
        extra_ids = _extra_ids(Path(path)) if Path(path).is_dir() else 100
        path = find_file(path, ("tokenizer.json", "spiece.model"), "T5 tokenizer",
                         "download the T5 tokenizer (tokenizer_2/ of FLUX.1, tokenizer_3/ of SD3, or "
                         "google/t5-v1_1-xxl)")
        self.path = path
        sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
        self._processor, self._tokenizer = None, None
        if path.suffix == ".json":
            vocab, added, charsmap = _read_tokenizer_json(path)
            ids = {piece: index for index, (piece, _) in enumerate(vocab)}
        else:
            self._processor = _sentencepiece(path)
            pieces = [self._processor.id_to_piece(i) for i in range(self._processor.get_piece_size())]
            ids = {piece: index for index, piece in enumerate(pieces + sentinels[::-1])}
            added = [piece for index, piece in enumerate(pieces) if self._processor.is_control(index)]
        missing = [t for t in ("<pad>", "</s>", "<unk>") if t not in ids]
        if missing:
            raise CheckpointError(f"{path} has no {', '.join(missing)} piece: it is not T5's tokenizer")
        self.pad_id, self.eos_id, self.unk_id = ids["<pad>"], ids["</s>"], ids["<unk>"]
        if self._processor is None:
            self._tokenizer = _unigram(vocab, self.unk_id, charsmap)

        # Added tokens missing from a vocabulary get new ids after it, in transformers' order.
        self._added = {}
        for token in ["<pad>", "</s>", "<unk>", *added, *sentinels]:
            self._added[token] = ids.setdefault(token, len(ids))
        # Longest first, so that the regex alternation takes the longest match at each position.
        self._added_pattern = re.compile("|".join(map(re.escape, sorted(self._added, key=len, reverse=True))))

    def _span(self, text: str, out_type: type) -> list:
        """The ids (out_type int) or pieces (str) of a text that holds no added token."""
        if self._processor is not None:
            return self._processor.encode(text, out_type=out_type)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids if out_type is int else encoding.tokens

    def _split(self, text: str, out_type: type) -> list:
        """The added tokens matched in the raw text, every span between them tokenized."""
        out, start = [], 0
        for match in self._added_pattern.finditer(text):
            out += self._span(text[start:match.start()], out_type)
            out.append(self._added[match.group()] if out_type is int else match.group())
            start = match.end()
        return out + self._span(text[start:], out_type)

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text`, no EOS, no truncation: transformers' `tokenize()`.

        A piece that starts a word begins with "▁"; added tokens such as "</s>" stand alone; an
        unknown piece is its text (its id is <unk>), as in transformers.
        """
        return self._split(text, str)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, no EOS, no truncation."""
        return self._split(text, int)

    def tokens(self, text: str, max_length: int = 256) -> list[str]:
        """The piece at each position of the model's input for `text`, EOS included, padding not.

        Position i here is position i of `__call__`'s row; words are told apart by "▁". A piece
        outside the vocabulary (id <unk>) is shown as the text it stands for.
        """
        return [*self.tokenize(text)[: max_length - 1], "</s>"]

    def __call__(self, texts: str | list[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask, both [B, max_length] int64, as transformers gives them for
        padding="max_length", truncation=True, max_length=max_length.

        SD3 (diffusers) and FLUX.1-schnell use max_length 256, FLUX.1-dev 512; neither passes the mask.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            row = [*self.encode(text)[: max_length - 1], self.eos_id]
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask


def load_t5_tokenizer(path: str | os.PathLike) -> T5Tokenizer:
    return T5Tokenizer(path)


def _extra_ids(folder: Path) -> int:
    """The number of sentinel tokens: tokenizer_config.json's extra_ids, 100 by default (T5's)."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = read_json(config).get("extra_ids")
        if isinstance(value, int) and value >= 0:
            return value
    return 100


def _sentencepiece(path: Path) -> SentencePieceProcessor:
    try:
        return SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):  # sentencepiece's "could not parse ModelProto"
        raise CheckpointError(f"{path} is not a SentencePiece model (or it is damaged): download it again") from None


def _unigram(vocab: list[tuple[str, float]], unk_id: int, charsmap: bytes | None) -> Tokenizer:
    """The `tokenizers` Unigram model transformers builds from a T5 tokenizer.json, without its added tokens."""
    tokenizer = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap:
        tokenizer.normalizer = normalizers.Precompiled(charsmap)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    return tokenizer


def _read_tokenizer_json(path: Path) -> tuple[list[tuple[str, float]], list[str], bytes | None]:
    """The Unigram vocabulary, the added tokens found in it, and the precompiled normalizer table."""
    import base64

    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise CheckpointError(f"{path} is a tokenizer.json of a {model.get('type')} model, not T5's Unigram: "
                              "give the T5 tokenizer folder")
    vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
    pieces = {piece for piece, _ in vocab}
    added = [t["content"] for t in data.get("added_tokens", []) if t.get("content") in pieces]
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = next((base64.b64decode(s["precompiled_charsmap"]) for s in steps
                     if s.get("type") == "Precompiled" and s.get("precompiled_charsmap")), None)
    return vocab, added, charsmap
