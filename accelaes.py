"""AccelAes: training-free acceleration of diffusion transformers that keeps their aesthetics.

Three parts, in the order a generation meets them (docs/method.md: what is implemented of the
paper, equation by equation, and every choice where it is silent):

  AesMask (3.2)      prompt words that read as aesthetic (CLIP similarity to 34 anchors, Eq. 3-5)
                     weight the image-to-text attention of one step (Eq. 6); the most attended
                     image tokens form the focus set F (Eq. 7).
  SkipSparse (3.3)   after the mask step, blocks compute focus tokens only, over keys/values of
                     ALL tokens (Eq. 9-10); the background keeps its last dense increments.
                     Spatial CFG guides focus and background differently (Eq. 11).
  StepCache (3.4)    after a warmup, every other step's prediction is extrapolated linearly
                     from the last two computed ones (Eq. 12-13).

This file knows no model. Its contracts, checked with clear errors:
- A pipeline calls `AccelAes.start(...)` once the prompts are tokenised, saying which row of its
  model batch is each prompt's conditional one; then, every step, `prediction(step, sigmas,
  evaluate)`, where `evaluate(probe=, block_runner=)` runs one model evaluation and returns the
  UNGUIDED predictions of every row, and it applies CFG at the scale `guidance(step)`.
- A model takes part through two arguments of its forward: a `probe`, asked `for_layer(index)`
  before each layer and shown that layer's image-to-text attention if it answers, and a
  `block_runner(index, block, tokens, step)` that runs each block through its
  `increment(tokens, step, focus)` (or `attention_increment` then `ffn_increment`): the update
  of the tokens listed in `focus` [B, F], all when None, computed with every token's keys and
  values. A joint-attention sequence is [text | image]; text tokens are always in focus.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# --- Configuration ---------------------------------------------------------------------------

# The paper's appendix 0.A.1: 34 anchors in six groups.
ANCHORS = (
    "photorealistic", "realistic", "cinematic", "highly detailed", "artistic", "masterpiece",    # style,
    "professional photography", "soft bokeh", "bokeh", "dramatic lighting", "fantasy art",      # rendering
    "studio lighting",                                                                           # quality
    "detailed", "intricate", "sharp focus", "sharp",                                             # detail
    "stunning", "beautiful", "elegant", "vivid", "vibrant",                                      # judgment
    "depth of field", "volumetric lighting", "close up", "portrait", "full body",                # composition
    "main subject", "foreground", "focused",                                                     # emphasis
    "subject", "character", "object", "figure", "person",                                        # fallbacks
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
        builds_mask = self.sparse or self.spatial_cfg
        rules = [
            (0 < self.skip_ratio < 1, f"skip_ratio {self.skip_ratio} must lie strictly between 0 and 1"),
            (not builds_mask or steps >= 2, f"{steps} step leaves no step after the mask step: sample more "
                                            "steps, or turn AccelAes' spatial parts off (--dense)"),
            (not builds_mask or steps < 2 or 0 <= self.mask_step < steps - 1,
             f"mask_step {self.mask_step} must be at least 0 and before the last step ({steps - 1}); lower it "
             "or sample more steps"),
            (self.warmup >= 2, f"warmup {self.warmup} must be at least 2: extrapolation needs two computed steps"),
            (self.interval >= 1, f"interval {self.interval} must be at least 1"),
            (self.top_k >= 1, f"top_k {self.top_k} must be at least 1"),
            (self.token_weighting in TOKEN_WEIGHTINGS,
             f"token_weighting {self.token_weighting!r} must be one of {', '.join(TOKEN_WEIGHTINGS)}"),
            (self.record_every >= 1, f"record_every {self.record_every} must be at least 1"),
            (self.sparse_refresh >= 0, f"sparse_refresh {self.sparse_refresh} must be 0 (never) or more"),
            (self.smooth_sigma >= 0, f"smooth_sigma {self.smooth_sigma} must be 0 (off) or more"),
            (bool(self.anchors), "the anchor list is empty"),
        ]
        problems = [message for ok, message in rules if not ok]
        if problems:
            raise ValueError("; ".join(problems))


TOKEN_WEIGHTINGS = ("aesthetic", "uniform", "non-aesthetic")   # AesMask's (Eq. 5) and Table 8's ablations

# --- AesMask, part 1: the aesthetic weight of each prompt token (paper Eq. 3-5) --------------

# Words that carry no content: they score 0 whatever CLIP says of them.
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to into onto with without for from by as is are was were be been
being am it its this that these those there here his her their our my your he she they we you i me him
them us which who whom whose what where when while than then so very too not no yes also just some any
each every all both either neither over under above below up down out off about near after before
""".split())

