"""SRPO on FLUX.1 and FLUX.2: Direct-Align and Semantic Relative Preference Optimization (Shen et al. 2025, "Directly
Aligning the Full Diffusion Trajectory with Fine-Grained Human Preference", arXiv 2509.06942), trained exactly as the
official FLUX.1-dev script does it (Tencent-Hunyuan/SRPO: fastvideo/SRPO.py and its HPS and PickScore launch scripts).

Reward fine-tuning backpropagates a differentiable reward (HPSv2.1, PickScore, CLIP) through the images the model makes.
Done through a multi-step denoising chain (ReFL, DRaFT), it is costly and reaches only the last, low-noise steps, where
the model learns to please the reward model rather than people (reward hacking). SRPO changes two things.

Direct-Align. A flow-matching state is an interpolation of noise and image (the paper's noise prior):
    x_sigma = sigma eps + (1 - sigma) x0
so, with eps known, one model step from any sigma gives back a clean image by interpolation:
    x_t    = x_from + (sigma_t - sigma_from) v(x_from, sigma_from)       one Euler step, the only one with gradient
    x0_hat = (x_t - sigma_t eps) / (1 - sigma_t)                         the recovery
and the reward sees x0_hat at early, noisy timesteps too, for the backward of one model call. The paper sums such
rewards over timesteps, discounting late ones by lambda(t); the official script (and this code) takes one, undiscounted.

SRP, the semantic relative reward. The reward compares the image with the prompt under a positive and a negative
control word, so that what both share (the reward model's own biases) cancels:
    r = f_img(x0_hat) . ((1 + k) f_txt("P. prompt") - f_txt("N. prompt"))
An inversion branch steps up in sigma and rewards N instead (the words swapped): its x0_hat moves with +v, so
pushing it towards N pushes the denoising direction away from N. Each branch is trained with the hinge
L = relu(0.7 - r) / 2.

One step (`train_step`), for each prompt of the global batch:
    eps ~ N(0, I), one draw shared by every prompt and rank            shared_noise
    x0 = 25-step Euler rollout of the current model, no gradient       online_rollout
      or offline (train --images): the VAE encoding of a real image    training/image_data.py, runtime.offline_x0
    sel ~ U{5..995}, an index into the window w of N = 1000 sigmas     timestep_window, draw_timestep
      sigma_t = w[N - sel]; each branch's start, and its k, from sel   branch_sigmas, k_schedule
    denoise branch: sigma_hi -> sigma_t, SRP with (P, N)               branches, direct_align, srp_loss
    inversion branch: sigma_lo -> sigma_t, SRP with (N, P)             (each backpropagated as soon as it is built)
then the gradient norm is clipped to 0.1 and AdamW steps. The loop (`train`) logs, evaluates and saves; where it runs
is training/runtime.py's, the rewards reward.py's, the baselines methods.py's, the model families families.py's.
"""

import functools
import time
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import families
from common import bounds
from common.bounds import Bounded, check_fields
from common.util import InputError, Stopped, StopSignals, derive_seed, to_device
from reward import REWARDS, control_caption
from sampling.sampler import autocast, check_size, decode_images, euler_sample
from training import checkpoints, runtime

K_MAX = int((1 - 0.9) * 1000) + 1  # the official gap: (1 - 0.9) * 1000 is 99.99999999999997 in floats, K_max 100


# The methods made of SRPO's denoise and inversion branches and their SRP reward, which --no-inversion and
# --plain-reward change (direct-align is SRPO with both); the other baselines of methods.py have neither.
BRANCH_METHODS = ("srpo", "direct-align")


