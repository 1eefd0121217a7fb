"""Where AccelAes' parts meet: the guidance in force at every step (computed or extrapolated),
one AesMask decision per prompt across text segments, the contracts between the method and the
models (rows, layers, the [text | image] layout), and the paper's ablations. The parts alone are
proven in test_accelaes.py, whose small NextDiT these tests share."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from accelaes import (ANCHORS, TOKEN_WEIGHTINGS, AccelAes, AccelAesConfig, AestheticScorer, CrossAttentionRecorder,
                      SkipSparse)
from benchmark import sparse_flop_ratio
from benchmarking.measure import flop_counter
from models.clip import CLIPTokenizer
from models.lumina_next import NextDiT, NextDiTParams
from pipelines.aesmask_inputs import key_words
from pipelines.sampling import BatchRows, classifier_free_guidance
from tests.common import randomize_, rel_err
from tests.test_clip import write_vocab_and_merges
from test_accelaes import TOL, evaluation_inputs, random_focus, small_nextdit


@pytest.fixture(scope="module")
def model() -> NextDiT:
    return small_nextdit()


class StandIn:
    """A model whose conditional and unconditional predictions are given functions of sigma; it
    shows the probe one layer of random attention, so AccelAes can build its mask."""

    def __init__(self, cond, uncond, grid=(4, 4), text=6):
        self.cond, self.uncond, self.grid, self.text = cond, uncond, grid, text

    def evaluate(self, sigma: float, probe=None, block_runner=None) -> torch.Tensor:
        if probe is not None:
            generator = torch.Generator().manual_seed(7)
            tokens = self.grid[0] * self.grid[1]
            q, k = torch.randn(2, 2, tokens, 8, generator=generator), torch.randn(2, 2, self.text, 8, generator=generator)
            probe.for_layer(0).record(q, k, None, 8 ** -0.5)
        return torch.cat([self.cond(sigma), self.uncond(sigma)])


def guided_by_hand(cond, uncond, scale):
    return uncond + scale * (cond - uncond)


def scale_in_force(accel, step, base, fg, bg):
    """What the guidance at `step` must be: the base scale up to and including the mask step (its
    evaluation builds the mask), Eq. 11's map from the focus set after it, written out here."""
    if not accel.config.spatial_cfg or step <= accel.config.mask_step:
        return base
    rows, cols = accel.grid
    in_focus = torch.zeros(rows * cols)
    in_focus[accel.mask.focus[0]] = 1
    m = in_focus.view(rows, cols).repeat_interleave(2, 0).repeat_interleave(2, 1)   # 2x2 latents a token
    return (bg + m * (fg - bg))[None, None]


@pytest.mark.parametrize("steps, warmup, interval, mask_step, spatial", [
    (30, 5, 2, 5, True), (30, 5, 2, 4, True), (30, 5, 2, 6, True), (20, 3, 3, 7, True), (12, 2, 2, 2, True),
    (30, 5, 2, 5, False), (20, 3, 3, 4, False)])
def test_every_step_is_guided_by_the_guidance_in_force(steps, warmup, interval, mask_step, spatial):
    """Fixed cond / uncond predictions: every step's velocity, computed or extrapolated, is the
    guidance in force at that step applied to them (before the fix, extrapolated steps after the
    mask step mixed uniform and spatial guidance: 8.5 / -0.5 at the defaults)."""
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    model = StandIn(lambda s: cond, lambda s: uncond)
    config = AccelAesConfig(warmup=warmup, interval=interval, mask_step=mask_step, spatial_cfg=spatial,
                            sparse=False, guidance_fg=7.0, guidance_bg=1.0)
    accel = AccelAes.create(config)
    accel.start(words=[["a"] * 6], grid=(4, 4), latent_size=(8, 8), steps=steps,
                rows=BatchRows.cond_then_uncond(1, guided=True))
    sigmas = torch.linspace(1, 0, steps + 1)
    for step in range(steps):
        prediction = accel.prediction(step, sigmas, partial(model.evaluate, float(sigmas[step])))
        velocity = classifier_free_guidance(prediction, 4.0 if accel.guidance(step) is None else accel.guidance(step))
        expected = guided_by_hand(cond, uncond, scale_in_force(accel, step, 4.0, 7.0, 1.0))
        assert rel_err(velocity, expected) < 1e-6, step
    assert accel.stats.extrapolated > 0


def test_extrapolation_under_spatial_cfg_is_exact_for_linear_predictions():
    generator = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(4))
    model = StandIn(lambda s: a + s * b, lambda s: c + s * d)
    accel = AccelAes.create(AccelAesConfig(sparse=False))
    accel.start(words=[["a"] * 6], grid=(4, 4), latent_size=(8, 8), steps=30,
                rows=BatchRows.cond_then_uncond(1, guided=True))
    sigmas = torch.linspace(1, 0, 31) ** 1.5    # uneven spacing
    for step in range(30):
        s = float(sigmas[step])
        prediction = accel.prediction(step, sigmas, partial(model.evaluate, s))
        scale = scale_in_force(accel, step, 4.0, 7.0, 1.0)
        velocity = classifier_free_guidance(prediction, 4.0 if accel.guidance(step) is None else accel.guidance(step))
        assert rel_err(velocity, guided_by_hand(a + s * b, c + s * d, scale)) < 1e-5, step
    assert accel.stats.extrapolated == 12


