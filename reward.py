"""Image rewards for SRPO on transformers' CLIPModel: HPSv2.1 (open_clip ViT-H-14 checkpoints), PickScore and CLIP-H
(transformers folders), the three rewards of the official SRPO script.

CLIPScorer holds what they share: the frozen CLIPModel, image and text features (text cached), the score
s = scale <img, txt> of L2-normalised features and SRPO's relative reward r = c img . ((1 + k) t+ - t-),
c = scale / srp_divisor. The rewards are its subclasses and say only what differs: scale 1 (HPS) or exp(logit_scale)
(PickScore, CLIP), srp_divisor 1 or 20, the tokenizer, the default preprocessing, where the weights come from and
what the command line shows (PickScore and CLIP-H share FolderCLIPScorer: the official script's one CLIP class).
Adding a reward is one class and one REWARDS entry (tests/test_reward_seam.py).

Read top to bottom: the scorer, the rewards, SRPO's control words, the `score` command, the differentiable
preprocessing of (B, 3, H, W) images in [0, 1]. The weights' I/O is weights/clip_weights.py's, the tokenizers are
weights/clip_tokenizer.py's.
"""

import functools
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from common.images import read_rgb
from common.util import InputError, check_folder, read_json
from weights import clip_weights
from weights.clip_tokenizer import CLIPProcessorTokenizer, OpenClipTokenizer, clean_prompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = {"vision_width": 160, "vision_layers": 2, "text_width": 128, "text_layers": 2, "embed_dim": 64}
PREPROCESS_MODES = ("hpsv2", "crop")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------------------------------
# The scorer


class CLIPScorer(torch.nn.Module):
    """A reward on a frozen transformers `CLIPModel`: s_i = scale <img_i, txt_i>, features L2-normalised, and SRPO's
    relative reward. Subclasses (the rewards) set the class attributes below; REWARDS maps name -> class.

    Images are (B, 3, H, W) tensors in [0, 1]; gradients flow to them, never to the scorer's weights. Text features
    are computed without gradient and cached per caption (LRU, `cache_size` entries).
    """

    name: str  # the --reward value, and the model flag --NAME
    title: str  # the model's name in messages
    metavar: str  # --NAME's value: CKPT (a file) or DIR (a folder)
    path_help: str  # --NAME's help: the file or folder, what it holds
    tokenizer_class: type  # clip_tokenizer's layout its reference tokenizes captions with
    default_preprocess: str  # a PREPROCESS_MODES entry: the transform its reference scores with
    logit_scaled: bool  # scale = exp(logit_scale) (CLIP's logits_per_image), else 1 (the cosine)
    srp_divisor: float  # c = scale / srp_divisor in the SRP reward

    def __init__(self, clip, tokenizer, cache_size=4096):
        super().__init__()
        if tokenizer.vocab_size != clip.config.text_config.vocab_size or tokenizer.end_id != tokenizer.vocab_size - 1:
            raise InputError(f"the tokenizer ({tokenizer.vocab_size} tokens, end id {tokenizer.end_id}) does not fit "
                             f"the model ({clip.config.text_config.vocab_size} tokens, end id last)")
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._text_cache = OrderedDict()

    @classmethod
    def check_path(cls, path):
        """One-line InputError unless path looks like this reward's file or folder; nothing is loaded."""
        raise NotImplementedError

    @staticmethod
    def read_clip(path, device, dtype):
        """The frozen `CLIPModel` of the reward's file or folder (checked by check_path first)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path, tokenizer, device="cpu", dtype=torch.float32):
        """From the reward's file or folder and a tokenizer (of tokenizer_class) or its folder."""
        cls.check_path(path)
        if not isinstance(tokenizer, cls.tokenizer_class):
            tokenizer = cls.tokenizer_class.from_folder(tokenizer)
        return cls(cls.read_clip(path, device, dtype), tokenizer)

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        """A random scorer of the ViT-H-14 family (TINY widths, 2 heads per tower) with the byte-level tokenizer:
        needs no files, for the built-in demo and tests."""
        from transformers import CLIPModel  # ~4 s to import: only where a model is built

        tokenizer = cls.tokenizer_class.byte_level()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPModel(clip_weights.clip_config(**TINY, vocab_size=tokenizer.vocab_size))
        return cls(clip.to(device=device, dtype=dtype), tokenizer)

    @property
    def device(self):
        return self.clip.logit_scale.device

    @property
    def dtype(self):
        return self.clip.logit_scale.dtype

    @property
    def image_size(self):
        return self.clip.config.vision_config.image_size

    def image_features(self, images, preprocess_mode=None):
        """normalize(P_v . post_ln(ViT(preprocess(images))[CLS])), (B, E) float32, differentiable in images."""
        pixels = preprocess(images.to(self.device), self.image_size, preprocess_mode or self.default_preprocess)
        pooled = self.clip.vision_model(pixel_values=pixels.to(self.dtype)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts):
        """normalize(P_t . ln_final(T(tokens))[end]), (B, E) float32 on the model's device; cached, no gradient."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            inputs = {name: t.to(self.device) for name, t in self.text_inputs(missing).items()}
            pooled = self.clip.text_model(**inputs).pooler_output
            features = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, features, strict=True))
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        features = torch.stack([self._text_cache[p] for p in prompts]).to(self.device)
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return features

    def text_inputs(self, prompts):
        """The text tower's inputs for prompts, as the reward's reference tokenizes them (tokenizer_class)."""
        return self.tokenizer.text_inputs(prompts)

    def scale(self):
        """The score's scale: exp(logit_scale) for a logit-scaled reward, else 1."""
        return self.clip.logit_scale.float().exp() if self.logit_scaled else 1.0

    def score(self, images, prompts, preprocess_mode=None):
        """s_i = scale() <img_i, txt_i>, both L2-normalised; (B,) float32, differentiable in images. A str prompt is
        every image's."""
        prompts = captions_for(prompts, images.shape[0])
        return self.scale() * (self.image_features(images, preprocess_mode) * self.text_features(prompts)).sum(-1)

    def relative_reward(self, images, positive_captions, negative_captions, k, preprocess_mode=None):
        """SRP reward r_i = c img_i . ((1 + k) txt(positive_captions[i]) - txt(negative_captions[i])),
        c = scale() / srp_divisor; (B,) float32, differentiable in images.

        A str caption is every image's; k is a float or a (B,) tensor. SRPO's captions are control_caption(word,
        prompt), its inversion branch swapping the words.
        """
        batch = images.shape[0]
        t_pos = self.text_features(captions_for(positive_captions, batch))
        t_neg = self.text_features(captions_for(negative_captions, batch))
        if not isinstance(k, (int, float)):  # one k per image; a single k stays a Python scalar: no copy
            k = torch.as_tensor(k, dtype=torch.float32, device=self.device).reshape(-1, 1)
        c = self.scale() / self.srp_divisor
        return c * (self.image_features(images, preprocess_mode) * ((1 + k) * t_pos - t_neg)).sum(-1)


