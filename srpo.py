"""SRPO on FLUX.1-dev: Direct-Align and Semantic Relative Preference Optimization (Shen et al. 2025, "Directly
Aligning the Full Diffusion Trajectory with Fine-Grained Human Preference", arXiv 2509.06942), trained exactly as the
official FLUX.1-dev script does it (Tencent-Hunyuan/SRPO: fastvideo/SRPO.py and its HPS launch script).

Reward fine-tuning backpropagates a differentiable reward (here HPSv2.1) through the images the model makes. Done
through a multi-step denoising chain (ReFL, DRaFT), it is costly and reaches only the last, low-noise steps, where
the model learns to please the reward model rather than people (reward hacking). SRPO changes two things.

Direct-Align. A flow-matching state is an interpolation of noise and image (the paper's noise prior):
    x_sigma = sigma eps + (1 - sigma) x0
so, with eps known, one model step from any sigma gives back a clean image by interpolation:
    x_t    = x_from + (sigma_t - sigma_from) v(x_from, sigma_from)       one Euler step, the only one with gradient
    x0_hat = (x_t - sigma_t eps) / (1 - sigma_t)                         the recovery
and the reward sees x0_hat at early, noisy timesteps too, for the backward of one model call.

SRP, the semantic relative reward. The reward compares the image with the prompt under a positive and a negative
control word, so that what both share (the reward model's own biases) cancels:
    r = f_img(x0_hat) . ((1 + k) f_txt("P. prompt") - f_txt("N. prompt"))
An inversion branch steps up in sigma and rewards N instead (the words swapped): its x0_hat moves with +v, so
pushing it towards N pushes the denoising direction away from N. Each branch is trained with the hinge
L = relu(0.7 - r) / 2.

One step (`train_step`), for each prompt of the global batch:
    eps ~ N(0, I), one draw shared by every prompt and rank            shared_noise
    x0 = 25-step Euler rollout of the current model, no gradient       online_rollout
    sel ~ U{5..995}: each branch's sigmas and k in the window          timestep_window, draw_timestep, branch_sigmas
    denoise branch: sigma_hi -> sigma_t, SRP with (P, N)               branches, direct_align, srp_loss
    inversion branch: sigma_lo -> sigma_t, SRP with (N, P)             (each backpropagated as soon as it is built)
then the gradient norm is clipped to 0.1 and AdamW steps. The loop (`train`) saves checkpoints and logs; where it
runs (processes, FSDP2, checkpoints) is runtime.py's, sampling is sampling.py's, the rewards reward.py's, the
held-out evaluations that show reward hacking coming (and TensorBoard) evaluation.py's.

    python srpo.py train                 # SRPO on tiny random models built in code: offline, CPU, seconds
    python srpo.py sample | score ...    # sampling.py, reward.py; every command's --help lists its flags
"""

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import evaluation
import reward as rewards
import runtime
import sampling
from reward import control_words
from sampling import DEFAULT_PROMPT, autocast, check_size, decode_images, euler_sample, initial_noise
from util import (
    EXIT_DIVERGED,
    EXIT_FAULT,
    EXIT_INPUT,
    EXIT_STOPPED,
    Diverged,
    Fault,
    InputError,
    Stopped,
    StopSignals,
    derive_seed,
    read_prompts,
    to_device,
)

WINDOW_GRID = 50  # the window is cut from the 50-step shift-3 schedule, as the official script does
# The official script's gap is int((1 - 0.9) * 1000) + 1, and (1 - 0.9) * 1000 is 99.99999999999997 in floating
# point: its K_max is 100.
K_MAX = int((1 - 0.9) * 1000) + 1
# LoRA's learning rate: its first AdamW step moves each entry of B by ~lr, so W moves by (alpha / r) B A, entries
# ~lr sqrt(r) / sqrt(3 in) (A ~ U(+-1/sqrt(in))), where full fine-tuning moves each entry of W by ~lr. At rank 16 on
# FLUX's 3072-wide layers the same first update needs 24 x 5e-6 = 1.2e-4: 1e-4, also diffusers' FLUX LoRA default.
LORA_LR = 1e-4
DEMO_PROMPTS = (DEFAULT_PROMPT, "a portrait of an old fisherman in natural light",
                "a bowl of ripe peaches on a wooden table", "a lighthouse on a cliff at dawn",
                "a city street in the rain at night", "a honeybee on a sunflower, close-up",
                "a mountain lake with pine trees", "a cup of coffee on a cafe terrace")


def option(default, help, valid=None, choices=None):
    """A TrainConfig field that is also a flag of `srpo.py train` (--name-with-dashes), with its help text and its
    valid values: a cli.Bounded range (checked by the config itself, for the command line and library users alike)
    or choices."""
    return field(default=default, metadata={"help": help, "valid": valid, "choices": choices})


