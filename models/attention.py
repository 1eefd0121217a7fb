"""The one attention primitive every model here calls.

Queries and keys/values are separate arguments of any length, so a caller may pass queries
for a subset of tokens (AccelAes' focus tokens) against keys/values of all tokens: the
result is the rows of full attention for those queries, nothing approximated.

A caller may add a bias to the scores (T5's relative positions) and hand it a probe, which
is shown the queries, keys and bias of that call (before the softmax) so it can reduce the
attention probabilities to what it needs: AccelAes' image-to-text attention map. The probe
is an argument of the call, never global state.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionProbe(Protocol):
    def for_layer(self, index: int) -> "AttentionProbe | None":
        """Asked by a model before its layer `index` (counted from 0 over the layers that can show
        attention): the probe that layer's attention is shown, or None to show it nothing."""

    def record(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
               bias: torch.Tensor | None = None) -> None:
        """Called with q [B, Hq, Nq, D], k [B, Hkv, Nk, D], key_mask [B, Nk], the softmax scale and
        the score bias as the caller gave it (broadcastable to [B, Hq, Nq, Nk]; key_mask not folded in)."""


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*D] -> [B, heads, N, D]."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads*D]."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None, bias: torch.Tensor | None = None,
              probe: AttentionProbe | None = None, probe_span: tuple[slice, slice] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias + masks) v, per head.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (grouped-query
    attention shares each key/value head among Hq/Hkv query heads).
    key_mask: [B, Nk] bool, True where a key may be attended (padding is False).
    causal: query i sees keys 0..i (text encoders; needs Nq == Nk). Not combined with a bias.
    scale: defaults to 1/sqrt(D).
    bias: float, broadcastable to [B, Hq, Nq, Nk], added to the scaled scores (T5: its relative
        position bias, with scale=1.0). With a bias, masked keys get the dtype's lowest value
        instead of -inf, as transformers' T5 does: a query whose keys are all masked then gets
        an average of the values instead of NaN.
    probe: if given, shown (q, k, key_mask, scale, bias) before the attention runs.
    probe_span: (query rows, key columns) the probe is shown, when it should see part of the call:
        a joint attention over [text, image] tokens shows the image queries against the text
        keys, so the probe's softmax runs over the text keys alone.
    """
    if probe is not None:
        shown = (q, k, key_mask, bias)
        if probe_span is not None:
            rows, columns = probe_span
            shown = (q[:, :, rows], k[:, :, columns], None if key_mask is None else key_mask[:, columns],
                     None if bias is None else bias[..., rows, columns])
        probe.record(*shown[:3], scale if scale is not None else q.shape[-1] ** -0.5, shown[3])
    if bias is not None:
        if causal:
            raise NotImplementedError("attention with both a bias and causal=True: no model here needs it; "
                                      "fold the causal mask into the bias")
        mask = _bias_with_key_mask(bias.to(q.dtype), key_mask)
    else:
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :].to(torch.bool)
            if causal:
                mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
                causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _bias_with_key_mask(bias: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The bias with masked keys' entries set to the dtype's lowest value, [B, H, Nq, Nk] broadcastable.

    The bias is already in the scores' dtype: the lowest value of a wider dtype would become
    -inf when cast down (fp32's lowest is past the range of fp16, and rounds to -inf in bf16),
    and bring back the NaN rows this avoids.
    """
    if key_mask is None:
        return bias
    return torch.where(key_mask[:, None, None, :].to(torch.bool), bias, torch.finfo(bias.dtype).min)
