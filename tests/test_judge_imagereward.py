"""The ImageReward judge against the image-reward package's own `ImageReward` (1.5): the package's model built at
tiny sizes with random weights, saved as the published checkpoint is (a torch.save'd state dict) with its
med_config.json and a vocab.txt, read by the judge, both scoring the same images and prompts. Also the tiny judge,
the converted .safetensors and the one-line errors.

The package is imported without its __init__ (which imports the `clip` package, its ReFL trainer and diffusers): its
BLIP modules and ImageReward.py are loaded under stub parent packages. Its BLIP code was written for transformers 4;
the symbols transformers 5 moved or removed are patched, each where it is used and only for this module's tests.
"""

import importlib
import importlib.util
import json
import sys
import types

import pytest
import torch
from PIL import Image
from references import randomize, rel_err

from common.util import InputError
from reward import CLIP_STD
from sampling.judges.imagereward import ImageRewardJudge
from weights import blip_weights

VISION_WIDTH, TEXT_WIDTH = 128, 64  # two heads each (BLIP's ViT: heads of width 64)
WORDS = ["a", "the", "of", "on", "in", "at", "cat", "dog", "red", "blue", "photo", "sky", "night", "house", "big",
         "moon", "paint", "##ing", "##s", "##ed", "caf", "##e"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS,
                            *(f"##{c}" for c in LETTERS), *",.!?'"]))
PROMPTS = ["A red cat on the sky, at night!", "café photo of the big house", "",
           "painting " * 30 + "of a dog",  # past 35 tokens: truncated
           "[ENC] the blue moon"]  # the added special token, matched in the text by both tokenizers


