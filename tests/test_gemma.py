"""Gemma text encoder and tokenizer against transformers' GemmaModel and GemmaTokenizer.

The model is compared on a tiny random Gemma (head_dim * heads != width, multi-query
attention), in its two released layouts, on a right-padded batch. The tokenizer is compared on
a SentencePiece BPE model trained here (byte fallback, Gemma's special ids, a control piece,
user-defined pieces), with the settings Lumina-Next tokenises prompts with.
"""

from __future__ import annotations

import importlib.util
import random
import re

import pytest
import torch

from models.checkpoint import Checkpoint, CheckpointError
from models.gemma import GemmaEncoder, GemmaParams, GemmaTokenizer, load_gemma
from models.keys import describe
from models import sentencepiece_model
from models.sentencepiece_model import read_sentencepiece_model
from tests.common import randomize_, rel_err, save_state

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB = 512
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
              pad_token_id=0, eos_token_id=1, bos_token_id=2)
# Lumina-Next's tokenizer call (diffusers' LuminaPipeline and the original sample.py).
LUMINA = dict(padding=True, pad_to_multiple_of=8, max_length=256, truncation=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random transformers GemmaModel saved as GemmaModel (folder) and as GemmaForCausalLM (`model.` + lm_head)."""
    config = transformers.GemmaConfig(**CONFIG)
    model = randomize_(transformers.GemmaModel(config), seed=1).eval()
    plain = tmp_path_factory.mktemp("gemma_model")
    model.save_pretrained(plain)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight  # saved untied, as some files are
    causal = save_state(state, tmp_path_factory.mktemp("gemma_causal") / "model.safetensors", config.to_dict())
    return model, plain, causal.parent


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + random tokens, right padded with <pad> (0) to lengths 24, 17 and 3."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 24), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_params_from_config(reference):
    _, plain, causal = reference
    for path in (plain, causal):
        model = load_gemma(path)
        assert model.p == GemmaParams(vocab_size=VOCAB, width=64, layers=4, heads=4, kv_heads=1, head_dim=32,
                                      mlp_width=256, eps=1e-6, rope_theta=10000.0)
    assert describe(Checkpoint(causal).keys()) == "a decoder-only language model such as Gemma under 'model.'"


@pytest.mark.parametrize("layout", ["GemmaModel", "GemmaForCausalLM"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hidden_states_match_transformers(reference, layout, implementation):
    model, plain, causal = reference
    ours = load_gemma(plain if layout == "GemmaModel" else causal)
    ids, mask = padded_batch()
    model.config._attn_implementation = implementation
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(theirs) == CONFIG["num_hidden_layers"] + 1
        # -2 is Lumina-Next's feature; the others pin the numbering (0 = embeddings, -1 = normed).
        for layer in (-2, -1, 0, 1, 2, -3):
            feature = ours(ids, mask, layer=layer)
            # Right padding leaves no fully masked row (every row sees BOS), so padded
            # positions are well defined and compared too.
            err = rel_err(feature, theirs[layer])
            print(f"{layout} {implementation} hidden_states[{layer}]: rel err {err:.2e} "
                  f"(non-padded {rel_err(feature[mask.bool()], theirs[layer][mask.bool()]):.2e})")
            assert err < 1e-5


def test_bf16_matches_transformers(reference):
    """Lumina-Next runs Gemma in bf16: the same casts as transformers' bf16 model."""
    _, plain, _ = reference
    theirs_model = transformers.GemmaModel.from_pretrained(plain, dtype=torch.bfloat16).eval()
    ours = load_gemma(plain, dtype=torch.bfloat16)
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        theirs = theirs_model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        feature = ours(ids, mask)
    assert feature.dtype == torch.bfloat16
    err = rel_err(feature, theirs)
    print(f"bf16 hidden_states[-2]: rel err {err:.2e}")
    assert err < 1e-2


def test_layer_out_of_range(reference):
    ours = load_gemma(reference[1])
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="out of range"):
        ours(ids, mask, layer=5)


