"""The model families, FLUX.1 and FLUX.2, in one table: everything the sampler, the training step, a run and an
export ask of a family. The rest of the project is the same for both.

Each family is its model (flux_model.py, flux2_model.py), its weights on disk (weights/flux_weights.py,
weights/flux2_weights.py) and its sampling (sampling/flux_sampling.py, sampling/flux2_sampling.py: noise, conditioning,
schedule, folders); a Family names the functions of those modules that the family-independent code calls. What is given
tells the family: a diffusers pipeline folder its model_index.json `_class_name`, a transformer folder its
config.json's, a single file its keys, a model its config's class, the tiny demo its --family."""

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from common.util import InputError, check_folder, read_json
from flux2_model import Flux2, Flux2Config
from flux_model import Flux, FluxConfig
from sampling import flux2_sampling, flux_sampling
from weights import flux2_weights, flux_weights


class Conditioning(Protocol):
    """A family's conditioning of one prompt (flux_sampling.Conditioning, flux2_sampling.Flux2Conditioning): what
    the sampler and the training step ask of it, never unpacking it."""

    def velocity(self, model, x, t, guidance):
        """v(x, t) at the guidance scale (B,): the family's model call(s)."""

    def at_guidance(self, guidance):
        """Itself as sampled at this scale (a CFG family's: its conditional pass alone at scale <= 1)."""

    def conditional(self):
        """Its conditional pass alone (train --no-branch-cfg)."""


@dataclass(frozen=True)
class Family:
    name: str  # the tiny demo's --family
    title: str
    pipelines: tuple[str, ...]  # its diffusers folders' model_index.json _class_name
    transformer_class: str  # its transformer's config.json _class_name
    model: type
    config: type
    # its weights: (path, cfg) -> (cfg, links, sources); load (path, cfg, dtype, device); save (model, folder);
    # links (cfg) -> our names <-> diffusers'; to_diffusers (cfg) -> config.json; bfl: what its BFL files are
    sources: Callable
    load: Callable
    save: Callable
    links: Callable
    to_diffusers: Callable
    bfl: str
    # its sampling: the packed noise of a seed (batch, height, width, seed, dtype, channels), the Conditioning of a
    # prompt's embedding (embedding, height, width, device, dtype=None), the schedule's mu (seq_len, steps) or None
    # (the scheduler config's own), the default guidance scale, and the models of a folder or of the tiny demo
    initial_noise: Callable
    conditioning: Callable
    mu: Callable | None
    guidance: float
    load_folder: Callable  # (flux_dir, transformer_file, dtype, device) -> (model, ae)
    sample_models: Callable  # (sample config, prompts, dtype, device) -> (model, ae, embeddings)
    sample_guidance: Callable  # (sample config, transformer config, rank) -> the scale
    frozen_parts: Callable  # (flux_dir, dtype, device, weights) -> (ae, text, cfg, load(device))
    tiny_frozen_parts: Callable  # (device, weights, demo) -> the same, of the tiny demo named demo
    demos: dict  # its tiny demos without a folder (--demo): name -> (seed) -> (model, ae, text), the default first
    # what a run asks: is a folder's model (flux_dir, or None: the tiny demo's) sampled with classifier-free guidance
    # at a scale; refuse a training guidance a folder's model cannot take (None: every model of the family takes it);
    # does its pipeline folder hold CLIP's tokenizer (the rewards' BPE vocabulary)
    uses_cfg: Callable  # (flux_dir | None, guidance) -> bool
    check_guidance: Callable | None  # (flux_dir, train cfg)
    clip_tokenizer: bool

    def demo(self, name=None, flux=None):
        """--demo's name, checked: one of the family's tiny demos (None: its default, the first); with --flux None."""
        if flux:
            if name:
                raise InputError("--demo is the tiny demo's: with --flux, the folder holds the models")
            return None
        if name is None:
            return next(iter(self.demos))
        if name not in self.demos:
            raise InputError(f"--demo {name}: the tiny {self.title} demos are {', '.join(self.demos)} (the tiny world "
                             f"is FLUX.1's: docs/world.md)")
        return name

    def noise_of(self, model):
        """The family's initial_noise for this transformer: (batch, height, width, seed, dtype) -> packed latents
        with the model's latent channels (a stand-in without the family's config: the family's default channels)."""
        cfg = getattr(model, "cfg", None)
        if not isinstance(cfg, self.config):
            return self.initial_noise
        return functools.partial(self.initial_noise, channels=cfg.in_channels)


FLUX1 = Family(
    name="flux1", title="FLUX.1", pipelines=("FluxPipeline",), transformer_class="FluxTransformer2DModel",
    model=Flux, config=FluxConfig,
    sources=flux_weights.transformer_sources, load=flux_weights.load_transformer,
    save=flux_weights.save_transformer, links=flux_weights.transformer_links,
    to_diffusers=flux_weights.flux_config_to_diffusers,
    bfl="black-forest-labs/flux parameter names, as flux1-dev.safetensors",
    initial_noise=flux_sampling.initial_noise, conditioning=flux_sampling.conditioning, mu=None,
    guidance=flux_sampling.GUIDANCE, load_folder=flux_sampling.load_folder,
    sample_models=flux_sampling.sample_models, sample_guidance=flux_sampling.sample_guidance,
    frozen_parts=flux_sampling.frozen_parts, tiny_frozen_parts=flux_sampling.tiny_frozen_parts,
    demos=flux_sampling.DEMOS,
    uses_cfg=flux_sampling.uses_cfg, check_guidance=flux_sampling.check_guidance, clip_tokenizer=True)
