"""Sampling FLUX as diffusers' FluxPipeline (Flux2KleinPipeline, Flux2Pipeline) does: the schedule a folder's scheduler
config asks for, the Euler sampler, decoding; and the `sample` command (one prompt, or a prompt file with models
loaded once). What a model family changes (its noise, conditioning, mu, models) is its Family's (families.py).

Flow matching: x_sigma = sigma * eps + (1 - sigma) * x0; the model predicts v ~ eps - x0."""

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import families
import flux_model as fm
from common import bounds
from common.util import (
    MANIFEST,
    Fault,
    InputError,
    RunLock,
    Stopped,
    StopSignals,
    atomic_write,
    attention_backend,
    check_writable,
    manifest_rows,
    parse_dtype,
    read_json,
    read_prompts,
    this_process,
    write_manifest,
    written,
)
from sampling import flux_sampling
from weights import lora

# ----------------------------------------------------------------------------------------------------------------
# The schedule: FluxPipeline's sigmas, from a folder's FlowMatchEulerDiscreteScheduler config


DEFAULT_PROMPT = "a photo of a red fox in the snow"


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


def decode_images(ae, x, height, width):
    """Packed latents -> images in [0, 1], (B, 3, H, W)."""
    return (ae.decode(fm.unpack(x, height, width)) / 2 + 0.5).clamp(0, 1)


GRID_STEPS = 28  # the sample grids use FluxPipeline's default inference steps


def autocast(device):
    """bf16 autocast on CUDA, the weights staying fp32 (the master copy AdamW updates); the CPU runs in fp32.

    Autocast's cache keeps its bf16 cast of every fp32 weight that requires grad until the region ends. Without
    gradient it stays on: the rollout's 25 (the grids' 28) forwards then cast each weight once, not once a forward,
    which is speed that matters, at the cost of a bf16 copy of the trained fp32 weights for the region (no copy under
    FSDP2, whose gathered weights are bf16 already), which training.memory counts. With gradient it is off: a training
    call makes one or two forwards a region, so at most one more cast a weight, while the cache would hold a bf16 copy
    of every trained weight through the forward, copies that activation checkpointing keeps out of the graph."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda",
                          cache_enabled=not torch.is_grad_enabled())


@torch.no_grad()
def sample_grid(family, model, ae, conds, height, width, guidance, device, seeds=None, schedule=FLUX_DEV):
    """One row of images, (1, 3, H, n W), for the conditionings `conds`, the i-th from seed seeds[i] (default i; as
    `srpo.py sample --seed`), at FLUX.1-dev's inference settings (28 steps of flux_schedule, `schedule` a folder's;
    the noise and mu the model's `family`'s): a training run's before/after view and its held-out evaluations."""
    images, noise = [], family.noise_of(model)
    for seed, cond in zip(range(len(conds)) if seeds is None else seeds, conds, strict=True):
        x = noise(1, height, width, seed, torch.float32).to(device)
        mu = family.mu(x.shape[1], GRID_STEPS) if family.mu else None
        with autocast(device):
            x = euler_sample(model, x, flux_schedule(GRID_STEPS, x.shape[1], schedule, mu), cond.at_guidance(guidance),
                             guidance)
            images.append(decode_images(ae, x, height, width).float())
    return torch.cat(images, dim=3)


# ----------------------------------------------------------------------------------------------------------------
# Checks and image files


def check_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive multiples of 16, got {height}x{width}")


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
# Sampling to files: the work of `srpo.py sample`

# Where `sample` writes without --out: under runs/ (git ignores it, train writes there too), not beside the code
SAMPLE_PNG, SAMPLE_FOLDER = os.path.join("runs", "sample.png"), os.path.join("runs", "samples")


