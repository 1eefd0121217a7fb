"""AccelAes: training-free acceleration of diffusion transformers that keeps their aesthetics.

Three parts, in the order a generation meets them (docs/method.md says what is implemented of
the paper, equation by equation, and every choice where the paper is silent):

  AesMask (paper 3.2)    where to compute: prompt words that read as aesthetic descriptors
                         (CLIP similarity to 34 anchor phrases, Eq. 3-5) weight the image-to-text
                         attention recorded at one step (Eq. 6); the most attended image tokens
                         form the focus set F (Eq. 7).
  SkipSparse (3.3)       compute only there: after the mask step, each block runs queries, output
                         projection and FFN for focus tokens only, over keys/values of ALL tokens
                         (Eq. 9-10); background tokens get the increments cached at the last dense
                         evaluation. Spatial CFG guides focus and background differently (Eq. 11).
  StepCache (3.4)        skip whole evaluations: after a warmup, every other step's prediction is
                         extrapolated linearly from the last two computed ones (Eq. 12-13).

This file knows no model. The contracts, all checked with clear errors:
- A pipeline calls `AccelAes.start(...)` once it has tokenised the prompts, saying how its model
  batch is laid out (which row is each prompt's conditional one), then at every step
  `prediction(step, sigmas, evaluate)`, where `evaluate(probe=, block_runner=)` runs one model
  evaluation and returns the UNGUIDED predictions of every row, and applies CFG with the scale
  `guidance(step)` (None: its own uniform scale).
- A model takes part through two arguments of its forward: a `probe`, asked `for_layer(index)`
  before each layer and shown that layer's image-to-text attention if it answers, and a
  `block_runner(index, block, tokens, step)` that runs each block through its
  `increment(tokens, step, focus)` (or `attention_increment` and `ffn_increment`, for the
  attention-only ablation): the update the block adds to the tokens listed in `focus` [B, F]
  (all tokens when None), computed with every token's keys and values. A joint-attention
  sequence is [text | image], and the text tokens are always in focus.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# The paper's appendix 0.A.1: 34 anchors in six groups.
ANCHORS = (
    # style / rendering quality
    "photorealistic", "realistic", "cinematic", "highly detailed", "artistic", "masterpiece",
    "professional photography", "soft bokeh", "bokeh", "dramatic lighting", "fantasy art", "studio lighting",
    # detail / sharpness
    "detailed", "intricate", "sharp focus", "sharp",
    # aesthetic judgment
    "stunning", "beautiful", "elegant", "vivid", "vibrant",
    # photography / composition
    "depth of field", "volumetric lighting", "close up", "portrait", "full body",
    # subject emphasis
    "main subject", "foreground", "focused",
    # content-level fallback terms
    "subject", "character", "object", "figure", "person",
)


@dataclass
class AccelAesConfig:
    """Every knob of the method, with the defaults of docs/method.md (each is a flag of sample.py)."""
    # AesMask
    anchors: tuple[str, ...] = ANCHORS   # or read from a file, one phrase a line (`load_anchors`)
    threshold: float = 0.60              # tau: least CLIP similarity for a word to count as aesthetic
    top_k: int = 8                       # at most k aesthetic words (Eq. 5)
    token_weighting: str = "aesthetic"   # or the ablations "uniform" and "non-aesthetic" (Table 8)
    mask_step: int = 5                   # the step whose dense evaluation records the attention
    record_every: int = 1                # record every n-th cross-attention layer (1: all)
    skip_ratio: float = 0.50             # rho: the share of image tokens in the background
    smooth_sigma: float = 0.0            # Gaussian smoothing of the attention map, in tokens (0: off)
    # SkipSparse
    sparse: bool = True                  # run focus tokens only after the mask step
    sparse_ffn: bool = True              # the FFN too (off: attention only, the "spatial only (attn)" ablation)
    sparse_refresh: int = 0              # every n-th evaluation after the mask step runs dense (0: never)
    spatial_cfg: bool = True             # Eq. 11; guidance_fg / guidance_bg on focus / background
    guidance_fg: float = 7.0             # Lumina-Next's (base 4); each backbone sets its own (SD3: 9 / 2 at base 7)
    guidance_bg: float = 1.0
    # StepCache
    step_cache: bool = True
    warmup: int = 5                      # steps 0..warmup-1 are always computed
    interval: int = 2                    # then every interval-th step is computed, the rest extrapolated

    def check(self, steps: int) -> None:
        """Refuse settings that cannot run, with the fix in the message."""
        problems = []
        if not 0 < self.skip_ratio < 1:
            problems.append(f"skip_ratio {self.skip_ratio} must lie strictly between 0 and 1")
        if (self.sparse or self.spatial_cfg) and not 0 <= self.mask_step < steps - 1:  # a mask is built
            if steps < 2:
                problems.append(f"{steps} step leaves no step after the mask step for the focus set: sample "
                                "more steps, or run without AccelAes' spatial parts")
            else:
                problems.append(f"mask_step {self.mask_step} must be at least 0 and before the last step "
                                f"({steps - 1}); lower it or sample more steps")
        if self.warmup < 2:
            problems.append(f"warmup {self.warmup} must be at least 2: extrapolation needs two computed steps")
        if self.interval < 1:
            problems.append(f"interval {self.interval} must be at least 1")
        if self.top_k < 1:
            problems.append(f"top_k {self.top_k} must be at least 1")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            problems.append(f"token_weighting {self.token_weighting!r} must be one of {', '.join(TOKEN_WEIGHTINGS)}")
        if self.record_every < 1:
            problems.append(f"record_every {self.record_every} must be at least 1")
        if self.sparse_refresh < 0:
            problems.append(f"sparse_refresh {self.sparse_refresh} must be 0 (never) or more")
        if self.smooth_sigma < 0:
            problems.append(f"smooth_sigma {self.smooth_sigma} must be 0 (off) or more")
        if not self.anchors:
            problems.append("the anchor list is empty")
        if problems:
            raise ValueError("; ".join(problems))


# AesMask's token weights (paper Eq. 5) and the two ablations of Table 8.
TOKEN_WEIGHTINGS = ("aesthetic", "uniform", "non-aesthetic")


def load_anchors(path: str | Path) -> tuple[str, ...]:
    """Anchor phrases from a text file, one a line (blank lines and # comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"anchor file {path} does not exist: give a text file with one phrase a line")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    anchors = tuple(line for line in lines if line)
    if not anchors:
        raise ValueError(f"anchor file {path} holds no phrase: write one phrase a line")
    return anchors


# ---------------------------------------------------------------------------------------------
# AesMask, part 1: the aesthetic weight of each prompt token (paper Eq. 3-5)
# ---------------------------------------------------------------------------------------------

# Words that carry no content: they score 0 whatever CLIP says of them.
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to into onto with without for from by as is are was were be been
being am it its this that these those there here his her their our my your he she they we you i me him
them us which who whom whose what where when while than then so very too not no yes also just some any
each every all both either neither over under above below up down out off about near after before
""".split())

Embed = Callable[[list[str]], torch.Tensor]   # phrases -> L2-normalised embeddings [n, D]


def clip_phrase_embedder(model, tokenizer) -> Embed:
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


def word_ids(pieces: list[str | None], style: str) -> list[int | None]:
    """Group a tokenizer's pieces into words: the index of each piece's word, None for special
    and padding positions (given as None) and for pieces that are only whitespace.

    style "sentencepiece": a piece starting with "▁" (or the first piece) starts a word.
    style "bpe": CLIP's byte-level BPE, where a piece ending in "</w>" ends its word.
    """
    if style not in ("sentencepiece", "bpe"):
        raise ValueError(f"unknown tokenizer style {style!r}: use 'sentencepiece' or 'bpe'")
    ids, word, open_word = [], -1, False
    for piece in pieces:
        if piece is None or not piece.replace("▁", "").replace("</w>", "").strip():
            ids.append(None)
            open_word = False
            continue
        if style == "sentencepiece" and (piece.startswith("▁") or not open_word):
            word += 1
        elif style == "bpe" and not open_word:
            word += 1
        ids.append(word)
        open_word = not (style == "bpe" and piece.endswith("</w>"))
    return ids


def _word_text(pieces: list[str]) -> str:
    return "".join(pieces).replace("▁", " ").replace("</w>", " ").strip()


def _scoreable(text: str) -> str | None:
    """The word lowercased and stripped of surrounding punctuation, or None if it cannot be
    aesthetic. This normal form is what makes a word the same word in every segment."""
    word = re.sub(r"^\W+|\W+$", "", text.lower())
    if len(word) <= 1 or word in STOP_WORDS or not re.search(r"[^\W\d_]", word):
        return None
    return word


def piece_words(pieces: list[str | None], style: str) -> list[str | None]:
    """The normal form of the word each piece belongs to; None for special, padding and
    punctuation pieces (a comma glued to "cinematic," is not part of the word) and for words
    that cannot be aesthetic."""
    ids = word_ids(pieces, style)
    words = {w: _word_text([p for p, i in zip(pieces, ids) if i == w]) for w in set(ids) - {None}}
    return [None if i is None or re.fullmatch(r"[\W_]+", _word_text([p])) else _scoreable(words[i])
            for p, i in zip(pieces, ids)]


@dataclass
class PromptReport:
    """What AesMask decided for one prompt."""
    mode: str                                   # "aesthetic", "non-aesthetic" or "uniform" (0.E.3's fallback)
    matched: list[tuple[str, str, float]]       # (prompt word, closest anchor, similarity), selected only
    reason: str = ""                            # why uniform weights ran

    def describe(self) -> str:
        words = ", ".join(f"{w} ~ {a} ({s:.2f})" for w, a, s in self.matched)
        if self.mode == "aesthetic":
            return f"aesthetic words: {words}"
        if self.mode == "non-aesthetic":
            return f"non-aesthetic weighting (ablation): every prompt token but the aesthetic words {words}"
        return f"uniform token weights ({self.reason})"


Segment = tuple[list[str | None], str]   # one prompt's pieces in one part of the text sequence, and their style


class AestheticScorer:
    """Per-token aesthetic weights w_j of a prompt (paper Eq. 4-5, docs/method.md).

    One decision per prompt: the prompt's words (from every segment of its text sequence, in
    their normal form) are scored once, the top-k words scoring at least tau are selected, and
    every token of a selected word carries its score in every segment. Top-k runs over words,
    not tokens, so a word split into several pieces is never cut in half, and at most k words
    are selected however many tokenizers the backbone runs."""

    def __init__(self, embed: Embed | None, anchors: tuple[str, ...], threshold: float, top_k: int,
                 weighting: str = "aesthetic"):
        self.embed, self.anchors, self.threshold, self.top_k = embed, anchors, threshold, top_k
        self.weighting = weighting
        self.anchor_vectors = embed(list(anchors)) if embed is not None else None

    def word_scores(self, words: list[str]) -> dict[str, tuple[float, str]]:
        """(max cosine similarity over the anchors, that anchor) of each distinct normal-form word."""
        todo = sorted(set(words))
        if not todo:
            return {}
        similarity = self.embed(todo) @ self.anchor_vectors.T          # Eq. 4: [words, anchors]
        best, which = similarity.max(dim=1)                             # Eq. 5: s_j = max over anchors
        return {w: (best[i].item(), self.anchors[which[i]]) for i, w in enumerate(todo)}

    def select(self, words: list[str]) -> dict[str, tuple[float, str]]:
        """The aesthetic words: the top-k of those scoring at least tau (ties: the earlier word)."""
        scores = self.word_scores(words)
        order = list(dict.fromkeys(words))                              # first appearance
        eligible = [w for w in order if scores[w][0] >= self.threshold]
        eligible.sort(key=lambda w: -scores[w][0])                      # stable: ties keep prompt order
        return {w: scores[w] for w in eligible[:self.top_k]}

    def weights(self, segments: list[Segment]) -> tuple[torch.Tensor, PromptReport]:
        """w over one prompt's key positions, every segment's in order, and the report."""
        pieces = [p for segment, _ in segments for p in segment]
        real = torch.tensor([p is not None for p in pieces], dtype=torch.float32)
        if self.weighting == "uniform":
            return real, PromptReport("uniform", [], "asked for: --token-weighting uniform")
        if self.embed is None:
            return real, PromptReport("uniform", [], "no CLIP text encoder given")
        words = [w for segment, style in segments for w in piece_words(segment, style)]
        chosen = self.select([w for w in words if w is not None])
        if not chosen:
            return real, PromptReport("uniform", [], f"no prompt word reaches similarity {self.threshold}")
        matched = [(w, anchor, score) for w, (score, anchor) in chosen.items()]
        in_chosen = torch.tensor([w in chosen for w in words])
        if self.weighting == "non-aesthetic":
            return real * ~in_chosen, PromptReport("non-aesthetic", matched)
        weights = torch.tensor([chosen[w][0] if w in chosen else 0.0 for w in words])
        return weights, PromptReport("aesthetic", matched)


# ---------------------------------------------------------------------------------------------
# AesMask, part 2: the attention map (Eq. 6) and the focus set (Eq. 7)
# ---------------------------------------------------------------------------------------------

class CrossAttentionRecorder:
    """A probe for the attention primitive: reduces each recorded layer's image-to-text attention
    to A_l(i) = mean over heads of sum_j w_j alpha_ij / sum_j w_j, and averages over layers (Eq. 6).

    Models hand it to each layer through `for_layer(index)`, which answers None for the layers
    that are not recorded (every `every`-th layer is, counted by the model's layer index). Only
    the conditional rows of the model batch are recorded: `cond_rows[b]` is prompt b's. A layer
    is reduced to an N-vector before the next one runs, head by head in chunks, so no layer's
    full map is ever held.
    """

    def __init__(self, weights: torch.Tensor, cond_rows: list[int], every: int = 1, head_chunk: int = 4):
        self.weights = weights            # [B, L] token weights of the conditional prompts
        self.cond_rows = torch.as_tensor(cond_rows)
        self.every, self.head_chunk = every, head_chunk
        self.layers = 0
        self.total: torch.Tensor | None = None

    def for_layer(self, index: int) -> "CrossAttentionRecorder | None":
        return self if index % self.every == 0 else None

    def record(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
               bias: torch.Tensor | None = None) -> None:
        if k.shape[2] != self.weights.shape[1]:
            raise ValueError(f"the model showed the probe {k.shape[2]} text keys, but the prompt's segments list "
                             f"{self.weights.shape[1]}: the pipeline's segments must name every text key in order")
        rows = self.cond_rows.to(q.device)
        q, k = q[rows].float(), k[rows].float()
        if bias is not None and bias.shape[0] > 1:
            bias = bias[rows]
        weights = self.weights.to(q.device)
        if key_mask is not None:
            weights = weights * key_mask[rows].to(weights.dtype)
        heads = q.shape[1]
        k = k.repeat_interleave(heads // k.shape[1], dim=1)   # grouped-query: each key head serves a group
        layer_map = torch.zeros(q.shape[0], q.shape[2], device=q.device)
        for start in range(0, heads, self.head_chunk):
            logits = q[:, start:start + self.head_chunk] @ k[:, start:start + self.head_chunk].transpose(-1, -2)
            logits = logits * scale                                              # [B, h, N, L]
            if bias is not None:
                logits = logits + bias[:, start:start + self.head_chunk].float()
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[rows, None, None, :].bool(), -torch.inf)
            layer_map += (logits.softmax(dim=-1) @ weights[:, None, :, None]).squeeze(-1).sum(dim=1)
        layer_map /= heads * weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        self.total = layer_map if self.total is None else self.total + layer_map
        self.layers += 1

    def affinity(self) -> torch.Tensor:
        """A [B, N]: the mean over recorded layers."""
        if self.total is None:
            raise RuntimeError("no attention was recorded: the model never called the probe")
        return self.total / self.layers


def gaussian_smooth(values: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur [B, N] values laid out on a (rows, cols) token grid with a separable Gaussian."""
    if sigma <= 0:
        return values
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=values.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    image = values.float().view(-1, 1, *grid)
    pad_h, pad_w = min(radius, grid[0] - 1), min(radius, grid[1] - 1)
    image = F.conv2d(F.pad(image, (0, 0, pad_h, pad_h), mode="reflect"),
                     kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    image = F.conv2d(F.pad(image, (pad_w, pad_w, 0, 0), mode="reflect"),
                     kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    return image.view(values.shape)


@dataclass
class FocusMask:
    """The focus set F of each sample (paper Eq. 7) and what it was built from."""
    focus: torch.Tensor         # [B, |F|] token indices, ascending
    background: torch.Tensor    # [B, N - |F|]
    affinity: torch.Tensor      # [B, N] the (smoothed) attention map A
    soft: torch.Tensor          # [B, N] in [0, 1]: 1 on F; blurred at its edges when smoothing is on
    grid: tuple[int, int]


def build_focus_mask(affinity: torch.Tensor, grid: tuple[int, int], skip_ratio: float,
                     smooth_sigma: float = 0.0) -> FocusMask:
    """F = the N - round(rho N) tokens of largest A: top-k, so the budget is exact and ties cannot
    change the speed. The paper's percentile threshold (Eq. 7) selects the same set up to ties."""
    affinity = gaussian_smooth(affinity, grid, smooth_sigma)
    tokens = affinity.shape[1]
    keep = tokens - round(skip_ratio * tokens)
    order = affinity.argsort(dim=1, descending=True, stable=True)
    focus, background = order[:, :keep].sort(dim=1).values, order[:, keep:].sort(dim=1).values
    binary = torch.zeros_like(affinity).scatter_(1, focus, 1.0)
    soft = gaussian_smooth(binary, grid, smooth_sigma).clamp(0, 1)
    return FocusMask(focus, background, affinity, soft, grid)


# ---------------------------------------------------------------------------------------------
# SkipSparse (paper 3.3): run blocks for focus tokens only
# ---------------------------------------------------------------------------------------------

def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at token indices [B, K] -> [B, K, D]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class SkipSparse:
    """A block runner (see the module docstring) with two modes.

    dense:  the block runs as usual, and for every block the increment it adds to each image
            token (gated attention output plus gated FFN output) is kept: of all image tokens
            before the focus set is known (the mask step), of the background afterwards.
            Text tokens are never kept: sparse evaluations always compute them.
    sparse: the block computes the increment of the focus rows only (text rows, then the
            focus image rows: attention queries, output projection and FFN for them, against
            keys/values of all tokens, Eq. 9-10); each background token gets the increment kept
            at the most recent dense evaluation, so every block's output keeps the dense shape.

    sparse_ffn False is the paper's "spatial only (attn)" ablation: only the attention is
    sparse. The kept increments are then the attention's alone, and the FFN runs for every
    token on its (computed or kept) attended state.

    The block sequence is [text (text_tokens rows) | image (image_tokens rows)], checked on the
    first call: a model that put its text after the image would be told, not silently misread.
    """

    def __init__(self, text_tokens: int = 0, image_tokens: int | None = None, sparse_ffn: bool = True):
        self.text_tokens, self.image_tokens, self.sparse_ffn = text_tokens, image_tokens, sparse_ffn
        self.focus: torch.Tensor | None = None        # [R, text_tokens + |F|] rows of the block sequence
        self.background: torch.Tensor | None = None   # [R, N - |F|] rows of the block sequence
        self.increments: dict[int, torch.Tensor] = {}
        self.dense = True

    def set_focus(self, focus: torch.Tensor, background: torch.Tensor) -> None:
        """focus, background: image-token indices [R, |F|], [R, N - |F|] per model batch row.
        Called once, after the dense evaluation that kept every image token's increments; they are
        cut to the background block by block, so the full and the cut copy of all blocks never
        coexist."""
        L = self.text_tokens
        text = torch.arange(L, device=focus.device).expand(focus.shape[0], -1)
        self.focus, self.background = torch.cat([text, focus + L], dim=1), background + L
        for index in list(self.increments):
            self.increments[index] = _rows(self.increments[index], background)

    def _keep(self, index: int, increment: torch.Tensor) -> None:
        if self.background is None:
            if self.image_tokens is not None and increment.shape[1] != self.text_tokens + self.image_tokens:
                raise ValueError(f"a block's sequence has {increment.shape[1]} tokens, but the pipeline declared "
                                 f"{self.text_tokens} text tokens followed by {self.image_tokens} image tokens")
            self.increments[index] = increment[:, self.text_tokens:]
        else:
            self.increments[index] = _rows(increment, self.background)

    def __call__(self, index: int, block, x: torch.Tensor, step) -> torch.Tensor:
        if self.dense and self.sparse_ffn:
            increment = block.increment(x, step)
            self._keep(index, increment)
            return x + increment
        if self.dense:
            attended = block.attention_increment(x, step)
            self._keep(index, attended)
            return x + attended + block.ffn_increment(x, attended, step)
        if self.sparse_ffn:
            computed = _rows(x, self.focus) + block.increment(x, step, focus=self.focus)
            kept = _rows(x, self.background) + self.increments[index]
            return _scatter(x, (self.focus, computed), (self.background, kept))
        attended = _scatter(x, (self.focus, block.attention_increment(x, step, focus=self.focus)),
                            (self.background, self.increments[index]))
        return x + attended + block.ffn_increment(x, attended, step)


def _scatter(like: torch.Tensor, *parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A tensor shaped as `like` [B, N, D] whose rows index [B, K] hold values [B, K, D], per part;
    the parts together cover every row."""
    out = torch.empty_like(like)
    for index, values in parts:
        out.scatter_(1, index[:, :, None].expand_as(values), values)
    return out


def sparse_flop_ratio(forward: Callable[[SkipSparse], object], grid: tuple[int, int], skip_ratio: float,
                      text_tokens: int = 0, batch: int = 2, sparse_ffn: bool = True) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, as torch's FlopCounterMode counts them.

    forward(block_runner) runs one evaluation of the model (on the meta device it costs nothing:
    only shapes are computed). The focus set is an arbitrary one of the budget's size, with the
    first `text_tokens` of the blocks' sequence in it, as AccelAes builds it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    runner = SkipSparse(text_tokens, grid[0] * grid[1], sparse_ffn)
    with FlopCounterMode(display=False) as dense:
        forward(runner)
    mask = build_focus_mask(torch.arange(grid[0] * grid[1], dtype=torch.float32)[None], grid, skip_ratio)
    device = next(iter(runner.increments.values())).device
    runner.set_focus(mask.focus.expand(batch, -1).to(device), mask.background.expand(batch, -1).to(device))
    runner.dense = False
    with FlopCounterMode(display=False) as sparse:
        forward(runner)
    return sparse.get_total_flops() / dense.get_total_flops()


def spatial_guidance(soft: torch.Tensor, grid: tuple[int, int], latent_size: tuple[int, int],
                     fg: float, bg: float) -> torch.Tensor:
    """Eq. 11: s = s_bg + m (s_fg - s_bg) per latent position, m upsampled from the token grid.
    Returns [B, 1, H, W]."""
    m = soft.view(-1, 1, *grid)
    m = F.interpolate(m, size=latent_size, mode="nearest")
    return bg + m * (fg - bg)


# ---------------------------------------------------------------------------------------------
# StepCache (paper 3.4)
# ---------------------------------------------------------------------------------------------

def computed_steps(steps: int, warmup: int, interval: int, always: tuple[int, ...] = ()) -> list[bool]:
    """Which steps run the model: the warmup, then every interval-th step, the last step, and
    any step in `always` (the mask step records attention, so it must run)."""
    return [i < warmup or (i - warmup) % interval == 0 or i == steps - 1 or i in always for i in range(steps)]


def extrapolate(history: list[tuple[float, torch.Tensor]], sigma: float) -> torch.Tensor:
    """Eq. 13 in the sampler's own time: v(s) ~ v_a + (s - s_a) (v_a - v_b) / (s_a - s_b), from the
    last two computed (sigma, prediction) pairs. Dividing by the real spacing keeps the slope right
    when steps are skipped (the public code adds v_a - v_b whatever the gap)."""
    (s_b, v_b), (s_a, v_a) = history[-2], history[-1]
    slope = (v_a.float() - v_b.float()) / (s_a - s_b)
    return (v_a.float() + (sigma - s_a) * slope).to(v_a.dtype)


# ---------------------------------------------------------------------------------------------
# One generation
# ---------------------------------------------------------------------------------------------

@dataclass
class RunStats:
    dense: int = 0              # model evaluations run dense (the mask step included)
    sparse: int = 0             # model evaluations run on focus tokens
    extrapolated: int = 0       # steps that ran no model evaluation
    mask_seconds: float = 0.0   # building the mask from the recorded attention (the recording is
                                # part of the mask step's evaluation)

    @property
    def evaluations(self) -> int:
        return self.dense + self.sparse


def _clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done: CUDA runs asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class AccelAes:
    """The method's state for one generation. Use: start(...), then at every step
    prediction(...) and guidance(...) (pipelines/sampling.py's loop does both)."""
    config: AccelAesConfig
    scorer: AestheticScorer
    stats: RunStats = field(default_factory=RunStats)
    reports: list[PromptReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what a run should tell its user, once
    mask: FocusMask | None = None

    @classmethod
    def create(cls, config: AccelAesConfig, embed: Embed | None = None) -> "AccelAes":
        scorer = AestheticScorer(embed, config.anchors, config.threshold, config.top_k, config.token_weighting)
        return cls(config, scorer)

    def start(self, *, segments: list[tuple[list[list[str | None]], str]], grid: tuple[int, int],
              latent_size: tuple[int, int], steps: int, rows: BatchRows, text_tokens: int = 0) -> None:
        """Called by the pipeline once the prompts are tokenised.

        segments: the text sequence the image attends to, as (pieces, style) parts in order
        (Lumina: Gemma's; SD3: CLIP's then T5's), pieces[b][j] the text of key j of prompt b or
        None for special and padding keys. grid: image tokens (rows, cols); latent_size: (H, W)
        of the latents; rows: the model batch's layout: `rows.prompt_of_row[r]` is the prompt row r
        serves, `rows.cond_row[b]` prompt b's conditional row, `rows.guided` whether CFG runs
        (pipelines/sampling.py's BatchRows; nothing here assumes an order); text_tokens: how many text
        tokens precede the image tokens in the blocks' sequence (joint attention: SD3, FLUX),
        which sparse evaluations always compute.
        """
        config = self.config
        config.check(steps)
        self.stats, self.reports, self.notes, self.mask = RunStats(), [], [], None
        self.grid, self.latent_size, self.rows = grid, latent_size, rows
        weights = []
        for b in range(len(rows.cond_row)):
            w, report = self.scorer.weights([(pieces[b], style) for pieces, style in segments])
            weights.append(w)
            self.reports.append(report)
        self.token_weights = torch.stack(weights)
        self.spatial_cfg = config.spatial_cfg and rows.guided
        self.needs_mask = config.sparse or self.spatial_cfg
        always = (config.mask_step,) if self.needs_mask else ()
        self.computed = (computed_steps(steps, config.warmup, config.interval, always) if config.step_cache
                         else [True] * steps)
        if config.step_cache and all(self.computed):
            self.notes.append(f"StepCache: {steps} steps with warmup {config.warmup} leave no step to extrapolate; "
                              "every step runs the model (sample more steps, or lower --warmup)")
        self.history: list[tuple[float, torch.Tensor]] = []
        self.skip_sparse = SkipSparse(text_tokens, grid[0] * grid[1], config.sparse_ffn)
        self.evaluations_after_mask = 0
        self.guidance_map: torch.Tensor | None = None

    def prediction(self, step: int, sigmas: torch.Tensor, evaluate: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The model batch's unguided predictions at `step` (conditional and unconditional rows):
        computed (dense, recorded or sparse) or extrapolated.

        StepCache extrapolates these, never the guided velocity, and the caller applies the
        guidance in force at the step (`guidance`) afterwards. CFG is linear in (cond, uncond),
        so under constant guidance this equals extrapolating the guided velocity; across the
        switch from uniform to spatial CFG after the mask step it stays right, where an
        extrapolated guided velocity would mix the two (at the defaults step 8 would get 8.5 on
        focus tokens and -0.5 on the background). Chosen over restarting the history at the
        switch: it costs no evaluation, and stays right if guidance ever varies per step.
        """
        config, sigma = self.config, float(sigmas[step])
        if not self.computed[step]:
            self.stats.extrapolated += 1
            return extrapolate(self.history, sigma)
        if not self.needs_mask or step < config.mask_step:
            prediction = evaluate()
            self.stats.dense += 1
        elif self.mask is None:
            prediction = self._mask_step(evaluate)
        else:
            prediction = self._after_mask(evaluate)
        self.history = (self.history + [(sigma, prediction)])[-2:]
        return prediction

    def guidance(self, step: int) -> torch.Tensor | None:
        """The guidance in force at `step`: the spatial map (Eq. 11) after the mask step, or None
        for the pipeline's own uniform scale. The mask step itself is guided uniformly: its
        evaluation is what builds the mask."""
        return self.guidance_map if step > self.config.mask_step else None

    def _mask_step(self, evaluate) -> torch.Tensor:
        """One dense evaluation that records the attention (and keeps the increments for SkipSparse)."""
        config = self.config
        recorder = CrossAttentionRecorder(self.token_weights, list(self.rows.cond_row), config.record_every)
        prediction = evaluate(probe=recorder, block_runner=self.skip_sparse if config.sparse else None)
        self.stats.dense += 1
        started = _clock(prediction.device)
        self.mask = build_focus_mask(recorder.affinity(), self.grid, config.skip_ratio, config.smooth_sigma)
        # Every row of the model batch takes the focus set of the prompt it serves.
        of_prompt = torch.tensor(self.rows.prompt_of_row)
        focus, background = (m[of_prompt].to(prediction.device) for m in (self.mask.focus, self.mask.background))
        self.skip_sparse.set_focus(focus, background)
        self.skip_sparse.dense = False
        if self.spatial_cfg:
            self.guidance_map = spatial_guidance(self.mask.soft, self.grid, self.latent_size, config.guidance_fg,
                                                 config.guidance_bg).to(prediction.device)
        self.stats.mask_seconds += _clock(prediction.device) - started
        return prediction

    def _after_mask(self, evaluate) -> torch.Tensor:
        config = self.config
        self.evaluations_after_mask += 1
        if not config.sparse:
            self.stats.dense += 1
            return evaluate()
        refresh = config.sparse_refresh > 0 and self.evaluations_after_mask % config.sparse_refresh == 0
        self.skip_sparse.dense = refresh
        prediction = evaluate(block_runner=self.skip_sparse)
        self.skip_sparse.dense = False
        if refresh:
            self.stats.dense += 1
        else:
            self.stats.sparse += 1
        return prediction
