"""reward.py, weights/clip_weights.py and weights/clip_tokenizer.py against open_clip and torchvision (independent
references, test-only), on random tiny ViT-H-14-family models saved in the released HPS format (`{'state_dict': ...}`,
fp16, open_clip keys); PickScore and CLIP-H against transformers' own model and processor.

Tolerances, float32:
- image features, text features, HPS scores, SRP rewards: max|ours - ref| / max|ref| <= 1e-5;
- gradient of the score w.r.t. the [0, 1] image: |ours - ref| / |ref| (L2 norms) <= 1e-4;
- "crop" preprocessing vs torchvision's Resize + CenterCrop on tensors: <= 1e-6 absolute;
- "hpsv2" preprocessing vs hpsv2's eval transform rebuilt from torchvision (ToTensor, then the float resize, pad,
  Normalize): <= 1e-6 absolute; the scorer in "hpsv2" mode (and `srpo.py score` on PNG files) against open_clip fed
  by that transform: features and scores 1e-5 (the printed score: 1e-5 absolute), image gradients 1e-4;
- token ids: equal to open_clip's, on every PartiPrompt and the hard cases below.
"""

import argparse
import gzip
import json
import os
import weakref

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transform import image_transform
from PIL import Image
from references import parti_prompts, rel_err
from safetensors.torch import load_file, save_file
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as TF
from transformers import CLIPModel

import cli
import reward
import srpo
from common.util import InputError
from sampling import scoring
from training import image_data
from weights import clip_weights, tensor_files
from weights.clip_tokenizer import OpenClipTokenizer

CONFIGS = {
    "v160x2-t128x1": {"vision_width": 160, "vision_layers": 2, "text_width": 128, "text_layers": 1, "embed_dim": 64},
    "v240x1-t192x2": {"vision_width": 240, "vision_layers": 1, "text_width": 192, "text_layers": 2, "embed_dim": 96},
}
PROMPTS = [
    "A photo of a cat, on a mat!! (4k; ultra-detailed)...",
    "Tom &amp; Jerry &lt;3 &#39;quoted&#39; &quot;double&quot; &amp;amp;amp; triple",
    "Café naïve résumé Zürich Ελληνικά 日本語 😀",
    "don’t “smart quotes” ‘single’ ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ ﬁne ﬂow",
    "  tabs\tand\nnewlines   ",
    "a very long prompt " * 30,  # > 77 tokens: truncated, end token kept
    "a <b>bold</b> &amp;amp; move <|endoftext|> x²³ ½ Ⅻ 1,000,000.5",
]
# What ftfy.fix_text changes, and open_clip's word split (a fuzz found them apart before reward._PIECES)
TRICKY_PROMPTS = [
    "cafÃ© â€œda Vinciâ€\x9d naÃ¯ve Ã\xa0 la mode",  # mojibake: UTF-8 read as Windows-1252, which ftfy repairs
    "Ã©t\u00e9 caf\u00c3\u00a9s &amp;eacute; L&#39;Ã‰cole",  # mojibake beside entities
    "👩‍👩‍👧 👍🏽 🏳️‍🌈 ❤️ 🇯🇵 ✈︎",  # emoji: ZWJ sequences, skin tones, variation selectors, flags
    "\t \u00a0 a\u2003b\u3000c \n\n  d\x0be\x0cf  ",  # whitespace: no-break, em and ideographic spaces
    "supercalifragilistic hyperdimensional " * 40,  # over-long in multi-token words: 75 tokens kept, then the end
    "\ufeffa cat with a\ufeffbom",  # BOM
    "c0\x00con\x01trol\x07s\x7f a\x1cb\x1fc",  # C0 controls (\x1c-\x1f are whitespace to str.split, not to ftfy)
    "\x1b[31mred\x1b[0m ansi \x1b[1;4mescape",  # terminal escapes
    "Ǆ ǅ ǆ Ǳ ǈ ǋ ﬅ ﬆ ŉ Ĳ it'ſ",  # ligatures (ﬅ -> ſt, ŉ -> 'n), and 'ſ, a contraction to open_clip's IGNORECASE
    "c1 \x80 \x85 \x9f \x81 x\u2028y\u2029z a\r\nb\rc",  # C1 controls as Windows-1252, line breaks
    "\u206aa\ufff9b\ufffcc \ud83d\ude00 lone \ud800 surrogate e\u0301",  # format chars, surrogates, NFC
    "&amp;amp;amp;amp; &NTILDE; &EACUTE; &eacute &#x1F600; &#x65;&#x301;",  # ftfy unescapes to a fixed point
    "line &amp;amp;amp;\n<b> then &amp;amp;amp; &#x65;&#x301;",  # ... but not from a line with a '<' on
    "open_clip's special words <END_OF_TEXT> and <start_of_text>, not <|endoftext|>",
]


def grad_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def open_clip_tiny(cfg, seed=0):
    """A random open_clip CLIP of the ViT-H-14 family (exact GELU, head widths 80/64), every weight perturbed so
    that biases and LayerNorms are not at their trivial init."""
    torch.manual_seed(seed)
    model = CLIP(cfg["embed_dim"],
                 CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"], head_width=80, patch_size=14,
                               image_size=224),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=cfg["text_width"],
                             heads=cfg["text_width"] // 64, layers=cfg["text_layers"]),
                 quick_gelu=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def save_hps_format(model, path):
    """The released checkpoints' layout: fp16 open_clip state_dict under 'state_dict' (plus the old attn_mask
    buffer). Returns the fp16 weights."""
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"state_dict": {**state, "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}}, path)
    return state


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """CLIPTokenizer's vocab.json + merges.txt (the layout of FLUX's tokenizer/) built from open_clip's BPE file."""
    folder = tmp_path_factory.mktemp("clip_bpe")
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # open_clip's slice: 48894 merges
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def make_pair(config, folder, bpe_dir):
    """(open_clip reference with the checkpoint's fp16 values in float32, our HPSReward, checkpoint path)."""
    ref = open_clip_tiny(CONFIGS[config])
    path = folder / "HPS_tiny_compressed.pt"
    ref.load_state_dict({k: v.float() for k, v in save_hps_format(ref, path).items()})
    return ref.eval(), reward.HPSReward.load(path, bpe_dir), path


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory, bpe_dir):
    return make_pair(request.param, tmp_path_factory.mktemp("hps"), bpe_dir)


