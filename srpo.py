"""SRPO on FLUX.1-dev in one script.

    python srpo.py train                                                    # SRPO; no flags: tiny offline demo
    python srpo.py train --flux FLUX_DIR --hps HPS_v2.1_compressed.pt --prompts FILE --out DIR
    python srpo.py sample --flux FLUX_DIR --prompt "a cat" --out cat.png    # FLUX.1-dev, same image as diffusers
    python srpo.py sample --flux SCHNELL_DIR --steps 4 --max-sequence-length 256 --prompt "a cat"  # FLUX.1-schnell
    python srpo.py sample                                                   # tiny built-in model, offline, seconds
    python srpo.py sample --flux FLUX_DIR --prompts prompts.txt --out DIR   # one image per line, models loaded once
    python srpo.py score --hps HPS_v2.1_compressed.pt --tokenizer FLUX_DIR --prompt "a cat" cat.png   # HPS score

Every command runs offline. Bad input ends in one line on stderr and exit code 2.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import flux_model as fm
from flux_model import InputError

# ----------------------------------------------------------------------------------------------------------------
# Sampling: flow matching, x_sigma = sigma * eps + (1 - sigma) * x0, the model predicts v ~ eps - x0.

DEFAULT_PROMPT = "a photo of a red fox in the snow"
MANIFEST = "images.jsonl"  # in a `sample --prompts` folder: every image with its prompt


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
    return schedule_from_config(fm.read_json(path), path)


def flux_schedule(steps, seq_len, schedule=FLUX_DEV):
    """FluxPipeline's sigmas for `steps` Euler steps on seq_len packed tokens: t = linspace(1, 1/steps, steps),
    shifted, then 0 appended, in float32 as diffusers computes them (numpy, bit for bit). The shift is dynamic
    (time_shift with mu linear in seq_len: 0.5 at 256 tokens, 1.15 at 4096 for FLUX.1-dev) or static,
    sigma = s t / (1 + (s - 1) t); shift_terminal then stretches 1 - sigma so that the last sigma is that value."""
    s = schedule
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)  # numpy's linspace, as diffusers
    if s.use_dynamic_shifting:
        m = (s.max_shift - s.base_shift) / (s.max_image_seq_len - s.base_image_seq_len)
        sigmas = time_shift(seq_len * m + (s.base_shift - m * s.base_image_seq_len), t)
    else:
        sigmas = s.shift * t / (1 + (s.shift - 1) * t)
    if s.shift_terminal:
        if steps == 1:
            raise InputError("a schedule with shift_terminal needs --steps 2 or more (its one sigma is 1: nothing "
                             "to stretch)")
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - s.shift_terminal))
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def euler_sample(model, x, sigmas, cond, guidance, timesteps=None, progress=False):
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1]: x += (sigma_next - sigma) * v, in float32.

    cond = (img_ids, txt, txt_ids, y). The latents keep their dtype (bf16 when sampling in bf16, as diffusers does;
    fp32 in training, whatever autocast makes of v). timesteps[i] is what the model is told at sigmas[i]; by
    default FluxPipeline's: sigma * 1000 rounded to the latents' dtype, then / 1000 (training passes the official
    script's truncation, `official_timestep`). The Euler update itself always uses the exact sigmas."""
    from tqdm import tqdm

    img_ids, txt, txt_ids, y = cond
    if timesteps is None:
        timesteps = (sigmas * 1000).to(x.dtype) / 1000
    timesteps = timesteps.to(x.device)  # one copy to the device, not one per step
    g = torch.full((x.shape[0],), guidance, device=x.device, dtype=x.dtype)
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        v = model(x, img_ids, txt, txt_ids, y, timesteps[i].expand(x.shape[0]), g)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    return x


def initial_noise(batch, height, width, seed, dtype):
    """Packed N(0, I) latents drawn on the CPU exactly as diffusers' FluxPipeline draws them for this seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    return fm.pack(torch.randn((batch, 16, 2 * (height // 16), 2 * (width // 16)), generator=g, dtype=dtype))


def decode_images(ae, x, height, width):
    """Packed latents -> images in [0, 1], (B, 3, H, W)."""
    return (ae.decode(fm.unpack(x, height, width)) / 2 + 0.5).clamp(0, 1)


def check_png_path(out):
    """Fail before any work if the image cannot be written there."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"{out}: the folder {folder} does not exist or is not writable")
    if os.path.splitext(out)[1].lower() not in Image.registered_extensions():
        raise InputError(f"{out}: needs an image extension such as .png")


def png_paths(out, n):
    """Where `sample` writes n images for one prompt: `out` itself for one, `stem-i.ext` for several."""
    stem, ext = os.path.splitext(out)
    return [out] if n == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def save_png(images, paths):
    """Write images (B, 3, H, W) in [0, 1], one file each, atomically: a file that exists is a whole image (what
    a resumed `sample --prompts` run relies on to skip it)."""
    from PIL import Image

    for img, path in zip(images, paths, strict=True):
        pixels = (img.permute(1, 2, 0).float() * 255).round().to(torch.uint8).cpu().numpy()
        image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]  # the temporary name has none
        fm.atomic_write(path, functools.partial(Image.fromarray(pixels).save, format=image_format))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Building the models


def tiny_models(seed=0):
    """The built-in tiny FLUX, autoencoder and text encoders, random with a fixed seed: no files, no downloads."""
    torch.manual_seed(seed)
    model = fm.Flux(fm.FluxConfig.preset("tiny")).eval()
    ae = fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).eval()
    text = fm.TextConditioner.tiny(model.cfg.context_in_dim, model.cfg.vec_in_dim, seed=seed)
    return model, ae, text


def load_flux_folder(flux_dir, transformer_file, dtype, device):
    """A diffusers FLUX.1 folder, optionally with replacement transformer weights (e.g. SRPO's file)."""
    fm.check_folder(flux_dir, "a diffusers FLUX.1 folder")
    sub = os.path.join(flux_dir, "transformer")
    cfg = fm.read_flux_config(sub)
    model = fm.load_transformer(transformer_file or sub, cfg, dtype, device)
    ae = fm.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)
    return model, ae


def parse_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive multiples of 16, got {height}x{width}")


# ----------------------------------------------------------------------------------------------------------------
# Direct-Align with SRPO's relative reward (python srpo.py train)
#
# One optimizer step as the official FLUX.1-dev script (Tencent-Hunyuan/SRPO, fastvideo/SRPO.py) takes it, for each
# prompt of the global batch:
#   eps ~ N(0, I), one draw shared by every prompt and rank          shared_noise
#   x0 = Euler rollout of the current model from eps, no gradient    online_rollout
#   sel -> each branch's (sigma_from, sigma_to) inside the window    timestep_window, draw_timestep, branch_sigmas
#   denoise branch:   sigma_hi -> sigma_t, SRP reward with (P, N)    direct_align, k_schedule, direct_align_loss
#   inversion branch: sigma_lo -> sigma_t, SRP reward with (N, P)
#   loss = relu(0.7 - r_d) / 2 + relu(0.7 - r_i) / 2                 hinge_loss
# then the gradient norm is clipped and AdamW steps. Only the two branch model calls carry gradient.

