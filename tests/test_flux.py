"""flux_model.py and `srpo.py sample` against diffusers (the independent reference), on random tiny models.

Tolerance: float32, relative error max|ours - theirs| / max|theirs| <= 1e-5.
"""

import inspect
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image
from references import diffusers_transformer, diffusers_vae, flux_variant, randomize, rel_err
from safetensors.torch import load_file, save_file

import cli
import flux_model as fm
from common import util
from sampling import flux_sampling, sampler
from weights import flux_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

CONFIGS = {  # (config, height, width, text tokens, batch)
    "3heads-guidance": (fm.FluxConfig(vec_in_dim=24, context_in_dim=40, hidden_size=96, num_heads=3, depth=2,
                                      depth_single_blocks=3, axes_dim=(8, 12, 12)), 48, 80, 7, 2),
    "no-guidance": (fm.FluxConfig(vec_in_dim=16, context_in_dim=24, hidden_size=64, num_heads=2, depth=1,
                                  depth_single_blocks=2, axes_dim=(4, 14, 14), guidance_embed=False), 32, 16, 5, 1),
    "head16": (fm.FluxConfig(vec_in_dim=8, context_in_dim=8, hidden_size=64, num_heads=4, depth=1,
                             depth_single_blocks=1, axes_dim=(4, 6, 6)), 80, 48, 3, 3),
}


