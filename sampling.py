"""Sampling FLUX.1 as diffusers' FluxPipeline does: the schedule a folder's scheduler config asks for, the noise of a
seed, the Euler sampler, decoding; and the `sample` command (one prompt, or a prompt file with models loaded once),
for FLUX.2 folders too (what differs there is flux2_sampling.py's).

Flow matching: x_sigma = sigma * eps + (1 - sigma) * x0; the model predicts v ~ eps - x0."""

import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import flux2_model as f2
import flux2_sampling as f2s
import flux_model as fm
import flux_weights as fw
import lora
from export import family_of_config
from util import (
    MANIFEST,
    Fault,
    InputError,
    RunLock,
    Stopped,
    StopSignals,
    atomic_write,
    attention_backend,
    check_folder,
    check_writable,
    manifest_rows,
    parse_dtype,
    read_json,
    read_prompts,
    this_process,
    to_device,
    write_manifest,
    written,
)

# ----------------------------------------------------------------------------------------------------------------
# The schedule: FluxPipeline's sigmas, from a folder's FlowMatchEulerDiscreteScheduler config


DEFAULT_PROMPT = "a photo of a red fox in the snow"
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def time_shift(mu, sigmas):
    """FLUX's resolution-dependent shift of a schedule: t' = e^mu / (e^mu + (1/t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


@dataclass(frozen=True)
class FlowSchedule:
    """The settings of diffusers' FlowMatchEulerDiscreteScheduler that FluxPipeline's sigmas depend on, at that
    scheduler's defaults (what it takes for a key its config file leaves out)."""
    shift: float = 1.0  # static shift s (FLUX.1-schnell: 1, no shift)
    use_dynamic_shifting: bool = False  # FLUX.1-dev: mu from the image length instead of s
    base_shift: float = 0.5  # mu at base_image_seq_len packed tokens
    max_shift: float = 1.15  # mu at max_image_seq_len
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float = None  # stretch the shifted sigmas so that the last one is this (None or 0: off)


FLUX_DEV = FlowSchedule(shift=3.0, use_dynamic_shifting=True)  # FLUX.1-dev's scheduler_config.json


# Keys accepted at these values only: any other changes FluxPipeline's sigmas or steps in a way not implemented here.
SCHEDULER_FIXED = {"num_train_timesteps": 1000, "invert_sigmas": False, "use_karras_sigmas": False,
                   "use_exponential_sigmas": False, "use_beta_sigmas": False, "time_shift_type": "exponential",
                   "stochastic_sampling": False}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schedule_from_config(config, path):
    """FlowSchedule from a FlowMatchEulerDiscreteScheduler config (a dict read from path). A key this sampler does
    not know, or a setting it does not implement, is refused rather than ignored: the image would not be
    FluxPipeline's."""
    if config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise InputError(f"{path}: _class_name {config['_class_name']!r}: expected FlowMatchEulerDiscreteScheduler")
    known = {f.name for f in fields(FlowSchedule)}
    for key, value in config.items():
        if key in SCHEDULER_FIXED and value != SCHEDULER_FIXED[key]:
            raise InputError(f"{path}: {key}={json.dumps(value)} is not supported (only "
                             f"{json.dumps(SCHEDULER_FIXED[key])}, FLUX.1's)")
        if not key.startswith("_") and key not in known and key not in SCHEDULER_FIXED:  # _diffusers_version, ...
            raise InputError(f"{path}: unknown key {key!r} (not a FlowMatchEulerDiscreteScheduler setting this "
                             f"sampler implements)")
    schedule = FlowSchedule(**{k: v for k, v in config.items() if k in known})
    for key in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
        if not is_number(getattr(schedule, key)):
            raise InputError(f"{path}: {key}={json.dumps(getattr(schedule, key))}: expected a number")
    if not isinstance(schedule.use_dynamic_shifting, bool):
        raise InputError(f"{path}: use_dynamic_shifting={json.dumps(schedule.use_dynamic_shifting)}: expected "
                         f"true or false")
    if schedule.shift <= 0 or schedule.base_image_seq_len == schedule.max_image_seq_len:
        raise InputError(f"{path}: expected shift > 0 and base_image_seq_len != max_image_seq_len (mu's slope "
                         f"divides by their difference)")
    if schedule.shift_terminal is not None and not (is_number(schedule.shift_terminal)
                                                    and 0 <= schedule.shift_terminal < 1):
        raise InputError(f"{path}: shift_terminal={json.dumps(schedule.shift_terminal)}: expected null or a "
                         f"number in [0, 1)")
    return schedule


