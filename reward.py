"""Image rewards for SRPO on transformers' CLIPModel: HPSv2.1 (open_clip ViT-H-14 checkpoints), PickScore and CLIP-H
(transformers folders), the three rewards of the official SRPO script.

The HPS score is s = <img, txt> of L2-normalised features (PickScore, CLIP: times exp(logit_scale)), and SRPO's
relative reward r = c img . ((1 + k) t+ - t-), c = 1 for HPS and exp(logit_scale) / 20 for PickScore and CLIP. Read
top to bottom: the rewards and the `score` command first, then what they stand on:
- loading: open_clip checkpoints (`{'state_dict': ...}`, fp16) converted on load into a `CLIPModel`, or a converted
  safetensors file read lazily; depth and widths come from the weights' shapes, head counts from ViT-H-14's head
  widths;
- the CLIP BPE tokenizer with open_clip's text cleaning (ftfy), word split and token layout (HPS), or as
  transformers' CLIPProcessor runs it (PickScore, CLIP-H);
- differentiable preprocessing of (B, 3, H, W) images in [0, 1].
"""

import functools
import html
import os
import pickle
import re
import sys
from collections import OrderedDict
from itertools import groupby
from math import isqrt
from pathlib import Path
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

import flux_weights as fw
from util import InputError, atomic_write, check_folder, first_line, parse_device, parse_dtype, read_json, read_manifest

# transformers is imported in the functions that build its models, configs and tokenizers: importing it takes ~4 s,
# which every command, and every input error before its one line, would pay otherwise.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
VISION_HEAD_WIDTH = 80  # ViT-H-14: 1280 wide, 16 heads
TEXT_HEAD_WIDTH = 64  # ViT-H-14 text tower: 1024 wide, 16 heads
TINY = {"vision_width": 160, "vision_layers": 2, "text_width": 128, "text_layers": 2, "embed_dim": 64}
PREPROCESS_MODES = ("hpsv2", "crop")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# SRPO's control words: the training step picks POSITIVE_WORDS[i % 4] and NEGATIVE_WORDS[i % 5] (see control_words).
POSITIVE_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
NEGATIVE_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")


# ----------------------------------------------------------------------------------------------------------------------
# Rewards


def control_words(index):
    """SRPO's control words for step `index`: (POSITIVE_WORDS[index % 4], NEGATIVE_WORDS[index % 5])."""
    return POSITIVE_WORDS[index % len(POSITIVE_WORDS)], NEGATIVE_WORDS[index % len(NEGATIVE_WORDS)]


def control_caption(word, prompt):
    """The SRP caption: word + '. ' + prompt."""
    return f"{word}. {prompt}"


