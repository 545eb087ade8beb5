"""`train` on FLUX.2 (issue 23, item 3). klein base: one step against the step written out here (the branch
velocity with classifier-free guidance, both passes with gradient, spelled out from the model's calls), the model
calls of --no-branch-cfg, the tiny demo (`train --family flux2`), --offload, FSDP2. klein distilled and dev (one pass,
no negative prompt; dev's scale through its guidance embedding): a dev-shaped step against the same written-out step,
the model calls and the guidance the transformer gets. Runs from each folder (full and LoRA) whose checkpoints
`sample` reads, and whose LoRA files diffusers' pipelines load. Tiny models only."""

import copy
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from PIL import Image
from references import flux2_dev_folder as make_dev_folder
from references import flux2_folder as make_flux2_folder
from references import rel_err
from safetensors.torch import save_file
from test_train import (
    SMALL,
    TORCHRUN,
    cli,
    log_lines,
    official_branches,
    official_inversion_sigmas,
    official_mul,
    official_t,
    run_cli,
    shift3,
    tiny_clip_folder,
    train_tiny,
    weights,
)

import cli as command_line
import families
import flux2_model as f2
import srpo
from common import util
from reward import HPSReward
from sampling import flux2_sampling
from training import checkpoints
from weights import flux2_weights, lora

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
POSITIVE, NEGATIVE = ["Natural-lighting", "Detail", "Detailed", "Real"], ["Concept art", "Painting", "Anime", "Flat",
                                                                          "Oil"]


@pytest.fixture(scope="module")
def tiny2():
    """(transformer, autoencoder, text -> (txt, negative txt), HPS scorer): the FLUX.2 demo's random tiny models."""
    model, ae, text = flux2_sampling.tiny_models()
    return model, ae, flux2_sampling.embedder(text, cfg=True), HPSReward.tiny()


@pytest.fixture(scope="module")
def tiny2_dev():
    """tiny2 shaped as FLUX.2 [dev]: the transformer with a guidance embedding, the text without a negative prompt
    (one pass a velocity, the scale an input)."""
    _, ae, text = flux2_sampling.tiny_models()
    torch.manual_seed(1)
    model = f2.Flux2(dataclasses.replace(f2.Flux2Config.preset("tiny"), guidance_embed=True)).eval()
    return model, ae, flux2_sampling.embedder(text, cfg=False), HPSReward.tiny()


