"""reward.py against open_clip and torchvision (independent references, test-only), on random tiny ViT-H-14-family
models saved in the released HPS format (`{'state_dict': ...}`, fp16, open_clip keys).

Tolerances, float32:
- image features, text features, HPS scores, SRP rewards: max|ours - ref| / max|ref| <= 1e-5;
- gradient of the score w.r.t. the [0, 1] image: |ours - ref| / |ref| (L2 norms) <= 1e-4;
- "crop" preprocessing vs torchvision's Resize + CenterCrop on tensors: <= 1e-6 absolute;
- "hpsv2" preprocessing vs hpsv2's PIL transform: <= 1.5 grey levels (PIL rounds each resampling pass to 8 bits,
  our differentiable pipeline stays in float), padding exact;
- token ids: equal.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize
from transformers import CLIPModel

import reward
from flux_model import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


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
    positive, negative = reward.control_words(5)
    assert (positive, negative) == ("Detail", "Concept art")
    with torch.no_grad():
        img = ref_image_features(ref, x)
        t_pos = ref_text_features(ref, [f"Detail. {p}" for p in prompts])
        t_neg = ref_text_features(ref, [f"Concept art. {p}" for p in prompts])
        expected = (img * ((1 + k)[:, None] * t_pos - t_neg)).sum(-1)
        assert rel_err(ours.relative_reward(x, prompts, k, positive, negative, "crop"), expected) <= 1e-5
        expected_scalar_k = (img * (1.3 * t_pos - t_neg)).sum(-1)
        assert rel_err(ours.relative_reward(x, prompts, 0.3, positive, negative, "crop"), expected_scalar_k) <= 1e-5


def test_hpsv2_mode_gradient_reaches_the_image(pair):
    _, ours, _ = pair
    x = random_images(2, 180, 300).requires_grad_()
    ours.score(x, "a cat").sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_vit_h_14_geometry_converts_to_the_reference_config():
    """The real architecture on the meta device: keys, shapes, heads and parameter count of the conversion."""
    with torch.device("meta"):
        ref = CLIP(**open_clip.get_model_config("ViT-H-14"))
    weights, origin = reward.open_clip_to_hf(dict(ref.state_dict()))
    model = reward._meta_clip(weights, origin)
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
    tokens = reward.ClipTokenizer.from_folder(bpe_dir)(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))
    assert tokens[5, -1] == 49407 and tokens[0, 0] == 49406 and tokens[0, -1] == 0


def test_flux_layout_and_files(bpe_dir, tmp_path):
    """A FLUX.1 folder (tokenizer/ inside) and explicit vocab/merges files read the same vocabulary."""
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_bytes((bpe_dir / name).read_bytes())
    a = reward.ClipTokenizer.from_folder(tmp_path)(PROMPTS[:2])
    b = reward.ClipTokenizer.from_files(bpe_dir / "vocab.json", bpe_dir / "merges.txt")(PROMPTS[:2])
    assert torch.equal(a, b)


def test_cleaning_without_ftfy_keeps_mojibake():
    """Documented difference: ftfy repairs mojibake ('cafÃ©' -> 'café'), our runtime (no ftfy) keeps it."""
    assert reward.clean_prompt("cafÃ©") == "cafã©"
    assert open_clip.tokenizer._clean_lower("cafÃ©") == "café"


def test_byte_level_tokenizer_needs_no_files():
    tok = reward.ClipTokenizer.byte_level()
    ids = tok(["Ab c"])[0]
    assert tok.vocab_size == 514 and (tok.start_id, tok.end_id) == (512, 513)
    assert ids[:6].tolist() == [512, ord("a"), 256 + ord("b"), 256 + ord("c"), 513, 0]  # byte, +256 at word end


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("height,width", [(300, 500), (500, 300), (720, 720), (576, 1024), (150, 200), (97, 311),
                                          (224, 224)])
def test_hpsv2_preprocessing_matches_hpsv2_transform(height, width):
    """hpsv2's val transform is image_transform(224, resize_longest_max=True): ResizeMaxSize (longest side to 224,
    bicubic PIL, zero pad with floor(pad/2) left/top). open_clip 3 spells it resize_mode='longest'
    (ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=0)); these sizes have no rounding ties between the two."""
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = image_transform(224, is_train=False, resize_mode="longest", fill_color=0)(Image.fromarray(pixels))
    ours = reward.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 224, "hpsv2")[0]
    std = torch.tensor(reward.CLIP_STD).view(3, 1, 1)
    assert ours.shape == expected.shape == (3, 224, 224)
    assert ((ours - expected) * std).abs().max() <= 1.5 / 255
    padding = (expected * std + torch.tensor(reward.CLIP_MEAN).view(3, 1, 1)).abs().amax(0) == 0
    assert torch.equal(ours[:, padding], expected[:, padding])


@pytest.mark.parametrize("height,width", [(300, 500), (500, 301), (720, 720), (200, 150)])
def test_crop_preprocessing_matches_torchvision(height, width):
    x = random_images(2, height, width)
    assert (reward.preprocess(x, 224, "crop") - ref_crop(x)).abs().max() <= 1e-6


def test_image_files_in_any_mode_are_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for mode in ("RGBA", "L", "P", "CMYK"):
        image = Image.fromarray(rgb).convert(mode)
        image.save(tmp_path / f"{mode}.png" if mode != "CMYK" else tmp_path / f"{mode}.jpg")
    for path in tmp_path.iterdir():
        loaded = reward.load_image(path)
        expected = np.array(Image.open(path).convert("RGB"))
        assert loaded.shape == (3, 20, 30) and torch.equal(loaded, torch.from_numpy(expected).permute(2, 0, 1) / 255)


# ----------------------------------------------------------------------------------------------------------------------
# Loading, conversion, tiny scorer, cache


def test_safetensors_conversion_gives_the_same_scorer(pair, tmp_path):
    _, ours, path = pair
    converted = tmp_path / "hps.safetensors"
    reward.convert_checkpoint(path, converted)
    again = reward.HPSReward.load(converted, ours.tokenizer)
    x = random_images(1, 224, 224)
    with torch.no_grad():
        assert torch.equal(again.score(x, "a cat"), ours.score(x, "a cat"))
    half = reward.HPSReward.load(converted, ours.tokenizer, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.score(x, "a cat").dtype == torch.float32


def test_tiny_scorer_builds_from_nothing_and_caches_text():
    scorer = reward.HPSReward.tiny()
    x = random_images(2, 64, 96).requires_grad_()
    calls, tokenize = [], scorer.tokenizer
    scorer.tokenizer = lambda prompts: calls.append(list(prompts)) or tokenize(prompts)
    pos, neg = reward.control_words(0)
    r = scorer.relative_reward(x, ["a cat", "a dog"], 0.1, pos, neg)
    r.sum().backward()
    scorer.relative_reward(x.detach(), ["a cat", "a dog"], 0.2, pos, neg)
    assert x.grad.abs().sum() > 0 and len(calls) == 2  # second call served from the cache
    scorer.cache_size = 1
    scorer.text_features(["x", "y", "z"])
    assert list(scorer._text_cache) == ["z"]


def test_pickscore_is_logit_scaled_clip(bpe_dir, tmp_path):
    """PickScore (HF CLIP format) against transformers' own CLIPModel forward: logits_per_image on the diagonal."""
    torch.manual_seed(0)
    clip = CLIPModel(reward.clip_config(**CONFIGS["v160x2-t128x1"]))
    clip.save_pretrained(tmp_path)
    scorer = reward.PickScoreReward.load(tmp_path, bpe_dir)
    x, prompts = random_images(2, 240, 300), ["a cat", "a dog on a skateboard"]
    with torch.no_grad():
        logits = clip.eval()(input_ids=open_clip.tokenize(prompts), pixel_values=ref_crop(x)).logits_per_image
        assert rel_err(scorer.score(x, prompts), logits.diagonal()) <= 1e-5


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
    message = error_of(reward.load_clip, tmp_path / "vit_b.pt")
    assert "'visual.conv1.weight' (192, 3, 32, 32)" in message and "head width 80" in message

    torch.save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(9, 3)}, tmp_path / "flux.pt")
    assert "unexpected key 'double_blocks.0.img_attn.qkv.weight' (9, 3)" in error_of(reward.load_clip,
                                                                                      tmp_path / "flux.pt")
    tampered = open_clip_tiny(CONFIGS["v160x2-t128x1"]).state_dict()
    tampered["text_projection"] = torch.zeros(128, 32)
    torch.save(tampered, tmp_path / "tampered.pt")
    message = error_of(reward.load_clip, tmp_path / "tampered.pt")
    assert "key 'text_projection' (128, 32) does not fit" in message and "needs (64, 128)" in message