def graded_embedder(scores: dict[str, tuple[str, float]]):
    """Each word in `scores` has the given cosine similarity to its anchor (and less to every
    other); every other phrase is orthogonal to every anchor."""
    index = {a: i for i, a in enumerate(ANCHORS)}
    width = len(ANCHORS) + 100

    def embed(phrases):
        out = torch.zeros(len(phrases), width)
        for i, phrase in enumerate(phrases):
            if phrase in index:
                out[i, index[phrase]] = 1
            elif phrase in scores:
                anchor, s = scores[phrase]
                out[i, index[anchor]], out[i, len(ANCHORS) + i % 100] = s, math.sqrt(1 - s * s)
            else:
                out[i, len(ANCHORS) + i % 100] = 1
        return out
    return embed


def test_one_decision_per_prompt_across_segments():
    """SD3's CLIP and T5 segments split the words differently; the words are chosen once (top-k
    over words), and every piece of a chosen word is weighted in both segments."""
    scores = {"gorgeous": ("beautiful", 0.9), "glowing": ("vivid", 0.7)}
    clip = [None, "a</w>", "gor", "geous</w>", "cinem", "atic</w>", "glo", "wing</w>", "shot</w>", ",</w>", None, None]
    t5 = ["▁a", "▁gorgeous", "▁cine", "matic", "▁glow", "ing", "▁shot", ",", None]
    scorer = AestheticScorer(graded_embedder(scores), ANCHORS, threshold=0.6, top_k=2)
    weights, report = scorer.weights(key_words(clip, "bpe") + key_words(t5, "sentencepiece"))
    expected = [0, 0, 0.9, 0.9, 1, 1, 0, 0, 0, 0, 0, 0] + [0, 0.9, 1, 1, 0, 0, 0, 0, 0]
    assert weights.tolist() == pytest.approx(expected, abs=1e-6)
    assert report.mode == "aesthetic" and [w for w, _, _ in report.matched] == ["cinematic", "gorgeous"]

    # A word only T5 sees (CLIP's 77 tokens ran out) is still one of the prompt's words.
    weights, report = scorer.weights(key_words([None, "a</w>", None], "bpe") + key_words(["▁a", "▁glow", "ing", None], "sentencepiece"))
    assert weights.tolist() == pytest.approx([0, 0, 0, 0, 0.7, 0.7, 0], abs=1e-6) and report.mode == "aesthetic"
    # No word qualifies in any segment: one uniform fallback over every real token of both.
    weights, report = scorer.weights(key_words([None, "cat</w>", None], "bpe") + key_words(["▁cat", None], "sentencepiece"))
    assert report.mode == "uniform" and weights.tolist() == [0, 1, 0, 1, 0]


def test_token_weighting_ablations():
    scores = {"gorgeous": ("beautiful", 0.9)}
    pieces = [None, "▁a", "▁gorgeous", "▁cat", ",", "▁cinematic", "▁light", None]
    weights = {}
    for mode in TOKEN_WEIGHTINGS:
        scorer = AestheticScorer(graded_embedder(scores), ANCHORS, 0.6, 8, weighting=mode)
        weights[mode], report = scorer.weights(key_words(pieces, "sentencepiece"))
        assert report.mode == mode
    assert weights["aesthetic"].tolist() == pytest.approx([0, 0, 0.9, 0, 0, 1, 0, 0], abs=1e-6)
    assert weights["uniform"].tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    assert weights["non-aesthetic"].tolist() == [0, 1, 0, 1, 1, 0, 1, 0]


def test_attention_only_sparse_adds_exactly_the_background_ffn_flops():
    """--no-sparse-ffn: the difference from full SkipSparse is the FFN of every background token
    of every layer, 3 matmuls of dim x ffn_dim each (2 FLOPs a multiply-add)."""
    layers, grid, batch = 2, (32, 32), 2
    with torch.device("meta"):
        dit = NextDiT(NextDiTParams(layers=layers))
        x, t = torch.randn(batch, 4, 64, 64), torch.full((batch,), 0.5)
        feats, mask = torch.randn(batch, 128, 2048), torch.ones(batch, 128, dtype=torch.bool)
        forward = lambda runner: dit(x, t, feats, mask, block_runner=runner)
        full = sparse_flop_ratio(forward, grid, 0.5)
        attention_only = sparse_flop_ratio(forward, grid, 0.5, sparse_ffn=False)
        with flop_counter() as dense:
            forward(None)
    p = dit.params
    background = grid[0] * grid[1] // 2
    ffn = layers * batch * background * 3 * 2 * p.dim * p.ffn_dim
    assert (attention_only - full) * dense.get_total_flops() == pytest.approx(ffn, rel=1e-9)


