"""AccelAes: training-free acceleration of diffusion transformers that keeps their aesthetics.

Three parts, in the order a generation meets them (the paper is ../shared/paper/accelaes.md;
the choices where it is silent are ../shared/reference/method.md):

  AesMask (paper 3.2)    where to compute: prompt tokens that read as aesthetic descriptors
                         (CLIP similarity to 34 anchor phrases, Eq. 3-5) weight the image-to-text
                         attention recorded at one step (Eq. 6); the most attended image tokens
                         form the focus set F (Eq. 7).
  SkipSparse (3.3)       compute only there: after the mask step, each block runs queries, output
                         projection and FFN for focus tokens only, over keys/values of ALL tokens
                         (Eq. 9-10); background tokens get the increments cached at the last dense
                         evaluation. Spatial CFG guides focus and background differently (Eq. 11).
  StepCache (3.4)        skip whole evaluations: after a warmup, every other step's prediction is
                         extrapolated linearly from the last two computed ones (Eq. 12-13).

This file knows no model. A pipeline calls `AccelAes.start(...)` once it has tokenised the
prompt, then `AccelAes.velocity(step, sigmas, evaluate)` at every step, where
`evaluate(guidance=, probe=, block_runner=)` runs one guided model evaluation. A model takes
part through two arguments of its forward: a `probe` its attention primitive shows the
image-to-text attention to, and a `block_runner(index, block, tokens, step)` that runs each of
its blocks through the block's `increment(tokens, step, focus)`: the update the block adds to
the tokens listed in `focus` [B, F] (all tokens when None), computed with every token's keys
and values. Joint-attention models list their text tokens first in `focus`.
"""

from __future__ import annotations

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
    """Every knob of the method, with method.md's defaults (each is a flag of sample.py)."""
    # AesMask
    anchors: tuple[str, ...] = ANCHORS   # or read from a file, one phrase a line (`load_anchors`)
    threshold: float = 0.60              # tau: least CLIP similarity for a token to count as aesthetic
    top_k: int = 8                       # at most k aesthetic tokens (Eq. 5)
    mask_step: int = 5                   # the step whose dense evaluation records the attention
    record_every: int = 1                # record every n-th cross-attention layer (1: all)
    skip_ratio: float = 0.50             # rho: the share of image tokens in the background
    smooth_sigma: float = 0.0            # Gaussian smoothing of the attention map, in tokens (0: off)
    # SkipSparse
    sparse: bool = True                  # run focus tokens only after the mask step
    sparse_refresh: int = 0              # every n-th evaluation after the mask step runs dense (0: never)
    spatial_cfg: bool = True             # Eq. 11; guidance_fg / guidance_bg on focus / background
    guidance_fg: float = 7.0
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
            problems.append(f"mask_step {self.mask_step} must be at least 0 and before the last step "
                            f"({steps - 1}); lower it or sample more steps")
        if self.warmup < 2:
            problems.append(f"warmup {self.warmup} must be at least 2: extrapolation needs two computed steps")
        if self.interval < 1:
            problems.append(f"interval {self.interval} must be at least 1")
        if self.top_k < 1:
            problems.append(f"top_k {self.top_k} must be at least 1")
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
    """Phrase embedding of method.md 1a: CLIP's final-LN states averaged over the phrase's own
    tokens (start/end tokens excluded), L2-normalised; the 0.60 threshold was tuned on it."""
    def embed(phrases: list[str]) -> torch.Tensor:
        ids = tokenizer(phrases).to(model.embeddings.token_embedding.weight.device)
        with torch.no_grad():
            states = model(ids).last_hidden_state.float()
        positions = torch.arange(ids.shape[1], device=ids.device)
        end = (ids == tokenizer.eot_id).int().argmax(dim=1, keepdim=True)
        inside = ((positions > 0) & (positions < end)).float()[:, :, None]
        mean = (states * inside).sum(1) / inside.sum(1).clamp_min(1)
        return F.normalize(mean, dim=-1)
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
    """The word stripped of surrounding punctuation, or None if it cannot be aesthetic."""
    word = re.sub(r"^\W+|\W+$", "", text.lower())
    if len(word) <= 1 or word in STOP_WORDS or not re.search(r"[^\W\d_]", word):
        return None
    return word