@dataclass
class TrainConfig:
    """SRPO (Direct-Align + semantic relative preference) on FLUX.1-dev with an HPS, PickScore or CLIP reward.

    python srpo.py train                       # tiny offline demo on the CPU (random tiny models, ~1 min)
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

    # The official run (Tencent-Hunyuan/SRPO on FLUX.1-dev with HPSv2.1; REWARD_RECIPES: PickScore's, CLIP's).
    reward: str = option("hps", "the reward trained against: HPSv2.1 (--hps), PickScore (--pickscore) or CLIP-H "
                         "(--clip), as the official --reward_model; it picks the per-reward defaults (the table above)",
                         choices=("hps", "pickscore", "clip"))
    lr: float = option(5e-6, "AdamW learning rate, constant", cli.POSITIVE)
    betas: tuple = option((0.9, 0.999), "AdamW betas", cli.BETA)
    adam_eps: float = option(1e-8, "AdamW epsilon", cli.POSITIVE)
    weight_decay: float = option(1e-4, "AdamW weight decay", cli.NON_NEGATIVE)
    grad_clip: float = option(0.1, "clip the gradient norm to this", cli.POSITIVE)
    height: int = option(720, "training image height, a multiple of 16", cli.SIZE)
    width: int = option(720, "training image width, a multiple of 16", cli.SIZE)
    rollout_steps: int = option(25, "Euler steps of the online rollout", cli.TIMESTEPS)
    shift: float = option(3.0, "time shift s of the rollout and window schedules: sigma = s t / (1 + (s - 1) t)",
                          cli.POSITIVE)
    rollout_guidance: float = option(1.0, "guidance of the online rollout", cli.GUIDANCE)
    guidance: float = option(3.5, "guidance of the two branch model calls and of the sample grids", cli.GUIDANCE)
    window: tuple = option((5, 25), "training window: sigmas between S[A] and S[B], S = shift(linspace(1, 0, 51))",
                           cli.Bounded(int, 0, WINDOW_GRID, why="indices into the 51-point grid S"))
    window_points: int = option(1000, "N, points of the window grid sigmas_l = linspace(S[A], S[B], N)",
                                cli.WINDOW_POINTS)
    max_gap: int = option(K_MAX, "K_max, the largest gap in window points between a branch's start and sigma_t "
                          "(the official int((1 - 0.9) * 1000) + 1, which is 100 in floating point)", cli.WINDOW_POINTS)
    k_denoise: tuple = option((0.1, 0.25), "k of the denoise branch's SRP reward: linspace(A, B, N)[sel]", cli.FINITE)
    k_inversion: tuple = option((0.3, 0.01), "k of the inversion branch: linspace(A, B, N)[max(sel - K, 1)]",
                                cli.FINITE)
    margin: float = option(0.7, "hinge margin m: loss = relu(m - r) / 2 per branch", cli.FINITE)
    # The run.
    steps: int = option(19, "optimizer updates, numbered 1..N; update s uses the control words of step s. The "
                        "official loop counts to 20 but its step 20 only saves, so its released checkpoint holds "
                        "19 updates: the default (a resumed run stops at N too)", cli.RUN_STEPS)
    save_every: int = option(5, "save a checkpoint every N updates (and after the last one)", cli.RUN_STEPS)
    keep: int = option(1, "complete checkpoints kept; older ones are deleted once a newer one is complete",
                       cli.RUN_STEPS)
    batch: int = option(32, "prompts per optimizer step (global batch), split over the processes: each runs "
                        "batch / world of them (tiny demo: one per process)",
                        cli.Bounded(int, 1, 4096, why="128 times the official 32, each prompt in turn"))
    seed: int = option(0, "seed of the prompt order, the shared noise and the timestep draws", cli.SEED)
    samples: int = option(4, "prompts (the first of the prompt list) in the before/after sample grids; 0: none",
                          cli.Bounded(int, 0, 64, why="one row of images"))
    # LoRA (lora.py): the transformer frozen, low-rank adapters on its blocks' linear layers trained instead.
    lora_rank: int = option(0, "LoRA rank r: train adapters y = W x + (alpha / r) B A x on every block's attention "
                            "and MLP layers instead of the whole transformer (0: full fine-tuning; with --flux the "
                            f"default --lr becomes {LORA_LR:g})",
                            cli.Bounded(int, 0, 1024, why="a third of FLUX.1's width 3072"))
    lora_alpha: float = option(0.0, "LoRA alpha (0: the rank, i.e. scale 1)", cli.NON_NEGATIVE)

    def __post_init__(self):
        """Refuse what the run cannot take, naming the flag: each field within its range, then what ties them."""
        for f in fields(self):
            if f.metadata["valid"]:
                f.metadata["valid"].check("--" + f.name.replace("_", "-"), getattr(self, f.name))
        check_size(self.height, self.width)
        if not self.window[0] < self.window[1]:
            raise InputError(f"--window A B must satisfy A < B, got {self.window[0]} {self.window[1]}")
        sampling.check_training_size(self.height, self.width)  # the official decode is tiled above 1024
        if self.lora_alpha and not self.lora_rank:
            raise InputError("--lora-alpha needs --lora-rank (the adapters it scales)")
        self.lora_alpha = self.lora_alpha or float(self.lora_rank)


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


# ----------------------------------------------------------------------------------------------------------------
# Direct-Align, in the order of one step


def shifted_schedule(steps, shift):
    """sigma_i = s t_i / (1 + (s - 1) t_i), t = linspace(1, 0, steps + 1): SD3's time shift (SRPO: s = 3). float32."""
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def official_timestep(sigma):
    """The timestep the official script hands the transformer at sigma: int(1000 sigma) / 1000, in float32.

    The truncation is what the released SRPO checkpoint was trained with: the rollout and both branches feed it to
    the model, while the Euler updates, the noise injection and the recovery use the exact sigma."""
    return torch.floor(sigma * 1000) / 1000


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


