"""The tiny world's shipped files (data/world, docs/world.md) read into the project's classes: the world's reward
model, an HPSReward on a tiny CLIPModel (training/world_scorer.py trains it), and its FLUX.1 transformer,
autoencoder and text encoders (training/world_models.py trains them). tools/make_world.py writes them; a demo, a
tool or a test reads them here, each file's config in its safetensors metadata.
"""

import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import flux_model as fm
from common.util import InputError, first_line
from reward import HPSReward
from weights import clip_weights

WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "world")
SCORER, JUDGE = (os.path.join(WORLD, f"{name}.safetensors") for name in ("scorer", "judge"))

FORMAT = "world-scorer"  # the safetensors metadata's "layout": what load_scorer accepts


@dataclass
class ScorerConfig:
    seed: int = 0
    steps: int = 1200  # each on a fresh batch of the world: no image is seen twice
    batch: int = 128
    lr: float = 2e-3  # after a linear warm-up, down a half cosine to 0
    warmup: int = 50
    weight_decay: float = 0.0
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    head_width: int = 32  # both towers' attention heads (clip_config's ViT-H-14 widths are 80 and 64)
    image_size: int = 32  # the vision tower's: hpsv2's preprocessing resizes the 64 x 64 images to it
    patch_size: int = 4
    draw_size: int = 64  # the world images' side, trained on as they will be scored
    leave_out: float = 0.4  # the share of captions with some attribute words left out
    control: float = 0.4  # the share in SRP's "word. prompt" form
    near_miss: float = 0.5  # the share of images whose caption, one NEAR_MISS word changed, joins the batch


def clip_config(config):
    """The CLIPConfig of ScorerConfig's widths on the byte-level tokenizer's vocabulary."""
    return clip_weights.clip_config(
        config.vision_width, config.vision_layers, config.text_width, config.text_layers, config.embed_dim,
        vocab_size=HPSReward.tokenizer_class.byte_level().vocab_size, image_size=config.image_size,
        patch_size=config.patch_size, vision_head_width=config.head_width, text_head_width=config.head_width)


def new_scorer(config):
    """A fresh HPSReward on a CLIPModel initialised from config.seed (transformers' own initialisation)."""
    from transformers import CLIPModel  # ~4 s to import: only where a model is built

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        clip = CLIPModel(clip_config(config))
    return HPSReward(clip, HPSReward.tokenizer_class.byte_level())


# ----------------------------------------------------------------------------------------------------------------
# The scorer's file


def scorer_metadata(config):
    """The safetensors metadata load_scorer reads back: the layout's name and the ScorerConfig as JSON."""
    return {"format": "pt", "layout": FORMAT, "config": json.dumps(asdict(config))}


def load_scorer(path=SCORER, device="cpu", dtype=torch.float32):
    """The HPSReward written by tools/make_world.py: its CLIPModel's weights, its ScorerConfig in the file's
    metadata, the byte-level tokenizer. A missing file, another file or another layout is a one-line InputError."""
    remake = "make it: python -m tools.make_world --only scorer"
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("layout") != FORMAT:
            raise InputError(f"{path}: not the world's scorer (its metadata's layout is {metadata.get('layout')!r}, "
                             f"expected {FORMAT!r}); {remake}")
        scorer = new_scorer(ScorerConfig(**json.loads(metadata["config"])))
        scorer.clip.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: cannot read the world's scorer ({first_line(e)}); {remake}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # its config or its tensors are not this layout's
        raise InputError(f"{path}: not the world's scorer's layout ({first_line(e)}); {remake}") from None
    return scorer.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The transformer's, the autoencoder's and the text encoders' files


def metadata(config):
    """The safetensors metadata read_module reads back: the model's config, one key alone, for safetensors writes
    its metadata in a hash map's order, which differs from one process to the next (the training config is in the
    JSON beside the file)."""
    return {"config": json.dumps(config)}


def read_module(path, what, build):
    """build(config) with the file's weights, its config from the file's metadata; one InputError line naming the
    file when it is missing, not safetensors, or not this layout (a config or a tensor missing, unexpected, or
    of another shape)."""
    try:
        with safe_open(path, "pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "null"))
        state = load_file(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (the world's {what}: python -m tools.make_world)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a safetensors file of the world's {what} ({first_line(e)})") from None
    try:
        with torch.random.fork_rng():
            module = build(config)
        missing, unexpected = module.load_state_dict(state, strict=False)
    except (TypeError, ValueError, KeyError, RuntimeError, InputError) as e:
        raise InputError(f"{path}: not the world's {what} ({first_line(e)})") from None
    if missing or unexpected:
        raise InputError(f"{path}: not the world's {what}: {len(missing)} tensors missing {missing[:2]}, "
                         f"{len(unexpected)} unexpected {unexpected[:2]}")
    return module.eval()


def build_autoencoder(config):
    return fm.AutoEncoder(fm.AutoEncoderConfig(**{**config, "ch_mult": tuple(config["ch_mult"])}))


def build_transformer(config):
    return fm.Flux(fm.FluxConfig(**{**config, "axes_dim": tuple(config["axes_dim"])}))


def build_text(config):
    return fm.TextConditioner.tiny(config["context_dim"], config["pooled_dim"], config["max_length"], config["seed"])


def load_world(folder=WORLD, device="cpu"):
    """(transformer, autoencoder, text encoders) of the world's files in folder (data/world), on device, in eval
    mode and fp32: model(x, ...) as flux_model.Flux, ae.encode / decode on 64 x 64 images in [-1, 1], text(prompts)
    -> (txt (B, max_length, ctx), y (B, vec)), byte-tokenised."""
    ae = read_module(f"{folder}/autoencoder.safetensors", "autoencoder", build_autoencoder)
    model = read_module(f"{folder}/transformer.safetensors", "transformer", build_transformer)
    text = read_module(f"{folder}/text.safetensors", "text encoders", build_text)
    return model.to(device), ae.to(device), text.to(device)