TRAIN_USAGE = """SRPO (Direct-Align + semantic relative preference) on FLUX.1-dev with an HPS, PickScore or CLIP reward.

    python srpo.py train                       # tiny offline demo on the CPU (random tiny models, ~20 s)
    python srpo.py train --flux FLUX_DIR --hps HPS_v2.1_compressed.pt --prompts prompts.txt --out runs/srpo
    python srpo.py train --flux FLUX_DIR --reward pickscore --pickscore PickScore_v1 --prompts prompts.txt --out runs/ps
    torchrun --nproc_per_node=8 srpo.py train --flux ...   # FSDP2: the 32 prompts of a step, 4 per GPU
    python srpo.py train --out runs/srpo --resume ...      # continue from the latest complete checkpoint

Every hyperparameter defaults to the official run (global batch 32 prompts, whatever the number of processes; 19
updates, as the released checkpoint holds); the demo only changes --lr, --height/--width, --batch (one prompt per
process) and the length.

Rewards (--reward, the official --reward_model): hps, HPSv2.1 (--hps CKPT); pickscore, PickScore_v1 (--pickscore DIR);
clip, laion CLIP-ViT-H-14 (--clip DIR). DIR is a local transformers CLIPModel folder; its CLIP tokenizer is the
folder's own vocab.json + merges.txt when it has them, else --flux's tokenizer/ (the same CLIP vocabulary). As in the
official script, PickScore and CLIP tokenize captions as CLIPProcessor (padding, truncation to 77) and reward
exp(logit_scale) / 20 * img . ((1 + k) t+ - t-), "comparable with HPS". The control words were designed for HPS: the
official README warns that they may suit PickScore less. Each reward's official launch script sets its defaults
(CLIP has none: it takes the HPS values); a flag you give wins:"""
WINDOW_GRID = 50  # the window is cut from the 50-step shift-3 schedule, as the official script does
# The official script's gap is int((1 - 0.9) * 1000) + 1, and (1 - 0.9) * 1000 is 99.99999999999997 in floating
# point: its K_max is 100.
K_MAX = int((1 - 0.9) * 1000) + 1
CHECKPOINT = "checkpoint-{:06d}"
GRID_STEPS = 28  # the sample grids use FluxPipeline's default inference steps
DEMO_PROMPTS = (DEFAULT_PROMPT, "a portrait of an old fisherman in natural light",
                "a bowl of ripe peaches on a wooden table", "a lighthouse on a cliff at dawn",
                "a city street in the rain at night", "a honeybee on a sunflower, close-up",
                "a mountain lake with pine trees", "a cup of coffee on a cafe terrace")


def option(default, help, choices=None):
    """A TrainConfig field that is also a flag of `srpo.py train` (--name-with-dashes), with its help text."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # The official run (Tencent-Hunyuan/SRPO on FLUX.1-dev with HPSv2.1; REWARD_RECIPES: PickScore's, CLIP's).
    reward: str = option("hps", "the reward trained against: HPSv2.1 (--hps), PickScore (--pickscore) or CLIP-H "
                         "(--clip), as the official --reward_model; it picks the per-reward defaults (the table above)",
                         choices=("hps", "pickscore", "clip"))
    lr: float = option(5e-6, "AdamW learning rate, constant")
    betas: tuple = option((0.9, 0.999), "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    grad_clip: float = option(0.1, "clip the gradient norm to this")
    height: int = option(720, "training image height, a multiple of 16")
    width: int = option(720, "training image width, a multiple of 16")
    rollout_steps: int = option(25, "Euler steps of the online rollout")
    shift: float = option(3.0, "time shift s of the rollout and window schedules: sigma = s t / (1 + (s - 1) t)")
    rollout_guidance: float = option(1.0, "guidance of the online rollout")
    guidance: float = option(3.5, "guidance of the two branch model calls and of the sample grids")
    window: tuple = option((5, 25), "training window: sigmas between S[A] and S[B], S = shift(linspace(1, 0, 51))")
    window_points: int = option(1000, "N, points of the window grid sigmas_l = linspace(S[A], S[B], N)")
    max_gap: int = option(K_MAX, "K_max, the largest gap in window points between a branch's start and sigma_t "
                          "(the official int((1 - 0.9) * 1000) + 1, which is 100 in floating point)")
    k_denoise: tuple = option((0.1, 0.25), "k of the denoise branch's SRP reward: linspace(A, B, N)[sel]")
    k_inversion: tuple = option((0.3, 0.01), "k of the inversion branch: linspace(A, B, N)[max(sel - K, 1)]")
    margin: float = option(0.7, "hinge margin m: loss = relu(m - r) / 2 per branch")
    # The run.
    steps: int = option(19, "optimizer updates, numbered 1..N; update s uses the control words of step s. The "
                        "official loop counts to 20 but its step 20 only saves, so its released checkpoint holds "
                        "19 updates: the default (a resumed run stops at N too)")
    save_every: int = option(5, "save a checkpoint every N updates (and after the last one)")
    keep: int = option(1, "complete checkpoints kept; older ones are deleted once a newer one is complete")
    batch: int = option(32, "prompts per optimizer step (global batch), split over the processes: each runs "
                        "batch / world of them (tiny demo: one per process)")
    seed: int = option(0, "seed of the prompt order, the shared noise and the timestep draws")
    samples: int = option(4, "prompts (the first of the prompt list) in the before/after sample grids; 0: none")


# The tiny built-in demo learns on random tiny models, which need a far larger step than FLUX.1-dev to move the
# reward within a minute or two; everything else keeps the official values (and --batch is one prompt per process,
# so that the demo runs under torchrun with any number of processes).
DEMO_DEFAULTS = {"lr": 1e-3, "height": 64, "width": 64, "steps": 80, "save_every": 20}

# Each reward's official recipe where it differs from TrainConfig's (the HPS launch script, SRPO_training_hpsv2.sh,
# on fastvideo/SRPO.py's defaults). PickScore: SRPO_training_ps.sh (--train_guidence 2, --train_timestep 5 30,
# --discount_pos 0.1 0.5, --discount_inv 0.6 0.01; nothing else differs). CLIP has no launch script nor recipe of
# its own: fastvideo/SRPO.py's defaults for the window and both k schedules are the HPS values, so a CLIP run is the
# HPS launch script with --reward_model CLIP, and CLIP takes the HPS values.
REWARD_RECIPES = {
    "hps": {},
    "pickscore": {"rollout_guidance": 2.0, "window": (5, 30), "k_denoise": (0.1, 0.5), "k_inversion": (0.6, 0.01)},
    "clip": {},
}


def derive_seed(seed, *keys):
    """A 63-bit seed for the stream named by keys: the same numbers on every rank and after a resume."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shifted_schedule(steps, shift):
    """sigma_i = s t_i / (1 + (s - 1) t_i), t = linspace(1, 0, steps + 1): SD3's time shift (SRPO: s = 3). float32."""
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def official_timestep(sigma):
    """The timestep the official script hands the transformer at sigma: int(1000 sigma) / 1000, in float32.

    The truncation is what the released SRPO checkpoint was trained with: the rollout and both branches feed it to
    the model, while the Euler updates, the noise injection and the recovery use the exact sigma."""
    return torch.floor(sigma * 1000) / 1000


def autocast(device):
    """bf16 autocast on CUDA, the weights staying fp32 (the master copy AdamW updates); the CPU runs in fp32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def to_device(t, device):
    """t copied to device without stalling the host: asynchronously, from pinned memory, on CUDA."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def shared_noise(cfg, step, device):
    """eps ~ N(0, I) in bf16 values, one draw per step used by the rollout, the noise injection and the recovery of
    every prompt on every rank. The official script draws it in bf16 on rank 0 and broadcasts it; here a float32
    draw seeded by (seed, step) is rounded to bf16: every rank makes the same tensor with no communication, and
    makes it again after a resume."""
    seed = derive_seed(cfg.seed, "noise", step)
    return to_device(initial_noise(1, cfg.height, cfg.width, seed, torch.float32).bfloat16().float(), device)


@functools.cache
def rollout_schedule(steps, shift, device):
    """The rollout's sigmas (on the host: Euler's scalars) and its official timesteps, moved to the device once."""
    sigmas = shifted_schedule(steps, shift)
    return sigmas, to_device(official_timestep(sigmas), device)


