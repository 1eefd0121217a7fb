"""metrics/ against the references: transformers' CLIP processor and models, torchmetrics, and
hand computations where the reference (OpenAI's and HPS's torchvision transforms) is not installed.

The CLIP models are small and random but keep the real tokenizer (rebuilt from the BPE file in
the open_clip_torch wheel) and the real 224x224 input, so images go through the real
preprocessing. Images are drawn here with Pillow, at sizes whose crops and pads exercise
the rounding of each reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.multimodal import clip_score as reference_clip_score
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig
from transformers import CLIPModel as RefCLIPModel
from transformers import CLIPTokenizer as RefTokenizer

from metrics.aesthetic import load_aesthetic
from metrics.clip_score import clip_score_of_set, load_clip_score
from metrics.fidelity import psnr_of_images, ssim_of_images
from metrics.hps import load_hps
from metrics.pickscore import load_pickscore
from metrics.preprocess import preprocess_clip_openai, preprocess_clip_transformers, preprocess_hps
from metrics.registry import METRICS, load_metric
from metrics.stats import paired_difference, t_quantile
from tests.common import randomize_, rel_err
from tests.test_clip import write_vocab_and_merges
from tests.test_clip_vision import to_openclip_model

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # OpenAI's CLIP normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TOLERANCE = 1e-5


def draw(width: int, height: int, seed: int = 0) -> Image.Image:
    """A gradient with shapes, a line of text and noise: detail at every scale for the resizes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                      127 + 100 * np.sin((x + y) / 7.0)], axis=-1)
    image = Image.fromarray(np.clip(array + rng.normal(0, 12, array.shape), 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(5, width // 2 + 6)), y0 + int(rng.integers(5, height // 2 + 6)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=color)
    pen.text((3, height // 3), "AccelAes 123", fill=(255, 255, 255))
    return image


SIZES = [(97, 133), (133, 97), (640, 480), (300, 200), (224, 500), (1000, 225), (224, 224), (225, 224), (50, 70)]


def by_hand(image: Image.Image) -> torch.Tensor:
    """uint8 -> /255 -> (x - mean) / std, [3, H, W] float32, in numpy."""
    array = (np.asarray(image, dtype=np.float32) / 255 - MEAN) / STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def test_clip_preprocessing_matches_transformers_pil_processor():
    images = [draw(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    expected = CLIPImageProcessorPil()(images=images, return_tensors="pt").pixel_values
    ours = torch.stack([preprocess_clip_transformers(image) for image in images])
    assert ours.shape == expected.shape == (len(SIZES), 3, 224, 224)
    assert (ours - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("size, resized, offset", [
    ((97, 133), (224, 307), (0, 42)),   # margin 83: torchvision rounds 41.5 to 42, transformers takes 41
    ((133, 97), (307, 224), (42, 0)),
    ((640, 480), (298, 224), (37, 0)),  # 224 * 640 / 480 = 298.67, truncated; margin 74
    ((300, 200), (336, 224), (56, 0)),
    ((225, 224), (225, 224), (0, 0)),   # margin 1: round(0.5) is 0 (to even)
])
def test_openai_preprocessing_by_hand(size, resized, offset):
    """OpenAI's transform: PIL bicubic to `resized`, then the 224 crop at `offset` (left, top), computed by hand."""
    image = draw(*size, seed=3)
    left, top = offset
    expected = by_hand(image.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224)))
    assert (preprocess_clip_openai(image) - expected).abs().max().item() < 1e-6
    if size == (97, 133):  # the two references really differ here
        assert (preprocess_clip_transformers(image) - expected).abs().max().item() > 0.1


def hps_by_hand(image: Image.Image, resized: tuple[int, int] | None, top: int, left: int) -> torch.Tensor:
    """HPS: [0, 1] float -> bicubic (antialiased) to `resized` (h, w) -> black padding at (top, left) -> normalise."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()) / 255
    if resized is not None:
        pixels = F.interpolate(pixels[None], size=resized, mode="bicubic", align_corners=False, antialias=True)[0]
    canvas = torch.zeros(3, 224, 224)
    canvas[:, top:top + pixels.shape[1], left:left + pixels.shape[2]] = pixels
    return (canvas - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]


@pytest.mark.parametrize("size, resized, top, left", [
    ((300, 150), (112, 224), 56, 0),
    ((300, 151), (113, 224), 55, 0),    # 151 * 224 / 300 = 112.75 -> 113; pad 111: 55 above, 56 below
    ((151, 300), (224, 113), 0, 55),
    ((100, 50), (112, 224), 56, 0),     # enlarged 2.24x
    ((1000, 225), (50, 224), 87, 0),    # 225 * 0.224 = 50.4 -> 50; pad 174
    ((224, 224), None, 0, 0),           # already 224: neither resized nor padded
    ((224, 100), None, 62, 0),          # the reference leaves this 224x100 (unreadable); padded here
])
def test_hps_preprocessing_by_hand(size, resized, top, left):
    image = draw(*size, seed=4)
    expected = hps_by_hand(image, resized, top, left)
    assert (preprocess_hps(image) - expected).abs().max().item() < 1e-6


def test_transparent_images_are_refused():
    with pytest.raises(ValueError, match="transparency"):
        preprocess_hps(draw(64, 64).convert("RGBA"))


# ---------------------------------------------------------------------------------------------
# Scores of CLIP models, against transformers' CLIPModel
# ---------------------------------------------------------------------------------------------

def clip_config(activation: str, width: int = 64) -> CLIPConfig:
    tower = dict(hidden_size=width, num_attention_heads=width // 64, num_hidden_layers=2,
                 intermediate_size=2 * width, hidden_act=activation)
    return CLIPConfig(text_config=CLIPTextConfig(vocab_size=49408, **tower).to_dict(),
                      vision_config=CLIPVisionConfig(image_size=224, patch_size=32, **tower).to_dict(),
                      projection_dim=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """transformers CLIP folders with tokenizers: OpenAI-like (quick_gelu) and PickScore-like (gelu),
    plus an HPS-like OpenCLIP .pt and a tokenizer folder; the reference models alongside."""
    root = tmp_path_factory.mktemp("metrics")
    # Seed 19 gives the CLIP-score pairs both signs and a negative mean, so torchmetrics' clamp acts.
    refs = {"openai": randomize_(RefCLIPModel(clip_config("quick_gelu")), seed=19).eval(),
            "pick": randomize_(RefCLIPModel(clip_config("gelu")), seed=11).eval(),
            "hps": randomize_(RefCLIPModel(clip_config("gelu", width=128)), seed=12).eval()}
    with torch.no_grad():
        refs["pick"].logit_scale.fill_(4.2)
    for name in ("openai", "pick"):
        refs[name].save_pretrained(root / name)
        write_vocab_and_merges(root / name)
    write_vocab_and_merges(root / "tokenizer")
    torch.save({"state_dict": to_openclip_model(refs["hps"].state_dict())}, root / "HPS_like.pt")
    return root, refs


PROMPTS = ["a photo of a cat", "an astronaut riding a horse, 4k", "", "two dogs in the snow",
           "over-long: " + "red " * 90, "a bowl of fruit on a table"]
IMAGES = [draw(w, h, seed) for seed, (w, h) in enumerate(SIZES[:len(PROMPTS)])]


def reference_features(ref, processor, images, prompts, **text) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' get_image_features / get_text_features, L2-normalised as the metrics do."""
    inputs = processor(text=prompts, images=images, return_tensors="pt", **text)
    with torch.no_grad():
        image = ref.get_image_features(inputs["pixel_values"]).pooler_output
        prompt = ref.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).pooler_output
    return image / image.norm(dim=-1, keepdim=True), prompt / prompt.norm(dim=-1, keepdim=True)


def processor(folder) -> CLIPProcessor:
    return CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=RefTokenizer.from_pretrained(folder))


class FeaturesAsTensors(nn.Module):
    """transformers 5's get_*_features return output objects; torchmetrics 1.9.0 reads tensors."""

    def __init__(self, model: RefCLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_matches_transformers_and_torchmetrics(folders):
    root, refs = folders
    prompts, images = PROMPTS[:4], IMAGES[:4]  # torchmetrics cuts long prompts its own way (see clip_score.py)
    ours = load_clip_score(root / "openai")(images, prompts)
    image, prompt = reference_features(refs["openai"], processor(root / "openai"), images, prompts, padding=True)
    expected = 100 * (image * prompt).sum(-1)
    assert rel_err(ours, expected) < TOLERANCE
    assert (ours > 0).any() and (ours < 0).any()  # both signs: the clamp below is exercised

    def model():  # torchmetrics takes a local model only through a callable
        return FeaturesAsTensors(refs["openai"]), processor(root / "openai")

    as_tensors = [torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images]  # 0-255, as it wants
    for i in range(len(images)):  # per pair torchmetrics clamps at 0
        reference = reference_clip_score(as_tensors[i], prompts[i], model).item()
        assert max(ours[i].item(), 0.0) == pytest.approx(reference, rel=TOLERANCE, abs=1e-6)
    for subset in (range(len(images)), [i for i in range(len(images)) if ours[i] > 0]):  # mean < 0, mean > 0
        subset = list(subset)
        reference = reference_clip_score([as_tensors[i] for i in subset], [prompts[i] for i in subset], model).item()
        assert clip_score_of_set(ours[subset]) == pytest.approx(reference, rel=TOLERANCE, abs=1e-6)
    assert ours.mean() < 0 < reference  # the clamp set the first set's score to 0, not the second's
    assert clip_score_of_set([-3.0, 1.0]) == 0.0  # torchmetrics clamps the mean, not each pair


def test_pickscore_matches_transformers(folders):
    root, refs = folders
    ours = load_pickscore(root / "pick")(IMAGES, PROMPTS)
    image, prompt = reference_features(refs["pick"], processor(root / "pick"), IMAGES, PROMPTS,
                                       padding=True, truncation=True, max_length=77)
    expected = math.exp(4.2) * (image * prompt).sum(-1)
    assert rel_err(ours, expected) < TOLERANCE


def test_hps_matches_transformers_on_hand_preprocessed_pixels(folders):
    root, refs = folders
    ours = load_hps(root / "HPS_like.pt", tokenizer=root / "tokenizer")(IMAGES, PROMPTS)
    resized = {(97, 133): (224, 163), (133, 97): (163, 224), (640, 480): (168, 224), (300, 200): (149, 224),
               (224, 500): (224, 100), (1000, 225): (50, 224)}  # (h, w): the longest side to 224, rounded
    pixels = []
    for image in IMAGES:
        h, w = resized[image.size]
        pixels.append(hps_by_hand(image, (h, w), (224 - h) // 2, (224 - w) // 2))
    # open_clip's tokenize: start, at most 75 tokens, end, then zeros.
    tokens = RefTokenizer.from_pretrained(root / "tokenizer")(PROMPTS, padding="max_length", max_length=77,
                                                              truncation=True, return_tensors="pt")
    ids = tokens.input_ids.masked_fill(tokens.attention_mask == 0, 0)
    with torch.no_grad():
        image = refs["hps"].get_image_features(torch.stack(pixels)).pooler_output
        prompt = refs["hps"].get_text_features(input_ids=ids).pooler_output
    expected = torch.cosine_similarity(image, prompt, dim=-1)
    assert rel_err(ours, expected) < TOLERANCE


def test_hps_needs_a_tokenizer(folders):
    root, _ = folders
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_hps(root / "HPS_like.pt", tokenizer=None)


def aesthetic_head(projection_dim: int, seed: int) -> nn.Sequential:
    """simple_inference.py's MLP, written out: no activations, dropouts between."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(projection_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


def test_aesthetic_matches_a_hand_built_head(folders, tmp_path):
    root, refs = folders
    head = aesthetic_head(32, seed=13)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
    # Sizes whose crop offsets OpenAI and transformers agree on (even margins), so transformers'
    # processor gives the reference pixels.
    images = [draw(w, h, seed) for seed, (w, h) in enumerate([(224, 300), (640, 480), (300, 200), (224, 224)])]
    ours = load_aesthetic(tmp_path / "head.pth", root / "openai")(images)
    pixels = CLIPImageProcessorPil()(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = refs["openai"].get_image_features(pixels).pooler_output.numpy()
        normalized = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)  # the reference's numpy `normalized`
        expected = head(torch.from_numpy(normalized).float())[:, 0]
    assert rel_err(ours, expected) < TOLERANCE


def test_aesthetic_head_file_is_checked(folders, tmp_path):
    root, _ = folders
    torch.save({"layers.0.weight": torch.zeros(4, 32)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the LAION aesthetic predictor"):
        load_aesthetic(tmp_path / "other.pth", root / "openai")


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM, against torchmetrics
# ---------------------------------------------------------------------------------------------

def degraded(image: Image.Image, seed: int) -> Image.Image:
    noisy = np.asarray(image, dtype=np.float64) + np.random.default_rng(seed).normal(0, 8 + 6 * seed, (1,) * 3)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(seed))


def test_psnr_and_ssim_match_torchmetrics():
    references = [draw(96, 72, seed) for seed in range(3)]
    images = [degraded(reference, seed) for seed, reference in enumerate(references)]
    def as_tensor(batch):
        return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float64).transpose(2, 0, 1) / 255) for i in batch])

    preds, target = as_tensor(images), as_tensor(references)
    expected_ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    expected_psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert rel_err(ssim_of_images(images, references), expected_ssim) < TOLERANCE
    assert rel_err(psnr_of_images(images, references), expected_psnr) < TOLERANCE
    assert expected_ssim.min() < 0.95  # the degradations are not negligible
    with pytest.raises(ValueError, match="one shape"):
        psnr_of_images(images[:1], [draw(64, 64)])


# ---------------------------------------------------------------------------------------------
# The paired difference
# ---------------------------------------------------------------------------------------------

def test_t_quantiles():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # Cauchy, closed form
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-9)  # closed form
    for df, printed in [(3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (100, 1.984), (1000, 1.962)]:
        assert t_quantile(0.975, df) == pytest.approx(printed, abs=6e-4)  # t tables, 3 decimals
    assert t_quantile(0.995, 9) == pytest.approx(3.250, abs=6e-4)


def test_paired_difference_by_hand():
    # differences 0.01, 0.01, 0.02, -0.01, 0.02: mean 0.01, sd sqrt(6e-4 / 4) = 0.0122474,
    # half width t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.0054772 = 0.0152073
    result = paired_difference([0.31, 0.28, 0.35, 0.30, 0.29], [0.30, 0.27, 0.33, 0.31, 0.27])
    assert (result.n, result.confidence) == (5, 0.95)
    assert result.mean == pytest.approx(0.01, abs=1e-12)
    assert result.std == pytest.approx(0.0122474, abs=1e-7)
    assert (result.low, result.high) == (pytest.approx(-0.0052073, abs=1e-7), pytest.approx(0.0252073, abs=1e-7))
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])
    with pytest.raises(ValueError, match="pair them"):
        paired_difference([1.0, 2.0], [0.0])


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

def test_registry_loads_and_scores_every_metric(folders, tmp_path):
    root, _ = folders
    torch.save({f"layers.{k}": v for k, v in aesthetic_head(32, seed=14).state_dict().items()}, tmp_path / "head.pth")
    files = {"clip_score": {"weights": root / "openai"},
             "aesthetic": {"head": tmp_path / "head.pth", "clip": root / "openai"},
             "hps_v2.1": {"weights": root / "HPS_like.pt", "tokenizer": root / "tokenizer"},
             "pickscore": {"weights": root / "pick"}, "psnr": {}, "ssim": {}}
    assert set(files) == set(METRICS)
    images = [draw(96, 72, seed) for seed in range(2)]
    references = [degraded(image, 1) for image in images]
    direct = {"clip_score": load_clip_score(root / "openai")(images, PROMPTS[:2]),
              "pickscore": load_pickscore(root / "pick")(images, PROMPTS[:2]),
              "psnr": psnr_of_images(images, references)}
    for name, given in files.items():
        scores = load_metric(name, given)(images, prompts=PROMPTS[:2], references=references)
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
        if name in direct:
            assert torch.equal(scores, direct[name]), name
    with pytest.raises(ValueError, match="needs prompts"):
        load_metric("clip_score", files["clip_score"])(images)
    with pytest.raises(ValueError, match="needs tokenizer"):
        load_metric("hps_v2.1", {"weights": root / "HPS_like.pt"})
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        load_metric("fid", {})