def import_package(mp):
    """ImageReward.ImageReward and its BLIP modules, with transformers 5's gaps patched (mp: a MonkeyPatch)."""
    import transformers.modeling_utils
    import transformers.pytorch_utils

    spec = importlib.util.find_spec("ImageReward")
    for name in ("ImageReward", "ImageReward.models", "ImageReward.models.BLIP"):  # parents whose __init__ is skipped
        stub = types.ModuleType(name)
        stub.__path__ = ["/".join([spec.submodule_search_locations[0], *name.split(".")[1:]])]
        mp.setitem(sys.modules, name, stub)
    # med.py imports these from transformers.modeling_utils: transformers 5 moved two to pytorch_utils and removed
    # find_pruneable_heads_and_indices (only BertAttention.prune_heads uses it, never called here)
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        mp.setattr(transformers.modeling_utils, name, getattr(transformers.pytorch_utils, name), raising=False)
    mp.setattr(transformers.modeling_utils, "find_pruneable_heads_and_indices", None, raising=False)
    package = importlib.import_module("ImageReward.ImageReward")
    med = sys.modules["ImageReward.models.BLIP.med"]
    # transformers 5's PreTrainedModel dropped these ModuleUtilsMixin helpers that med.BertModel.forward calls
    # (written again as transformers 4 had them) and its init_weights needs post_init's bookkeeping, which med.py's
    # BertModel never runs: the init is skipped, every parameter is randomized after
    mp.setattr(med.BertModel, "invert_attention_mask", lambda self, mask: (
        1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min, raising=False)
    mp.setattr(med.BertModel, "get_head_mask", lambda self, head_mask, layers: [None] * layers, raising=False)
    mp.setattr(med.BertModel, "init_weights", lambda self: None)
    return package


def package_model(package, folder, mp):
    """The package's ImageReward at tiny sizes: its tokenizer from folder/vocab.txt (the package downloads
    bert-base-uncased), a 2-layer ViT 128 wide (the package builds ViT-L), MLP(64) for the 64-wide BERT."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # transformers 4's BertTokenizer

    blip = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
    vit = sys.modules["ImageReward.models.BLIP.vit"]

    def init_tokenizer():  # blip.py's, from a local vocabulary; enc_token_id is not used by ImageReward.score
        tokenizer = BertTokenizerLegacy(str(folder / "vocab.txt"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    mp.setattr(blip, "init_tokenizer", init_tokenizer)
    mp.setattr(blip, "create_vit", lambda *args: (vit.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=VISION_WIDTH, depth=2, num_heads=2), VISION_WIDTH))
    med_config = {"hidden_size": TEXT_WIDTH, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
                  "vocab_size": len(VOCAB) + 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
                  "hidden_act": "gelu", "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 768}
    (folder / "med_config.json").write_text(json.dumps(med_config))
    model = package.ImageReward(med_config=str(folder / "med_config.json"))
    model.mlp = package.MLP(TEXT_WIDTH)
    randomize(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for linear in [m for m in model.mlp.layers if isinstance(m, torch.nn.Linear)]:  # gain 1: scores spread ~1
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / linear.in_features ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(the package's model, its folder: ImageReward.pt, med_config.json, vocab.txt)."""
    missing = [name for name in ("ImageReward", "timm", "fairscale", "torchvision")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{missing[0]} not installed (pip install --no-deps image-reward==1.5 fairscale==0.4.13)")
    from transformers.utils import logging as hf_logging

    folder = tmp_path_factory.mktemp("imagereward")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    verbosity = hf_logging.get_verbosity()  # blip_pretrain.py sets transformers' to errors only when imported
    with pytest.MonkeyPatch.context() as mp:
        try:
            model = package_model(import_package(mp), folder, mp)
            torch.save(model.state_dict(), folder / "ImageReward.pt")
            yield model, folder
        finally:
            for name in [name for name in sys.modules if name.startswith("ImageReward.")]:
                del sys.modules[name]
            hf_logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def judge(reference):
    return ImageRewardJudge.load(reference[1])


def uint8_images(shape, seed, smooth=False):
    """(B, H, W, 3) uint8: noise, or smooth images (a 6 x 8 grid of colours upsampled, plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    if not smooth:
        return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
    coarse = torch.nn.functional.interpolate(torch.rand(b, 3, 6, 8, generator=g), size=(h, w), mode="bilinear")
    x = (coarse + 0.03 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def package_scores(model, images, prompts):
    return torch.tensor([model.score(p, Image.fromarray(im.numpy())) for p, im in zip(prompts, images, strict=True)])


def as_tensor(images):
    return images.permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def test_scores_equal_the_package_at_224(reference, judge):
    """At the native size the pixels are the package's exactly (no resize, no crop): float32 parity."""
    model, _ = reference
    images = uint8_images((len(PROMPTS), 224, 224), seed=1)
    same_prompt = [PROMPTS[0]] * len(PROMPTS)
    for prompts in (PROMPTS, same_prompt):
        ours, theirs = judge.score(as_tensor(images), prompts), package_scores(model, images, prompts)
        assert ours.shape == (len(PROMPTS),) and ours.dtype == torch.float32
        assert rel_err(ours, theirs) < 1e-5
        assert theirs.std() > 0.01  # prompts and images move the score: not a comparison of constants


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "noise"])
@pytest.mark.parametrize("size", [(256, 320), (160, 200), (768, 512)], ids=["down", "up", "tall"])
@torch.no_grad()
def test_scores_match_the_package_at_another_size(reference, judge, size, smooth):
    """The package resizes 8-bit PIL images: the judge's torch passes, rounded as PIL stores them, give its pixels up
    to PIL's fixed-point weights (1/255 on under 0.5% of them; measured 0.14% at most). Through the same weights
    the package's own pixels score to float32 parity, so the scores differ only by those pixels: relative error
    6.2e-5 at most measured (scores about 1.5, images alone moving them by ~0.03), held to 2e-4."""
    model, _ = reference
    images, prompts = uint8_images((3, *size), seed=2, smooth=smooth), PROMPTS[:3]
    theirs = torch.stack([model.preprocess(Image.fromarray(image.numpy())) for image in images])
    off = (judge.pixels(as_tensor(images)) - theirs).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert off.max() < 1 + 1e-3 and (off > 0.5).float().mean() < 5e-3
    scores = package_scores(model, images, prompts)
    assert rel_err(judge.score_pixels(theirs, prompts), scores) < 1e-5
    assert rel_err(judge.score(as_tensor(images), prompts), scores) < 2e-4



def test_blips_vits_have_heads_64_wide(reference, monkeypatch):
    """The checkpoint gives the ViT's width, not its head count: the judge takes width / 64, as the package's
    create_vit builds ViT-B (768, 12 heads) and ViT-L (1024, 16 heads)."""
    blip, built = sys.modules["ImageReward.models.BLIP.blip"], {}
    monkeypatch.setattr(blip, "VisionTransformer", lambda **kwargs: built.update(kwargs))
    for vit in ("base", "large"):
        blip.create_vit(vit, 224)
        assert built["embed_dim"] // built["num_heads"] == blip_weights.VISION_HEAD_WIDTH

# ----------------------------------------------------------------------------------------------------------------------
# Without the package: the tiny judge, the published layout written from it, the converted file, the errors


def write_folder(folder, state, med_config, vocab):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med_config))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """(folder, judge): ImageRewardJudge.tiny()'s weights under the published names, with the keys the package saves
    and scoring leaves unused, its med_config.json and vocab.txt."""
    judge = ImageRewardJudge.tiny(seed=3)
    state = {blip_weights.checkpoint_key(key): t for key, t in judge.state_dict().items()}
    state.update({"blip.text_encoder.embeddings.position_ids": torch.arange(35).expand(1, -1),
                  "blip.vision_proj.weight": torch.zeros(256, 128), "blip.text_proj.bias": torch.zeros(256)})
    med_config = {key: getattr(judge.text.config, key) for key in blip_weights.BERT_DEFAULTS}
    vocab = judge.tokenizer.convert_ids_to_tokens(list(range(len(judge.tokenizer) - 2)))
    return write_folder(tmp_path_factory.mktemp("tiny"), state, med_config, vocab), judge


