"""models/clip.py against transformers: the text tower in every layout it ships in, and the tokenizer.

The towers are small and random (randomize_ makes the LayerNorms non-trivial) but keep the
released shapes' rules: 64-wide heads, quick_gelu at width 768, gelu otherwise. The tokenizer
is the real one, rebuilt from the BPE file in the open_clip_torch wheel.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as RefTextModel
from transformers import CLIPTextModelWithProjection as RefTextModelWithProjection
from transformers import CLIPTokenizer as RefTokenizer

from models.checkpoint import Checkpoint, CheckpointError
from models.clip import CLIPParams, CLIPTokenizer, load_clip
from models.keys import describe
from tests.common import clip_bpe_file, clip_tower, randomize_, rel_err, save_state

VOCAB, BOS, EOS = 1000, 998, 999  # a small vocabulary whose largest id ends the text, as in CLIP's

# OpenAI ViT-L/14's rules (width 768 -> 12 heads, quick_gelu) with a narrow MLP to run fast, and
# bigG/14's (gelu), whose non-square projection catches a transposed text_projection.
TOWERS = {"quick_gelu": clip_tower(768, heads=12, layers=2, mlp=256, activation="quick_gelu", projection=96),
          "gelu": clip_tower(128, heads=2, layers=3, mlp=256, activation="gelu", projection=80)}
TOLERANCE = 1e-5


def ref_config(**tower) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                          pad_token_id=0, **tower)


@pytest.fixture(scope="module")
def references() -> dict[str, RefTextModelWithProjection]:
    return {name: randomize_(RefTextModelWithProjection(ref_config(**tower)), seed=seed).eval()
            for seed, (name, tower) in enumerate(TOWERS.items())}


def sample_ids() -> torch.Tensor:
    """SOT, random tokens, EOT, then padding with 0 (SD3's tokenizer_2) or with EOT (CLIP-L's)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, pad in [(10, 0), (20, EOS), (75, 0), (0, EOS), (40, 0)]:
        row = [BOS, *torch.randint(1, BOS, (length,), generator=generator).tolist(), EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def reference_outputs(ref, ids: torch.Tensor) -> dict[str, object]:
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        pooled = getattr(ref, "text_model", ref)(ids).pooler_output  # the tower without projection
    projected = getattr(out, "text_embeds", None)
    return dict(hidden_states=out.hidden_states, last_hidden_state=out.last_hidden_state, pooled=pooled,
                projected=projected if projected is not None else pooled)


def assert_matches(model, ref, ids: torch.Tensor) -> dict[str, float]:
    expected = reference_outputs(ref, ids)
    with torch.no_grad():
        out = model(ids)
    assert len(out.hidden_states) == len(expected["hidden_states"])
    errors = {f"hidden_states[{i}]": rel_err(ours, theirs)
              for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected["hidden_states"]))}
    errors.update({name: rel_err(getattr(out, name), expected[name])
                   for name in ("last_hidden_state", "pooled", "projected")})
    assert max(errors.values()) < TOLERANCE, errors
    return errors


# ---------------------------------------------------------------------------------------------
# Writing one tower in each layout it is released in
# ---------------------------------------------------------------------------------------------

def openclip_blocks(state: dict[str, torch.Tensor], tower: str, blocks: str) -> dict[str, torch.Tensor]:
    """The encoder layers of a transformers tower (`tower`: "text_model." or "vision_model.") in
    OpenCLIP's names, under `blocks` + "N.": both towers' blocks are named alike."""
    out = {}
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(tower + "encoder.layers."))
    for n in range(layers):
        hf, oc = f"{tower}encoder.layers.{n}.", f"{blocks}{n}."
        for kind in ("weight", "bias"):  # q|k|v fused along the output dimension
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[oc + f"{theirs}.{kind}"] = state[hf + f"{ours}.{kind}"]
    return out


