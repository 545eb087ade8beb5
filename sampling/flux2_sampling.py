"""Sampling FLUX.2 as diffusers' Flux2KleinPipeline (klein) and Flux2Pipeline (dev) do: what is FLUX.2's own against
FLUX.1's (sampling/flux_sampling.py; families.py holds both in one table; sampling/sampler.py runs the Euler sampler,
the files and the `sample` command for both).

- The schedule: sampling.flux_schedule's time shift with FLUX.2's empirical mu, fitted on the image length and the
  number of steps (empirical_mu), instead of FLUX.1's mu linear in the image length.
- The noise: drawn in the patchified latent shape (B, 4C, H/16, W/16) and packed channels-last, as
  Flux2Pipeline.prepare_latents draws it (FLUX.1's FluxPipeline draws (B, C, H/8, W/8) and packs 2x2 patches).
- The velocity (Flux2Conditioning): klein base is not guidance-distilled, so the pipeline runs real classifier-free
  guidance against the empty prompt, two model calls a step; klein distilled (the folder's `is_distilled`) is one
  call and ignores the guidance scale; FLUX.2 [dev] has a guidance embedding and takes the scale as input.
- The text: Qwen3's hidden states for klein (flux2_model.Qwen3Conditioner), Mistral-3's for dev
  (flux2_model.Mistral3Conditioner; Flux2Pipeline's optional caption upsampling is not done).
- The decode: Flux2AutoEncoder.decode undoes the latent batch-norm normalisation before the VAE's decoder.
For `train` (families.Family is the seam the step uses): a folder's frozen parts with the negative prompt's
embedding for klein base, and the tiny FLUX.2 demo's random models (`train --family flux2`).
"""

import functools
import os
import sys
from typing import NamedTuple

import torch

import flux2_model as f2
from common.util import check_folder, read_json, to_device
from sampling import flux_sampling
from weights import flux2_weights, flux_weights

GUIDANCE = 4.0  # Flux2KleinPipeline's (and Flux2Pipeline's) default guidance_scale
NEGATIVE_PROMPT = ""  # Flux2KleinPipeline's negative prompt for classifier-free guidance, fixed


def empirical_mu(seq_len, steps):
    """FLUX.2's time-shift mu for seq_len packed image tokens and `steps` steps (diffusers' compute_empirical_mu,
    black-forest-labs/flux2's fit): mu is linear in seq_len at 10 and at 200 steps,
        m_10 = 8.73809524e-5 L + 1.89833333,   m_200 = 1.6927e-4 L + 0.45666666,
    and linear in the steps between them (extrapolated outside); above 4300 tokens m_200 alone."""
    m_200 = 0.00016927 * seq_len + 0.45666666
    if seq_len > 4300:
        return float(m_200)
    m_10 = 8.73809524e-05 * seq_len + 1.89833333
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a  # in diffusers' order of operations: mu bit for bit
    return float(a * steps + b)