@dataclass
class TrainConfig:
    """SRPO's hyperparameters, each declared here once: `name: Annotated[type, range, help] = default`. The default
    is the official FLUX.1-dev run's (HPSv2.1, global batch 32, 19 updates); PRESETS (below) change some of them for
    a reward, FLUX.2, the tiny demo or LoRA. Each field is a flag of `srpo.py train` (cli.py makes --name-with-dashes
    from it: its type, the help, the range stated), and is checked here against its range (a bounds.Bounded)."""

    reward: Annotated[str, "the reward trained against: HPSv2.1 (--hps), PickScore (--pickscore) or CLIP-H (--clip), "
                           "as the official --reward_model; it picks the per-reward defaults (the table above)"] = "hps"
    method: Annotated[str, "the training method: srpo, or a baseline of the paper's Table 1 (methods.py): direct-align "
                           "(--no-inversion --plain-reward), refl (ReFL), draft-lv (DRaFT-LV)"] = "srpo"
    # AdamW at a constant learning rate, the gradient norm clipped
    lr: Annotated[float, bounds.POSITIVE, "AdamW learning rate, constant after the warm-up"] = 5e-6
    lr_warmup: Annotated[int, Bounded(int, 0, bounds.STEPS_MAX, why="updates"),
                         "N: update s = 1, 2, ... steps with lr min(1, s / N) (0: the official constant lr)"] = 0
    betas: Annotated[tuple, bounds.BETA, "AdamW betas"] = (0.9, 0.999)
    adam_eps: Annotated[float, bounds.POSITIVE, "AdamW epsilon"] = 1e-8
    weight_decay: Annotated[float, bounds.NON_NEGATIVE, "AdamW weight decay"] = 1e-4
    grad_clip: Annotated[float, bounds.POSITIVE, "clip the gradient norm to this"] = 0.1
    # the online rollout: x0 from 25 Euler steps of the shift-3 schedule
    height: Annotated[int, bounds.TRAIN_SIZE, "training image height, a multiple of 16, at most 1024"] = 720
    width: Annotated[int, bounds.TRAIN_SIZE, "training image width, a multiple of 16, at most 1024"] = 720
    rollout_steps: Annotated[int, bounds.TIMESTEPS, "Euler steps of the online rollout"] = 25
    shift: Annotated[float, bounds.POSITIVE, "time shift s of the rollout and window schedules: sigma = s t / (1 + "
                                             "(s - 1) t) (FLUX.2 too, not its pipeline's empirical mu)"] = 3.0
    rollout_guidance: Annotated[float, bounds.GUIDANCE, "guidance of the online rollout (FLUX.2 [klein] base: "
                                                        "classifier-free, at 1 the conditional pass alone)"] = 1.0
    guidance: Annotated[float, bounds.GUIDANCE, "guidance of the branches' model calls and the sample grids (FLUX.2 "
                                                "[klein] base: the CFG scale, two passes a call above 1)"] = 3.5
    # Direct-Align's window and branches, SRP's k and the hinge
    window: Annotated[tuple, bounds.WINDOW, "training window: sigmas between S[A] and S[B], S = shift(linspace(1, 0, "
                                     "G + 1)), G --window-grid"] = (5, 25)
    window_grid: Annotated[int, bounds.TIMESTEPS, "G, the steps of the schedule S the window is cut from (the "
                                                  "official --vis_sampling_step)"] = 50
    window_points: Annotated[int, bounds.WINDOW_POINTS,
                             "N, points of the window grid sigmas_l = linspace(S[A], S[B], N)"] = 1000
    max_gap: Annotated[int, bounds.WINDOW_POINTS, "K_max, the largest gap in window points from a branch's start to "
                                                  "sigma_t (the official int((1 - 0.9) * 1000) + 1)"] = K_MAX
    k_denoise: Annotated[tuple, bounds.FINITE, "k of the denoise branch: linspace(A, B, N)[sel]"] = (0.1, 0.25)
    k_inversion: Annotated[tuple, bounds.FINITE, "k of the inversion: linspace(A, B, N)[max(sel - K, 1)]"] = (0.3, 0.01)
    margin: Annotated[float, bounds.FINITE, "hinge margin m: loss = relu(m - r) / 2 per branch"] = 0.7
    words: Annotated[tuple, "SRP's control words P N, comma-separated lists: update s uses the (s mod len)-th of "
                            "each"] = ("Natural-lighting,Detail,Detailed,Real", "Concept art,Painting,Anime,Flat,Oil")
    no_inversion: Annotated[bool, "ablation: train the denoise branch only (the official README's check of an "
                                  "implementation: without the inversion branch, reward hacking comes back)"] = False
    plain_reward: Annotated[bool, "ablation, SRP off: every branch rewards the plain score of the prompt (the "
                                  "inversion's gradient then opposes the denoise branch's; pickscore, clip: ~20, "
                                  "give a --margin above)"] = False
    no_branch_cfg: Annotated[bool, "on a model sampled with CFG (FLUX.2 [klein] base) the training calls make the "
                                   "conditional pass alone: 1 model call where a branch at --guidance > 1 makes 2, "
                                   "v_neg + g (v_pos - v_neg); the grids and evaluations keep the guidance"] = False
    # ReFL's (methods.refl_losses): its gradient step i ~ U{floor(f T) .. T - 1} and loss lambda relu(m s - r)
    refl_late: Annotated[float, Bounded(float, 0, 1, open_high=True, why="a share"), "f (ImageReward's 0.75)"] = 0.75
    refl_margin: Annotated[float, bounds.FINITE, "m, s the reward's scale (FlowBP's relu(0.55 - HPS))"] = 0.55
    refl_grad_scale: Annotated[float, bounds.POSITIVE, "lambda, ImageReward's --grad_scale"] = 1e-3
    # the run
    steps: Annotated[int, bounds.RUN_STEPS, "optimizer updates, numbered 1..N (update s uses step s's words); the "
                                            "official loop's step 20 only saves: its checkpoint holds 19"] = 19
    save_every: Annotated[int, bounds.RUN_STEPS, "save a checkpoint every N updates (and after the last one)"] = 5
    keep: Annotated[int, bounds.RUN_STEPS, "complete checkpoints kept; older ones are deleted once a newer one is "
                                           "complete, except the one that scored best on the held-out prompts"] = 1
    batch: Annotated[int, bounds.PROMPTS, "prompts per optimizer step (global batch), split over the processes: each "
                                          "runs batch / world of them (tiny demo: one per process)"] = 32
    seed: Annotated[int, bounds.SEED, "seed of the prompt order, the shared noise and the timestep draws"] = 0
    samples: Annotated[int, Bounded(int, 0, 64, why="one row"), "prompts (the first ones) in the before/after "
                                                                "sample grids; 0: none"] = 4
    # LoRA (weights/lora.py): the transformer frozen, its adapters trained instead
    lora_rank: Annotated[int, Bounded(int, 0, 1024, why="a third of FLUX.1's width 3072"),
                         "LoRA rank r: train adapters y = W x + (alpha / r) B A x on the blocks' attention and MLP "
                         "layers, the transformer frozen (0: full fine-tuning)"] = 0
    lora_alpha: Annotated[float, bounds.NON_NEGATIVE, "LoRA alpha (0: the rank, i.e. scale 1)"] = 0.0

    def __post_init__(self):
        """Refuse what the run cannot take, naming the flag: each field within its range, then what ties them."""
        if self.reward not in REWARDS:
            raise InputError(f"--reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        check_fields(self)
        check_size(self.height, self.width)
        if not self.window[0] < self.window[1] <= self.window_grid:
            raise InputError(f"--window A B must satisfy A < B <= --window-grid {self.window_grid}, got "
                             f"{self.window[0]} {self.window[1]}")
        for switch in ("no_inversion", "plain_reward"):
            if getattr(self, switch) and self.method not in BRANCH_METHODS:
                raise InputError(f"--{switch.replace('_', '-')} is an ablation of SRPO's branches, and --method "
                                 f"{self.method} has none: no inversion branch, the plain score rewarded already "
                                 f"(methods.py); give one or the other")
        if not all(w.strip() for words in self.words for w in words.split(",")):
            raise InputError(f"--words P N: two comma-separated lists, no word empty, got {self.words}")
        if self.lora_alpha and not self.lora_rank:
            raise InputError("--lora-alpha needs --lora-rank (the adapters it scales)")
        self.lora_alpha = self.lora_alpha or float(self.lora_rank)


# Named presets: dicts of TrainConfig values over its defaults (the official FLUX.1-dev HPS run), applied by cli.py
# where they fit the command line, in this order (flags given win over all): the reward's (--reward) <- the family's:
# flux2 <- flux2-flowbp, flux2-refl (--flux with --method refl, draft-lv) <- demo (no --flux) <- the demo's: world,
# flux2-demo <- lora (--lora-rank with --flux).
PRESETS = {
    # Each reward's official recipe where it differs from the HPS launch script's (SRPO_training_hpsv2.sh): PickScore's
    # SRPO_training_ps.sh (--train_guidence 2, --train_timestep 5 30, --discount_pos 0.1 0.5, --discount_inv 0.6 0.01).
    # CLIP has no launch script: fastvideo/SRPO.py's defaults are the HPS values, and CLIP takes them.
    "hps": {},
    "pickscore": {"rollout_guidance": 2.0, "window": (5, 30), "k_denoise": (0.1, 0.5), "k_inversion": (0.6, 0.01)},
    "clip": {},
    # FLUX.2's branches and grids at the pipeline's guidance
    "flux2": {"guidance": families.FLUX2.guidance},
    "flux2-flowbp": {"height": 512, "width": 512, "steps": 300, "lr": 1e-5, "grad_clip": 1.0, "rollout_guidance": 4.0},
    "flux2-refl": {"refl_late": 0.56, "refl_grad_scale": 1.0},  # FlowBP's configs/final/flux2: the last 11 of 25 steps
    # The tiny demos need a far larger step than FLUX.1-dev to move in a minute (--batch: one prompt a process)
    "demo": {"lr": 1e-3, "height": 64, "width": 64, "steps": 80, "save_every": 20},
    "world": {"words": ("bright", "dark"), "lr": 2e-5, "batch": 4, "steps": 40, "save_every": 10},  # docs/world.md
    # The tiny FLUX.2's: at lr 1e-3 its denoise reward and held-out score barely move in 80 steps; at 3e-3 both rise
    "flux2-demo": {"lr": 3e-3},
    # LoRA's first AdamW step moves W by (alpha / r) B A, entries ~lr sqrt(r) / sqrt(3 in) (A ~ U(+-1/sqrt(in))), where
    # full fine-tuning moves each by ~lr: at rank 16 on 3072-wide layers, 24 x 5e-6 = 1.2e-4; 1e-4 (diffusers' too)
    "lora": {"lr": 1e-4},
}


# ----------------------------------------------------------------------------------------------------------------
# SRP's control words: the method's recipe, not the scorer's (the reward only sees the captions)


def control_words(step, words=None):
    """The words of update `step` from --words' lists P and N, as the official loop picks them: (P[step % len(P)],
    N[step % len(N)]); with the official lists (4 and 5 words) the 20 pairs recur every 20 steps."""
    positive, negative = (w.split(",") for w in words or TrainConfig.words)
    return positive[step % len(positive)], negative[step % len(negative)]


# ----------------------------------------------------------------------------------------------------------------
# Direct-Align, in the order of one step


def shifted_schedule(steps, shift):
    """sigma_i = s t_i / (1 + (s - 1) t_i), t = linspace(1, 0, steps + 1): SD3's time shift (SRPO: s = 3). float32."""
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def official_timestep(sigma):
    """The timestep the official script hands the transformer at sigma: int(1000 sigma) / 1000, in float32. The
    released SRPO checkpoint was trained with this truncation: the rollout and both branches feed it to the model,
    while the Euler updates, the noise injection and the recovery use the exact sigma."""
    return torch.floor(sigma * 1000) / 1000


def shared_noise(cfg, step, device, noise):
    """eps ~ N(0, I) in bf16 values, one draw per step for the rollout, the noise injection and the recovery of every
    prompt on every rank, in the family's packing (noise: Family.noise_of(model)). The official script draws it in
    bf16 on rank 0 and broadcasts it; here a float32 draw seeded by (seed, step) is rounded to bf16: every rank makes
    the same tensor with no communication, and makes it again after a resume."""
    seed = derive_seed(cfg.seed, "noise", step)
    return to_device(noise(1, cfg.height, cfg.width, seed, torch.float32).bfloat16().float(), device)


@functools.cache
def rollout_schedule(steps, shift, device):
    """The rollout's sigmas (on the host: Euler's scalars) and its official timesteps, moved to the device once."""
    sigmas = shifted_schedule(steps, shift)
    return sigmas, to_device(official_timestep(sigmas), device)


@torch.no_grad()
def online_rollout(model, eps, cond, cfg, steps=None):
    """x0 = Euler(eps) over shift(linspace(1, 0, 26)) at the rollout guidance, no gradient: the current model's own
    sample (online), which Direct-Align noises and recovers. steps: stop there, at sigmas[steps] (ReFL's chain)."""
    sigmas, timesteps = rollout_schedule(cfg.rollout_steps, cfg.shift, eps.device)
    stop = cfg.rollout_steps if steps is None else steps
    with autocast(eps.device):  # at guidance 1, a CFG family's conditional pass alone (its at_guidance)
        return euler_sample(model, eps, sigmas[: stop + 1], cond.at_guidance(cfg.rollout_guidance),
                            cfg.rollout_guidance, timesteps)


def timestep_window(cfg):
    """sigmas_l = linspace(S[A], S[B], N), S = shift(linspace(1, 0, G + 1)), G = 50, (A, B) = (5, 25): sigma 0.964
    .. 0.75. Training stays off the late, low-noise steps, where optimizing the reward invites reward hacking."""
    S = shifted_schedule(cfg.window_grid, cfg.shift)
    return torch.linspace(S[cfg.window[0]].item(), S[cfg.window[1]].item(), cfg.window_points)


def draw_timestep(cfg, step, j):
    """sel ~ U{5 .. N - 5} for prompt j of the global batch, drawn from (seed, step, j): the same on any ranks."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "timestep", step, j))
    return int(torch.randint(5, cfg.window_points - 4, (), generator=g))


def branch_sigmas(window, sel, max_gap):
    """Each branch's (sigma_from, sigma_to) on the window w of N sigmas, as the official script picks them: both
    end at sigma_t = w[N - sel], each starting K = min(K_max, N - sel, sel) window points away, on its own side:

        index w:  0 ... N-sel-K ----------> N-sel <---------- N-sel+K ... N-1       (sigma falls to the right)
                        sigma_hi  denoise  sigma_t  inversion  sigma_lo

    The official script's inversion is w[N - mid] -> w[N - start], mid = max(sel - K, 1), start = min(mid + K, N): the
    picture for sel > K. For sel <= K (about 10 % of draws) mid = 1: from w[N - 1] to one point noisier than sigma_t,
    where it recovers; the official script's, kept, its bf16 products too (times). -> (denoise, inversion, K), 0-d."""
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


def times(sigma, x, bf16=False):
    """sigma x; bf16: as CUDA makes a 0-d float32 sigma times a bf16 tensor (eps, v): both read as bf16, the product
    bf16. The official script's sigmas are 1-element tensors, but 0-d where an int indexes its window: for sel <= K,
    the inversion branch's sigma_lo eps, and at sel = K = K_max its step and recovery terms too (Branch.bf16)."""
    return (sigma.bfloat16().float() * x.bfloat16().float()).bfloat16().float() if bf16 else sigma * x


def inject_noise(x0, eps, sigma, bf16=False):
    """x_sigma = sigma eps + (1 - sigma) x0: the flow-matching interpolation, with the step's shared eps."""
    return times(sigma, eps, bf16) + (1 - sigma) * x0


def model_step(model, x, sigma_from, sigma_to, cond, guidance, bf16=False):
    """x' = x + (sigma_to - sigma_from) v(x, t(sigma_from)), t the official timestep: one Euler step, one model call
    (with gradient when enabled), down in sigma for the denoise branch, up for the inversion branch."""
    t, b = official_timestep(sigma_from).item(), x.shape[0]  # t a host tensor: filled in on the device, no copy
    v = cond.velocity(model, x, x.new_full((b,), t), x.new_full((b,), guidance))
    return x + times(sigma_to - sigma_from, v.float(), bf16)


def recover_x0(x, eps, sigma, bf16=False):
    """x0_hat = (x_sigma - sigma eps) / (1 - sigma): the clean image by interpolation with the known noise, in
    place of the remaining denoising steps (Direct-Align's noise prior)."""
    return (x - times(sigma, eps, bf16)) / (1 - sigma)


def direct_align(model, x0, eps, sigma_from, sigma_to, cond, guidance, bf16=(False, False)):
    """Inject noise at sigma_from, one model step to sigma_to, recover x0_hat there. A perfect model (v = eps - x0)
    gives back x0 exactly, for any pair of sigmas; a real one shows its error at sigma_to (bf16: see times)."""
    with autocast(x0.device):
        x = model_step(model, inject_noise(x0, eps, sigma_from, bf16[0]), sigma_from, sigma_to, cond, guidance, bf16[1])
    return recover_x0(x, eps, sigma_to, bf16[1])


def hinge_loss(r, margin):
    """L = relu(m - r) / 2 per branch (ReFL's hinge, SRPO's margin). The / 2: the official run accumulates a prompt's
    two branches' gradients before its optimizer step: a prompt's loss is the mean of its branches' hinges."""
    return F.relu(margin - r).mean() / 2


class Branch(NamedTuple):
    """One Direct-Align branch of a prompt: its model step sigma_from -> sigma_to, and SRP's k and control words."""

    name: str
    sigma_from: torch.Tensor
    sigma_to: torch.Tensor
    k: float
    positive: str
    negative: str
    bf16: tuple = (False, False)  # whether sigma_from's, sigma_to's products are bf16, as officially (times)


def branches(cfg, sel, step):
    """The two branches of one prompt: the denoise branch rewards the step's words (P, N), the inversion branch
    the same words swapped (N, P)."""
    denoise, inversion, gap = branch_sigmas(timestep_window(cfg), sel, cfg.max_gap)
    k_d, k_i = k_schedule(cfg, sel, gap)
    pos, neg = control_words(step, cfg.words)
    return (Branch("denoise", *denoise, k_d, pos, neg),
            Branch("inversion", *inversion, k_i, neg, pos, (sel <= gap, sel == gap == cfg.max_gap)))


def srp_loss(model, ae, reward, x0, eps, item, branch, cfg):
    """One branch: x0_hat = direct_align(sigma_from -> sigma_to), r = SRP(image(x0_hat), "P. prompt", "N. prompt",
    k) with the branch's word order, L = relu(m - r) / 2. The words go to the reward only, never to the model.

    This is the official code's SRP: r = c img . ((1 + k) txt(P. prompt) - txt(N. prompt)). The paper's is the
    difference of the two text-conditioned rewards, r = f_img(x) . (C_1 - C_2), C_1, C_2 the embeddings of the prompt
    with the positive and the negative words: no k (k scheduled per branch, k_schedule) and no c (c = 1 for HPS,
    exp(logit_scale) / 20 for PickScore and CLIP: reward.py). At k = 0 and c = 1 the two coincide. -> (L, r)."""
    x0_hat = direct_align(model, x0, eps, branch.sigma_from, branch.sigma_to, item.cond, cfg.guidance, branch.bf16)
    r = image_reward(ae, reward, x0_hat, item.text, cfg, None if cfg.plain_reward else branch)
    return hinge_loss(r, cfg.margin), r


def image_reward(ae, reward, x0_hat, text, cfg, branch=None):
    """r of the decoded image on SRPO's training crop: SRP's relative reward with the branch's words and k, or with
    no branch the reward model's plain score(image, prompt) (--plain-reward, the baselines of methods.py)."""
    with autocast(x0_hat.device):  # the reward too: bf16, not the official fp16 (see runtime.training_parts)
        images = decode_images(ae, x0_hat, cfg.height, cfg.width)
        if branch is None:
            return reward.score(images, text, preprocess_mode="crop")
        positive, negative = (control_caption(word, text) for word in (branch.positive, branch.negative))
        return reward.relative_reward(images, positive, negative, branch.k, preprocess_mode="crop")


def srpo_losses(model, ae, reward, x0, eps, item, step, cfg):
    """SRPO, the training method: a prompt's rollout x0 into its branch losses, (name, L, r) per branch, each
    yielded as soon as it is built so that the step backpropagates it before the next one is made (--no-inversion:
    the denoise branch's only). Another method (ReFL, DRaFT, plain Direct-Align: methods.py) has this shape too."""
    denoise, inversion = branches(cfg, item.sel, step)
    for branch in (denoise,) if cfg.no_inversion else (denoise, inversion):
        yield branch.name, *srp_loss(model, ae, reward, x0, eps, item, branch, cfg)


# ----------------------------------------------------------------------------------------------------------------
# The step and the loop


class Prompt(NamedTuple):
    """A prompt of the step's batch: its text, its Conditioning, its timestep draw sel, and offline (--images) the
    x0 of its image (None: the step's online rollout makes x0)."""

    text: str
    cond: families.Conditioning
    sel: int
    x0: torch.Tensor | None = None


def train_step(parts, batch, step, cfg, ranks, method):
    """One update of parts.model by a methods.Method on this rank's share of the global batch ([Prompt]): per prompt
    its x0 (the online rollout, or offline its image's; none if method.own_rollout) and the method's branches, each
    backpropagated as soon as it is built (one graph alive at a time; under FSDP each backward reduce-scatters), then
    clip and AdamW. -> {"loss", "reward_NAME", "loss_NAME", "grad_norm"}."""
    model = parts.model
    eps = shared_noise(cfg, step, ranks.device, parts.family.noise_of(model))
    totals = {}
    for item in batch:
        x0 = item.x0
        if x0 is None and not method.own_rollout:
            x0 = online_rollout(model, eps, item.cond, cfg)
        rewards, losses = {}, {}
        for name, loss, r in method.losses(model, parts.ae, parts.reward, x0, eps, item, step, cfg):
            (loss * (1 / len(batch))).backward()  # FSDP averages over the ranks: 1 / global batch in all
            rewards[f"reward_{name}"], losses[f"loss_{name}"] = r.detach().mean(), loss.detach()
        for key, value in {"loss": sum(losses.values()), **rewards, **losses}.items():
            totals[key] = totals.get(key, 0) + value / len(batch)
    return runtime.optimizer_step(model, parts.opt, totals, step, cfg, ranks)


def step_batch(parts, cfg, step, ranks):
    """This rank's Prompts of update `step`: which prompts (runtime.my_prompts), their conditioning (the family's, as
    sampled; --no-branch-cfg: a CFG family's conditional pass alone), their draws, their images' x0 when offline."""
    mine = runtime.my_prompts(parts.prompt_of, step, cfg, ranks)
    conds = [parts.conditioning(p, cfg, ranks.device) for _, p in mine]
    return [Prompt(p, c.conditional() if cfg.no_branch_cfg else c, draw_timestep(cfg, step, j), parts.x0_of(step, j))
            for (j, p), c in zip(mine, conds, strict=True)]


def train(parts, prompts, cfg, out, ranks, method, watch):
    """The loop of a methods.Method: train_step per update, the log, the checkpoints, and the caller's instruments
    where they run (watch, a training.evaluation.Watch: the before/after grids, the held-out evaluations when due).
    On SIGTERM or SIGINT (on any rank) every rank finishes its step, a checkpoint is saved and Stopped raised: the
    decision is taken together at the step boundary, so no rank waits in a collective the others have left."""
    log = checkpoints.open_log(out, parts.start, ranks)
    words = functools.partial(control_words, words=cfg.words)
    runtime.encode_captions(parts, cfg, ranks, lambda step, p: [control_caption(w, p) for w in words(step)])
    watch.grid_images(parts, prompts, "samples-before.png", ranks, parts.start == 0)
    with StopSignals() as signals, watch.open(parts, ranks):
        if parts.start == 0:
            watch.evaluate(0)  # the baseline of the held-out rewards
        for step in tqdm(range(parts.start + 1, cfg.steps + 1), initial=parts.start, total=cfg.steps, desc="train",
                         disable=not ranks.main):  # updates count from 1, as the official loop (its words follow)
            t0 = time.time()
            values = train_step(parts, step_batch(parts, cfg, step, ranks), step, cfg, ranks, method)
            record = {"step": step, **values, "lr": runtime.learning_rate(cfg, step), "words": words(step),
                      "seconds": round(time.time() - t0, 3)}
            ranks.main_writes(f"the log {log}", functools.partial(checkpoints.append_log, log, record))
            watch.log(record)
            stop = ranks.any(signals.received is not None)
            if watch.due(step):  # before the checkpoint: a saved step is never left without its evaluation
                watch.evaluate(step)
            if stop or step % cfg.save_every == 0 or step == cfg.steps:
                checkpoints.save_checkpoint(parts.model, parts.opt, step, cfg, out, ranks, watch.best_step())
            if stop and step < cfg.steps:
                raise Stopped(f"{signals.received or 'another process was signalled'}: stopped after step {step} of "
                              f"{cfg.steps}; {checkpoints.checkpoint_note(out)}")
    watch.grid_images(parts, prompts, "samples-after.png", ranks, parts.start < cfg.steps)


if __name__ == "__main__":  # `python srpo.py train|sample|score|export`: the command line is cli.py's
    import cli

    cli.main()