@torch.no_grad()
def online_rollout(model, eps, cond, cfg):
    """x0 = Euler(eps) over shift(linspace(1, 0, 26)) at the rollout guidance, no gradient: the clean image that
    Direct-Align noises and recovers is the current model's own sample (online)."""
    sigmas, timesteps = rollout_schedule(cfg.rollout_steps, cfg.shift, eps.device)
    with autocast(eps.device):
        return euler_sample(model, eps, sigmas, cond, cfg.rollout_guidance, timesteps)


def timestep_window(cfg):
    """sigmas_l = linspace(S[A], S[B], N), S = shift(linspace(1, 0, 51)), (A, B) = (5, 25): sigma 0.964 .. 0.75.
    Training stays off the late, low-noise steps, where optimizing the reward invites reward hacking."""
    S = shifted_schedule(WINDOW_GRID, cfg.shift)
    return torch.linspace(S[cfg.window[0]].item(), S[cfg.window[1]].item(), cfg.window_points)


def draw_timestep(cfg, step, j):
    """sel ~ U{5 .. N - 5} for prompt j of the global batch, drawn from (seed, step, j): the same on any number
    of ranks."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "timestep", step, j))
    return int(torch.randint(5, cfg.window_points - 4, (), generator=g))


def branch_sigmas(window, sel, max_gap):
    """Each branch's (sigma_from, sigma_to) on the window w (N points, sigma falling), as the official script:

        K = min(K_max, N - sel, sel)
        denoise:   w[N - sel - K] -> w[N - sel]      (sigma_hi, noisier, down to sigma_t)
        inversion: w[N - mid] -> w[N - start],  mid = max(sel - K, 1), start = min(mid + K, N)

    For sel > K the inversion branch is w[N - sel + K] -> w[N - sel], up to the same sigma_t. For sel <= K (about
    10 % of draws) mid = 1: it starts at w[N - 1] and ends one window point noisier than the denoise branch's
    sigma_t, and recovers there; the official script does this, so it is kept. -> (denoise, inversion, K), each
    branch a pair of 0-d float32 tensors."""
    n = len(window)
    gap = min(max_gap, n - sel, sel)
    mid = max(sel - gap, 1)
    start = min(mid + gap, n)
    return (window[n - sel - gap], window[n - sel]), (window[n - mid], window[n - start]), gap


def k_schedule(cfg, sel, gap):
    """k_d = linspace(0.1, 0.25, N)[sel], k_i = linspace(0.3, 0.01, N)[max(sel - K, 1)]: how much the positive
    caption outweighs the negative one in each branch's SRP reward."""
    n = cfg.window_points
    return torch.linspace(*cfg.k_denoise, n)[sel].item(), torch.linspace(*cfg.k_inversion, n)[max(sel - gap, 1)].item()


def inject_noise(x0, eps, sigma):
    """x_sigma = sigma eps + (1 - sigma) x0: the flow-matching interpolation, with the step's shared eps."""
    return sigma * eps + (1 - sigma) * x0


def model_step(model, x, sigma_from, sigma_to, cond, guidance):
    """x' = x + (sigma_to - sigma_from) v(x, t(sigma_from)): one Euler step, one model call (with gradient when
    enabled), t the official truncated timestep. Down in sigma for the denoise branch, up (an inversion step) for
    the inversion branch."""
    img_ids, txt, txt_ids, y = cond
    b = x.shape[0]
    t = official_timestep(sigma_from).item()  # a host tensor: filled in on the device, no copy
    v = model(x, img_ids, txt, txt_ids, y, x.new_full((b,), t), x.new_full((b,), guidance))
    return x + (sigma_to - sigma_from) * v.float()


def recover_x0(x, eps, sigma):
    """x0_hat = (x_sigma - sigma eps) / (1 - sigma): the clean image by interpolation with the known noise, in
    place of the remaining denoising steps (Direct-Align's noise prior)."""
    return (x - sigma * eps) / (1 - sigma)


def direct_align(model, x0, eps, sigma_from, sigma_to, cond, guidance):
    """Inject noise at sigma_from, one model step to sigma_to, recover x0_hat there. A perfect model (v = eps - x0)
    gives back x0 exactly, for any pair of sigmas; a real one shows its error at sigma_to in a clean image."""
    with autocast(x0.device):
        x = model_step(model, inject_noise(x0, eps, sigma_from), sigma_from, sigma_to, cond, guidance)
    return recover_x0(x, eps, sigma_to)


def hinge_loss(r, margin):
    """L = relu(m - r) / 2 per branch (ReFL's hinge): pushes the reward up until it passes the margin."""
    return F.relu(margin - r).mean() / 2


def direct_align_loss(model, ae, reward, x0, eps, cond, prompt, sel, step, cfg, scale):
    """Both branches for one prompt, each backpropagated as soon as it is built so one graph is alive at a time:

        denoise:   x0_d = direct_align(sigma_hi -> sigma_t),  r_d = SRP(img(x0_d), "P. prompt", "N. prompt", k_d)
        inversion: x0_i = direct_align(sigma_lo -> sigma_t),  r_i = SRP(img(x0_i), "N. prompt", "P. prompt", k_i)
        L = relu(m - r_d) / 2 + relu(m - r_i) / 2,  its gradient scaled by `scale`

    with SRP(img, pos, neg, k) = img . ((1 + k) t_pos - t_neg) (reward.py) and the control words (P, N) of update
    `step`; the words go to the reward only, never to the model. The inversion step goes up in sigma, so its x0_hat
    moves with +v where the denoise branch's moves with -v: rewarding N there pushes the denoising direction away
    from N. Returns (L, r_d, r_i), a tensor on the device: read once per step.

    Under FSDP every backward reduce-scatters its gradients: deferring the reduction to the step's last backward
    would hold a full unsharded fp32 gradient (47.6 GB for FLUX.1-dev) on every GPU, for a few percent of step
    time."""
    from reward import control_words

    denoise, inversion, gap = branch_sigmas(timestep_window(cfg), sel, cfg.max_gap)
    k_d, k_i = k_schedule(cfg, sel, gap)
    pos, neg = control_words(step)
    values = []
    for (sigma_from, sigma_to), k, words in ((denoise, k_d, (pos, neg)), (inversion, k_i, (neg, pos))):
        x0_hat = direct_align(model, x0, eps, sigma_from, sigma_to, cond, cfg.guidance)
        with autocast(x0.device):  # the reward too: bf16, not the official fp16 (see run_training)
            images = decode_images(ae, x0_hat, cfg.height, cfg.width)
            r = reward.relative_reward(images, [prompt], k, *words, preprocess_mode="crop")  # SRPO's training crop
        branch = hinge_loss(r, cfg.margin)
        (branch * scale).backward()
        values += [branch.detach(), r.detach().mean()]
    return torch.stack([values[0] + values[2], values[1], values[3]])


# ----------------------------------------------------------------------------------------------------------------
# Faults and stop signals: a run ends with one line and an exit code that says which (README, "Exit codes")

EXIT_INPUT = 2  # bad input: nothing was done
EXIT_FAULT = 74  # EX_IOERR (sysexits.h): a write failed under the run; the last complete checkpoint is intact
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; run it again (with --resume) to continue


class Fault(Exception):
    """A write that failed under the run: disk full, quota, permissions changed, a vanished mount."""


class Stopped(Exception):
    """SIGTERM or SIGINT: the run stopped cleanly, where it can continue."""


def written(what, write):
    """write(), with an OSError turned into a Fault naming what could not be written and why."""
    try:
        return write()
    except OSError as e:
        raise Fault(f"could not write {what} ({e.strerror or e})") from None


