"""Image rewards for SRPO on transformers' CLIPModel: HPSv2.1 (open_clip ViT-H-14 checkpoints) and PickScore.

Everything the training loop needs from a reward lives here:
- loading: open_clip checkpoints (`{'state_dict': ...}`, fp16) converted on load into a `CLIPModel`, or a converted
  safetensors file; depth and widths come from the weights' shapes, head counts from ViT-H-14's head widths;
- the CLIP BPE tokenizer with open_clip's text cleaning and token layout;
- differentiable preprocessing of (B, 3, H, W) images in [0, 1];
- the HPS score s = <img, txt> of L2-normalised features and SRPO's relative reward r = img . ((1 + k) t+ - t-).
"""

import html
import json
import pickle
import re
import unicodedata
from collections import OrderedDict
from math import isqrt
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from flux_model import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
VISION_HEAD_WIDTH = 80  # ViT-H-14: 1280 wide, 16 heads
TEXT_HEAD_WIDTH = 64  # ViT-H-14 text tower: 1024 wide, 16 heads
VIT_H_14 = {"vision_width": 1280, "vision_layers": 32, "text_width": 1024, "text_layers": 24, "embed_dim": 1024}
TINY = {"vision_width": 160, "vision_layers": 2, "text_width": 128, "text_layers": 2, "embed_dim": 64}
PREPROCESS_MODES = ("hpsv2", "crop")

# SRPO's control words: the training step picks POSITIVE_WORDS[i % 4] and NEGATIVE_WORDS[i % 5] (see control_words).
POSITIVE_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
NEGATIVE_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")


# ----------------------------------------------------------------------------------------------------------------------
# CLIP config of the ViT-H-14 family


def clip_config(vision_width, vision_layers, text_width, text_layers, embed_dim, *, vision_mlp=None, text_mlp=None,
                vocab_size=49408, context_length=CONTEXT_LENGTH, image_size=224, patch_size=14,
                vision_head_width=VISION_HEAD_WIDTH, text_head_width=TEXT_HEAD_WIDTH):
    """A `CLIPConfig` laid out like open_clip's ViT-H-14: exact GELU, LayerNorm eps 1e-5, MLP 4x by default.

    The end token is the last id of the vocabulary and the start token the one before it (true of CLIP's BPE vocab,
    49406/49407, and of the byte-level fallback); transformers pools text features at the first end token.
    """
    for name, width, head_width in (("vision", vision_width, vision_head_width), ("text", text_width, text_head_width)):
        if width % head_width:
            raise InputError(f"{name} width {width} is not a multiple of the head width {head_width}")
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


