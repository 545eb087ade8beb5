"""LoRA (weights/lora.py) and FSDP2's CPU offload: step 0 is the base model, only the adapters train, the checkpoint's
LoRA file is what diffusers' FluxPipeline.load_lora_weights (with PEFT) reads, `sample --lora` gives its image,
2 processes == 1, resume is exact, --offload changes nothing but where the state lives. Tiny models only."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from references import diffusers_flux2_transformer, rel_err
from safetensors.torch import load_file, save_file
from test_flux import read_png, run_diffusers, run_ours, to_uint8, transformer_inputs
from test_train import SMALL, TORCHRUN, cli, log_lines, real_args, run_cli, weights  # noqa: F401

import cli as command_line
import families
import flux2_model as f2
import flux_model as fm
import methods
import reward as reward_module
import srpo
from common import util
from reward import HPSReward
from sampling import flux_sampling
from training import checkpoints, evaluation, runtime
from weights import clip_weights, flux2_weights, flux_weights, lora

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_file(out, step):
    return load_file(os.path.join(out, checkpoints.CHECKPOINT.format(step), lora.LORA_FILE))


def adapter_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


# ----------------------------------------------------------------------------------------------------------------
# The adapters


def test_step_zero_is_the_base_model_and_two_steps_train_only_the_adapters(tmp_path):
    base, ae, text = flux_sampling.tiny_models()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=2, samples=0, batch=1, lora_rank=4, lr=1e-3)
    ranks = runtime.Ranks(0, 1, CPU)
    model = runtime.build_transformer(lambda device: copy.deepcopy(base), base.cfg, ranks, "sdpa",
                                      runtime.adapters(cfg, None))
    x = transformer_inputs(base.cfg, 32, 48, 5, 2)
    assert torch.equal(run_ours(model, x), run_ours(base, x))  # B = 0: bit for bit
    assert len(adapter_names(model)) == 2 * (8 * base.cfg.depth + 2 * base.cfg.depth_single_blocks)
    embeddings = flux_sampling.encode_prompts(text, ["a red fox"])
    parts = runtime.ready(families.FLUX1, model, ae, HPSReward.tiny(), embeddings,
                          runtime.prompt_schedule(["a red fox"], cfg), cfg, 0, None, ranks)
    trained = {id(p) for group in parts.opt.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names == adapter_names(model)  # AdamW holds the adapters alone
    assert all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if n not in names)
    srpo.train(parts, ["a red fox"], cfg, str(tmp_path), ranks, methods.SRPO,
               evaluation.Watch((), cfg, str(tmp_path)))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())  # the base, byte for byte
    assert all(state[n].abs().max() > 0 for n in names if n.endswith("lora_B"))  # every B moved off zero
    assert not torch.equal(run_ours(model, x), run_ours(base, x))


def random_lora(folder, flux_cfg, rank=4, alpha=8.0, seed=3):
    """Adapters with random A and B (B = 0 would test nothing), written as a checkpoint writes them; alpha != rank
    so that the scale alpha / r must reach diffusers. -> (our adapted model, the file's folder)."""
    model = lora.add_adapters(flux_weights.load_transformer(os.path.join(folder, "transformer")), rank, alpha, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapters = {n: p.detach() for n, p in model.named_parameters() if n in adapter_names(model)}
    lora.save_lora(adapters, model.cfg, alpha / rank, os.path.join(folder, "lora"))
    return model, os.path.join(folder, "lora")


@pytest.fixture(scope="module")
def flux_with_lora(flux_folder, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lora") / "flux")
    shutil.copytree(flux_folder, folder)
    model, lora_dir = random_lora(folder, flux_weights.read_flux_config(os.path.join(folder, "transformer")))
    return folder, model, lora_dir


def test_lora_file_loads_into_flux_pipeline_and_gives_our_transformer_output(flux_with_lora):
    """diffusers' load_lora_weights(folder) on our file == our unmerged adapters == our merged weights (1e-5); the
    fused qkv / linear1 adapters went out as diffusers' q, k, v (and proj_mlp) layers."""
    folder, ours, lora_dir = flux_with_lora
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    x = transformer_inputs(ours.cfg, 32, 48, 5, 2)
    base = run_diffusers(pipe.transformer, x)
    pipe.load_lora_weights(lora_dir)
    theirs, adapted = run_diffusers(pipe.transformer, x), run_ours(ours, x)
    merged = lora.merge_lora(flux_weights.load_transformer(os.path.join(folder, "transformer")),
                             os.path.join(lora_dir, lora.LORA_FILE))
    assert rel_err(adapted, theirs) <= 1e-5 and rel_err(run_ours(merged, x), theirs) <= 1e-5
    assert rel_err(base, theirs) > 1e-2  # the LoRA does change the output
    keys = load_file(os.path.join(lora_dir, lora.LORA_FILE))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
    assert "transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight" in keys


def test_sample_with_lora_gives_flux_pipeline_image(flux_with_lora, tmp_path):
    folder, _, lora_dir = flux_with_lora
    prompt, steps, seed, h, w = "a red cat", 4, 7, 48, 32
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(lora_dir)
    out = pipe(prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=3.5,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    images = {}
    for name, extra in [("lora", ["--lora", os.path.join(lora_dir, lora.LORA_FILE)]), ("base", [])]:
        images[name] = str(tmp_path / f"{name}.png")
        command_line.main(["sample", "--flux", folder, "--prompt", prompt, "--height", str(h), "--width", str(w),
                           "--steps", str(steps), "--seed", str(seed), "--out", images[name], *extra])
    ours = read_png(images["lora"])
    # the same 8-bit image; a float32 tie at a rounding boundary may move one level in a rare pixel
    assert np.abs(ours - to_uint8(out)).max() <= 1 and np.mean(ours != to_uint8(out)) < 1e-3
    assert np.abs(read_png(images["base"]) - ours).mean() > 1  # the LoRA shows


def test_lora_scale_scales_the_merged_update(flux_with_lora):
    folder, _, lora_dir = flux_with_lora
    path = os.path.join(lora_dir, lora.LORA_FILE)
    base = flux_weights.load_transformer(os.path.join(folder, "transformer"))
    full, half = (lora.merge_lora(copy.deepcopy(base), path, s).state_dict() for s in (1.0, 0.5))
    b = base.state_dict()
    key = "single_blocks.0.linear1.weight"
    assert torch.allclose(half[key] - b[key], (full[key] - b[key]) / 2, atol=1e-7)


def test_flux2_lora_file_loads_into_flux2_klein_pipeline_and_gives_our_transformer_output(tmp_path):
    """FLUX.2: adapters with random B (alpha != r) on a tiny diffusers Flux2Transformer2DModel read by our loader,
    saved by lora.save_lora; Flux2KleinPipeline.load_lora_weights on the folder == our unmerged adapters == our
    merge (1e-5). The double blocks' qkv went out as to_q/k/v and add_q/k/v_proj, the single blocks' linear1 fused as
    diffusers' to_qkv_mlp_proj; nothing of the shared modulations."""
    from test_flux2 import pipeline_ids
    from test_flux2 import run_diffusers as run_flux2_diffusers
    from test_flux2 import transformer_inputs as flux2_inputs

    cfg, folder = f2.Flux2Config.preset("tiny"), str(tmp_path / "transformer")
    reference = diffusers_flux2_transformer(cfg)
    reference.save_pretrained(folder)
    ours = lora.add_adapters(flux2_weights.load_transformer(folder), 4, 8.0, seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapters = {n: p.detach() for n, p in ours.named_parameters() if n in adapter_names(ours)}
    assert len(adapters) == 2 * (8 * cfg.depth + 2 * cfg.depth_single_blocks)
    path = lora.save_lora(adapters, cfg, 8.0 / 4, str(tmp_path / "lora"))
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=reference)
    x, ids = flux2_inputs(cfg, 32, 48, 5, 2), pipeline_ids(cfg, 32, 48, 5, 2)
    base = run_flux2_diffusers(pipe.transformer, x, ids)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs, adapted = run_flux2_diffusers(pipe.transformer, x, ids), run_ours(ours, x)
    merged = lora.merge_lora(flux2_weights.load_transformer(folder), path)
    assert rel_err(adapted, theirs) <= 1e-5 and rel_err(run_ours(merged, x), theirs) <= 1e-5
    assert rel_err(base, theirs) > 1e-2  # the LoRA does change the output
    keys = {k.removesuffix(".lora_A.weight") for k in load_file(path) if k.endswith("lora_A.weight")}
    assert {"transformer.transformer_blocks.1.attn.add_v_proj", "transformer.single_transformer_blocks.0.attn."
            "to_qkv_mlp_proj", "transformer.transformer_blocks.0.ff_context.linear_out"} <= keys
    assert len(keys) == 12 * cfg.depth + 2 * cfg.depth_single_blocks  # a double block: 2 x (q, k, v, out, 2 MLP)
    assert not any("modulation" in k for k in keys)
    flux1 = lora.add_adapters(fm.Flux(fm.FluxConfig.preset("tiny")), 2, 2.0, 0)  # the same width, FLUX.1's names
    other = lora.save_lora({n: p.detach() for n, p in flux1.named_parameters() if n in adapter_names(flux1)},
                           flux1.cfg, 1.0, str(tmp_path / "flux1"))
    with pytest.raises(util.InputError, match=r"single_transformer_blocks.0.attn.to_k is not a linear layer of this"):
        lora.merge_lora(flux2_weights.load_transformer(folder), other)


# ----------------------------------------------------------------------------------------------------------------
# Runs: 2 processes, resume, offload

RUN = ["train", "--demo", "random", "--device", "cpu", "--batch", "2", "--steps", "2", "--save-every", "1", "--keep",
       "2", *SMALL]
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: out}: LoRA and full fine-tuning, 1 process and 2 gloo processes under torchrun, with and without
    --offload; the same global batch of 2 everywhere."""
    outs = {}
    for name, flags, two in [("lora", LORA, False), ("lora2", LORA, True), ("lora_off", [*LORA, "--offload"], False),
                             ("lora2_off", [*LORA, "--offload"], True), ("full", [], False),
                             ("full_off", ["--offload"], False), ("full2_off", ["--offload"], True)]:
        outs[name] = str(tmp_path_factory.mktemp(name))
        if two:
            cli(*TORCHRUN, *RUN, *flags, "--out", outs[name])
        else:  # in this process (no imports to pay again): the demo runs single-threaded, as torchrun's workers
            command_line.main([*RUN, *flags, "--out", outs[name]])
    return outs


def test_lora_two_processes_match_one(runs):
    """B is the whole update (it starts at 0), after AdamW has normalised each entry's gradient: the summation
    order of 2 ranks moves it by < 1e-4 of its size (measured 4.8e-5); the run's log agrees to 1e-5."""
    for two in ("lora2", "lora2_off"):
        a, b = lora_file(runs["lora"], 2), lora_file(runs[two], 2)
        assert a.keys() == b.keys() and max(rel_err(b[k], a[k]) for k in a) <= 1e-4
        for x, y in zip(log_lines(runs["lora"]), log_lines(runs[two]), strict=True):
            assert x.pop("words") == y.pop("words") and all(x[k] == pytest.approx(y[k], rel=1e-5) for k in x)
    assert max(lora_file(runs["lora"], 2)[k].abs().max() for k in a if "lora_B" in k) > 1e-3  # it trained


def test_offload_matches_the_run_without_it(runs):
    """--offload (FSDP2 in a group of one, shards on the CPU) == no FSDP at all: 1e-5, measured 5e-6 for full
    fine-tuning and bit for bit for LoRA; 2 offloaded processes == 1 process as FSDP does without offload."""
    a, b = weights(runs["full"], 2), weights(runs["full_off"], 2)
    assert a.keys() == b.keys() and max(rel_err(b[k], a[k]) for k in a) <= 1e-5
    c = weights(runs["full2_off"], 2)
    assert max(rel_err(c[k], a[k]) for k in a) <= 1e-5
    assert max(rel_err(a[k], weights(runs["full"], 1)[k]) for k in a) > 1e-3  # the weights did move
    x, y = lora_file(runs["lora"], 2), lora_file(runs["lora_off"], 2)
    assert max(rel_err(y[k], x[k]) for k in x) <= 1e-5


def test_lora_resume_is_exact(runs, tmp_path):
    out = str(tmp_path)
    straight = runs["lora"]
    first = checkpoints.CHECKPOINT.format(1)
    shutil.copytree(os.path.join(straight, first), os.path.join(out, first))
    shutil.copy(os.path.join(straight, "log.jsonl"), out)
    command_line.main([*RUN, *LORA, "--out", out, "--resume"])
    a, b = lora_file(straight, 2), lora_file(out, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and log_lines(out) == log_lines(straight)
    opt_a, opt_b = (torch.load(os.path.join(f, checkpoints.CHECKPOINT.format(2), "training.pt"), weights_only=True)
                    for f in (straight, out))
    state_a, state_b = opt_a["optimizer"]["state"], opt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all(k.endswith(("lora_A", "lora_B")) for k in state_a)
    assert all(torch.equal(state_a[n][k], state_b[n][k]) for n in state_a for k in state_a[n])


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_lora_and_offload_input_gives_one_line_errors(flux_with_lora, tmp_path, capsys, monkeypatch):
    folder, _, lora_dir = flux_with_lora
    out = str(tmp_path / "run")
    for rank, words in (("1025", "at most 1024 (a third of FLUX.1's width 3072), got 1025"),
                        ("-2", "at least 0 and at most 1024")):
        code, err = run_cli([*RUN, "--lora-rank", rank, "--out", out], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --lora-rank must be ") and words in err[0]
    sample = ["sample", "--flux", folder, "--height", "32", "--width", "32", "--steps", "1", "--out",
              str(tmp_path / "x.png"), "--lora"]
    not_lora = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    code, err = run_cli([*sample, not_lora], capsys)
    assert code == 2 and len(err) == 1 and "context_embedder.bias is not a LoRA key" in err[0]
    empty = str(tmp_path / "empty.safetensors")
    save_file({}, empty)
    code, err = run_cli([*sample, empty], capsys)
    assert code == 2 and err == [f"error: {empty}: holds no tensors (expected a FLUX LoRA: "
                                 f"transformer.LAYER.lora_A.weight, ...)"]
    state = load_file(os.path.join(lora_dir, lora.LORA_FILE))
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    state[key] = torch.zeros(4, 7)
    misfit = str(tmp_path / "misfit.safetensors")
    save_file(state, misfit)
    code, err = run_cli([*sample, misfit], capsys)
    assert code == 2 and len(err) == 1 and "transformer.transformer_blocks.0.attn.to_q.lora_B.weight" in err[0]
    monkeypatch.delattr(runtime.fsdp, "CPUOffloadPolicy")
    code, err = run_cli([*RUN, "--offload", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "--offload needs FSDP2's torch.distributed.fsdp.CPUOffloadPolicy" in err[0]


def test_lora_run_from_a_flux_folder_loads_into_diffusers_and_resume_keeps_its_settings(
        real_args, flux_folder, tmp_path, capsys):  # noqa: F811 (real_args: test_train's fixture)
    """--flux with --lora-rank: LoRA's default learning rate, alpha = rank, and the checkpoint folder is what
    load_lora_weights(folder) takes: the trained adapters give our transformer's output (1e-5)."""
    out = str(tmp_path / "out")
    command_line.main([*real_args, "--lora-rank", "4", "--out", out, "--steps", "1"])
    folder = os.path.join(out, checkpoints.CHECKPOINT.format(1))
    config = util.read_json(os.path.join(folder, "state.json"))["config"]
    assert (config["lr"], config["lora_rank"], config["lora_alpha"]) == (srpo.PRESETS["lora"]["lr"], 4, 4.0)
    flux = real_args[real_args.index("--flux") + 1]
    ours = lora.add_adapters(flux_weights.load_transformer(os.path.join(flux, "transformer")), 4, 4.0, 0)
    ours.load_state_dict(torch.load(os.path.join(folder, "training.pt"), weights_only=True)["adapters"], strict=False)
    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)
    pipe.load_lora_weights(folder)
    x = transformer_inputs(ours.cfg, 32, 32, 5, 1)
    assert rel_err(run_ours(ours, x), run_diffusers(pipe.transformer, x)) <= 1e-5
    capsys.readouterr()
    code, err = run_cli([*real_args, "--lora-rank", "8", "--out", out, "--steps", "2", "--resume"], capsys)
    assert code == 2 and err[-1].startswith("error: --resume with other settings than the checkpoint's: lora_rank")


def test_memory_estimate_counts_rank_times_in_plus_out_of_every_adapted_layer():
    """tools/memory_estimate --lora-rank on tiny models: the adapters it builds are R (in + out) per layer, the
    layers docs/training.md lists (a double block's 2 x (qkv, proj, mlp.0, mlp.2), a single block's linear1 and
    linear2)."""
    from tools import memory_estimate as me

    cfg = fm.FluxConfig.preset("tiny")
    e = me.estimate(64, 64, cfg, fm.AutoEncoderConfig.preset("tiny"), clip_weights.clip_config(**reward_module.TINY),
                    text_tokens=8, lora_rank=4)
    h, m = cfg.hidden_size, cfg.mlp_hidden
    double, single = 2 * ((h + 3 * h) + (h + h) + (h + m) + (m + h)), (h + 3 * h + m) + (h + m + h)
    assert e["lora params"] == 4 * (cfg.depth * double + cfg.depth_single_blocks * single)
    assert e["params"] == sum(p.numel() for p in fm.Flux(cfg).parameters())  # the base, adapters apart


@pytest.mark.slow
def test_lora_fsdp_resume_is_exact(runs, tmp_path):
    """The 2-process LoRA run's step-1 checkpoint resumed by 2 processes: rank 0 reads the adapters, FSDP
    broadcasts them into the shards, and step 2 is the uninterrupted 2-process run's."""
    out, first = str(tmp_path), checkpoints.CHECKPOINT.format(1)
    shutil.copytree(os.path.join(runs["lora2"], first), os.path.join(out, first))
    shutil.copy(os.path.join(runs["lora2"], "log.jsonl"), out)
    cli(*TORCHRUN, *RUN, *LORA, "--out", out, "--resume")
    a, b = lora_file(runs["lora2"], 2), lora_file(out, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and log_lines(out) == log_lines(runs["lora2"])