def branches(cfg, sel, step):
    """The two branches of one prompt, each ((sigma_from, sigma_to), k, (positive, negative)): the denoise branch
    rewards the step's words (P, N), the inversion branch the same words swapped (N, P)."""
    denoise, inversion, gap = branch_sigmas(timestep_window(cfg), sel, cfg.max_gap)
    k_d, k_i = k_schedule(cfg, sel, gap)
    pos, neg = control_words(step)
    return [(denoise, k_d, (pos, neg)), (inversion, k_i, (neg, pos))]


def srp_loss(model, ae, reward, x0, eps, cond, prompt, branch, cfg):
    """One branch: x0_hat = direct_align(sigma_from -> sigma_to), r = SRP(image(x0_hat), "P. prompt", "N. prompt",
    k) with the branch's word order (reward.py), L = relu(m - r) / 2. The words go to the reward only, never to the
    model. -> (L, r)."""
    (sigma_from, sigma_to), k, words = branch
    x0_hat = direct_align(model, x0, eps, sigma_from, sigma_to, cond, cfg.guidance)
    with autocast(x0.device):  # the reward too: bf16, not the official fp16 (see runtime.training_parts)
        images = decode_images(ae, x0_hat, cfg.height, cfg.width)
        r = reward.relative_reward(images, *(rewards.control_caption(w, prompt) for w in words), k, "crop")
    return hinge_loss(r, cfg.margin), r


# ----------------------------------------------------------------------------------------------------------------
# The step and the loop


def train_step(model, opt, ae, reward, batch, step, cfg, ranks):
    """One update on this rank's share of the global batch, [(prompt, cond, sel)]: per prompt the rollout and both
    branches, each branch backpropagated as soon as it is built (one graph alive at a time; under FSDP each backward
    reduce-scatters, rather than holding a full fp32 gradient until the last), then clip and AdamW.
    -> (loss, denoise reward, inversion reward, gradient norm), means over the global batch."""
    eps = shared_noise(cfg, step, ranks.device)
    totals = 0
    for prompt, cond, sel in batch:
        x0 = online_rollout(model, eps, cond, cfg)
        values = []
        for branch in branches(cfg, sel, step):
            loss, r = srp_loss(model, ae, reward, x0, eps, cond, prompt, branch, cfg)
            (loss * (1 / len(batch))).backward()  # FSDP averages over the ranks: 1 / global batch in all
            values += [loss.detach(), r.detach().mean()]
        totals = totals + torch.stack([values[0] + values[2], values[1], values[3]]) / len(batch)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # the step's one read to the host: every value above stayed on the device, where FSDP's prefetch runs ahead
    # (with --offload the norm is the host gradients', so it joins the others on the device)
    norm = norm.to(ranks.device, torch.float64).reshape(1)
    loss, r_d, r_i, norm = torch.cat([ranks.mean(totals.double()), norm]).tolist()
    values = {"loss": loss, "denoise reward": r_d, "inversion reward": r_i, "gradient norm": norm}
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:  # every rank has the same values (means over the ranks): every rank stops here
        raise Diverged(f"step {step}: not finite: {', '.join(bad)}; the weights were not updated: "
                       f"{runtime.LOWER_LR.format(cfg.lr)}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, r_d, r_i, norm


def train(parts, prompts, cfg, out, ranks, watch=None):
    """The loop: train_step per update, the log, the checkpoints, the before/after grids, and the `watch`
    (evaluation.py: held-out evaluations, TensorBoard; none by default). On SIGTERM or SIGINT (on any rank) every
    rank finishes its step, a checkpoint is saved and Stopped raised: the decision is taken together at the step
    boundary, so no rank waits in a collective the others have left."""
    model, opt, ae, reward, embeddings, prompt_of, start = parts
    log = runtime.open_log(out, start, ranks)
    grid_images(parts, prompts, cfg, os.path.join(out, "samples-before.png"), ranks, start == 0)
    watch = watch or evaluation.Watch((), cfg, out)
    with StopSignals() as signals, watch.started(parts, ranks):
        bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="train",
                   disable=not ranks.main)
        for step in bar:  # the update number, from 1 as the official loop counts (its control words follow it)
            t0 = time.time()
            batch = [(p, sampling.conditioning(embeddings[p], cfg.height, cfg.width, ranks.device),
                      draw_timestep(cfg, step, j)) for j, p in runtime.my_prompts(prompt_of, step, cfg, ranks)]
            loss, r_d, r_i, norm = train_step(model, opt, ae, reward, batch, step, cfg, ranks)
            record = {"step": step, "loss": loss, "reward_denoise": r_d, "reward_inversion": r_i, "grad_norm": norm,
                      "lr": cfg.lr, "words": control_words(step), "seconds": round(time.time() - t0, 3)}
            ranks.main_writes(f"the log {log}", functools.partial(runtime.append_log, log, record))
            watch.logged(record)
            bar.set_postfix(reward=f"{r_d:.4f}", loss=f"{loss:.4f}")
            stop = ranks.any(signals.received is not None)
            watch.after(step)
            if stop or step % cfg.save_every == 0 or step == cfg.steps:
                runtime.save_checkpoint(model, opt, step, cfg, out, ranks)
            if stop and step < cfg.steps:
                raise Stopped(f"{signals.received or 'another process was signalled'}: stopped after step {step} of "
                              f"{cfg.steps}; {runtime.checkpoint_note(out)}")
    grid_images(parts, prompts, cfg, os.path.join(out, "samples-after.png"), ranks, start < cfg.steps)


