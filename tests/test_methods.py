"""`train --method` and SRPO's ablation switches: each baseline of methods.py against its formula written out here
(loss and every weight gradient of the tiny transformer, 1e-5 relative in float32), the parts they share with SRPO
shared in the code, the ablations changing exactly what they say, the learning-rate warm-up. Tiny models only.
"""

import copy
import json
import os

import pytest
import torch
from references import rel_err

import cli
import families
import flux_model as fm
import methods
import srpo
from common.util import derive_seed
from sampling import flux_sampling
from training import evaluation, runtime

CPU = torch.device("cpu")
PROMPT = "a red fox"
SMALL = ["--demo", "random", "--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "0",
         "--eval-every", "1000",
         "--eval-prompts", os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompt.txt")]
pytestmark = pytest.mark.usefixtures("one_thread")


def shift3(t):
    return 3 * t / (1 + 2 * t)


def official_t(sigma):
    return int(sigma * 1000) / 1000


def setup(tiny, rollout_steps=4):
    """(model copy, ae, reward, cfg, conditioning, eps, call(x, sigma, guidance) = v of the copy)."""
    model, ae, text, reward = tiny
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=rollout_steps)
    cond = flux_sampling.conditioning(text([PROMPT]), cfg.height, cfg.width, CPU)
    model = copy.deepcopy(model)
    eps = srpo.shared_noise(cfg, 1, CPU, flux_sampling.initial_noise)
    return model, ae, reward, cfg, cond, eps, caller(model, cond)


def caller(model, cond):
    """v(x, sigma, guidance): the transformer called as the official script calls it, told int(1000 sigma) / 1000."""
    return lambda x, sigma, g: model(x, cond.img_ids, cond.txt, cond.txt_ids, cond.y, torch.tensor([official_t(sigma)]),
                                     torch.tensor([g]))