FLUX2 = Family(
    name="flux2", title="FLUX.2", pipelines=tuple(flux2_sampling.TEXT_ENCODERS),
    transformer_class="Flux2Transformer2DModel", model=Flux2, config=Flux2Config,
    sources=flux2_weights.transformer_sources, load=flux2_weights.load_transformer,
    save=flux2_weights.save_transformer, links=flux2_weights.transformer_links,
    to_diffusers=flux2_weights.config_to_diffusers,
    bfl="black-forest-labs/flux2 parameter names, as flux-2-klein-4b.safetensors",
    initial_noise=flux2_sampling.initial_noise, conditioning=flux2_sampling.conditioning,
    mu=flux2_sampling.empirical_mu, guidance=flux2_sampling.GUIDANCE, load_folder=flux2_sampling.load_folder,
    sample_models=flux2_sampling.sample_models, sample_guidance=flux2_sampling.sample_guidance,
    frozen_parts=flux2_sampling.frozen_parts, tiny_frozen_parts=flux2_sampling.tiny_frozen_parts,
    demos=flux2_sampling.DEMOS,
    uses_cfg=flux2_sampling.uses_cfg, check_guidance=None, clip_tokenizer=False)
FAMILIES = (FLUX1, FLUX2)
FLUX2_KEYS = ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight")  # BFL's, diffusers'


def by_name(name):
    return next(f for f in FAMILIES if f.name == name)


def of_config(cfg):
    """The family of a transformer config: FLUX.2's for a Flux2Config, else FLUX.1's (a FluxConfig)."""
    return FLUX2 if isinstance(cfg, Flux2Config) else FLUX1


def of_model(model):
    """The family of a transformer, by its config; a model without a FLUX config (a stand-in's) is FLUX.1's."""
    cfg = getattr(model, "cfg", None)
    return of_config(cfg) if isinstance(cfg, (FluxConfig, Flux2Config)) else FLUX1


def noise_of(model):
    """The initial noise of a transformer held without its run (a tool's, a method's): its family's noise_of."""
    return of_model(model).noise_of(model)


def decide(flux=None, name=None, transformer=None):
    """The family of a command, decided once: --flux's, as its model_index.json says (of_folder; a folder without
    one is FLUX.1's, as before FLUX.2); without --flux a demo checkpoint's (`sample --transformer`: its config.json
    or keys, of_transformer), else --family's `name` (the tiny demo's models; FLUX.1's by default)."""
    if flux and name:
        raise InputError("--family is the tiny demo's: with --flux, the folder's model_index.json says the family")
    if flux:
        return of_folder(flux) if os.path.isfile(os.path.join(flux, "model_index.json")) else FLUX1
    if not transformer:
        return by_name(name or FLUX1.name)
    try:
        family = of_transformer(transformer)
    except InputError as e:
        raise flux_sampling.not_a_demo_checkpoint(e) from None
    if name and name != family.name:
        raise InputError(f"--family {name}, but --transformer {transformer} is a {family.title} transformer "
                         f"(--family {family.name}): without --family, the checkpoint's own family is taken")
    return family


def of_folder(folder):
    """The family of a diffusers pipeline folder, as its model_index.json's _class_name says (FluxPipeline;
    Flux2KleinPipeline for klein, Flux2Pipeline for dev)."""
    check_folder(folder, "a diffusers FLUX pipeline folder")
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no model_index.json (expected a diffusers pipeline folder)")
    name = read_json(path).get("_class_name")
    family = next((f for f in FAMILIES if name in f.pipelines), None)
    if family is None:
        raise InputError(f"{path}: _class_name {name!r} is not a FLUX pipeline (expected "
                         f"{', '.join(p for f in FAMILIES for p in f.pipelines)})")
    return family


def of_transformer(path):
    """The family of a transformer: a folder's config.json `_class_name` (as diffusers writes it), a single file's
    keys (FLUX.2's shared single_stream_modulation in BFL's or diffusers' names, BFL's maybe prefixed: all-in-one)."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise InputError(f"{path}: no config.json (expected a diffusers transformer folder: config.json and its "
                             f"weights)")
        name = read_json(config).get("_class_name")
        family = next((f for f in FAMILIES if f.transformer_class == name), None)
        if family is None:
            raise InputError(f"{config}: _class_name {name!r} is not a FLUX transformer's (expected "
                             f"{' or '.join(f.transformer_class for f in FAMILIES)})")
        return family
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    keys = flux_weights.read_sources([path])
    # FLUX.2's shared modulation: no FLUX.1
    flux2 = any(k in keys or flux_weights.BFL_PREFIX + k in keys for k in FLUX2_KEYS)
    return FLUX2 if flux2 else FLUX1
