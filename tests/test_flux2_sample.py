"""`srpo.py sample` on FLUX.2 folders (sampling/flux2_sampling.py) against diffusers' Flux2KleinPipeline (klein base and
distilled) and Flux2Pipeline (dev), the independent references, on tiny random folders written by their own
save_pretrained.

Images: float32 on both sides, the same 8-bit PNG up to a float32 tie at a rounding boundary (one level in a rare
pixel), as tests/test_flux.py holds FLUX.1 to FluxPipeline. Schedule and noise: bit for bit.
"""

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from references import flux2_dev_folder as make_dev_folder
from references import flux2_folder as make_flux2_folder
from references import randomize, rel_err
from safetensors.torch import save_file

import cli
import families
import flux2_model as f2
from sampling import flux2_sampling, sampler
from weights import flux2_weights, lora

PROMPT = "a red cat, on a mat!"


@pytest.fixture(scope="module")
def klein(flux2_folder, tmp_path_factory):
    """{'base': the session's klein base folder, 'distilled': the same shapes with is_distilled}."""
    return {"base": flux2_folder, "distilled": make_flux2_folder(tmp_path_factory.mktemp("k"), is_distilled=True)}


@pytest.mark.parametrize("seq_len", [6, 256, 4096, 4301, 8192])
def test_empirical_mu_and_schedule_match_the_pipeline(seq_len, flux2_folder):
    """Flux2KleinPipeline's sigmas: linspace(1, 1/steps, steps) through the folder's scheduler with
    compute_empirical_mu's mu (both branches: at most and above 4300 tokens), bit for bit."""
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flux2_folder, subfolder="scheduler")
    for steps in (1, 4, 28, 50):
        mu = compute_empirical_mu(seq_len, steps)
        assert flux2_sampling.empirical_mu(seq_len, steps) == mu
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = sampler.flux_schedule(steps, seq_len, sampler.read_schedule(flux2_folder), mu)
        assert ours.dtype == torch.float32 and torch.equal(ours, sched.sigmas)
        if steps > 1:  # FLUX.1's mu would give other sigmas (one step's are 1, 0 whatever mu)
            assert not torch.equal(ours, sampler.flux_schedule(steps, seq_len, sampler.read_schedule(flux2_folder)))


@pytest.mark.parametrize("batch,height,width,channels", [(1, 48, 80, 32), (2, 64, 32, 128)])
def test_noise_and_ids_are_prepare_latents(batch, height, width, channels):
    """The packed noise and image ids of Flux2KleinPipeline.prepare_latents for a seed (its own code, run on a stand-in
    for the pipeline), bit for bit."""
    pipe = SimpleNamespace(vae_scale_factor=8, _prepare_latent_ids=Flux2KleinPipeline._prepare_latent_ids,
                           _pack_latents=Flux2KleinPipeline._pack_latents)
    theirs, ids = Flux2KleinPipeline.prepare_latents(pipe, batch, channels // 4, height, width, torch.float32, "cpu",
                                                     torch.Generator("cpu").manual_seed(11))
    ours = flux2_sampling.initial_noise(batch, height, width, 11, torch.float32, channels)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert torch.equal(f2.image_ids(height, width).expand(batch, -1, -1), ids.float())


def pipeline_images(folder, prompt, height, width, steps, seed, guidance, batch=1, max_sequence_length=512):
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    out = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=batch,
               max_sequence_length=max_sequence_length, output_type="np")
    return (out.images * 255).round().astype(np.int32)  # (B, H, W, 3): diffusers' numpy_to_pil rounding


def read_png(path):
    return np.asarray(Image.open(path)).astype(np.int32)


def same_8bit(ours, theirs):
    """The same 8-bit image; a float32 tie at a rounding boundary may move one level in a rare pixel."""
    return ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 1e-3


