"""The one attention primitive every model here calls.

Queries and keys/values are separate arguments of any length, so a caller may pass queries
for a subset of tokens (AccelAes' focus tokens) against keys/values of all tokens: the
result is the rows of full attention for those queries, nothing approximated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*D] -> [B, heads, N, D]."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads*D]."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + masks) v, per head.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (grouped-query
    attention shares each key/value head among Hq/Hkv query heads).
    key_mask: [B, Nk] bool, True where a key may be attended (padding is False).
    causal: query i sees keys 0..i (text encoders; needs Nq == Nk).
    scale: defaults to 1/sqrt(D).
    """
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
        if causal:
            mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