def to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection keys -> OpenCLIP's (SDXL's second text encoder)."""
    out = openclip_blocks(state, "text_model.", "transformer.resblocks.")
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].t()  # OpenCLIP applies x @ P
    out["logit_scale"] = torch.tensor(4.6)  # a full OpenCLIP model's; no parameter reads it
    out["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    return out


def with_prefix(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def write_tower(layout: str, name: str, references, folder) -> tuple[object, str | None]:
    """Save tower `name` in `layout`; returns what load_clip is given and the prefix to pass."""
    ref = references[name]
    state = dict(ref.state_dict())
    other = dict(references["quick_gelu" if name == "gelu" else "gelu"].state_dict())
    if layout == "transformers":
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # stale buffer of older files
        return save_state(state, folder / "model.safetensors"), None
    if layout == "transformers_folder":
        ref.save_pretrained(folder)  # config.json beside model.safetensors
        return folder, None
    if layout == "openclip":
        return save_state(to_openclip(state), folder / "open_clip_model.safetensors"), None
    if layout == "sdxl":  # OpenCLIP layout inside a full SDXL checkpoint, beside the other encoder
        prefix = "conditioner.embedders.1.model."
        full = {**with_prefix(prefix, to_openclip(state)),
                **with_prefix("conditioner.embedders.0.transformer.", other)}
        return save_state(full, folder / "sdxl.safetensors"), prefix
    if layout == "sd3":  # SD3's single file: both CLIPs and T5 under text_encoders.*
        prefix = "text_encoders.clip_g.transformer."
        full = {**with_prefix(prefix, state), **with_prefix("text_encoders.clip_l.transformer.", other),
                "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(8, 4)}
        return save_state(full, folder / "sd3_incl_clips.safetensors"), prefix
    raise AssertionError(layout)


# ---------------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["transformers", "transformers_folder", "openclip", "sdxl", "sd3"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_matches_transformers(name, layout, references, tmp_path):
    source, prefix = write_tower(layout, name, references, tmp_path)
    model = load_clip(source, prefix=prefix)
    tower = TOWERS[name]
    assert model.params.heads == tower["num_attention_heads"]
    assert model.params.activation == tower["hidden_act"]
    assert model.params.projection_dim == tower["projection_dim"]
    assert model.params.eos_token_id == EOS
    errors = assert_matches(model, references[name], sample_ids())
    print(f"{name}/{layout}: max rel err {max(errors.values()):.2e}")


def test_sd3_file_needs_a_prefix_and_one_checkpoint_serves_both(references, tmp_path):
    path, _ = write_tower("sd3", "gelu", references, tmp_path)
    with pytest.raises(CheckpointError, match="several CLIP text models"):
        load_clip(path)
    checkpoint = Checkpoint(path)  # opened once, both towers read from it
    clip_g = load_clip(checkpoint, prefix="text_encoders.clip_g.transformer.")
    clip_l = load_clip(checkpoint, prefix="text_encoders.clip_l.transformer.")
    ids = sample_ids()
    assert_matches(clip_g, references["gelu"], ids)
    assert_matches(clip_l, references["quick_gelu"], ids)


def test_files_are_described(references, tmp_path):
    for layout, expected in [("transformers", "a CLIP text tower (transformers layout)"),
                             ("openclip", "a CLIP text tower (OpenCLIP layout)")]:
        source, _ = write_tower(layout, "gelu", references, tmp_path / layout)
        assert describe(Checkpoint(source).keys()) == expected


def test_tower_without_projection(tmp_path):
    """SD3's CLIP-L: a CLIPTextModel file (transformers 4 keys, `text_model.`) has no text_projection."""
    ref = randomize_(RefTextModel(ref_config(**TOWERS["gelu"])), seed=5).eval()
    path = save_state(with_prefix("text_model.", ref.state_dict()), tmp_path / "model.safetensors")
    model = load_clip(path)
    assert model.text_projection is None and model.params.projection_dim is None
    ids = sample_ids()
    assert_matches(model, ref, ids)
    with torch.no_grad():
        out = model(ids)
    assert out.projected is out.pooled


def test_tower_saved_by_transformers_5_without_text_model_prefix(tmp_path):
    ref = randomize_(RefTextModel(ref_config(**TOWERS["gelu"])), seed=5).eval()
    ref.save_pretrained(tmp_path)
    assert_matches(load_clip(tmp_path), ref, sample_ids())


def test_config_overrides_what_shapes_imply(tmp_path):
    """config.json says 4 heads of 32 and quick_gelu at width 128, against the defaults (2, gelu)."""
    tower = dict(TOWERS["gelu"], num_attention_heads=4, hidden_act="quick_gelu")
    ref = randomize_(RefTextModelWithProjection(ref_config(**tower)), seed=7).eval()
    ref.save_pretrained(tmp_path)
    model = load_clip(tmp_path)
    assert (model.params.heads, model.params.activation) == (4, "quick_gelu")
    assert_matches(model, ref, sample_ids())


def test_params_from_shapes_and_config():
    shapes = {"embeddings.token_embedding.weight": (49408, 1280), "embeddings.position_embedding.weight": (77, 1280),
              "encoder.layers.0.mlp.fc1.weight": (5120, 1280), "encoder.layers.31.mlp.fc1.weight": (5120, 1280),
              "text_projection.weight": (1280, 1280)}
    big_g = CLIPParams.from_shapes(shapes)
    assert big_g == CLIPParams(vocab_size=49408, width=1280, layers=32, heads=20, mlp_width=5120, max_positions=77,
                               activation="gelu", projection_dim=1280, eos_token_id=49407)
    # Old OpenAI configs say eos_token_id 2: pool at the largest id instead, as transformers does.
    text = {"model_type": "clip_text_model", "eos_token_id": 2, "hidden_act": "quick_gelu"}
    assert CLIPParams.from_shapes(shapes, text).eos_token_id == 49407
    # A full CLIPModel config nests the text tower's; a config of another model is not read.
    assert CLIPParams.from_shapes(shapes, {"model_type": "clip", "text_config": text}).activation == "quick_gelu"
    assert CLIPParams.from_shapes(shapes, {"model_type": "t5", "hidden_act": "relu"}).activation == "gelu"
    with pytest.raises(CheckpointError, match="hidden_size=768 but the weights have width 1280"):
        CLIPParams.from_shapes(shapes, {"model_type": "clip_text_model", "hidden_size": 768})
    with pytest.raises(CheckpointError, match="hidden_act"):
        CLIPParams.from_shapes(shapes, {"model_type": "clip_text_model", "hidden_act": "relu"})