@dataclass
class PromptReport:
    """What AesMask decided for one prompt."""
    mode: str                                   # "aesthetic", or "uniform" (paper 0.E.3's fallback)
    matched: list[tuple[str, str, float]]       # (prompt word, closest anchor, similarity), selected only
    reason: str = ""                            # why the fallback ran

    def describe(self) -> str:
        if self.mode == "aesthetic":
            words = ", ".join(f"{w} ~ {a} ({s:.2f})" for w, a, s in self.matched)
            return f"aesthetic tokens: {words}"
        return f"uniform token weights ({self.reason})"


class AestheticScorer:
    """Per-token aesthetic weights w_j of a prompt (paper Eq. 4-5, method.md 1a)."""

    def __init__(self, embed: Embed | None, anchors: tuple[str, ...], threshold: float, top_k: int):
        self.embed, self.anchors, self.threshold, self.top_k = embed, anchors, threshold, top_k
        self.anchor_vectors = embed(list(anchors)) if embed is not None else None

    def word_scores(self, words: list[str]) -> list[tuple[float, str]]:
        """(max cosine similarity over the anchors, that anchor) of each word; 0 for non-words."""
        scoreable = [_scoreable(w) for w in words]
        todo = sorted({w for w in scoreable if w})
        scores = {}
        if todo:
            similarity = self.embed(todo) @ self.anchor_vectors.T          # Eq. 4: [words, anchors]
            best, which = similarity.max(dim=1)                             # Eq. 5: s_j = max_a
            scores = {w: (best[i].item(), self.anchors[which[i]]) for i, w in enumerate(todo)}
        return [scores.get(w, (0.0, "")) if w else (0.0, "") for w in scoreable]

    def weights(self, pieces: list[str | None], style: str) -> tuple[torch.Tensor, PromptReport]:
        """w [L] over one prompt's key positions, and the report."""
        real = torch.tensor([p is not None for p in pieces], dtype=torch.float32)
        if self.embed is None:
            return real, PromptReport("uniform", [], "no CLIP text encoder given")
        ids = word_ids(pieces, style)
        count = 1 + max((i for i in ids if i is not None), default=-1)
        words = [_word_text([p for p, i in zip(pieces, ids) if i == w]) for w in range(count)]
        per_word = self.word_scores(words)
        # Every token of a word gets the word's score, but a punctuation piece of it ("cat" "," ) none.
        token_scores = torch.tensor([0.0 if i is None or re.fullmatch(r"[\W_]+", _word_text([p])) else per_word[i][0]
                                     for p, i in zip(pieces, ids)])
        eligible = token_scores >= self.threshold
        if not eligible.any():
            return real, PromptReport("uniform", [], f"no prompt word reaches similarity {self.threshold}")
        chosen = torch.topk(torch.where(eligible, token_scores, -torch.inf),
                            min(self.top_k, int(eligible.sum()))).indices
        weights = torch.zeros(len(pieces))
        weights[chosen] = token_scores[chosen]
        matched_words = sorted({ids[j] for j in chosen.tolist()})
        matched = [(words[w], per_word[w][1], per_word[w][0]) for w in matched_words]
        return weights, PromptReport("aesthetic", matched)


# ---------------------------------------------------------------------------------------------
# AesMask, part 2: the attention map (Eq. 6) and the focus set (Eq. 7)
# ---------------------------------------------------------------------------------------------