# (folder, --guidance (None: the default, 4), batch, height, width, text tokens)
CASES = {"base-cfg": ("base", None, 1, 48, 80, 64), "base-cfg-batch": ("base", "2.5", 2, 64, 32, 40),
         "base-no-cfg": ("base", "1", 1, 32, 48, 40), "distilled": ("distilled", "4", 1, 80, 48, 40)}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_gives_the_flux2_klein_pipeline_image(klein, case, tmp_path, capsys):
    """klein base: real classifier-free guidance against the empty prompt (two passes) when guidance > 1, one pass at
    1; klein distilled: one pass, the guidance ignored (with one note); each the pipeline's 8-bit image."""
    name, guidance, batch, height, width, tokens = CASES[case]
    out, steps, seed = str(tmp_path / "ours.png"), 4, 1234
    capsys.readouterr()
    cli.main(["sample", "--flux", klein[name], "--prompt", PROMPT, "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--seed", str(seed), "--batch", str(batch), "--out", out,
               "--max-sequence-length", str(tokens), *(["--guidance", guidance] if guidance else [])])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == (name == "distilled")
    expected = pipeline_images(klein[name], PROMPT, height, width, steps, seed, float(guidance or 4.0), batch, tokens)
    paths = [out] if batch == 1 else [str(tmp_path / f"ours-{i}.png") for i in range(batch)]
    for i, path in enumerate(paths):
        assert same_8bit(read_png(path), expected[i]), (case, i)
    if case == "base-cfg":  # the negative pass shows: without it the image is another one
        one_pass = pipeline_images(klein[name], PROMPT, height, width, steps, seed, 1.0, batch, tokens)
        assert not same_8bit(one_pass[0], expected[0])


def test_prompt_file_on_klein_gives_the_pipeline_images_and_a_manifest(klein, tmp_path):
    """--prompts on a klein folder: each line's images are the pipeline's for that prompt, listed in images.jsonl
    with the FLUX.2 default guidance (4) as what a rerun must match."""
    prompts, out = [PROMPT, "two dogs"], tmp_path / "eval"
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cli.main(["sample", "--flux", klein["base"], "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
               "--height", "32", "--width", "64", "--steps", "2", "--seed", "5", "--max-sequence-length", "40"])
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["image"], r["prompt"], r["guidance"]) for r in rows] == [("00000.png", PROMPT, 4.0),
                                                                         ("00001.png", "two dogs", 4.0)]
    for row in rows:
        expected = pipeline_images(klein["base"], row["prompt"], 32, 64, 2, 5, 4.0, max_sequence_length=40)
        assert same_8bit(read_png(out / row["image"]), expected[0]), row


# FLUX.2 [dev]: Flux2Pipeline, Mistral-3's text conditioning and the guidance embedding

@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """The tiny FLUX.2 [dev] folder (references.flux2_dev_folder)."""
    return make_dev_folder(tmp_path_factory.mktemp("dev"))


def test_dev_text_conditioning_is_flux2_pipelines(dev_folder):
    """Mistral3Conditioner on the saved folder against Flux2Pipeline.encode_prompt: the same embeddings (system
    message, chat template, padding, truncation, "[IMG]" removed, layers 10/20/30 stacked), and text ids."""
    # BFL's system message alone is ~170 tokens of this byte-level tokenizer: the second prompt is truncated
    prompts, T = ["a red cat, on a mat!", "[IMG]two dogs " * 6], 224
    pipe = Flux2Pipeline.from_pretrained(dev_folder, local_files_only=True)
    theirs, ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=T)
    ours = f2.Mistral3Conditioner.from_folder(dev_folder, torch.float32, "cpu", T)(prompts)
    assert ours.shape == theirs.shape == (2, T, 48) and rel_err(ours, theirs) <= 1e-6
    assert torch.equal(f2.text_ids(T).expand(2, -1, -1), ids.float())


@pytest.mark.parametrize("guidance,height,width", [(None, 48, 80), ("2.5", 64, 32)])
def test_sample_gives_the_flux2_pipeline_image(dev_folder, guidance, height, width, tmp_path):
    """FLUX.2 [dev]: one pass a step, the guidance scale through the guidance embedding (default 4, as the
    pipeline's), the empirical-mu schedule: Flux2Pipeline's 8-bit image."""
    out = str(tmp_path / "ours.png")
    cli.main(["sample", "--flux", dev_folder, "--prompt", PROMPT, "--height", str(height), "--width", str(width),
               "--steps", "3", "--seed", "9", "--out", out, "--max-sequence-length", "200",
               *(["--guidance", guidance] if guidance else [])])
    pipe = Flux2Pipeline.from_pretrained(dev_folder, local_files_only=True)
    images = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=3, max_sequence_length=200,
                  guidance_scale=float(guidance or 4.0), generator=torch.Generator("cpu").manual_seed(9),
                  output_type="np").images
    assert same_8bit(read_png(out), (images[0] * 255).round().astype(np.int32))