class StopSignals:
    """While active, the first SIGTERM or SIGINT only sets `received`: the loop finishes its step (or image), saves
    and raises Stopped. A second signal stops at once. A scheduler signals the whole process group and torchrun
    then forwards the same signal to its workers, so a worker gets it twice within moments: repeats within
    REPEAT_S seconds count as one."""

    REPEAT_S = 2.0

    def __init__(self):
        self.received, self.at = None, 0.0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()
            print(f"\n{self.received}: stopping at the end of this step (a second signal stops at once)",
                  file=sys.stderr)
        elif time.monotonic() - self.at > self.REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


# ----------------------------------------------------------------------------------------------------------------
# Training: processes, prompts, the models, checkpoints, the loop


@dataclass
class Ranks:
    """This process in the run: rank of world (torchrun: one process per GPU), and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0

    def mean(self, t):
        """The mean over all ranks of a tensor on the device (every rank gets it)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t / self.world

    def from_main(self, obj):
        """Rank 0's value of obj on every rank (what rank 0 decided: the checkpoint to resume, or an error)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag):
        """True on every rank if it is true on any: the collective decision to stop at this step boundary."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def main_writes(self, what, write):
        """write() on rank 0; its Fault is raised on every rank (the others would wait for rank 0 forever)."""
        error = None
        if self.main:
            try:
                written(what, write)
            except Fault as e:
                error = str(e)
        error = self.from_main(error)
        if error:
            raise Fault(error)


def this_process(device_name):
    """(rank, world, device): torchrun's RANK and WORLD_SIZE (0 and 1 without it), and on CUDA under torchrun the
    GPU of this process's LOCAL_RANK."""
    device = parse_device(device_name)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return rank, world, device


def init_ranks(device_name):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU with nccl, or CPU processes with gloo."""
    from datetime import timedelta

    _, world, device = this_process(device_name)
    if world == 1:
        return Ranks(0, 1, device)
    # Rank 0 gathers and writes each checkpoint (~143 GB for FLUX.1-dev: fp32 weights and AdamW state) while the
    # others wait at the barrier: far longer than the default 10-minute collective timeout.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Ranks(dist.get_rank(), world, device)


def read_prompts(path):
    """One prompt per line (LF or CRLF); blank lines skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a Windows editor's byte-order mark is not text
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    if not prompts:
        raise InputError(f"{path}: no prompts (expected one prompt per line)")
    return prompts


def prompt_schedule(prompts, cfg):
    """Prompt j of the global batch at update s (from 1): prompts[perm[((s - 1) B + j) mod n]], B = --batch, perm a
    permutation seeded by --seed: each pass visits every prompt once, whatever the number of processes, and a
    resumed run sees what it would have."""
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "prompts")))
    return lambda step, j: prompts[perm[((step - 1) * cfg.batch + j) % len(prompts)]]


def local_batch(cfg, world):
    """Prompts per process per step: --batch / world. Rank r runs prompts r b .. r b + b - 1 of the global batch."""
    if cfg.batch % world:
        raise InputError(f"--batch {cfg.batch} is not a multiple of the {world} processes (each runs batch / world "
                         f"prompts per step)")
    return cfg.batch // world


def encode_prompts(text, prompts):
    """{prompt: (txt (1, T, ctx), y (1, vec))} on the CPU: each prompt through the text encoders once, so that
    they can be freed before the transformer is loaded (T5-XXL alone is 9.5 GB in bf16)."""
    return {p: tuple(t.cpu() for t in text([p])) for p in dict.fromkeys(prompts)}


def conditioning(embedding, cfg, device):
    """(img_ids, txt, txt_ids, y) for one prompt, as euler_sample and model_step take it."""
    txt, y = (to_device(t, device) for t in embedding)
    return fm.image_ids(cfg.height, cfg.width, device), txt, torch.zeros(txt.shape[1], 3, device=device), y


def build_transformer(load, flux_cfg, ranks, attn):
    """The trained transformer: fp32 weights (the master copy), activation checkpointing on every block, and under
    torchrun FSDP2. `load(device)` gives the full fp32 model; under FSDP only rank 0 calls it."""
    from torch.distributed._composable import checkpoint

    if ranks.world == 1:
        model = load(ranks.device)
    else:
        with torch.device("meta"):  # no memory: the shards are allocated by fsdp_shard
            model = fm.Flux(flux_cfg)
    model.set_attention_backend(attn)
    for block in [*model.double_blocks, *model.single_blocks]:
        checkpoint(block)  # keep each block's input only; recompute its inside during the backward
    if ranks.world > 1:
        fsdp_shard(model, load, ranks)
    return model


def fsdp_shard(model, load, ranks):
    """FSDP2: `fully_shard` each block, then the root (embedders, final layer); each rank holds 1/world of the
    weights, gradients and AdamW state, and gathers one block at a time. Rank 0 reads the weights on its CPU and
    every rank receives its shards by broadcast, so one process reads the files."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = load("cpu").state_dict() if ranks.main else {}
    # The velocity the model returns is a view; nothing here modifies it in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    # On CUDA the shards are gathered in bf16 (half the traffic; autocast computes in bf16 anyway) and gradients
    # are reduced in fp32. Inputs are left as they are: sigma must not be rounded to bf16 on its way in.
    cuda = ranks.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=ranks.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def state_dict_options(ranks, load=False):
    """Full (unsharded) state dicts keyed by parameter name: gathered to rank 0's CPU to save; to load, a single
    process takes its own and under FSDP rank 0's is broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if ranks.world > 1 else None
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoints(out):
    """{step: folder} of the complete checkpoints in out (state.json is written last: no state.json, no save)."""
    found = {}
    for name in os.listdir(out):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(out, name, "state.json")):
            found[int(m[1])] = os.path.join(out, name)
    return found


def save_checkpoint(model, opt, step, cfg, out, ranks):
    """out/checkpoint-STEP/ holding, each written to a temp file then renamed:
      diffusion_pytorch_model.safetensors + config.json  the transformer in diffusers format, fp32 (the model
                                                         card's snippet loads it; the exact weights for resume)
      training.pt                                        AdamW state (parameter names as keys) and RNG state
      state.json                                         step and config, written last: it marks the save complete
    Under FSDP the full state is gathered to rank 0's CPU and rank 0 writes. Older checkpoints beyond --keep are
    deleted only after this one is complete, so a crash during a save leaves the previous one loadable, and a failed
    write (a full disk) removes the incomplete folder and ends the run on every rank with a Fault."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=state_dict_options(ranks))
    optim = get_optimizer_state_dict(model, opt, options=state_dict_options(ranks))
    folder = os.path.join(out, CHECKPOINT.format(step))

    def write():
        with torch.device("meta"):
            full = fm.Flux(model.cfg)
        full.load_state_dict(weights, assign=True)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {"optimizer": optim, "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}
        try:
            fm.save_transformer(full, folder)
            fm.atomic_write(os.path.join(folder, "training.pt"), lambda tmp: torch.save(state, tmp))
            fm.write_json(os.path.join(folder, "state.json"), {"step": step, "config": asdict(cfg)})
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)  # no state.json, no checkpoint: leave no half of one either
            raise
        for old in sorted(checkpoints(out))[: -cfg.keep]:
            shutil.rmtree(os.path.join(out, CHECKPOINT.format(old)))

    ranks.main_writes(f"the checkpoint {folder}", write)


def load_training_state(model, opt, folder, ranks):
    """AdamW and RNG state of a checkpoint (the weights were loaded with the model): read by rank 0 only."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = {"optimizer": {}, "rng": None}  # under FSDP the other ranks get rank 0's by broadcast
    if ranks.main:
        state = torch.load(os.path.join(folder, "training.pt"), weights_only=True)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=state_dict_options(ranks, load=True))
    rng = ranks.from_main(state["rng"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


RUN_LENGTH = ("steps", "save_every", "keep", "samples")  # what --resume may change: not the trajectory


def resume_point(out, cfg, resume):
    """(step, folder) to start from: (0, None) for a new run, else the latest complete checkpoint. Refuses to mix a
    new run into a folder that holds checkpoints, or to resume with settings that change the trajectory."""
    found = checkpoints(out)
    if not found:
        if resume:
            print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)
        return 0, None
    step = max(found)
    if not resume:
        raise InputError(f"{out} already holds checkpoints (latest: step {step}): pass --resume to continue, or "
                         f"choose another --out")
    saved = fm.read_json(os.path.join(found[step], "state.json"))["config"]
    ours = json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in saved if k not in RUN_LENGTH and saved[k] != ours.get(k)]
    if changed:
        raise InputError(f"--resume with other settings than the checkpoint's: {', '.join(changed)} (the "
                         f"checkpoint has {', '.join(f'{k}={saved[k]}' for k in changed)})")
    return step, found[step]