def read_schedule(flux_dir):
    """A FLUX folder's scheduler/scheduler_config.json as a FlowSchedule; FLUX.1-dev's when the file is absent."""
    path = os.path.join(flux_dir, "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        return FLUX_DEV
    return schedule_from_config(read_json(path), path)


def flux_schedule(steps, seq_len, schedule=FLUX_DEV, mu=None):
    """FluxPipeline's sigmas for `steps` Euler steps on seq_len packed tokens: t = linspace(1, 1/steps, steps),
    shifted, then 0 appended, in float32 as diffusers computes them (numpy, bit for bit). The shift is dynamic
    (time_shift with mu linear in seq_len: 0.5 at 256 tokens, 1.15 at 4096 for FLUX.1-dev; or the given mu, as the
    FLUX.2 pipelines give theirs, flux2_sampling.empirical_mu) or static, sigma = s t / (1 + (s - 1) t), where the
    scheduler ignores a given mu; shift_terminal then stretches 1 - sigma so that the last sigma is that value."""
    s = schedule
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)  # numpy's linspace, as diffusers
    if s.use_dynamic_shifting:
        m = (s.max_shift - s.base_shift) / (s.max_image_seq_len - s.base_image_seq_len)
        sigmas = time_shift(seq_len * m + (s.base_shift - m * s.base_image_seq_len) if mu is None else mu, t)
    else:
        sigmas = s.shift * t / (1 + (s.shift - 1) * t)
    if s.shift_terminal:
        if steps == 1:
            raise InputError("a schedule with shift_terminal needs --steps 2 or more (its one sigma is 1: nothing "
                             "to stretch)")
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - s.shift_terminal))
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


# ----------------------------------------------------------------------------------------------------------------
# The sampler


def euler_sample(model, x, sigmas, cond, guidance, timesteps=None, progress=False):
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1]: x += (sigma_next - sigma) * v, in float32.

    v = cond.velocity(model, ...) (a Conditioning). The latents keep their dtype (bf16 when sampling in bf16, as
    diffusers does; fp32 in training, whatever autocast makes of v). timesteps[i] is what the model is told at
    sigmas[i]; by default FluxPipeline's: sigma * 1000 rounded to the latents' dtype, then / 1000 (training passes
    the official script's truncation, `official_timestep`). The Euler update itself always uses the exact sigmas."""
    if timesteps is None:
        timesteps = (sigmas * 1000).to(x.dtype) / 1000
    timesteps = timesteps.to(x.device)  # one copy to the device, not one per step
    g = torch.full((x.shape[0],), guidance, device=x.device, dtype=x.dtype)
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        v = cond.velocity(model, x, timesteps[i].expand(x.shape[0]), g)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    return x


def initial_noise(batch, height, width, seed, dtype):
    """Packed N(0, I) latents drawn on the CPU exactly as diffusers' FluxPipeline draws them for this seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    return fm.pack(torch.randn((batch, 16, 2 * (height // 16), 2 * (width // 16)), generator=g, dtype=dtype))


def decode_images(ae, x, height, width):
    """Packed latents -> images in [0, 1], (B, 3, H, W)."""
    return (ae.decode(fm.unpack(x, height, width)) / 2 + 0.5).clamp(0, 1)


GRID_STEPS = 28  # the sample grids use FluxPipeline's default inference steps


def autocast(device):
    """bf16 autocast on CUDA, the weights staying fp32 (the master copy AdamW updates); the CPU runs in fp32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def sample_grid(model, ae, conds, height, width, guidance, device, seeds=None, schedule=FLUX_DEV):
    """One row of images, (1, 3, H, n W), for the conditionings `conds`, the i-th from seed seeds[i] (default i; as
    `srpo.py sample --seed`), at FLUX.1-dev's inference settings (28 steps of flux_schedule, `schedule` a folder's;
    the noise and mu the model family's): a training run's before/after view and its held-out evaluations."""
    images, fam = [], family(model)
    for seed, cond in zip(range(len(conds)) if seeds is None else seeds, conds, strict=True):
        x = fam.initial_noise(1, height, width, seed, torch.float32).to(device)
        mu = fam.mu(x.shape[1], GRID_STEPS) if fam.mu else None
        with autocast(device):
            x = euler_sample(model, x, flux_schedule(GRID_STEPS, x.shape[1], schedule, mu), cond.at_guidance(guidance),
                             guidance)
            images.append(decode_images(ae, x, height, width).float())
    return torch.cat(images, dim=3)


# ----------------------------------------------------------------------------------------------------------------
# Models and prompts


def tiny_models(seed=0):
    """The built-in tiny FLUX, autoencoder and text encoders, random with a fixed seed: no files, no downloads."""
    torch.manual_seed(seed)
    model = fm.Flux(fm.FluxConfig.preset("tiny")).eval()
    ae = fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).eval()
    text = fm.TextConditioner.tiny(model.cfg.context_in_dim, model.cfg.vec_in_dim, seed=seed)
    return model, ae, text


