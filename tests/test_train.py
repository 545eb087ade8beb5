"""`srpo.py train`: Direct-Align and SRPO's relative reward against their definitions (the paper's equations and the
official FLUX.1-dev script, fastvideo/SRPO.py, written out again here: one whole official step is re-implemented in
`official_step`), FSDP2 against one process running the whole batch, checkpoints, resume and bad input.
Tiny models only.
"""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import FluxTransformer2DModel
from references import kept_checkpoints, rel_err
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

import cli as command_line
import families
import flux_model as fm
import methods
import reward as reward_module
import srpo
from common import util
from reward import HPSReward
from sampling import flux_sampling, sampler
from srpo import control_words
from training import checkpoints, evaluation, runtime
from weights import flux_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
# Seconds per run: tiny images, a short rollout, one grid prompt and one held-out prompt (evaluations sample 28
# steps per prompt: with the 4 built-in prompts they cost more than the training steps of a short run).
SMALL = ["--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "1",
         "--eval-prompts", os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompt.txt")]


def shift3(t):
    return 3 * t / (1 + 2 * t)


def official_t(sigma):
    """The official script's timestep for the model: int(1000 sigma) / 1000, sigma a float32 tensor element."""
    return int(sigma * 1000) / 1000


SIGMAS_L = torch.linspace(shift3(torch.linspace(1, 0, 51))[5].item(), shift3(torch.linspace(1, 0, 51))[25].item(), 1000)


def official_branches(sel):
    """(K, (denoise from, to), (inversion from, to), mid) as the official script indexes its 1000-point window."""
    K = min(100, 1000 - sel, sel)  # int((1 - 0.9) * 1000) + 1 == 100 in floating point
    mid = max(sel - K, 1)
    start = min(mid + K, 1000)
    return K, (SIGMAS_L[1000 - sel - K], SIGMAS_L[1000 - sel]), (SIGMAS_L[1000 - mid], SIGMAS_L[1000 - start]), mid


def official_inversion_sigmas(sel):
    """The inversion branch's (sigma_from, sigma_to) with the official script's own types: its sel is a 1-element
    tensor (mid_timestep_tensor = torch.tensor([randint(5, 995)])), and its k, mid, start come from Python's min and
    max of that tensor and ints, as fastvideo/SRPO.py writes them; an int index gives a 0-d sigma, a tensor one a
    1-element sigma."""
    timestep_select = torch.tensor([sel])
    k = min(min(1000 - timestep_select, int((1 - 0.9) * 1000) + 1), timestep_select)
    mid_timestep = max(timestep_select - k, 1)
    start = min(mid_timestep + k, 1000)
    return SIGMAS_L[1000 - mid_timestep], SIGMAS_L[1000 - start]


def official_mul(sigma, x):
    """sigma * x as the official script's CUDA tensors make it: a 1-element float32 sigma promotes the bf16 eps or v
    to float32; a 0-d one does not (PyTorch's type promotion), so CUDA's kernel reads both as bf16 and rounds the
    product to bf16."""
    return sigma * x if sigma.dim() else (sigma.bfloat16().float() * x.bfloat16().float()).bfloat16().float()


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(out, step):
    return load_file(os.path.join(out, checkpoints.CHECKPOINT.format(step), "diffusion_pytorch_model.safetensors"))


def log_lines(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(args)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------------------------------------------
# The algorithm against its definition


def test_recovery_returns_x0_for_any_sigma_pair():
    """With the ideal model v = eps - x0, inject -> one step -> recover gives x0 back, whichever the direction."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    ideal = lambda x, img_ids, txt, txt_ids, y, t, guidance: eps - x0  # noqa: E731
    for sigma_from, sigma_t in [(0.964, 0.75), (0.75, 0.964), (0.9, 0.85), (0.3, 0.99), (0.99, 0.01)]:
        sigma_from, sigma_t = torch.tensor(sigma_from), torch.tensor(sigma_t)
        no_text = flux_sampling.Conditioning(None, None, None, None)
        x0_hat = srpo.direct_align(ideal, x0, eps, sigma_from, sigma_t, no_text, 3.5)
        assert rel_err(x0_hat, x0) < 1e-5, (sigma_from, sigma_t)


def test_window_branch_sigmas_and_k_schedules_equal_the_official_indexing():
    cfg = srpo.TrainConfig()
    window = srpo.timestep_window(cfg)
    assert torch.equal(window, SIGMAS_L) and abs(window[0] - 0.964) < 1e-3 and abs(window[-1] - 0.75) < 1e-6
    k_d, k_i = torch.linspace(0.1, 0.25, 1000), torch.linspace(0.3, 0.01, 1000)
    for sel in [5, 6, 50, 99, 100, 101, 102, 500, 898, 899, 900, 994, 995]:
        K, denoise, inversion, mid = official_branches(sel)
        ours = srpo.branch_sigmas(window, sel, cfg.max_gap)
        assert ours[2] == K and [[s.item() for s in b] for b in ours[:2]] == [[s.item() for s in denoise],
                                                                              [s.item() for s in inversion]], sel
        assert srpo.k_schedule(cfg, sel, K) == (k_d[sel].item(), k_i[mid].item()), sel
        (hi, t), (lo, t_inv) = denoise, inversion
        assert hi > t > lo  # the denoise branch starts noisier, the inversion branch cleaner
        # the inversion branch ends at the denoise branch's sigma_t, except for sel <= K: one point noisier
        assert t_inv == (SIGMAS_L[999 - sel] if sel <= K else t), sel
    assert torch.allclose(srpo.shifted_schedule(25, 3.0), shift3(torch.linspace(1, 0, 26)))


def test_timestep_draws_cover_exactly_5_to_995():
    """sel ~ U{5..995}: both ends drawn (a miss has probability (990/991)^n, ~1e-9 at n = 20000), nothing outside."""
    cfg = srpo.TrainConfig()
    draws = torch.tensor([srpo.draw_timestep(cfg, step, j) for step in range(2500) for j in range(8)])
    assert draws.min() == 5 and draws.max() == 995
    counts = torch.bincount(draws, minlength=1000)[5:996].float()
    assert (counts > 0).float().mean() > 0.99 and counts.std() / counts.mean() < 0.3  # uniform, roughly 20 each


def test_defaults_are_the_official_run():
    cfg = srpo.TrainConfig()
    official = {"lr": 5e-6, "betas": (0.9, 0.999), "adam_eps": 1e-8, "weight_decay": 1e-4, "grad_clip": 0.1,
                "margin": 0.7, "guidance": 3.5, "rollout_guidance": 1.0, "height": 720, "width": 720,
                "rollout_steps": 25, "shift": 3.0, "window": (5, 25), "window_points": 1000, "max_gap": 100,
                "k_denoise": (0.1, 0.25), "k_inversion": (0.3, 0.01), "batch": 32, "steps": 19}
    assert {name: getattr(cfg, name) for name in official} == official
    assert set(srpo.PRESETS["demo"]) <= {"lr", "height", "width", "steps", "save_every"}  # nothing else


def test_noise_is_shared_by_prompts_and_ranks_and_new_each_step():
    cfg = srpo.TrainConfig(height=32, width=48)
    eps = srpo.shared_noise(cfg, 7, CPU, flux_sampling.initial_noise)
    assert eps.shape == (1, 6, 64) and torch.equal(eps, srpo.shared_noise(cfg, 7, CPU, flux_sampling.initial_noise))
    assert eps.dtype == torch.float32 and torch.equal(eps.bfloat16().float(), eps)  # bf16 values, as drawn officially
    assert 0.9 < eps.std() < 1.1
    assert not torch.equal(eps, srpo.shared_noise(cfg, 8, CPU, flux_sampling.initial_noise))


def test_rollout_is_25_euler_steps_on_the_shift3_schedule_without_gradient():
    cfg = srpo.TrainConfig()
    calls = []

    def model(x, img_ids, txt, txt_ids, y, t, guidance):
        calls.append((t.item(), guidance.item(), torch.is_grad_enabled()))
        return torch.ones_like(x)

    x0 = srpo.online_rollout(model, torch.zeros(1, 4, 64), flux_sampling.Conditioning(None, None, None, None), cfg)
    sigmas = shift3(torch.linspace(1, 0, 26))
    assert [c[0] for c in calls] == [pytest.approx(official_t(s), rel=1e-7) for s in sigmas[:-1]]
    assert {c[1:] for c in calls} == {(1.0, False)}
    assert torch.allclose(x0, torch.full_like(x0, -1.0))  # integral of v = 1 from sigma 1 to 0


def branch_setup(tiny, prompt="a red fox"):
    model, ae, text, reward = tiny
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4)
    cond = flux_sampling.conditioning(text([prompt]), cfg.height, cfg.width, CPU)
    eps = srpo.shared_noise(cfg, 0, CPU, flux_sampling.initial_noise)
    return copy.deepcopy(model), ae, reward, cfg, cond, eps, srpo.online_rollout(model, eps, cond, cfg)


def both_branches(model, ae, reward, x0, eps, cond, prompt, sel, step, cfg):
    """One prompt's two branches through srpo's pieces, each backpropagated as train_step does: -> (L, r_d, r_i)."""
    values = []
    for branch in srpo.branches(cfg, sel, step):
        loss, r = srpo.srp_loss(model, ae, reward, x0, eps, srpo.Prompt(prompt, cond, sel), branch, cfg)
        loss.backward()
        values += [loss.detach(), r.detach().mean()]
    return torch.stack([values[0] + values[2], values[1], values[3]])


def test_inversion_branch_uses_the_swapped_captions(tiny, monkeypatch):
    model, ae, reward, cfg, cond, eps, x0 = branch_setup(tiny)
    reward = copy.deepcopy(reward)
    captions, calls = [], []
    text_features = reward.text_features
    monkeypatch.setattr(reward, "text_features", lambda prompts: captions.append(prompts) or text_features(prompts))
    relative = reward.relative_reward

    def recording(images, positive_captions, negative_captions, k, preprocess_mode=None):
        calls.append((k, positive_captions, negative_captions))
        return relative(images, positive_captions, negative_captions, k, preprocess_mode)

    monkeypatch.setattr(reward, "relative_reward", recording)
    step, sel = 6, 300
    both_branches(model, ae, reward, x0, eps, cond, "a red fox", sel, step, cfg)
    P, N = control_words(step)
    K = min(100, 1000 - sel, sel)
    k_d, k_i = torch.linspace(0.1, 0.25, 1000)[sel].item(), torch.linspace(0.3, 0.01, 1000)[sel - K].item()
    assert calls == [(pytest.approx(k_d), f"{P}. a red fox", f"{N}. a red fox"),
                     (pytest.approx(k_i), f"{N}. a red fox", f"{P}. a red fox")]
    assert captions == [[f"{P}. a red fox"], [f"{N}. a red fox"], [f"{N}. a red fox"], [f"{P}. a red fox"]]
    calls.clear()
    world = dataclasses.replace(cfg, words=("bright", "dark,dull"))
    both_branches(model, ae, reward, x0, eps, cond, "a red fox", sel, 7, world)
    bright, dull = "bright. a red fox", "dull. a red fox"
    assert [c[1:] for c in calls] == [(bright, dull), (dull, bright)]


def test_control_words_cycle_through_each_list():
    """Update s takes the (s mod len)-th word of each list: the official lists' 20 pairs recur every 20 updates."""
    assert [control_words(s) for s in (0, 1, 4, 5, 20)] == [
        ("Natural-lighting", "Concept art"), ("Detail", "Painting"), ("Natural-lighting", "Oil"),
        ("Detail", "Concept art"), ("Natural-lighting", "Concept art")]
    assert [control_words(s, ("bright", "dark,dull")) for s in (1, 2)] == [("bright", "dull"), ("bright", "dark")]
    with pytest.raises(util.InputError, match="--words P N"):
        srpo.TrainConfig(words=("bright,", "dark"))


def test_direct_align_gradient_is_the_same_with_the_triton_kernels(tiny, monkeypatch):
    """One prompt's two branches through the checkpointed blocks of `build_transformer`, with the Triton kernels
    (interpreted on a CPU; compiled on a GPU) and with SDPA: the same loss, rewards and weight gradient."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest imported the kernels in interpreter mode
    model, ae, reward, cfg, cond, eps, x0 = branch_setup(tiny)
    model = runtime.build_transformer(lambda device: model, model.cfg, runtime.Ranks(0, 1, CPU), "sdpa")
    results = {}
    for attn in ("sdpa", "triton"):
        model.set_attention_backend(attn)
        model.zero_grad()
        values = both_branches(model, ae, reward, x0, eps, cond, "a red fox", 300, 6, cfg)
        results[attn] = values.detach().clone(), {name: p.grad.clone() for name, p in model.named_parameters()}
    (ours, ours_grads), (ref, ref_grads) = results["triton"], results["sdpa"]
    assert rel_err(ours, ref) <= 1e-5
    for name, grad in ref_grads.items():  # each tensor on its own scale: the q/k path's gradients are small
        assert grad.abs().max() > 0 and rel_err(ours_grads[name], grad) <= 2e-5, name  # measured <= 3.5e-6


def train_tiny(tiny, out, cfg, prompts=("a red fox",), prepare=lambda model: None):
    """srpo.train, one process, on a fresh copy of the tiny transformer made ready by runtime.ready; prepare(model)
    first (hooks). -> model."""
    model, ae, text, reward = tiny
    ranks = runtime.Ranks(0, 1, CPU)
    model = runtime.build_transformer(lambda device: copy.deepcopy(model), model.cfg, ranks, "sdpa")
    prepare(model)
    prompts = list(prompts)
    embeddings = flux_sampling.encode_prompts(text, prompts)
    schedule = runtime.prompt_schedule(prompts, cfg)
    parts = runtime.ready(families.of_model(model), model, ae, reward, embeddings, schedule, cfg, 0, None, ranks)
    srpo.train(parts, prompts, cfg, str(out), ranks, methods.SRPO, evaluation.Watch((), cfg, str(out)))
    return model


def test_exactly_two_transformer_calls_carry_gradient_per_step(tiny, tmp_path):
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1)
    calls = []
    hook = lambda module, args: calls.append(torch.is_grad_enabled())  # noqa: E731
    model = train_tiny(tiny, tmp_path, cfg, prepare=lambda model: model.register_forward_pre_hook(hook))
    assert calls.count(True) == 2 and calls.count(False) == cfg.rollout_steps
    assert all(p.grad is None for p in model.parameters())  # the step consumed them
    _, ae, _, reward = tiny
    assert all(not p.requires_grad for p in [*ae.parameters(), *reward.parameters()])  # frozen: no wasted gradient


@pytest.mark.parametrize("sel", [50, 500])  # sel <= K: the inversion branch ends one point noisier; sel > K
def test_every_timestep_and_guidance_the_model_receives_in_one_step(tiny, tmp_path, monkeypatch, sel):
    """Every transformer call of one step: the rollout from eps at guidance 1, then the denoise branch at
    x = s eps + (1 - s) x0 from its start sigma and the inversion branch from its own, guidance 3.5, each told the
    official truncated timestep int(1000 sigma) / 1000 of the sigma it starts from; eps is the step's, x0 the
    rollout's."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1)
    monkeypatch.setattr(srpo, "draw_timestep", lambda *args: sel)
    calls = []

    def record(module, args, v):
        x, *_, t, guidance = args
        calls.append((x.detach().clone(), t.tolist(), guidance.tolist(), v.detach().float().clone()))

    train_tiny(tiny, tmp_path, cfg, prepare=lambda model: model.register_forward_hook(record))
    schedule = shift3(torch.linspace(1, 0, cfg.rollout_steps + 1))
    _, (sigma_hi, _), (sigma_lo, _), _ = official_branches(sel)
    expected = [(official_t(s), 1.0) for s in schedule[:-1]] + [(official_t(sigma_hi), 3.5),
                                                                (official_t(sigma_lo), 3.5)]
    assert [(t, g) for _, (t,), (g,), _ in calls] == [(pytest.approx(t, rel=1e-7), g) for t, g in expected]

    rollout, (denoise, inversion) = calls[: cfg.rollout_steps], calls[cfg.rollout_steps :]
    eps = srpo.shared_noise(cfg, 1, CPU, flux_sampling.initial_noise)
    assert torch.equal(rollout[0][0], eps)
    x, *_, v = rollout[-1]
    x0 = x + (0 - schedule[-2]) * v  # the rollout's last Euler step, to sigma 0
    # the official sigmas' own types: sel <= K makes the inversion's 0-d, its product with eps bf16 (official_mul)
    for (x, *_), sigma in [(denoise, sigma_hi.reshape(1)), (inversion, official_inversion_sigmas(sel)[0])]:
        assert torch.allclose(x, official_mul(sigma, eps) + (1 - sigma) * x0, rtol=1e-5, atol=1e-6)


POSITIVE, NEGATIVE = ["Natural-lighting", "Detail", "Detailed", "Real"], ["Concept art", "Painting", "Anime", "Flat",
                                                                          "Oil"]


def official_step(model, ae, reward, text, prompt, eps, sel, step, cfg):
    """One prompt's step of the official script, written out from its description (not from srpo.py), in float32:
    rollout, the two branches, decode, SRP reward on SRPO's crop, hinge; backpropagated into `model`. -> loss."""
    from torchvision.transforms.v2 import CenterCrop, InterpolationMode, Normalize, Resize

    txt, y = text([prompt])
    img_ids, txt_ids = fm.image_ids(cfg.height, cfg.width), torch.zeros(txt.shape[1], 3)
    call = lambda x, sigma, g: model(x, img_ids, txt, txt_ids, y, torch.tensor([official_t(sigma)]),  # noqa: E731
                                     torch.tensor([g]))
    schedule = shift3(torch.linspace(1, 0, cfg.rollout_steps + 1))
    x0 = eps
    with torch.no_grad():
        for i in range(cfg.rollout_steps):
            x0 = x0 + (schedule[i + 1] - schedule[i]) * call(x0, schedule[i], 1.0)
    _, denoise, inversion, mid = official_branches(sel)
    k_d, k_i = torch.linspace(0.1, 0.25, 1000)[sel], torch.linspace(0.3, 0.01, 1000)[mid]
    P, N = POSITIVE[step % 4], NEGATIVE[step % 5]
    size = reward.image_size
    crop = lambda im: Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])(  # noqa: E731
        CenterCrop(size)(Resize(size, InterpolationMode.BICUBIC, antialias=True)(im)))
    clip = reward.clip

    def text_feature(caption):
        pooled = clip.text_model(input_ids=reward.tokenizer([caption])).pooler_output
        return torch.nn.functional.normalize(clip.text_projection(pooled), dim=-1)

    loss = 0
    denoise = tuple(s.reshape(1) for s in denoise)  # its denoise branch indexes with the tensor sel: 1-element sigmas
    inversion = official_inversion_sigmas(sel)
    for (s_from, s_to), k, (pos, neg) in [(denoise, k_d, (P, N)), (inversion, k_i, (N, P))]:
        x = official_mul(s_from, eps) + (1 - s_from) * x0
        x = x + official_mul(s_to - s_from, call(x, s_from, 3.5))
        x0_hat = (x - official_mul(s_to, eps)) / (1 - s_to)
        image = (ae.decode(fm.unpack(x0_hat, cfg.height, cfg.width)) / 2 + 0.5).clamp(0, 1)
        img = torch.nn.functional.normalize(clip.visual_projection(clip.vision_model(
            pixel_values=crop(image)).pooler_output), dim=-1)
        r = (img * ((1 + k) * text_feature(f"{pos}. {prompt}") - text_feature(f"{neg}. {prompt}"))).sum()
        loss = loss + torch.relu(0.7 - r) / 2
    loss.backward()
    return loss.item()


