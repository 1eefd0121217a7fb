"""The proof of accelaes.py: AesMask, SkipSparse and StepCache, each against numbers worked out
another way. Model parity against diffusers / transformers lives in tests/; the command line
in tests/test_sample.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from accelaes import (ANCHORS, AccelAes, AccelAesConfig, AestheticScorer, CrossAttentionRecorder,
                      SkipSparse, build_focus_mask, computed_steps, extrapolate, spatial_guidance)
from benchmark import sparse_flop_ratio
from pipelines.aesmask_inputs import key_words, word_ids
from models.clip import CLIPTokenizer
from models.gemma import GemmaTokenizer
from models.layers import apply_rope
from models.lumina_next import NextDiT, NextDiTParams
from pipelines.lumina_next import LuminaNextPipeline, LuminaSettings
from pipelines.sampling import BatchRows
from tests.common import randomize_, rel_err
from tests.test_clip import write_vocab_and_merges
from tests.test_gemma import train_tokenizer

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# A small NextDiT and one evaluation's inputs
# ---------------------------------------------------------------------------------------------

def small_nextdit() -> NextDiT:
    return randomize_(NextDiT(NextDiTParams(dim=96, layers=3, heads=4, kv_heads=2, ffn_dim=256, caption_dim=32,
                                            adaln_dim=64, base_tokens=256)), seed=0, std=0.1).eval()


@pytest.fixture(scope="module")
def model() -> NextDiT:
    return small_nextdit()


def evaluation_inputs(batch=2, grid=(8, 12), seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2 * grid[0], 2 * grid[1], generator=generator)
    feats = torch.randn(batch, 10, 32, generator=generator)
    mask = torch.ones(batch, 10, dtype=torch.bool)
    mask[1, 6:] = False
    return x, torch.full((batch,), 0.4), feats, mask


def random_focus(batch, tokens, keep, seed=0):
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])
    return order[:, :keep].sort(dim=1).values, order[:, keep:].sort(dim=1).values


# ---------------------------------------------------------------------------------------------
# SkipSparse
# ---------------------------------------------------------------------------------------------

def test_sparse_with_every_token_in_focus_equals_dense(model):
    x, t, feats, mask = evaluation_inputs()
    runner = SkipSparse()
    with torch.no_grad():
        dense = model(x, t, feats, mask, block_runner=runner)   # dense mode keeps the increments
        assert rel_err(dense, model(x, t, feats, mask)) == 0
        tokens = 8 * 12
        runner.set_focus(torch.arange(tokens).repeat(2, 1), torch.zeros(2, 0, dtype=torch.long))
        runner.dense = False
        sparse = model(2 * x, t, feats, mask, block_runner=runner)
        assert rel_err(sparse, model(2 * x, t, feats, mask)) < TOL


def test_sparse_at_the_cached_inputs_equals_dense(model):
    """Background tokens get exactly the increments cached from the same inputs, focus tokens
    attend to every key: the whole output is the dense one."""
    x, t, feats, mask = evaluation_inputs()
    runner = SkipSparse()
    with torch.no_grad():
        dense = model(x, t, feats, mask, block_runner=runner)
        runner.set_focus(*random_focus(2, 96, 40))
        runner.dense = False
        sparse = model(x, t, feats, mask, block_runner=runner)
        changed = model(x + 0.5, t, feats, mask, block_runner=runner)
    assert rel_err(sparse, dense) < TOL
    assert rel_err(changed, model(x + 0.5, t, feats, mask)) > 1e-3  # only the focus is recomputed


def test_focus_rows_equal_attention_by_hand(model):
    """Focus queries over all keys/values, written out with explicit softmax (paper Eq. 9)."""
    x, t, feats, mask = evaluation_inputs()
    block, p = model.layers[1], model.params
    focus, _ = random_focus(2, 96, 30, seed=3)
    with torch.no_grad():
        step = replace(model.step_inputs(t, feats, mask, (8, 12)), text_kv=block.caption_keys_values(feats))
        tokens = torch.randn(2, 96, p.dim, generator=torch.Generator().manual_seed(5))
        m = block.modulation(step)
        ours = block.attention_increment(tokens, step, focus=focus)

        a = block.attention
        h = block.attention_norm1(tokens) * (1 + m.scale_msa)
        cos, sin = step.rope
        heads = lambda z, n: z.view(2, -1, n, p.head_dim).transpose(1, 2)
        group = p.heads // p.kv_heads
        q_all = apply_rope(heads(a.q_norm(a.wq(h)), p.heads), cos, sin)
        q = torch.stack([q_all[b][:, focus[b]] for b in range(2)])           # the focus rows only
        k = apply_rope(heads(a.k_norm(a.wk(h)), p.kv_heads), cos, sin).repeat_interleave(group, 1)
        v = heads(a.wv(h), p.kv_heads).repeat_interleave(group, 1)
        own = (q @ k.transpose(-1, -2) * step.self_scale).softmax(-1) @ v
        y = block.attention_y_norm(feats)
        ky = heads(a.ky_norm(a.wk_y(y)), p.kv_heads).repeat_interleave(group, 1)
        vy = heads(a.wv_y(y), p.kv_heads).repeat_interleave(group, 1)
        logits = (q @ ky.transpose(-1, -2) / math.sqrt(p.head_dim)).masked_fill(~mask[:, None, None], -math.inf)
        cross = logits.softmax(-1) @ vy
        o = own + torch.tanh(a.gate)[None, :, None, None] * cross
        o = a.wo(o.transpose(1, 2).reshape(2, -1, p.dim))
        expected = torch.tanh(m.gate_msa) * block.attention_norm2(o)
    assert ours.shape == (2, 30, p.dim)
    assert rel_err(ours, expected) < TOL


def test_sparse_evaluation_does_at_most_60_percent_of_the_flops():
    """Real Lumina-Next widths (2304, 32 heads, 8 KV heads), 512x512 = 1024 image tokens, CFG batch,
    on the meta device so only shapes are computed."""
    with torch.device("meta"):
        dit = NextDiT(NextDiTParams(layers=2))
        x, t = torch.randn(2, 4, 64, 64), torch.full((2,), 0.5)
        feats, mask = torch.randn(2, 128, 2048), torch.ones(2, 128, dtype=torch.bool)
        ratio = sparse_flop_ratio(lambda runner: dit(x, t, feats, mask, block_runner=runner), (32, 32), 0.5)
    assert 0.45 < ratio <= 0.60, ratio


def test_joint_attention_sparse_evaluations_do_at_most_75_percent_of_the_flops():
    """SD3-Medium (1536 wide, 333 text tokens) and FLUX (3072 wide, 512 T5 tokens) at 512x512: the
    text tokens stay computed, so a sparse evaluation saves less than on Lumina-Next."""
    from models.flux import Flux, FluxParams, image_ids
    from models.mmdit import MMDiT, MMDiTParams
    with torch.device("meta"):
        sd3 = MMDiT(MMDiTParams(depth=2))
        x, t, context, pooled = torch.randn(2, 16, 64, 64), torch.full((2,), 500.0), torch.randn(2, 333, 4096), \
            torch.randn(2, 2048)
        sd3_ratio = sparse_flop_ratio(lambda runner: sd3(x, t, context, pooled, block_runner=runner), (32, 32),
                                      0.5, text_tokens=333)
        flux = Flux(FluxParams(depth=1, depth_single=2))
        img, txt = torch.randn(1, 1024, 64), torch.randn(1, 512, 4096)
        flux_args = (img, image_ids(32, 32), txt, torch.zeros(512, 3), torch.full((1,), 0.5), torch.randn(1, 768),
                     torch.full((1,), 3.5))
        flux_ratio = sparse_flop_ratio(lambda runner: flux(*flux_args, block_runner=runner), (32, 32), 0.5,
                                       text_tokens=512, batch=1)
    assert 0.55 < sd3_ratio <= 0.75, sd3_ratio
    assert 0.55 < flux_ratio <= 0.75, flux_ratio


# ---------------------------------------------------------------------------------------------
# StepCache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, warmup, interval", [(30, 5, 2), (28, 5, 2), (30, 3, 3), (10, 2, 1), (12, 4, 5)])
def test_schedule_counts(steps, warmup, interval):
    computed = computed_steps(steps, warmup, interval)
    after = range(warmup, steps - 1)
    expected = warmup + len([i for i in after if (i - warmup) % interval == 0]) + 1
    assert sum(computed) == expected and computed[-1] and all(computed[:warmup])
    if (steps, warmup, interval) == (30, 5, 2):
        assert sum(computed) == 18  # method.md section 3


def test_extrapolation_is_exact_for_a_linear_prediction():
    base, slope = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    truth = lambda sigma: base + sigma * slope
    sigmas = torch.tensor([1.0, 0.9, 0.83, 0.7, 0.52, 0.51, 0.3, 0.0])  # uneven spacing
    config = AccelAesConfig(warmup=2, interval=3, sparse=False, spatial_cfg=False)
    accel = AccelAes.create(config)
    accel.start(words=[["a"]], grid=(4, 4), latent_size=(8, 8), steps=7,
                rows=BatchRows.cond_then_uncond(1, guided=False))
    calls = []
    for step in range(7):
        prediction = accel.prediction(step, sigmas, lambda **kw: calls.append(step) or truth(float(sigmas[step])))
        assert rel_err(prediction, truth(float(sigmas[step]))) < 1e-6
    assert calls == [0, 1, 2, 5, 6] and accel.stats.extrapolated == 2
    # The public code's v_a + (v_a - v_b), blind to the spacing, is not exact here.
    history = [(0.9, truth(0.9)), (0.83, truth(0.83))]
    assert rel_err(extrapolate(history, 0.7), truth(0.7)) < 1e-6
    assert rel_err(2 * truth(0.83) - truth(0.9), truth(0.7)) > 1e-3


# ---------------------------------------------------------------------------------------------
# AesMask
# ---------------------------------------------------------------------------------------------

def test_mask_is_exactly_the_top_budget():
    affinity = torch.rand(2, 96, generator=torch.Generator().manual_seed(0))
    affinity[1] = 0.5  # all ties: the budget still holds
    mask = build_focus_mask(affinity, (8, 12), skip_ratio=0.3)
    keep = 96 - round(0.3 * 96)
    assert mask.focus.shape == (2, keep) and mask.background.shape == (2, 96 - keep)
    assert set(mask.focus[0].tolist()) == set(affinity[0].topk(keep).indices.tolist())
    for b in range(2):
        assert sorted(mask.focus[b].tolist() + mask.background[b].tolist()) == list(range(96))
    assert torch.equal(mask.soft.sum(1), torch.full((2,), float(keep)))


def test_smoothing_changes_the_map_not_the_budget():
    affinity = torch.zeros(1, 64)
    affinity[0, 27] = 1.0   # one hot token: smoothing spreads it to its neighbours
    mask = build_focus_mask(affinity, (8, 8), skip_ratio=0.9, smooth_sigma=1.0)
    assert mask.focus.shape == (1, 6)
    assert set(mask.focus[0].tolist()) <= {18, 19, 20, 26, 27, 28, 34, 35, 36}
    assert ((mask.soft > 0.01) & (mask.soft < 0.99)).any()  # soft edges for spatial CFG
    assert mask.soft.sum() == pytest.approx(6, rel=0.05)


def test_recorder_equals_the_weighted_attention_by_hand():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, 20, 16, generator=generator), torch.randn(4, 2, 6, 16, generator=generator)
    key_mask = torch.ones(4, 6, dtype=torch.bool)
    key_mask[1, 4:] = False
    weights = torch.tensor([[0, 0.7, 0.9, 0, 0, 0], [1.0, 1, 1, 1, 0, 0]])
    recorder = CrossAttentionRecorder(weights, cond_rows=[0, 1], head_chunk=3)
    recorder.record(q, k, key_mask, 0.25)
    recorder.record(2 * q, k, key_mask, 0.25)
    expected = []
    for scale_q in (1, 2):
        logits = (scale_q * q[:2]) @ k[:2].repeat_interleave(4, 1).transpose(-1, -2) * 0.25
        probs = logits.masked_fill(~key_mask[:2, None, None], -math.inf).softmax(-1)   # [2, 8, 20, 6]
        expected.append(((probs * weights[:, None, None]).sum(-1) / weights.sum(-1)[:, None, None]).mean(1))
    assert rel_err(recorder.affinity(), (expected[0] + expected[1]) / 2) < 1e-6


def test_word_grouping_on_a_sentencepiece_tokenizer(tmp_path):
    tokenizer = GemmaTokenizer(train_tokenizer(tmp_path))
    prompt = "a beautiful, cinematic dragon over misty mountains"
    pieces = tokenizer.tokenize(prompt)
    ids = word_ids(pieces, "sentencepiece")
    words = {}
    for piece, word in zip(pieces, ids):
        words[word] = words.get(word, "") + piece.replace("▁", " ")
    assert [w.strip() for w in words.values()] == ["a", "beautiful,", "cinematic", "dragon", "over", "misty",
                                                     "mountains"]
    assert word_ids([None, *pieces, None], "sentencepiece")[0] is None


def test_word_grouping_on_the_clip_tokenizer(tmp_path):
    write_vocab_and_merges(tmp_path)
    tokenizer = CLIPTokenizer.from_folder(tmp_path)
    pieces = tokenizer.tokens("an intricately-detailed photorealistic portrait")[1:-1]  # without SOT / EOT
    ids = word_ids(pieces, "bpe")
    assert len(pieces) > 5
    groups = {}
    for piece, word in zip(pieces, ids):
        groups[word] = groups.get(word, "") + piece
    assert list(groups.values())[-2:] == ["photorealistic</w>", "portrait</w>"]
    assert ids == sorted(ids) and ids[0] == 0


def controlled_embedder(similar: dict[str, str]):
    """An embedding where each word in `similar` equals its anchor (similarity 1) and every other
    phrase is orthogonal to every anchor (similarity 0)."""
    anchors = {a: i for i, a in enumerate(ANCHORS)}

    def embed(phrases):
        out = torch.zeros(len(phrases), len(ANCHORS) + 100)
        for i, phrase in enumerate(phrases):
            anchor = phrase if phrase in anchors else similar.get(phrase)
            out[i, anchors[anchor] if anchor else len(ANCHORS) + hash(phrase) % 100] = 1
        return out
    return embed


def test_aesthetic_words_are_selected_and_a_plain_prompt_falls_back():
    scorer = AestheticScorer(controlled_embedder({"gorgeous": "beautiful"}), ANCHORS, threshold=0.6, top_k=8)
    pieces = [None, "a", "▁gorgeous", "▁cat", ",", "▁cinematic", "▁light", None, None]
    weights, report = scorer.weights(key_words(pieces, "sentencepiece"))
    assert weights.tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 0]
    assert report.mode == "aesthetic"
    assert [(w, a) for w, a, _ in report.matched] == [("gorgeous", "beautiful"), ("cinematic", "cinematic")]

    weights, report = scorer.weights(key_words([None, "a", "▁cat", "▁on", "▁a", "▁mat", None], "sentencepiece"))
    assert report.mode == "uniform" and weights.tolist() == [0, 1, 1, 1, 1, 1, 0]

    top_one = AestheticScorer(controlled_embedder({}), ANCHORS, threshold=0.6, top_k=1)
    weights, _ = top_one.weights(key_words(["▁cinematic", "▁portrait"], "sentencepiece"))
    assert weights.sum() == 1


# ---------------------------------------------------------------------------------------------
# Spatial CFG and whole generations
# ---------------------------------------------------------------------------------------------

def test_spatial_guidance_map():
    soft = torch.zeros(1, 6)
    soft[0, [0, 4]] = 1
    scale = spatial_guidance(soft, (2, 3), (4, 6), fg=7.0, bg=1.0)
    assert scale.shape == (1, 1, 4, 6)
    assert scale[0, 0, :2, :2].eq(7).all() and scale[0, 0, 2:, 2:4].eq(7).all() and scale[0, 0, :2, 2:].eq(1).all()


@pytest.fixture(scope="module")
def pipeline() -> LuminaNextPipeline:
    return LuminaNextPipeline.random(seed=0)


def test_spatial_cfg_with_equal_scales_is_plain_cfg(pipeline):
    settings = LuminaSettings(steps=8, guidance=4.0)
    plain, _ = pipeline.generate(["a cat"], height=64, width=64, settings=settings)
    config = AccelAesConfig(mask_step=2, sparse=False, step_cache=False, guidance_fg=4.0, guidance_bg=4.0)
    accel = AccelAes.create(config)
    spatial, _ = pipeline.generate(["a cat"], height=64, width=64, settings=settings, accelerator=accel)
    assert accel.mask is not None and accel.stats.dense == 8
    assert rel_err(spatial, plain) < 1e-6
    accel = AccelAes.create(AccelAesConfig(mask_step=2, sparse=False, step_cache=False))
    different, _ = pipeline.generate(["a cat"], height=64, width=64, settings=settings, accelerator=accel)
    assert rel_err(different, plain) > 1e-3


def test_full_method_counts_and_two_prompts_get_two_masks(pipeline):
    accel = AccelAes.create(AccelAesConfig())
    latents, images = pipeline.generate(["a cat in the snow", "two red boats at sea"], height=128, width=96,
                                        settings=LuminaSettings(steps=30), accelerator=accel)
    assert (accel.stats.dense, accel.stats.sparse, accel.stats.extrapolated) == (6, 12, 12)
    assert accel.mask.focus.shape == (2, 48 - 24)
    assert not torch.equal(accel.mask.focus[0], accel.mask.focus[1])
    assert [r.mode for r in accel.reports] == ["uniform", "uniform"]   # no CLIP given
    assert latents.shape == (2, 4, 16, 12) and torch.isfinite(images).all()


def test_refresh_runs_dense_evaluations(pipeline):
    accel = AccelAes.create(AccelAesConfig(sparse_refresh=3))
    pipeline.generate(["a cat"], height=64, width=64, settings=LuminaSettings(steps=30), accelerator=accel)
    assert (accel.stats.dense, accel.stats.sparse) == (6 + 4, 8)


@pytest.mark.parametrize("changes, message", [
    (dict(skip_ratio=1.0), "skip_ratio 1.0 must lie strictly between 0 and 1"),
    (dict(skip_ratio=0.0), "skip_ratio 0.0 must lie strictly between 0 and 1"),
    (dict(mask_step=29), "mask_step 29 must be at least 0 and before the last step"),
    (dict(warmup=1), "warmup 1 must be at least 2"),
    (dict(interval=0), "interval 0 must be at least 1"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        AccelAesConfig(**changes).check(steps=30)


def test_clip_phrase_embedding_is_the_mean_over_the_phrase_tokens(tmp_path):
    """method.md 1a: final-LN states averaged over the phrase's own tokens, L2-normalised."""
    from pipelines.aesmask_inputs import clip_phrase_embedder
    from models.clip import CLIPParams, CLIPTextModel

    write_vocab_and_merges(tmp_path)
    tokenizer = CLIPTokenizer.from_folder(tmp_path)
    clip = randomize_(CLIPTextModel(CLIPParams(vocab_size=49408, width=64, layers=2, heads=2, mlp_width=128,
                                               max_positions=77, activation="quick_gelu", projection_dim=None,
                                               eos_token_id=49407)), seed=4).eval()
    embed = clip_phrase_embedder(clip, tokenizer)
    vectors = embed(["highly detailed", "a cat"])
    assert vectors.shape == (2, 64) and torch.allclose(vectors.norm(dim=1), torch.ones(2))
    ids = tokenizer(["highly detailed"])
    phrase_tokens = len(tokenizer.tokens("highly detailed")) - 2
    with torch.no_grad():
        states = clip(ids).last_hidden_state[0, 1:1 + phrase_tokens]
    assert rel_err(vectors[0], torch.nn.functional.normalize(states.mean(0), dim=0)) < 1e-6


def test_probe_span_shows_image_queries_against_text_keys():
    """A joint attention over [text, image] records softmax over the text keys alone (method.md 1b)."""
    from models.attention import attention
    generator = torch.Generator().manual_seed(2)
    text, image = 5, 12
    q, k, v = (torch.randn(1, 4, text + image, 8, generator=generator) for _ in range(3))
    joint = CrossAttentionRecorder(torch.ones(1, text), cond_rows=[0])
    out = attention(q, k, v, probe=joint, probe_span=(slice(text, None), slice(0, text)))
    apart = CrossAttentionRecorder(torch.ones(1, text), cond_rows=[0])
    apart.record(q[:, :, text:], k[:, :, :text], None, 8 ** -0.5)
    assert torch.equal(joint.affinity(), apart.affinity()) and joint.affinity().shape == (1, image)
    assert rel_err(out, attention(q, k, v)) == 0