@pytest.fixture(scope="module")
def cli_pair(tmp_path_factory, bpe_dir):
    """One configuration for the command-line tests: each run pays the start of a Python process."""
    return make_pair(next(iter(CONFIGS)), tmp_path_factory.mktemp("cli"), bpe_dir)


def ref_crop(images):
    """SRPO's training transform on tensors, with torchvision."""
    return Compose([Resize(224, InterpolationMode.BICUBIC, antialias=True), CenterCrop(224),
                    Normalize(reward.CLIP_MEAN, reward.CLIP_STD)])(images)


def hpsv2_transform(image):
    """hpsv2's eval transform (its open_clip's image_transform(224, is_train=False, resize_longest_max=True)) with
    torchvision: RGB, ToTensor, then ResizeMaxSize(224) on the float tensor, Normalize. A tensor input (..., 3, H, W)
    in [0, 1] stands for ToTensor's output, so that gradients can flow."""
    x = image if torch.is_tensor(image) else ToTensor()(image.convert("RGB"))
    height, width = x.shape[-2:]
    scale = 224 / float(max(height, width))
    if scale != 1.0:  # as hpsv2: at scale 1 it neither resizes nor pads
        new_size = [round(dim * scale) for dim in (height, width)]
        x = TF.resize(x, new_size, InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = 224 - new_size[0], 224 - new_size[1]
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)(x)


def ref_image_features(ref, images):
    return F.normalize(ref.encode_image(ref_crop(images)), dim=-1)


def ref_text_features(ref, prompts):
    return F.normalize(ref.encode_text(open_clip.tokenize(prompts)), dim=-1)


def random_images(batch, height, width, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Parity with open_clip


def test_features_scores_and_gradients_match_open_clip(pair):
    ref, ours, _ = pair
    prompts = PROMPTS[:3]
    x_ref = random_images(3, 256, 320).requires_grad_()
    x_ours = x_ref.detach().clone().requires_grad_()

    img_ref, txt_ref = ref_image_features(ref, x_ref), ref_text_features(ref, prompts)
    score_ref = (img_ref * txt_ref).sum(-1)
    score_ref.sum().backward()
    score = ours.score(x_ours, prompts, "crop")
    score.sum().backward()

    assert rel_err(ours.image_features(x_ours, "crop"), img_ref) <= 1e-5
    assert rel_err(ours.text_features(prompts), txt_ref) <= 1e-5
    assert rel_err(score, score_ref) <= 1e-5
    assert grad_err(x_ours.grad, x_ref.grad) <= 1e-4
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())  # frozen scorer


def test_text_features_of_all_prompts_match_open_clip(pair):
    ref, ours, _ = pair
    with torch.no_grad():
        assert rel_err(ours.text_features(PROMPTS), ref_text_features(ref, PROMPTS)) <= 1e-5


def test_relative_reward_is_srp_formula(pair):
    ref, ours, _ = pair
    prompts = ["a red fox in the snow", "portrait of an old sailor"]
    x = random_images(2, 240, 240, seed=1)
    k = torch.tensor([0.1, 0.25])
    positive, negative = srpo.control_words(5)
    assert (positive, negative) == ("Detail", "Concept art")
    with torch.no_grad():
        img = ref_image_features(ref, x)
        t_pos = ref_text_features(ref, [f"Detail. {p}" for p in prompts])
        t_neg = ref_text_features(ref, [f"Concept art. {p}" for p in prompts])
        expected = (img * ((1 + k)[:, None] * t_pos - t_neg)).sum(-1)
        captions = [[f"{word}. {p}" for p in prompts] for word in (positive, negative)]
        assert rel_err(ours.relative_reward(x, *captions, k, "crop"), expected) <= 1e-5
        expected_scalar_k = (img * (1.3 * t_pos - t_neg)).sum(-1)
        assert rel_err(ours.relative_reward(x, *captions, 0.3, "crop"), expected_scalar_k) <= 1e-5


@pytest.mark.parametrize("height,width", [(160, 224), (224, 100)])
def test_hpsv2_mode_pads_images_whose_longest_side_is_224(pair, height, width):
    """hpsv2 passes such an image on unpadded (its ViT then fails on the shape); we pad it, as open_clip's own
    resize_mode='longest' transform does: the whole scorer in `hpsv2` mode against open_clip fed by that transform
    (no resampling on either side: pad and normalise only)."""
    ref, ours, _ = pair
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    transform = image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    prompt = ["a cat on a mat"]
    with torch.no_grad():
        img_ref = F.normalize(ref.encode_image(transform(Image.fromarray(pixels))[None]), dim=-1)
        assert rel_err(ours.image_features(x), img_ref) <= 1e-5
        assert rel_err(ours.score(x, prompt), (img_ref * ref_text_features(ref, prompt)).sum(-1)) <= 1e-5


def test_hpsv2_mode_scores_and_gradients_match_open_clip_with_hpsv2_transform(pair):
    """The scorer's default `hpsv2` route where it resamples: features, scores and image gradients against open_clip
    fed by hpsv2's transform (rebuilt from torchvision, differentiable on the float tensor)."""
    ref, ours, _ = pair
    prompts = ["a cat", "a red fox in the snow"]
    x_ref = random_images(2, 180, 300, seed=2).requires_grad_()
    x_ours = x_ref.detach().clone().requires_grad_()
    img_ref = F.normalize(ref.encode_image(hpsv2_transform(x_ref)), dim=-1)
    score_ref = (img_ref * ref_text_features(ref, prompts)).sum(-1)
    score_ref.sum().backward()
    score = ours.score(x_ours, prompts)  # hpsv2: HPSReward's default
    score.sum().backward()
    assert rel_err(ours.image_features(x_ours.detach()), img_ref) <= 1e-5
    assert rel_err(score, score_ref) <= 1e-5
    assert grad_err(x_ours.grad, x_ref.grad) <= 1e-4