@dataclass
class SampleConfig:
    """What `sample` makes and from what: the models, the prompts, the images' settings and where they go. Each field
    with a help is a flag of `srpo.py sample`, made from the field as train's are from srpo.TrainConfig's: `name:
    Annotated[type, range, help] = default` (the default: a real model's; TINY's without --flux)."""

    flux: Annotated[str | None, "diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/; its "
                    "scheduler/scheduler_config.json sets the schedule, FLUX.1-dev's when absent), or FLUX.2 folder "
                    "([klein] or [dev], as its model_index.json says)"] = None
    transformer: Annotated[str | None, "replacement transformer weights: one .safetensors file, diffusers or BFL keys "
                           "(e.g. SRPO's diffusion_pytorch_model.safetensors); without --flux, a tiny demo "
                           "checkpoint's"] = None
    family: Annotated[str | None, "without --flux, the tiny demo's model family (default: --transformer's own, as its "
                      "config.json or keys say, else flux1); flux2: `train --family flux2`'s tiny FLUX.2 and "
                      "Qwen3"] = None
    demo: Annotated[str | None, "without --flux, which tiny demo's models: world (FLUX.1's, trained on the tiny "
                    "world: docs/world.md) or random (built in code); default: the one --transformer's checkpoint "
                    "fits, else the family's first"] = None
    prompt: Annotated[str | None, f"text prompt (default: {DEFAULT_PROMPT!r})"] = None
    prompts: Annotated[str | None, "prompt file, one per line: the images of line i (from 0) go to --out/i.png "
                       "(00000.png, ...), listed with their prompts in --out/images.jsonl; the models load once, and "
                       "a run started again skips the prompts whose images exist"] = None
    height: Annotated[int, bounds.SIZE, "image height, a multiple of 16"] = 1024
    width: Annotated[int, bounds.SIZE, "image width, a multiple of 16"] = 1024
    steps: Annotated[int, bounds.TIMESTEPS, "Euler steps; FLUX.1-schnell: 4"] = 50
    guidance: Annotated[float | None, bounds.GUIDANCE,
                        "distilled guidance scale (default 3.5; ignored, with a note, by a transformer without a "
                        "guidance embedding such as FLUX.1-schnell's); FLUX.2 (default 4): klein base's "
                        "classifier-free guidance scale (two passes a step above 1), dev's guidance embedding, "
                        "ignored by klein distilled"] = None
    max_sequence_length: Annotated[int, bounds.TOKENS,
                                   "T5 prompt tokens, 1..512, as FluxPipeline (FLUX.1-schnell is run with 256); "
                                   "FLUX.2: Qwen3 / Mistral-3 tokens, chat template included, as its "
                                   "pipelines"] = 512
    seed: Annotated[int, bounds.SEED, "noise seed: the same seed gives diffusers' image"] = 0
    batch: Annotated[int, bounds.IMAGES_PER_PROMPT, "images per prompt (diffusers' num_images_per_prompt)"] = 1
    out: Annotated[str | None, f"output PNG (default {SAMPLE_PNG}); with --batch N, OUT-0.png .. OUT-(N-1).png; with "
                   f"--prompts, a folder (default {SAMPLE_FOLDER})"] = None
    dtype: Annotated[str | None, "float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)"] = None
    lora: Annotated[str | None, "a FLUX LoRA (a training checkpoint's pytorch_lora_weights.safetensors, or a "
                    "diffusers/PEFT one) merged into the transformer's weights once, at load time"] = None
    lora_scale: Annotated[float, bounds.FINITE, "strength of --lora"] = 1.0
    device: str = "cpu"  # the command line's --device and --attn are train's too (cli.device_flags)
    attn: str | None = None  # triton | sdpa (None: triton on CUDA)


# Without --flux, the tiny built-in model: small and offline, so small images and prompts
TINY = {"height": 64, "width": 64, "max_sequence_length": 32}


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


def image_settings(s, dtype, family):
    """What `sample`'s images depend on besides their prompt: recorded beside each image in images.jsonl, so that a
    rerun into the folder skips only images that it would have made itself."""
    default_guidance = family.guidance
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
    """What ties the settings together (each flag's range is cli.py's), before anything is read. -> the model
    family (--family with --flux refused, a bad model_index.json too)."""
    check_size(s.height, s.width)
    family = families.decide(s.flux, s.family, s.transformer)
    family.demo(s.demo, s.flux)
    if s.lora and not os.path.isfile(s.lora):
        raise InputError(f"--lora {s.lora}: no such file (expected a FLUX LoRA .safetensors)")
    return family


