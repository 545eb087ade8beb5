"""The training methods: SRPO and the methods it is compared with in its paper's Table 1 (Shen et al. 2025, arXiv
2509.06942), each a Method whose losses are a function of srpo.srpo_losses' shape: (model, ae, reward, x0, eps, item,
step, cfg) -> (name, L, r) per branch, every branch backpropagated by srpo.train_step as soon as it is yielded. The
baselines are built from SRPO's own parts (the rollout, the Euler model step, Direct-Align, the reward of a decoded
image), so that what differs from SRPO is what is written here. `train --method NAME` picks one (METHODS); the rest
of the step (the batch, the shared eps, clipping, AdamW) is SRPO's.

The SRPO paper does not say how it ran the baselines on FLUX.1-dev beyond their names and costs; each follows the
paper that defined it, carried over to a flow as FlowBP does ("Exploring the Design Space of Reward Backpropagation
for Flow Matching", arXiv 2606.11075: ReFL keeps one late step differentiable and rewards its one-step estimate of
the clean image; DRaFT-LV re-noises the final sample). Every method uses SRPO's settings where it needs one: the
chain without gradient is the rollout (--rollout-steps T, --shift, --rollout-guidance), Direct-Align's branches call
the model with gradient at --guidance, while ReFL's and DRaFT-LV's calls with gradient are steps of their chain, at
its guidance, and the reward sees SRPO's training crop.

    method        gradient through                          timesteps                   reward      model calls
    srpo          one Euler step per branch, 2 branches     the window, sigma .96-.75   SRP         T + 2
    direct-align  one Euler step, the denoise branch        the window                  plain       T + 1
    refl          the last call of a chain stopped early    i ~ U{3T/4 .. T-1}          plain       i + 1
    draft-lv      the final step, and again from n = 2      sigma_{T-1} (0.11) -> 0     plain       T + n
                  re-noisings of its sample
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

import families
import srpo
from common.util import derive_seed, to_device
from sampling.sampler import autocast

# n, DRaFT-LV's re-noisings of the final sample: FlowBP's num_noised_samples = 2 and LeapAlign's (the SRPO paper
# does not give it)
DRAFT_LV_NOISES = 2


class Method(NamedTuple):
    """A training method as srpo.train_step takes it: its name (train --method), its losses (srpo.srpo_losses'
    shape), and own_rollout: it rolls its own chain from eps (ReFL, DRaFT-LV), so the step makes no x0 for it."""

    name: str
    losses: Callable
    own_rollout: bool = False


def direct_align_losses(model, ae, reward, x0, eps, item, step, cfg):
    """Direct-Align without SRP, the paper's Direct-Align row: the denoise branch alone, rewarded by the plain score
    of the prompt (no control words, hence no inversion branch: it exists to reward the swapped words):

        x0_hat = direct_align(x0, eps, sigma_hi -> sigma_t),   L = relu(m - score(image(x0_hat), prompt)) / 2

    It is exactly `train --no-inversion --plain-reward`, SRPO with both ablations. Cost: T + 1 model calls, one
    with gradient. One timestep, undiscounted, as the official code: the paper's sum over timesteps with a discount
    lambda(t) is not implemented, its equation not found (docs/method.md says what was searched)."""
    yield from srpo.srpo_losses(model, ae, reward, x0, eps, item, step,
                                dataclasses.replace(cfg, no_inversion=True, plain_reward=True))


def refl_step(cfg, sel):
    """ReFL's gradient step i in {floor(f T) .. T - 1} of the T-step rollout, f = --refl-late (0.75, T = 40:
    ImageReward's 30..39; T = 25: 18..24; FlowBP's FLUX.2 0.56: the last 11 of 25, 14..24), read off the prompt's
    timestep draw sel ~ U{5 .. N - 5} (srpo.draw_timestep) by cutting its range into T - floor(f T) equal parts:
    every method takes its randomness from the same seeded draw."""
    late = int(cfg.refl_late * cfg.rollout_steps)
    return late + (sel - 5) * (cfg.rollout_steps - late) // (cfg.window_points - 9)


def chain_step(model, x, sigma, cond, cfg):
    """x0_hat = x - sigma v(x, sigma): the chain's next model call, with gradient, as one Euler step to sigma 0 (the
    clean image it predicts), at the chain's guidance (--rollout-guidance, the conditioning as sampled there)."""
    with autocast(x.device):
        return srpo.model_step(model, x, sigma, torch.zeros(()), cond.at_guidance(cfg.rollout_guidance),
                               cfg.rollout_guidance)