class HPSReward(torch.nn.Module):
    """HPSv2/2.1 on a frozen transformers `CLIPModel`: s = <img, txt>, features L2-normalised (benchmarks print 100 s).

    Images are (B, 3, H, W) tensors in [0, 1]; gradients flow to them, never to the scorer's weights. Text features
    are computed without gradient and cached per caption (LRU, `cache_size` entries).
    """

    default_preprocess = "hpsv2"

    @staticmethod
    def tokenizer_class():
        return ClipTokenizer  # open_clip's token layout, as hpsv2 tokenizes

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
    def load(cls, checkpoint, tokenizer, device="cpu", dtype=torch.float32):
        """From an HPS checkpoint (open_clip `.pt` or converted `.safetensors`) and a tokenizer or its folder."""
        if not isinstance(tokenizer, cls.tokenizer_class()):
            tokenizer = cls.tokenizer_class().from_folder(tokenizer)
        return cls(load_clip(checkpoint, device, dtype), tokenizer)

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        """A random scorer of the ViT-H-14 family (TINY widths, 2 heads per tower) with the byte-level tokenizer:
        needs no files, for the built-in demo and tests."""
        from transformers import CLIPModel  # here, not above: see the imports

        tokenizer = cls.tokenizer_class().byte_level()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPModel(clip_config(**TINY, vocab_size=tokenizer.vocab_size))
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
        """The text tower's inputs for prompts: open_clip's (B, 77) token ids, as hpsv2 scores."""
        return {"input_ids": self.tokenizer(prompts)}

    def _prompt_list(self, prompts, batch):
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise InputError(f"{len(prompts)} prompts for {batch} images")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not clean_prompt(prompt):
                raise InputError(f"empty prompt (prompt {i} is {prompt!r})")
        return prompts

    def score(self, images, prompts, preprocess_mode=None):
        """HPS score per image, s_i = <img_i, txt_i> with both L2-normalised; (B,) float32, differentiable."""
        prompts = self._prompt_list(prompts, images.shape[0])
        return (self.image_features(images, preprocess_mode) * self.text_features(prompts)).sum(-1)

    def srp_scale(self):
        """c of the SRP reward: 1 for HPS, whose official SRP_cfg takes the cosine similarities as they are."""
        return 1.0

    def relative_reward(self, images, prompts, k, positive, negative, preprocess_mode=None):
        """SRP reward r_i = c img_i . ((1 + k) t+_i - t-_i), t± = txt(word± + '. ' + prompt_i), c = srp_scale();
        (B,) float32.

        k is a float or a (B,) tensor; positive/negative are control words (see control_words; SRPO's inversion
        branch swaps them).
        """
        prompts = self._prompt_list(prompts, images.shape[0])
        t_pos = self.text_features([control_caption(positive, p) for p in prompts])
        t_neg = self.text_features([control_caption(negative, p) for p in prompts])
        if not isinstance(k, (int, float)):  # one k per image; a single k stays a Python scalar: no copy
            k = torch.as_tensor(k, dtype=torch.float32, device=self.device).reshape(-1, 1)
        return self.srp_scale() * (self.image_features(images, preprocess_mode) * ((1 + k) * t_pos - t_neg)).sum(-1)


def check_clip_folder(folder, name="PickScore"):
    """Fail early, in one line, unless folder looks like a transformers CLIPModel: config.json with model_type 'clip'
    and a weights file (the shapes are checked when it loads)."""
    folder = str(folder)
    check_folder(folder, f"a {name} model folder in transformers format: config.json + weights")
    config = read_json(os.path.join(folder, "config.json"))
    if config.get("model_type") != "clip":
        raise InputError(f"{folder}: config.json has model_type {config.get('model_type')!r}, expected 'clip' (a "
                         f"{name} model is a transformers CLIPModel)")
    if not any(os.path.isfile(os.path.join(folder, file)) for file in _HF_WEIGHTS):
        raise InputError(f"{folder}: no weights (expected one of {', '.join(_HF_WEIGHTS)})")


def tokenizer_folder(model, fallback):
    """Where a CLIP reward's tokenizer comes from: the model's folder when it holds vocab.json + merges.txt (as
    PickScore_v1's and CLIP-ViT-H-14's do), else fallback (e.g. a FLUX.1 folder, whose tokenizer/ has the same CLIP
    BPE vocabulary)."""
    own = all(os.path.isfile(os.path.join(str(model), name)) for name in ("vocab.json", "merges.txt"))
    return model if own else fallback


