"""What the random pipelines need that no release provides: weights drawn at a sensible scale,
and byte-level tokenizers with the interfaces of the real ones (Gemma's, CLIP's, T5's).

They let `python sample.py` run every backbone without a download, and the tests and
benchmark.py run every pipeline through the one interface. The pictures are noise by design.
"""

from __future__ import annotations

import torch


def randomized(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05,
               norms_near_one: bool = False) -> torch.nn.Module:
    """Fill every parameter from `generator`, in the module's parameter order, so a seed fixes
    the model. norms_near_one: 1-D "norm" weights are drawn around 1 (deep stacks stay finite)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if norms_near_one and param.dim() == 1 and "norm" in name else std * noise)
    return module.requires_grad_(False).eval()


class ByteTokenizer:
    """Gemma's interface (BOS first, right padding): UTF-8 bytes as ids after BOS."""
    pad_id, bos_id, offset = 0, 2, 4
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS."""
        return [b + self.offset for b in text.encode()]

    def id_to_piece(self, ids: list[int]) -> list[str]:
        """A space byte reads as SentencePiece's word marker, so words group as Gemma's do."""
        return [chr(i - self.offset).replace(" ", "▁") if i >= self.offset else "<special>" for i in ids]

    def __call__(self, texts: list[str], max_length: int = 256, pad_to_multiple_of: int | None = 8,
                 length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [([self.bos_id] + [b + self.offset for b in t.encode()])[:length or max_length] for t in texts]
        if length is None:
            length = -(-max(map(len, rows)) // (pad_to_multiple_of or 1)) * (pad_to_multiple_of or 1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return ids, mask


class ByteCLIPTokenizer:
    """CLIP's interface: 77 ids, start and end of text, a piece ending in "</w>" ends its word.
    Each byte of a word is a piece (id = byte, +256 for a word's last byte)."""
    sot_id, eot_id = 512, 513
    pad_id = eot_id
    vocab_size, max_length = 514, 77

    def _pieces(self, text: str) -> list[tuple[str, int]]:
        pieces = []
        for word in text.lower().split():
            data = word.encode()
            pieces += [(chr(b) + ("</w>" if i == len(data) - 1 else ""), b + 256 * (i == len(data) - 1))
                       for i, b in enumerate(data)]
        return pieces

    def tokens(self, text: str) -> list[str]:
        return ["<|startoftext|>", *(p for p, _ in self._pieces(text)[:self.max_length - 2]), "<|endoftext|>"]

    def length(self, text: str) -> int:
        return len(self._pieces(text)) + 2

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.sot_id, *(t for _, t in self._pieces(text)[:self.max_length - 2]), self.eot_id]
            ids[i, :len(row)] = torch.tensor(row)
        return ids


class ByteT5Tokenizer:
    """T5's interface: pieces, then </s>, then padding to max_length. A word's first byte carries
    SentencePiece's "▁"; ids are the bytes after pad, </s> and <unk>."""
    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + offset

    def _pieces(self, text: str) -> list[tuple[str, int]]:
        pieces = []
        for word in text.split():
            pieces += [(("▁" if i == 0 else "") + chr(b), b + self.offset) for i, b in enumerate(word.encode())]
        return pieces

    def encode(self, text: str) -> list[int]:
        return [t for _, t in self._pieces(text)]

    def tokens(self, text: str, max_length: int = 256) -> list[str]:
        return [*(p for p, _ in self._pieces(text)[:max_length - 1]), "</s>"]

    def __call__(self, texts: str | list[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            row = [*(t for _, t in self._pieces(text)[:max_length - 1]), self.eos_id]
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return ids, mask
