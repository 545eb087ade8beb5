"""Sampling FLUX.1 as diffusers' FluxPipeline does: what is FLUX.1's own in the sampler and the training step (the
family-independent sampler, schedule and files are sampling/sampler.py's; FLUX.2's counterpart is
sampling/flux2_sampling.py, and families.py holds both in one table).

- The noise: drawn (B, C, H/8, W/8) on the CPU and packed 2x2 into tokens, as FluxPipeline.prepare_latents draws it.
- The velocity (Conditioning): one call of the guidance-distilled transformer, the guidance scale an input of its
  guidance embedding; the pooled CLIP vector beside T5's tokens.
- The folders: a diffusers FluxPipeline folder's VAE, text encoders (fm.TextConditioner: CLIP-L and T5-XXL) and
  transformer, and the tiny demos' models: the tiny world's (data/world: docs/world.md), or random ones built in
  code.
"""

import functools
import os
import sys
from typing import NamedTuple

import torch

import flux_model as fm
from common.util import InputError, check_folder, to_device
from weights import flux_weights, world_weights

GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def initial_noise(batch, height, width, seed, dtype, channels=64):
    """Packed N(0, I) latents (B, (H/16)(W/16), channels) drawn on the CPU exactly as diffusers' FluxPipeline draws
    them for this seed: (B, channels/4, H/8, W/8), packed 2x2."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, channels // 4, 2 * (height // 16), 2 * (width // 16))
    return fm.pack(torch.randn(shape, generator=g, dtype=dtype))


class Conditioning(NamedTuple):
    """What FLUX.1 sees besides the latents and the time: the image tokens' positions, the T5 tokens and their
    positions (all zero), the pooled CLIP vector. A model family's seam (families.Conditioning): the sampler and the
    training step ask it for the velocity and never unpack it, so another family (another model call,
    classifier-free guidance's two passes) is another conditioning class, with at_guidance(g): itself as sampled at
    scale g (training's rollout and the sample grids ask for it), and conditional(): its conditional pass alone
    (train --no-branch-cfg)."""

    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor
    y: torch.Tensor

    def velocity(self, model, x, t, guidance):
        """v(x, t): one call of the guidance-distilled FLUX.1 transformer, the guidance scale an input."""
        return model(x, self.img_ids, self.txt, self.txt_ids, self.y, t, guidance)

    def at_guidance(self, guidance):
        """The conditioning sampled at this scale: the same (the scale is the model's input, not a second pass)."""
        return self

    def conditional(self):
        """The conditional pass alone: the same (one pass already)."""
        return self


def conditioning(embedding, height, width, device, dtype=None):
    """The Conditioning of one prompt's (txt, y) embedding at height x width, on device (in dtype if given)."""
    txt, y = (to_device(t, device).to(dtype or t.dtype) for t in embedding)
    ids = fm.image_ids(height, width, device).to(dtype or torch.float32)
    return Conditioning(ids, txt, torch.zeros(txt.shape[1], 3, device=device, dtype=dtype), y)


def encode_prompts(text, prompts):
    """{prompt: embedding} on the CPU (FLUX.1's: (txt (1, T, ctx), y (1, vec))): each prompt through the text
    encoders once, so that they can be freed before the transformer is loaded (T5-XXL alone is 9.5 GB in bf16)."""
    return {p: tuple(t.cpu() for t in text([p])) for p in dict.fromkeys(prompts)}


# ----------------------------------------------------------------------------------------------------------------
# The models: a diffusers FLUX.1 folder, or the tiny demo's


def tiny_models(seed=0):
    """The built-in tiny FLUX, autoencoder and text encoders, random with a fixed seed: no files, no downloads."""
    torch.manual_seed(seed)
    model = fm.Flux(fm.FluxConfig.preset("tiny")).eval()
    ae = fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).eval()
    text = fm.TextConditioner.tiny(model.cfg.context_in_dim, model.cfg.vec_in_dim, seed=seed)
    return model, ae, text


def world_models(seed=0):
    """The tiny world's models (docs/world.md): FLUX.1's classes trained on the world's images, read from the files
    shipped in data/world (trained, so no seed)."""
    return world_weights.load_world()


DEMOS = {"world": world_models, "random": tiny_models}  # the tiny demos without a folder (--demo), the default first


def demo_transformer(s, demos, load, dtype, device):
    """(model, ae, text) of the tiny demo --demo (a name of a family's DEMOS: (seed) -> the models), its transformer
    --transformer's checkpoint (a `srpo.py train` one) read by `load`, the family's load_transformer, when given:
    without --demo, the first demo whose transformer the checkpoint fits; said plainly when it fits none."""
    error = None
    for name in [s.demo] if s.demo else list(demos):
        model, ae, text = demos[name]()
        if not s.transformer:
            return model, ae, text
        try:
            return load(s.transformer, model.cfg, dtype, device), ae, text
        except InputError as e:
            error = e
    raise not_a_demo_checkpoint(error) from None


def not_a_demo_checkpoint(error):
    """An InputError about --transformer without --flux, with what it should have been."""
    return InputError(f"{error} (without --flux, --transformer is a tiny demo checkpoint's folder or its "
                      f"diffusion_pytorch_model.safetensors: give --flux for a full-size one)")


def load_folder(flux_dir, transformer_file, dtype, device):
    """(transformer, autoencoder) of a diffusers FLUX.1 folder, optionally with replacement transformer weights
    (e.g. SRPO's file)."""
    check_folder(flux_dir, "a diffusers FLUX.1 folder")
    sub = os.path.join(flux_dir, "transformer")
    model = flux_weights.load_transformer(transformer_file or sub, flux_weights.read_flux_config(sub), dtype, device)
    return model, flux_weights.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)


def frozen_parts(flux_dir, dtype, device, weights):
    """runtime.frozen_parts of a FLUX.1 folder: (VAE, text encoders, transformer config, load(device) of the
    transformer in `weights`)."""
    sub = os.path.join(flux_dir, "transformer")
    flux_cfg = flux_weights.read_flux_config(sub)
    ae = flux_weights.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)
    text = fm.TextConditioner.from_folder(flux_dir, dtype, device)
    return ae, text, flux_cfg, functools.partial(flux_weights.load_transformer, sub, flux_cfg, weights)