def test_attention_only_sparse_at_the_cached_inputs_equals_dense(model):
    x, t, feats, mask = evaluation_inputs()
    runner = SkipSparse(sparse_ffn=False)
    with torch.no_grad():
        dense = model(x, t, feats, mask, block_runner=runner)
        assert rel_err(dense, model(x, t, feats, mask)) < TOL
        runner.set_focus(*random_focus(2, 96, 40))
        runner.dense = False
        assert rel_err(model(x, t, feats, mask, block_runner=runner), dense) < TOL
        changed = model(x + 0.5, t, feats, mask, block_runner=runner)
    # The FFN of every token is recomputed, so it differs from both full sparse and dense.
    assert rel_err(changed, model(x + 0.5, t, feats, mask)) > 1e-4


def test_record_every_counts_layers_and_rows_are_explicit(model):
    """record_every 2 records layers 0 and 2 of three; an [uncond, cond] batch records its second half."""
    x, t, feats, mask = evaluation_inputs()
    weights = torch.ones(1, 10)
    cond_first = CrossAttentionRecorder(weights, cond_rows=[0], every=2)
    cond_second = CrossAttentionRecorder(weights, cond_rows=[1], every=2)
    with torch.no_grad():
        model(x, t, feats, mask, probe=cond_first)
        model(x.flip(0), t, feats.flip(0), mask.flip(0), probe=cond_second)
    assert cond_first.layers == cond_second.layers == 2
    assert rel_err(cond_second.affinity(), cond_first.affinity()) < 1e-6
    with pytest.raises(ValueError, match="do not serve prompts 0..1 with conditional rows"):
        BatchRows(prompt_of_row=(0, 1, 0, 1), cond_row=(1, 0))


def test_caption_keys_values_computed_once_give_the_same_prediction(model):
    x, t, feats, mask = evaluation_inputs()
    with torch.no_grad():
        cached = model.caption_keys_values(feats)
        assert torch.equal(model(x, t, feats, mask, caption_kv=cached), model(x, t, feats, mask))


def test_joint_sparse_keeps_only_background_image_rows():
    """Text rows are recomputed in every sparse evaluation, so no increment of theirs is kept."""
    from models.mmdit import MMDiT, MMDiTParams
    sd3 = randomize_(MMDiT(MMDiTParams(hidden=64, depth=2, heads=2, context_dim=32, pooled_dim=16,
                                       pos_embed_max=16)), seed=1).eval()
    x, context, pooled = torch.randn(2, 16, 8, 8), torch.randn(2, 7, 32), torch.randn(2, 16)
    runner = SkipSparse(text_tokens=7, image_tokens=16)
    with torch.no_grad():
        sd3(x, torch.full((2,), 500.0), context, pooled, block_runner=runner)
        assert {tuple(inc.shape) for inc in runner.increments.values()} == {(2, 16, 64)}
        runner.set_focus(*random_focus(2, 16, 6))
    assert {tuple(inc.shape) for inc in runner.increments.values()} == {(2, 10, 64)}
    with pytest.raises(ValueError, match="7 text tokens followed by 20 image tokens"):
        with torch.no_grad():
            sd3(x, torch.full((2,), 500.0), context, pooled, block_runner=SkipSparse(7, 20))


def test_step_cache_that_cannot_skip_says_so():
    accel = AccelAes.create(AccelAesConfig(sparse=False, spatial_cfg=False))
    accel.start(words=[["a"]], grid=(2, 2), latent_size=(4, 4), steps=4,
                rows=BatchRows.cond_then_uncond(1, guided=False))
    assert len(accel.notes) == 1 and "no step to extrapolate" in accel.notes[0]
    accel.start(words=[["a"]], grid=(2, 2), latent_size=(4, 4), steps=28,
                rows=BatchRows.cond_then_uncond(1, guided=False))
    assert accel.notes == []


def test_clip_phrase_embedding_runs_in_fp32(tmp_path):
    from pipelines.aesmask_inputs import clip_phrase_embedder
    from models.clip import CLIPParams, CLIPTextModel

    write_vocab_and_merges(tmp_path)
    tokenizer = CLIPTokenizer.from_folder(tmp_path)
    clip = randomize_(CLIPTextModel(CLIPParams(vocab_size=49408, width=64, layers=2, heads=2, mlp_width=128,
                                               max_positions=77, activation="quick_gelu", projection_dim=None,
                                               eos_token_id=49407)), seed=4).eval().to(torch.bfloat16)
    phrases = ["highly detailed", "a cat"]
    from_bf16 = clip_phrase_embedder(clip, tokenizer)(phrases)
    from_fp32 = clip_phrase_embedder(clip.float(), tokenizer)(phrases)   # the same bf16-rounded weights
    assert from_bf16.dtype == torch.float32 and torch.equal(from_bf16, from_fp32)
    assert next(clip.parameters()).dtype == torch.float32   # .float() above; the embedder copied, not cast
