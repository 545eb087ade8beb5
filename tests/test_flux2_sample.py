"""`srpo.py sample` on FLUX.2 [klein] folders (flux2_sampling.py) against diffusers' Flux2KleinPipeline, the
independent reference, on tiny random folders written by its own save_pretrained (references.flux2_folder).

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
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from references import flux2_folder as make_flux2_folder

import flux2_model as f2
import flux2_sampling as f2s
import sampling
import srpo

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
        assert f2s.empirical_mu(seq_len, steps) == mu
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = sampling.flux_schedule(steps, seq_len, sampling.read_schedule(flux2_folder), mu)
        assert ours.dtype == torch.float32 and torch.equal(ours, sched.sigmas)
        if steps > 1:  # FLUX.1's mu would give other sigmas (one step's are 1, 0 whatever mu)
            assert not torch.equal(ours, sampling.flux_schedule(steps, seq_len, sampling.read_schedule(flux2_folder)))


@pytest.mark.parametrize("batch,height,width,channels", [(1, 48, 80, 32), (2, 64, 32, 128)])
def test_noise_and_ids_are_prepare_latents(batch, height, width, channels):
    """The packed noise and image ids of Flux2KleinPipeline.prepare_latents for a seed (its own code, run on a stand-in
    for the pipeline), bit for bit."""
    pipe = SimpleNamespace(vae_scale_factor=8, _prepare_latent_ids=Flux2KleinPipeline._prepare_latent_ids,
                           _pack_latents=Flux2KleinPipeline._pack_latents)
    theirs, ids = Flux2KleinPipeline.prepare_latents(pipe, batch, channels // 4, height, width, torch.float32, "cpu",
                                                     torch.Generator("cpu").manual_seed(11))
    ours = f2s.initial_noise(batch, height, width, 11, torch.float32, channels)
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
    srpo.main(["sample", "--flux", klein[name], "--prompt", PROMPT, "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--seed", str(seed), "--batch", str(batch), "--out", out,
               "--max-sequence-length", str(tokens), *(["--guidance", guidance] if guidance else [])])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == (name == "distilled")
    expected = pipeline_images(klein[name], PROMPT, height, width, steps, seed, float(guidance or 4.0), batch, tokens)
    paths = [out] if batch == 1 else [str(tmp_path / f"ours-{i}.png") for i in range(batch)]
    for i, path in enumerate(paths):
        assert same_8bit(read_png(path), expected[i]), (case, i)
    if name == "base" and guidance != "1":  # the negative pass shows: without it the image is another one
        one_pass = pipeline_images(klein[name], PROMPT, height, width, steps, seed, 1.0, batch, tokens)
        assert not same_8bit(one_pass[0], expected[0])


def test_prompt_file_on_klein_gives_the_pipeline_images_and_a_manifest(klein, tmp_path):
    """--prompts on a klein folder: each line's images are the pipeline's for that prompt, listed in images.jsonl
    with the FLUX.2 default guidance (4) as what a rerun must match."""
    prompts, out = [PROMPT, "two dogs"], tmp_path / "eval"
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    srpo.main(["sample", "--flux", klein["base"], "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
               "--height", "32", "--width", "64", "--steps", "3", "--seed", "5", "--max-sequence-length", "40"])
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["image"], r["prompt"], r["guidance"]) for r in rows] == [("00000.png", PROMPT, 4.0),
                                                                         ("00001.png", "two dogs", 4.0)]
    for row in rows:
        expected = pipeline_images(klein["base"], row["prompt"], 32, 64, 3, 5, 4.0, max_sequence_length=40)
        assert same_8bit(read_png(out / row["image"]), expected[0]), row


def test_flux2_dev_folder_is_refused_in_one_line(flux2_folder, tmp_path, capsys):
    """A Flux2Pipeline (FLUX.2 [dev]) folder: its Mistral-3 text encoder is not implemented, said in one line naming
    the file, before anything is loaded."""
    folder = tmp_path / "dev"
    shutil.copytree(flux2_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "Flux2Pipeline"}))
    with pytest.raises(SystemExit) as exit_info:
        srpo.main(["sample", "--flux", str(folder), "--out", str(tmp_path / "x.png"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1
    assert all(w in err[0] for w in [os.path.join(str(folder), "model_index.json"), "Flux2Pipeline", "Mistral-3"])