def tiny_frozen_parts(device, weights, demo):
    """runtime.frozen_parts of the tiny demo `demo` (DEMOS): its models, made or read without a folder."""
    model, ae, text = DEMOS[demo]()
    return ae, text.to(device), model.cfg, flux_weights.held(model, weights)


def sample_models(s, prompts, dtype, device):
    """(model, ae, {prompt: (txt, y)}) of --flux, or the tiny demo's (DEMOS); the prompts are encoded first."""
    if not s.flux:
        model, ae, text = demo_transformer(s, DEMOS, flux_weights.load_transformer, dtype, device)
        text.max_length = s.max_sequence_length
        return model.to(device, dtype), ae.to(device, dtype), encode_prompts(text, prompts)
    text = fm.TextConditioner.from_folder(s.flux, dtype, device, s.max_sequence_length)
    embeddings = encode_prompts(text, prompts)  # on the CPU: 4 MiB a prompt for T5-XXL in bf16
    del text  # the text encoders (10 GB for T5-XXL) are not needed past this point
    return *load_folder(s.flux, s.transformer, dtype, device), embeddings


def uses_cfg(flux_dir, guidance):
    """FLUX.1 is never sampled with classifier-free guidance: the scale is an input of its transformer (dev)."""
    return False


def check_guidance(flux_dir, cfg):
    """SRPO's recipe feeds FLUX.1-dev's distilled guidance: a transformer without the embedding (FLUX.1-schnell)
    cannot take it. (FLUX.2 [klein] base takes the scale as classifier-free guidance instead.)"""
    if not flux_weights.read_flux_config(os.path.join(flux_dir, "transformer")).guidance_embed:
        raise InputError(f"{flux_dir}: the transformer has no guidance embedding (e.g. FLUX.1-schnell); SRPO's recipe "
                         f"feeds FLUX.1-dev's distilled guidance ({cfg.guidance:g} to the branches, "
                         f"{cfg.rollout_guidance:g} to the rollout): train a guidance-distilled model such as "
                         f"FLUX.1-dev")


def sample_guidance(s, cfg, rank):
    """--guidance, GUIDANCE unless given. A transformer without a guidance embedding (FLUX.1-schnell: not
    guidance-distilled) has nowhere to take it, and FluxPipeline passes it none: said once if it was given."""
    if not cfg.guidance_embed and s.guidance is not None and rank == 0:
        print("note: this transformer has no guidance embedding (e.g. FLUX.1-schnell): --guidance is ignored",
              file=sys.stderr)
    return GUIDANCE if s.guidance is None else s.guidance