def test_head_dim_needs_config(reference, tmp_path):
    """Without config.json, head_dim defaults to Gemma-2B's 256, which this model's 128-row q_proj cannot hold."""
    model, _, _ = reference
    path = save_state(model.state_dict(), tmp_path / "gemma.safetensors")  # no config.json beside it
    with pytest.raises(CheckpointError, match="head_dim"):
        load_gemma(path)
    shapes = {"embed_tokens.weight": (256000, 2048), "layers.0.self_attn.q_proj.weight": (2048, 2048),
              "layers.0.self_attn.k_proj.weight": (256, 2048), "layers.0.mlp.gate_proj.weight": (16384, 2048)}
    assert GemmaParams.from_shapes(shapes) == GemmaParams(layers=1)  # Gemma-2B's shape, one layer


def test_gemma_2b_parameter_count():
    with torch.device("meta"):
        encoder = GemmaEncoder(GemmaParams())
    assert sum(p.numel() for p in encoder.parameters()) == 2_506_172_416  # Gemma-2B, embeddings included


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

USER_DEFINED = ["<table>", "  ", "\n"]  # Gemma has user-defined pieces of this kind (tags, space runs)


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = "cat dog woman man child robot dragon castle city forest river mountain ship car bird".split()
    adjectives = "red blue green golden small huge ancient modern beautiful dark bright misty quiet".split()
    places = "under the sky|in a forest|on a table|near the sea|at night|in the rain|on mars|in tokyo".split("|")
    styles = "oil painting|watercolor|digital art|photograph|pencil sketch|3d render|anime style".split("|")
    lines = []
    for _ in range(400):
        words = [rng.choice(["a", "the", "one", "two"]), rng.choice(adjectives), rng.choice(subjects),
                 rng.choice(places) + rng.choice([",", ".", "", ";"]), rng.choice(styles)]
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + f" {rng.randint(0, 2024)}" + rng.choice(["!", "?", "..."])
        lines.append(line)
    lines += ["It's 3:45 pm; the price is $19.99 (50% off) - don't miss it!", "High quality, 4k, detailed."] * 5
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("gemma_tokenizer"))


def train_tokenizer(folder):
    """A SentencePiece BPE model with Gemma's special ids, byte fallback and the default normalizer
    (dummy prefix, whitespace collapsing, NFKC): transformers ignores all three, so must we."""
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"], user_defined_symbols=USER_DEFINED, num_threads=1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def transformers_tokenizer(model_file):
    """transformers' GemmaTokenizer built from a tokenizer.model with Gemma's tokenizer_config settings.

    transformers reads a .model through protobuf, which is not a dependency here; without it,
    the tokenizer is built from the same pieces in the same way (vocab = pieces by id, merges =
    transformers' generate_merges, control and user-defined pieces as added tokens).
    """
    settings = dict(add_bos_token=True, add_eos_token=False, padding_side="right")  # Lumina-Next's
    if importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.protobuf"):
        return transformers.GemmaTokenizer.from_pretrained(model_file.parent, **settings)
    from transformers.tokenization_utils_base import AddedToken, generate_merges

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    added = [AddedToken(piece, normalized=False, special=processor.is_control(i))
             for piece, i in vocab.items() if processor.is_control(i) or piece in USER_DEFINED]
    return transformers.GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab),
                                       additional_special_tokens=added, **settings)


PROMPTS = [
    "a photo of a cat",
    "A Beautiful Golden Dragon Under The Sky, Oil Painting",
    "hello, world! how are you?",
    "it's 3:45 pm; the price is $19.99 (50% off) - don't miss it!",
    "the year 2024 had 365 days and 12 months",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    spaces     between  words",
    "tabs\tand\nnewlines\n\n\nhere",
    "émoji 🙂 and ünïcödé ✨ and zürich",
    "日本語のテキスト, 한국어, русский текст",
    "a <table> of contents",
    "literal <bos> and <eos> and <unk> and <mask> and <pad>",
    "<0x41> only looks like a byte piece",
    "the ▁ marker typed in the prompt",
    "ｆｕｌｌｗｉｄｔｈ letters stay as they are",
    "no\u00a0break space and zero\u200bwidth",
    "a.b,c;d:e!f?g(h)[i]{j}",
    "x",
    " ",
    "",
    "quiet quiet quiet quiet quiet",
    "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq",
    " ".join(corpus(seed=1)[:30]),  # about 300+ tokens: truncated to 256
]


