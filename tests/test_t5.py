"""models/t5.py against transformers: the T5 v1.1 encoder in the layouts it ships in, and the tokenizer.

The encoder is small and random (randomize_ makes the RMS norms non-trivial; the relative
position table is made large so positions matter) and reads 160 tokens, so every bucket is
used: the exact ones, the log-spaced ones and the last one, shared by distances >= 128.
The tokenizer is a SentencePiece unigram model trained here with T5's special ids.
"""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
import sentencepiece
import torch
from transformers import T5Config, T5EncoderModel
from transformers import T5Tokenizer as RefTokenizer
from transformers.models.t5.modeling_t5 import T5Attention as RefAttention

from models.attention import attention
from models.checkpoint import Checkpoint, CheckpointError
from models.keys import describe
from models.sentencepiece_model import read_sentencepiece_model
from models.t5 import T5Encoder, T5Params, T5Tokenizer, load_t5, relative_position_bucket
from tests.common import ProbeRecorder, randomize_, rel_err, save_state

VOCAB = 512
CONFIG = dict(vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=3,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6)
LENGTH = 160  # > max_distance, so the last bucket (distance >= 128) is used too
TOLERANCE = 1e-4
SD3_PREFIX = "text_encoders.t5xxl.transformer."


def reference(seed: int = 0, std: float = 0.2, **overrides) -> T5EncoderModel:
    ref = randomize_(T5EncoderModel(T5Config(**{**CONFIG, **overrides})), seed=seed, std=std).eval()
    with torch.no_grad():  # a strong position signal: far buckets must be right to match
        table = ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)) * 2)
    return ref


@pytest.fixture(scope="module")
def ref() -> T5EncoderModel:
    return reference()