def load_flux_folder(flux_dir, transformer_file, dtype, device):
    """A diffusers FLUX.1 folder, optionally with replacement transformer weights (e.g. SRPO's file)."""
    check_folder(flux_dir, "a diffusers FLUX.1 folder")
    sub = os.path.join(flux_dir, "transformer")
    cfg = fw.read_flux_config(sub)
    model = fw.load_transformer(transformer_file or sub, cfg, dtype, device)
    ae = fw.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)
    return model, ae


def tiny_transformer(path, cfg, dtype, device):
    """--transformer without --flux: the tiny demo's transformer (a `srpo.py train` checkpoint; cfg a FluxConfig, or
    with --family flux2 a Flux2Config), sampled with the demo's tiny VAE and text encoders."""
    try:
        return family_of_config(cfg).load(path, cfg, dtype, device)
    except InputError as e:
        raise InputError(f"{e} (without --flux, --transformer is a tiny demo checkpoint's "
                         f"diffusion_pytorch_model.safetensors: give --flux for a FLUX.1 one)") from None


def check_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive multiples of 16, got {height}x{width}")


MAX_TRAINING_SIDE = 1024


def check_training_size(height, width):
    """Training decodes for the reward untiled; the official script decodes with diffusers' VAE tiling, which splits
    images above 1024 px a side into tiles and changes them (4.4e-2 apart at 1040^2, 1.3e-6 at 1024^2): refuse what
    would not be the official reward's image."""
    if max(height, width) > MAX_TRAINING_SIDE:
        raise InputError(f"--height/--width {height}x{width}: training takes at most {MAX_TRAINING_SIDE} px a side "
                         f"(the official decode for the reward is tiled above that, this one is not): train at "
                         f"{MAX_TRAINING_SIDE} or less; `srpo.py sample` takes larger sizes")


def encode_prompts(text, prompts):
    """{prompt: (txt (1, T, ctx), y (1, vec))} on the CPU: each prompt through the text encoders once, so that
    they can be freed before the transformer is loaded (T5-XXL alone is 9.5 GB in bf16)."""
    return {p: tuple(t.cpu() for t in text([p])) for p in dict.fromkeys(prompts)}


class Conditioning(NamedTuple):
    """What FLUX.1 sees besides the latents and the time: the image tokens' positions, the T5 tokens and their
    positions (all zero), the pooled CLIP vector. A model family's seam: the sampler and the training step ask it
    for the velocity and never unpack it, so another family (another model call, classifier-free guidance's two
    passes) is another conditioning class, with at_guidance(g): itself as sampled at scale g (training's rollout
    and the sample grids ask for it)."""

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


def conditioning(embedding, height, width, device, dtype=None):
    """The Conditioning of one prompt's (txt, y) embedding at height x width, on device (in dtype if given)."""
    txt, y = (to_device(t, device).to(dtype or t.dtype) for t in embedding)
    ids = fm.image_ids(height, width, device).to(dtype or torch.float32)
    return Conditioning(ids, txt, torch.zeros(txt.shape[1], 3, device=device, dtype=dtype), y)