@torch.no_grad()
def sample_grid(model, ae, conds, cfg, path, ranks):
    """One row of images for the fixed grid prompts, the i-th from seed i (as `srpo.py sample --seed i`), at
    FLUX.1-dev's inference settings (28 steps of flux_schedule, the branch guidance): the before/after view."""
    images = []
    for i, cond in enumerate(conds):
        x = initial_noise(1, cfg.height, cfg.width, i, torch.float32).to(ranks.device)
        with autocast(ranks.device):
            x = euler_sample(model, x, flux_schedule(GRID_STEPS, x.shape[1]), cond, cfg.guidance)
            images.append(decode_images(ae, x, cfg.height, cfg.width).float())
    if images:
        ranks.main_writes(f"the sample grid {path}", lambda: save_png(torch.cat(images, dim=3), [path]))


def append_log(path, record):
    """One JSON line per step (log.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path, step):
    """Keep the log lines of steps <= step (a resumed run redoes the steps after its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    fm.write_text(path, "".join(lines))


def warm_up_kernels(model, cfg, text_tokens, device):
    """Tune the Triton attention kernels at the run's sequence length (image + text tokens: the rollout, both
    branches and the grids all use it) and in autocast's bf16, before the first step (see kernels.attention)."""
    from kernels.attention import warm_up

    if model.double_blocks[0].backend == "triton":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what autocast hands the kernels
        warm_up((cfg.height // 16) * (cfg.width // 16) + text_tokens, model.cfg.num_heads, model.cfg.head_dim, dtype,
                device)


def encode_captions(reward, prompt_of, cfg, start, ranks):
    """Every SRP caption of the steps this rank runs ("word. prompt", both words) through the reward's text tower
    now, one at a time as in a step: the steps then find them cached, with no text work and no copy of token ids to
    the device inside a step (beyond the cache's 4096 captions, a long run encodes the rest as it meets them)."""
    from reward import control_caption, control_words

    per = local_batch(cfg, ranks.world)
    for step in range(start + 1, cfg.steps + 1):
        for a in range(per):
            for word in control_words(step):
                reward.text_features([control_caption(word, prompt_of(step, ranks.rank * per + a))])


def checkpoint_note(out):
    """Where a stopped or failed run can continue from."""
    found = checkpoints(out)
    if not found:
        return "no checkpoint is complete yet: the same command starts the run again"
    return f"the last complete checkpoint, {found[max(found)]}, is intact: the same command with --resume continues"


def train_step(model, opt, ae, reward, embeddings, prompt_of, step, cfg, out, ranks):
    """One update: this rank's --batch / world prompts (rollout + both branches each, gradients averaged over the
    global batch), a finite-loss check, gradient clipping, AdamW. -> the log record."""
    from reward import control_words

    t0, per = time.time(), local_batch(cfg, ranks.world)
    eps = shared_noise(cfg, step, ranks.device)
    totals = 0
    for a in range(per):
        j = ranks.rank * per + a  # this prompt's place in the global batch
        prompt = prompt_of(step, j)
        cond = conditioning(embeddings[prompt], cfg, ranks.device)
        x0 = online_rollout(model, eps, cond, cfg)
        totals = totals + direct_align_loss(model, ae, reward, x0, eps, cond, prompt, draw_timestep(cfg, step, j),
                                            step, cfg, scale=1 / per) / per  # FSDP averages over ranks: 1 / batch
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # the step's one read to the host: every value above stayed on the device, where FSDP's prefetch runs ahead
    loss, r_d, r_i, norm = torch.cat([ranks.mean(totals.double()), norm.double().reshape(1)]).tolist()
    if not all(map(math.isfinite, (loss, r_d, r_i, norm))):
        raise InputError(f"step {step}: the loss is not finite (loss {loss}, gradient norm {norm}); stopped before "
                         f"updating the weights; {checkpoint_note(out)}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"step": step, "loss": loss, "reward_denoise": r_d, "reward_inversion": r_i, "grad_norm": norm,
            "lr": cfg.lr, "words": control_words(step), "seconds": round(time.time() - t0, 3)}


def train(model, ae, reward, embeddings, prompt_of, grid_prompts, cfg, out, start, resume_from, ranks):
    """The loop: train_step per update, the log, the checkpoints, the before/after grids. On SIGTERM or SIGINT (on
    any rank) every rank finishes its step, a checkpoint is saved and Stopped raised: the decision is taken
    together at the step boundary, so no rank waits in a collective the others have left."""
    from tqdm import tqdm

    ae.requires_grad_(False)  # frozen: gradients flow through the VAE and the reward to the image, never into them
    reward.requires_grad_(False)
    # fused: one kernel over all parameters and no temporary copies of the (sharded) state
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=True)
    if resume_from:
        load_training_state(model, opt, resume_from, ranks)
    log = os.path.join(out, "log.jsonl")
    ranks.main_writes(f"the log {log}", lambda: trim_log(log, start))
    grid = [conditioning(embeddings[p], cfg, ranks.device) for p in grid_prompts]
    warm_up_kernels(model, cfg, next(iter(embeddings.values()))[0].shape[1], ranks.device)
    encode_captions(reward, prompt_of, cfg, start, ranks)
    if start == 0:
        sample_grid(model, ae, grid, cfg, os.path.join(out, "samples-before.png"), ranks)
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="train", disable=not ranks.main)
    with StopSignals() as signals:
        for step in bar:  # the update number, from 1 as the official loop counts (its control words follow it)
            record = train_step(model, opt, ae, reward, embeddings, prompt_of, step, cfg, out, ranks)
            ranks.main_writes(f"the log {log}", functools.partial(append_log, log, record))
            bar.set_postfix(reward=f"{record['reward_denoise']:.4f}", loss=f"{record['loss']:.4f}")
            stop = ranks.any(signals.received is not None)
            if stop or step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(model, opt, step, cfg, out, ranks)
            if stop and step < cfg.steps:
                raise Stopped(f"{signals.received or 'another process was signalled'}: stopped after step {step} of "
                              f"{cfg.steps}; {checkpoint_note(out)}")
    if start < cfg.steps:
        sample_grid(model, ae, grid, cfg, os.path.join(out, "samples-after.png"), ranks)