def test_unreadable_inputs_are_one_line_errors(tmp_path, bpe_dir):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "pickled.pt")
    assert "weights_only=True) refused" in error_of(reward.load_clip, tmp_path / "pickled.pt")
    assert "checkpoint not found" in error_of(reward.load_clip, tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "not a torch checkpoint" in error_of(reward.load_clip, tmp_path / "garbage.pt")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    assert "cannot read image" in error_of(reward.load_image, tmp_path / "garbage.png")
    assert "tokenizer folder not found" in error_of(reward.ClipTokenizer.from_folder, tmp_path / "nope")
    scorer = reward.HPSReward.tiny()
    assert "empty prompt" in error_of(scorer.score, random_images(1, 32, 32), "  ")
    assert "empty prompt" in error_of(scorer.text_features, [""])
    assert "2 prompts for 1 images" in error_of(scorer.score, random_images(1, 32, 32), ["a", "b"])
    assert "(B, 3, H, W)" in error_of(scorer.score, torch.rand(1, 4, 32, 32), "a")
    assert "unknown preprocessing" in error_of(scorer.score, random_images(1, 32, 32), "a", "squash")
    real_vocab = reward.ClipTokenizer.from_folder(bpe_dir)
    assert "does not fit the model" in error_of(reward.HPSReward, scorer.clip, real_vocab)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: python srpo.py score


def run_score(*args):
    return subprocess.run([sys.executable, "srpo.py", "score", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_scores_images(cli_pair, bpe_dir, tmp_path):
    _, ours, path = cli_pair
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "b.png")  # converted to RGB: same score
    converted = tmp_path / "hps.safetensors"
    out = run_score("--hps", path, "--tokenizer", bpe_dir, "--prompt", "a cat", "--save-safetensors", converted,
                    tmp_path / "a.png", tmp_path / "b.png")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected = ours.score(reward.load_image(tmp_path / "a.png")[None], "a cat").item()
    assert lines[0] == str(converted) and len(lines) == 3
    for line, image in zip(lines[1:], ("a.png", "b.png"), strict=True):
        value, name = line.split("\t")
        assert len(value.split(".")[1]) >= 6 and name.endswith(image) and abs(float(value) - expected) < 1e-6

    out = run_score("--hps", converted, "--tokenizer", bpe_dir, "--prompt", "a cat", "--relative", "Real", "Oil",
                    "--k", "0.2", tmp_path / "a.png")
    expected = ours.relative_reward(reward.load_image(tmp_path / "a.png")[None], "a cat", 0.2, "Real", "Oil").item()
    assert out.returncode == 0 and abs(float(out.stdout.split()[0]) - expected) < 1e-6


@pytest.mark.parametrize("case", ["missing", "architecture", "pickle", "empty-prompt", "not-an-image"])
def test_cli_bad_input_exits_2(case, cli_pair, bpe_dir, tmp_path):
    _, _, path = cli_pair
    Image.new("L", (30, 20)).save(tmp_path / "gray.png")
    image = tmp_path / "gray.png"
    prompt = "a cat"
    if case == "missing":
        path = tmp_path / "missing.pt"
    elif case == "architecture":
        path = tmp_path / "flux.pt"
        torch.save({"img_in.weight": torch.zeros(4, 4)}, path)
    elif case == "pickle":
        path = tmp_path / "pickled.pt"
        torch.save({"args": argparse.Namespace(lr=1e-5)}, path)
    elif case == "empty-prompt":
        prompt = ""
    else:
        image = tmp_path / "text.png"
        image.write_text("hello")
    out = run_score("--hps", path, "--tokenizer", bpe_dir, "--prompt", prompt, image)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