def test_vit_h_14_geometry_converts_to_the_reference_config():
    """The real architecture on the meta device: keys, shapes, heads and parameter count of the conversion."""
    with torch.device("meta"):
        ref = CLIP(**open_clip.get_model_config("ViT-H-14"))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = clip_weights._meta_clip(clip_weights.open_clip_to_hf(shapes))
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (1280, 32, 16, 5120, 14, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.max_position_embeddings) == (1024, 24, 16, 4096, 49408, 77)
    assert model.config.projection_dim == 1024 and vision.hidden_act == text.hidden_act == "gelu"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) == 986_109_441


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_token_ids_match_open_clip(bpe_dir):
    tokens = OpenClipTokenizer.from_folder(bpe_dir)(PROMPTS + TRICKY_PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS + TRICKY_PROMPTS))
    assert tokens[5, -1] == 49407 and tokens[0, 0] == 49406 and tokens[0, -1] == 0


def test_token_ids_of_all_parti_prompts_match_open_clip(bpe_dir):
    prompts = parti_prompts()
    assert torch.equal(OpenClipTokenizer.from_folder(bpe_dir)(prompts), open_clip.tokenize(prompts))


def test_text_that_cleans_to_nothing_is_an_empty_prompt(bpe_dir):
    """open_clip tokenizes it to [start, end]; we refuse it."""
    text = "\ufeff &amp;nbsp; \x1b[0m\x00\u3000"
    assert open_clip.tokenize([text])[0, :3].tolist() == [49406, 49407, 0]
    assert "empty prompt" in error_of(OpenClipTokenizer.from_folder(bpe_dir), [text])


def test_flux_layout_and_files(bpe_dir, tmp_path):
    """A FLUX.1 folder (tokenizer/ inside) and explicit vocab/merges files read the same vocabulary."""
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_bytes((bpe_dir / name).read_bytes())
    a = OpenClipTokenizer.from_folder(tmp_path)(PROMPTS[:2])
    b = OpenClipTokenizer.from_files(bpe_dir / "vocab.json", bpe_dir / "merges.txt")(PROMPTS[:2])
    assert torch.equal(a, b)