def written_out_step(model, ae, reward, text, prompt, sel, step, cfg):
    """One prompt's SRPO step on FLUX.2, written out from the definitions (not from srpo.py), float32: eps drawn as
    (1, C, H/16, W/16) and flattened channels-last, rounded to bf16; the rollout's velocity the conditional pass at
    the rollout guidance; each branch's velocity at cfg.guidance, with a negative prompt (klein base)
    v_neg + g (v_pos - v_neg), both passes with gradient, without (dev) the one pass, the scale the guidance
    embedding's input; the recovery, the decode (tokens to 2x2 patches written out), SRP's reward
    (reward.relative_reward, itself checked against the official step in test_train) and the hinge. Backpropagated
    into `model`. -> loss."""
    txt, *negative = text([prompt])
    h, w, channels = cfg.height // 16, cfg.width // 16, model.cfg.in_channels
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    zeros = torch.zeros(h, w)
    img_ids = torch.stack([zeros, rows, cols, zeros], -1).reshape(h * w, 4)
    tokens = txt.shape[1]
    txt_ids = torch.stack([torch.zeros(tokens)] * 3 + [torch.arange(tokens, dtype=torch.float32)], -1)
    call = lambda x, sigma, c, g: model(x, img_ids, c, txt_ids, torch.tensor([official_t(sigma)]),  # noqa: E731
                                        torch.tensor([g]))
    generator = torch.Generator().manual_seed(util.derive_seed(cfg.seed, "noise", step))
    eps = torch.randn((1, channels, h, w), generator=generator).reshape(1, channels, h * w).transpose(1, 2)
    eps = eps.bfloat16().float()
    schedule = shift3(torch.linspace(1, 0, cfg.rollout_steps + 1))
    x0 = eps
    with torch.no_grad():
        for i in range(cfg.rollout_steps):
            x0 = x0 + (schedule[i + 1] - schedule[i]) * call(x0, schedule[i], txt, cfg.rollout_guidance)
    _, denoise, inversion, mid = official_branches(sel)
    k_d, k_i = torch.linspace(0.1, 0.25, 1000)[sel].item(), torch.linspace(0.3, 0.01, 1000)[mid].item()
    P, N = POSITIVE[step % 4], NEGATIVE[step % 5]
    loss = 0
    denoise = tuple(s.reshape(1) for s in denoise)  # the official sigmas' own types, as test_train's official step
    for (s_from, s_to), k, (pos, neg) in [(denoise, k_d, (P, N)), (official_inversion_sigmas(sel), k_i, (N, P))]:
        x = official_mul(s_from, eps) + (1 - s_from) * x0
        v = call(x, s_from, txt, cfg.guidance)
        if negative:
            v_neg = call(x, s_from, negative[0], cfg.guidance)
            v = v_neg + cfg.guidance * (v - v_neg)
        x = x + official_mul(s_to - s_from, v)
        x0_hat = (x - official_mul(s_to, eps)) / (1 - s_to)
        z = x0_hat.reshape(1, h, w, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, channels // 4, 2 * h,
                                                                                          2 * w)
        image = (ae.decode(z) / 2 + 0.5).clamp(0, 1)
        r = reward.relative_reward(image, f"{pos}. {prompt}", f"{neg}. {prompt}", k, preprocess_mode="crop")
        loss = loss + torch.relu(0.7 - r).mean() / 2
    loss.backward()
    return loss.item()