Embed = Callable[[list[str]], torch.Tensor]   # phrases -> L2-normalised embeddings [n, D]
KeyWords = list[str | None]   # per text key: its word's text, "" outside any word, None for special / padding


def normal_word(text: str) -> str | None:
    """The word lowercased and stripped of surrounding punctuation, or None if it cannot be
    aesthetic. This normal form is what makes a word the same word in every segment."""
    word = re.sub(r"^\W+|\W+$", "", text.lower())
    if len(word) <= 1 or word in STOP_WORDS or not re.search(r"[^\W\d_]", word):
        return None
    return word


@dataclass
class PromptReport:
    """What AesMask decided for one prompt."""
    mode: str                                   # "aesthetic", "non-aesthetic" or "uniform" (0.E.3's fallback)
    matched: list[tuple[str, str, float]]       # (prompt word, closest anchor, similarity), selected only
    reason: str = ""                            # why uniform weights ran

    def describe(self) -> str:
        words = ", ".join(f"{w} ~ {a} ({s:.2f})" for w, a, s in self.matched)
        return {"aesthetic": f"aesthetic words: {words}",
                "non-aesthetic": f"non-aesthetic weighting (ablation): every prompt token but {words}",
                }.get(self.mode, f"uniform token weights ({self.reason})")


class AestheticScorer:
    """Per-token aesthetic weights w_j of a prompt (paper Eq. 4-5, docs/method.md).

    One decision per prompt: the prompt's words (from every segment of its text sequence, SD3's
    CLIP and T5 alike, in their normal form) are scored once, the top-k words scoring at least
    tau are selected, and every key of a selected word carries its score. Top-k runs over
    words, not tokens, so a word split into pieces is never cut in half, and at most k words
    are selected however many tokenizers the backbone runs."""

    def __init__(self, embed: Embed | None, anchors: tuple[str, ...], threshold: float, top_k: int,
                 weighting: str = "aesthetic"):
        self.embed, self.anchors, self.threshold, self.top_k = embed, anchors, threshold, top_k
        self.weighting = weighting
        self.anchor_vectors = embed(list(anchors)) if embed is not None else None

    def select(self, words: list[str]) -> dict[str, tuple[float, str]]:
        """The aesthetic words, each with (max cosine similarity over the anchors, that anchor):
        the top-k of the distinct words scoring at least tau (ties: the earlier word)."""
        order = list(dict.fromkeys(words))                              # distinct, in prompt order
        if not order:
            return {}
        best, which = (self.embed(order) @ self.anchor_vectors.T).max(dim=1)   # Eq. 4, then Eq. 5's max
        scores = {w: (best[i].item(), self.anchors[which[i]]) for i, w in enumerate(order)}
        eligible = sorted((w for w in order if scores[w][0] >= self.threshold), key=lambda w: -scores[w][0])
        return {w: scores[w] for w in eligible[:self.top_k]}

    def weights(self, keys: KeyWords) -> tuple[torch.Tensor, PromptReport]:
        """w over one prompt's text keys, and the report."""
        real = torch.tensor([k is not None for k in keys], dtype=torch.float32)
        if self.weighting == "uniform":
            return real, PromptReport("uniform", [], "asked for: --token-weighting uniform")
        if self.embed is None:
            return real, PromptReport("uniform", [], "no CLIP text encoder given")
        words = [normal_word(k) if k else None for k in keys]
        chosen = self.select([w for w in words if w is not None])
        if not chosen:
            return real, PromptReport("uniform", [], f"no prompt word reaches similarity {self.threshold}")
        matched = [(w, anchor, score) for w, (score, anchor) in chosen.items()]
        in_chosen = torch.tensor([w in chosen for w in words])
        if self.weighting == "non-aesthetic":
            return real * ~in_chosen, PromptReport("non-aesthetic", matched)
        weights = torch.tensor([chosen[w][0] if w in chosen else 0.0 for w in words])
        return weights, PromptReport("aesthetic", matched)