def test_bf16_load(references, tmp_path):
    path, _ = write_tower("transformers", "gelu", references, tmp_path)
    model = load_clip(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = sample_ids()
    with torch.no_grad():
        ours = model(ids).projected
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, reference_outputs(references["gelu"], ids)["projected"]) < 5e-2


def test_too_many_tokens(references, tmp_path):
    path, _ = write_tower("transformers", "gelu", references, tmp_path)
    with pytest.raises(ValueError, match="at most 77 tokens"):
        load_clip(path)(torch.zeros(1, 78, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """CLIP's 256 byte symbols in vocabulary order: printable bytes stand for themselves (in byte
    order), then the others (controls, space, ...) get the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_vocab_and_merges(folder) -> None:
    """vocab.json + merges.txt, as in HF CLIP tokenizer folders, from the BPE file of the open_clip wheel."""
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [line.split() for line in lines[1:48895]]  # line 0 is a header
    symbols = byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    write_vocab_and_merges(root / "clip_l")  # pads with <|endoftext|>
    # tokenizer.json only, pad "!" (SD3 / SDXL tokenizer_2), written by transformers itself.
    RefTokenizer.from_pretrained(root / "clip_l", pad_token="!").save_pretrained(root / "clip_g_json")
    assert not (root / "clip_g_json" / "vocab.json").exists()
    # vocab.json + merges.txt whose special_tokens_map.json says pad "!" as a serialised AddedToken.
    write_vocab_and_merges(root / "clip_g_files")
    (root / "clip_g_files" / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    return root


PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "",
    "   ",
    "hello,   world!!  ",
    "hello! world!",
    "it's a dog's life, isn't it? we'll see; they'd've I'M",
    "1234567890 3.14159 1,000,000 mixed123numbers4you",
    "café naïve résumé Ångström straße İstanbul",
    "cafe\u0301 (a combining accent: NFC makes it é)",
    "emoji 🐱🚀 👍🏽 ❤️",
    "日本語のテキスト 中文 한국어 русский текст العربية",
    "tabs\tand\nnewlines\r\n  and\u00a0no-break spaces",
    "<|startoftext|>inside<|endoftext|> text",
    "<|ENDOFTEXT|> typed in capitals",
    "an astronaut riding a horse on the moon, 4k, highly detailed, trending on artstation",
    "#hashtag @mention $100 50% a&b <html> C++ e=mc^2 ~/path/to_file.txt",
    "ﬁ ligature ＦＵＬＬＷＩＴＨ ½ ² Ⅻ",
    "zalgo z̴̛a̵l̶g̸o",
    "— “quotes” ‘single’ … «guillemets»",
    "!!!???...,,,;;;",
    "over-long: " + "word " * 100,
    "a" * 300,
    "many, short; words. " * 30,
]


def reference_ids(ref: RefTokenizer, prompts: list[str]) -> torch.Tensor:
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("folder", ["clip_l", "clip_g_json", "clip_g_files"])
def test_tokenizer_matches_transformers(folder, tokenizer_folders):
    ref = RefTokenizer.from_pretrained(tokenizer_folders / folder)
    ours = CLIPTokenizer.from_folder(tokenizer_folders / folder)
    assert ours.pad_id == ref.pad_token_id == (49407 if folder == "clip_l" else 0)
    expected, ids = reference_ids(ref, PROMPTS), ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    for prompt, row, ref_row in zip(PROMPTS, ids, expected):
        assert row.tolist() == ref_row.tolist(), prompt
    for prompt, ref_row in zip(PROMPTS, expected):  # token strings line up with the ids
        tokens = ours.tokens(prompt)
        assert ref.convert_tokens_to_ids(tokens) == ref_row[: len(tokens)].tolist(), prompt


def test_tokenizer_known_ids_and_tokens(tokenizer_folders):
    clip_l = CLIPTokenizer.from_folder(tokenizer_folders / "clip_l")
    ids = clip_l(["a photo of a cat"])[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {49407}
    assert clip_l.tokens("a photo of a cat") == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>",
                                                 "cat</w>", "<|endoftext|>"]
    assert clip_l.tokens("word " * 100) == ["<|startoftext|>", *["word</w>"] * 75, "<|endoftext|>"]
    clip_g = CLIPTokenizer.from_folder(tokenizer_folders / "clip_g_json")
    assert clip_g("a photo of a cat")[0].tolist() == ids[:7] + [0] * 70


def test_tokenizer_folder_errors(tokenizer_folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"lacks tokenizer.json and vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text((tokenizer_folders / "clip_l" / "vocab.json").read_text())
    with pytest.raises(CheckpointError, match=r"lacks tokenizer.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        CLIPTokenizer.from_folder(tmp_path / "missing")