def grid_images(parts, prompts, cfg, path, ranks, wanted):
    """The before/after view: the first --samples prompts at FLUX.1-dev's inference settings, written by rank 0."""
    conds = [sampling.conditioning(parts.embeddings[p], cfg.height, cfg.width, ranks.device)
             for p in prompts[: cfg.samples]]
    if wanted and conds:
        images = sampling.sample_grid(parts.model, parts.ae, conds, cfg.height, cfg.width, cfg.guidance, ranks.device)
        ranks.main_writes(f"the sample grid {path}", functools.partial(sampling.save_png, images, [path]))


def cmd_train(args):
    """`srpo.py train`: the config from the flags, every input checked, then the run (runtime.py sets it up)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.lora_rank is not None and args.lora_rank < 1:
        raise InputError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if args.lora_rank and args.lr is None and args.flux:
        args.lr = LORA_LR
    cfg = cli.config_from_flags(args, TrainConfig, DEMO_DEFAULTS, REWARD_RECIPES, world)
    cli.check_reward_flags(args, cfg.reward)
    if args.flux:
        runtime.check_guidance_embedding(args.flux, cfg)
    prompts = read_prompts(args.prompts) if args.prompts else list(DEMO_PROMPTS)
    eval_prompts = evaluation.check_flags(args)
    with runtime.processes(args, cfg, world) as ranks:
        begin = runtime.start_point(args.out, cfg, args.resume, ranks)  # a refused --resume: before any model loads
        watch = evaluation.Watch.from_flags(args, cfg, eval_prompts, ranks)
        try:
            parts = runtime.training_parts(args, cfg, prompts, ranks, begin, eval_prompts)
            train(parts, prompts, cfg, args.out, ranks, watch)
        except (Fault, Diverged) as e:
            raise type(e)(f"{e}; {runtime.checkpoint_note(args.out, isinstance(e, Diverged))}") from None
    if ranks.main:
        runtime.report(args.out)
        evaluation.report(args.out, cfg)


def build_parser():
    return cli.build_parser(TrainConfig, DEMO_DEFAULTS, REWARD_RECIPES)


def main(argv=None):
    """`python srpo.py train|sample|score`: one line on stderr and an exit code for every way a command ends."""
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    try:
        cli.check_ranges(parser, args)
        {"train": cmd_train, "sample": sampling.cmd_sample, "score": rewards.cmd_score}[args.command](args)
    except (InputError, Fault, Diverged, Stopped) as e:
        # Faults, divergences and stops are agreed on by every process of a torchrun: one of them says it
        if isinstance(e, InputError) or os.environ.get("RANK", "0") == "0":
            print(f"{'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        codes = {InputError: EXIT_INPUT, Fault: EXIT_FAULT, Diverged: EXIT_DIVERGED, Stopped: EXIT_STOPPED}
        sys.exit(next(code for kind, code in codes.items() if isinstance(e, kind)))


if __name__ == "__main__":
    main()