@torch.no_grad()
def sample(s):
    """Each prompt's images from the same --seed: a prompt's images are those of `sample --prompt P --seed S`
    alone, and diffusers' FluxPipeline gives the same for num_images_per_prompt = --batch. The schedule is the
    folder's scheduler config (FLUX.1-dev's without one). A FLUX.2 folder gives Flux2KleinPipeline's (klein) or
    Flux2Pipeline's (dev) images the same way (sampling/flux2_sampling.py). A --prompts folder is one run's while it
    runs (OUT/.lock, held by rank 0 for every process, as `train` holds its folder). Without --out: SAMPLE_PNG
    (its runs/ made first, as train makes its --out), or SAMPLE_FOLDER with --prompts."""
    if s.out is None:
        s = replace(s, out=SAMPLE_FOLDER if s.prompts else SAMPLE_PNG)
    if s.out == SAMPLE_PNG:
        check_writable(os.path.dirname(SAMPLE_PNG))
    fam = check_sample_flags(s)
    rank, world, device = this_process(s.device)
    dtype = parse_dtype(s.dtype, device)
    if world > 1 and not s.prompts:
        raise InputError("under torchrun, sample splits the lines of --prompts over the processes: give --prompts")
    jobs, settings = sample_jobs(s), image_settings(s, dtype, fam)
    with RunLock(s.out) if s.prompts and rank == 0 else contextlib.nullcontext():
        if s.prompts:
            check_rerun(s.out, jobs, settings)
        if s.flux or s.transformer:  # check every file before the slow part
            meta = (fam.load_folder(s.flux, s.transformer, dtype, "meta")[0] if s.flux else
                    flux_sampling.demo_transformer(s, fam.demos, fam.load, dtype, "meta")[0])
            if s.lora:
                lora.merge_lora(meta, s.lora)
        jobs = my_jobs(s, jobs, settings, rank, world) if s.prompts else jobs
        if jobs:
            make_images(s, jobs, dtype, device, rank, fam)


def my_jobs(s, jobs, settings, rank, world):
    """A --prompts folder's manifest written (rank 0), then this process's share of the jobs whose images are not
    all made yet: prompts are independent, process r of w takes lines r, r + w, ..., with no communication."""
    if rank == 0:
        written(os.path.join(s.out, MANIFEST), functools.partial(write_manifest, s.out, jobs, settings))
    jobs = [(p, paths) for p, paths in jobs[rank::world] if not all(os.path.exists(path) for path in paths)]
    if not jobs:
        print(f"{s.out}: nothing left to make, the images exist")
    return jobs


def make_images(s, jobs, dtype, device, rank, fam):
    """The models loaded (the LoRA merged once: no per-step cost), then each job's images in turn: the family's
    models, guidance, mu, noise and conditioning (`fam`, a families.Family); the sampler and the rest are the same."""
    seq_len = (s.height // 16) * (s.width // 16)
    schedule = read_schedule(s.flux) if s.flux else FLUX_DEV  # a bad scheduler config: refused before the models
    model, ae, embeddings = fam.sample_models(s, [p for p, _ in jobs], dtype, device)
    sigmas = flux_schedule(s.steps, seq_len, schedule, fam.mu(seq_len, s.steps) if fam.mu else None)
    if s.lora:
        lora.merge_lora(model, s.lora, s.lora_scale)
    model.set_attention_backend(attention_backend(s.attn, device))
    guidance = fam.sample_guidance(s, model.cfg, rank)
    sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, guidance, s, fam)


def sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, guidance, s, fam):
    """Each job's images, written as soon as they are made, with the noise and conditioning of the model's family
    `fam`. SIGTERM / SIGINT stop after the current prompt's images (Stopped),
    a failed write ends with a Fault: the images written are whole, and the same command continues."""
    device, dtype, noise = model.img_in.weight.device, model.img_in.weight.dtype, fam.noise_of(model)
    again = "the images written are complete, and the same command makes the rest"
    with StopSignals() as signals:
        for done, (prompt, paths) in enumerate(tqdm(jobs, desc="prompts", disable=len(jobs) == 1), 1):
            # one text encoding per prompt, repeated for its images, as FluxPipeline does for num_images_per_prompt
            embedding = tuple(t.expand(s.batch, *t.shape[1:]) for t in embeddings[prompt])
            x = noise(s.batch, s.height, s.width, s.seed, embedding[0].dtype).to(device, dtype)
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