class Family(NamedTuple):
    """What a model family changes outside its transformer, for the sampler and the training step: the packed noise
    of a seed, the Conditioning of a prompt's embedding, and the schedule's mu (None: the scheduler's own, FLUX.1's;
    FLUX.2's pipelines give an empirical one)."""

    initial_noise: Callable  # (batch, height, width, seed, dtype) -> packed latents
    conditioning: Callable  # (embedding, height, width, device, dtype=None) -> a Conditioning
    mu: Callable | None = None  # (seq_len, steps) -> mu


FLUX1 = Family(initial_noise, conditioning)


def family(model):
    """The Family of a transformer, by its config: FLUX.2's (flux2_sampling; its noise has the model's latent
    channels), else FLUX.1's (a model without a FLUX config too: a stand-in's)."""
    if isinstance(getattr(model, "cfg", None), f2.Flux2Config):
        noise = functools.partial(f2s.initial_noise, channels=model.cfg.in_channels)
        return Family(noise, f2s.conditioning, f2s.empirical_mu)
    return FLUX1


# ----------------------------------------------------------------------------------------------------------------
# Images


def check_png_path(out):
    """Fail before any work if the image cannot be written there."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"{out}: the folder {folder} does not exist or is not writable")
    if os.path.splitext(out)[1].lower() not in Image.registered_extensions():
        raise InputError(f"{out}: needs an image extension such as .png")


def png_paths(out, n):
    """Where `sample` writes n images for one prompt: `out` itself for one, `stem-i.ext` for several."""
    stem, ext = os.path.splitext(out)
    return [out] if n == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def to_8bit(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the host, rounded as an 8-bit file holds it."""
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu()


def save_png(images, paths):
    """Write images (B, 3, H, W) in [0, 1], one file each, atomically: a file that exists is a whole image (what
    a resumed `sample --prompts` run relies on to skip it)."""
    for pixels, path in zip(to_8bit(images).numpy(), paths, strict=True):
        image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]  # the temporary name has none
        atomic_write(path, functools.partial(Image.fromarray(pixels).save, format=image_format))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Sampling to files: the work of `srpo.py sample` (cli.py makes its SampleConfig from the flags)


@dataclass
class SampleConfig:
    """What `sample` makes and from what: the models, the prompts, the images' settings and where they go."""

    out: str  # a PNG (with batch N: OUT-0.png ..); with prompts, a folder
    flux: str | None = None  # a diffusers FLUX.1 folder; None: the tiny built-in models
    transformer: str | None = None  # replacement transformer weights (one .safetensors file)
    prompt: str | None = None  # None: DEFAULT_PROMPT
    prompts: str | None = None  # a prompt file: line i's images go to out/i.png
    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance: float | None = None  # None: GUIDANCE (ignored, with a note, without a guidance embedding)
    max_sequence_length: int = 512  # T5 tokens
    seed: int = 0
    batch: int = 1  # images per prompt
    dtype: str | None = None  # None: bfloat16 on CUDA, else float32
    lora: str | None = None  # a LoRA file merged into the transformer at load time
    family: str | None = None  # without flux: the tiny demo's family (flux2: `train --family flux2`'s models)
    lora_scale: float = 1.0
    device: str = "cpu"
    attn: str | None = None  # triton | sdpa (None: triton on CUDA)


def sample_jobs(s):
    """(prompt, image paths) pairs: --prompt into --out (with --batch N, OUT-0 .. OUT-(N-1)), or each line i of
    --prompts into --out/i.png (i zero-padded to 5 digits)."""
    if s.prompts is None:
        check_png_path(s.out)
        return [(DEFAULT_PROMPT if s.prompt is None else s.prompt, png_paths(s.out, s.batch))]
    if s.prompt is not None:
        raise InputError("give --prompt or --prompts, not both")
    if os.path.splitext(s.out)[1]:
        raise InputError(f"--out {s.out}: with --prompts, --out is a folder (images 00000.png, ... go in it)")
    prompts = read_prompts(s.prompts)
    check_writable(s.out)
    return [(p, png_paths(os.path.join(s.out, f"{i:05d}.png"), s.batch)) for i, p in enumerate(prompts)]