def open_clip_to_hf(state_dict):
    """Rename open_clip CLIP keys to `CLIPModel` keys: split `in_proj` into q, k, v, transpose the two projections.

    Consumes `state_dict` (pops each key) so the source can be freed while the result grows. The results are views of
    the source tensors (no copy). Returns (weights, origin): origin maps each new key to "'open_clip key' (shape)"
    for error messages.
    """
    weights, origin = {}, {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        if key == "attn_mask":  # the causal mask buffer some open_clip versions saved; transformers builds its own
            continue
        name, source = _hf_name(key), _describe(key, tensor)
        if name is None:
            raise InputError(f"unexpected key {source}: not an open_clip ViT-H-14 CLIP checkpoint")
        if key in _TRANSPOSED and tensor.ndim == 2:
            tensor = tensor.T
        pieces = {name: tensor}
        if ".in_proj." in name:  # open_clip fuses q, k, v along the output dim: in_proj_weight is (3W, W)
            pieces = dict(zip((name.replace("in_proj", p) for p in ("q_proj", "k_proj", "v_proj")), tensor.chunk(3),
                              strict=False))
        weights |= pieces
        origin |= dict.fromkeys(pieces, source)
    return weights, origin


def _describe(key, tensor):
    return f"'{key}' {tuple(tensor.shape)}"


def _torch_load(path):
    """Tensors of a torch checkpoint, memory-mapped (no copy in RAM), refusing pickled code (weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise InputError(f"{path}: not a torch checkpoint ({_first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it pickles {found[1]}" if found else "pickled objects"
        raise InputError(f"{path}: torch.load(weights_only=True) refused it ({why}); save a plain state_dict") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a torch checkpoint ({_first_line(e)})") from None
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(f"{path}: expected a state_dict of tensors or a dict with one under 'state_dict'")
    return state_dict


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_clip_weights(path):
    """(weights, origin) in `CLIPModel` key names from an open_clip `.pt`/`.bin` or a `.safetensors` file.

    A `.safetensors` file may hold either naming (open_clip keys are converted); origin describes each key's source.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a safetensors file ({_first_line(e)})") from None
    else:
        state_dict = _torch_load(path)
    if any(key.startswith(("vision_model.", "text_model.")) for key in state_dict):
        return state_dict, {key: _describe(key, t) for key, t in state_dict.items()}
    return open_clip_to_hf(state_dict)


def _layer_count(weights, tower):
    indices = {int(m[1]) for key in weights if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def config_from_weights(weights, origin):
    """Infer the ViT-H-14-family `CLIPConfig` (depths, widths, patch, image size, vocab) from weight shapes."""
    def shape(key):
        if key not in weights:
            raise InputError(f"missing key '{key}': not a CLIP ViT checkpoint")
        return tuple(weights[key].shape)

    patch_key = "vision_model.embeddings.patch_embedding.weight"
    vision_width, _, patch_size, _ = shape(patch_key)
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = isqrt(max(positions - 1, 0))  # positions = grid^2 + 1 (the class token)
    token_key = "text_model.embeddings.token_embedding.weight"
    vocab_size, text_width = shape(token_key)
    for name, width, head_width, key in (("vision", vision_width, VISION_HEAD_WIDTH, patch_key),
                                         ("text", text_width, TEXT_HEAD_WIDTH, token_key)):
        if width % head_width:
            raise InputError(f"key {origin[key]}: {name} width {width} is not a multiple of ViT-H-14's head "
                             f"width {head_width}")
    return clip_config(
        vision_width, _layer_count(weights, "vision_model"), text_width, _layer_count(weights, "text_model"),
        shape("visual_projection.weight")[0],
        vision_mlp=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        text_mlp=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        vocab_size=vocab_size, context_length=shape("text_model.embeddings.position_embedding.weight")[0],
        image_size=grid * patch_size, patch_size=patch_size)


def _meta_clip(weights, origin):
    """A shape-only `CLIPModel` for the inferred config, after checking every key and shape of `weights` against it."""
    with torch.device("meta"):
        model = CLIPModel(config_from_weights(weights, origin))
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, want in expected.items():
        if key not in weights:
            raise InputError(f"missing key '{key}' {want} for the inferred ViT-H-14-family config")
        if tuple(weights[key].shape) != want:
            raise InputError(f"key {origin[key]} does not fit the ViT-H-14-family config inferred from the other "
                             f"keys ({key} needs {want})")
    extra = next((key for key in weights if key not in expected), None)
    if extra:
        raise InputError(f"unexpected key {origin[extra]} for the inferred ViT-H-14-family config")
    return model


def load_clip(path, device="cpu", dtype=torch.float32):
    """Frozen `CLIPModel` from an open_clip checkpoint or a converted safetensors file.

    The model is built on the meta device and the checkpoint's tensors are moved in one at a time (popped from the
    source dict), so no second full copy exists: torch checkpoints are memory-mapped, and with a matching dtype on the
    CPU the weights stay views of the mapped file.
    """
    weights, origin = read_clip_weights(path)
    model = _meta_clip(weights, origin)
    tensors = {key: weights.pop(key).to(device=device, dtype=dtype).contiguous() for key in list(weights)}
    model.load_state_dict(tensors, strict=True, assign=True)
    for embeddings in (model.vision_model.embeddings, model.text_model.embeddings):
        # position_ids is a non-persistent buffer, absent from the checkpoint and still on the meta device
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
    return model.eval().requires_grad_(False)


def convert_checkpoint(src, dst):
    """Write an open_clip checkpoint as a safetensors file in `CLIPModel` key names, same dtype (fp16 for HPS).

    One-time step: later loads read it without pickle or key mapping. Checked against the inferred config first.
    """
    weights, origin = read_clip_weights(src)
    _meta_clip(weights, origin)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: weights.pop(key).contiguous() for key in list(weights)}, dst, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _byte_symbols():
    """CLIP/GPT-2 byte-level alphabet: byte b -> a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


# The part of ftfy.fix_text that matters for prompts and needs no heuristics: curly quotes, fullwidth forms and
# latin ligatures. Mojibake repair, terminal escapes and C1 controls are not reproduced (ftfy is not a runtime dep).
_QUOTES = dict.fromkeys("ʼ‘’‚‛", "'") | dict.fromkeys("“”„‟", '"')
_WIDE = {chr(c): unicodedata.normalize("NFKC", chr(c)) for c in [0x3000, *range(0xFF01, 0xFFF0)]}
_LIGATURES = {"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬆ": "st", "Ĳ": "IJ", "ĳ": "ij"}
_FTFY_LITE = str.maketrans(_QUOTES | {k: v for k, v in _WIDE.items() if v != k} | _LIGATURES)


def clean_prompt(text):
    """open_clip's 'lower' cleaning: ftfy, html.unescape twice, whitespace collapsed, lower case.

    ftfy itself unescapes HTML once more when the text has no '<' (its unescape_html="auto"); of ftfy's other fixes
    only quotes, character width and ligatures are applied (see _FTFY_LITE). NFC comes from the tokenizer.
    """
    if "<" not in text:
        text = html.unescape(text)
    text = html.unescape(html.unescape(text.translate(_FTFY_LITE)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE tokens laid out as open_clip does: [start] bpe(clean(text))[:75] [end] 0 ... 0, 77 long.

    BPE runs in transformers' `CLIPTokenizer` (tokenizers backend); cleaning and layout are ours. Text that spells a
    special token ("<|endoftext|>") is tokenized as plain text.
    """

    def __init__(self, vocab, merges, context_length=CONTEXT_LENGTH):
        missing = [t for t in ("<|startoftext|>", "<|endoftext|>") if t not in vocab]
        if missing:
            raise InputError(f"tokenizer vocabulary lacks {missing[0]}")
        self.start_id, self.end_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.bpe = CLIPTokenizer(vocab=vocab, merges=merges)

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """From CLIPTokenizer's vocab.json and merges.txt ('#version' header, then one 'a b' merge per line)."""
        for path in (vocab_path, merges_path):
            if not Path(path).is_file():
                raise InputError(f"tokenizer file not found: {path}")
        try:
            vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{vocab_path}: not a JSON vocabulary ({e})") from None
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
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
        for row, text in enumerate(prompts):
            cleaned = clean_prompt(text)
            if not cleaned:
                raise InputError(f"empty prompt: {text!r}")
            bpe = self.bpe(cleaned, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            tokens = [self.start_id, *bpe[: self.context_length - 2], self.end_id]  # truncation keeps the end token
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


# ----------------------------------------------------------------------------------------------------------------------
# Differentiable preprocessing


def _resize(x, height, width):
    """Bicubic with antialias (a = -0.5, PIL's kernel), as torchvision resizes tensors; identity at the same size."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def preprocess(images, size=224, mode="hpsv2"):
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised with the CLIP mean/std; differentiable, in float32.

    hpsv2: s = size / max(H, W); resize to (round(H s), round(W s)) as PIL does for hpsv2: width pass, clamp to
           [0, 1], height pass, clamp (PIL stores each pass in 8 bits); zero-pad to size x size, left/top getting
           floor(pad / 2). Matches hpsv2 on 8-bit images to about one grey level (PIL's rounding).
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
        new_h, new_w = round(h * scale), round(w * scale)
        x = _resize(_resize(x, h, new_w).clamp(0, 1), new_h, new_w).clamp(0, 1)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    else:
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        x = _resize(x, *((size, new_long) if h <= w else (new_long, size)))
        top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)
        x = x[..., top: top + size, left: left + size]
    mean = x.new_tensor(CLIP_MEAN).view(3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def load_image(path):
    """(3, H, W) float32 in [0, 1] from an image file; any mode (RGBA, L, P, CMYK) converted to RGB as hpsv2 does."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read image ({_first_line(e)})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


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
        if not isinstance(tokenizer, ClipTokenizer):
            tokenizer = ClipTokenizer.from_folder(tokenizer)
        return cls(load_clip(checkpoint, device, dtype), tokenizer)

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        """A random scorer of the ViT-H-14 family (TINY widths, 2 heads per tower) with the byte-level tokenizer:
        needs no files, for the built-in demo and tests."""
        tokenizer = ClipTokenizer.byte_level()
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
            pooled = self.clip.text_model(input_ids=self.tokenizer(missing).to(self.device)).pooler_output
            features = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, features, strict=True))
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        features = torch.stack([self._text_cache[p] for p in prompts]).to(self.device)
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return features

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

    def relative_reward(self, images, prompts, k, positive, negative, preprocess_mode=None):
        """SRP reward r_i = img_i . ((1 + k) t+_i - t-_i), t± = txt(word± + '. ' + prompt_i); (B,) float32.

        k is a float or a (B,) tensor; positive/negative are control words (see control_words; SRPO's inversion
        branch swaps them).
        """
        prompts = self._prompt_list(prompts, images.shape[0])
        t_pos = self.text_features([control_caption(positive, p) for p in prompts])
        t_neg = self.text_features([control_caption(negative, p) for p in prompts])
        k = torch.as_tensor(k, dtype=torch.float32, device=self.device).reshape(-1, 1)
        return (self.image_features(images, preprocess_mode) * ((1 + k) * t_pos - t_neg)).sum(-1)


class PickScoreReward(HPSReward):
    """PickScore (a transformers-format CLIP ViT-H-14): s_i = exp(logit_scale) <img_i, txt_i>.

    Its processor resizes the short side and centre-crops, hence "crop" preprocessing by default.
    """

    default_preprocess = "crop"

    @classmethod
    def load(cls, folder, tokenizer, device="cpu", dtype=torch.float32):
        """From a local `save_pretrained` folder (config.json + weights) and a tokenizer or its folder."""
        if not (Path(folder) / "config.json").is_file():
            raise InputError(f"PickScore folder with config.json not found: {folder}")
        if not isinstance(tokenizer, ClipTokenizer):
            tokenizer = ClipTokenizer.from_folder(tokenizer)
        clip = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
        return cls(clip, tokenizer)

    def score(self, images, prompts, preprocess_mode=None):
        """s_i = exp(logit_scale) <img_i, txt_i>, (B,) float32, differentiable in images."""
        return self.clip.logit_scale.float().exp() * super().score(images, prompts, preprocess_mode)