def control_caption(word, prompt):
    """The SRP caption, the official format: word + '. ' + prompt."""
    return f"{word}. {prompt}"


def captions_for(captions, batch):
    """One caption per image: a str repeated, or a list of `batch`; an empty caption is an InputError."""
    captions = [captions] * batch if isinstance(captions, str) else list(captions)
    if len(captions) != batch:
        raise InputError(f"{len(captions)} prompts for {batch} images")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not clean_prompt(caption):
            raise InputError(f"empty prompt (prompt {i} is {caption!r})")
    return captions


# ----------------------------------------------------------------------------------------------------------------------
# The rewards


class HPSReward(CLIPScorer):
    """HPSv2/2.1: s = <img, txt>, the cosine (benchmarks print 100 s), on an open_clip ViT-H-14 checkpoint converted
    on load; captions tokenized and images preprocessed as hpsv2 does. c = 1: the official SRP_cfg takes the cosine
    similarities as they are."""

    name, title, metavar = "hps", "HPSv2.1", "CKPT"
    path_help = "HPSv2/HPSv2.1 checkpoint: HPS_v2(.1)_compressed.pt (open_clip) or its converted .safetensors"
    tokenizer_class = OpenClipTokenizer
    default_preprocess = "hpsv2"
    logit_scaled, srp_divisor = False, 1

    @classmethod
    def check_path(cls, path):
        clip_weights.check_checkpoint(path, "an HPSv2/HPSv2.1 checkpoint: HPS_v2.1_compressed.pt or its converted "
                                            ".safetensors")

    read_clip = staticmethod(clip_weights.load_clip)


class FolderCLIPScorer(CLIPScorer):
    """A reward read from a transformers CLIPModel folder, scored as the official script's CLIP class scores both
    PickScore and CLIP-H: s = exp(logit_scale) <img, txt>, captions tokenized by CLIPProcessor, images resized on
    the short side and centre-cropped ("crop", as its processor does). c = exp(logit_scale) / 20: the official
    script scales the SRP reward by the logit scale (100), then divides by 20 "to make the score comparable with
    HPS"."""

    metavar = "DIR"
    tokenizer_class = CLIPProcessorTokenizer
    default_preprocess = "crop"
    logit_scaled, srp_divisor = True, 20

    @classmethod
    def check_path(cls, path):
        check_clip_folder(path, cls.title)

    read_clip = staticmethod(clip_weights.load_clip_folder)