def euler_chain(call, eps, sigmas, guidance):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i), no gradient: the sampler written out."""
    x = eps
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            x = x + (sigmas[i + 1] - sigmas[i]) * call(x, sigmas[i], guidance)
    return x


def plain_score(ae, reward, x0_hat, cfg):
    image = (ae.decode(fm.unpack(x0_hat, cfg.height, cfg.width)) / 2 + 0.5).clamp(0, 1)
    return reward.score(image, PROMPT, "crop")


def run_method(method, model, ae, reward, x0, eps, item, step, cfg):
    """The method's branches, each backpropagated as train_step does: -> ({name: (L, r)}, {param: grad})."""
    out = {}
    for name, loss, r in method(model, ae, reward, x0, eps, item, step, cfg):
        loss.backward()
        out[name] = (loss.detach(), r.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(loss, grads, ref_loss, model):
    """The method's summed loss and gradients against the written-out ones (backpropagated into `model`)."""
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0 and rel_err(grads[name], p.grad) <= 1e-5, name


# ----------------------------------------------------------------------------------------------------------------
# Each method against its formula


@pytest.mark.parametrize("sel", [50, 500])
def test_direct_align_is_one_denoise_branch_with_the_plain_score_and_the_hinge(tiny, sel):
    """x0_hat = (x' - s_t eps) / (1 - s_t), x' = x + (s_t - s_hi) v(x, s_hi), x = s_hi eps + (1 - s_hi) x0;
    L = relu(0.7 - score(image(x0_hat), prompt)) / 2: the denoise branch of SRPO's window, no words, no inversion."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny)
    x0 = euler_chain(call, eps, shift3(torch.linspace(1, 0, 5)), 1.0)
    reference = copy.deepcopy(model)
    out, grads = run_method(methods.direct_align_losses, model, ae, reward, x0, eps, srpo.Prompt(PROMPT, cond, sel),
                            3, cfg)
    assert list(out) == ["denoise"]
    window = torch.linspace(shift3(torch.linspace(1, 0, 51))[5].item(), shift3(torch.linspace(1, 0, 51))[25].item(),
                            1000)
    K = min(100, 1000 - sel, sel)
    s_hi, s_t = window[1000 - sel - K], window[1000 - sel]
    ref_call = caller(reference, cond)
    x = s_hi * eps + (1 - s_hi) * x0
    x = x + (s_t - s_hi) * ref_call(x, s_hi, 3.5)
    r = plain_score(ae, reward, (x - s_t * eps) / (1 - s_t), cfg)
    assert out["denoise"][1].item() == pytest.approx(r.item(), rel=1e-5)
    assert_same(out["denoise"][0].item(), grads, torch.relu(0.7 - r).sum() / 2, reference)


def test_refl_draws_its_step_in_the_last_quarter_of_the_chain():
    """T = 40 (ImageReward's ReFL): the gradient step i covers exactly 30..39, each about as often; T = 25: 18..24;
    FlowBP's FLUX.2 ReFL (configs/final/flux2/flux2_klein_base_9b_refl.yaml, refl.last_n_steps 11): 14..24 of 25."""
    for T, late, expected in [(40, 0.75, range(30, 40)), (25, 0.75, range(18, 25)), (25, 0.56, range(14, 25))]:
        cfg = srpo.TrainConfig(rollout_steps=T, refl_late=late)
        steps = [methods.refl_step(cfg, sel) for sel in range(5, 996)]
        assert sorted(set(steps)) == list(expected)
        counts = [steps.count(i) for i in expected]
        assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("sel", [5, 995])
def test_refl_is_one_gradient_step_from_its_own_chain_and_imagereward_loss(tiny, sel):
    """ReFL as ImageReward's ImageReward/ReFL.py runs it (Xu et al. 2023, arXiv 2304.05977): the chain without
    gradient to step i, the next call with gradient at the chain's guidance (its UNet is called as in the chain, at
    the schedule's timestep of step i), the predicted x0, loss relu(margin - r) * grad_scale (its --grad_scale 1e-3
    kept); the margin on the reward's own scale, FlowBP's 0.55 for HPS (scale 1). x_i = Euler(eps) to sigma_i at
    guidance 1, x0_hat = x_i - sigma_i v(x_i, sigma_i) at guidance 1 (not --guidance 3.5), L = 1e-3 relu(0.55 - r).
    T = 8: i = 6 (sel 5) or 7 (sel 995)."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny, rollout_steps=8)
    reference = copy.deepcopy(model)
    out, grads = run_method(methods.refl_losses, model, ae, reward, None, eps, srpo.Prompt(PROMPT, cond, sel), 3, cfg)
    assert list(out) == ["refl"]
    i = {5: 6, 995: 7}[sel]
    sigmas = shift3(torch.linspace(1, 0, 9))
    ref_call = caller(reference, cond)
    x = euler_chain(ref_call, eps, sigmas[: i + 1], 1.0)
    r = plain_score(ae, reward, x - sigmas[i] * ref_call(x, sigmas[i], 1.0), cfg)
    assert out["refl"][1].item() == pytest.approx(r.item(), rel=1e-5)
    assert_same(out["refl"][0].item(), grads, 1e-3 * torch.relu(0.55 - r).sum(), reference)


def test_refl_margin_is_on_the_rewards_own_scale(tiny, monkeypatch):
    """A logit-scaled reward (PickScore, CLIP: s = exp(logit_scale) <img, txt>, ~100 cosines) moves ReFL's margin with
    it: L = 1e-3 relu(0.55 s - r), so that the hinge means the same on every reward (with ImageReward's fixed 2,
    PickScore's ~22 leaves the hinge off, its gradient always zero)."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny, rollout_steps=8)
    reward = copy.deepcopy(reward)
    monkeypatch.setattr(reward, "scale", lambda: torch.tensor(100.0))
    out, _ = run_method(methods.refl_losses, model, ae, reward, None, eps, srpo.Prompt(PROMPT, cond, 5), 3, cfg)
    loss, r = out["refl"]
    assert abs(r.item()) > 1 and loss.item() == pytest.approx(1e-3 * max(55 - r.item(), 0), rel=1e-5)


def test_draft_lv_is_the_final_step_with_gradient_plus_two_renoisings_of_its_sample(tiny):
    """DRaFT-LV as Clark et al. 2023 (arXiv 2309.17400) define it, Algorithm 1 with K = 1, and as FlowBP's
    flowbp/trainers/flux1/draft_lv.py runs it on FLUX (x0_predictions = [base_x0] + n re-noised): the chain to
    sigma_{T-1} without gradient, x0 = x_s - s v(x_s, s) with gradient (the base term), x_s^j = s eps_j + (1 - s)
    sg(x0), x0^j = x_s^j - s v(x_s^j, s); the 1 + n rewards averaged as FlowBP's trainer averages them (its
    get_reward_loss: torch.mean over the [base] + noised batch; the DRaFT paper's text was not at hand to say sum or
    mean): L = -(r(x0) + r(x0^1) + r(x0^2)) / 3. Every call at the chain's guidance (1, not --guidance 3.5); eps_j
    fresh per sample: N(0, I) from the seed, step, the prompt (its text and draw) and j, neither the step's eps nor
    each other, nor another prompt's."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny)
    sigmas = shift3(torch.linspace(1, 0, 5))
    reference = copy.deepcopy(model)
    item = srpo.Prompt(PROMPT, cond, 500)
    out, grads = run_method(methods.draft_lv_losses, model, ae, reward, None, eps, item, 3, cfg)
    assert list(out) == ["base", "renoise1", "renoise2"]
    noises = [flux_sampling.initial_noise(1, 32, 32, derive_seed(cfg.seed, "renoise", 3, PROMPT, 500, j),
                                          torch.float32) for j in (0, 1)]
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[0], eps)
    other = methods.renoise(cfg, 3, srpo.Prompt("a blue fox", cond, 500), 0, CPU, flux_sampling.initial_noise)
    assert not torch.equal(other, noises[0])
    ref_call, s = caller(reference, cond), sigmas[-2]
    x = euler_chain(ref_call, eps, sigmas[:-1], 1.0)
    x0 = x - s * ref_call(x, s, 1.0)
    rewards = [plain_score(ae, reward, x0, cfg)]
    for noise in noises:
        x = s * noise + (1 - s) * x0.detach()
        rewards.append(plain_score(ae, reward, x - s * ref_call(x, s, 1.0), cfg))
    assert [r.item() for _, r in out.values()] == pytest.approx([r.item() for r in rewards], rel=1e-5)
    total = sum(loss.item() for loss, _ in out.values())
    assert_same(total, grads, -sum(rewards).sum() / 3, reference)


# ----------------------------------------------------------------------------------------------------------------
# Shared parts, not copies


def test_every_method_is_built_from_srpos_parts(tiny, monkeypatch):
    """Direct-Align's step, the model step, the rollout and the image reward are srpo's functions, called by every
    method that uses them (a copy in methods.py would not be seen here)."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny)
    x0 = srpo.online_rollout(model, eps, cond, cfg)
    calls = []
    for name in ("direct_align", "model_step", "online_rollout", "image_reward"):
        original = getattr(srpo, name)
        monkeypatch.setattr(srpo, name, lambda *a, original=original, name=name, **k: calls.append(name)
                            or original(*a, **k))
    expected = {"srpo": ["direct_align", "model_step", "image_reward"] * 2,
                "direct-align": ["direct_align", "model_step", "image_reward"],
                "refl": ["online_rollout", "model_step", "image_reward"],
                "draft-lv": ["online_rollout", "model_step", "image_reward"]
                + ["direct_align", "model_step", "image_reward"] * 2}
    for name, method in methods.METHODS.items():
        calls.clear()
        run_method(method.losses, model, ae, reward, x0, eps, srpo.Prompt(PROMPT, cond, 500), 3, cfg)
        assert calls == expected[name], name


def train_tiny(tiny, out, cfg, method=methods.SRPO, prepare=lambda model: None):
    """srpo.train, one process, one prompt, on a fresh copy of the tiny transformer; prepare(model) first."""
    model, ae, text, reward = tiny
    os.makedirs(out, exist_ok=True)
    ranks = runtime.Ranks(0, 1, CPU)
    model = runtime.build_transformer(lambda device: copy.deepcopy(model), model.cfg, ranks, "sdpa")
    prepare(model)
    embeddings = flux_sampling.encode_prompts(text, [PROMPT])
    schedule = runtime.prompt_schedule([PROMPT], cfg)
    parts = runtime.ready(families.of_model(model), model, ae, reward, embeddings, schedule, cfg, 0, None, ranks)
    srpo.train(parts, [PROMPT], cfg, str(out), ranks, method, evaluation.Watch((), cfg, str(out)))
    return model


def log_lines(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


COSTS = {"srpo": ("srpo", {}, (4, 2)), "no-inversion": ("srpo", {"no_inversion": True}, (4, 1)),
         "direct-align": ("direct-align", {}, (4, 1)), "refl": ("refl", {}, (3, 1)),
         "draft-lv": ("draft-lv", {}, (3, 3))}


@pytest.mark.parametrize("name", list(COSTS))
def test_model_calls_per_step_are_each_methods_stated_cost(tiny, tmp_path, name):
    """Per prompt and step, (calls without gradient, calls with gradient): SRPO T and 2, --no-inversion and
    direct-align T and 1, refl i and 1 with no online rollout, draft-lv T - 1 and n + 1 = 3 (T = 4: refl's i = 3)."""
    method, flags, expected = COSTS[name]
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, **flags)
    calls = []
    hook = lambda module, args: calls.append(torch.is_grad_enabled())  # noqa: E731
    prepare = lambda model: model.register_forward_pre_hook(hook)  # noqa: E731
    train_tiny(tiny, tmp_path, cfg, methods.METHODS[method], prepare=prepare)
    assert (calls.count(False), calls.count(True)) == expected


# ----------------------------------------------------------------------------------------------------------------
# The ablations, the window grid, the warm-up, the log


def test_no_inversion_keeps_the_denoise_branch_as_it_is(tiny, tmp_path):
    """Step 1 of --no-inversion: the default run's denoise-branch loss and reward exactly (same eps, sel, rollout),
    and no inversion branch in the log; the default run's loss is the sum of its branches' losses."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1)
    train_tiny(tiny, tmp_path / "both", cfg)
    train_tiny(tiny, tmp_path / "one", srpo.TrainConfig(**{**vars(cfg), "no_inversion": True}))
    (both,), (one,) = log_lines(tmp_path / "both"), log_lines(tmp_path / "one")
    assert list(both)[:7] == ["step", "loss", "reward_denoise", "reward_inversion", "loss_denoise", "loss_inversion",
                              "grad_norm"]
    assert both["loss"] == pytest.approx(both["loss_denoise"] + both["loss_inversion"], rel=1e-6)
    assert (one["loss"], one["loss_denoise"], one["reward_denoise"]) == (both["loss_denoise"], both["loss_denoise"],
                                                                         both["reward_denoise"])
    assert "reward_inversion" not in one and "loss_inversion" not in one


def test_plain_reward_scores_the_prompt_without_control_words(tiny, monkeypatch):
    """--plain-reward: both branches call score(image, prompt) and never the relative reward."""
    model, ae, reward, cfg, cond, eps, call = setup(tiny)
    cfg = srpo.TrainConfig(**{**vars(cfg), "plain_reward": True})
    reward = copy.deepcopy(reward)
    scored = []
    score = reward.score
    monkeypatch.setattr(reward, "score", lambda images, prompts, preprocess_mode: scored.append(
        (prompts, preprocess_mode)) or score(images, prompts, preprocess_mode))
    monkeypatch.setattr(reward, "relative_reward", lambda *a, **k: pytest.fail("the relative reward was used"))
    x0 = srpo.online_rollout(model, eps, cond, cfg)
    out, _ = run_method(srpo.srpo_losses, model, ae, reward, x0, eps, srpo.Prompt(PROMPT, cond, 500), 3, cfg)
    assert list(out) == ["denoise", "inversion"] and scored == [(PROMPT, "crop")] * 2


def test_window_grid_sets_the_schedule_the_window_is_cut_from():
    S = lambda n: shift3(torch.linspace(1, 0, n + 1))  # noqa: E731
    default = srpo.timestep_window(srpo.TrainConfig())
    assert torch.equal(default, torch.linspace(S(50)[5].item(), S(50)[25].item(), 1000))
    finer = srpo.timestep_window(srpo.TrainConfig(window_grid=100, window=(10, 50)))
    assert torch.equal(finer, torch.linspace(S(100)[10].item(), S(100)[50].item(), 1000))
    with pytest.raises(srpo.InputError, match=r"--window A B must satisfy A < B <= --window-grid 20, got 5 25"):
        srpo.TrainConfig(window_grid=20)


def test_lr_warmup_is_linear_logged_and_continues_after_a_resume(tmp_path, monkeypatch):
    """--lr-warmup 3: updates 1..4 step AdamW with lr/3, 2lr/3, lr, lr, the log says so, and a run resumed after
    update 2 takes the same lrs as one that was not stopped."""
    used = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: used.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    flags = ["train", *SMALL, "--lr-warmup", "3", "--save-every", "1"]
    cli.main([*flags, "--steps", "4", "--out", str(tmp_path / "straight")])
    cli.main([*flags, "--steps", "2", "--out", str(tmp_path / "resumed")])
    cli.main([*flags, "--steps", "4", "--out", str(tmp_path / "resumed"), "--resume"])
    lr = 1e-3  # the demo's
    expected = [lr / 3, 2 * lr / 3, lr, lr]
    # torch's set_optimizer_state_dict makes AdamW's state with one step at lr 0 before loading it, on resume
    assert [x for x in used if x] == pytest.approx(expected * 2, rel=1e-12), used
    for run in ("straight", "resumed"):
        assert [line["lr"] for line in log_lines(tmp_path / run)] == pytest.approx(expected, rel=1e-12)


def test_method_flag_runs_each_method_and_refuses_an_unknown_one(tmp_path, capsys):
    for name in methods.METHODS:
        cli.main(["train", *SMALL, "--steps", "1", "--method", name, "--out", str(tmp_path / name)])
        (line,) = log_lines(tmp_path / name)
        assert all(key in line for key in ("loss", "grad_norm", "lr")) and any(k.startswith("loss_") for k in line)
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "dpo"])
    assert "--method" in capsys.readouterr().err