class CrossAttentionRecorder:
    """A probe for the attention primitive: reduces each recorded layer's image-to-text attention
    to A_l(i) = mean over heads of sum_j w_j alpha_ij / sum_j w_j, and averages over layers (Eq. 6).

    Only the conditional rows (the first `rows` of the batch) are recorded. A layer is reduced
    to an N-vector before the next one runs, head by head in chunks, so no layer's full map is
    ever held.
    """

    def __init__(self, weights: torch.Tensor, every: int = 1, head_chunk: int = 4):
        self.weights = weights            # [B, L] token weights of the conditional prompts
        self.every, self.head_chunk = every, head_chunk
        self.calls = 0
        self.layers = 0
        self.total: torch.Tensor | None = None

    def record(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
               bias: torch.Tensor | None = None) -> None:
        layer, self.calls = self.calls, self.calls + 1
        if layer % self.every:
            return
        rows = self.weights.shape[0]
        q, k = q[:rows].float(), k[:rows].float()
        weights = self.weights.to(q.device)
        if key_mask is not None:
            weights = weights * key_mask[:rows].to(weights.dtype)
        heads = q.shape[1]
        k = k.repeat_interleave(heads // k.shape[1], dim=1)   # grouped-query: each key head serves a group
        layer_map = torch.zeros(q.shape[0], q.shape[2], device=q.device)
        for start in range(0, heads, self.head_chunk):
            logits = q[:, start:start + self.head_chunk] @ k[:, start:start + self.head_chunk].transpose(-1, -2)
            logits = logits * scale                                              # [B, h, N, L]
            if bias is not None:
                logits = logits + bias[:, start:start + self.head_chunk].float()
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:rows, None, None, :].bool(), -torch.inf)
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

    dense:  the block runs as usual and the increment it adds to each background token (gated
            attention output plus gated FFN output) is kept, for every block.
    sparse: the block computes the increment of the focus tokens only (attention queries, output
            projection and FFN for them, against keys/values of all tokens, Eq. 9-10); each
            background token gets the increment kept at the most recent dense evaluation, so
            every block's output keeps the dense shape.
    Before the focus set is known (the mask step), the dense mode keeps the increments of all
    tokens; `set_focus` then keeps the background's.
    """

    def __init__(self):
        self.focus: torch.Tensor | None = None        # [B_model, |F|]
        self.background: torch.Tensor | None = None
        self.increments: dict[int, torch.Tensor] = {}
        self.dense = True

    def set_focus(self, focus: torch.Tensor, background: torch.Tensor) -> None:
        """Called once, after the dense evaluation that kept every token's increments."""
        self.focus, self.background = focus, background
        self.increments = {i: _rows(inc, background) for i, inc in self.increments.items()}

    def __call__(self, index: int, block, x: torch.Tensor, step) -> torch.Tensor:
        if self.dense:
            increment = block.increment(x, step)
            self.increments[index] = increment if self.background is None else _rows(increment, self.background)
            return x + increment
        rows = _rows(x, self.focus) + block.increment(x, step, focus=self.focus)
        out = torch.empty_like(x)
        out.scatter_(1, self.focus[:, :, None].expand_as(rows), rows)
        background = _rows(x, self.background) + self.increments[index]
        return out.scatter_(1, self.background[:, :, None].expand_as(background), background)