# klein base at the default rollout guidance 1 (its conditional pass alone); dev's rollout at 2, so that a rollout
# fed the branches' scale (or the branches the rollout's) shows
@pytest.mark.parametrize("models, rollout_guidance", [("tiny2", 1.0), ("tiny2_dev", 2.0)], ids=["klein-base", "dev"])
@pytest.mark.parametrize("sel", [50, 500])  # sel <= K: the inversion branch ends one point noisier; sel > K
def test_flux2_train_step_equals_the_step_written_out(request, tmp_path, monkeypatch, sel, models, rollout_guidance):
    """`train`'s first update on the tiny klein-base-like FLUX.2 (CFG branches) and on the tiny dev-shaped one
    (guidance embedding, one pass) against `written_out_step`: the loss and every parameter gradient (before
    clipping) to 1e-5 relative in float32."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, guidance=4.0,
                           rollout_guidance=rollout_guidance)
    monkeypatch.setattr(srpo, "draw_timestep", lambda *args: sel)
    grads = {}

    def prepare(model):
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))

    model, ae, text, reward = tiny = request.getfixturevalue(models)
    reference = copy.deepcopy(model)
    train_tiny(tiny, tmp_path, cfg, prepare=prepare)
    (line,) = log_lines(str(tmp_path))
    loss = written_out_step(reference, ae, reward, text, "a red fox", sel, 1, cfg)
    assert loss > 0 and line["loss"] == pytest.approx(loss, rel=1e-5)
    for name, p in reference.named_parameters():
        assert p.grad.abs().max() > 0 and rel_err(grads[name], p.grad) <= 1e-5, name


@pytest.mark.parametrize("flags, with_grad, without_grad", [
    ({}, 4, 4),  # two passes per branch with gradient; the rollout at guidance 1: one pass per Euler step
    ({"no_branch_cfg": True}, 2, 4),  # the conditional pass alone: one call per branch
    ({"rollout_guidance": 2.0}, 4, 8)])  # PickScore's recipe: the rollout with classifier-free guidance
def test_model_calls_per_step_with_and_without_branch_cfg(tiny2, tmp_path, flags, with_grad, without_grad):
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, **flags)
    calls = []
    hook = lambda module, args: calls.append(torch.is_grad_enabled())  # noqa: E731
    train_tiny(tiny2, tmp_path, cfg, prepare=lambda model: model.register_forward_pre_hook(hook))
    assert (calls.count(True), calls.count(False)) == (with_grad, without_grad)


def run_args(out, *flags):
    return ["train", "--demo", "random", "--family", "flux2", "--out", str(out), "--steps", "2", "--save-every", "2",
            *SMALL, *flags]


def test_tiny_flux2_demo_trains_and_its_checkpoint_loads_into_diffusers(tmp_path):
    """`train --family flux2`: two updates of the random tiny FLUX.2, the before/after grids and the held-out
    evaluation sampled through FLUX.2's family: `sample --family flux2 --transformer CHECKPOINT --seed 0 --steps 28`
    makes the evaluation's image of step 2, pixel for pixel (not step 0's); the checkpoint loads strictly into
    Flux2Transformer2DModel."""
    command_line.main(run_args(tmp_path))
    (prompt,) = util.read_prompts(SMALL[SMALL.index("--eval-prompts") + 1])
    png = str(tmp_path / "sample.png")
    command_line.main(["sample", "--demo", "random", "--family", "flux2", "--transformer", os.path.join(tmp_path,
                       checkpoints.CHECKPOINT.format(2)), "--prompt", prompt, "--seed", "0", "--steps", "28",
                       "--height", "32", "--width", "32", "--out", png])
    tile = [np.asarray(Image.open(tmp_path / "eval" / f"step-{step:06d}" / "00000.png")) for step in (0, 2)]
    assert np.array_equal(np.asarray(Image.open(png)), tile[1]) and not np.array_equal(tile[0], tile[1])
    lines = log_lines(str(tmp_path))
    assert [line["step"] for line in lines] == [1, 2] and all(np.isfinite(line["loss"]) for line in lines)
    assert all(os.path.isfile(tmp_path / f"samples-{when}.png") for when in ("before", "after"))
    assert [row["step"] for row in util.read_jsonl(tmp_path / "eval.jsonl")] == [0, 2]
    folder = os.path.join(tmp_path, checkpoints.CHECKPOINT.format(2))
    theirs = Flux2Transformer2DModel.from_pretrained(folder)
    assert theirs.config.guidance_embeds is False
    start, trained = flux2_sampling.tiny_models()[0].state_dict(), flux2_weights.load_transformer(folder).state_dict()
    assert max(rel_err(trained[k], v) for k, v in start.items()) > 1e-3  # it trained


def test_flux2_demo_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path):
    """A checkpoint of step 1 resumed to step 2 == two steps straight (the FLUX.2 weights reloaded exactly)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    command_line.main(run_args(straight, "--samples", "0", "--save-every", "1", "--keep", "2"))
    first = checkpoints.CHECKPOINT.format(1)
    shutil.copytree(straight / first, resumed / first)
    shutil.copy(straight / "log.jsonl", resumed)
    command_line.main(run_args(resumed, "--samples", "0", "--save-every", "1", "--keep", "2", "--resume"))
    a, b = weights(str(straight), 2), weights(str(resumed), 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and log_lines(str(resumed)) == log_lines(str(straight))


def test_family_is_the_demo_s_and_refused_with_a_folder(flux2_folder, tmp_path, capsys):
    code, err = run_cli(["train", "--flux", flux2_folder, "--family", "flux2", "--out", str(tmp_path)], capsys)
    assert (code, err) == (2, ["error: --family is the tiny demo's: with --flux, the folder's model_index.json says "
                               "the family"])


def test_flux2_offload_in_one_process_matches_the_run_without_it(tmp_path):
    """--offload (FSDP2 in a group of one, shards on the CPU) == no FSDP: 1e-5."""
    command_line.main(run_args(tmp_path / "plain", "--samples", "0"))
    command_line.main(run_args(tmp_path / "off", "--samples", "0", "--offload"))
    a, b = weights(str(tmp_path / "plain"), 2), weights(str(tmp_path / "off"), 2)
    assert a.keys() == b.keys() and max(rel_err(b[k], a[k]) for k in a) <= 1e-5


def clip_vocabulary(folder):
    """The tiny HPS scorer's byte-level CLIP vocabulary written into folder as vocab.json + merges.txt."""
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(HPSReward.tiny().tokenizer.bpe.get_vocab(), f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


@pytest.fixture(scope="module")
def folders(flux2_folder, tmp_path_factory):
    """The tiny FLUX.2 folders, each written by its diffusers pipeline: klein base (CFG), and the one-pass ones,
    klein distilled (is_distilled) and dev (Flux2Pipeline: Mistral-3, a guidance embedding)."""
    root = tmp_path_factory.mktemp("f2folders")
    return {"base": flux2_folder, "distilled": make_flux2_folder(root, is_distilled=True),
            "dev": make_dev_folder(root)}


@pytest.fixture(scope="module")
def reward_args(tmp_path_factory):
    """`train` arguments for a run from a tiny FLUX.2 folder, but --flux: a tiny CLIP reward folder holding its own
    CLIP vocabulary (the folders' tokenizers are Qwen's and Pixtral's), a prompt file."""
    root = tmp_path_factory.mktemp("f2run")
    clip = tiny_clip_folder(root / "clip")
    clip_vocabulary(clip)
    (root / "prompts.txt").write_text("a cat on a mat\na dog in the fog\n")
    return ["--reward", "clip", "--clip", clip, "--prompts", str(root / "prompts.txt"), "--batch", "1", "--steps",
            "1", *SMALL]


@pytest.fixture(scope="module")
def folder_args(flux2_folder, reward_args):
    """`train` arguments for a run from the tiny FLUX.2 [klein] base folder."""
    return ["train", "--flux", flux2_folder, *reward_args]


LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8"]


# klein base's LoRA file is checked against Flux2KleinPipeline below, and its `sample --lora` in test_flux2_sample
@pytest.mark.parametrize("kind, lora_flags", [
    ("base", []), ("distilled", []), ("distilled", LORA_FLAGS), ("dev", []), ("dev", LORA_FLAGS)],
    ids=["base", "distilled", "distilled-lora", "dev", "dev-lora"])
def test_flux2_folder_run_samples_its_evaluation_image_from_its_checkpoint(folders, reward_args, kind, lora_flags,
                                                                           tmp_path):
    """One update from a klein base, klein distilled or dev folder, full or LoRA: `sample --flux FOLDER` with the
    checkpoint (--transformer CHECKPOINT, or --lora FILE), --seed 0 --steps 28 and the default guidance (4, as
    training's on FLUX.2) makes the run's held-out evaluation image of step 1, pixel for pixel, not step 0's."""
    out = tmp_path / "run"
    command_line.main(["train", "--flux", folders[kind], *reward_args, "--out", str(out), "--samples", "0", "--lr",
                       "1e-3", *lora_flags])
    checkpoint = os.path.join(out, checkpoints.CHECKPOINT.format(1))
    weights_flags = ["--lora", os.path.join(checkpoint, lora.LORA_FILE)] if lora_flags else ["--transformer",
                                                                                           checkpoint]
    (prompt,) = util.read_prompts(SMALL[SMALL.index("--eval-prompts") + 1])
    png = str(tmp_path / "sample.png")
    command_line.main(["sample", "--flux", folders[kind], *weights_flags, "--prompt", prompt, "--seed", "0",
                       "--steps", "28", "--height", "32", "--width", "32", "--out", png])
    tile = [np.asarray(Image.open(out / "eval" / f"step-{step:06d}" / "00000.png")) for step in (0, 1)]
    assert np.array_equal(np.asarray(Image.open(png)), tile[1]) and not np.array_equal(tile[0], tile[1])


@pytest.mark.parametrize("kind, pipeline", [("base", Flux2KleinPipeline), ("dev", Flux2Pipeline)])
def test_flux2_lora_run_file_loads_with_the_pipeline(folders, reward_args, kind, pipeline, tmp_path):
    """A LoRA run from a klein base folder or a dev folder: its pytorch_lora_weights.safetensors, loaded by the
    folder's diffusers pipeline (Flux2KleinPipeline / Flux2Pipeline.load_lora_weights), gives the transformer our
    merge gives (1e-5; dev's at guidance 4 through its embedding)."""
    from test_flux2 import pipeline_ids, run_ours, transformer_inputs
    from test_flux2 import run_diffusers as run_flux2_diffusers

    out, folder = tmp_path / "lora", folders[kind]
    command_line.main(["train", "--flux", folder, *reward_args, "--out", str(out), "--samples", "0", *LORA_FLAGS,
                       "--lr", "1e-2"])
    lora_dir = os.path.join(out, checkpoints.CHECKPOINT.format(1))
    pipe = pipeline.from_pretrained(folder, local_files_only=True)
    cfg = flux2_weights.load_transformer(os.path.join(folder, "transformer")).cfg
    x, ids = transformer_inputs(cfg, 32, 48, 5, 2), pipeline_ids(cfg, 32, 48, 5, 2)
    base = run_flux2_diffusers(pipe.transformer, x, ids)
    pipe.load_lora_weights(lora_dir)
    theirs = run_flux2_diffusers(pipe.transformer, x, ids)
    merged = lora.merge_lora(flux2_weights.load_transformer(os.path.join(folder, "transformer")),
                             os.path.join(lora_dir, lora.LORA_FILE))
    assert rel_err(run_ours(merged, x), theirs) <= 1e-5 and rel_err(base, theirs) > 1e-3  # the run moved it (2e-3)


@pytest.mark.parametrize("flags", [{}, {"rollout_guidance": 2.0, "no_branch_cfg": True}])
@pytest.mark.parametrize("kind", ["distilled", "dev"])
def test_one_pass_folders_call_the_model_once_per_branch_and_rollout_step(folders, kind, flags, tmp_path):
    """klein distilled and dev (flux2_sampling.frozen_parts: no negative prompt): per prompt and step, one model call
    with gradient per branch and one without per rollout step, whatever the rollout guidance or --no-branch-cfg,
    each with the prompt's own embedding. dev's transformer gets the rollout guidance in the rollout and --guidance
    in the branches (its guidance embedding runs on every call); distilled's ignores the value it is passed."""
    ae, text, _, load = flux2_sampling.frozen_parts(folders[kind], torch.float32, CPU, torch.float32)
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, guidance=4.0, **flags)
    calls, embedded = [], []

    def prepare(model):
        model.register_forward_pre_hook(lambda m, args: calls.append((torch.is_grad_enabled(), args[2], args[5])))
        if model.guidance_in is not None:
            model.guidance_in.register_forward_pre_hook(lambda m, args: embedded.append(args))

    train_tiny((load(CPU), ae, text, HPSReward.tiny()), tmp_path, cfg, prepare=prepare)
    (txt,) = text(["a red fox"])  # the prompt's embedding alone: no negative prompt
    assert all(torch.equal(prompt, txt) for _, prompt, _ in calls)
    with_grad = [guidance.tolist() for grad, _, guidance in calls if grad]
    without_grad = [guidance.tolist() for grad, _, guidance in calls if not grad]
    assert (len(with_grad), len(without_grad)) == (2, 4)
    if kind == "dev":
        assert with_grad == [[cfg.guidance]] * 2 and without_grad == [[cfg.rollout_guidance]] * 4
    assert len(embedded) == (6 if kind == "dev" else 0)


def test_hps_on_a_flux2_folder_reads_the_clip_vocabulary_beside_its_file(folder_args, tmp_path, capsys):
    """The klein folder's tokenizer/ is Qwen's: --hps FILE takes CLIP's vocab.json + merges.txt from FILE's folder,
    and without them the run is refused in one line before any model loads."""
    hps = str(tmp_path / "hps.safetensors")
    save_file(HPSReward.tiny(seed=1).clip.state_dict(), hps)
    i = folder_args.index("--reward")
    args = [*folder_args[:i], "--hps", hps, *folder_args[i + 4:], "--out", str(tmp_path / "run"), "--samples", "0"]
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and "on a FLUX.2 folder (whose tokenizer/ is Qwen's)" in err[0], err
    clip_vocabulary(tmp_path)
    command_line.main(args)
    assert [line["step"] for line in log_lines(str(tmp_path / "run"))] == [1]


@pytest.mark.parametrize("method", ["direct-align", "refl", "draft-lv"])
def test_every_method_trains_the_tiny_flux2(method, tmp_path):
    """The baselines of methods.py take the model family from the seam too (DRaFT-LV's fresh noise in FLUX.2's
    packing): one update each on the tiny FLUX.2, its loss and gradient norm finite, the weights moved."""
    command_line.main([*run_args(tmp_path, "--method", method), "--steps", "1", "--save-every", "1"])
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        (line,) = [json.loads(text) for text in f]
    assert all(math.isfinite(line[key]) and line[key] != 0 for key in ("loss", "grad_norm")), line


def test_fsdp_two_processes_match_one_process_on_the_tiny_flux2(tmp_path):
    """torchrun, 2 gloo processes with one prompt each == 1 process with both prompts (--batch 2 either way) on the
    tiny FLUX.2: FSDP2's meta build, sharding, gathering and saving follow the family.

    The tolerance is fp32's reduction order, not a difference between the runs: after step 1 they agree to 4e-7;
    after step 2 to 1.3e-5, where the second update is a small difference of the two branches' gradients, then AdamW's
    m / sqrt(v), and this model's rollouts compound it. One process at 2 threads instead of 1 (BLAS's summation order
    alone, no FSDP) moves the same weights 5.4e-5 from itself (measured 2026-12-07, transformers 5.25, torch 2.14.1).
    A fault (a gradient not reduced, a shard not gathered or saved) moves them by the update itself, > 1e-3."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = ["--device", "cpu", "--batch", "2", "--save-every", "1", "--keep", "2"]
    cli(*TORCHRUN, *run_args(two, *flags))
    command_line.main(run_args(one, *flags))
    a, b = weights(one, 2), weights(two, 2)
    assert a.keys() == b.keys() and max(rel_err(b[k], a[k]) for k in a) <= 1e-4
    assert max(rel_err(weights(two, 1)[k], weights(one, 1)[k]) for k in a) <= 1e-5
    assert max(rel_err(a[k], weights(one, 1)[k]) for k in a) > 1e-3  # the weights did move
    for x, y in zip(log_lines(one), log_lines(two), strict=True):
        assert x.pop("words") == y.pop("words") and all(x[k] == pytest.approx(y[k], rel=1e-5) for k in x)


@pytest.mark.parametrize("method, flowbp, refl", [("refl", True, True), ("draft-lv", True, False),
                                                   ("srpo", False, False), ("direct-align", False, False)])
def test_the_flowbp_presets_fit_a_flux2_folder_s_baselines_only(flux2_folder, method, flowbp, refl):
    """FlowBP's FLUX.2 configs (srpo.PRESETS flux2-flowbp, flux2-refl) are the defaults of --method refl and draft-lv
    on a FLUX.2 folder, refl's own only for refl; not for SRPO and Direct-Align, nor on the tiny FLUX.2 demo, nor
    on FLUX.1; a flag given wins over them."""
    def config(*flags):
        args = command_line.build_parser().parse_args(["train", "--method", method, *flags])
        family = families.decide(args.flux, args.family)
        return command_line.config_from_flags(args, 1, family, family.demo(args.demo, args.flux))

    cfg, default = config("--flux", flux2_folder), srpo.TrainConfig()
    ours = {k: getattr(cfg, k) for k in srpo.PRESETS["flux2-flowbp"] | srpo.PRESETS["flux2-refl"]}
    expected = {k: getattr(default, k) for k in ours} | (srpo.PRESETS["flux2-flowbp"] if flowbp else {}) | (
        srpo.PRESETS["flux2-refl"] if refl else {})
    assert ours == expected and cfg.guidance == srpo.PRESETS["flux2"]["guidance"]
    demo = config("--family", "flux2")
    assert (demo.height, demo.steps, demo.refl_late) == (64, 80, default.refl_late)
    assert config("--flux", flux2_folder, "--lr", "3e-6").lr == 3e-6