def test_byte_level_tokenizer_needs_no_files():
    tok = OpenClipTokenizer.byte_level()
    ids = tok(["Ab c"])[0]
    assert tok.vocab_size == 514 and (tok.start_id, tok.end_id) == (512, 513)
    assert ids[:6].tolist() == [512, ord("a"), 256 + ord("b"), 256 + ord("c"), 513, 0]  # byte, +256 at word end


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("height,width", [(300, 200), (200, 300), (97, 513), (224, 224), (1024, 768), (150, 201)])
def test_hpsv2_preprocessing_matches_hpsv2_transform(height, width):
    """8-bit images through hpsv2's transform (float resize, no rounding or clamping in between) and through ours."""
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = hpsv2_transform(Image.fromarray(pixels))
    ours = reward.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 224, "hpsv2")[0]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, 224, 224)
    assert (ours - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("height,width", [(300, 500), (500, 301), (720, 720), (200, 150)])
def test_crop_preprocessing_matches_torchvision(height, width):
    x = random_images(2, height, width)
    assert (reward.preprocess(x, 224, "crop") - ref_crop(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("height,width", [(1, 500), (700, 1), (1, 1)])
def test_hpsv2_keeps_a_pixel_of_images_thinner_than_1_to_448(height, width):
    """round(224 / 500) = 0 would be an empty resize: the thin side keeps one pixel, the rest is padding."""
    x = random_images(1, height, width).requires_grad_()
    pixels = reward.preprocess(x, 224, "hpsv2")
    image = pixels[0] * torch.tensor(reward.CLIP_STD).view(3, 1, 1) + torch.tensor(reward.CLIP_MEAN).view(3, 1, 1)
    rows, cols = (image.abs().amax(0) > 1e-6).nonzero().unbind(1)
    kept = [max(1, round(side * 224 / max(height, width))) for side in (height, width)]
    assert pixels.shape == (1, 3, 224, 224) and [rows.unique().numel(), cols.unique().numel()] == kept
    reward.HPSReward.tiny().score(x, "a cat").sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def files_in_each_mode(folder):
    """Real 6x5 files in the modes Pillow opens (RGB, RGBA, LA, L, 1, 16-bit I;16, 32-bit I, CMYK, a palette with
    a transparency byte per entry, and one stored sideways with EXIF orientation 6): their paths."""
    rng = np.random.default_rng(2)
    rgb, alpha = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), rng.integers(0, 256, (5, 6), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (5, 6))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [("rgb.png", Image.fromarray(rgb), {}), ("rgba.png", Image.fromarray(np.dstack([rgb, alpha])), {}),
             ("la.png", Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), {}),
             ("l.png", Image.fromarray(rgb[..., 0]), {}), ("1.png", Image.fromarray(rgb[..., 0]).convert("1"), {}),
             ("g16.png", Image.fromarray(sixteen.astype(np.uint16)), {}),
             ("i32.tif", Image.fromarray(sixteen.astype(np.int32)), {}),
             ("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), {}),
             ("p.png", Image.fromarray(rgb).quantize(8), {"transparency": bytes(range(0, 256, 32))}),
             ("sideways.png", Image.fromarray(rgb), {"exif": exif})]
    for name, image, options in files:
        image.save(folder / name, **options)
    return [folder / name for name, _, _ in files]


def test_score_reads_images_as_training_does(tmp_path):
    """One reader: `score` sees every file as `train --images` does (transparency on white, 16-bit scaled, upright);
    a 16-bit greyscale PNG as round(v / 257), not Pillow's clip to white."""
    for path in files_in_each_mode(tmp_path):
        with open(path, "rb") as f:
            trained = np.asarray(image_data.load_image(f.read(), str(path), 1, 1))
        assert torch.equal(reward.load_image(path), torch.from_numpy(trained.copy()).permute(2, 0, 1) / 255), path
    v16 = np.asarray(Image.open(tmp_path / "g16.png")).astype(np.float64)
    assert torch.equal(reward.load_image(tmp_path / "g16.png")[0] * 255, torch.from_numpy(np.rint(v16 / 257)).float())
    assert reward.load_image(tmp_path / "sideways.png").shape == (3, 6, 5)
    Image.fromarray(np.zeros((5, 6), np.float32)).save(tmp_path / "f.tif")  # no fixed scale: refused by both
    assert error_of(reward.load_image, tmp_path / "f.tif") == (f"{tmp_path / 'f.tif'}: 32-bit float pixels (mode F): "
                                                               f"save it as an 8- or 16-bit image")


def test_score_refuses_an_image_too_large_in_one_line(tmp_path, monkeypatch, capsys):
    """Over twice Pillow's Image.MAX_IMAGE_PIXELS (lowered here to keep the file small): exit 2 and one line with
    the pixel count and the limit, before the scorer loads (was Pillow's DecompressionBombError, a traceback)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (50, 45)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--prompt", "a cat", str(tmp_path / "big.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'big.png'}: too large to read: 2,250 pixels, over the limit of 2,000 (twice Pillow's "
        f"Image.MAX_IMAGE_PIXELS, its guard against decompression bombs): make it smaller"]


# ----------------------------------------------------------------------------------------------------------------------
# Loading, conversion, tiny scorer, cache


def same_weights(a, b):
    """Equal keys and tensors (scores of one scorer can differ in the last bit with the batch a caption was cached
    in, so the weights are compared)."""
    a, b = a.clip.state_dict(), b.clip.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_conversion_gives_the_same_scorer(pair, tmp_path):
    _, ours, path = pair
    converted = tmp_path / "hps.safetensors"
    clip_weights.convert_checkpoint(path, converted)
    assert same_weights(reward.HPSReward.load(converted, ours.tokenizer), ours)
    x = random_images(1, 224, 224)
    half = reward.HPSReward.load(converted, ours.tokenizer, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.score(x, "a cat").dtype == torch.float32


def test_open_clip_keys_in_a_safetensors_file_give_the_same_scorer(pair, tmp_path):
    """open_clip naming in a .safetensors file: q, k, v read as row slices of the fused in_proj, projections
    transposed."""
    _, ours, path = pair
    state = torch.load(path, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "open_clip.safetensors")
    assert same_weights(reward.HPSReward.load(tmp_path / "open_clip.safetensors", ours.tokenizer), ours)


def test_safetensors_weights_are_read_one_tensor_at_a_time(pair, tmp_path, monkeypatch):
    """fp16 file, fp32 model: each tensor comes through tensor_files.open_safetensors' lazy handle and is gone (cast,
    freed) before the next is read, so memory never holds the file's weights next to the model's."""
    _, _, path = pair
    converted = tmp_path / "hps.safetensors"
    clip_weights.convert_checkpoint(path, converted)
    open_safetensors, alive, reads = tensor_files.open_safetensors, [], []

    class Handle:
        def __init__(self, path):
            self.handle = open_safetensors(path)

        def __getattr__(self, name):  # keys(), get_slice() for the shapes
            return getattr(self.handle, name)

        def get_tensor(self, key):
            assert all(ref() is None for ref in alive), f"a tensor read before {key} is still alive"
            tensor = self.handle.get_tensor(key)
            alive.append(weakref.ref(tensor))
            reads.append(key)
            return tensor

    monkeypatch.setattr(clip_weights, "open_safetensors", Handle)
    clip = clip_weights.load_clip(converted, dtype=torch.float32)
    assert sorted(reads) == sorted(load_file(converted)) == sorted(clip.state_dict())
    assert all(t.dtype == torch.float32 for t in clip.state_dict().values() if t.is_floating_point())


def test_conversion_writes_atomically(pair, tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file whole and no temporary file."""
    _, _, path = pair
    dst = tmp_path / "hps.safetensors"
    dst.write_bytes(b"previous")

    def fail_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(clip_weights, "save_file", fail_half_way)
    assert "No space left on device" in error_of(clip_weights.convert_checkpoint, path, dst)
    assert dst.read_bytes() == b"previous" and os.listdir(tmp_path) == ["hps.safetensors"]
    monkeypatch.undo()
    clip_weights.convert_checkpoint(path, dst)
    assert os.listdir(tmp_path) == ["hps.safetensors"] and len(load_file(dst)) > 0


def test_tiny_scorer_builds_from_nothing_and_caches_text():
    scorer = reward.HPSReward.tiny()
    x = random_images(2, 64, 96).requires_grad_()
    calls, tokenize = [], scorer.text_inputs
    scorer.text_inputs = lambda prompts: calls.append(list(prompts)) or tokenize(prompts)
    pos, neg = srpo.control_words(0)
    captions = [[f"{word}. {p}" for p in ("a cat", "a dog")] for word in (pos, neg)]
    r = scorer.relative_reward(x, *captions, 0.1)
    r.sum().backward()
    scorer.relative_reward(x.detach(), *captions, 0.2)
    assert x.grad.abs().sum() > 0 and len(calls) == 2  # second call served from the cache
    scorer.cache_size = 1
    scorer.text_features(["x", "y", "z"])
    assert list(scorer._text_cache) == ["z"]


def test_pickscore_is_logit_scaled_clip(bpe_dir, tmp_path):
    """PickScore (HF CLIP format) against transformers' own CLIPModel forward: logits_per_image on the diagonal."""
    torch.manual_seed(0)
    clip = CLIPModel(clip_weights.clip_config(**CONFIGS["v160x2-t128x1"]))
    clip.save_pretrained(tmp_path)
    scorer = reward.PickScoreReward.load(tmp_path, bpe_dir)
    x, prompts = random_images(2, 240, 300), ["a cat", "a dog on a skateboard"]
    with torch.no_grad():
        logits = clip.eval()(input_ids=open_clip.tokenize(prompts), pixel_values=ref_crop(x)).logits_per_image
        assert rel_err(scorer.score(x, prompts), logits.diagonal()) <= 1e-5


def test_bad_pickscore_folders_are_one_line_errors(bpe_dir, tmp_path):
    torch.manual_seed(0)
    CLIPModel(clip_weights.clip_config(**CONFIGS["v160x2-t128x1"])).save_pretrained(tmp_path / "good")
    weights = load_file(tmp_path / "good" / "model.safetensors")
    cases = {"bad-json": ("not valid JSON", "{not json", weights), "list-json": ("expected a JSON object", "[]", None),
             "bert": ("model_type 'bert'", json.dumps({"model_type": "bert"}), weights),
             "no-weights": ("no weights", None, None),
             "missing-key": ("missing key 'text_projection.weight'", None,
                             {k: v for k, v in weights.items() if k != "text_projection.weight"}),
             "wrong-shape": ("key 'text_projection.weight' (64, 100) does not fit", None,
                             weights | {"text_projection.weight": torch.zeros(64, 100)}),
             "garbage": ("cannot load the CLIP model", None, "garbage")}
    for name, (words, config, files) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config or (tmp_path / "good" / "config.json").read_text())
        if isinstance(files, dict):
            save_file(files, folder / "model.safetensors", metadata={"format": "pt"})
        elif files:
            (folder / "model.safetensors").write_text(files)
        assert words in error_of(reward.PickScoreReward.load, folder, bpe_dir), name
    assert "no such folder" in error_of(reward.PickScoreReward.load, tmp_path / "nope", bpe_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def error_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_checkpoint_of_another_architecture_names_the_key(tmp_path):
    vit_b = CLIP(64, CLIPVisionCfg(layers=1, width=192, head_width=64, patch_size=32, image_size=224),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=1))
    torch.save({"state_dict": vit_b.state_dict()}, tmp_path / "vit_b.pt")
    message = error_of(clip_weights.load_clip, tmp_path / "vit_b.pt")
    assert "'visual.conv1.weight' (192, 3, 32, 32)" in message and "head width 80" in message

    torch.save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(9, 3)}, tmp_path / "flux.pt")
    assert "unexpected key 'double_blocks.0.img_attn.qkv.weight' (9, 3)" in error_of(clip_weights.load_clip,
                                                                                      tmp_path / "flux.pt")
    tampered = open_clip_tiny(CONFIGS["v160x2-t128x1"]).state_dict()
    tampered["text_projection"] = torch.zeros(128, 32)
    torch.save(tampered, tmp_path / "tampered.pt")
    message = error_of(clip_weights.load_clip, tmp_path / "tampered.pt")
    assert "key 'text_projection' (128, 32) does not fit" in message and "needs (64, 128)" in message