def test_srpo_rounds_to_bf16_where_the_official_script_multiplies_by_a_0d_sigma():
    """Branch.bf16 for every draw: exactly where the official inversion branch's sigma_from (sel <= K: mid = 1, an
    int) or sigma_to (sel = K = 100: start an int too) is a 0-d tensor; the denoise branch never (issue 32, item 4)."""
    cfg = srpo.TrainConfig()
    for sel in range(5, 996):
        denoise, inversion = srpo.branches(cfg, sel, 1)
        official = tuple(s.dim() == 0 for s in official_inversion_sigmas(sel))
        assert (denoise.bf16, inversion.bf16) == ((False, False), official), sel
        assert torch.equal(torch.stack([inversion.sigma_from, inversion.sigma_to]).flatten(),
                           torch.cat([s.reshape(1) for s in official_inversion_sigmas(sel)])), sel


@pytest.mark.parametrize("sel", [5, 50, 100, 101, 500, 899, 995])
def test_train_step_equals_the_official_step_written_out(tiny, tmp_path, monkeypatch, sel):
    """`train`'s first update against `official_step` on the same tiny models, eps, sel and prompt: the loss and
    every parameter gradient (before clipping) to 1e-5 relative in float32."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1)
    monkeypatch.setattr(srpo, "draw_timestep", lambda *args: sel)
    grads = {}

    def prepare(model):
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))

    model, ae, text, reward = tiny
    reference = copy.deepcopy(model)
    train_tiny(tiny, tmp_path, cfg, prepare=prepare)
    (line,) = log_lines(str(tmp_path))
    eps = srpo.shared_noise(cfg, 1, CPU, flux_sampling.initial_noise)
    loss = official_step(reference, ae, reward, text, "a red fox", eps, sel, 1, cfg)
    assert line["loss"] == pytest.approx(loss, rel=1e-5) and line["words"] == ["Detail", "Painting"]
    for name, p in reference.named_parameters():
        assert p.grad.abs().max() > 0 and rel_err(grads[name], p.grad) <= 1e-5, name


def test_triton_kernels_are_warmed_up_at_the_run_sequence_length_before_the_first_step(tiny, tmp_path, monkeypatch):
    """With --attn triton the attention kernels are tuned once, at image + text tokens, before any model call."""
    cfg = srpo.TrainConfig(height=32, width=48, rollout_steps=2, steps=1, samples=1, batch=1)
    events, told = [], []  # flux_kernels.attention's warm_up, told the processes (rank 0 tunes for all)
    monkeypatch.setattr(runtime, "warm_up", lambda *a, ranks: events.append(("warm_up", *a)) or told.append(ranks))

    def prepare(model):
        model.set_attention_backend("triton")
        model.register_forward_pre_hook(lambda module, args: events.append("model"))

    train_tiny(tiny, tmp_path, cfg, prepare=prepare)
    model, _, text, _ = tiny
    text_tokens = text(["a red fox"])[0].shape[1]
    assert events[0] == ("warm_up", 2 * 3 + text_tokens, model.cfg.num_heads, model.cfg.head_dim, torch.float32, CPU)
    assert [(r.rank, r.world) for r in told] == [(0, 1)]
    assert events[1:] == ["model"] * (len(events) - 1) and len(events) > 2


class HostSyncs(TorchDispatchMode):
    """What would stall a GPU during a step, counted on the CPU. Tensors that would live on the GPU are tracked op by
    op: the models' weights and buffers, whatever a tensor is moved to the device as, and every result of an op with
    such an input. Counted: reads of such a tensor to the host (item, tolist, cpu, numpy, bool/float of a tensor),
    and blocking copies of host data to the device (`Tensor.to` with a device and without non_blocking,
    torch.tensor / torch.as_tensor with the device, new_tensor of a device tensor)."""

    def __init__(self, modules, device, tensors=()):
        super().__init__()
        self.on_device, self.device = WeakTensorKeyDictionary(), device
        for t in [*tensors, *(t for module in modules for t in [*module.parameters(), *module.buffers()])]:
            self.on_device[t] = True
        self.reads, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        mine = any(t in self.on_device for t in inputs)
        if mine and func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        out = func(*args, **(kwargs or {}))
        if mine:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out

    def patches(self, monkeypatch):
        to, reads = torch.Tensor.to, {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

        def moved(t, *args, **kwargs):
            device = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str))), None))
            out = to(t, *args, **kwargs)
            if device is not None and torch.device(device) == self.device and t not in self.on_device:
                if not kwargs.get("non_blocking"):
                    self.copies.append(tuple(t.shape))
                self.on_device[out] = True
            return out

        def read(name):
            def reader(t, *args, **kwargs):
                if t in self.on_device:
                    self.reads.append(name)
                return reads[name](t, *args, **kwargs)
            return reader

        def made(make):  # a tensor made from Python data straight on the device: a copy from the host
            def maker(data, *args, **kwargs):
                out = make(data, *args, **kwargs)
                if kwargs.get("device") is not None and torch.device(kwargs["device"]) == self.device:
                    self.copies.append(make.__name__)
                    self.on_device[out] = True
                return out
            return maker

        def new_tensor(t, data, *args, **kwargs):
            out = new(t, data, *args, **kwargs)
            if t in self.on_device:
                self.copies.append("new_tensor")
                self.on_device[out] = True
            return out

        new = torch.Tensor.new_tensor
        monkeypatch.setattr(torch.Tensor, "to", moved)
        monkeypatch.setattr(torch.Tensor, "new_tensor", new_tensor)
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, made(getattr(torch, name)))
        for name in reads:
            monkeypatch.setattr(torch.Tensor, name, read(name))


@pytest.mark.parametrize("batch", [1, 3])
def test_host_syncs_per_step_are_few_and_do_not_grow_with_the_prompts(tiny, tmp_path, monkeypatch, batch):
    """Two steps of `train_step` with 1 and with 3 prompts: a fixed, small number of reads to the host (one: the
    step's loss, rewards and gradient norm together) and no blocking copy to the device but the first step's two
    constants (CLIP's mean and std, moved once); nothing per prompt, nothing per Euler step."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=2, samples=0, batch=batch)
    model, ae, text, reward = tiny
    srpo.rollout_schedule.cache_clear()  # made in this run's first step, as in a fresh process
    reward_module.clip_mean_std.cache_clear()
    steps, step = [], srpo.train_step

    def counted(parts, *args):  # one counter over the steps: what step 1 puts on the device stays known
        if not steps:
            steps.append(HostSyncs([parts.model, ae, reward], CPU, reward._text_cache.values()))  # cached before
        counter = steps[0]
        before = len(counter.copies), len(counter.reads)
        with pytest.MonkeyPatch.context() as patch, counter:
            counter.patches(patch)
            record = step(parts, *args)
        steps.append((counter.copies[before[0]:], counter.reads[before[1]:]))
        return record

    monkeypatch.setattr(srpo, "train_step", counted)
    train_tiny(tiny, tmp_path, cfg, prompts=["a red fox", "a cat", "a tree"])
    _, first, second = steps
    assert first == (["tensor", "tensor"], ["tolist"]) and second == ([], ["tolist"]), (first, second)


def test_optimizer_step_is_clip_then_adamw(tiny, tmp_path, monkeypatch):
    """One step's update equals one written out: g clipped to norm c, then AdamW's first step
    w' = w (1 - lr wd) - lr g / (|g| + eps), m = (1 - b1) g, v = (1 - b2) g^2. Non-default values, each chosen to
    show: the clip is active (|g| ~ 3 c) and eps is of the size of g, so Adam's scale invariance does not hide it."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, lr=1e-3,
                           betas=(0.8, 0.95), adam_eps=1e-7, weight_decay=0.5, grad_clip=0.005)
    before, raw, opts = {}, {}, []

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opts.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)

    def prepare(model):
        for name, p in model.named_parameters():
            before[name] = p.detach().clone()
            p.register_post_accumulate_grad_hook(lambda p, name=name: raw.__setitem__(name, p.grad.clone()))

    model = train_tiny(tiny, tmp_path, cfg, prepare=prepare)
    (opt,) = opts
    assert raw.keys() == before.keys()
    norm = torch.cat([g.flatten() for g in raw.values()]).norm()
    assert norm > 2 * cfg.grad_clip
    coef = cfg.grad_clip / (norm + 1e-6)  # torch's clip_grad_norm_
    (b1, b2), lr = cfg.betas, cfg.lr
    for name, p in model.named_parameters():
        g = raw[name] * coef
        expected = before[name] * (1 - lr * cfg.weight_decay) - lr * g / (g.abs() + cfg.adam_eps)
        assert (p.detach() - expected).abs().max() < 1e-3 * lr, name
        state = opt.state[p]
        assert torch.allclose(state["exp_avg"], (1 - b1) * g, rtol=1e-4, atol=1e-12), name
        assert torch.allclose(state["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-4, atol=1e-20), name


def test_reward_and_loss_have_the_expected_signs(tiny):
    """The hinge falls as the reward rises, and a small gradient step raises the denoise-branch reward."""
    r = torch.tensor([-0.3, 0.2, 0.69, 0.71, 1.0], requires_grad=True)
    losses = [srpo.hinge_loss(x, 0.7).item() for x in r]
    assert losses == pytest.approx([0.5, 0.25, 0.005, 0.0, 0.0], abs=1e-6)
    srpo.hinge_loss(r[:2], 0.7).backward()
    assert (r.grad[:2] < 0).all()

    model, ae, reward, cfg, cond, eps, x0 = branch_setup(tiny)
    P, N = control_words(0)
    (sigma_hi, sigma_t), _, K = srpo.branch_sigmas(srpo.timestep_window(cfg), 400, cfg.max_gap)
    k_d, _ = srpo.k_schedule(cfg, 400, K)

    def denoise_reward():
        x0_hat = srpo.direct_align(model, x0, eps, sigma_hi, sigma_t, cond, cfg.guidance)
        return reward.relative_reward(sampler.decode_images(ae, x0_hat, 32, 32), f"{P}. a red fox", f"{N}. a red fox",
                                      k_d, "crop")

    before = denoise_reward()
    srpo.hinge_loss(before, cfg.margin).backward()
    grads = [p.grad for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    step = 0.05 / norm  # a step of length 0.05 down the loss gradient; dL/dr = -1/2, so r should gain 0.1 |dL/dw|
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= step * g
    gain = (denoise_reward() - before).item()
    assert 0.5 < gain / (0.1 * norm.item()) < 1.5, (gain, norm.item())


# ----------------------------------------------------------------------------------------------------------------
# Runs: FSDP2, checkpoints, resume


def cli(*args):
    """`srpo.py train` in a fresh process, single-threaded like torchrun's workers (same float rounding)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


FSDP_ARGS = ["train", "--demo", "random", "--device", "cpu", "--batch", "2", "--steps", "2", "--save-every", "1",
             "--keep", "2", *SMALL]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "srpo.py"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """--batch 2 for 2 steps, checkpoint after each: (one process running both prompts, two gloo processes under
    torchrun running one each)."""
    one, two = str(tmp_path_factory.mktemp("one")), str(tmp_path_factory.mktemp("two"))
    cli(*TORCHRUN, *FSDP_ARGS, "--out", two)
    # in this process: the demo runs single-threaded, as torchrun's workers
    command_line.main([*FSDP_ARGS, "--out", one])
    return one, two


def test_fsdp_two_processes_match_one_process_running_the_whole_batch(fsdp_runs):
    """torchrun, 2 gloo processes with one prompt each == 1 process with both prompts: --batch 2 either way."""
    one, two = fsdp_runs
    a, b = weights(one, 2), weights(two, 2)
    assert a.keys() == b.keys()
    assert max(rel_err(b[k], a[k]) for k in a) <= 1e-5
    assert max(rel_err(a[k], weights(one, 1)[k]) for k in a) > 1e-3  # the weights did move
    for x, y in zip(log_lines(one), log_lines(two), strict=True):
        assert x.keys() == y.keys() and x.pop("words") == y.pop("words")
        assert all(x[k] == pytest.approx(y[k], rel=1e-5) for k in x)
    from test_sharded_saves import adamw_state  # training.pt's, or the shards' of the 2 processes
    opt_one, opt_two = (adamw_state(os.path.join(out, checkpoints.CHECKPOINT.format(2))) for out in (one, two))
    names = {name for name, _ in fm.Flux(fm.FluxConfig.preset("tiny")).named_parameters()}
    assert opt_one.keys() == opt_two.keys() == names  # the full AdamW state, gathered from the shards
    assert all(torch.allclose(opt_two[n]["exp_avg"], opt_one[n]["exp_avg"], rtol=1e-4, atol=1e-9) for n in names)


@pytest.mark.slow
def test_fsdp_resume_reaches_the_weights_of_an_uninterrupted_fsdp_run(fsdp_runs, tmp_path):
    """The 2-process run's step-1 checkpoint (and log), resumed by 2 processes to step 2: the sharded weights
    broadcast from rank 0's file and each rank's AdamW shards give the uninterrupted 2-process run's step 2."""
    _, two = fsdp_runs
    out = str(tmp_path)
    first = checkpoints.CHECKPOINT.format(1)
    shutil.copytree(os.path.join(two, first), os.path.join(out, first))
    shutil.copy(os.path.join(two, "log.jsonl"), out)
    cli(*TORCHRUN, *FSDP_ARGS, "--out", out, "--resume")
    a, b = weights(two, 2), weights(out, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(out) == log_lines(two)
    from test_sharded_saves import adamw_state  # the shards of the 2 processes
    opt_straight, opt_resumed = (adamw_state(os.path.join(folder, checkpoints.CHECKPOINT.format(2)))
                                 for folder in (two, out))
    assert all(torch.equal(opt_straight[n][k], opt_resumed[n][k]) for n in opt_straight for k in opt_straight[n])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-step run, checkpoint after every step."""
    out = str(tmp_path_factory.mktemp("straight"))
    command_line.main(["train", "--demo", "random", "--steps", "3", "--save-every", "1", "--keep", "3", *SMALL,
                       "--out", out])
    return out


def test_resume_reaches_the_weights_of_an_uninterrupted_run(straight, tmp_path):
    out = str(tmp_path)
    command_line.main(["train", "--demo", "random", "--steps", "2", "--save-every", "1", *SMALL, "--out", out])
    assert sorted(checkpoints.complete(out)) == kept_checkpoints(out, 2)  # --keep 1
    command_line.main(["train", "--demo", "random", "--steps", "3", "--save-every", "1", *SMALL, "--out", out,
                       "--resume"])
    a, b = weights(straight, 3), weights(out, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(out) == log_lines(straight)


def test_saved_transformer_loads_strictly_into_diffusers(straight):
    folder = os.path.join(straight, checkpoints.CHECKPOINT.format(3))
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    theirs = FluxTransformer2DModel.from_pretrained(folder)  # config.json written beside the weights
    theirs.load_state_dict(state, strict=True)  # the model card's snippet
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in state.items())
    ours = fm.Flux(fm.FluxConfig.preset("tiny"))
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in ours.parameters())


def test_run_folder_holds_checkpoint_log_and_sample_grids(straight):
    names = set(os.listdir(straight))
    assert {"log.jsonl", "samples-before.png", "samples-after.png", checkpoints.CHECKPOINT.format(3)} <= names
    assert [line["step"] for line in log_lines(straight)] == [1, 2, 3]
    line = log_lines(straight)[0]
    assert {"loss", "reward_denoise", "reward_inversion", "grad_norm", "lr"} <= line.keys()
    state = util.read_json(os.path.join(straight, checkpoints.CHECKPOINT.format(3), "state.json"))
    assert state["step"] == 3 and state["config"]["lr"] == srpo.PRESETS["demo"]["lr"]


@pytest.fixture
def real_args(flux_folder, tmp_path):
    """`train` arguments for a real run on files: test_flux's tiny diffusers FLUX folder (with a CLIP vocabulary
    whose end token is the last id, as CLIP's), an HPS checkpoint in transformers keys, a prompt file."""
    flux = str(tmp_path / "flux")
    shutil.copytree(flux_folder, flux)
    vocab = HPSReward.tiny().tokenizer.bpe.get_vocab()
    with open(os.path.join(flux, "tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(flux, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    hps = str(tmp_path / "hps.safetensors")
    save_file(HPSReward.tiny(seed=1).clip.state_dict(), hps)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a mat\n\na dog in the fog\na tree\n")
    return ["train", "--flux", flux, "--hps", hps, "--prompts", str(prompts), "--batch", "1", *SMALL]


def test_real_run_from_a_flux_folder_and_an_hps_checkpoint(real_args, flux_folder, tmp_path):
    """--flux/--hps/--prompts, then a resume through the same path; the result loads strictly into diffusers."""
    out = str(tmp_path / "out")
    command_line.main([*real_args, "--out", out, "--steps", "1"])
    command_line.main([*real_args, "--out", out, "--steps", "2", "--resume"])
    assert [line["step"] for line in log_lines(out)] == [1, 2]
    theirs = FluxTransformer2DModel.from_pretrained(os.path.join(flux_folder, "transformer"))
    theirs.load_state_dict(weights(out, 2), strict=True)


def test_official_length_is_19_updates_with_the_words_of_steps_1_to_19(real_args, tmp_path):
    """The official loop counts steps 1..20 and its step 20 only saves: without --steps a real run applies 19
    updates, update s with positive[s % 4] and negative[s % 5], and its last checkpoint is step 19."""
    out = str(tmp_path / "out")
    command_line.main([*real_args, "--out", out, "--save-every", "10"])
    lines = log_lines(out)
    assert [line["step"] for line in lines] == list(range(1, 20))
    assert [line["words"] for line in lines] == [[POSITIVE[s % 4], NEGATIVE[s % 5]] for s in range(1, 20)]
    assert sorted(checkpoints.complete(out)) == kept_checkpoints(out, 19)
    assert util.read_json(os.path.join(out, checkpoints.CHECKPOINT.format(19), "state.json"))["step"] == 19


@pytest.mark.slow
def test_default_demo_runs_offline_and_the_reward_rises(tmp_path):
    """`python srpo.py train --demo random` with no other flags (but --out): the whole demo, in a fresh process."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "srpo.py"), "train", "--demo", "random", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rewards = [line["reward_denoise"] for line in log_lines(str(tmp_path))]
    assert len(rewards) == srpo.PRESETS["demo"]["steps"]
    assert sum(rewards[-20:]) > sum(rewards[:20])  # the same 20 control-word pairs
    last = srpo.PRESETS["demo"]["steps"]
    assert sorted(checkpoints.complete(str(tmp_path))) == kept_checkpoints(str(tmp_path), last)
    assert os.path.exists(tmp_path / "samples-after.png")


@pytest.mark.slow
def test_default_demo_runs_under_torchrun_with_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 srpo.py train --demo random`, no other flags but --out and a shorter run (the whole
    length is the one-process test's): the demo's --batch is one prompt per process, so it runs under any process
    count."""
    cli(*TORCHRUN, "train", "--demo", "random", "--steps", "3", "--out", str(tmp_path))
    lines = log_lines(str(tmp_path))
    assert len(lines) == 3 and sorted(checkpoints.complete(str(tmp_path))) == kept_checkpoints(str(tmp_path), 3)
    state = util.read_json(os.path.join(str(tmp_path), checkpoints.CHECKPOINT.format(len(lines)), "state.json"))
    assert state["config"]["batch"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing lost


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    empty, flux, a_file = tmp_path / "empty.txt", tmp_path / "flux", tmp_path / "file"
    empty.write_text("\n  \n")
    flux.mkdir()
    a_file.write_text("x")
    out = str(tmp_path / "out")
    cases = [
        (["--prompts", str(tmp_path / "none.txt")], ["none.txt", "cannot read the prompt file"]),
        (["--prompts", str(empty)], ["empty.txt", "no prompts"]),
        (["--flux", str(flux), "--hps", str(tmp_path / "hps.pt")], ["hps.pt", "no such file"]),
        (["--flux", str(flux)], ["--hps", "required"]),
        (["--hps", str(a_file)], ["--hps needs --flux"]),
        (["--height", "50"], ["multiples of 16", "50x64"]),
        (["--out", str(a_file / "sub")], ["cannot write the output folder"]),
        (["--steps", "0"], ["--steps", "at least 1"]),
        (["--window", "25", "5"], ["--window"]),
        (["--batch", "0"], ["--batch", "at least 1"]),
    ]
    for args, words in cases:
        code, err = run_cli(["train", "--out", out, *args], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
        assert all(w in err[0] for w in words), (args, err)


def test_batch_must_split_evenly_over_the_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it; the check comes before any process group
    code, err = run_cli(["train", "--batch", "6", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "--batch 6" in err[0] and "multiple of the 4 processes" in err[0], err
    assert runtime.local_batch(srpo.TrainConfig(), 8) == 4 and runtime.local_batch(srpo.TrainConfig(batch=6), 3) == 2


def test_existing_checkpoints_are_never_overwritten_or_mixed(straight, capsys):
    before = weights(straight, 3)
    code, err = run_cli(["train", "--demo", "random", "--steps", "4", *SMALL, "--out", straight], capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "step 3" in err[0]
    code, err = run_cli(["train", "--demo", "random", "--steps", "4", *SMALL, "--lr", "0.5", "--out", straight,
                         "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "lr" in err[0]
    after = weights(straight, 3)
    assert sorted(checkpoints.complete(straight)) == [1, 2, 3] and all(torch.equal(before[k], after[k]) for k in before)


def test_a_checkpoint_without_a_setting_ran_with_its_default(straight, tmp_path, capsys):
    """A state.json written before a setting existed (here: no "reward", as before --reward) resumes as if it held
    the default: --reward clip, whose recipe equals HPS's, is refused, naming it; the default resumes."""
    out = str(tmp_path)
    name = checkpoints.CHECKPOINT.format(3)
    shutil.copytree(os.path.join(straight, name), os.path.join(out, name))
    path = os.path.join(out, name, "state.json")
    state = util.read_json(path)
    del state["config"]["reward"]
    util.write_json(path, state)
    args = ["train", "--demo", "random", "--steps", "4", "--save-every", "1", *SMALL, "--out", out, "--resume"]
    code, err = run_cli([*args, "--reward", "clip"], capsys)
    assert code == 2 and len(err) == 1 and "reward" in err[0] and "reward=hps" in err[0], err
    command_line.main(args)
    assert sorted(checkpoints.complete(out)) == kept_checkpoints(out, 4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    calls = []
    relative = HPSReward.relative_reward

    def nan_from_step_3(self, *args, **kwargs):
        calls.append(1)
        r = relative(self, *args, **kwargs)
        return r * float("nan") if len(calls) > 4 else r  # two branches per step

    monkeypatch.setattr(HPSReward, "relative_reward", nan_from_step_3)
    out = str(tmp_path)
    code, err = run_cli(["train", "--demo", "random", "--steps", "5", "--save-every", "1", "--keep", "5", *SMALL,
                         "--out", out], capsys)
    errors = [line for line in err if line.startswith("error: ")]  # after the progress bar's lines
    assert code == util.EXIT_DIVERGED == 65 and len(errors) == 1 and errors[0] == err[-1], err
    for words in ["step 3: not finite: loss nan, reward_denoise nan", "the weights were not updated", "lower --lr",
                  f"the last checkpoint with finite weights: {os.path.join(out, checkpoints.CHECKPOINT.format(2))}"]:
        assert words in err[-1], (words, err)
    assert sorted(checkpoints.complete(out)) == [1, 2]
    model = flux_weights.load_transformer(os.path.join(out, checkpoints.CHECKPOINT.format(2)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_help_documents_every_flag():
    parser = command_line.build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    assert all(action.help for action in train._actions)
    text = train.format_help()
    for flag in ["--flux", "--hps", "--prompts", "--out", "--steps", "--save-every", "--seed", "--resume", "--lr",
                 "--betas", "--adam-eps", "--weight-decay", "--grad-clip", "--height", "--width", "--guidance",
                 "--rollout-guidance", "--rollout-steps", "--batch", "--attn", "--device"]:
        assert flag in text, flag


# ----------------------------------------------------------------------------------------------------------------
# --reward hps | pickscore | clip

# The official launch scripts (Tencent-Hunyuan/SRPO, scripts/finetune/) in our flags: --train_guidence is the
# rollout guidance, --train_timestep the window (fastvideo/SRPO.py's default 5 25 where a script leaves it out),
# --discount_pos and --discount_inv the k of the denoise and the inversion branch. CLIP has no launch script: the
# HPS script with --reward_model CLIP, whose window and k are also fastvideo/SRPO.py's defaults.
OFFICIAL_SCRIPTS = {
    "hps": ("SRPO_training_hpsv2.sh", {"rollout_guidance": 1.0, "window": (5, 25), "k_denoise": (0.1, 0.25),
                                       "k_inversion": (0.3, 0.01)}),
    "pickscore": ("SRPO_training_ps.sh", {"rollout_guidance": 2.0, "window": (5, 30), "k_denoise": (0.1, 0.5),
                                          "k_inversion": (0.6, 0.01)}),
    "clip": ("SRPO_training_hpsv2.sh + --reward_model CLIP", {"rollout_guidance": 1.0, "window": (5, 25),
                                                              "k_denoise": (0.1, 0.25), "k_inversion": (0.3, 0.01)}),
}
# What both scripts give alike: --learning_rate 5e-6, --max_grad_norm 0.1, --weight_decay 0.0001, --h/--w 720,
# --sampling_steps 25, --shift 3, --timestep_length 1000, --groundtruth_ratio 0.9 (K = 100); the branches' 3.5 and
# the 0.7 margin are in fastvideo/SRPO.py itself.
SHARED_RECIPE = {"lr": 5e-6, "grad_clip": 0.1, "weight_decay": 1e-4, "height": 720, "width": 720, "rollout_steps": 25,
                 "shift": 3.0, "window_points": 1000, "max_gap": 100, "guidance": 3.5, "margin": 0.7}


def train_cfg(*flags, demo=False):
    args = command_line.build_parser().parse_args(["train", *flags])
    assert (args.flux is None) == demo
    family = families.decide(args.flux, args.family)
    return command_line.config_from_flags(args, 1, family, family.demo(args.demo, args.flux))


@pytest.mark.parametrize("name", list(OFFICIAL_SCRIPTS))
def test_each_reward_defaults_to_its_official_launch_script(name):
    script, recipe = OFFICIAL_SCRIPTS[name]
    cfg = train_cfg("--flux", "FLUX", "--reward", name)
    assert cfg.reward == name and {k: getattr(cfg, k) for k in recipe} == recipe, script
    assert {k: getattr(cfg, k) for k in SHARED_RECIPE} == SHARED_RECIPE, script
    assert {k: getattr(train_cfg("--reward", name, demo=True), k) for k in recipe} == recipe  # the demo's too
    given = train_cfg("--flux", "FLUX", "--reward", name, "--rollout-guidance", "3", "--window", "10", "20",
                      "--k-denoise", "0.2", "0.3", "--k-inversion", "0.4", "0.05")
    assert (given.rollout_guidance, given.window, given.k_denoise, given.k_inversion) == (3.0, (10, 20), (0.2, 0.3),
                                                                                          (0.4, 0.05))
    assert train_cfg("--flux", "FLUX").reward == "hps"


def test_help_lists_the_per_reward_defaults_side_by_side():
    parser = command_line.build_parser()
    text = next(a for a in parser._actions if a.dest == "command").choices["train"].format_help()
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("    --")}
    assert "--reward hps" in text and "--reward pickscore" in text and "--reward clip" in text
    for key in ("rollout_guidance", "window", "k_denoise", "k_inversion"):
        cells = [command_line.flag_value(OFFICIAL_SCRIPTS[name][1][key]) for name in OFFICIAL_SCRIPTS]
        assert rows["--" + key.replace("_", "-")] == " ".join(cells).split(), key
    assert "may suit PickScore less" in " ".join(text.split())


def tiny_clip_folder(folder, seed=3):
    """A tiny random transformers CLIPModel folder without tokenizer files: the reward takes --flux's tokenizer/
    (in real_args the tiny HPS scorer's byte-level vocabulary)."""
    from transformers import CLIPModel

    import reward
    from weights import clip_weights

    torch.manual_seed(seed)
    vocab_size = HPSReward.tiny().tokenizer.vocab_size
    CLIPModel(clip_weights.clip_config(**reward.TINY, vocab_size=vocab_size)).save_pretrained(folder)
    return str(folder)


def reward_args(real_args, *flags):
    """real_args with its --hps CKPT replaced by flags."""
    i = real_args.index("--hps")
    return [*real_args[:i], *flags, *real_args[i + 2:]]


@pytest.mark.parametrize("name", ["pickscore", "clip"])
def test_a_step_with_a_clip_reward_moves_the_weights_and_resume_refuses_another_reward(name, real_args, tmp_path,
                                                                                      capsys):
    """One official update (AdamW, lr 5e-6: every weight with a gradient moves by about lr) from the FLUX folder's
    transformer; the checkpoint records the reward and its recipe; --resume with --reward hps is one line, exit 2."""
    out = str(tmp_path / "out")
    command_line.main([*reward_args(real_args, "--reward", name, f"--{name}", tiny_clip_folder(tmp_path / name)),
                       "--out", out, "--steps", "1"])
    flux = real_args[real_args.index("--flux") + 1]
    start, after = load_file(os.path.join(flux, "transformer", "diffusion_pytorch_model.safetensors")), weights(out, 1)
    assert start.keys() == after.keys()
    assert 2.5e-6 < max((after[k] - start[k]).abs().max().item() for k in start) < 7.5e-6
    config = util.read_json(os.path.join(out, checkpoints.CHECKPOINT.format(1), "state.json"))["config"]
    assert config["reward"] == name and config["rollout_guidance"] == OFFICIAL_SCRIPTS[name][1]["rollout_guidance"]
    assert config["window"] == list(OFFICIAL_SCRIPTS[name][1]["window"])
    capsys.readouterr()  # the run's progress bars
    code, err = run_cli([*real_args, "--out", out, "--steps", "2", "--resume"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --resume with other settings"), err
    assert f"reward={name}" in err[0], err
    assert sorted(checkpoints.complete(out)) == [1] and len(log_lines(out)) == 1


def test_reward_flags_and_folders_give_one_line_errors(real_args, tmp_path, capsys):
    flux = real_args[real_args.index("--flux") + 1]
    bert, no_weights = tmp_path / "bert", tmp_path / "no_weights"
    for folder, model_type in ((bert, "bert"), (no_weights, "clip")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    transformer = os.path.join(flux, "transformer")
    out = str(tmp_path / "out")
    cases = [
        (reward_args(real_args, "--reward", "pickscore", "--pickscore", transformer),
         ["transformer", "model_type None, expected 'clip'", "PickScore"]),
        (reward_args(real_args, "--reward", "clip", "--clip", str(bert)), ["bert", "expected 'clip'", "CLIP"]),
        (reward_args(real_args, "--reward", "clip", "--clip", str(no_weights)), ["no_weights", "no weights"]),
        (reward_args(real_args, "--reward", "pickscore", "--pickscore", str(tmp_path / "none")),
         ["none", "no such folder"]),
        (reward_args(real_args, "--reward", "pickscore"), ["--pickscore is required", "PickScore_v1"]),
        ([*real_args, "--clip", str(bert)], ["bert", "expected 'clip'"]),  # beside --reward hps: a judge's model
        ([*real_args, "--eval-judges", "pickscore"], ["--eval-judges pickscore: give its model, --pickscore DIR"]),
        (["train", "--reward", "pickscore", "--pickscore", str(bert)], ["--pickscore needs --flux"]),
    ]
    for args, words in cases:
        code, err = run_cli([*args, "--out", out], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
        assert all(w in err[0] for w in words), (args, err)
    assert not os.path.exists(out)  # refused before anything was loaded or written


def test_demo_trains_against_a_tiny_clip_reward(tmp_path):
    """`train --reward pickscore` without --flux: the demo on a tiny random PickScore, with PickScore's recipe."""
    out = str(tmp_path)
    command_line.main(["train", "--demo", "random", "--reward", "pickscore", "--steps", "2", *SMALL, "--out", out])
    config = util.read_json(os.path.join(out, checkpoints.CHECKPOINT.format(2), "state.json"))["config"]
    assert config["reward"] == "pickscore" and config["window"] == [5, 30] and len(log_lines(out)) == 2


def test_a_lazy_state_reads_the_weights_load_transformer_reads_one_tensor_at_a_time(flux_folder):
    """flux_weights.LAZY: what rank 0 streams into FSDP2's shards (runtime.stream_into) is the loaded model's state,
    each tensor read when asked and kept by no one (its shards: diffusers' fused-from-three q, k, v included)."""
    from weights import flux_weights

    sub = os.path.join(flux_folder, "transformer")
    model = flux_weights.load_transformer(sub)
    lazy = flux_weights.load_transformer(sub, device=flux_weights.LAZY)
    state = model.state_dict()
    assert list(lazy) == list(state) and len(lazy) == len(state)
    for key, tensor in state.items():
        assert torch.equal(lazy[key], tensor), key
    assert lazy[key] is not lazy[key]  # read again, not cached