def run_training(args, cfg, prompts, demo, start, folder, ranks):
    """Load the parts (the text encoders only long enough to embed this rank's prompts), train, report.

    The reward model keeps fp32 weights and runs under bf16 autocast, like the transformer and the VAE decode it
    backpropagates through; the official script ran its reward under fp16 autocast, whose narrow exponent range
    lets the small gradients of the backward underflow (bf16 has fp32's range)."""
    cuda = ranks.device.type == "cuda"
    frozen = torch.bfloat16 if cuda else torch.float32  # text encoders and VAE: frozen, no master weights needed
    prompt_of = prompt_schedule(prompts, cfg)
    per = local_batch(cfg, ranks.world)
    mine = [prompt_of(s, ranks.rank * per + a) for s in range(start + 1, cfg.steps + 1) for a in range(per)]
    grid_prompts = prompts[: cfg.samples]
    reward = load_reward(args, cfg, ranks.device)  # fp32 weights, run under bf16 autocast
    if demo:
        tiny, ae, text = tiny_models()
        flux_cfg, text = tiny.cfg, text.to(ranks.device)
        load = tiny.to  # the same random start on every rank (rank 0's is broadcast under FSDP anyway)
    else:
        text = fm.TextConditioner.from_folder(args.flux, frozen, ranks.device)
        sub = os.path.join(args.flux, "transformer")
        flux_cfg = fm.read_flux_config(sub)
        ae = fm.load_autoencoder(os.path.join(args.flux, "vae"), None, frozen, ranks.device)
        load = functools.partial(fm.load_transformer, sub, flux_cfg, torch.float32)  # load(device)
    embeddings = encode_prompts(text, mine + grid_prompts)
    del text
    if cuda:
        torch.cuda.empty_cache()
    if folder:
        load = functools.partial(fm.load_transformer, folder, flux_cfg, torch.float32)  # resume its weights
    ae = ae.to(ranks.device, frozen)
    model = build_transformer(load, flux_cfg, ranks, args.attn or ("triton" if cuda else "sdpa"))
    train(model, ae, reward, embeddings, prompt_of, grid_prompts, cfg, args.out, start, folder, ranks)
    if ranks.main:
        report(args.out)


def report(out):
    """Where the results are, and the reward curve in two numbers."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rewards = [json.loads(line)["reward_denoise"] for line in f if line.strip()]
    if rewards:
        # The control words cycle every 20 steps (4 x 5) and move the reward by more than training does in a
        # short run: compare whole cycles.
        n = max(1, min(20, len(rewards) // 2))
        first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
        print(f"denoise-branch reward, mean of the first {n} steps -> last {n}: {first:.4f} -> {last:.4f}")
    latest = checkpoints(out)
    grids = [os.path.join(out, f"samples-{when}.png") for when in ("before", "after")]
    print(f"checkpoint: {latest[max(latest)] if latest else 'none'}; log: {os.path.join(out, 'log.jsonl')}; "
          f"samples: {', '.join(g for g in grids if os.path.exists(g)) or 'none'}")


# ----------------------------------------------------------------------------------------------------------------
# The train command's inputs


REWARD_MODELS = {"hps": "--hps CKPT, HPSv2.1's HPS_v2.1_compressed.pt", "pickscore": "--pickscore DIR, a "
                 "transformers folder of PickScore_v1", "clip": "--clip DIR, a transformers folder of CLIP-ViT-H-14"}


def check_reward_flags(args, name, demo):
    """Before anything loads: the model flag of --reward is given, and no other (the tiny demo takes none); its
    file or folder looks right."""
    import reward

    given = [other for other in REWARD_MODELS if getattr(args, other)]
    if demo and given:
        raise InputError(f"--{given[0]} needs --flux (the tiny demo scores with a tiny random CLIP built in code)")
    other = next((other for other in given if other != name), None)
    if other:
        raise InputError(f"--{other} is the model of --reward {other}, but --reward is {name} (the default is hps)")
    if demo:
        return
    fm.check_folder(args.flux, "a diffusers FLUX.1 folder")
    path = getattr(args, name)
    if not path:
        raise InputError(f"--{name} is required with --flux and --reward {name} ({REWARD_MODELS[name]})")
    if name != "hps":
        reward.check_clip_folder(path, reward.REWARDS[name].name)
    elif not os.path.isfile(path):
        raise InputError(f"{path}: no such file (expected an HPSv2/HPSv2.1 checkpoint)")


def load_reward(args, cfg, device):
    """The --reward model, fp32 weights: in the demo a tiny random one built in code; else from its flag's file or
    folder, with the CLIP tokenizer of that folder (vocab.json + merges.txt) or, without one, of --flux."""
    import reward

    kind = reward.REWARDS[cfg.reward]
    if args.flux is None:
        return kind.tiny(device=device)
    path = getattr(args, cfg.reward)
    return kind.load(path, reward.tokenizer_folder(path, args.flux), device)


def flag_value(value):
    """A TrainConfig value as it is typed on the command line: a pair as 'A B'."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def recipe_table():
    """The defaults that differ between the rewards, one column per reward (for --help)."""
    differ = [f for f in fields(TrainConfig) if any(f.name in recipe for recipe in REWARD_RECIPES.values())]
    rows = [["", *(f"--reward {name}" for name in REWARD_RECIPES)]]
    rows += [["--" + f.name.replace("_", "-"), *(flag_value(recipe.get(f.name, f.default))
                                                 for recipe in REWARD_RECIPES.values())] for f in differ]
    return "\n".join("    " + "".join(cell.ljust(22) for cell in row).rstrip() for row in rows)


def add_config_flags(parser):
    """One flag per TrainConfig field; default None so that train_config can tell the demo's and the reward's
    defaults apart."""
    for f in fields(TrainConfig):
        notes = [f"; --reward {r} {flag_value(recipe[f.name])}" for r, recipe in REWARD_RECIPES.items()
                 if f.name in recipe]
        demo = f"; tiny demo {DEMO_DEFAULTS[f.name]}" if f.name in DEMO_DEFAULTS else ""
        kind = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, choices=f.metadata["choices"],
                            nargs=len(f.default) if isinstance(f.default, tuple) else None,
                            metavar=("A", "B") if isinstance(f.default, tuple) else None,
                            help=f"{f.metadata['help']} (default {flag_value(f.default)}{''.join(notes)}{demo})")


