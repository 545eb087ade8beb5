"""sampling/judges/aesthetic.py against independent references, on random tiny towers saved in the published layouts:

- `aesthetic` (Aesthetic Predictor v2.5) against the package aesthetic-predictor-v2-5 itself (test-only): its
  convert_v2_5_from_siglip reads the same folder (a whole SiglipModel, as google/siglip-so400m-patch14-384 ships,
  with its preprocessor_config.json) and the same head .pth (bf16, keys scoring_head.N, as its URL serves it), and its
  processor preprocesses the PIL image;
- `laion-aesthetic` against open_clip's encode_image (test-only) of a tiny ViT-L/14-family CLIP, L2-normalised as
  simple_inference.py does, into an nn.Sequential written here from the published layer list, with open_clip's
  eval transform (OpenAI CLIP's: Resize, CenterCrop, ToTensor, Normalize) on the PIL image. The transformers folder
  is the open_clip model converted with weights/clip_weights.py (checked against open_clip in test_reward.py); the
  judge itself uses none of it.

Tolerances (rel_err = max |ours - ref| / max |ref|, float32):
- at the towers' native size (no resize), and at any size with the reference model fed our pixels: 1e-5 (measured:
  v2.5 0, LAION 7e-7);
- other sizes, each side preprocessing the PIL image itself: a pixel of ours differs from the reference's by one
  8-bit level at most, where a sum lands on a half level and the fixed-point arithmetic rounds it the other way: on
  at most 0.5% of them against transformers' PIL backend (the processor the package was released with; measured
  0.03-0.31%), 1% against the package's processor today (transformers 5's torchvision backend; 0.5-0.7%) and
  open_clip's PIL transform (0.02-0.56%). Those flips move the scores of these random towers (whose scores move more
  with a pixel than trained ones do) by up to 2e-3 (measured: v2.5 8e-4 to 1.5e-3 against the package's processor,
  2e-4 to 7e-4 against the PIL backend; LAION 6e-5 to 1.6e-4); against the PIL backend, v2.5 must also be nearer
  than transformers' two backends are to each other (measured 9e-4 to 1.6e-3).
"""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from aesthetic_predictor_v2_5 import convert_v2_5_from_siglip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import image_transform
from PIL import Image
from references import rel_err
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModelWithProjection,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionModel,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from common.util import InputError
from sampling.judges.aesthetic import AestheticV25, LaionAesthetic
from weights import clip_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 56  # both tiny towers' image size: 4 x 4 patches of 14
LEVEL = 1 / 255  # one 8-bit level
HEAD = (1024, 128, 64, 16, 1)
SIGLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "image_size": SIZE, "patch_size": 14}
OTHER_SIZES = [(100, 80), (37, 120), (224, 200)]


def perturb(model, seed):
    """Every weight moved off its init (biases, LayerNorms, the pooling head), so a wrong mapping shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def random_head(width, linear_at, prefix, dtype, seed):
    """A published head's state_dict: Linear layers at linear_at of widths width -> HEAD, random."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for index, fan_in, fan_out in zip(linear_at, (width, *HEAD[:-1]), HEAD, strict=True):
        state[f"{prefix}{index}.weight"] = (torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5).to(dtype)
        state[f"{prefix}{index}.bias"] = (0.1 * torch.randn(fan_out, generator=g)).to(dtype)
    return state


def pil_images(height, width, count=3, seed=0):
    """Smooth random RGB images with a hard-edged inverted block (bicubic overshoots there: 8-bit clamping shows)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
                            .resize((width, height), Image.BICUBIC)).copy()
        block = (slice(height // 3, height // 3 + height // 4), slice(width // 4, width // 2))
        pixels[block] = 255 - pixels[block]
        images.append(Image.fromarray(pixels))
    return images


def to_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]).float() / 255


def assert_pixels_close(ours, ref, share, std=0.5):
    """Normalised pixels (std: the normalisation's) equal but for one 8-bit level on at most `share` of them."""
    diff = ((ours - ref) * torch.as_tensor(std).view(-1, 1, 1)).abs()
    assert diff.max().item() <= 1.01 * LEVEL
    assert (diff > 1e-5).float().mean().item() <= share


# ----------------------------------------------------------------------------------------------------------------------
# Aesthetic Predictor v2.5 against the package


@pytest.fixture(scope="module")
def v25(tmp_path_factory):
    """(folder, package model, package processor): a whole tiny SiglipModel with google's preprocessor settings at
    SIZE and a bf16 head, read by the package's own convert_v2_5_from_siglip."""
    folder = tmp_path_factory.mktemp("siglip")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100}
    torch.manual_seed(0)
    perturb(SiglipModel(SiglipConfig(vision_config=SIGLIP_VISION, text_config=text)), 1).save_pretrained(folder)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    head = folder / AestheticV25.head_file
    torch.save(random_head(32, (0, 2, 4, 6, 8), "scoring_head.", torch.bfloat16, 2), head)
    model, processor = convert_v2_5_from_siglip(str(head), str(folder))
    return folder, model.eval(), processor