def initial_noise(batch, height, width, seed, dtype, channels=128):
    """Packed N(0, I) latents (B, (H/16)(W/16), channels) drawn on the CPU exactly as Flux2Pipeline.prepare_latents
    draws them for this seed: (B, channels, H/16, W/16) patchified latents, each position's channels one token."""
    g = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn((batch, channels, height // 16, width // 16), generator=g, dtype=dtype)
    return z.flatten(2).transpose(1, 2)


class Flux2Conditioning(NamedTuple):
    """What FLUX.2 sees besides the latents and the time: the image tokens' 4-axis positions, the text tokens and
    their positions, and for classifier-free guidance the negative prompt's text tokens (None: one model call)."""

    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor
    negative: torch.Tensor | None = None

    def velocity(self, model, x, t, guidance):
        """v(x, t). With a negative prompt, classifier-free guidance as Flux2KleinPipeline computes it,
        v = v_neg + g (v_pos - v_neg), two model calls; without, one call, the guidance scale g passed to the model
        (used by a guidance embedding, ignored by klein's transformer, which has none)."""
        v = model(x, self.img_ids, self.txt, self.txt_ids, t, guidance)
        if self.negative is None:
            return v
        v_neg = model(x, self.img_ids, self.negative, self.txt_ids, t, guidance)
        return v_neg + guidance[:, None, None] * (v - v_neg)

    def at_guidance(self, guidance):
        """The conditioning sampled at this scale: at guidance <= 1 the conditional pass alone, one model call, as
        Flux2KleinPipeline's do_classifier_free_guidance (guidance_scale > 1) decides."""
        return self if guidance > 1 else self.conditional()

    def conditional(self):
        """The conditional pass alone, one model call (the guidance scale then only reaches a guidance embedding)."""
        return self._replace(negative=None)


def conditioning(embedding, height, width, device, dtype=None):
    """The Flux2Conditioning of one prompt's embedding, (txt,) or (txt, negative txt), at height x width."""
    txt, *negative = (to_device(t, device).to(dtype or t.dtype) for t in embedding)
    ids = f2.image_ids(height, width, device).to(dtype or torch.float32)
    return Flux2Conditioning(ids, txt, f2.text_ids(txt.shape[1], device).to(dtype or torch.float32), *negative)


def embedder(text, cfg):
    """text (prompts -> txt) made to give a prompt's embedding as `conditioning` takes it: (txt,), or for
    classifier-free guidance (txt, negative txt), the negative prompt encoded once and shared."""
    if not cfg:
        return lambda prompts: (text(prompts),)
    negative = text([NEGATIVE_PROMPT])
    return lambda prompts: (text(prompts), negative.expand(len(prompts), -1, -1))


def tiny_models(seed=0):
    """The tiny FLUX.2 demo's models, random with a fixed seed, no files: a klein-base-like transformer (no guidance
    embedding: sampled with classifier-free guidance), its VAE and a tiny Qwen3 text encoder."""
    torch.manual_seed(seed)
    model = f2.Flux2(f2.Flux2Config.preset("tiny")).eval()
    ae = f2.Flux2AutoEncoder(f2.Flux2AutoEncoderConfig.preset("tiny")).eval()
    return model, ae, f2.Qwen3Conditioner.tiny(model.cfg.context_in_dim // 3, seed=seed)


DEMOS = {"random": tiny_models}  # the tiny demos without a folder (--demo): no tiny world for FLUX.2


def tiny_frozen_parts(device, weights, demo):
    """runtime.frozen_parts of the tiny FLUX.2 demo `demo` (DEMOS): (VAE, text with the negative prompt, transformer
    config, load(device) of the transformer in `weights`)."""
    model, ae, text = DEMOS[demo]()
    return ae, embedder(text.to(device), cfg=True), model.cfg, flux_weights.held(model, weights)


# ----------------------------------------------------------------------------------------------------------------
# A FLUX.2 folder: klein (Flux2KleinPipeline) or dev (Flux2Pipeline)


TEXT_ENCODERS = {"Flux2KleinPipeline": f2.Qwen3Conditioner, "Flux2Pipeline": f2.Mistral3Conditioner}


def pipeline_config(flux_dir):
    """The folder's model_index.json (its _class_name one of TEXT_ENCODERS', as families.of_folder checks)."""
    return read_json(os.path.join(flux_dir, "model_index.json"))


def is_distilled(flux_dir):
    """Whether the folder's klein model is step-distilled (model_index.json's is_distilled, as the pipeline reads it):
    then the pipeline makes one model call a step and ignores the guidance scale. dev's pipeline has no such key."""
    return bool(pipeline_config(flux_dir).get("is_distilled", False))


def load_folder(flux_dir, transformer_file, dtype, device):
    """(transformer, autoencoder) of a diffusers FLUX.2 folder, optionally with replacement transformer weights (a BFL
    single file, e.g. flux-2-klein-4b.safetensors, or a diffusers transformer/ folder)."""
    check_folder(flux_dir, "a diffusers FLUX.2 folder")
    transformer = transformer_file or os.path.join(flux_dir, "transformer")
    model = flux2_weights.load_transformer(transformer, None, dtype, device)
    return model, flux2_weights.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)


def uses_cfg(flux_dir, guidance):
    """Flux2KleinPipeline's do_classifier_free_guidance: guidance_scale > 1 on a klein model that is not distilled
    (flux_dir None: the tiny demo's klein-base-like one). Flux2Pipeline (dev) never runs it: its transformer takes the
    scale through its guidance embedding."""
    klein = flux_dir is None or pipeline_config(flux_dir)["_class_name"] == "Flux2KleinPipeline"
    return klein and guidance > 1 and not (flux_dir and is_distilled(flux_dir))


def frozen_parts(flux_dir, dtype, device, weights):
    """runtime.frozen_parts of a FLUX.2 folder: (VAE, text encoder, transformer config, load(device) of the
    transformer in `weights`); klein base's text gives the negative prompt too (its branches sample with
    classifier-free guidance), klein distilled's and dev's do not (one pass)."""
    sub = os.path.join(flux_dir, "transformer")
    flux_cfg = flux2_weights.config_from_diffusers(read_json(os.path.join(sub, "config.json")), sub)
    ae = flux2_weights.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)
    text = TEXT_ENCODERS[pipeline_config(flux_dir)["_class_name"]].from_folder(flux_dir, dtype, device)
    text = embedder(text, cfg=uses_cfg(flux_dir, GUIDANCE))  # klein base: with the negative prompt
    return ae, text, flux_cfg, functools.partial(flux2_weights.load_transformer, sub, flux_cfg, weights)


def sample_guidance(s, cfg, rank):
    """--guidance, GUIDANCE unless given; said once if given to a distilled model, which ignores it (as the pipeline
    warns)."""
    if s.guidance is not None and s.flux and is_distilled(s.flux) and rank == 0:
        print("note: this FLUX.2 [klein] model is distilled (model_index.json is_distilled): --guidance is ignored",
              file=sys.stderr)
    return GUIDANCE if s.guidance is None else s.guidance


def sample_models(s, prompts, dtype, device):
    """(model, ae, {prompt: (txt,) or (txt, negative txt)}) of the --flux folder, or without one the tiny FLUX.2
    demo's (`train --family flux2`; --transformer: its checkpoint): the prompts (and the empty negative prompt when
    guidance is classifier-free) encoded first and kept on the CPU, the text encoder freed before the transformer
    loads (Qwen3-4B is 8 GB in bf16, Mistral-3 Small 48 GB)."""
    if s.flux:
        encoder = TEXT_ENCODERS[pipeline_config(s.flux)["_class_name"]]
        text = encoder.from_folder(s.flux, dtype, device, s.max_sequence_length)
    else:
        model, ae, text = flux_sampling.demo_transformer(s, DEMOS, flux2_weights.load_transformer, dtype, device)
        text.max_length = s.max_sequence_length
    text = embedder(text, uses_cfg(s.flux, GUIDANCE if s.guidance is None else s.guidance))
    embeddings = flux_sampling.encode_prompts(text, prompts)
    del text
    if s.flux:
        return *load_folder(s.flux, s.transformer, dtype, device), embeddings
    return model.to(device, dtype), ae.to(device, dtype), embeddings