# --- AesMask, part 2: the attention map (Eq. 6) and the focus set (Eq. 7) --------------------

class CrossAttentionRecorder:
    """A probe for the attention primitive: reduces each recorded layer's image-to-text attention
    to A_l(i) = mean over heads of sum_j w_j alpha_ij / sum_j w_j, and averages over layers (Eq. 6).

    `for_layer(index)` answers for every `every`-th layer index of the model, None for the rest.
    Only prompt b's conditional row `cond_rows[b]` is recorded. Each layer is reduced to an
    N-vector, head by head in chunks, before the next runs: no full map is ever held."""

    def __init__(self, weights: torch.Tensor, cond_rows: list[int], every: int = 1, head_chunk: int = 4):
        self.weights = weights            # [B, L] token weights of the conditional prompts
        self.cond_rows = torch.as_tensor(cond_rows)
        self.every, self.head_chunk = every, head_chunk
        self.layers, self.total = 0, None

    def for_layer(self, index: int) -> "CrossAttentionRecorder | None":
        return self if index % self.every == 0 else None

    def record(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
               bias: torch.Tensor | None = None) -> None:
        if k.shape[2] != self.weights.shape[1]:
            raise ValueError(f"the model showed the probe {k.shape[2]} text keys, but the pipeline's prompt words "
                             f"list {self.weights.shape[1]}: they must name every text key in order")
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
    pad_h, pad_w = min(radius, grid[0] - 1), min(radius, grid[1] - 1)   # reflection needs pad < side
    kernel_2d = torch.outer(kernel[radius - pad_h: radius + pad_h + 1], kernel[radius - pad_w: radius + pad_w + 1])
    image = F.pad(values.float().view(-1, 1, *grid), (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    return F.conv2d(image, kernel_2d[None, None]).view(values.shape)


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


# --- SkipSparse (paper 3.3): run blocks for focus tokens only --------------------------------

def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at token indices [B, K] -> [B, K, D]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class SkipSparse:
    """A block runner (see the module docstring) with two modes.

    dense:  blocks run as usual; each block's increment (gated attention plus gated FFN output)
            is kept for the image tokens: all of them at the mask step, the background after.
            Text tokens are never kept: sparse evaluations always compute them.
    sparse: blocks compute the focus rows only (text rows, then focus image rows), against
            keys/values of all tokens (Eq. 9-10); each background token gets the increment kept
            at the last dense evaluation, so every block's output keeps the dense shape.
    sparse_ffn False is the paper's "spatial only (attn)" ablation: only the attention is sparse,
    the kept increments are the attention's, and the FFN runs for every token.
    """

    def __init__(self, text_tokens: int = 0, image_tokens: int | None = None, sparse_ffn: bool = True):
        self.text_tokens, self.image_tokens, self.sparse_ffn = text_tokens, image_tokens, sparse_ffn
        self.focus: torch.Tensor | None = None        # [R, text_tokens + |F|] rows of the block sequence
        self.background: torch.Tensor | None = None   # [R, N - |F|] rows of the block sequence
        self.increments: dict[int, torch.Tensor] = {}
        self.dense = True

    def set_focus(self, focus: torch.Tensor, background: torch.Tensor) -> None:
        """focus, background: image-token indices [R, |F|], [R, N - |F|] per model batch row. The
        kept increments are cut to the background block by block: never two full copies."""
        L = self.text_tokens
        text = torch.arange(L, device=focus.device).expand(focus.shape[0], -1)
        self.focus, self.background = torch.cat([text, focus + L], dim=1), background + L
        for index in list(self.increments):
            self.increments[index] = _rows(self.increments[index], background)

    def _keep(self, index: int, increment: torch.Tensor) -> None:
        if self.background is None:  # the mask step: check the [text | image] layout, keep all image rows
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
    """Shaped as `like` [B, N, D]; each part (index [B, K], values [B, K, D]) fills its rows."""
    out = torch.empty_like(like)
    for index, values in parts:
        out.scatter_(1, index[:, :, None].expand_as(values), values)
    return out


def spatial_guidance(soft: torch.Tensor, grid: tuple[int, int], latent_size: tuple[int, int],
                     fg: float, bg: float) -> torch.Tensor:
    """Eq. 11: s = s_bg + m (s_fg - s_bg) per latent position [B, 1, H, W], m upsampled from the grid."""
    m = F.interpolate(soft.view(-1, 1, *grid), size=latent_size, mode="nearest")
    return bg + m * (fg - bg)


# --- StepCache (paper 3.4) -------------------------------------------------------------------

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


# --- One generation --------------------------------------------------------------------------

@dataclass
class RunStats:
    dense: int = 0              # model evaluations run dense (the mask step included)
    sparse: int = 0             # model evaluations run on focus tokens
    extrapolated: int = 0       # steps that ran no model evaluation
    mask_seconds: float = 0.0   # building the mask from the recorded attention (recording is part of the
                                # mask step's evaluation)


def _clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
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

    def start(self, *, words: list[KeyWords], grid: tuple[int, int],
              latent_size: tuple[int, int], steps: int, rows, text_tokens: int = 0) -> None:
        """Called by the pipeline once the prompts are tokenised.

        words: per prompt, for each text key the image attends to, in order (SD3: CLIP's keys,
        then T5's), the text of its word ("" outside any word, None for special and padding
        keys: pipelines/words.py). grid: image tokens (rows, cols); latent_size: (H, W) of the latents.
        rows: the model batch's layout (pipelines/sampling.py's BatchRows): rows.prompt_of_row[r]
        is the prompt row r serves, rows.cond_row[b] prompt b's conditional row, rows.guided
        whether CFG runs. text_tokens: text tokens before the image tokens (joint attention).
        """
        config = self.config
        config.check(steps)
        self.stats, self.notes, self.mask = RunStats(), [], None
        self.grid, self.latent_size, self.rows = grid, latent_size, rows
        decided = [self.scorer.weights(keys) for keys in words]
        self.token_weights = torch.stack([w for w, _ in decided])
        self.reports = [report for _, report in decided]
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
        """The model batch's unguided predictions at `step` (cond and uncond rows): computed
        (dense, recorded or sparse) or extrapolated.

        StepCache extrapolates these, never the guided velocity; the caller then applies the
        guidance in force at the step (`guidance`). CFG being linear in (cond, uncond), this equals
        extrapolating the guided velocity under constant guidance, and stays right across the
        uniform-to-spatial switch after the mask step, where extrapolated guided velocities would
        mix the two (step 8 at the defaults: 8.5 on focus tokens, -0.5 on the background). Chosen
        over restarting the history at the switch: no extra evaluation, right for any guidance."""
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
        """The guidance in force at `step`: the spatial map (Eq. 11) after the mask step (whose own
        evaluation builds the mask, so it is guided uniformly), else None: the pipeline's scale."""
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
