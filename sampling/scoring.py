"""`srpo.py score`: images scored with a reward model of reward.py as training scores them, the plain score or SRP's
relative reward with control words, every input checked before the model loads; `score --save-safetensors` converts
an HPS checkpoint first. Without a model, the tiny random HPS scorer of the built-in demo (its eval.jsonl's scores)."""

import os
import sys
from dataclasses import dataclass
from typing import Annotated

import torch

import reward
from common import bounds
from common.util import InputError, check_folder, parse_device, parse_dtype, read_manifest
from weights import clip_weights, world_weights


@dataclass
class ScoreConfig:
    """What `score` scores and with what. Each field with a help is a flag of `srpo.py score` (cli.py makes them as
    train's from srpo.TrainConfig); images are its IMAGE arguments, reward and model the one reward model flag given
    (--hps CKPT, --pickscore DIR or --clip DIR: reward.REWARDS' names; None: the tiny demo scorer)."""

    images: tuple = ()
    reward: str | None = None
    model: str | None = None
    tokenizer: Annotated[str | None, "CLIP BPE vocabulary: a folder with vocab.json + merges.txt, or a FLUX.1 folder "
                         "(its tokenizer/); default for --pickscore/--clip: the model folder's own files"] = None
    prompt: Annotated[str | None, "the prompt the images were made for"] = None
    manifest: Annotated[str | None, "images.jsonl of a `sample --prompts` folder: scores each image against its own "
                        "prompt, then prints the mean (instead of IMAGE and --prompt)"] = None
    relative: Annotated[tuple | None, "SRP reward with these control words, e.g. Real Painting"] = None
    k: Annotated[float, bounds.FINITE, "k of the SRP reward"] = 0.0
    preprocess: Annotated[str | None, "hpsv2: longest side to 224 + zero pad (HPS default); crop: short side to 224 + "
                          "centre crop (SRPO training, PickScore default)"] = None
    save_safetensors: Annotated[str | None, "convert --hps to a safetensors file first (later loads are fast and "
                                "pickle-free), then score from it; IMAGE may be omitted"] = None
    demo: Annotated[str | None, "without a model flag, the tiny demo scorer: world (the tiny world's reward model, "
                    "docs/world.md) or random (the random demo's)"] = None
    device: Annotated[str, "cpu, cuda or cuda:N"] = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Annotated[str | None, "float32, bfloat16 or float16 (default: float32 on every device, as scores print "
                     "with 6 decimals)"] = None


@torch.no_grad()
def score(s):
    """Print one score per image (score, tab, path): the HPS score <img, txt> of L2-normalised CLIP features
    (PickScore, CLIP: times exp(logit_scale)); with --relative POS NEG, SRPO's reward
    c img . ((1 + k) txt('POS. prompt') - txt('NEG. prompt')), c = 1 for HPS and exp(logit_scale) / 20 for
    PickScore and CLIP, as the official script trains with them."""
    device = parse_device(s.device)
    dtype = parse_dtype(s.dtype or "float32", device)  # 6 decimals: fp32
    inputs = score_inputs(s)
    if inputs is None:  # --save-safetensors alone: converted, nothing to score
        return
    kind, model, tokenizer, paths, prompts = inputs
    if model is None:
        scorer = DEMOS[s.demo or DEFAULT_DEMO](device=device, dtype=dtype)
    else:
        scorer = kind.load(model, tokenizer, device, dtype)
    values = []
    for path, prompt in zip(paths, prompts, strict=True):  # one at a time: sizes may differ, thousands may come
        image = reward.load_image(path)
        if s.relative:
            positive, negative = (reward.control_caption(word, prompt) for word in s.relative)
            value = scorer.relative_reward(image[None], positive, negative, s.k, s.preprocess)
        else:
            value = scorer.score(image[None], prompt, s.preprocess)
        values.append(value.item())
        print(f"{values[-1]:.6f}\t{path}")
    if s.manifest:
        print(f"{sum(values) / len(values):.6f}\tmean of {len(values)} images")


def score_inputs(s):
    """(model kind, its file or folder, tokenizer folder, image paths, prompts) of `score`, every input checked
    before anything loads; --save-safetensors then converts the --hps checkpoint (None: nothing else to do)."""
    if s.manifest and (s.images or s.prompt is not None):
        raise InputError("--manifest lists the images and their prompts: give it without IMAGE and --prompt")
    if s.reward:
        reward.REWARDS[s.reward].check_path(s.model)
        if s.demo:
            raise InputError(f"--demo picks the tiny demo scorer: with --{s.reward}, that model scores")
    if s.save_safetensors:
        check_conversion(s.model if s.reward == "hps" else None, s.save_safetensors)
    paths, prompts = read_manifest(s.manifest) if s.manifest else (s.images, [s.prompt] * len(s.images))
    if not paths and not s.save_safetensors:
        raise InputError("no images to score")
    if None in prompts:
        raise InputError("--prompt is required: the prompt the images were made for (or --manifest)")
    reward.captions_for(prompts, len(paths))  # an empty prompt, before the model loads (SRP captions are never empty)
    for path in paths:  # every file checked before the model loads; read again when scored, one at a time
        reward.load_image(path)
    if not s.reward:
        return demo_scorer(s), None, None, paths, prompts
    model, tokenizer = s.model, check_tokenizer(s.model, s.tokenizer) if paths else None
    if s.save_safetensors:
        clip_weights.convert_checkpoint(s.model, s.save_safetensors)
        print(s.save_safetensors)
        model = s.save_safetensors
    return (reward.REWARDS[s.reward], model, tokenizer, paths, prompts) if paths else None


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


def check_tokenizer(model, tokenizer):
    """The --tokenizer folder, or the model folder's own, checked before the model loads. -> tokenizer folder."""
    if tokenizer:
        check_folder(tokenizer, "a --tokenizer folder: vocab.json + merges.txt, or a FLUX.1 folder")
    tokenizer = tokenizer or reward.tokenizer_folder(model, None)  # a PickScore/CLIP folder may hold its own
    if tokenizer is None:
        raise InputError("--tokenizer DIR is required (vocab.json + merges.txt, or a FLUX.1 folder; a --pickscore or "
                         "--clip folder that holds them needs none)")
    return tokenizer


def demo_scorer(s):
    """No model flag: the HPS-class scorer a tiny demo trains with (its eval.jsonl's scores), to try `score` on its
    images (DEMOS: --demo's, the world's by default); said on stderr, as it knows nothing of real images."""
    if s.tokenizer:
        raise InputError("--tokenizer goes with --hps, --pickscore or --clip (the tiny demo scorer has its own)")
    print(f"note: no --hps, --pickscore or --clip: scoring with the tiny {s.demo or DEFAULT_DEMO} demo's HPS-class "
          f"scorer (`srpo.py train` without --flux), which knows nothing of real images", file=sys.stderr)
    return reward.HPSReward


# score without a model flag: the tiny demos' scorers (--demo), (device, dtype) -> the scorer
DEMOS = {"world": world_weights.load_scorer, "random": reward.HPSReward.tiny}
DEFAULT_DEMO = next(iter(DEMOS))