def v25_reference(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits[:, 0]


@pytest.fixture(scope="module")
def v25_vision_folder(v25, tmp_path_factory):
    """The same tower saved as a SiglipVisionModel folder, with the same head."""
    folder = tmp_path_factory.mktemp("siglip_vision")
    SiglipVisionModel.from_pretrained(v25[0]).save_pretrained(folder)
    (folder / AestheticV25.head_file).write_bytes((v25[0] / AestheticV25.head_file).read_bytes())
    return folder


@pytest.mark.parametrize("layout", ["SiglipModel", "SiglipVisionModel"])
def test_v25_matches_the_package_at_its_native_size(v25, v25_vision_folder, layout):
    folder, model, processor = v25
    judge = AestheticV25.load(folder if layout == "SiglipModel" else v25_vision_folder)
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))  # not 8-bit: the PNG is
    pngs = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]
    ref = v25_reference(model, processor(images=pngs, return_tensors="pt").pixel_values)
    with torch.no_grad():
        ours = judge.score(images, ["a prompt"] * 3)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize(("height", "width"), OTHER_SIZES)
def test_v25_matches_the_package_at_other_sizes(v25, height, width):
    folder, model, processor = v25
    judge = AestheticV25.load(folder)
    images = pil_images(height, width)
    pil = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, resample=3, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    ref_pixels = processor(images=images, return_tensors="pt").pixel_values
    pil_pixels = pil(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        ours = judge.score(to_tensor(images), [""] * 3)
        pixels = judge.pixels(to_tensor(images))
    assert_pixels_close(pixels, pil_pixels, 5e-3)
    assert_pixels_close(pixels, ref_pixels, 1e-2)
    assert rel_err(ours, v25_reference(model, pixels)) <= 1e-5
    ref, ref_pil = v25_reference(model, ref_pixels), v25_reference(model, pil_pixels)
    assert rel_err(ours, ref) <= 2e-3
    assert rel_err(ours, ref_pil) <= min(1e-3, rel_err(ref, ref_pil))  # nearer PIL than the two backends are


# ----------------------------------------------------------------------------------------------------------------------
# The LAION predictor against open_clip + the published MLP


def laion_mlp(width):
    """simple_inference.py's MLP, from its published layer list (the ReLUs commented out there)."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """(CLIPModel folder, CLIPVisionModelWithProjection folder, open_clip reference, reference MLP): one tiny
    ViT-L/14-family CLIP (QuickGELU, 64-wide heads) converted to both transformers layouts, with one head file."""
    tmp = tmp_path_factory.mktemp("laion")
    torch.manual_seed(0)
    ref = perturb(CLIP(32, CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=14, image_size=SIZE),
                       CLIPTextCfg(context_length=77, vocab_size=1000, width=64, heads=1, layers=1),
                       quick_gelu=True), 1)
    torch.save(ref.state_dict(), tmp / "open_clip.pt")
    pieces, fetch = clip_weights.read_clip_weights(tmp / "open_clip.pt")
    tensors = {key: fetch(piece).contiguous() for key, piece in pieces.items()}
    config = CLIPConfig(
        vision_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": SIZE, "patch_size": 14, "hidden_act": "quick_gelu"},
        text_config={"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1,
                     "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        projection_dim=32)
    clip = CLIPModel(config)
    clip.load_state_dict(tensors, strict=True)
    vision_config = config.vision_config
    vision_config.projection_dim = 32
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_"))},
                           strict=True)
    mlp = laion_mlp(32)
    mlp.load_state_dict(random_head(32, (0, 2, 4, 6, 7), "", torch.float32, 2))
    for folder, model in ((tmp / "clip", clip), (tmp / "clip_vision", vision)):
        model.save_pretrained(folder)
        torch.save(OrderedDict((f"layers.{k}", v) for k, v in mlp.state_dict().items()),
                   folder / LaionAesthetic.head_file)
    return tmp / "clip", tmp / "clip_vision", ref, mlp.eval()


def laion_reference(ref, mlp, pixels):
    """simple_inference.py: encode_image, L2-normalised, the MLP."""
    with torch.no_grad():
        embeds = ref.encode_image(pixels)
        return mlp(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]


@pytest.mark.parametrize("layout", ["CLIPModel", "CLIPVisionModelWithProjection"])
def test_laion_matches_open_clip_at_its_native_size(laion, layout):
    full, vision, ref, mlp = laion
    judge = LaionAesthetic.load(full if layout == "CLIPModel" else vision)
    images = to_tensor(pil_images(SIZE, SIZE))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    with torch.no_grad():
        ours = judge.score(images, ["a prompt"] * 3)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert rel_err(ours, laion_reference(ref, mlp, (images - mean) / std)) <= 1e-5


@pytest.mark.parametrize(("height", "width"), OTHER_SIZES)
def test_laion_matches_open_clip_at_other_sizes(laion, height, width):
    full, _, ref, mlp = laion
    judge = LaionAesthetic.load(full)
    images = pil_images(height, width)
    transform = image_transform(SIZE, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    ref_pixels = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        ours = judge.score(to_tensor(images), [""] * 3)
        pixels = judge.pixels(to_tensor(images))
    assert_pixels_close(pixels, ref_pixels, 1e-2, OPENAI_DATASET_STD)
    assert rel_err(ours, laion_reference(ref, mlp, pixels)) <= 1e-5
    assert rel_err(ours, laion_reference(ref, mlp, ref_pixels)) <= 2e-3


# ----------------------------------------------------------------------------------------------------------------------
# tiny() and the one-line errors

JUDGES = [AestheticV25, LaionAesthetic]


@pytest.mark.parametrize("judge", JUDGES, ids=lambda j: j.name)
def test_tiny_is_deterministic_and_scores_any_size(judge):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = judge.tiny(seed=0), judge.tiny(seed=0), judge.tiny(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # fork_rng: the caller's stream untouched
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    with torch.no_grad():
        for height, width in ((SIZE, SIZE), (33, 90), (128, 64)):
            images = torch.rand(2, 3, height, width)
            scores = a.score(images, ["x", "y"])
            assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
            assert torch.equal(scores, b.score(images, ["x", "y"]))
        assert a.to(torch.bfloat16).score(images, ["x", "y"]).dtype == torch.float32


def message(error):
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("judge", JUDGES, ids=lambda j: j.name)
def test_check_path_names_what_is_missing(judge, v25, laion, tmp_path):
    good = v25[0] if judge is AestheticV25 else laion[0]
    other = laion[0] if judge is AestheticV25 else v25[0]
    with pytest.raises(InputError) as e:
        judge.check_path(tmp_path / "nowhere")
    assert "no such folder" in message(e) and judge.head_file in message(e)
    with pytest.raises(InputError) as e:
        judge.check_path(good / "config.json")
    assert "a file, not a folder" in message(e)
    with pytest.raises(InputError) as e:
        judge.check_path(tmp_path)
    assert "no config.json" in message(e)
    with pytest.raises(InputError) as e:
        judge.check_path(other)
    assert "model_type" in message(e) and repr(judge.model_types[0]) in message(e)
    (tmp_path / "config.json").write_bytes((good / "config.json").read_bytes())
    with pytest.raises(InputError) as e:
        judge.check_path(tmp_path)
    assert "no weights" in message(e)
    (tmp_path / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(InputError) as e:
        judge.check_path(tmp_path)
    assert f"no {judge.head_file}" in message(e)
    judge.check_path(good)


def copy_folder(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize("judge", JUDGES, ids=lambda j: j.name)
def test_load_names_the_wrong_key_or_shape(judge, v25, laion, tmp_path):
    folder = copy_folder(v25[0] if judge is AestheticV25 else laion[1], tmp_path / "model")
    head_path = folder / judge.head_file
    good = torch.load(head_path, weights_only=True)
    first = next(iter(good))
    cases = [
        ({k: v for k, v in good.items() if k != first}, f"missing key '{first}'"),
        ({**good, "extra.weight": torch.zeros(2)}, "unexpected key 'extra.weight' (2,)"),
        ({**good, first: torch.zeros(1024, 7)}, f"key '{first}' (1024, 7) does not fit the model's (1024, "),
        ({f"model.{k}": v for k, v in good.items()}, f"missing key '{first}'"),
    ]
    for state, expected in cases:
        torch.save(state, head_path)
        with pytest.raises(InputError) as e:
            judge.load(folder)
        assert expected in message(e) and judge.head_file in message(e)
    head_path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as e:
        judge.load(folder)
    assert "not a torch checkpoint" in message(e)
    torch.save(good, head_path)
    config = json.loads((folder / "config.json").read_text())
    config.get("vision_config", config)["intermediate_size"] += 8  # the tower's weights no longer fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as e:
        judge.load(folder)
    assert "does not fit config.json" in message(e) and "intermediate" not in message(e)