def sparse_flop_ratio(forward: Callable[[SkipSparse], object], grid: tuple[int, int], skip_ratio: float,
                      text_tokens: int = 0, batch: int = 2) -> float:
    """Matmul FLOPs of a sparse evaluation over a dense one, as torch's FlopCounterMode counts them.

    forward(block_runner) runs one evaluation of the model (on the meta device it costs nothing:
    only shapes are computed). The focus set is an arbitrary one of the budget's size, with the
    first `text_tokens` of the blocks' sequence in it, as AccelAes builds it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    runner = SkipSparse()
    with FlopCounterMode(display=False) as dense:
        forward(runner)
    mask = build_focus_mask(torch.arange(grid[0] * grid[1], dtype=torch.float32)[None], grid, skip_ratio)
    device = next(iter(runner.increments.values())).device
    text = torch.arange(text_tokens).expand(batch, -1)
    runner.set_focus(torch.cat([text, mask.focus.expand(batch, -1) + text_tokens], dim=1).to(device),
                     (mask.background.expand(batch, -1) + text_tokens).to(device))
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


@dataclass
class AccelAes:
    """The method's state for one generation. Use: start(...), then velocity(...) every step."""
    config: AccelAesConfig
    scorer: AestheticScorer
    stats: RunStats = field(default_factory=RunStats)
    reports: list[PromptReport] = field(default_factory=list)
    mask: FocusMask | None = None

    @classmethod
    def create(cls, config: AccelAesConfig, embed: Embed | None = None) -> "AccelAes":
        return cls(config, AestheticScorer(embed, config.anchors, config.threshold, config.top_k))

    def start(self, *, segments: list[tuple[list[list[str | None]], str]], grid: tuple[int, int],
              latent_size: tuple[int, int], steps: int, guided: bool, text_tokens: int = 0) -> None:
        """Called by the pipeline once the prompts are tokenised.

        segments: the text sequence the image attends to, as (pieces, style) parts in order
        (Lumina: Gemma's; SD3: CLIP's then T5's), pieces[b][j] the text of key j of prompt b or
        None for special and padding keys. grid: image tokens (rows, cols); latent_size: (H, W)
        of the latents; guided: the batch holds [cond, uncond] (CFG); text_tokens: how many text
        tokens precede the image tokens in the blocks' sequence (joint attention: SD3, FLUX),
        which sparse evaluations always compute.
        """
        config = self.config
        config.check(steps)
        self.stats, self.reports, self.mask = RunStats(), [], None
        self.grid, self.latent_size, self.guided, self.text_tokens = grid, latent_size, guided, text_tokens
        prompts = len(segments[0][0])
        rows = []
        for b in range(prompts):
            parts = [self.scorer.weights(pieces[b], style) for pieces, style in segments]
            rows.append(torch.cat([w for w, _ in parts]))
            self.reports.append(_merge_reports([r for _, r in parts]))
        self.token_weights = torch.stack(rows)
        self.needs_mask = config.sparse or (config.spatial_cfg and guided)
        always = (config.mask_step,) if self.needs_mask else ()
        self.computed = (computed_steps(steps, config.warmup, config.interval, always) if config.step_cache
                         else [True] * steps)
        self.history: list[tuple[float, torch.Tensor]] = []
        self.skip_sparse = SkipSparse()
        self.evaluations_after_mask = 0

    def velocity(self, step: int, sigmas: torch.Tensor, evaluate: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The prediction at `step`: computed (dense, recorded or sparse) or extrapolated."""
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

    def _mask_step(self, evaluate) -> torch.Tensor:
        """One dense evaluation that records the attention (and keeps the increments for SkipSparse)."""
        recorder = CrossAttentionRecorder(self.token_weights, self.config.record_every)
        prediction = evaluate(probe=recorder, block_runner=self.skip_sparse if self.config.sparse else None)
        self.stats.dense += 1
        started = time.perf_counter()
        self.mask = build_focus_mask(recorder.affinity(), self.grid, self.config.skip_ratio,
                                     self.config.smooth_sigma)
        # The model's batch is [cond, uncond] under CFG: both halves use the prompt's focus set.
        # In a joint sequence the image tokens follow the text tokens, all of which stay in focus.
        copies = 2 if self.guided else 1
        focus, background = (m.repeat(copies, 1).to(prediction.device) + self.text_tokens
                             for m in (self.mask.focus, self.mask.background))
        text = torch.arange(self.text_tokens, device=prediction.device).expand(focus.shape[0], -1)
        self.skip_sparse.set_focus(torch.cat([text, focus], dim=1), background)
        self.skip_sparse.dense = False
        self.guidance_map = (spatial_guidance(self.mask.soft, self.grid, self.latent_size, self.config.guidance_fg,
                                              self.config.guidance_bg) if self.config.spatial_cfg and self.guided
                             else None)
        self.stats.mask_seconds += time.perf_counter() - started
        return prediction

    def _after_mask(self, evaluate) -> torch.Tensor:
        config = self.config
        self.evaluations_after_mask += 1
        kwargs = {} if self.guidance_map is None else {"guidance": self.guidance_map}
        if not config.sparse:
            self.stats.dense += 1
            return evaluate(**kwargs)
        refresh = config.sparse_refresh > 0 and self.evaluations_after_mask % config.sparse_refresh == 0
        self.skip_sparse.dense = refresh
        prediction = evaluate(block_runner=self.skip_sparse, **kwargs)
        self.skip_sparse.dense = False
        if refresh:
            self.stats.dense += 1
        else:
            self.stats.sparse += 1
        return prediction


def _merge_reports(reports: list[PromptReport]) -> PromptReport:
    """One report per prompt when its text sequence has several segments (SD3: CLIP and T5)."""
    matched = sorted({m for r in reports for m in r.matched}, key=lambda m: -m[2])
    if any(r.mode == "aesthetic" for r in reports):
        return PromptReport("aesthetic", matched)
    return PromptReport("uniform", [], reports[0].reason)