def transformer_inputs(cfg, height, width, T, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = (height // 16) * (width // 16)
    return {"img": torch.randn(B, L, cfg.in_channels, generator=g), "img_ids": fm.image_ids(height, width),
                "txt": torch.randn(B, T, cfg.context_in_dim, generator=g), "txt_ids": torch.zeros(T, 3),
                "y": torch.randn(B, cfg.vec_in_dim, generator=g), "timesteps": torch.rand(B, generator=g),
                "guidance": torch.full((B,), 3.5) if cfg.guidance_embed else None}


@torch.no_grad()
def run_diffusers(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample


@torch.no_grad()
def run_ours(model, x):
    return model(**x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_from_diffusers_folder_matches_diffusers(name, tmp_path):
    cfg, height, width, T, B = CONFIGS[name]
    ref = diffusers_transformer(cfg)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index, as the released folder is
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    ours = flux_weights.load_transformer(str(tmp_path))
    assert ours.cfg == cfg
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x)) <= TOL


def test_float16_streams_are_clipped_like_diffusers(tmp_path):
    """In fp16 diffusers' FLUX blocks clip the text stream after a double block and the joint stream after a single
    block to +-65504; unclipped, an overflow is inf, then NaN from the next norm on. A transformer pushed past that
    range (text embeddings up to 6.1e4, every block's last bias 1e4 under a gate near 1: its fp32 streams reach 7.6e4,
    and leaving out either clip makes our output NaN) must still give diffusers' fp16 output."""
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ref, h = diffusers_transformer(cfg), cfg.hidden_size
    with torch.no_grad():
        ref.context_embedder.weight.mul_(5e4)
        ref.context_embedder.bias.mul_(5e4)
        for mlp_out, mod in [*((b.ff_context.net[2], b.norm1_context) for b in ref.transformer_blocks),
                             *((b.proj_out, b.norm) for b in ref.single_transformer_blocks)]:
            mlp_out.bias.fill_(1e4)
            mod.linear.bias[-h:] += 1  # the gate: the last chunk of the modulation
    ref.save_pretrained(tmp_path)
    x = {k: v if k.endswith("_ids") else v.half() for k, v in transformer_inputs(cfg, height, width, T, B).items()}
    theirs = run_diffusers(ref.half(), x)
    ours = run_ours(flux_weights.load_transformer(str(tmp_path), dtype=torch.float16), x)
    assert torch.isfinite(theirs).all() and torch.isfinite(ours).all()
    assert rel_err(ours, theirs) <= 1e-2  # measured 6.3e-3; diffusers' own fp16 output is 6.9e-3 from its fp32 one


def diffusers_flux_converter(hidden_size):
    """diffusers' own BFL -> diffusers converter. It hard-codes the single blocks' split at 3072 (FLUX.1's width);
    the tiny models are narrower, so the test runs the same source with that one constant set to the tiny width."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden_size}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("prefix", ["", flux_weights.BFL_PREFIX])
def test_bfl_single_file_checked_through_diffusers_converter(prefix, tmp_path):
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ref = diffusers_transformer(cfg, seed=3)
    ref.save_pretrained(tmp_path / "diffusers")
    ours = flux_weights.load_transformer(str(tmp_path / "diffusers"))
    bfl = {prefix + k: v.clone() for k, v in ours.state_dict().items()}  # our names are BFL's
    assert len(bfl) == 20 + 24 * cfg.depth + 8 * cfg.depth_single_blocks  # as BFL: 780 keys at 19 + 38 blocks
    converted = diffusers_flux_converter(cfg.hidden_size)({k: v.clone() for k, v in bfl.items()})
    expected = ref.state_dict()
    assert sorted(converted) == sorted(expected)
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k
    save_file(bfl, tmp_path / "flux1.safetensors")
    # an all-in-one file (ComfyUI's layout): the VAE and the text encoders beside the prefixed transformer
    others = {"vae.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3), "text_encoders.t5xxl.w": torch.zeros(3)}
    save_file(bfl | others, tmp_path / "all_in_one.safetensors")
    for name in ["flux1.safetensors"] + (["all_in_one.safetensors"] if prefix else []):
        loaded = flux_weights.load_transformer(str(tmp_path / name), cfg)
        x = transformer_inputs(cfg, height, width, T, B)
        assert rel_err(run_ours(loaded, x), run_diffusers(ref, x)) <= TOL, name


def test_saved_transformer_loads_strictly_into_diffusers(tmp_path):
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ours = randomize(fm.Flux(cfg), seed=5).eval()
    path = flux_weights.save_transformer(ours, str(tmp_path))
    ref = FluxTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    ref.load_state_dict(load_file(path), strict=True)  # what the seed's snippet does with SRPO's file
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x)) <= TOL
    # lossless round trip
    assert torch.equal(run_ours(flux_weights.load_transformer(str(tmp_path)), x), run_ours(ours, x))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_get_the_mode_of_the_umask(umask, mode, tmp_path):
    """0o666 & ~umask, as any new file: a checkpoint can be shared (safetensors alone writes 0600)."""
    old = os.umask(umask)
    try:
        util.write_text(str(tmp_path / "a.txt"), "a")
        util.write_json(str(tmp_path / "b.json"), {"b": 1})
        util.atomic_write(str(tmp_path / "c.safetensors"), lambda tmp: save_file({"c": torch.zeros(1)}, tmp))
        flux_weights.save_transformer(fm.Flux(CONFIGS["no-guidance"][0]), str(tmp_path / "checkpoint"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert len(modes) == 5 and set(modes.values()) == {mode}, {name: oct(m) for name, m in modes.items()}


def test_wrong_weights_are_caught(tmp_path):
    """The parity tests can fail: one swapped row block (q and k of one block) changes the output."""
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ref = diffusers_transformer(cfg)
    ref.save_pretrained(tmp_path)
    ours = flux_weights.load_transformer(str(tmp_path))
    with torch.no_grad():
        qkv = ours.double_blocks[1].img_attn.qkv.weight
        qkv[: cfg.hidden_size], qkv[cfg.hidden_size: 2 * cfg.hidden_size] = (
            qkv[cfg.hidden_size: 2 * cfg.hidden_size].clone(), qkv[: cfg.hidden_size].clone())
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x)) > 1e-3


AE_CONFIGS = [fm.AutoEncoderConfig.preset("tiny"),
              fm.AutoEncoderConfig(ch=8, ch_mult=(1, 2, 3, 3), num_res_blocks=2, groups=4)]


@pytest.mark.parametrize("cfg", AE_CONFIGS, ids=["tiny", "wide-mult"])
@torch.no_grad()
def test_autoencoder_matches_diffusers(cfg, tmp_path):
    vae = diffusers_vae(cfg)
    vae.save_pretrained(tmp_path)
    ae = flux_weights.load_autoencoder(str(tmp_path))
    assert ae.cfg == cfg
    x = torch.rand(2, 3, 48, 80) * 2 - 1
    z = ae.encode(x)
    z_ref = (vae.encode(x).latent_dist.mode() - cfg.shift_factor) * cfg.scale_factor
    assert rel_err(z, z_ref) <= TOL
    assert rel_err(ae.decode(z), vae.decode(z / cfg.scale_factor + cfg.shift_factor).sample) <= TOL
    # BFL's ae.safetensors layout, checked through diffusers' own LDM-VAE converter
    converted = single_file_utils.convert_ldm_vae_checkpoint(dict(ae.state_dict()), dict(vae.config))
    expected = vae.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k].reshape(expected[k].shape), expected[k]) for k in expected)
    save_file(dict(ae.state_dict()), tmp_path / "ae.safetensors")
    assert torch.equal(flux_weights.load_autoencoder(str(tmp_path / "ae.safetensors"), cfg).decode(z), ae.decode(z))


SCHEDULERS = {  # FlowMatchEulerDiscreteScheduler settings, beside its defaults
    "dev": {"shift": 3.0, "use_dynamic_shifting": True},
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    "shift3-static": {"shift": 3.0, "use_dynamic_shifting": False},
    "dev-other-mu": {"use_dynamic_shifting": True, "base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 64,
                     "max_image_seq_len": 2048},
    "dev-terminal": {"use_dynamic_shifting": True, "shift_terminal": 0.1},
    "static-terminal": {"shift": 2.0, "shift_terminal": 0.05},
}


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("size", [(64, 64), (512, 768), (1024, 1024), (1360, 768)])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedule_matches_diffusers(name, steps, size, tmp_path):
    """FluxPipeline's sigmas: linspace(1, 1/steps, steps) through set_timesteps, mu from the config's lengths."""
    seq_len = (size[0] // 16) * (size[1] // 16)
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name])
    sched.save_pretrained(tmp_path / "scheduler")  # read back as a folder's file, every key written
    ours = sampler.read_schedule(str(tmp_path))
    if sched.config.shift_terminal and steps == 1:  # diffusers divides 0 by 0 there
        with pytest.raises(util.InputError, match="shift_terminal"):
            sampler.flux_schedule(steps, seq_len, ours)
        return
    c = sched.config
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(
        seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    sigmas = sampler.flux_schedule(steps, seq_len, ours)
    assert sigmas.dtype == torch.float32 and torch.equal(sigmas, sched.sigmas)  # bit for bit
    if name == "dev":
        assert ours == sampler.FLUX_DEV and torch.equal(sampler.flux_schedule(steps, seq_len), sched.sigmas)


def test_folder_without_scheduler_file_gets_flux_dev_schedule(flux_folder, tmp_path):
    """The fallback is FLUX.1-dev's config, as the tiny folder's (written by diffusers with dev's settings) says."""
    shutil.copytree(flux_folder, tmp_path / "flux")
    shutil.rmtree(tmp_path / "flux" / "scheduler")
    assert sampler.read_schedule(str(tmp_path / "flux")) == sampler.FLUX_DEV == sampler.read_schedule(flux_folder)


# ----------------------------------------------------------------------------------------------------------------
# End to end: a tiny diffusers FLUX folder written by FluxPipeline.save_pretrained, sampled by both


def pipeline_image(folder, prompt, height, width, steps, seed, batch=1, transformer_file=None, dtype=torch.float32,
                   max_sequence_length=512):
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    if transformer_file:  # the seed's snippet: SRPO weights into a stock pipeline, strictly
        pipe.transformer.load_state_dict(load_file(transformer_file), strict=True)
    out = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
               generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=batch, output_type="np",
               max_sequence_length=max_sequence_length)
    return out.images  # (B, H, W, 3) float in [0, 1]


def read_png(path):
    return np.asarray(Image.open(path)).astype(np.int32)


def to_uint8(images):
    """diffusers' numpy_to_pil rounding of [0, 1] floats."""
    return (images * 255).round().astype(np.int32)


# The FLUX.1 family's folders: (scheduler config as released, or None for the fixture's dev one; guidance
# embedding; T5 tokens, as each is run). schnell's file is FLUX.1-schnell's scheduler_config.json.
VARIANTS = {
    "dev": (None, True, 512),
    "schnell": ({"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}, False, 256),
    "shift3-static": ({k: v for k, v in FlowMatchEulerDiscreteScheduler(shift=3.0).config.items()
                       if not k.startswith("_")}, True, 512),  # every key, as diffusers writes it
}


@pytest.fixture(scope="module")
def flux_variants(flux_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: flux_folder if sched is None else flux_variant(flux_folder, root / name, sched, guidance)
            for name, (sched, guidance, _) in VARIANTS.items()}


@pytest.mark.parametrize("height,width,batch", [(64, 96, 1), (48, 32, 2)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sample_gives_the_same_image_as_flux_pipeline(flux_variants, variant, tmp_path, height, width, batch,
                                                      capsys):
    """The folder's scheduler, guidance embedding (or none) and T5 length give FluxPipeline's image; a --guidance
    given to a model without a guidance embedding is ignored (as FluxPipeline does), with one note."""
    folder, (_, guidance_embed, tokens) = flux_variants[variant], VARIANTS[variant]
    prompt, steps, seed = "a red cat, on a mat!", 4, 1234
    expected = pipeline_image(folder, prompt, height, width, steps, seed, batch, max_sequence_length=tokens)
    out = str(tmp_path / "ours.png")
    capsys.readouterr()
    cli.main(["sample", "--flux", folder, "--prompt", prompt, "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--seed", str(seed), "--batch", str(batch), "--out", out,
               "--max-sequence-length", str(tokens), "--guidance", "3.5" if guidance_embed else "0"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ([] if guidance_embed else ["note: this transformer has no guidance embedding (e.g. "
                                                "FLUX.1-schnell): --guidance is ignored"])
    paths = [out] if batch == 1 else [str(tmp_path / f"ours-{i}.png") for i in range(batch)]
    for i, path in enumerate(paths):
        ours = read_png(path)
        assert ours.shape == (height, width, 3)
        # the same 8-bit image; a float32 tie at a rounding boundary may move one level in a rare pixel
        assert np.abs(ours - to_uint8(expected[i])).max() <= 1
        assert np.mean(ours != to_uint8(expected[i])) < 1e-3


def test_prompt_file_gives_each_prompt_the_flux_pipeline_images(flux_folder, tmp_path, monkeypatch):
    """--prompts: every line's images are FluxPipeline's for that prompt, seed and num_images_per_prompt, listed
    with their prompts in images.jsonl; the models load once."""
    loads = []
    load = flux_weights.load_transformer
    monkeypatch.setattr(flux_weights, "load_transformer", lambda *a: loads.append(a[-1]) or load(*a))
    prompts, height, width, steps, seed, batch = ["a red cat, on a mat!", "two dogs", "a red cat, on a mat!"], 32, 48, \
        3, 5, 2
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")  # blank line: skipped
    out = tmp_path / "eval"
    cli.main(["sample", "--flux", flux_folder, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
               "--height", str(height), "--width", str(width), "--steps", str(steps), "--seed", str(seed), "--batch",
               str(batch)])
    assert [str(device) for device in loads] == ["meta", "cpu"]  # checked, then loaded once for all prompts
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    settings = {"seed": seed, "flux": os.path.realpath(flux_folder), "transformer": None, "lora": None,
                "lora_scale": None, "height": height, "width": width, "steps": steps, "guidance": 3.5,
                "max_sequence_length": 512, "batch": batch, "dtype": "float32"}  # what a rerun must match
    assert rows == [{"image": f"{i:05d}-{j}.png", "prompt": p, **settings} for i, p in enumerate(prompts)
                    for j in range(batch)]
    for prompt in dict.fromkeys(prompts):
        expected = to_uint8(pipeline_image(flux_folder, prompt, height, width, steps, seed, batch))
        for row in (r for r in rows if r["prompt"] == prompt):
            ours = read_png(out / row["image"])
            j = int(row["image"][-5])
            assert np.abs(ours - expected[j]).max() <= 1 and np.mean(ours != expected[j]) < 1e-3, row


def test_prompt_file_with_bom_and_crlf_gives_the_same_prompts_and_images(tmp_path):
    """A Windows editor's file (UTF-8 byte-order mark, CRLF line ends) reads as the plain file, and its first line's
    image is --prompt's."""
    prompts = ["a red fox in snow", "two dogs"]
    (tmp_path / "plain.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (tmp_path / "windows.txt").write_bytes(("\r\n".join(prompts) + "\r\n").encode("utf-8-sig"))
    assert (tmp_path / "windows.txt").read_bytes().startswith(b"\xef\xbb\xbfa red fox in snow\r\n")
    assert util.read_prompts(str(tmp_path / "windows.txt")) == util.read_prompts(str(tmp_path / "plain.txt")) == prompts
    for name in ("plain", "windows"):
        cli.main(["sample", "--demo", "random", "--prompts", str(tmp_path / f"{name}.txt"), "--out",
                   str(tmp_path / name), "--steps", "2"])
    cli.main(["sample", "--demo", "random", "--prompt", prompts[0], "--out", str(tmp_path / "one.png"), "--steps", "2"])
    assert (tmp_path / "windows" / "images.jsonl").read_text() == (tmp_path / "plain" / "images.jsonl").read_text()
    for image in ("00000.png", "00001.png"):
        assert (tmp_path / "windows" / image).read_bytes() == (tmp_path / "plain" / image).read_bytes()
    assert (tmp_path / "windows" / "00000.png").read_bytes() == (tmp_path / "one.png").read_bytes()


def test_prompt_file_run_resumes_where_it_stopped(tmp_path, capsys):
    """A second run skips the prompts whose images exist (files are written atomically, so an existing file is a
    whole image) and makes the missing ones again, the same bytes."""
    (tmp_path / "p.txt").write_text("a fox\na bee\na cup\n")
    args = ["sample", "--demo", "random", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"), "--steps",
            "2"]
    cli.main(args)
    first = {name: (tmp_path / "s" / name).read_bytes() for name in ("00000.png", "00001.png", "00002.png")}
    assert len(set(first.values())) == 3
    (tmp_path / "s" / "00001.png").unlink()
    (tmp_path / "s" / "00000.png").write_bytes(b"kept")  # a run that regenerated it would overwrite this
    capsys.readouterr()
    cli.main(args)
    assert capsys.readouterr().out.split() == [str(tmp_path / "s" / "00001.png")]
    assert (tmp_path / "s" / "00001.png").read_bytes() == first["00001.png"]
    assert (tmp_path / "s" / "00000.png").read_bytes() == b"kept"
    cli.main(args)
    assert "nothing left to make" in capsys.readouterr().out


def test_prompt_file_is_split_over_torchrun_processes(tmp_path, monkeypatch, capsys):
    """Under torchrun, process r of w makes lines r, r + w, ... (no process group: prompts are independent) and
    process 0 writes images.jsonl; together they make the single process's images, byte for byte."""
    (tmp_path / "p.txt").write_text("a fox\na bee\na cup\n")
    sample = ["sample", "--demo", "random", "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--out"]
    cli.main([*sample, str(tmp_path / "one")])
    names = ["00000.png", "00001.png", "00002.png"]
    for rank, made in ((1, ["00001.png"]), (0, ["00000.png", "00002.png"])):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        capsys.readouterr()
        cli.main([*sample, str(tmp_path / "two")])
        assert capsys.readouterr().out.split() == [str(tmp_path / "two" / name) for name in made]
        assert (tmp_path / "two" / "images.jsonl").exists() == (rank == 0)
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert (tmp_path / "two" / "images.jsonl").read_text() == (tmp_path / "one" / "images.jsonl").read_text()
    code, err = run_cli(["sample", "--out", str(tmp_path / "x.png")], capsys)  # one prompt: nothing to split
    assert code == 2 and len(err) == 1 and "give --prompts" in err[0]


# measured (max gap, mean gap, diffusers' own mean gap to fp32): bf16 6, 0.58, 1.11; fp16 1, 0.075, 0.089
@pytest.mark.parametrize("dtype,max_gap,share", [("bfloat16", 8, 0.75), ("float16", 1, 1.0)])
def test_half_precision_sample_is_as_close_to_diffusers_as_diffusers_is_to_itself(flux_folder, tmp_path, dtype,
                                                                                   max_gap, share):
    """In bf16 and fp16 the two differ in rounding order (we fuse the modulation and the norm + RoPE in fp32), so the
    images are not bit-identical; they must be closer than diffusers' own image in that dtype is to its fp32 one, and
    never far."""
    prompt, height, width, steps, seed = "a red cat, on a mat!", 64, 96, 4, 2
    theirs = to_uint8(pipeline_image(flux_folder, prompt, height, width, steps, seed, dtype=getattr(torch, dtype))[0])
    theirs_fp32 = to_uint8(pipeline_image(flux_folder, prompt, height, width, steps, seed)[0])
    out = str(tmp_path / f"{dtype}.png")
    cli.main(["sample", "--flux", flux_folder, "--prompt", prompt, "--height", str(height), "--width", str(width),
               "--steps", str(steps), "--seed", str(seed), "--dtype", dtype, "--out", out])
    gap = np.abs(read_png(out) - theirs)
    assert gap.max() <= max_gap and gap.mean() < share * np.abs(theirs - theirs_fp32).mean()


@torch.no_grad()
def test_sampling_matches_flux_pipeline_before_rounding(flux_folder):
    prompt, height, width, steps, seed = "two dogs", 32, 64, 3, 7
    expected = pipeline_image(flux_folder, prompt, height, width, steps, seed)
    text = fm.TextConditioner.from_folder(flux_folder, torch.float32)
    model, ae = flux_sampling.load_folder(flux_folder, None, torch.float32, "cpu")
    txt, y = text([prompt])
    x = flux_sampling.initial_noise(1, height, width, seed, torch.float32)
    cond = flux_sampling.Conditioning(fm.image_ids(height, width), txt, torch.zeros(txt.shape[1], 3), y)
    x = sampler.euler_sample(model, x, sampler.flux_schedule(steps, x.shape[1]), cond, 3.5)
    ours = sampler.decode_images(ae, x, height, width)[0].permute(1, 2, 0)
    assert rel_err(ours, torch.from_numpy(expected[0])) <= TOL


def test_transformer_file_replaces_weights_like_the_seed_snippet(flux_folder, tmp_path):
    """--transformer FILE (diffusers keys, as SRPO's release) gives the image of a FluxPipeline whose transformer
    got that file through a strict load_state_dict."""
    cfg = flux_weights.read_flux_config(os.path.join(flux_folder, "transformer"))
    path = flux_weights.save_transformer(randomize(fm.Flux(cfg), seed=9), str(tmp_path / "srpo"))
    expected = pipeline_image(flux_folder, "a tree", 32, 32, 2, 0, transformer_file=path)
    out = str(tmp_path / "srpo.png")
    cli.main(["sample", "--flux", flux_folder, "--transformer", path, "--prompt", "a tree", "--height", "32",
               "--width", "32", "--steps", "2", "--seed", "0", "--out", out])
    ours = read_png(out)
    assert np.abs(ours - to_uint8(expected[0])).max() <= 1 and np.mean(ours != to_uint8(expected[0])) < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The command line


def test_tiny_default_sample_runs(tmp_path):
    out = str(tmp_path / "tiny.png")
    cli.main(["sample", "--demo", "random", "--out", out, "--steps", "3"])
    img = read_png(out)
    assert img.shape == (64, 64, 3) and img.std() > 0


def test_help_documents_every_flag():
    sample = build_sample_parser()
    for action in sample._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = sample.format_help()
    for flag in ["--flux", "--transformer", "--prompt", "--height", "--width", "--steps", "--guidance", "--seed",
                 "--batch", "--out", "--device", "--dtype", "--attn", "--prompts", "--max-sequence-length"]:
        assert flag in text


def build_sample_parser():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["sample"]


def bad_files(flux_folder, tmp):
    """Transformer files that must be refused, each with the words the error must contain."""
    good = load_file(os.path.join(flux_folder, "transformer", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(flux_folder, "transformer", "diffusion_pytorch_model.safetensors"), "rb") as f:
        data = f.read()
    cases = {}

    def write(name, tensors=None, raw=None):
        path = os.path.join(tmp, name)
        if raw is not None:
            with open(path, "wb") as f:
                f.write(raw)
        else:
            save_file(tensors, path)
        return path

    cases["truncated"] = (write("truncated.safetensors", raw=data[: len(data) // 2]), ["not a readable safetensors"])
    cases["not safetensors"] = (write("model.pt", raw=b"PK\x03\x04 a zip, not safetensors" * 10),
                                ["not a readable safetensors"])
    cases["missing keys"] = (write("missing.safetensors", {k: v for k, v in good.items() if "proj_out" not in k}),
                             ["missing keys", "proj_out"])
    cases["unexpected keys"] = (write("extra.safetensors", good | {"lora.down.weight": torch.zeros(2)}),
                                ["unexpected keys", "lora.down.weight"])
    wrong = dict(good)
    wrong["context_embedder.weight"] = torch.zeros(64, 48)
    cases["shape"] = (write("shape.safetensors", wrong), ["context_embedder.weight", "[64, 48]", "[64, 32]"])
    cases["missing file"] = (os.path.join(tmp, "nope.safetensors"), ["no such file"])
    cases["not flux"] = (write("other.safetensors", {"foo.weight": torch.zeros(2)}), ["not a FLUX transformer"])
    return cases


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def test_bad_transformer_files_give_one_line_errors(flux_folder, tmp_path, capsys):
    for name, (path, words) in bad_files(flux_folder, str(tmp_path)).items():
        code, err = run_cli(["sample", "--flux", flux_folder, "--transformer", path, "--steps", "1", "--height",
                             "32", "--width", "32", "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert all(w in err[0] for w in words), (name, err)
    assert not os.path.exists(tmp_path / "x.png")


def broken_folders(flux_folder, tmp):
    """Copies of the tiny FLUX folder with one thing broken, each with the words the error must contain."""
    import shutil

    def copy(name, breakage):
        folder = os.path.join(tmp, name)
        shutil.copytree(flux_folder, folder)
        breakage(folder)
        return folder

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

    def config(folder, **changes):
        path = os.path.join(folder, "transformer", "config.json")
        write(path, json.dumps(util.read_json(path) | changes))

    def scheduler(folder, **changes):
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        write(path, json.dumps(util.read_json(path) | changes))

    def shard(folder):  # a sharded folder whose index has a list where the key -> file map should be
        write(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors.index.json"),
              json.dumps({"weight_map": ["diffusion_pytorch_model.safetensors"]}))

    def empty_tokenizer(folder):
        for f in os.listdir(os.path.join(folder, "tokenizer_2")):
            os.remove(os.path.join(folder, "tokenizer_2", f))

    def config_folder(folder):
        os.remove(os.path.join(folder, "transformer", "config.json"))
        os.mkdir(os.path.join(folder, "transformer", "config.json"))

    return {
        "config is a folder": (copy("a", config_folder), ["config.json", "cannot read"]),
        "config is a list": (copy("b", lambda f: write(os.path.join(f, "transformer", "config.json"), "[1, 2]")),
                             ["expected a JSON object"]),
        "zero heads": (copy("c", lambda f: config(f, num_attention_heads=0)), ["num_attention_heads=0"]),
        "heads as text": (copy("d", lambda f: config(f, num_layers="two")), ["num_layers='two'"]),
        "index is a list": (copy("e", shard), ["weight_map"]),
        "empty tokenizer": (copy("f", empty_tokenizer), ["tokenizer_2", "tokenizer.json or spiece.model"]),
        "karras sigmas": (copy("g", lambda f: scheduler(f, use_karras_sigmas=True)),
                          ["scheduler_config.json", "use_karras_sigmas=true", "not supported"]),
        "linear time shift": (copy("h", lambda f: scheduler(f, time_shift_type="linear")),
                              ["time_shift_type=\"linear\"", "not supported"]),
        "stochastic": (copy("i", lambda f: scheduler(f, stochastic_sampling=True)), ["stochastic_sampling=true"]),
        "unknown key": (copy("j", lambda f: scheduler(f, use_flow_sigmas=True)), ["unknown key", "use_flow_sigmas"]),
        "shift as text": (copy("k", lambda f: scheduler(f, shift="three")), ["shift=\"three\"", "a number"]),
        "other scheduler": (copy("l", lambda f: scheduler(f, _class_name="EulerDiscreteScheduler")),
                            ["_class_name", "EulerDiscreteScheduler"]),
        "timesteps": (copy("m", lambda f: scheduler(f, num_train_timesteps=500)), ["num_train_timesteps=500"]),
    }


def test_broken_flux_folders_give_one_line_errors(flux_folder, tmp_path, capsys):
    for name, (folder, words) in broken_folders(flux_folder, str(tmp_path)).items():
        code, err = run_cli(["sample", "--flux", folder, "--steps", "1", "--height", "32", "--width", "32",
                             "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert all(w in err[0] for w in words), (name, err)
    assert not os.path.exists(tmp_path / "x.png")


def test_train_refuses_a_transformer_without_guidance_embedding(flux_variants, tmp_path, capsys):
    """SRPO's recipe feeds FLUX.1-dev's distilled guidance to the model: a schnell-like folder is refused."""
    (tmp_path / "hps.pt").write_bytes(b"not read: the folder is refused first")
    code, err = run_cli(["train", "--flux", flux_variants["schnell"], "--hps", str(tmp_path / "hps.pt"), "--out",
                         str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in ["no guidance embedding", "3.5", "FLUX.1-dev"]), err


@pytest.mark.parametrize("args,words", [
    (["--height", "50"], ["multiples of 16", "50x64"]),
    (["--width", "0"], ["multiples of 16"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--batch", "0"], ["--batch"]),
    (["--device", "tpu9"], ["unknown device", "tpu9"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "bogus"], ["device"]),
    (["--dtype", "int8"], ["unknown dtype", "int8"]),
    (["--max-sequence-length", "0"], ["--max-sequence-length", "at most 512", "got 0"]),
    (["--max-sequence-length", "513"], ["--max-sequence-length", "at most 512", "got 513"]),
    (["--flux", "/no/such/folder"], ["/no/such/folder", "no such folder"]),
    (["--transformer", "x.safetensors"], ["x.safetensors: no such file", "without --flux", "tiny demo checkpoint"]),
    (["--out", "/no/such/folder/x.png"], ["/no/such/folder", "does not exist"]),
    (["--out", "picture"], ["image extension"]),
])
def test_bad_flags_give_one_line_errors(args, words, capsys):
    code, err = run_cli(["sample", *args], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err


@pytest.mark.parametrize("case,words", [
    ("both", ["--prompt or --prompts"]),
    ("missing", ["none.txt", "cannot read the prompt file"]),
    ("empty", ["empty.txt", "no prompts"]),
    ("out-file", ["out.png", "is a folder"]),
    ("out-unwritable", ["cannot write the output folder"]),
])
def test_bad_prompt_file_flags_give_one_line_errors(case, words, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a fox\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    prompts, out, extra = tmp_path / "p.txt", tmp_path / "s", []
    if case == "both":
        extra = ["--prompt", "a cat"]
    elif case in ("missing", "empty"):
        prompts = tmp_path / ("none.txt" if case == "missing" else "empty.txt")
    elif case == "out-file":
        out = tmp_path / "out.png"
    else:
        out = tmp_path / "p.txt" / "s"  # under a file: cannot be made
    code, err = run_cli(["sample", "--prompts", str(prompts), "--out", str(out), *extra], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err
    assert not os.path.exists(out / "images.jsonl")


def test_cli_error_has_no_traceback(tmp_path):
    """The real command line: one line on stderr, exit code 2."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "srpo.py"), "sample", "--height", "24"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: height and width must be positive multiples of 16, got 24x64"]


# ----------------------------------------------------------------------------------------------------------------
# The attention switch: flux_kernels/ (Triton; interpreted on a CPU) and torch SDPA give the same model


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_triton_and_sdpa_backends_agree_on_the_tiny_model(monkeypatch, autocast):
    """fp32: the same model to fp32 rounding. bf16 autocast over fp32 weights is how training runs: the kernels then
    get bf16 q, k, v from the projections and an fp32 norm scale, and the two backends round at different places."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest imported the kernels in interpreter mode
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = fm.FluxConfig.preset("tiny")
    model = randomize(fm.Flux(cfg), seed=11).to(device)
    x = {k: v.to(device) if v is not None else v for k, v in transformer_inputs(cfg, 48, 32, 5, 2).items()}
    outs, grads = {}, {}
    for backend in ("sdpa", "triton"):
        model.set_attention_backend(backend)
        model.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            outs[backend] = model(**x).float()
        (outs[backend] * torch.linspace(-1, 1, outs[backend].numel(), device=device).view_as(outs[backend])).sum() \
            .backward()
        grads[backend] = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert rel_err(outs["triton"], outs["sdpa"]) <= (1e-2 if autocast else TOL)  # bf16: the kernels' tolerance
    for name, grad in grads["sdpa"].items():  # each tensor on its own scale (measured: fp32 7e-7, autocast 1.3e-2)
        assert rel_err(grads["triton"][name], grad) <= (3e-2 if autocast else TOL), name
