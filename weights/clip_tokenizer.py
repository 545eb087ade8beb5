"""CLIP's byte-level BPE tokenizer in the two layouts the rewards need, on CLIP's vocab.json + merges.txt (FLUX.1's
tokenizer/ holds the same vocabulary):

- OpenClipTokenizer: open_clip's text cleaning (ftfy, HTML unescaped twice), word split and token layout, as hpsv2
  tokenizes for HPS;
- CLIPProcessorTokenizer: as transformers' CLIPProcessor runs it, as PickScore and the official SRPO script's CLIP
  reward (PickScore, CLIP-H) tokenize.

Both run the BPE itself through `transformers.CLIPTokenizer` (its Rust backend); they differ in what comes before it
(cleaning, word split) and after it (padding, attention mask).
"""

import html
from itertools import groupby
from pathlib import Path

import regex
import torch
from tokenizers import pre_tokenizers

from common.util import InputError, first_line, read_json

# transformers is imported where a tokenizer is built: importing it takes ~4 s, which every command, and every input
# error before its one line, would pay otherwise. ftfy is imported where HPS captions are cleaned (clean_prompt).

CONTEXT_LENGTH = 77  # CLIP's text context: [start] 75 tokens [end]


def _byte_symbols():
    """CLIP/GPT-2 byte-level alphabet: byte b -> a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def clean_prompt(text):
    """open_clip's 'lower' cleaning (basic_clean, whitespace_clean, lower): ftfy.fix_text, html.unescape twice,
    whitespace collapsed and stripped, lower case."""
    try:
        import ftfy  # here, not above: only HPS's captions need it, and everything else runs where it is missing
    except ModuleNotFoundError as e:
        raise InputError(f"HPS cleans its captions with ftfy, as open_clip does, and ftfy cannot be imported here "
                         f"({e}): pip install ftfy (requirements.txt)") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


# open_clip's split of cleaned text into BPE words, run as open_clip runs it (the `regex` module, IGNORECASE). Its
# special tokens are spelled <start_of_text> and <end_of_text>: text that spells them gets their ids.
_SPECIAL_WORDS = ("<start_of_text>", "<end_of_text>")
_PIECES = regex.compile("|".join(_SPECIAL_WORDS) + r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)


class ClipBPE:
    """What both layouts share: CLIP's vocabulary and merges in a `transformers.CLIPTokenizer` (self.bpe), the start
    and end ids, and where the files come from (a folder, the two files, or the byte-level fallback)."""

    def __init__(self, vocab, merges, context_length=CONTEXT_LENGTH):
        from transformers import CLIPTokenizer  # here, not above: see the imports

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


class OpenClipTokenizer(ClipBPE):
    """CLIP BPE tokens laid out as open_clip does (hpsv2's tokenizer): [start] bpe(clean(text))[:75] [end] 0 ... 0,
    77 long.

    Unlike `transformers.CLIPTokenizer` run whole, the cleaning (clean_prompt, ftfy included), the split into words
    (_PIECES) and the layout are open_clip's, in Python; CLIPTokenizer (its normalizer and pre-split switched off) only
    runs the byte-level BPE of each word, so the ids are open_clip's (tests/test_reward.py: every PartiPrompt,
    mojibake, HTML entities, controls, ligatures, emoji, whitespace, over-long text). As in open_clip, text spelling
    its special tokens, '<start_of_text>' or '<end_of_text>', gets their ids, and '<|endoftext|>' is plain text.
    """

    def __init__(self, vocab, merges, context_length=CONTEXT_LENGTH):
        super().__init__(vocab, merges, context_length)
        # Its normalizer (NFC, whitespace, lower case) and pre-split give way to clean_prompt and _PIECES: its NFC would
        # run after clean_prompt's html.unescape, where open_clip has none, and its Rust regex splits some text unlike
        # open_clip's `regex` (no IGNORECASE, which lets 's match 'ſ; other Unicode tables).
        self.bpe.backend_tokenizer.normalizer = None
        self.bpe.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def __call__(self, prompts):
        """(B, 77) int64 token ids, as open_clip.tokenize; an empty prompt is an InputError."""
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

    def text_inputs(self, prompts):
        """The text tower's inputs: the ids alone, as open_clip feeds them (no mask: the text ends at the end token)."""
        return {"input_ids": self(prompts)}


class CLIPProcessorTokenizer(ClipBPE):
    """Captions as transformers' CLIPProcessor tokenizes them with padding=True, truncation=True, max_length=77: what
    PickScore and the official SRPO script's CLIP reward (PickScore, CLIP-H) feed their models.

    This is `transformers.CLIPTokenizer` run whole: its normalizer (NFC, whitespace collapsed, lower case; no ftfy, no
    HTML unescaping) and word split, then [start] bpe[:75] [end], padded with the end token to the longest caption of
    the batch, the attention mask marking the padding. The same vocab.json + merges.txt as OpenClipTokenizer."""

    def __call__(self, prompts):
        """{'input_ids', 'attention_mask'}: (B, L) int64, L <= 77 the longest caption's length."""
        for text in prompts:
            if not text.strip():
                raise InputError(f"empty prompt: {text!r}")
        tokens = self.bpe(list(prompts), padding=True, truncation=True, max_length=self.context_length,
                          return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    text_inputs = __call__  # CLIPProcessor's output is what the text tower takes