def refl_losses(model, ae, reward, x0, eps, item, step, cfg):
    """ReFL (Xu et al. 2023, "ImageReward", arXiv 2304.05977, its ReFL algorithm; ImageReward/ReFL.py as it stands):
    the chain from eps without gradient down to a random late step i, the chain's next model call there with
    gradient, and the reward on the clean image predicted from it:

        x_i = Euler(eps; sigma_0 .. sigma_i), no gradient             srpo.online_rollout, stopped at step i
        x0_hat = x_i - sigma_i v(x_i, sigma_i)                        chain_step, at the chain's guidance
        L = lambda relu(m s - score(image(x0_hat), prompt))           ImageReward's phi and --grad_scale lambda

    ReFL.py rolls 40 DDPM steps of the conditional UNet (no guidance), i = randint(30, 39), tells the UNet the
    schedule's own timestep at step i (here sigma_i's, as in the chain), and takes the scheduler's
    pred_original_sample; its loss is relu(2 - r) * 1e-3 (--grad_scale), max_grad_norm 1. Its margin 2 is on
    ImageReward's standardised scale; here m s is on the trained reward's own: m = --refl-margin (0.55, FlowBP's
    relu(0.55 - HPS), above any HPSv2.1 score: the hinge never switches off, ReFL ascends the reward) times s, the
    reward's scale (1 for HPS, exp(logit_scale) = 100 for PickScore and CLIP, whose scores are 100 cosines: 55
    sits as far above PickScore's ~22). lambda = --refl-grad-scale (1e-3) is kept: with clipping at --grad-clip
    it sets how often the clip acts. x0 (SRPO's rollout) is not used: the method rolls its own chain
    (own_rollout), i + 1 model calls, one with gradient."""
    i = refl_step(cfg, item.sel)
    x = srpo.online_rollout(model, eps, item.cond, cfg, steps=i)
    x0_hat = chain_step(model, x, srpo.rollout_schedule(cfg.rollout_steps, cfg.shift, eps.device)[0][i], item.cond,
                        cfg)
    r = srpo.image_reward(ae, reward, x0_hat, item.text, cfg)
    yield "refl", cfg.refl_grad_scale * F.relu(cfg.refl_margin * reward.scale() - r).mean(), r


def renoise(cfg, step, item, j, device, noise):
    """eps_j ~ N(0, I), DRaFT-LV's j-th fresh noise of update `step` for one prompt: a draw per sample, as FlowBP's
    torch.randn over its batch, keyed by the prompt's text and timestep draw (so that every rank makes its own
    prompts' draws with no communication, and makes them again after a resume), in the family's packing (noise)."""
    seed = derive_seed(cfg.seed, "renoise", step, item.text, item.sel, j)
    return to_device(noise(1, cfg.height, cfg.width, seed, torch.float32), device)


def draft_lv_losses(model, ae, reward, x0, eps, item, step, cfg):
    """DRaFT-LV (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv
    2309.17400, its K = 1 variant; FlowBP's flowbp/trainers/flux1/draft_lv.py): the chain without gradient down to
    its last step, that step taken with gradient (the base term), then its sample re-noised n times to the last
    step's level and that step taken again; the reward of the 1 + n clean images averaged:

        x_s = Euler(eps; sigma_0 .. sigma_{T-1}), no gradient           srpo.online_rollout, stopped at T - 1
        x0 = x_s - s v(x_s, s),   s = sigma_{T-1} (0.111 at T = 25)     the base term, with gradient
        x0^j = x_s^j - s v(x_s^j, s),   x_s^j = s eps_j + (1 - s) sg(x0)  j = 1 .. n, eps_j fresh per sample
        L = -(r(x0) + sum_j r(x0^j)) / (n + 1)                           DRaFT ascends the reward itself

    Sum or mean: the DRaFT paper's own text (its Algorithm 1) was not to be had here, so which it writes is not
    checked; the most explicit source read, FlowBP's trainer (the FLUX code this baseline follows), averages the
    n + 1 terms (its docstring: "average the reward gradients"; get_reward_loss takes torch.mean over the
    [base] + noised batch), so the mean is used. A sum is n + 1 = 3 times the gradient: the same AdamW step except
    through clipping at --grad-clip and AdamW's eps. Every model call is the chain's: at --rollout-guidance. Each
    term is a branch ("base", "renoise1", ...), backpropagated in turn. x0 (SRPO's rollout) is not used: the method
    rolls its own chain (own_rollout). Cost: T + n model calls, 1 + n with gradient."""
    s = srpo.rollout_schedule(cfg.rollout_steps, cfg.shift, eps.device)[0][-2]
    x0 = chain_step(model, srpo.online_rollout(model, eps, item.cond, cfg, steps=cfg.rollout_steps - 1), s,
                    item.cond, cfg)
    r = srpo.image_reward(ae, reward, x0, item.text, cfg)
    terms = 1 + DRAFT_LV_NOISES
    yield "base", -r.mean() / terms, r
    noise = families.noise_of(model)
    for j in range(DRAFT_LV_NOISES):
        x0_j = srpo.direct_align(model, x0.detach(), renoise(cfg, step, item, j, eps.device, noise), s,
                                 torch.zeros(()), item.cond.at_guidance(cfg.rollout_guidance), cfg.rollout_guidance)
        r = srpo.image_reward(ae, reward, x0_j, item.text, cfg)
        yield f"renoise{j + 1}", -r.mean() / terms, r


SRPO = Method("srpo", srpo.srpo_losses)
METHODS = {m.name: m for m in (SRPO, Method("direct-align", direct_align_losses),
                               Method("refl", refl_losses, own_rollout=True),
                               Method("draft-lv", draft_lv_losses, own_rollout=True))}