@pytest.fixture(scope="module")
def tokenizers(sp_model):
    return GemmaTokenizer(sp_model), transformers_tokenizer(sp_model)


def test_tokenizer_matches_transformers(tokenizers):
    ours, theirs = tokenizers
    truncated = 0
    for prompt in PROMPTS:
        # Lumina-Next tokenises [prompt, negative prompt ""] in one call.
        expected = theirs([prompt, ""], **LUMINA)
        ids, mask = ours([prompt, ""])
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, expected["input_ids"]), prompt
        assert torch.equal(mask, expected["attention_mask"]), prompt
        assert ours.tokenize(prompt) == theirs.tokenize(prompt), prompt
        truncated += ids.shape[1] == 256
    assert truncated == 1


def test_tokenizer_facts(tokenizers):
    ours, _ = tokenizers
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    ids, mask = ours(["a photo of a cat", ""])
    assert ids.shape[1] % 8 == 0 and ids[0, 0] == ids[1, 0] == 2  # BOS on every row, even the empty prompt
    assert mask[1].tolist() == [1] + [0] * (ids.shape[1] - 1)
    assert ours.eos_id not in ids.tolist()[0]
    pieces = ours.tokenize("a photo  of a cat")
    assert not pieces[0].startswith("▁")  # no dummy prefix, although the .model asks for one
    assert "  " in pieces  # the user-defined run of two spaces, matched in the raw text
    assert ours.tokenize("🙂") == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback
    assert ours.id_to_piece(ours.encode("a cat")) == ours.tokenize("a cat")


def test_fixed_length_like_diffusers_negative_prompt(tokenizers):
    """diffusers tokenises the negative prompt separately with padding="max_length" to the prompt's length."""
    ours, theirs = tokenizers
    for prompt in ["a photo of a cat", PROMPTS[-1], ""]:
        expected = theirs([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        ids, mask = ours([prompt], length=16)
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_tokenizer_json(tokenizers, tmp_path):
    """The optional tokenizer.json path (merges from the file), against transformers loading the same file."""
    _, theirs = tokenizers
    theirs.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    ours = GemmaTokenizer(tmp_path / "tokenizer.json")
    reloaded = transformers.GemmaTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS:
        expected = reloaded([prompt, ""], **LUMINA)
        ids, mask = ours([prompt, ""])
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"]), prompt
        assert ours.tokenize(prompt) == theirs.tokenize(prompt), prompt


def test_missing_or_wrong_tokenizer(tmp_path, sp_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        GemmaTokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="holds no tokenizer.model"):
        GemmaTokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"\xff\xff\xff not a sentencepiece model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        GemmaTokenizer(tmp_path / "junk.model")
    spm.SentencePieceTrainer.train(input=str(sp_model.parent / "corpus.txt"), model_prefix=str(tmp_path / "t5"),
                                   vocab_size=150, model_type="unigram", minloglevel=2)
    with pytest.raises(CheckpointError, match="not BPE"):
        GemmaTokenizer(tmp_path / "t5.model")


def test_why_not_the_library(sp_model, tokenizers, tmp_path):
    """Why GemmaTokenizer runs its own BPE over models/sentencepiece_model.py's reading of the
    .model instead of asking sentencepiece.SentencePieceProcessor for ids: the library's ids
    are not transformers' (the reference Lumina-Next was trained with), for two reasons.
    """
    _, theirs = tokenizers

    def reference(text: str) -> list[int]:
        return theirs(text, add_special_tokens=False)["input_ids"]

    # 1. The library applies the .model's normalizer (here sentencepiece's default: a dummy "▁"
    #    prefix, whitespace collapsing, NFKC), which transformers ignores.
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    for prompt in ["a photo of a cat", "multiple    spaces", "ｆｕｌｌｗｉｄｔｈ"]:
        assert processor.encode(prompt) != reference(prompt) == GemmaTokenizer(sp_model).encode(prompt)

    # 2. With Gemma's own normalizer settings (none of the three), the library's ids are the
    #    reference's only if the user-defined pieces are split off first, as transformers does:
    #    the library cannot say which pieces those are (it has is_control, is_unknown, is_byte,
    #    is_unused, and no is_user_defined), so they come from our reader.
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
        user_defined_symbols=USER_DEFINED, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    model_file = tmp_path / "tokenizer.model"
    theirs, processor = transformers_tokenizer(model_file), spm.SentencePieceProcessor(model_file=str(model_file))
    prompt = "multiple    spaces     between  words"
    known = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
             if processor.is_control(i) or processor.is_unknown(i)]
    ours = read_sentencepiece_model(model_file)
    user_defined = [piece for piece, kind in zip(ours.pieces, ours.types) if kind == sentencepiece_model.USER_DEFINED]
    assert user_defined == USER_DEFINED
    assert _split_encode(processor, prompt, known) != reference(prompt)
    assert _split_encode(processor, prompt, known + user_defined) == reference(prompt)


def _split_encode(processor, text: str, added: list[str]) -> list[int]:
    """The library's ids of the spans between `added` pieces (matched in the raw text, longest first)."""
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))))
    ids, start = [], 0
    for match in pattern.finditer(text):
        ids += processor.encode(text[start:match.start()]) + [processor.piece_to_id(match.group())]
        start = match.end()
    return ids + processor.encode(text[start:])