def sample_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of LENGTH ids; the second is padded (id 0, mask 0) after 90 tokens."""
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    ids[1, 90:], mask[1, 90:] = 0, 0
    ids[:, [89, LENGTH - 1]] = 1  # EOS
    return ids, mask


def assert_matches(model, ref) -> None:
    ids, mask = sample_inputs()
    with torch.no_grad():
        errors = {name: rel_err(model(ids, m), ref(ids, attention_mask=m).last_hidden_state)
                  for name, m in [("no mask", None), ("mask", mask)]}
    assert max(errors.values()) < TOLERANCE, errors


def test_attention_bias():
    """The primitive's bias (T5's positions): added to the scaled scores; masked keys get the dtype's
    lowest value, so a row with every key masked averages the values (as transformers' T5), not NaN."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, generator=generator)
    key_mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    scores = (q @ k.transpose(-1, -2) * 0.5 + bias).masked_fill(~key_mask[:, None, None, :], -torch.inf)
    expected = scores.softmax(dim=-1) @ v
    expected[1] = v[1].mean(dim=-2, keepdim=True)  # every key masked: all alike
    assert rel_err(attention(q, k, v, key_mask=key_mask, bias=bias, scale=0.5), expected) < 1e-5
    # An fp32 bias with fp16 queries: fp32's lowest value would be -inf in fp16, and the masked row
    # NaN (or zeros, by kernel). In fp16 the lowest value no longer swamps the scores, so that row is
    # an average weighted by them, as in transformers' fp16 T5.
    half = attention(q.half(), k.half(), v.half(), key_mask=key_mask, bias=bias, scale=0.5)
    assert half.dtype == torch.float16 and torch.isfinite(half).all() and (half[1] != 0).any()
    assert rel_err(half[0].float(), expected[0]) < 1e-2
    probe = ProbeRecorder()
    attention(q, k, v, key_mask=key_mask, bias=bias, scale=0.5, probe=probe)
    (_, _, shown_mask, scale, shown_bias), = probe.calls
    assert scale == 0.5 and shown_bias is bias and shown_mask is key_mask  # as given, the mask not folded in
    with pytest.raises(NotImplementedError):
        attention(q, k, v, bias=bias, causal=True)


def test_relative_position_buckets():
    relative = torch.arange(-400, 401)[None, :]
    for buckets, max_distance in [(32, 128), (32, 64), (16, 100)]:
        theirs = RefAttention._relative_position_bucket(relative, True, buckets, max_distance)
        assert torch.equal(relative_position_bucket(relative, buckets, max_distance), theirs)


# ---------------------------------------------------------------------------------------------
# The encoder in each layout
# ---------------------------------------------------------------------------------------------

def test_sharded_folder(ref, tmp_path):
    """transformers' save_pretrained, sharded like diffusers' text_encoder_2/ (index + shards + config.json)."""
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    keys = Checkpoint(tmp_path).keys()
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    model = load_t5(tmp_path)
    assert model.p == T5Params(vocab_size=VOCAB, width=64, layers=3, heads=4, head_dim=16, mlp_width=128)
    assert_matches(model, ref)


@pytest.mark.parametrize("prefix", [SD3_PREFIX, None])
def test_sd3_single_file(ref, tmp_path, prefix):
    """SD3's single file: the encoder under a prefix, both copies of the tied table, other models beside it."""
    state = {SD3_PREFIX + k: v for k, v in ref.state_dict().items()}
    state[SD3_PREFIX + "encoder.embed_tokens.weight"] = state[SD3_PREFIX + "shared.weight"]
    assert SD3_PREFIX + "shared.weight" in state
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    state["model.diffusion_model.x_embedder.proj.weight"] = torch.ones(4, 16, 2, 2)
    path = save_state(state, tmp_path / "sd3_medium_incl_clips_t5xxl.safetensors")
    assert_matches(load_t5(Checkpoint(path), prefix=prefix), ref)
    assert describe(state) == ("a CLIP text tower (transformers layout) under 'text_encoders.clip_l.transformer.'; "
                               "a T5 encoder under 'text_encoders.t5xxl.transformer.'")


def test_embed_tokens_only(tmp_path):
    """A file holding the token table as encoder.embed_tokens.weight only, and no config.json:
    heads come from the relative table, head_dim from q (here heads*head_dim != width, as in t5-v1_1-small)."""
    ref = reference(seed=2, d_model=48, num_heads=6, d_kv=16, num_layers=2)
    state = dict(ref.state_dict())
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    model = load_t5(save_state(state, tmp_path / "t5.safetensors"))
    assert (model.p.heads, model.p.head_dim, model.p.width) == (6, 16, 48)
    assert_matches(model, ref)


def test_t5_xxl_parameter_count():
    """The released T5-XXL encoder (weights.md's 4.76B), built on the meta device from the defaults."""
    with torch.device("meta"):
        model = T5Encoder(T5Params())
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656


def test_not_a_t5(tmp_path):
    path = save_state({"decoder.conv_in.weight": torch.ones(4, 4, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="no T5 encoder"):
        load_t5(path)


def test_original_t5_refused(tmp_path):
    """The original T5 (one `wi`, ReLU) is not what SD3 and FLUX use: a clear error, not wrong numbers."""
    ref = T5EncoderModel(T5Config(**{**CONFIG, "feed_forward_proj": "relu"}))
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="only T5 v1.1's gated-gelu"):
        load_t5(tmp_path)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_half_precision(tmp_path, dtype, tolerance):
    """bf16 and fp16 against transformers in the same dtype; in fp16 both keep `wo` in fp32.

    Block 0's feed-forward is made to output ~1.3e5, past fp16's 65504, as T5 v1.1 XXL's do:
    with `wo` in fp32 the sum lands in an fp32 residual stream and fp16 stays as accurate as
    transformers' (an fp16 `wo` gives ~30% error here).
    """
    ref32 = reference(seed=3, std=0.05)
    ffn = ref32.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():
        ffn.wi_1.weight.mul_(30)
        ffn.wo.weight.mul_(20000)  # the weights still fit in fp16
    ref32.save_pretrained(tmp_path)
    ref = T5EncoderModel.from_pretrained(tmp_path, dtype=dtype).eval()
    model = load_t5(tmp_path, dtype=dtype)
    wo_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == wo_dtype
    assert all(block.layer[1].DenseReluDense.wo.weight.dtype == wo_dtype for block in model.encoder.block)
    ids, mask = sample_inputs()
    with torch.no_grad():
        ours, theirs = model(ids, mask), ref(ids, attention_mask=mask).last_hidden_state
        exact = ref32(ids, attention_mask=mask).last_hidden_state
    assert ours.dtype == theirs.dtype == dtype
    assert rel_err(ours, theirs) < tolerance
    assert rel_err(ours, exact) < max(2 * rel_err(theirs, exact), tolerance)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def corpus(lines: int = 600) -> list[str]:
    """English-like prompts with pseudo-words, numbers, punctuation and a little unicode."""
    rng = random.Random(0)
    words = ("a the of and with in on at by cat dog house tree sky bird painting photo portrait lighthouse "
             "dusk oil watercolor woman man city night street lamp rain red blue green golden misty ancient "
             "futuristic detailed cinematic lighting 4k 8k highly trending artstation").split()
    syllables = "ka lo mi ne ra to shi pa be du fo gri stel mar on in er ing ly tion pre un re ex al ic ous".split()
    extras = ["café", "naïve", "résumé", "über", "東京", "—", "“quoted”", "(brackets)", "[tag]", "#hash",
              "$100", "50%", "3.14", "e-mail", "don't", "it's"]
    out = []
    for _ in range(lines):
        line = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.6:
                line.append(rng.choice(words))
            elif r < 0.85:
                line.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
            elif r < 0.93:
                line.append(str(rng.randint(0, 3000)))
            else:
                line.append(rng.choice(extras))
        text = " ".join(line) + rng.choice([".", ",", "!", "?", "", ""])
        out.append(text.capitalize() if rng.random() < 0.3 else text)
    return out


LONG = " ".join(f"word{i % 37} lighthouse, {i}" for i in range(150))  # ~600 pieces: truncated at 77 and 256
PROMPTS = [
    "a photo of a cat",
    "A lighthouse at dusk, oil painting",
    "Hello, world! How's it going?",
    "",
    "   ",
    "  leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs\nand\nnewlines",
    "digits 0123456789 and 3.14159, 1,000,000 and 50%",
    "punctuation: ; ! ? ... -- (x) [y] {z} <w> \"q\" 'q' / \\ | @ # $ ^ & * _ + = ~ `",
    "café naïve résumé über — “quoted”",
    "東京 and 北京 at night",
    "emoji 😀🎨 are unknown",
    "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ and ﬁ ligature, Ⅻ ½ ㎏",
    "non\u00a0breaking\u3000spaces and zero\u200bwidth",
    "combining e\u0301 vs é",
    "special tokens </s> inside <pad> and <unk> text",
    "sentinels <extra_id_0> and <extra_id_99>x",
    "</s></s>",
    "CAPITALS and MiXeD CaSe",
    "unseenwordsxyzqj and glorbnak",
    LONG,
    LONG.replace(" ", "  "),
]


def _protobuf_available() -> bool:
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        return False
    return True


def reference_from_spm(folder) -> RefTokenizer:
    """transformers' T5Tokenizer from spiece.model.

    transformers reads the .model with the protobuf package; without it, it silently builds a
    tokenizer with an empty vocabulary. Then the reference is built as transformers' T5
    converter builds it (the .model's pieces and scores, read here by sentencepiece, plus the
    100 sentinels in reverse; its normalizer table, read by models/sentencepiece_model.py), and
    test_spm_normalizer checks that table, in the tokenizer.json saved from it, against
    sentencepiece's own normalization.
    """
    if _protobuf_available():
        return RefTokenizer.from_pretrained(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    charsmap = read_sentencepiece_model(folder / "spiece.model").charsmap
    return RefTokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=100)


def train_tokenizer(folder):
    """A folder holding a SentencePiece unigram spiece.model with T5's special ids."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="unigram", vocab_size=700,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.9995, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """{"spm": folder with spiece.model, "json": folder with tokenizer.json only} and the references."""
    root = tmp_path_factory.mktemp("t5_tokenizer")
    spm_folder, json_folder = train_tokenizer(root / "spm"), root / "json"
    ref = reference_from_spm(spm_folder)
    assert len(ref) == 800 and ref.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [799, 700]
    ref.save_pretrained(json_folder)
    (json_folder / "spiece.model").unlink(missing_ok=True)
    return {"spm": (spm_folder, ref), "json": (json_folder, RefTokenizer.from_pretrained(json_folder))}


@pytest.mark.parametrize("source", ["spm", "json"])
@pytest.mark.parametrize("max_length", [77, 256])
def test_tokenizer_ids(tokenizer_folders, source, max_length):
    folder, ref = tokenizer_folders[source]
    ours = T5Tokenizer(folder)
    assert ours.path.name == ("spiece.model" if source == "spm" else "tokenizer.json")
    ids, mask = ours(PROMPTS, max_length=max_length)
    expected = ref(PROMPTS, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    for i, prompt in enumerate(PROMPTS):
        assert ids[i].tolist() == expected["input_ids"][i].tolist(), prompt
        assert mask[i].tolist() == expected["attention_mask"][i].tolist(), prompt
    assert ids.shape == (len(PROMPTS), max_length) and ids.dtype == mask.dtype == torch.long
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(PROMPTS)), lengths - 1] == 1).all()  # EOS last, truncated rows too
    assert lengths.max() == max_length and (lengths == 1).any()  # LONG is truncated; "" is EOS alone
    assert (ids[0, :1] != 1).all() and 2 in ids  # no BOS; the emoji are <unk>


@pytest.mark.parametrize("source", ["spm", "json"])
def test_tokenizer_pieces(tokenizer_folders, source):
    folder, ref = tokenizer_folders[source]
    ours = T5Tokenizer(folder)
    for prompt in PROMPTS:
        assert ours.tokenize(prompt) == ref.tokenize(prompt), prompt
        # Position i of tokens() is position i of the ids; an unknown character keeps its text.
        _, mask = ours(prompt, max_length=77)
        assert ours.tokens(prompt, max_length=77) == [*ref.tokenize(prompt)[:76], "</s>"], prompt
        assert len(ours.tokens(prompt, max_length=77)) == mask.sum()
    assert ours.tokenize("a lighthouse")[0].startswith("▁")


def test_tokenizer_json_as_released(tokenizer_folders, tmp_path):
    """A tokenizer.json given as a file, its normalizer wrapped in a Sequence as older converters wrote it."""
    folder, ref = tokenizer_folders["json"]
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(folder / "tokenizer_config.json", tmp_path)
    theirs = RefTokenizer.from_pretrained(tmp_path)
    ours = T5Tokenizer(tmp_path / "tokenizer.json")
    ids, mask = ours(PROMPTS, max_length=77)
    expected = theirs(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert torch.equal(ids, ref(PROMPTS, max_length=77, padding="max_length", truncation=True,
                                return_tensors="pt")["input_ids"])


def test_spm_normalizer(tokenizer_folders):
    """From tokenizer.json too, our pieces spell out exactly what sentencepiece's own normalizer
    makes of the text (from spiece.model, sentencepiece itself makes the pieces)."""
    folder, _ = tokenizer_folders["json"]
    ours = T5Tokenizer(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_folders["spm"][0] / "spiece.model"))
    for prompt in PROMPTS:
        if "<" in prompt or not prompt.strip():  # added tokens are ours, not sentencepiece's
            continue
        # <unk> pieces keep the characters they stand for, so the pieces concatenate to the text.
        assert "".join(ours.tokenize(prompt)) == processor.normalize(prompt), prompt


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no tokenizer.json or spiece.model") as error:
        T5Tokenizer(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        T5Tokenizer(tmp_path / "missing" / "spiece.model")
    (tmp_path / "spiece.model").write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece"):
        T5Tokenizer(tmp_path)
    bpe = io.BytesIO()  # another model's tokenizer: sentencepiece's defaults, no <pad> (Gemma's has no </s>)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus(100)), model_writer=bpe, model_type="bpe",
                                             vocab_size=200, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(bpe.getvalue())
    with pytest.raises(CheckpointError, match="has no <pad> piece: it is not T5's tokenizer"):
        T5Tokenizer(tmp_path)