def train_config(args, demo, world):
    """TrainConfig from the flags: where a flag is not given, the official values of --reward's recipe, or the
    demo's where it has its own (its --batch: one prompt per process of the `world`); then checked."""
    values = {}
    demo_defaults = {**DEMO_DEFAULTS, "batch": world} if demo else {}
    defaults = {**REWARD_RECIPES[args.reward or TrainConfig.reward], **demo_defaults}
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is None:
            value = defaults.get(f.name, f.default)
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    cfg = TrainConfig(**values)
    check_size(cfg.height, cfg.width)
    for name in ("steps", "save_every", "keep", "batch", "rollout_steps", "max_gap"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.window[0] < cfg.window[1] <= WINDOW_GRID:
        raise InputError(f"--window A B must satisfy 0 <= A < B <= {WINDOW_GRID}, got {cfg.window[0]} {cfg.window[1]}")
    if cfg.window_points < 11:
        raise InputError(f"--window-points must be at least 11, got {cfg.window_points}")
    if cfg.samples < 0 or cfg.lr <= 0:
        raise InputError(f"--samples must be >= 0 and --lr > 0, got {cfg.samples} and {cfg.lr}")
    return cfg


def check_writable(out):
    """Make the output folder and try a file in it, before anything is loaded."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"{out}: cannot write the output folder ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Commands


def sample_jobs(args):
    """(prompt, image paths) pairs: --prompt into --out (with --batch N, OUT-0 .. OUT-(N-1)), or each line i of
    --prompts into --out/i.png (i zero-padded to 5 digits)."""
    if args.prompts is None:
        check_png_path(args.out)
        return [(DEFAULT_PROMPT if args.prompt is None else args.prompt, png_paths(args.out, args.batch))]
    if args.prompt is not None:
        raise InputError("give --prompt or --prompts, not both")
    if os.path.splitext(args.out)[1]:
        raise InputError(f"--out {args.out}: with --prompts, --out is a folder (images 00000.png, ... go in it)")
    prompts = read_prompts(args.prompts)
    check_writable(args.out)
    return [(p, png_paths(os.path.join(args.out, f"{i:05d}.png"), args.batch)) for i, p in enumerate(prompts)]


def write_manifest(folder, jobs, seed):
    """folder/images.jsonl: one {"image", "prompt", "seed"} line per image, what `score --manifest` reads."""
    fm.write_text(os.path.join(folder, MANIFEST), "".join(
        json.dumps({"image": os.path.basename(path), "prompt": p, "seed": seed}) + "\n"
        for p, paths in jobs for path in paths))


def check_sample_flags(args):
    """The flags that need no file, before anything is read."""
    check_size(args.height, args.width)
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    if not 1 <= args.max_sequence_length <= 512:
        raise InputError(f"--max-sequence-length must be in 1..512 (T5 tokens, FluxPipeline's limit), got "
                         f"{args.max_sequence_length}")
    if args.transformer and not args.flux:
        raise InputError("--transformer needs --flux (the folder that gives the config, VAE and text encoders)")


def sample_models(args, prompts, dtype, device):
    """(model, ae, {prompt: (txt, y)}) of --flux, or the tiny built-in ones; the prompts are encoded first."""
    if not args.flux:
        model, ae, text = tiny_models()
        text.max_length = args.max_sequence_length
        return model.to(device, dtype), ae.to(device, dtype), encode_prompts(text, prompts)
    text = fm.TextConditioner.from_folder(args.flux, dtype, device, args.max_sequence_length)
    embeddings = encode_prompts(text, prompts)  # on the CPU: 4 MiB a prompt for T5-XXL in bf16
    del text  # the text encoders (10 GB for T5-XXL) are not needed past this point
    return *load_flux_folder(args.flux, args.transformer, dtype, device), embeddings


def sample_guidance(args, cfg, rank):
    """--guidance, 3.5 unless given. A transformer without a guidance embedding (FLUX.1-schnell: not
    guidance-distilled) has nowhere to take it, and FluxPipeline passes it none: said once if it was given."""
    if not cfg.guidance_embed and args.guidance is not None and rank == 0:
        print("note: this transformer has no guidance embedding (e.g. FLUX.1-schnell): --guidance is ignored",
              file=sys.stderr)
    return 3.5 if args.guidance is None else args.guidance


@torch.no_grad()
def cmd_sample(args):
    """Each prompt's images from the same --seed: a prompt's images are those of `sample --prompt P --seed S`
    alone, and diffusers' FluxPipeline gives the same for num_images_per_prompt = --batch. The schedule is the
    folder's scheduler config (FLUX.1-dev's without one)."""
    check_sample_flags(args)
    rank, world, device = this_process(args.device)
    dtype = parse_dtype(args.dtype, device)
    if world > 1 and not args.prompts:
        raise InputError("under torchrun, sample splits the lines of --prompts over the processes: give --prompts")
    jobs = sample_jobs(args)
    sigmas = flux_schedule(args.steps, (args.height // 16) * (args.width // 16),
                           read_schedule(args.flux) if args.flux else FLUX_DEV)
    if args.flux:
        load_flux_folder(args.flux, args.transformer, dtype, "meta")  # check every file before the slow part
    if args.prompts:
        if rank == 0:
            written(os.path.join(args.out, MANIFEST), functools.partial(write_manifest, args.out, jobs, args.seed))
        # prompts are independent: process r of w takes lines r, r + w, ..., with no communication at all
        jobs = [(p, paths) for p, paths in jobs[rank::world] if not all(os.path.exists(path) for path in paths)]
        if not jobs:
            print(f"{args.out}: nothing left to make, the images exist")
            return
    model, ae, embeddings = sample_models(args, [p for p, _ in jobs], dtype, device)
    model.set_attention_backend(args.attn or ("triton" if device.type == "cuda" else "sdpa"))
    sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, sample_guidance(args, model.cfg, rank), args)


def sample_jobs_in_turn(model, ae, embeddings, jobs, sigmas, guidance, args):
    """Each job's images, written as soon as they are made. SIGTERM / SIGINT stop after the current prompt's images
    (Stopped), a failed write ends with a Fault: the images written are whole, and the same command continues."""
    from tqdm import tqdm

    device, dtype = model.img_in.weight.device, model.img_in.weight.dtype
    img_ids = fm.image_ids(args.height, args.width, device).to(dtype)
    again = "the images written are complete, and the same command makes the rest"
    with StopSignals() as signals:
        for done, (prompt, paths) in enumerate(tqdm(jobs, desc="prompts", disable=len(jobs) == 1), 1):
            # one text encoding per prompt, repeated for its images, as FluxPipeline does for num_images_per_prompt
            txt, y = (t.expand(args.batch, *t.shape[1:]) for t in embeddings[prompt])
            x = initial_noise(args.batch, args.height, args.width, args.seed, txt.dtype).to(device, dtype)
            cond = (img_ids, txt.to(device, dtype), torch.zeros(txt.shape[1], 3, device=device, dtype=dtype),
                    y.to(device, dtype))
            images = decode_images(ae, euler_sample(model, x, sigmas, cond, guidance, progress=len(jobs) == 1),
                                   args.height, args.width)
            try:
                written(", ".join(paths), functools.partial(save_png, images, paths))
            except Fault as e:
                raise Fault(f"{e}; {again}") from None
            for path in paths:
                tqdm.write(path)  # above the progress bar, not through it
            if signals.received and done < len(jobs):
                raise Stopped(f"{signals.received}: stopped after {done} of {len(jobs)} prompts; {again}")


def cmd_train(args):
    demo = args.flux is None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = train_config(args, demo, world)
    check_reward_flags(args, cfg.reward, demo)
    if not demo and not fm.read_flux_config(os.path.join(args.flux, "transformer")).guidance_embed:
        raise InputError(f"{args.flux}: the transformer has no guidance embedding (e.g. FLUX.1-schnell); SRPO's "
                         f"recipe feeds FLUX.1-dev's distilled guidance ({cfg.guidance:g} to the branches, "
                         f"{cfg.rollout_guidance:g} to the rollout): train a guidance-distilled model such as "
                         f"FLUX.1-dev")
    prompts = read_prompts(args.prompts) if args.prompts else list(DEMO_PROMPTS)
    check_writable(args.out)
    local_batch(cfg, world)  # before any process group: --batch splits evenly
    ranks = init_ranks(args.device)
    threads = torch.get_num_threads()
    if demo and ranks.device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors gain nothing from threads, and lose much when the cores are shared
    try:
        decision = None
        if ranks.main:
            try:
                decision = resume_point(args.out, cfg, args.resume)
            except InputError as e:
                decision = e
        decision = ranks.from_main(decision)  # every rank stops, or every rank starts from the same step
        if isinstance(decision, InputError):
            raise decision
        start, folder = decision
        run_training(args, cfg, prompts, demo, start, folder, ranks)
        if ranks.world > 1:
            dist.barrier()
    except Fault as e:
        raise Fault(f"{e}; {checkpoint_note(args.out)}") from None
    finally:
        torch.set_num_threads(threads)
        if ranks.world > 1:
            dist.destroy_process_group()


def read_manifest(path):
    """(image paths, prompts) from a `sample --prompts` folder's images.jsonl, paths relative to its folder."""
    folder, paths, prompts = os.path.dirname(os.path.abspath(path)), [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    paths.append(os.path.join(folder, row["image"]))
                    prompts.append(str(row["prompt"]))
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}, line {number}: expected a JSON object with \"image\" and "
                                     f"\"prompt\"") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    return paths, prompts