def test_sentencepiece_reader(sp_model, tmp_path):
    """models/sentencepiece_model.py against sentencepiece itself, on a model with every kind of piece."""
    model = read_sentencepiece_model(sp_model)
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = range(processor.get_piece_size())
    assert model.pieces == [processor.id_to_piece(i) for i in ids]

    def kind(i: int) -> int:  # sentencepiece cannot say "user-defined": those are our USER_DEFINED list
        for test, piece_type in [(processor.is_unknown, sentencepiece_model.UNKNOWN),
                                 (processor.is_control, sentencepiece_model.CONTROL),
                                 (processor.is_byte, sentencepiece_model.BYTE),
                                 (processor.is_unused, sentencepiece_model.UNUSED)]:
            if test(i):
                return piece_type
        user_defined = processor.id_to_piece(i) in USER_DEFINED
        return sentencepiece_model.USER_DEFINED if user_defined else sentencepiece_model.NORMAL

    assert model.types == [kind(i) for i in ids]
    assert len(set(model.types)) == 5  # all but UNUSED
    assert model.model_type == sentencepiece_model.BPE and model.charsmap  # the default normalizer has a table
    # A file cut short, and an empty one.
    (tmp_path / "cut.model").write_bytes(sp_model.read_bytes()[:-1])
    (tmp_path / "empty.model").write_bytes(b"")
    for name in ("cut.model", "empty.model"):
        with pytest.raises(CheckpointError, match="is not a SentencePiece model .*download it again"):
            read_sentencepiece_model(tmp_path / name)


def test_tokenizer_and_encoder_end_to_end(tokenizers, reference):
    """Our tokenizer + encoder against transformers' on real prompts: Lumina-Next's caption features."""
    ours_tok, theirs_tok = tokenizers
    model, plain, _ = reference
    model.config._attn_implementation = "sdpa"
    ours = load_gemma(plain)
    prompts = [PROMPTS[1], ""]
    expected = theirs_tok(prompts, **LUMINA)
    with torch.no_grad():
        theirs = model(**expected, output_hidden_states=True).hidden_states[-2]
        feature = ours(*ours_tok(prompts))
    assert rel_err(feature, theirs) < 1e-5