def test_the_family_is_the_folders_model_index(flux_folder, flux2_folder, dev_folder, tmp_path):
    """`sample --flux` takes FLUX.2 from model_index.json alone; a FluxPipeline folder, the tiny built-in models and a
    folder without model_index.json (a FLUX.1 transformer and VAE, as before FLUX.2) stay FLUX.1."""
    bare = tmp_path / "bare"
    bare.mkdir()
    cases = {flux2_folder: families.FLUX2, dev_folder: families.FLUX2, flux_folder: families.FLUX1,
             None: families.FLUX1, str(bare): families.FLUX1}
    for folder, family in cases.items():
        assert families.decide(folder) is family, folder


def test_sample_with_a_lora_on_klein_gives_the_pipelines_image(flux2_folder, tmp_path):
    """--lora on a klein folder: random adapters saved by lora.save_lora, merged by `sample`, give the image of
    Flux2KleinPipeline after its load_lora_weights (CFG on: both passes carry the LoRA), and the LoRA shows."""
    model = lora.add_adapters(flux2_weights.load_transformer(os.path.join(flux2_folder, "transformer")), 4, 8.0, seed=5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapters = {n: p.detach() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    path = lora.save_lora(adapters, model.cfg, 8.0 / 4, str(tmp_path / "lora"))
    height, width, steps, seed = 32, 48, 3, 9
    pipe = Flux2KleinPipeline.from_pretrained(flux2_folder, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=4.0,
                  generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=40, output_type="np")
    images = {}
    for name, extra in (("lora", ["--lora", path]), ("base", [])):
        images[name] = str(tmp_path / f"{name}.png")
        cli.main(["sample", "--flux", flux2_folder, "--prompt", PROMPT, "--height", str(height), "--width",
                   str(width), "--steps", str(steps), "--seed", str(seed), "--max-sequence-length", "40", "--out",
                   images[name], *extra])
    ours = read_png(images["lora"])
    assert same_8bit(ours, (theirs.images[0] * 255).round().astype(np.int32))
    assert np.abs(read_png(images["base"]) - ours).mean() > 1


def test_transformer_file_replaces_the_folders(flux2_folder, tmp_path):
    """--transformer FILE (BFL's single-file names, e.g. flux-2-klein-4b.safetensors, or diffusers' keys: a folder's
    diffusion_pytorch_model.safetensors copied out) on a klein folder: the image of the folder whose transformer/
    holds those weights, not the folder's own."""
    model = randomize(flux2_weights.load_transformer(os.path.join(flux2_folder, "transformer")), seed=3)
    save_file(model.state_dict(), str(tmp_path / "flux-2-klein.safetensors"))
    shutil.copytree(flux2_folder, tmp_path / "swapped", ignore=shutil.ignore_patterns("transformer"))
    saved = flux2_weights.save_transformer(model, str(tmp_path / "swapped" / "transformer"))
    diffusers_file = shutil.copy(saved, tmp_path)
    args = ["sample", "--prompt", PROMPT, "--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length",
            "40"]
    cli.main([*args, "--flux", flux2_folder, "--transformer", str(tmp_path / "flux-2-klein.safetensors"), "--out",
               str(tmp_path / "file.png")])
    cli.main([*args, "--flux", flux2_folder, "--transformer", str(diffusers_file), "--out", str(tmp_path / "d.png")])
    cli.main([*args, "--flux", str(tmp_path / "swapped"), "--out", str(tmp_path / "swapped.png")])
    cli.main([*args, "--flux", flux2_folder, "--out", str(tmp_path / "own.png")])
    assert np.array_equal(read_png(tmp_path / "file.png"), read_png(tmp_path / "swapped.png"))
    assert np.array_equal(read_png(tmp_path / "d.png"), read_png(tmp_path / "swapped.png"))
    assert not np.array_equal(read_png(tmp_path / "file.png"), read_png(tmp_path / "own.png"))


@torch.no_grad()
def test_klein_cfg_sampling_matches_the_pipeline_before_rounding(flux2_folder):
    """The pieces `sample` assembles (Qwen3 text, prepare_latents' noise, the empirical-mu sigmas, two-pass CFG, the
    de-normalised decode) give Flux2KleinPipeline's float image: relative error <= 1e-5 in float32."""
    height, width, steps, seed, tokens = 48, 32, 3, 7, 40
    pipe = Flux2KleinPipeline.from_pretrained(flux2_folder, local_files_only=True)
    expected = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=3.0,
                    generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=tokens,
                    output_type="np").images[0]
    text = f2.Qwen3Conditioner.from_folder(flux2_folder, torch.float32, "cpu", tokens)
    model, ae = flux2_sampling.load_folder(flux2_folder, None, torch.float32, "cpu")
    cond = flux2_sampling.conditioning((text([PROMPT]), text([""])), height, width, torch.device("cpu"))
    x = flux2_sampling.initial_noise(1, height, width, seed, torch.float32, model.cfg.in_channels)
    seq_len = x.shape[1]
    sigmas = sampler.flux_schedule(steps, seq_len, sampler.read_schedule(flux2_folder),
                                    flux2_sampling.empirical_mu(seq_len, steps))
    x = sampler.euler_sample(model, x, sigmas, cond, 3.0)
    ours = sampler.decode_images(ae, x, height, width)[0].permute(1, 2, 0)
    assert rel_err(ours, torch.from_numpy(expected)) <= 1e-5


# measured: mean |image - fp32 image| 1.03 for ours in bf16 and 1.03 for the pipeline's (max 13 both); ours to the
# pipeline's bf16 image 1.02: in bf16 the two round differently (the modulation and the norm + RoPE fused in fp32), and
# on this tiny random model the rounding noise of either is as large as their distance to fp32
def test_bf16_klein_sample_is_as_close_to_the_fp32_image_as_the_pipelines(flux2_folder, tmp_path):
    """In bf16 the images are not bit-identical to the pipeline's bf16 one; ours must be as close to the fp32 image as
    the pipeline's bf16 image is (mean gap within 10 %), and never far."""
    height, width, steps, seed, tokens = 64, 96, 4, 2, 40
    out = str(tmp_path / "bf16.png")
    cli.main(["sample", "--flux", flux2_folder, "--prompt", PROMPT, "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--seed", str(seed), "--dtype", "bfloat16", "--out", out,
               "--max-sequence-length", str(tokens)])
    fp32 = pipeline_images(flux2_folder, PROMPT, height, width, steps, seed, 4.0, 1, tokens)[0]
    pipe = Flux2KleinPipeline.from_pretrained(flux2_folder, local_files_only=True, dtype=torch.bfloat16)
    theirs = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=4.0,
                  generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=tokens,
                  output_type="np").images[0]
    ours_gap, theirs_gap = np.abs(read_png(out) - fp32), np.abs((theirs * 255).round().astype(np.int32) - fp32)
    assert ours_gap.mean() <= 1.1 * theirs_gap.mean() and ours_gap.max() <= 16


def test_a_flux2_demo_checkpoint_samples_without_family(tmp_path, capsys):
    """`sample --transformer CKPT` without --flux: the checkpoint's config.json (a single file: its keys) says FLUX.2,
    so it samples as with --family flux2, byte for byte, where it was taken for FLUX.1 and refused; a --family of
    the other family beside it is one line naming both."""
    torch.manual_seed(1)  # not the demo's untrained weights
    ckpt = tmp_path / "checkpoint-000002"
    families.FLUX2.save(f2.Flux2(f2.Flux2Config.preset("tiny")), str(ckpt))
    small = ["--demo", "random", "--height", "32", "--width", "32", "--steps", "2"]
    cli.main(["sample", "--transformer", str(ckpt), "--family", "flux2", *small, "--out", str(tmp_path / "a.png")])
    for i, given in enumerate([ckpt, ckpt / "diffusion_pytorch_model.safetensors"]):
        cli.main(["sample", "--transformer", str(given), *small, "--out", str(tmp_path / f"{i}.png")])
        assert (tmp_path / f"{i}.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--transformer", str(ckpt), "--family", "flux1", *small, "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--family flux1" in err[0] and str(ckpt) in err[0], err