@torch.no_grad()
def cmd_score(args):
    import reward

    models = [name for name in reward.REWARDS if getattr(args, name) is not None]
    if len(models) != 1:
        raise InputError("give one of --hps CKPT (HPSv2/2.1), --pickscore DIR and --clip DIR")
    if args.manifest and (args.images or args.prompt is not None):
        raise InputError("--manifest lists the images and their prompts: give it without IMAGE and --prompt")
    if args.save_safetensors:
        if not args.hps:
            raise InputError("--save-safetensors converts an --hps checkpoint")
        reward.convert_checkpoint(args.hps, args.save_safetensors)
        print(args.save_safetensors)
        args.hps = args.save_safetensors
        if not args.images and not args.manifest:
            return
    paths, prompts = read_manifest(args.manifest) if args.manifest else (args.images, [args.prompt] * len(args.images))
    if not paths:
        raise InputError("no images to score")
    model = getattr(args, models[0])
    if models[0] != "hps":
        reward.check_clip_folder(model, reward.REWARDS[models[0]].name)  # before looking for its tokenizer in it
    tokenizer = args.tokenizer or reward.tokenizer_folder(model, None)  # a PickScore/CLIP folder may hold its own
    if tokenizer is None:
        raise InputError("--tokenizer DIR is required (vocab.json + merges.txt, or a FLUX.1 folder; a --pickscore or "
                         "--clip folder that holds them needs none)")
    if None in prompts:
        raise InputError("--prompt is required: the prompt the images were made for (or --manifest)")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or "float32", device)  # scores print 6 decimals: float32 unless asked
    # every file is checked before the model loads, and read again when scored: a manifest's thousands of images
    # never sit in memory together
    for path in paths:
        reward.load_image(path)
    scorer = reward.REWARDS[models[0]].load(model, tokenizer, device, dtype)
    values = []
    for path, prompt in zip(paths, prompts, strict=True):  # one at a time: sizes may differ
        image = reward.load_image(path)
        if args.relative:
            value = scorer.relative_reward(image[None], prompt, args.k, *args.relative, args.preprocess)
        else:
            value = scorer.score(image[None], prompt, args.preprocess)
        values.append(value.item())
        print(f"{values[-1]:.6f}\t{path}")
    if args.manifest:
        print(f"{sum(values) / len(values):.6f}\tmean of {len(values)} images")


def build_parser():
    parser = argparse.ArgumentParser(prog="srpo.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images with a FLUX.1 model (or the tiny built-in one)",
                       description="Generate images. Without --flux, a tiny random model built in code runs offline.")
    p.add_argument("--flux", help="diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/; "
                   "its scheduler/scheduler_config.json sets the schedule, FLUX.1-dev's when absent)")
    p.add_argument("--transformer", help="replacement transformer weights: one .safetensors file, diffusers or BFL "
                   "keys (e.g. SRPO's diffusion_pytorch_model.safetensors)")
    p.add_argument("--prompt", default=None, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts", help="prompt file, one per line: the images of line i (from 0) go to --out/i.png "
                   "(00000.png, ...), listed with their prompts in --out/images.jsonl; the models load once, and a "
                   "run started again skips the prompts whose images exist")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50; FLUX.1-schnell: 4)")
    p.add_argument("--guidance", type=float, default=None, help="distilled guidance scale (default 3.5; ignored, "
                   "with a note, by a transformer without a guidance embedding such as FLUX.1-schnell's)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 prompt tokens, 1..512 (default 512, as FluxPipeline; tiny: 32; FLUX.1-schnell is run with "
                   "256)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives diffusers' image")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (diffusers' num_images_per_prompt)")
    p.add_argument("--out", default=None, help="output PNG (default sample.png); with --batch N, OUT-0.png .. "
                   "OUT-(N-1).png; with --prompts, a folder (default samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK, and each process takes its share of "
                   "--prompts)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else "
                   "float32)")
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="SRPO fine-tuning of FLUX.1-dev (or the tiny offline demo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{TRAIN_USAGE}\n\n{recipe_table()}")
    p.add_argument("--flux", help="diffusers-format FLUX.1-dev folder: the starting transformer, VAE, text encoders "
                   "and the CLIP tokenizer HPS uses (without it: the tiny demo, whose reward is a tiny random CLIP)")
    p.add_argument("--hps", help="--reward hps: HPSv2/HPSv2.1 checkpoint, open_clip .pt or converted .safetensors "
                   "(needs --flux)")
    p.add_argument("--pickscore", metavar="DIR", help="--reward pickscore: PickScore_v1 as a transformers CLIPModel "
                   "folder (config.json + weights; tokenizer: its vocab.json + merges.txt, else --flux's)")
    p.add_argument("--clip", metavar="DIR", help="--reward clip: CLIP-ViT-H-14-laion2B-s32B-b79K as a transformers "
                   "CLIPModel folder (config.json + weights; tokenizer: its vocab.json + merges.txt, else --flux's)")
    p.add_argument("--prompts", help="prompt file, one prompt per line (default: a few built-in prompts)")
    p.add_argument("--out", default="runs/srpo", help="output folder: checkpoint-STEP/, log.jsonl, samples-*.png "
                   "(default runs/srpo)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score images with HPSv2/2.1 (or PickScore, CLIP), or SRPO's relative reward",
                       description="Print one score per image (score, tab, path): the HPS score <img, txt> of "
                       "L2-normalised CLIP features (PickScore, CLIP: times exp(logit_scale)); with --relative POS "
                       "NEG, SRPO's reward c img . ((1 + k) txt('POS. prompt') - txt('NEG. prompt')), c = 1 for HPS "
                       "and exp(logit_scale) / 20 for PickScore and CLIP, as the official script trains with them.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, any mode (converted to RGB)")
    p.add_argument("--hps", help="HPS checkpoint: HPS_v2(.1)_compressed.pt (open_clip) or its converted .safetensors")
    p.add_argument("--pickscore", metavar="DIR", help="PickScore model folder in transformers format (config.json + "
                   "weights); captions tokenized as its CLIPProcessor does")
    p.add_argument("--clip", metavar="DIR", help="CLIP model folder in transformers format (e.g. laion "
                   "CLIP-ViT-H-14-laion2B-s32B-b79K), scored as PickScore: exp(logit_scale) <img, txt>")
    p.add_argument("--tokenizer", help="CLIP BPE vocabulary: a folder with vocab.json + merges.txt, or a FLUX.1 "
                   "folder (its tokenizer/); default for --pickscore/--clip: the model folder's own files")
    p.add_argument("--prompt", help="the prompt the images were made for")
    p.add_argument("--manifest", help="images.jsonl of a `sample --prompts` folder: scores each image against its "
                   "own prompt, then prints the mean (instead of IMAGE and --prompt)")
    p.add_argument("--relative", nargs=2, metavar=("POS", "NEG"), help="SRP reward with these control words, e.g. "
                   "Real Painting")
    p.add_argument("--k", type=float, default=0.0, help="k of the SRP reward (default 0)")
    p.add_argument("--preprocess", choices=["hpsv2", "crop"], default=None,
                   help="hpsv2: longest side to 224 + zero pad (HPS default); crop: short side to 224 + centre crop "
                   "(SRPO training, PickScore default)")
    p.add_argument("--save-safetensors", metavar="PATH", help="convert --hps to a safetensors file first (later "
                   "loads are fast and pickle-free), then score from it; IMAGE may be omitted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on every device, "
                   "as scores print with 6 decimals)")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "sample" and args.height is None:
        args.height = 1024 if args.flux else 64
    if args.command == "sample" and args.width is None:
        args.width = 1024 if args.flux else 64
    if args.command == "sample" and args.max_sequence_length is None:
        args.max_sequence_length = 512 if args.flux else 32
    if args.command == "sample" and args.out is None:
        args.out = "samples" if args.prompts else "sample.png"
    try:
        args.func(args)
    except (InputError, Fault, Stopped) as e:
        # Faults and stops are agreed on by every process of a torchrun: one of them says it
        if isinstance(e, InputError) or os.environ.get("RANK", "0") == "0":
            print(f"{'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        sys.exit(EXIT_STOPPED if isinstance(e, Stopped) else EXIT_FAULT if isinstance(e, Fault) else EXIT_INPUT)


if __name__ == "__main__":
    main()
