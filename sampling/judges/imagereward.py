"""The ImageReward judge (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation") on transformers' BLIP, scoring as the image-reward package's `ImageReward.score(prompt, image)` does:

    s = (head(BERT(tokens(prompt), cross-attending to ViT(pixels))[0]) - MEAN) / STD

ViT: BLIP's ViT-L/16 (a `BlipVisionModel`), every output token (after its last LayerNorm) is a key of the
cross-attention. BERT: BLIP's text encoder with cross-attention in every layer (a `BlipTextModel`, bidirectional).
tokens(prompt): bert-base-uncased WordPiece with [DEC] and [ENC] added as BLIP's init_tokenizer adds them, padded and
truncated to 35 tokens; the first stays [CLS] (the package's score does not put [ENC] there, as BLIP's ITM head does).
head: five Linears 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation between them (the package's MLP, its
ReLUs commented out, its Dropouts off in eval), in float32 on the float32 [CLS] output. MEAN and STD are the
package's constants. pixels: the package's Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std, done on
tensors as PIL does them on 8-bit images.

The path is a folder:
    ImageReward.pt         THUDM/ImageReward's checkpoint (or ImageReward.safetensors, its converted form:
                           weights/blip_weights.convert_checkpoint; the .safetensors is read when both are there)
    med_config.json        THUDM/ImageReward's, the text tower's sizes
    vocab.txt              bert-base-uncased's vocabulary (THUDM/ImageReward has none: copy it in)
The weights' I/O and key names are weights/blip_weights.py's.
"""

import os

import torch

from common.util import InputError, check_folder, quiet_transformers
from sampling.judges.parts import ScoreHead, clip_pixels
from weights import blip_weights

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.mean, ImageReward.std
TEXT_LENGTH = 35  # the package tokenizes with padding="max_length", truncation=True, max_length=35
WEIGHT_FILES = ("ImageReward.safetensors", "ImageReward.pt")
MED_CONFIG, VOCAB = "med_config.json", "vocab.txt"
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_VISION = {"width": 128, "layers": 2, "mlp": 256, "image_size": 224, "patch_size": 16}
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": TEXT_LENGTH}


def read_vocab(path):
    """{token: id} of a BERT vocab.txt: one token a line, the id its line number (as transformers reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    missing = [token for token in BERT_SPECIAL if token not in vocab]
    if missing:
        raise InputError(f"{path}: no {missing[0]} token: not a BERT vocabulary (expected bert-base-uncased's)")
    return vocab


def bert_tokenizer(vocab):
    """BLIP's tokenizer (init_tokenizer) on a {token: id} vocabulary: uncased BERT WordPiece, then bos [DEC] and the
    additional special token [ENC] added, in that order (ids len(vocab) and len(vocab) + 1)."""
    from transformers import BertTokenizer  # ~4 s to import: only where a judge is built

    with quiet_transformers():
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tiny_vocab():
    """A BERT-style vocabulary made in code for the tiny judge: the special tokens, digits, letters and their
    word-piece continuations, punctuation."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [*BERT_SPECIAL, *"0123456789", *letters, *(f"##{c}" for c in letters), *".,;:!?'\"()-"]
    return {token: i for i, token in enumerate(tokens)}