IMAGES = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
TWO_PROMPTS = ["a red cat", "A blue dog at night!"]


@torch.no_grad()
def test_the_tiny_judge_is_seeded_frozen_and_scores_any_size():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = ImageRewardJudge.tiny()
    assert torch.equal(torch.rand(1), expected)  # built in a forked RNG: the caller's stream is untouched
    b, c = ImageRewardJudge.tiny(), ImageRewardJudge.tiny(seed=1)
    scores = a.score(IMAGES, TWO_PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, b.score(IMAGES, TWO_PROMPTS)) and not torch.equal(scores, c.score(IMAGES, TWO_PROMPTS))
    assert a.score(torch.rand(1, 3, 224, 224), ["x"]).shape == (1,)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert (type(a.vision).__name__, type(a.text).__name__) == ("BlipVisionModel", "BlipTextModel")
    assert len(a.vision.encoder.layers) == len(a.text.encoder.layer) == 2
    bf16 = ImageRewardJudge.tiny(dtype=torch.bfloat16)
    assert bf16.head[0].weight.dtype == torch.float32 and bf16.score(IMAGES, TWO_PROMPTS).dtype == torch.float32


@torch.no_grad()
def test_the_published_layout_and_its_safetensors_load_the_same_weights(tiny_folder, tmp_path):
    folder, tiny = tiny_folder
    expected = tiny.score(IMAGES, TWO_PROMPTS)
    assert torch.equal(ImageRewardJudge.load(folder).score(IMAGES, TWO_PROMPTS), expected)
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    blip_weights.convert_checkpoint(folder / "ImageReward.pt", tmp_path / "ImageReward.safetensors")
    assert torch.equal(ImageRewardJudge.load(tmp_path).score(IMAGES, TWO_PROMPTS), expected)


def _prefix(state):
    state.update({f"model.{key}": state.pop(key) for key in list(state)})


# (id, an edit of (state dict, med_config, vocab lines) or a file to delete, what the one line says)
ERRORS = [
    ("no checkpoint", "ImageReward.pt", "no ImageReward.safetensors or ImageReward.pt"),
    ("no med_config", "med_config.json", "no med_config.json"),
    ("no vocab", "vocab.txt", "no vocab.txt"),
    ("another layout", lambda state, med, vocab: _prefix(state),
     "ImageReward.pt: unexpected key 'model.blip.visual_encoder.cls_token'"),
    ("wrong shape", lambda state, med, vocab: state.update({"mlp.layers.0.weight": torch.zeros(1024, 65)}),
     "ImageReward.pt: key 'mlp.layers.0.weight' (1024, 65) does not fit"),
    ("missing key", lambda state, med, vocab: state.pop("blip.text_encoder.encoder.layer.1.output.dense.bias"),
     "ImageReward.pt: missing key 'blip.text_encoder.encoder.layer.1.output.dense.bias'"),
    ("another depth", lambda state, med, vocab: med.update(num_hidden_layers=3),
     "ImageReward.pt: missing key 'blip.text_encoder.encoder.layer.2.attention.self.query.weight'"),
    ("bad med_config", lambda state, med, vocab: med.update(hidden_size="big"),
     "med_config.json: 'hidden_size' is 'big', expected a positive integer"),
    ("another vocabulary", lambda state, med, vocab: vocab.append("zebra"),
     "vocab.txt has 79 tokens, 81 with [DEC] and [ENC], but med_config.json has vocab_size 80"),
    ("no BERT vocabulary", lambda state, med, vocab: vocab.remove("[CLS]"), "vocab.txt: no [CLS] token"),
]


@pytest.mark.parametrize("edit, message", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_bad_folders_are_one_line_errors(tiny_folder, tmp_path, edit, message):
    folder, _ = tiny_folder
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    vocab = (folder / "vocab.txt").read_text().splitlines()
    if callable(edit):
        edit(state, med, vocab)
    write_folder(tmp_path, state, med, vocab)
    if not callable(edit):
        (tmp_path / edit).unlink()
    with pytest.raises(InputError) as error:
        ImageRewardJudge.load(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_path_reads_nothing_heavy(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    ImageRewardJudge.check_path(folder)
    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="a file, not a folder"):
        ImageRewardJudge.check_path(tmp_path / "ImageReward.pt")
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    ImageRewardJudge.check_path(tmp_path)  # the folder's files are there: the checkpoint is read by load
    with pytest.raises(InputError, match="ImageReward.pt: not a torch checkpoint"):
        ImageRewardJudge.load(tmp_path)