class PickScoreReward(FolderCLIPScorer):
    """PickScore (yuvalkirstain/PickScore_v1, a CLIP ViT-H-14 fine-tuned on Pick-a-Pic's preferences)."""

    name, title = "pickscore", "PickScore"
    path_help = ("PickScore_v1 as a transformers CLIPModel folder: config.json + weights (its vocab.json + merges.txt, "
                 "if there, are the tokenizer)")


class CLIPReward(FolderCLIPScorer):
    """CLIP-ViT-H-14 (laion2B-s32B-b79K), the official script's third reward (its CLIP class with
    is_pickscore=False): PickScore's code on the laion weights."""

    name, title = "clip", "CLIP-H"
    path_help = ("CLIP-ViT-H-14-laion2B-s32B-b79K as a transformers CLIPModel folder: config.json + weights (its "
                 "vocab.json + merges.txt, if there, are the tokenizer)")


# `srpo.py train --reward NAME` and its model flag --NAME, `srpo.py score --NAME`
REWARDS = {kind.name: kind for kind in (HPSReward, PickScoreReward, CLIPReward)}


def check_clip_folder(folder, title):
    """Fail early, in one line, unless folder looks like a transformers CLIPModel: config.json with model_type 'clip'
    and a weights file (the shapes are checked when it loads). title names the model in the message."""
    folder = str(folder)
    check_folder(folder, f"a {title} model folder in transformers format: config.json + weights")
    config = read_json(os.path.join(folder, "config.json"))
    if config.get("model_type") != "clip":
        raise InputError(f"{folder}: config.json has model_type {config.get('model_type')!r}, expected 'clip' (a "
                         f"{title} model is a transformers CLIPModel)")
    if not any(os.path.isfile(os.path.join(folder, file)) for file in _HF_WEIGHTS):
        raise InputError(f"{folder}: no weights (expected one of {', '.join(_HF_WEIGHTS)})")


CLIP_VOCABULARY = ("vocab.json", "merges.txt")  # a CLIP BPE tokenizer's files


def tokenizer_folder(model, fallback):
    """Where a CLIP reward's tokenizer comes from: the model's folder when it holds vocab.json + merges.txt (as
    PickScore_v1's and CLIP-ViT-H-14's do), else fallback (e.g. a FLUX.1 folder, whose tokenizer/ has the same CLIP
    BPE vocabulary)."""
    own = all(os.path.isfile(os.path.join(str(model), name)) for name in CLIP_VOCABULARY)
    return model if own else fallback


# ----------------------------------------------------------------------------------------------------------------------
# Differentiable preprocessing


def _resize(x, height, width):
    """Bicubic with antialias (a = -0.5, PIL's kernel), as torchvision resizes tensors; identity at the same size."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


@functools.cache
def clip_mean_std(device):
    """CLIP's mean and std as (3, 1, 1) float32 tensors on device: copied there once, not at every call."""
    return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))


def preprocess(images, size=224, mode="hpsv2"):
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised with the CLIP mean/std; differentiable, in float32.

    hpsv2: hpsv2's eval transform (its open_clip's image_transform(size, resize_longest_max=True)): ToTensor first,
           then ResizeMaxSize on the float tensor: s = size / max(H, W), one bicubic antialiased resize to
           (round(H s), round(W s)), no clamp (torchvision clamps only uint8), at least 1 pixel (hpsv2 itself fails
           on a side thinner than 1:448); zero-pad to size x size, left/top getting floor(pad / 2). hpsv2 skips
           both steps when s = 1, leaving a non-square image unpadded (its ViT then fails): here it is padded.
    crop:  SRPO's training transform, Resize(size) + CenterCrop(size) on the tensor: short side to size, long side
           floor(size * long / short); crop offset round((L - size) / 2); no clamp.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if mode not in PREPROCESS_MODES:
        raise InputError(f"unknown preprocessing '{mode}' (use one of {', '.join(PREPROCESS_MODES)})")
    x = images.float()
    h, w = x.shape[-2:]
    if mode == "hpsv2":
        scale = size / max(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))  # a side thinner than 1:448 keeps 1 pixel
        x = _resize(x, new_h, new_w)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    else:
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        x = _resize(x, *((size, new_long) if h <= w else (new_long, size)))
        top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)
        x = x[..., top: top + size, left: left + size]
    mean, std = clip_mean_std(x.device)
    return (x - mean) / std


def load_image(path):
    """(3, H, W) float32 in [0, 1] from an image file, read as `train --images` reads it (common.images.read_rgb: any
    mode made RGB, transparency on white, 16-bit scaled, upright), so that a score means the image trained on."""
    rgb = np.asarray(read_rgb(path))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