def image_settings(s, dtype):
    """What `sample`'s images depend on besides their prompt: recorded beside each image in images.jsonl, so that a
    rerun into the folder skips only images that it would have made itself."""
    default_guidance = f2s.GUIDANCE if is_flux2(s) else GUIDANCE
    files = {k: v and os.path.realpath(v) for k, v in [("flux", s.flux), ("transformer", s.transformer),
                                                         ("lora", s.lora)]}
    return {"seed": s.seed, **files, "lora_scale": s.lora_scale if s.lora else None, "height": s.height,
            "width": s.width, "steps": s.steps, "guidance": default_guidance if s.guidance is None else s.guidance,
            "max_sequence_length": s.max_sequence_length, "batch": s.batch,
            "dtype": str(dtype).removeprefix("torch.")}


def check_rerun(out, jobs, settings):
    """A rerun into a `sample --prompts` folder skips the images there: refused if they were made with another
    prompt or settings (a row recording fewer, from an older version, is compared on those it records), since it
    would list them in images.jsonl as made by this command."""
    manifest = os.path.join(out, MANIFEST)
    made = {row["image"]: row for row in manifest_rows(manifest)} if os.path.isfile(manifest) else {}
    for prompt, paths in jobs:
        for path in filter(os.path.exists, paths):
            row, ours = made.get(os.path.abspath(path), {}), {"prompt": prompt, **settings}
            changed = [k for k in ours if k in row and row[k] != ours[k]]
            if changed:
                raise InputError(f"{path} was made with another {', '.join(changed)} than this command's ("
                                 f"{', '.join(f'{k} {row[k]!r}' for k in changed)}; {manifest}): give another --out, "
                                 f"or the same settings to make the rest")


def check_sample_flags(s):
    """What ties the settings together (each flag's range is cli.py's), before anything is read."""
    check_size(s.height, s.width)
    if s.flux and s.family:
        raise InputError("--family is the tiny demo's: with --flux, the folder's model_index.json says the family")
    if s.lora and not os.path.isfile(s.lora):
        raise InputError(f"--lora {s.lora}: no such file (expected a FLUX LoRA .safetensors)")


def is_flux2(s):
    """Whether --flux is a FLUX.2 folder: its model_index.json names a FLUX.2 pipeline (flux_weights.family_of), or
    without --flux whether --family is flux2 (the tiny FLUX.2 demo's models). The tiny built-in models, FluxPipeline
    folders and folders without a model_index.json are FLUX.1's, as before."""
    if not s.flux:
        return s.family == "flux2"
    return os.path.isfile(os.path.join(s.flux, "model_index.json")) and fw.family_of(s.flux) == "flux2"


def sample_models(s, prompts, dtype, device):
    """(model, ae, {prompt: (txt, y)}) of --flux, or the tiny built-in ones; the prompts are encoded first."""
    if not s.flux:
        model, ae, text = tiny_models()
        text.max_length = s.max_sequence_length
        if s.transformer:
            model = tiny_transformer(s.transformer, model.cfg, dtype, device)
        return model.to(device, dtype), ae.to(device, dtype), encode_prompts(text, prompts)
    text = fm.TextConditioner.from_folder(s.flux, dtype, device, s.max_sequence_length)
    embeddings = encode_prompts(text, prompts)  # on the CPU: 4 MiB a prompt for T5-XXL in bf16
    del text  # the text encoders (10 GB for T5-XXL) are not needed past this point
    return *load_flux_folder(s.flux, s.transformer, dtype, device), embeddings


def sample_guidance(s, cfg, rank):
    """--guidance, GUIDANCE unless given. A transformer without a guidance embedding (FLUX.1-schnell: not
    guidance-distilled) has nowhere to take it, and FluxPipeline passes it none: said once if it was given."""
    if not cfg.guidance_embed and s.guidance is not None and rank == 0:
        print("note: this transformer has no guidance embedding (e.g. FLUX.1-schnell): --guidance is ignored",
              file=sys.stderr)
    return GUIDANCE if s.guidance is None else s.guidance