def weights_file(folder):
    """The folder's checkpoint: ImageReward.safetensors if it is there, else ImageReward.pt."""
    found = [os.path.join(folder, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise InputError(f"{folder}: no {' or '.join(WEIGHT_FILES)} (expected THUDM/ImageReward's checkpoint)")
    return found[0]


class ImageRewardJudge(torch.nn.Module):
    """ImageReward as a judge: `vision` (BlipVisionModel), `text` (BlipTextModel with cross-attention), `head`
    (float32 Linears) and BLIP's BERT tokenizer; frozen, in eval mode."""

    name, title, metavar = "imagereward", "ImageReward", "DIR"
    path_help = ("ImageReward (THUDM/ImageReward): a folder with ImageReward.pt (or its converted .safetensors), "
                 "med_config.json and bert-base-uncased's vocab.txt")

    def __init__(self, vision_config, text_config, tokenizer):
        from transformers import BlipTextModel, BlipVisionModel  # ~4 s to import: only where a judge is built

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = ScoreHead(text_config.hidden_size, linear_at=(0, 1, 2, 3, 4))
        self.tokenizer = tokenizer

    @classmethod
    def check_path(cls, path):
        """One-line InputError unless path is a folder with the checkpoint, med_config.json and vocab.txt."""
        path = str(path)
        check_folder(path, f"an ImageReward folder: {WEIGHT_FILES[1]} (or .safetensors), {MED_CONFIG}, {VOCAB}")
        weights_file(path)
        for name, what in ((MED_CONFIG, "THUDM/ImageReward's text config"), (VOCAB, "bert-base-uncased's vocab")):
            if not os.path.isfile(os.path.join(path, name)):
                raise InputError(f"{path}: no {name} (expected {what})")

    @classmethod
    def load(cls, path, tokenizer=None, device="cpu", dtype=torch.float32):
        """From an ImageReward folder (check_path). tokenizer is not used: the folder's vocab.txt is the vocabulary
        (the other judges' fallback tokenizer, a CLIP one, is no BERT vocabulary). Keys and shapes are checked on
        the meta device before any weight is read; the head stays float32, the towers get dtype."""
        path = str(path)
        cls.check_path(path)
        checkpoint = blip_weights.read_checkpoint(weights_file(path))
        vision = blip_weights.vision_config(checkpoint)
        text = blip_weights.text_config(os.path.join(path, MED_CONFIG), vision.hidden_size, TEXT_LENGTH)
        bert = bert_tokenizer(read_vocab(os.path.join(path, VOCAB)))
        if len(bert) != text.vocab_size:
            raise InputError(f"{path}: {VOCAB} has {len(bert) - 2} tokens, {len(bert)} with [DEC] and [ENC], but "
                             f"{MED_CONFIG} has vocab_size {text.vocab_size}")
        with torch.device("meta"):
            judge = cls(vision, text, bert)
        expected = {key: tuple(t.shape) for key, t in judge.state_dict().items()}
        blip_weights.check_keys(checkpoint, expected, f"the model its other keys and {MED_CONFIG} describe")
        tensors = {key: checkpoint.read(key).to(device=device, dtype=torch.float32 if key.startswith("head.")
                                                 else dtype) for key in expected}
        judge.load_state_dict(tensors, strict=True, assign=True)
        embeddings = judge.text.embeddings  # position_ids: a non-persistent buffer, still on the meta device
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
        return judge.eval().requires_grad_(False)

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        """A random judge of the same architecture (TINY_VISION, TINY_TEXT, the head's widths) with a vocabulary
        made in code: no files, for the offline demo and tests; the same weights for the same seed."""
        tokenizer = bert_tokenizer(tiny_vocab())
        vision = blip_weights.blip_vision_config(**TINY_VISION, initializer_range=0.02)  # BLIP's ~0 would blank it
        text = blip_weights.blip_text_config({**blip_weights.BERT_DEFAULTS, **TINY_TEXT, "vocab_size": len(tokenizer)},
                                             vision.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            judge = cls(vision, text, tokenizer)
        judge.vision.to(dtype)
        judge.text.to(dtype)
        return judge.to(device).eval().requires_grad_(False)

    @property
    def device(self):
        return self.head[0].weight.device

    def pixels(self, images):
        """The package's Resize(224, bicubic) + CenterCrop(224) + Normalize, as PIL computes them on the 8-bit image
        (parts.clip_pixels); (B, 3, 224, 224) float32, not differentiable."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        return clip_pixels(images.to(self.device).float(), self.vision.config.image_size)

    def score_pixels(self, pixels, prompts):
        """s_i = (head(BERT(tokens_i, cross = ViT(pixels_i))[0]) - MEAN) / STD for preprocessed pixels; (B,)
        float32 on the judge's device."""
        if len(prompts) != pixels.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"expected {pixels.shape[0]} prompts (one string per image), got {len(prompts)}")
        image_tokens = self.vision(pixel_values=pixels.to(self.device, self.vision.dtype)).last_hidden_state
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                                return_tensors="pt").to(self.device)
        hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_tokens).last_hidden_state
        return (self.head(hidden[:, 0].float()).squeeze(-1) - MEAN) / STD

    def score(self, images, prompts):
        """ImageReward.score(prompt_i, image_i) for (B, 3, H, W) images in [0, 1] of any size and B prompts."""
        return self.score_pixels(self.pixels(images), prompts)