def test_unreadable_inputs_are_one_line_errors(tmp_path, bpe_dir):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "pickled.pt")
    assert "weights_only=True) refused" in error_of(clip_weights.load_clip, tmp_path / "pickled.pt")
    assert "checkpoint not found" in error_of(clip_weights.load_clip, tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "not a torch checkpoint" in error_of(clip_weights.load_clip, tmp_path / "garbage.pt")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    garbage = tmp_path / "garbage.png"
    assert error_of(reward.load_image, garbage) == f"{garbage}: not a readable image (no format Pillow knows: " \
                                                   f"damaged, or not an image)"
    assert "tokenizer folder not found" in error_of(OpenClipTokenizer.from_folder, tmp_path / "nope")
    scorer = reward.HPSReward.tiny()
    assert "empty prompt" in error_of(scorer.score, random_images(1, 32, 32), "  ")
    assert "empty prompt" in error_of(scorer.text_features, [""])
    assert "2 prompts for 1 images" in error_of(scorer.score, random_images(1, 32, 32), ["a", "b"])
    assert "(B, 3, H, W)" in error_of(scorer.score, torch.rand(1, 4, 32, 32), "a")
    assert "unknown preprocessing" in error_of(scorer.score, random_images(1, 32, 32), "a", "squash")
    real_vocab = OpenClipTokenizer.from_folder(bpe_dir)
    assert "does not fit the model" in error_of(reward.HPSReward, scorer.clip, real_vocab)

    torch.save({"state_dict": [torch.zeros(1)]}, tmp_path / "list.pt")
    assert "expected a state_dict of tensors" in error_of(clip_weights.load_clip, tmp_path / "list.pt")
    assert "is a folder, not an image" in error_of(reward.load_image, tmp_path)
    assert "is a folder, not a checkpoint" in error_of(clip_weights.load_clip, tmp_path)


@pytest.mark.parametrize("case", ["merges-latin1", "vocab-list", "vocab-string-ids", "vocab-bad-json"])
def test_bad_tokenizer_files_name_the_file(case, bpe_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    bad, content = {"merges-latin1": ("merges.txt", "#version: 0.2\nc af\u00e9\n".encode("latin-1")),
                    "vocab-list": ("vocab.json", b'["a", "b"]'), "vocab-string-ids": ("vocab.json", b'{"a": "1"}'),
                    "vocab-bad-json": ("vocab.json", b'{"a": 1')}[case]
    (tmp_path / bad).write_bytes(content)
    assert bad in error_of(OpenClipTokenizer.from_folder, tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: python srpo.py score


def run_score(capsys, *args):
    """`python srpo.py score ARGS` in this process (no interpreter start): its stdout lines."""
    cli.main(["score", *map(str, args)])
    return capsys.readouterr().out.splitlines()


def score_error(capsys, *args):
    """The one stderr line of a `score` run that must exit 2 with nothing on stdout."""
    with pytest.raises(SystemExit) as info:
        cli.main(["score", *map(str, args)])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert info.value.code == 2 and out.out == "" and len(err) == 1 and err[0].startswith("error: "), out.err
    return err[0]


def test_cli_scores_images(cli_pair, bpe_dir, tmp_path, capsys):
    _, ours, path = cli_pair
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "b.png")  # converted to RGB: same score
    converted = tmp_path / "hps.safetensors"
    lines = run_score(capsys, "--hps", path, "--tokenizer", bpe_dir, "--prompt", "a cat", "--save-safetensors",
                      converted, tmp_path / "a.png", tmp_path / "b.png")
    expected = ours.score(reward.load_image(tmp_path / "a.png")[None], "a cat").item()
    assert lines[0] == str(converted) and len(lines) == 3
    for line, image in zip(lines[1:], ("a.png", "b.png"), strict=True):
        value, name = line.split("\t")
        assert len(value.split(".")[1]) >= 6 and name.endswith(image) and abs(float(value) - expected) < 1e-6

    lines = run_score(capsys, "--hps", converted, "--tokenizer", bpe_dir, "--prompt", "a cat", "--relative", "Real",
                      "Oil", "--k", "0.2", tmp_path / "a.png")
    image = reward.load_image(tmp_path / "a.png")[None]
    expected = ours.relative_reward(image, "Real. a cat", "Oil. a cat", 0.2).item()
    assert abs(float(lines[0].split()[0]) - expected) < 1e-6


def test_cli_score_matches_open_clip_with_hpsv2_transform(cli_pair, bpe_dir, tmp_path, capsys):
    """`srpo.py score` (default hpsv2 mode) on PNG files that need resampling, against open_clip's model fed by
    hpsv2's transform of the same files."""
    ref, _, path = cli_pair
    rng = np.random.default_rng(3)
    files = [tmp_path / "wide.png", tmp_path / "thin.png"]
    for file, (height, width) in zip(files, [(200, 300), (513, 97)], strict=True):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(file)
    lines = run_score(capsys, "--hps", path, "--tokenizer", bpe_dir, "--prompt", "a cat", *files)
    with torch.no_grad():
        images = torch.stack([hpsv2_transform(Image.open(file)) for file in files])
        expected = (F.normalize(ref.encode_image(images), dim=-1) * ref_text_features(ref, ["a cat"])).sum(-1)
    printed = torch.tensor([float(line.split("\t")[0]) for line in lines])
    assert (printed - expected).abs().max() <= 1e-5


def test_cli_scores_a_sample_folder_by_its_manifest(cli_pair, bpe_dir, tmp_path, capsys):
    """--manifest (images.jsonl of `sample --prompts`): each image against its own prompt, then the mean."""
    _, ours, path = cli_pair
    rng = np.random.default_rng(2)
    rows = [("00000.png", "a cat"), ("00001-0.png", "a dog on a beach"), ("00001-1.png", "a dog on a beach")]
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("".join(json.dumps({"image": name, "prompt": prompt, "seed": 0}) + "\n"
                                for name, prompt in rows))
    lines = run_score(capsys, "--hps", path, "--tokenizer", bpe_dir, "--manifest", manifest)
    expected = [ours.score(reward.load_image(tmp_path / name)[None], prompt).item() for name, prompt in rows]
    assert len(lines) == 4 and len({round(v, 4) for v in expected}) == 3  # distinct scores: a mix-up would show
    for line, (name, _), value in zip(lines, rows, expected, strict=False):
        assert line.split("\t")[1] == str(tmp_path / name) and abs(float(line.split("\t")[0]) - value) < 1e-6
    assert lines[3].endswith("\tmean of 3 images") and abs(float(lines[3].split("\t")[0]) - np.mean(expected)) < 1e-6
    converted = tmp_path / "hps.safetensors"  # convert first, then score the manifest with the converted file
    again = run_score(capsys, "--hps", path, "--tokenizer", bpe_dir, "--save-safetensors", converted, "--manifest",
                      manifest)
    assert again[0] == str(converted) and len(again) == 5
    for ours_line, line in zip(again[1:], lines, strict=True):
        assert ours_line.split("\t")[1] == line.split("\t")[1]
        assert abs(float(ours_line.split("\t")[0]) - float(line.split("\t")[0])) < 2e-6


@pytest.mark.parametrize("content,words", [
    (None, ["missing.jsonl", "cannot read the manifest"]),
    ('{"image": "a.png"}\n', ["line 1", '"prompt"']),
    ('{"image": "a.png", "prompt": "a cat"}\nnot json\n', ["line 2"]),
    ('{"image": "missing.png", "prompt": "a cat"}\n', ["missing.png"]),
    ("", ["no images to score"]),
])
def test_cli_bad_manifest_exits_2(content, words, cli_pair, bpe_dir, tmp_path, capsys):
    _, _, path = cli_pair
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    manifest = tmp_path / ("missing.jsonl" if content is None else "images.jsonl")
    if content is not None:
        manifest.write_text(content)
    message = score_error(capsys, "--hps", path, "--tokenizer", bpe_dir, "--manifest", manifest)
    assert all(w in message for w in words), message


def test_cli_manifest_excludes_images_and_prompt(cli_pair, bpe_dir, tmp_path, capsys):
    _, _, path = cli_pair
    for extra in (["--prompt", "a cat"], [tmp_path / "a.png"]):
        message = score_error(capsys, "--hps", path, "--tokenizer", bpe_dir, "--manifest", tmp_path / "m.jsonl", *extra)
        assert "without IMAGE and --prompt" in message


def test_cli_names_what_is_missing(cli_pair, bpe_dir, tmp_path, capsys):
    _, _, path = cli_pair
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    assert "--tokenizer DIR is required" in score_error(capsys, "--hps", path, "--prompt", "a cat", tmp_path / "a.png")
    assert "--prompt is required" in score_error(capsys, "--hps", path, "--tokenizer", bpe_dir, tmp_path / "a.png")


def test_cli_scores_in_float32_on_every_device(cli_pair, bpe_dir, tmp_path, monkeypatch, capsys):
    """Scores print 6 decimals: float32 is the default on CUDA too (a CUDA device is faked; loading stops)."""
    _, _, path = cli_pair
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    seen = []

    def load(checkpoint, tokenizer, device, dtype):
        seen.append((device.type, dtype))
        raise InputError("stop here")

    monkeypatch.setattr(scoring, "parse_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(reward.HPSReward, "load", staticmethod(load))
    for dtype in ([], ["--dtype", "bfloat16"]):
        score_error(capsys, "--hps", path, "--tokenizer", bpe_dir, "--prompt", "a cat", *dtype, tmp_path / "a.png")
    assert seen == [("cuda", torch.float32), ("cuda", torch.bfloat16)]


@pytest.mark.parametrize("case", ["missing", "architecture", "pickle", "state-dict-list", "empty-prompt",
                                  "not-an-image", "image-folder", "merges-latin1", "vocab-list", "pickscore-bad-json",
                                  "pickscore-no-weights", "save-to-folder", "save-unwritable"])
def test_cli_bad_input_exits_2(case, cli_pair, bpe_dir, tmp_path, capsys):
    _, _, path = cli_pair
    Image.new("L", (30, 20)).save(tmp_path / "gray.png")
    model, tokenizer, prompt, image, extra = ["--hps", path], bpe_dir, "a cat", tmp_path / "gray.png", []
    if case == "missing":
        model, words = ["--hps", tmp_path / "missing.pt"], "checkpoint not found"
    elif case in ("architecture", "pickle", "state-dict-list"):
        content, words = {"architecture": ({"img_in.weight": torch.zeros(4, 4)}, "unexpected key 'img_in.weight'"),
                          "pickle": ({"args": argparse.Namespace(lr=1e-5)}, "weights_only=True) refused"),
                          "state-dict-list": ({"state_dict": [torch.zeros(1)]}, "expected a state_dict")}[case]
        torch.save(content, tmp_path / "bad.pt")
        model = ["--hps", tmp_path / "bad.pt"]
    elif case == "empty-prompt":
        prompt, words = "", "empty prompt"
    elif case == "not-an-image":
        image, words = tmp_path / "text.png", "not a readable image"
        image.write_text("hello")
    elif case == "image-folder":
        image, words = tmp_path, "is a folder, not an image"
    elif case in ("merges-latin1", "vocab-list"):
        tokenizer = tmp_path / "tokenizer"
        tokenizer.mkdir()
        for name in ("vocab.json", "merges.txt"):
            (tokenizer / name).write_bytes((bpe_dir / name).read_bytes())
        words = "merges.txt" if case == "merges-latin1" else "vocab.json"
        (tokenizer / words).write_bytes("#version: 0.2\ncaf\u00e9 x\n".encode("latin-1") if case == "merges-latin1"
                                        else b"[1, 2]")
    elif case.startswith("pickscore"):
        folder = tmp_path / "pickscore"
        folder.mkdir()
        (folder / "config.json").write_text("{oops" if case == "pickscore-bad-json" else '{"model_type": "clip"}')
        model, words = ["--pickscore", folder], "not valid JSON" if case == "pickscore-bad-json" else "no weights"
    elif case == "save-to-folder":
        extra, words = ["--save-safetensors", tmp_path], "is a folder"
    else:
        extra, words = ["--save-safetensors", tmp_path / "gray.png" / "hps.safetensors"], "cannot write"
    message = score_error(capsys, *model, "--tokenizer", tokenizer, "--prompt", prompt, *extra, image)
    assert words in message, message


# ----------------------------------------------------------------------------------------------------------------------
# PickScore and CLIP-H as the official SRPO script rewards with them (its CLIP class). Tolerances, float32: SRP reward
# values and image gradients against the official CLIP.SRP_cfg on transformers' model and processor 1e-5 (measured
# ~6e-7); token ids and attention mask equal to CLIPProcessor's.

CAPTION_PROMPTS = ["a cat", "A Photo of a CAT on a mat, 4K!", "Tom &amp; Jerry <3 café naïve",
                   "a very long prompt " * 30]  # > 77 tokens: truncated


def clip_reward_folder(folder, bpe_dir, legacy_eos, seed):
    """A tiny random transformers CLIPModel folder laid out as PickScore_v1's and CLIP-ViT-H-14's: config.json +
    weights, CLIPProcessor files (tokenizer.json, what AutoProcessor reads) and the vocab.json + merges.txt they also
    hold. legacy_eos: the config's text eos_token_id is 2, as configs written before transformers fixed it carry
    (then transformers pools the text at the argmax of the ids)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = clip_weights.clip_config(**CONFIGS["v160x2-t128x1"])
    if legacy_eos:
        config.text_config.eos_token_id = 2
    clip = CLIPModel(config)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.02 * torch.randn_like(p))
        clip.logit_scale.fill_(4.6052)  # CLIP-H's and PickScore's: exp = 100
    clip.save_pretrained(folder)
    tokenizer = CLIPTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((bpe_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="module", params=[("pickscore", False), ("clip", True)], ids=["pickscore", "clip-legacy-eos"])
def clip_reward(request, tmp_path_factory, bpe_dir):
    """(name, folder, our reward loaded from it with the folder's own tokenizer files)."""
    name, legacy_eos = request.param
    folder = clip_reward_folder(tmp_path_factory.mktemp(name), bpe_dir, legacy_eos, seed=len(name))
    return name, folder, reward.REWARDS[name].load(folder, reward.tokenizer_folder(folder, None))


def official_clip(folder):
    """The official script's CLIP reward: AutoModel and AutoProcessor from the folder (transformers), torchvision's
    Resize(224, bicubic) + CenterCrop(224) + Normalize on the image tensor."""
    from transformers import AutoModel, AutoProcessor

    return AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def official_srp_cfg(model, processor, prompt, neg_prompt, images, k):
    """CLIP.SRP_cfg of fastvideo/SRPO.py, written out: logit_scale.exp() * ((k + 1) t - t_neg) @ img.T, diagonal, / 20,
    features L2-normalised, captions through the processor with padding=True, truncation=True, max_length=77."""
    def text(captions):
        inputs = processor(text=captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        embs = model.get_text_features(**inputs).pooler_output
        return embs / embs.norm(p=2, dim=-1, keepdim=True)

    image_embs = model.get_image_features(pixel_values=ref_crop(images)).pooler_output
    image_embs = image_embs / image_embs.norm(p=2, dim=-1, keepdim=True)
    k = torch.as_tensor(k, dtype=torch.float32).reshape(-1, 1)
    scores = model.logit_scale.exp() * ((k + 1) * text(prompt) - text(neg_prompt)) @ image_embs.T
    return scores.diag() / 20


def test_pickscore_and_clip_srp_reward_match_the_official_clip_reward(clip_reward):
    """Values and image gradients against the official CLIP.SRP_cfg on transformers' own model and processor: both
    branches' caption orders (P, N) and (N, P), several k (one per image too), long and HTML-escaped captions."""
    _, folder, ours = clip_reward
    model, processor = official_clip(folder)
    x = random_images(2, 240, 300, seed=5)
    for step, k in [(1, 0.1), (9, torch.tensor([0.25, 0.0]))]:  # other words, one k and one k per image
        pos, neg = srpo.control_words(step)
        for prompts in (CAPTION_PROMPTS[:2], CAPTION_PROMPTS[2:]):
            for words in ((pos, neg), (neg, pos)):
                mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
                captions = [[f"{word}. {p}" for p in prompts] for word in words]
                r = ours.relative_reward(mine, *captions, k, preprocess_mode="crop")
                ref = official_srp_cfg(model, processor, *captions, theirs, k)
                (r * torch.tensor([1.0, -0.7])).sum().backward()
                (ref * torch.tensor([1.0, -0.7])).sum().backward()
                assert rel_err(r, ref) <= 1e-5, (step, prompts, words)
                assert grad_err(mine.grad, theirs.grad) <= 1e-5, (step, prompts, words)


def test_clip_rewards_tokenize_as_the_processor(clip_reward, bpe_dir):
    """The captions' ids and attention mask are CLIPProcessor's (not open_clip's: the HTML entity stays as it is)."""
    _, folder, ours = clip_reward
    _, processor = official_clip(folder)
    inputs = ours.text_inputs(CAPTION_PROMPTS)
    theirs = processor(text=CAPTION_PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(inputs["attention_mask"], theirs["attention_mask"])
    assert inputs["input_ids"].shape == (4, 77) and inputs["attention_mask"][0].sum() == 4  # [start] a cat [end]
    n = inputs["attention_mask"][2].sum()
    open_clip_ids = OpenClipTokenizer.from_folder(bpe_dir)(CAPTION_PROMPTS[2:3])[0]  # '&amp;' unescaped to '&'
    assert not torch.equal(open_clip_ids[:n], inputs["input_ids"][2, :n])


def test_cli_scores_with_pickscore_and_clip_folders(clip_reward, tmp_path, capsys):
    """`srpo.py score --pickscore DIR` / `--clip DIR`, no --tokenizer (the folder's own files): the score is
    transformers' logits_per_image, --relative the official SRP reward, on the PNG's pixels."""
    name, folder, _ = clip_reward
    model, processor = official_clip(folder)
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (200, 260, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    image, prompt = reward.load_image(tmp_path / "a.png")[None], "A cat &amp; a dog"
    with torch.no_grad():
        inputs = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        logits = model(**inputs, pixel_values=ref_crop(image)).logits_per_image[0, 0].item()
        srp = official_srp_cfg(model, processor, [f"Real. {prompt}"], [f"Oil. {prompt}"], image, 0.3).item()
    plain = run_score(capsys, f"--{name}", folder, "--prompt", prompt, tmp_path / "a.png")
    relative = run_score(capsys, f"--{name}", folder, "--prompt", prompt, "--relative", "Real", "Oil", "--k", "0.3",
                         tmp_path / "a.png")
    assert abs(float(plain[0].split("\t")[0]) - logits) <= 1e-5 * abs(logits) + 1e-6
    assert abs(float(relative[0].split("\t")[0]) - srp) <= 1e-5 * abs(srp) + 1e-6


def test_cli_takes_exactly_one_reward_model(clip_reward, cli_pair, bpe_dir, tmp_path, capsys):
    _, folder, _ = clip_reward
    _, _, path = cli_pair
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    for models in (["--hps", path, "--clip", folder], ["--pickscore", folder, "--clip", folder]):
        message = score_error(capsys, *models, "--tokenizer", bpe_dir, "--prompt", "a cat", tmp_path / "a.png")
        assert "give one of --hps CKPT (HPSv2/2.1), --pickscore DIR and --clip DIR" in message
    message = score_error(capsys, "--tokenizer", bpe_dir, "--prompt", "a cat", tmp_path / "a.png")  # none: the demo's
    assert "--tokenizer goes with --hps, --pickscore or --clip" in message
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    message = score_error(capsys, "--clip", tmp_path, "--tokenizer", bpe_dir, "--prompt", "a cat", tmp_path / "a.png")
    assert "model_type 'bert', expected 'clip'" in message