@torch.no_grad()
def sample(s):
    """Each prompt's images from the same --seed: a prompt's images are those of `sample --prompt P --seed S`
    alone, and diffusers' FluxPipeline gives the same for num_images_per_prompt = --batch. The schedule is the
    folder's scheduler config (FLUX.1-dev's without one). A FLUX.2 folder gives Flux2KleinPipeline's (klein) or
    Flux2Pipeline's (dev) images the same way (flux2_sampling.py). A --prompts folder is one run's while it runs
    (OUT/.lock, held by rank 0 for every process, as `train` holds its folder)."""
    check_sample_flags(s)
    rank, world, device = this_process(s.device)
    dtype = parse_dtype(s.dtype, device)
    if world > 1 and not s.prompts:
        raise InputError("under torchrun, sample splits the lines of --prompts over the processes: give --prompts")
    jobs, settings = sample_jobs(s), image_settings(s, dtype)
    with RunLock(s.out) if s.prompts and rank == 0 else contextlib.nullcontext():
        if s.prompts:
            check_rerun(s.out, jobs, settings)
        if s.flux or s.transformer:  # check every file before the slow part
            load_folder = f2s.load_folder if is_flux2(s) else load_flux_folder
            tiny = (f2.Flux2Config if is_flux2(s) else fm.FluxConfig).preset("tiny")
            meta = (load_folder(s.flux, s.transformer, dtype, "meta")[0] if s.flux else
                    tiny_transformer(s.transformer, tiny, dtype, "meta"))
            if s.lora:
                lora.merge_lora(meta, s.lora)
        jobs = my_jobs(s, jobs, settings, rank, world) if s.prompts else jobs
        if jobs:
            make_images(s, jobs, dtype, device, rank)


def my_jobs(s, jobs, settings, rank, world):
    """A --prompts folder's manifest written (rank 0), then this process's share of the jobs whose images are not
    all made yet: prompts are independent, process r of w takes lines r, r + w, ..., with no communication."""
    if rank == 0:
        written(os.path.join(s.out, MANIFEST), functools.partial(write_manifest, s.out, jobs, settings))
    jobs = [(p, paths) for p, paths in jobs[rank::world] if not all(os.path.exists(path) for path in paths)]
    if not jobs:
        print(f"{s.out}: nothing left to make, the images exist")
    return jobs


def make_images(s, jobs, dtype, device, rank):
    """The models loaded (the LoRA merged once: no per-step cost), then each job's images in turn. A FLUX.2 folder
    takes flux2_sampling's models and guidance, and its Family's mu, noise and conditioning; the sampler and the
    rest are the same."""
    flux2, seq_len = is_flux2(s), (s.height // 16) * (s.width // 16)
    schedule = read_schedule(s.flux) if s.flux else FLUX_DEV  # a bad scheduler config: refused before the models
    model, ae, embeddings = (f2s.sample_models if flux2 else sample_models)(s, [p for p, _ in jobs], dtype, device)
    fam = family(model)
    sigmas = flux_schedule(s.steps, seq_len, schedule, fam.mu(seq_len, s.steps) if fam.mu else None)
    if s.lora:
        lora.merge_lora(model, s.lora, s.lora_scale)
    model.set_attention_backend(attention_backend(s.attn, device))
    guidance = f2s.sample_guidance(s, rank) if flux2 else sample_guidance(s, model.cfg, rank)
    sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, guidance, s, fam)


def sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, guidance, s, fam):
    """Each job's images, written as soon as they are made, with the noise and conditioning of the model's Family
    `fam`. SIGTERM / SIGINT stop after the current prompt's images (Stopped),
    a failed write ends with a Fault: the images written are whole, and the same command continues."""
    device, dtype = model.img_in.weight.device, model.img_in.weight.dtype
    again = "the images written are complete, and the same command makes the rest"
    with StopSignals() as signals:
        for done, (prompt, paths) in enumerate(tqdm(jobs, desc="prompts", disable=len(jobs) == 1), 1):
            # one text encoding per prompt, repeated for its images, as FluxPipeline does for num_images_per_prompt
            embedding = tuple(t.expand(s.batch, *t.shape[1:]) for t in embeddings[prompt])
            x = fam.initial_noise(s.batch, s.height, s.width, s.seed, embedding[0].dtype).to(device, dtype)
            cond = fam.conditioning(embedding, s.height, s.width, device, dtype)
            images = decode_images(ae, euler_sample(model, x, sigmas, cond, guidance, progress=len(jobs) == 1),
                                   s.height, s.width)
            try:
                written(", ".join(paths), functools.partial(save_png, images, paths))
            except Fault as e:
                raise Fault(f"{e}; {again}") from None
            for path in paths:
                tqdm.write(path)  # above the progress bar, not through it
            if signals.received and done < len(jobs):
                raise Stopped(f"{signals.received}: stopped after {done} of {len(jobs)} prompts; {again}")
