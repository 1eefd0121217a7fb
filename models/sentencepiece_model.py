"""A reader for SentencePiece `.model` files, for Gemma's tokenizer.model.

Why our own, when the sentencepiece library reads these files: transformers' GemmaTokenizer,
the reference whose ids Lumina-Next was trained with, is not what the library computes. It
ignores the .model's normalizer (no dummy "▁" prefix, runs of spaces kept, no NFKC), which the
library always applies, and it treats the user-defined pieces as added tokens matched in the
raw text, which needs the type of every piece: the library's API has is_control / is_unknown /
is_byte / is_unused, but nothing that tells a user-defined piece from a normal one (its
protobuf classes need the protobuf package). tests/test_gemma.py::test_why_not_the_library
shows both. So models/gemma.py runs its own BPE over the pieces read here. (T5's tokenizer,
whose reference ids the library does give, uses the library: models/t5.py.)

A `.model` is a serialized protobuf message (sentencepiece_model.proto's ModelProto); only
what is needed is read:
    ModelProto      1 = pieces (repeated), 2 = trainer spec, 3 = normalizer spec
    SentencePiece   1 = piece text, 3 = type (default NORMAL)
    TrainerSpec     3 = model type (default UNIGRAM)
    NormalizerSpec  2 = precompiled_charsmap (not used by Gemma; T5's tests build
                        transformers' reference tokenizer from it where protobuf is missing)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoint import CheckpointError

# Piece types (SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Model types (TrainerSpec.ModelType).
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4


@dataclass(frozen=True)
class SentencePieceModel:
    """The vocabulary of a `.model` file; pieces and types are in id order."""
    pieces: list[str]
    types: list[int]             # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE
    model_type: int              # UNIGRAM, BPE, WORD or CHAR
    charsmap: bytes | None       # the normalizer's precompiled table; None when the file has none


def read_sentencepiece_model(path: str | os.PathLike) -> SentencePieceModel:
    """Read a SentencePiece `.model` file; CheckpointError if it is damaged or holds no pieces."""
    data = Path(path).read_bytes()
    try:
        model = _parse_model(data)
    except (ValueError, IndexError):  # IndexError: a varint runs past the end; bad UTF-8 is a ValueError
        model = None
    if model is None or not model.pieces:
        raise CheckpointError(f"{path} is not a SentencePiece model (or it is damaged): download it again")
    return model


def _parse_model(data: bytes) -> SentencePieceModel:
    pieces, types = [], []
    model_type, charsmap = UNIGRAM, None
    for number, value in _fields(data):
        if number == 1:
            piece = _message(value)
            pieces.append(_bytes(piece, 1, b"").decode("utf-8"))
            types.append(_int(piece, 3, NORMAL))
        elif number == 2:
            model_type = _int(_message(value), 3, UNIGRAM)
        elif number == 3:
            charsmap = _bytes(_message(value), 2, b"") or None
    return SentencePieceModel(pieces, types, model_type, charsmap)


# ---------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to walk a message. Malformed input raises ValueError or
# IndexError, which read_sentencepiece_model turns into CheckpointError.
# ---------------------------------------------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The base-128 integer starting at `pos`, and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one serialized message: an int for varints, bytes for the rest."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:                      # varint: ints, enums
            value, pos = _varint(data, pos)
        elif wire_type == 1:                    # 64-bit
            value, pos = data[pos:pos + 8], pos + 8
        elif wire_type == 2:                    # length-delimited: strings, bytes, nested messages
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire_type == 5:                    # 32-bit: floats (a piece's score)
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield number, value


def _message(value: int | bytes) -> dict[int, int | bytes]:
    """The fields of a nested message; for a field given twice the last wins (protobuf's rule)."""
    if not isinstance(value, bytes):
        raise ValueError("a nested message stored as a number")
    return dict(_fields(value))


# Each field's kind (number or string) is checked where it is read, so a damaged file
# is reported rather than read as wrong pieces.

def _bytes(fields: dict, number: int, default: bytes) -> bytes:
    value = fields.get(number, default)
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} is a number, not a string")
    return value


def _int(fields: dict, number: int, default: int) -> int:
    value = fields.get(number, default)
    if not isinstance(value, int):
        raise ValueError(f"field {number} is not a number")
    return value

