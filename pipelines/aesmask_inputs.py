"""What AesMask (accelaes.py) reads from a pipeline, so that the method knows no tokenizer and
no model: the word each text key belongs to, and a CLIP phrase embedder.

Tokenizers mark words in two ways; the pipelines hand AesMask one list per prompt with, for
every text key in order, the text of its word ("" for a real token outside any word, such as a
comma piece; None for special and padding keys).
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import torch
import torch.nn.functional as F


def word_ids(pieces: list[str | None], style: str) -> list[int | None]:
    """The index of each piece's word; None for special and padding positions (given as None)
    and for pieces that are only whitespace.

    style "sentencepiece": a piece starting with "▁" (or the first piece) starts a word.
    style "bpe": CLIP's byte-level BPE, where a piece ending in "</w>" ends its word.
    """
    if style not in ("sentencepiece", "bpe"):
        raise ValueError(f"unknown tokenizer style {style!r}: use 'sentencepiece' or 'bpe'")
    ids, word, open_word = [], -1, False
    for piece in pieces:
        if piece is None or not _text([piece]):
            ids.append(None)
            open_word = False
            continue
        if not open_word or (style == "sentencepiece" and piece.startswith("▁")):
            word += 1
        ids.append(word)
        open_word = not (style == "bpe" and piece.endswith("</w>"))
    return ids


def key_words(pieces: list[str | None], style: str) -> list[str | None]:
    """For each key: its word's text; "" for a real piece that is only punctuation or whitespace
    (a comma glued to "cinematic," is not part of the word); None for special and padding keys."""
    ids = word_ids(pieces, style)
    words = {w: _text([p for p, i in zip(pieces, ids) if i == w]) for w in set(ids) - {None}}
    return [None if p is None else "" if i is None or re.fullmatch(r"[\W_]+", _text([p])) else words[i]
            for p, i in zip(pieces, ids)]


def _text(pieces: list[str]) -> str:
    return "".join(pieces).replace("▁", " ").replace("</w>", " ").strip()


def clip_phrase_embedder(model, tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """Phrase embedding of docs/method.md (AesMask): CLIP's final-LN states averaged over the
    phrase's own tokens (start/end tokens excluded), L2-normalised.

    Always in fp32: the 0.60 threshold was tuned on fp32 embeddings, and a bf16 / fp16 CLIP-L
    (SD3's, FLUX's) moves similarities near it by a few thousandths. A model in another dtype is
    copied to fp32 once, here (CLIP-L's text tower is 0.5 GB in fp32)."""
    if model.embeddings.token_embedding.weight.dtype != torch.float32:
        model = copy.deepcopy(model).float()

    def embed(phrases: list[str]) -> torch.Tensor:
        ids = tokenizer(phrases).to(model.embeddings.token_embedding.weight.device)
        with torch.no_grad():
            states = model(ids).last_hidden_state.float()
        positions = torch.arange(ids.shape[1], device=ids.device)
        end = (ids == tokenizer.eot_id).int().argmax(dim=1, keepdim=True)
        inside = ((positions > 0) & (positions < end)).float()[:, :, None]
        mean = (states * inside).sum(1) / inside.sum(1).clamp_min(1)
        return F.normalize(mean, dim=-1).cpu()
    return embed
