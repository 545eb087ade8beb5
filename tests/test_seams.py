"""The seams new work lands on, each shown with a stand-in defined here and nothing changed in the library: a training
method is one function from a rollout to branch losses (srpo.srpo_losses' shape, in a methods.Method record), a model
family is its conditioning's velocity (flux_sampling.Conditioning's), a reward is one class and one registry entry
(tests/test_reward_seam.py)."""

from typing import NamedTuple

import torch
from references import rel_err

import families
import methods
import srpo
from sampling import flux_sampling, sampler
from training import runtime

CPU = torch.device("cpu")


def test_a_training_method_is_one_function_from_the_rollout_to_branch_losses(monkeypatch):
    """train_step runs any method of srpo_losses' shape: every yielded loss is backpropagated with weight 1 / batch,
    the log has one reward per branch name, and the update is the gradient written out here (SGD, no clipping)."""
    cfg = srpo.TrainConfig(height=32, width=32, grad_clip=1e9, batch=2, lr=1.0)  # the step sets the lr it uses
    model = torch.nn.Linear(64, 64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(srpo, "online_rollout", lambda model, eps, cond, cfg: eps * 0.5)

    def losses(model, ae, reward, x0, eps, item, step, cfg):  # two branches of a made-up method
        for name, scale in (("near", 1.0), ("far", 2.0)):
            loss = scale * model(x0 + item.sel).pow(2).mean()
            yield name, loss, -loss

    batch = [srpo.Prompt("a", None, 1), srpo.Prompt("b", None, 2)]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    method = methods.Method("made-up", losses)
    parts = runtime.Parts(model, opt, None, None, {}, None, 0, families.FLUX1)
    values = srpo.train_step(parts, batch, 3, cfg, runtime.Ranks(0, 1, CPU), method)

    ref = torch.nn.Linear(64, 64)
    ref.load_state_dict(start)
    x0 = srpo.shared_noise(cfg, 3, CPU, flux_sampling.initial_noise) * 0.5
    near = [ref(x0 + sel).pow(2).mean() for sel in (1, 2)]
    total = sum(3 * n for n in near) / 2  # near + far (twice near) per prompt, mean over the batch
    total.backward()
    assert list(values) == ["loss", "reward_near", "reward_far", "loss_near", "loss_far", "grad_norm"]
    assert abs(values["loss"] - total.item()) <= 1e-6 * abs(total.item())
    assert abs(values["reward_far"] + 2 * sum(near).item() / 2) <= 1e-5
    assert abs(values["loss_far"] - 2 * values["loss_near"]) <= 1e-6 * abs(values["loss_far"])
    for name, p in model.named_parameters():
        assert rel_err(start[name] - p.detach(), dict(ref.named_parameters())[name].grad) <= 1e-6, name


class GuidedConditioning(NamedTuple):
    """A stand-in family sampled with classifier-free guidance: two passes per velocity, v = v_u + g (v_c - v_u)."""

    text: torch.Tensor
    empty: torch.Tensor

    def velocity(self, model, x, t, guidance):
        v_empty = model(x, t, self.empty)
        return v_empty + guidance[:, None, None] * (model(x, t, self.text) - v_empty)


def test_a_model_family_is_its_conditioning_s_velocity():
    """Direct-Align and the sampler take another family's conditioning unchanged: the step x + (s' - s) v and the
    recovery (x - s' eps) / (1 - s') with v = v_u + g (v_c - v_u), written out here."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    cond = GuidedConditioning(torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g))
    model = lambda x, t, c: torch.tanh(x * c) + t[:, None, None]  # noqa: E731
    s_from, s_to, guidance = torch.tensor(0.9), torch.tensor(0.8), 4.0

    x = s_from * eps + (1 - s_from) * x0
    t = torch.full((1,), srpo.official_timestep(s_from).item())
    v = model(x, t, cond.empty) + guidance * (model(x, t, cond.text) - model(x, t, cond.empty))
    expected = (x + (s_to - s_from) * v - s_to * eps) / (1 - s_to)
    assert rel_err(srpo.direct_align(model, x0, eps, s_from, s_to, cond, guidance), expected) <= 1e-6

    sigmas = torch.tensor([1.0, 0.5, 0.0])
    x = eps
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = torch.full((1,), s.item())
        x = x + (s_next - s) * (model(x, t, cond.empty) + guidance * (model(x, t, cond.text) - model(x, t, cond.empty)))
    assert rel_err(sampler.euler_sample(model, eps, sigmas, cond, guidance), x) <= 1e-6