class PickScoreReward(HPSReward):
    """PickScore (yuvalkirstain/PickScore_v1, a transformers-format CLIP ViT-H-14): s_i = exp(logit_scale)
    <img_i, txt_i>; captions tokenized by CLIPProcessor (ProcessorTokenizer), as PickScore and the official SRPO
    script do.

    Its processor resizes the short side and centre-crops, hence "crop" preprocessing by default.
    """

    default_preprocess = "crop"

    @staticmethod
    def tokenizer_class():
        return ProcessorTokenizer
    name = "PickScore"

    @classmethod
    def load(cls, folder, tokenizer, device="cpu", dtype=torch.float32):
        """From a local `save_pretrained` folder (config.json + weights) and a tokenizer or its folder.

        Every weight of the config must be in the files with its shape (transformers would initialise a missing one
        at random); extra keys are ignored, as transformers does.
        """
        from transformers import CLIPModel  # here, not above: see the imports
        from transformers.utils import logging as hf_logging

        folder = str(folder)
        check_clip_folder(folder, cls.name)
        if not isinstance(tokenizer, cls.tokenizer_class()):
            tokenizer = cls.tokenizer_class().from_folder(tokenizer)
        verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # no missing/mismatched-key report nor progress bar: one-line errors below
        hf_logging.disable_progress_bar()
        try:
            clip, info = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
            raise InputError(f"{folder}: cannot load the CLIP model ({first_line(e)})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        problems = [*(f"missing key '{key}'" for key in sorted(info["missing_keys"])),
                    *(f"key '{key}' {tuple(theirs)} does not fit the config ({tuple(ours)})"
                      for key, theirs, ours in sorted(info["mismatched_keys"]))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(f"{folder}: {problems[0]}{more}")
        return cls(clip.to(device), tokenizer)

    def text_inputs(self, prompts):
        """CLIPProcessor's inputs (ids and attention mask, padded to the longest caption), as the official script."""
        return self.tokenizer(prompts)

    def score(self, images, prompts, preprocess_mode=None):
        """s_i = exp(logit_scale) <img_i, txt_i>, (B,) float32, differentiable in images."""
        return self.clip.logit_scale.float().exp() * super().score(images, prompts, preprocess_mode)

    def srp_scale(self):
        """c = exp(logit_scale) / 20: the official script's CLIP reward scales the SRP reward by the model's logit
        scale (100 for PickScore and CLIP-H), then divides by 20 "to make the score comparable with HPS"."""
        return self.clip.logit_scale.float().exp() / 20


class CLIPReward(PickScoreReward):
    """CLIP-ViT-H-14 (laion2B-s32B-b79K) in transformers format, the official script's third reward: the same code as
    PickScore there (its CLIP class with is_pickscore=False), so the same score and SRP reward here."""

    name = "CLIP"


# `srpo.py train --reward NAME` and `srpo.py score --NAME`
REWARDS = {"hps": HPSReward, "pickscore": PickScoreReward, "clip": CLIPReward}


# ----------------------------------------------------------------------------------------------------------------------
# The score command, and the training reward by name


def load_reward(args, cfg, device):
    """The --reward model, fp32 weights: in the demo a tiny random one built in code; else from its flag's file or
    folder, with the CLIP tokenizer of that folder (vocab.json + merges.txt) or, without one, of --flux."""
    kind = REWARDS[cfg.reward]
    if args.flux is None:
        return kind.tiny(device=device)
    path = getattr(args, cfg.reward)
    return kind.load(path, tokenizer_folder(path, args.flux), device)


def score_inputs(args):
    """(model kind, its file or folder, tokenizer folder, image paths, prompts) of `score`, every input checked
    before anything loads; --save-safetensors then converts the --hps checkpoint (None: nothing else to do)."""
    models = [name for name in REWARDS if getattr(args, name) is not None]
    if len(models) > 1:
        raise InputError("give one of --hps CKPT (HPSv2/2.1), --pickscore DIR and --clip DIR")
    if args.manifest and (args.images or args.prompt is not None):
        raise InputError("--manifest lists the images and their prompts: give it without IMAGE and --prompt")
    if args.hps and not os.path.isfile(args.hps):
        raise InputError(f"--hps {args.hps}: checkpoint not found (expected HPS_v2.1_compressed.pt or its converted "
                         f".safetensors)")
    if args.save_safetensors:
        check_conversion(args.hps, args.save_safetensors)
    paths, prompts = read_manifest(args.manifest) if args.manifest else (args.images, [args.prompt] * len(args.images))
    if not paths and not args.save_safetensors:
        raise InputError("no images to score")
    if None in prompts:
        raise InputError("--prompt is required: the prompt the images were made for (or --manifest)")
    for path in paths:  # every file checked before the model loads; read again when scored, one at a time
        load_image(path)
    if not models:
        return demo_scorer(args), None, None, paths, prompts
    model = getattr(args, models[0])
    tokenizer = check_scoring(models[0], model, args.tokenizer) if paths else None
    if args.save_safetensors:
        convert_checkpoint(args.hps, args.save_safetensors)
        print(args.save_safetensors)
        model = args.save_safetensors
    return (REWARDS[models[0]], model, tokenizer, paths, prompts) if paths else None


def check_conversion(src, dst):
    """--save-safetensors DST: an --hps checkpoint to convert, and a new file in a folder that exists."""
    if not src:
        raise InputError("--save-safetensors converts an --hps checkpoint")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise InputError(f"--save-safetensors {dst} is the --hps checkpoint itself: give another path (it would be "
                         f"overwritten by its conversion)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise InputError(f"--save-safetensors {dst}: cannot write there, no folder {folder} (make it first)")


def check_scoring(name, model, tokenizer):
    """The model folder and its tokenizer checked before the model loads. -> tokenizer folder."""
    if name != "hps":
        check_clip_folder(model, REWARDS[name].name)  # before looking for its tokenizer in it
    if tokenizer:
        check_folder(tokenizer, "a --tokenizer folder: vocab.json + merges.txt, or a FLUX.1 folder")
    tokenizer = tokenizer or tokenizer_folder(model, None)  # a PickScore/CLIP folder may hold its own
    if tokenizer is None:
        raise InputError("--tokenizer DIR is required (vocab.json + merges.txt, or a FLUX.1 folder; a --pickscore or "
                         "--clip folder that holds them needs none)")
    return tokenizer


def demo_scorer(args):
    """No model flag: the tiny random HPS scorer that the built-in demo trains with (its eval.jsonl's scores), to
    try `score` on the demo's images; said on stderr, since its scores mean nothing for real images."""
    if args.tokenizer:
        raise InputError("--tokenizer goes with --hps, --pickscore or --clip (the tiny demo scorer has its own)")
    print("note: no --hps, --pickscore or --clip: scoring with the tiny random HPS scorer of the built-in demo "
          "(`srpo.py train` without --flux), whose scores say nothing about real images", file=sys.stderr)
    return HPSReward


@torch.no_grad()
def cmd_score(args):
    """Print one score per image (score, tab, path): the HPS score <img, txt> of L2-normalised CLIP features
    (PickScore, CLIP: times exp(logit_scale)); with --relative POS NEG, SRPO's reward
    c img . ((1 + k) txt('POS. prompt') - txt('NEG. prompt')), c = 1 for HPS and exp(logit_scale) / 20 for
    PickScore and CLIP, as the official script trains with them."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or "float32", device)  # 6 decimals: fp32
    inputs = score_inputs(args)
    if inputs is None:  # --save-safetensors alone: converted, nothing to score
        return
    kind, model, tokenizer, paths, prompts = inputs
    scorer = kind.tiny(device=device, dtype=dtype) if model is None else kind.load(model, tokenizer, device, dtype)
    values = []
    for path, prompt in zip(paths, prompts, strict=True):  # one at a time: sizes may differ, thousands may come
        image = load_image(path)
        if args.relative:
            value = scorer.relative_reward(image[None], prompt, args.k, *args.relative, args.preprocess)
        else:
            value = scorer.score(image[None], prompt, args.preprocess)
        values.append(value.item())
        print(f"{values[-1]:.6f}\t{path}")
    if args.manifest:
        print(f"{sum(values) / len(values):.6f}\tmean of {len(values)} images")


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
    """(3, H, W) float32 in [0, 1] from an image file; any mode (RGBA, L, P, CMYK) converted to RGB as hpsv2 does."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read image ({first_line(e)})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _byte_symbols():
    """CLIP/GPT-2 byte-level alphabet: byte b -> a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def clean_prompt(text):
    """open_clip's 'lower' cleaning (basic_clean, whitespace_clean, lower): ftfy.fix_text, html.unescape twice,
    whitespace collapsed and stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


# open_clip's split of cleaned text into BPE words, run as open_clip runs it (the `regex` module, IGNORECASE). Its
# special tokens are spelled <start_of_text> and <end_of_text>: text that spells them gets their ids.
_SPECIAL_WORDS = ("<start_of_text>", "<end_of_text>")
_PIECES = regex.compile("|".join(_SPECIAL_WORDS) + r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)


class ClipTokenizer:
    """CLIP BPE tokens laid out as open_clip does: [start] bpe(clean(text))[:75] [end] 0 ... 0, 77 long.

    Cleaning (clean_prompt, ftfy included), the split into words (_PIECES) and the layout are open_clip's, in Python;
    transformers' `CLIPTokenizer` (tokenizers backend, its normalizer and pre-split switched off) runs the byte-level
    BPE of each word, so the ids are open_clip's (tests/test_reward.py: every PartiPrompt, mojibake, HTML entities,
    controls, ligatures, emoji, whitespace, over-long text). As in open_clip, text spelling its special tokens,
    '<start_of_text>' or '<end_of_text>', gets their ids, and '<|endoftext|>' is plain text.
    """

    open_clip_text = True  # clean and split text as open_clip (ProcessorTokenizer: as transformers' tokenizer)

    def __init__(self, vocab, merges, context_length=CONTEXT_LENGTH):
        from transformers import CLIPTokenizer  # here, not above: see the imports

        missing = [t for t in ("<|startoftext|>", "<|endoftext|>") if t not in vocab]
        if missing:
            raise InputError(f"tokenizer vocabulary lacks {missing[0]}")
        self.start_id, self.end_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.bpe = CLIPTokenizer(vocab=vocab, merges=merges)
        if self.open_clip_text:
            # Its normalizer (NFC, whitespace, lower case) and pre-split give way to clean_prompt and _PIECES: its NFC
            # would run after clean_prompt's html.unescape, where open_clip has none, and its Rust regex splits some
            # text unlike open_clip's `regex` (no IGNORECASE, which lets 's match 'ſ; other Unicode tables).
            self.bpe.backend_tokenizer.normalizer = None
            self.bpe.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """From CLIPTokenizer's vocab.json and merges.txt ('#version' header, then one 'a b' merge per line)."""
        for path in (vocab_path, merges_path):
            if not Path(path).is_file():
                raise InputError(f"tokenizer file not found: {path}")
        vocab = read_json(vocab_path)
        if not all(isinstance(i, int) for i in vocab.values()):
            raise InputError(f"{vocab_path}: not a vocabulary (expected integer token ids)")
        try:
            lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{merges_path}: cannot read the merges as UTF-8 text ({first_line(e)})") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise InputError(f"{merges_path}: each merge line must hold two symbols")
        return cls(vocab, merges)

    @classmethod
    def from_folder(cls, folder):
        """From a folder with vocab.json + merges.txt, or a FLUX.1 folder whose tokenizer/ holds them."""
        folder = Path(folder)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer" / "vocab.json").is_file():
            folder = folder / "tokenizer"
        if not folder.is_dir():
            raise InputError(f"tokenizer folder not found: {folder}")
        return cls.from_files(folder / "vocab.json", folder / "merges.txt")

    @classmethod
    def byte_level(cls):
        """Offline fallback with no files (the built-in demo): id = byte value, 256 + byte for a word's last byte,
        then start 512 and end 513; no merges, so one token per byte. Not CLIP's vocabulary: for tiny random scorers."""
        symbols = _byte_symbols()
        tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
        return cls({t: i for i, t in enumerate(tokens)}, [])

    def __call__(self, prompts):
        """(B, 77) int64 token ids; an empty prompt is an InputError."""
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)  # pad id 0, as open_clip
        special = dict(zip(_SPECIAL_WORDS, (self.start_id, self.end_id), strict=True)).get
        for row, text in enumerate(prompts):
            cleaned = clean_prompt(text)
            if not cleaned:
                raise InputError(f"empty prompt: {text!r}")
            bpe = []
            for special_id, group in groupby(_PIECES.findall(cleaned), key=special):
                words = list(group)
                bpe += ([special_id] * len(words) if special_id is not None else
                        self.bpe(words, is_split_into_words=True, add_special_tokens=False,
                                 split_special_tokens=True)["input_ids"])
            tokens = [self.start_id, *bpe[: self.context_length - 2], self.end_id]  # truncation keeps the end token
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


class ProcessorTokenizer(ClipTokenizer):
    """Captions as transformers' CLIPProcessor tokenizes them with padding=True, truncation=True, max_length=77: what
    PickScore and the official SRPO script's CLIP reward (PickScore, CLIP-H) feed their models. transformers'
    `CLIPTokenizer` runs whole: its normalizer (NFC, whitespace collapsed, lower case; no ftfy, no HTML unescaping)
    and word split, then [start] bpe[:75] [end], padded with the end token to the longest caption of the batch, the
    attention mask marking the padding. The same vocab.json + merges.txt as ClipTokenizer."""

    open_clip_text = False

    def __call__(self, prompts):
        """{'input_ids', 'attention_mask'}: (B, L) int64, L <= 77 the longest caption's length."""
        for text in prompts:
            if not text.strip():
                raise InputError(f"empty prompt: {text!r}")
        tokens = self.bpe(list(prompts), padding=True, truncation=True, max_length=self.context_length,
                          return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


# ----------------------------------------------------------------------------------------------------------------------
# CLIP config of the ViT-H-14 family


def clip_config(vision_width, vision_layers, text_width, text_layers, embed_dim, *, vision_mlp=None, text_mlp=None,
                vocab_size=49408, context_length=CONTEXT_LENGTH, image_size=224, patch_size=14,
                vision_head_width=VISION_HEAD_WIDTH, text_head_width=TEXT_HEAD_WIDTH):
    """A `CLIPConfig` laid out like open_clip's ViT-H-14: exact GELU, LayerNorm eps 1e-5, MLP 4x by default.

    The end token is the last id of the vocabulary and the start token the one before it (true of CLIP's BPE vocab,
    49406/49407, and of the byte-level fallback); transformers pools text features at the first end token.
    """
    from transformers import CLIPConfig  # here, not above: see the imports

    for name, width, head_width in (("vision", vision_width, vision_head_width), ("text", text_width, text_head_width)):
        if width % head_width:
            raise InputError(f"{name} width {width} is not a multiple of the ViT-H-14 head width {head_width}")
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": embed_dim}
    text = dict(common, vocab_size=vocab_size, hidden_size=text_width, intermediate_size=text_mlp or 4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_width // text_head_width,
                max_position_embeddings=context_length, pad_token_id=0, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1)
    vision = dict(common, hidden_size=vision_width, intermediate_size=vision_mlp or 4 * vision_width,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_width // vision_head_width,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------------------------
# open_clip checkpoint -> transformers CLIPModel weights

_TOP_LEVEL = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj", "attn.in_proj": "self_attn.in_proj"}
_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
_TRANSPOSED = ("visual.proj", "text_projection")  # open_clip applies them as x @ P, nn.Linear as x @ W.T


def _hf_name(key):
    """transformers name of an open_clip key (q/k/v still fused as `self_attn.in_proj.*`), None if unknown."""
    m = _BLOCK_KEY.fullmatch(key)
    if m is None:
        return _TOP_LEVEL.get(key)
    tower = "vision_model" if m[1] else "text_model"
    module = _BLOCK.get(m[3])
    return module and f"{tower}.encoder.layers.{m[2]}.{module}.{m[4]}"


class Piece(NamedTuple):
    """Where one `CLIPModel` tensor lies in a checkpoint: rows `rows` of tensor `source`, transposed or not."""

    source: str  # the checkpoint's key
    rows: slice | None  # q, k or v: a third of open_clip's fused in_proj (first dim)
    transposed: bool  # open_clip's x @ P projections, nn.Linear's x @ W.T
    shape: tuple  # the `CLIPModel` tensor's shape
    origin: str  # "'source key' (its shape)", for error messages


def _describe(key, shape):
    return f"'{key}' {tuple(shape)}"


def open_clip_to_hf(shapes):
    """{`CLIPModel` key: Piece} for an open_clip CLIP checkpoint's {key: shape}: keys renamed, `in_proj` split into q,
    k, v (thirds of its rows), the two projections transposed; open_clip's unused `attn_mask` buffer dropped."""
    pieces = {}
    for key, shape in shapes.items():
        if key == "attn_mask":  # the causal mask buffer some open_clip versions saved; transformers builds its own
            continue
        name, origin = _hf_name(key), _describe(key, shape)
        if name is None:
            raise InputError(f"unexpected key {origin}: not an open_clip ViT-H-14 CLIP checkpoint")
        transposed = key in _TRANSPOSED and len(shape) == 2
        if ".in_proj." not in name:
            pieces[name] = Piece(key, None, transposed, tuple(reversed(shape)) if transposed else tuple(shape), origin)
            continue
        if not shape or shape[0] % 3:  # open_clip fuses q, k, v along the output dim: in_proj_weight is (3W, W)
            raise InputError(f"key {origin}: a fused q, k, v projection needs a first dimension divisible by 3")
        n = shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            pieces[name.replace("in_proj", part)] = Piece(key, slice(i * n, (i + 1) * n), False, (n, *shape[1:]),
                                                          origin)
    return pieces


def _torch_load(path):
    """Tensors of a torch checkpoint, memory-mapped (no copy in RAM), refusing pickled code (weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise InputError(f"{path}: not a torch checkpoint ({first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it pickles {found[1]}" if found else "pickled objects"
        raise InputError(f"{path}: torch.load(weights_only=True) refused it ({why}); save a plain state_dict") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a torch checkpoint ({first_line(e)})") from None
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if (not isinstance(state_dict, dict) or not state_dict
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise InputError(f"{path}: expected a state_dict of tensors or a dict with one under 'state_dict'")
    return state_dict


def read_clip_weights(path):
    """(pieces, fetch) for an open_clip `.pt`/`.bin` or a `.safetensors` file, either key naming (open_clip keys are
    converted): pieces is {`CLIPModel` key: Piece}, known from the file's header or its memory map before any weight
    is read; fetch(piece) -> that CPU tensor, in the file's dtype.

    Torch checkpoints are memory-mapped (fetch gives views of the map); safetensors files are read lazily, one
    tensor per fetch (q, k and v each read only their rows).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a checkpoint")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        handle = fw.open_safetensors(str(path))
        shapes = {key: fw.shape_of(handle, key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)

        def read(key, rows):
            try:
                return handle.get_slice(key)[rows] if rows is not None else handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise InputError(f"{path}: cannot read '{key}' ({first_line(e)})") from None
    else:
        state_dict = _torch_load(path)
        shapes = {key: tuple(t.shape) for key, t in state_dict.items()}

        def read(key, rows):
            return state_dict[key] if rows is None else state_dict[key][rows]

    if any(key.startswith(("vision_model.", "text_model.")) for key in shapes):
        pieces = {key: Piece(key, None, False, shape, _describe(key, shape)) for key, shape in shapes.items()}
    else:
        pieces = open_clip_to_hf(shapes)

    def fetch(piece):
        tensor = read(piece.source, piece.rows)
        return tensor.T if piece.transposed else tensor

    return pieces, fetch


def _layer_count(pieces, tower):
    indices = {int(m[1]) for key in pieces if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def config_from_weights(pieces):
    """Infer the ViT-H-14-family `CLIPConfig` (depths, widths, patch, image size, vocab) from the pieces' shapes."""
    def shape(key, ndim=2):
        if key not in pieces:
            raise InputError(f"missing key '{key}': not a CLIP ViT checkpoint")
        if len(pieces[key].shape) != ndim:
            raise InputError(f"key {pieces[key].origin}: expected {ndim} dimensions for {key}")
        return pieces[key].shape

    patch_key = "vision_model.embeddings.patch_embedding.weight"
    token_key = "text_model.embeddings.token_embedding.weight"
    vision_width, _, patch_size, _ = shape(patch_key, 4)
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = isqrt(max(positions - 1, 0))  # positions = grid^2 + 1 (the class token)
    vocab_size, text_width = shape(token_key)
    try:
        return clip_config(
            vision_width, _layer_count(pieces, "vision_model"), text_width, _layer_count(pieces, "text_model"),
            shape("visual_projection.weight")[0],
            vision_mlp=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
            text_mlp=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
            vocab_size=vocab_size, context_length=shape("text_model.embeddings.position_embedding.weight")[0],
            image_size=grid * patch_size, patch_size=patch_size)
    except InputError as e:  # a width that is no multiple of ViT-H-14's head width
        raise InputError(f"{e} (widths from keys {pieces[patch_key].origin} and {pieces[token_key].origin})") from None


def _meta_clip(pieces):
    """A shape-only `CLIPModel` for the inferred config, after checking every key and shape of `pieces` against it."""
    from transformers import CLIPModel  # here, not above: see the imports

    with torch.device("meta"):
        model = CLIPModel(config_from_weights(pieces))
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, want in expected.items():
        if key not in pieces:
            raise InputError(f"missing key '{key}' {want} for the inferred ViT-H-14-family config")
        if pieces[key].shape != want:
            raise InputError(f"key {pieces[key].origin} does not fit the ViT-H-14-family config inferred from the "
                             f"other keys ({key} needs {want})")
    extra = next((key for key in pieces if key not in expected), None)
    if extra:
        raise InputError(f"unexpected key {pieces[extra].origin} for the inferred ViT-H-14-family config")
    return model


def load_clip(path, device="cpu", dtype=torch.float32):
    """Frozen `CLIPModel` from an open_clip checkpoint or a converted safetensors file.

    Keys and shapes are checked, and the model built on the meta device, before any weight is read; then the weights
    are read one tensor at a time, cast and moved, so no second full copy exists: torch checkpoints are
    memory-mapped (with a matching dtype on the CPU the weights stay views of the mapped file), safetensors files are
    read tensor by tensor.
    """
    pieces, fetch = read_clip_weights(path)
    model = _meta_clip(pieces)
    tensors = {key: fetch(piece).to(device=device, dtype=dtype).contiguous() for key, piece in pieces.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    for embeddings in (model.vision_model.embeddings, model.text_model.embeddings):
        # position_ids is a non-persistent buffer, absent from the checkpoint and still on the meta device
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
    return model.eval().requires_grad_(False)


def convert_checkpoint(src, dst):
    """Write an open_clip checkpoint as a safetensors file in `CLIPModel` key names, same dtype (fp16 for HPS).

    One-time step: later loads read it without pickle or key mapping. Checked against the inferred config first;
    written atomically (a temporary file renamed over `dst`), so `dst` is never left half written.
    """
    dst = Path(dst)
    if dst.is_dir():
        raise InputError(f"{dst}: is a folder, not a file to write")
    pieces, fetch = read_clip_weights(src)
    _meta_clip(pieces)
    tensors = {key: fetch(piece).contiguous() for key, piece in pieces.items()}
    try:
        atomic_write(str(dst), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{dst}: cannot write ({first_line(e)})") from None
