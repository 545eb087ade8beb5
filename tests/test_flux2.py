"""flux2_model.py and weights/flux2_weights.py against diffusers (the independent reference), on random tiny models
saved by diffusers' own save_pretrained and read by our loaders.

Tolerance: float32, relative error max|ours - theirs| / max|theirs| <= 1e-5.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from references import diffusers_flux2_transformer, diffusers_flux2_vae, randomize, rel_err
from safetensors.torch import load_file, save_file

import families
import flux2_model as f2
import flux_model as fm
from common.util import InputError
from flux_kernels import attention as attention_module
from flux_kernels import rope as rope_module
from flux_kernels.dispatch import INTERPRETED
from weights import flux2_weights, flux_weights

TOL = 1e-5

CONFIGS = {  # (config, height, width, text tokens, batch)
    "3heads-guidance": (f2.Flux2Config(context_in_dim=40, hidden_size=96, num_heads=3, depth=2, depth_single_blocks=3,
                                       axes_dim=(8, 8, 8, 8)), 48, 80, 7, 2),
    "no-guidance": (f2.Flux2Config(context_in_dim=24, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2,
                                   axes_dim=(4, 12, 8, 8), mlp_ratio=2.5, guidance_embed=False), 80, 32, 5, 1),
    "tiny": (f2.Flux2Config.preset("tiny"), 32, 64, 4, 2),
}


def pipeline_ids(cfg, height, width, T, B):
    """Image and text ids as Flux2KleinPipeline builds them (batched, 4 axes), from latents and prompt embeddings of
    the pipeline's shapes."""
    latents = torch.zeros(B, cfg.in_channels, height // 16, width // 16)
    return (Flux2KleinPipeline._prepare_latent_ids(latents),
            Flux2KleinPipeline._prepare_text_ids(torch.zeros(B, T, cfg.context_in_dim)))


def transformer_inputs(cfg, height, width, T, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = (height // 16) * (width // 16)
    return {"img": torch.randn(B, L, cfg.in_channels, generator=g), "img_ids": f2.image_ids(height, width),
            "txt": torch.randn(B, T, cfg.context_in_dim, generator=g), "txt_ids": f2.text_ids(T),
            "timesteps": torch.rand(B, generator=g),
            "guidance": torch.full((B,), 4.0) if cfg.guidance_embed else None}


@torch.no_grad()
def run_diffusers(model, x, ids):
    img_ids, txt_ids = ids
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"], img_ids=img_ids,
                 txt_ids=txt_ids, guidance=x["guidance"]).sample


@torch.no_grad()
def run_ours(model, x):
    return model(**x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_from_diffusers_folder_matches_diffusers(name, tmp_path):
    """Non-square images, the pipeline's own 4-axis ids (equal to ours), with and without a guidance embedding."""
    cfg, height, width, T, B = CONFIGS[name]
    ref = diffusers_flux2_transformer(cfg)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index, as the released folders are
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    ours = flux2_weights.load_transformer(str(tmp_path))
    assert ours.cfg == cfg
    x, ids = transformer_inputs(cfg, height, width, T, B), pipeline_ids(cfg, height, width, T, B)
    for ours_ids, theirs in zip((x["img_ids"], x["txt_ids"]), ids, strict=True):
        assert all(torch.equal(ours_ids, row.float()) for row in theirs)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x, ids)) <= TOL


def test_names_are_bfl_through_diffusers_converter(tmp_path):
    """Our module names are BFL's (black-forest-labs/flux2): diffusers' own BFL -> diffusers converter turns the
    state dict our loader made into the diffusers model's, tensor for tensor."""
    cfg = CONFIGS["3heads-guidance"][0]
    ref = diffusers_flux2_transformer(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    bfl = {k: v.clone() for k, v in flux2_weights.load_transformer(str(tmp_path)).state_dict().items()}
    converted = single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers(bfl)
    expected = ref.state_dict()
    assert sorted(converted) == sorted(expected)
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k


@pytest.mark.parametrize("layout", ["BFL", "BFL in an all-in-one file", "diffusers"])
def test_single_file_loads_with_its_config_read_off_its_shapes(layout, tmp_path):
    """A single file gives diffusers' output, its config read off its shapes equal to the one diffusers had: BFL's
    names (maybe prefixed, inside an all-in-one file beside a VAE and a text encoder), or diffusers' own (the
    state_dict a folder's diffusion_pytorch_model.safetensors holds, saved alone); with and without guidance."""
    prefix = flux_weights.BFL_PREFIX if "all-in-one" in layout else ""
    for name in ("3heads-guidance", "tiny"):
        cfg, height, width, T, B = CONFIGS[name]
        ref = diffusers_flux2_transformer(cfg, seed=4)
        ref.save_pretrained(tmp_path / name)
        state = ref.state_dict() if layout == "diffusers" else \
            {prefix + k: v for k, v in flux2_weights.load_transformer(str(tmp_path / name)).state_dict().items()}
        others = {"vae.encoder.conv_in.weight": torch.zeros(2), "text_encoders.qwen3.w": torch.zeros(3)} if prefix \
            else {}
        save_file(state | others, tmp_path / f"{name}.safetensors")
        ours = flux2_weights.load_transformer(str(tmp_path / f"{name}.safetensors"))
        assert ours.cfg == flux2_weights.config_from_diffusers(dict(ref.config), "diffusers") == cfg, name
        x = transformer_inputs(cfg, height, width, T, B)
        assert rel_err(run_ours(ours, x), run_diffusers(ref, x, pipeline_ids(cfg, height, width, T, B))) <= TOL


def test_other_single_files_are_refused_in_one_line(tmp_path):
    """A FLUX.1 file (per-block modulation), in BFL's names or diffusers', is not read as a FLUX.2 transformer: one
    line naming the file and the keys either layout has."""
    save_file({"img_in.weight": torch.zeros(2, 2), "double_blocks.0.img_mod.lin.weight": torch.zeros(2)},
              tmp_path / "flux1.safetensors")
    save_file({"x_embedder.weight": torch.zeros(2, 2), "transformer_blocks.0.norm1.linear.weight": torch.zeros(2)},
              tmp_path / "diffusers.safetensors")
    for name in ("flux1", "diffusers"):
        with pytest.raises(InputError) as e:
            flux2_weights.load_transformer(str(tmp_path / f"{name}.safetensors"))
        message = str(e.value)
        assert len(message.splitlines()) == 1 and message.startswith(str(tmp_path / f"{name}.safetensors")), message
        assert "not a FLUX.2 transformer" in message and "single_stream_modulation.lin.weight" in message and \
            "single_stream_modulation.linear.weight" in message, message


def test_saved_transformer_loads_strictly_into_diffusers(tmp_path):
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ours = randomize(f2.Flux2(cfg), seed=5).eval()
    path = flux2_weights.save_transformer(ours, str(tmp_path))
    ref = Flux2Transformer2DModel.from_pretrained(str(tmp_path)).eval()
    ref.load_state_dict(load_file(path), strict=True)
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x, pipeline_ids(cfg, height, width, T, B))) <= TOL
    # lossless round trip
    assert torch.equal(run_ours(flux2_weights.load_transformer(str(tmp_path)), x), run_ours(ours, x))


@pytest.mark.parametrize("part", ["double qk rows", "final shift/scale"])
def test_wrong_weights_are_caught(part, tmp_path):
    """The parity tests can fail: q and k of one block's text stream swapped, or the final layer's shift and scale
    (the halves the links swap between BFL's and diffusers' order), change the output."""
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ref = diffusers_flux2_transformer(cfg)
    ref.save_pretrained(tmp_path)
    ours, h = flux2_weights.load_transformer(str(tmp_path)), cfg.hidden_size
    w = ours.double_blocks[1].txt_attn.qkv.weight if part == "double qk rows" else \
        ours.final_layer.adaLN_modulation[1].weight
    with torch.no_grad():
        w[:h], w[h: 2 * h] = w[h: 2 * h].clone(), w[:h].clone()
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x, pipeline_ids(cfg, height, width, T, B))) > 1e-3


def test_presets_have_the_released_shapes():
    """klein 4B and 9B and dev built (on the meta device) by diffusers from our config have our links' tensors and
    shapes, and the sizes they are named for (transformer parameters, in billions: klein 4B and 9B, dev 32B)."""
    for name, billions in [("klein-4b", 4), ("klein-9b", 9), ("flux2-dev", 32)]:
        cfg = f2.Flux2Config.preset(name)
        with torch.device("meta"):
            ref = Flux2Transformer2DModel(**{k: v for k, v in flux2_weights.config_to_diffusers(cfg).items()
                                             if not k.startswith("_")})
            ours = f2.Flux2(cfg)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        mapped = flux_weights.to_theirs(ours.state_dict(), flux2_weights.transformer_links(cfg))
        assert {k: tuple(v.shape) for k, v in mapped.items()} == theirs, name
        assert round(sum(p.numel() for p in ours.parameters()) / 1e9) == billions, name


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder: diffusers' AutoencoderKLFlux2 with the latent (de)normalisation and (un)patchify of Flux2KleinPipeline

AE_CONFIGS = {"tiny": f2.Flux2AutoEncoderConfig.preset("tiny"),
              "wide-mult": f2.Flux2AutoEncoderConfig(ch=8, ch_mult=(1, 2, 3, 3), num_res_blocks=2, z_channels=4,
                                                     groups=4, bn_eps=1e-3)}


def pipeline_latents(vae, images):
    """Flux2KleinPipeline's tokens of images: its own _encode_vae_image (encode, argmax, patchify, normalise by the
    batch-norm statistics), then _pack_latents."""
    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    return Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._encode_vae_image(pipe, images, None))


def pipeline_decode(vae, tokens, height, width):
    """The end of Flux2KleinPipeline.__call__: tokens scattered by their ids, de-normalised, unpatchified, decoded."""
    h, w = height // 16, width // 16
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, h, w))
    latents = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, h, w)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


@pytest.mark.parametrize("name", list(AE_CONFIGS))
@torch.no_grad()
def test_autoencoder_matches_diffusers_and_the_pipelines_normalisation(name, tmp_path):
    cfg = AE_CONFIGS[name]
    vae = diffusers_flux2_vae(cfg)
    vae.save_pretrained(tmp_path)
    ae = flux2_weights.load_autoencoder(str(tmp_path))
    assert ae.cfg == cfg
    height, width = 48, 80
    x = torch.rand(2, 3, height, width) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, cfg.z_channels, height // 8, width // 8)
    tokens = pipeline_latents(vae, x)
    assert torch.equal(fm.pack(z), f2.patchify(z).flatten(2).transpose(1, 2))  # pack is the pipeline's packing
    assert rel_err(fm.pack(z), tokens) <= TOL
    assert rel_err(ae.decode(fm.unpack(tokens, height, width)), pipeline_decode(vae, tokens, height, width)) <= TOL


def test_autoencoder_bfl_single_file(tmp_path):
    """BFL's layout (our names, as black-forest-labs/flux2's AutoEncoder has them: the quant convs inside the encoder
    and decoder, bn.* at the top; no diffusers converter exists to check it against) loads back equal."""
    cfg = AE_CONFIGS["tiny"]
    diffusers_flux2_vae(cfg).save_pretrained(tmp_path)
    ae = flux2_weights.load_autoencoder(str(tmp_path))
    save_file(dict(ae.state_dict()), tmp_path / "ae.safetensors")
    bfl = flux2_weights.load_autoencoder(str(tmp_path / "ae.safetensors"), cfg)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(bfl.encode(x), z) and torch.equal(bfl.decode(z), ae.decode(z))


def test_autoencoder_statistics_matter(tmp_path):
    """The parity test can fail: without the batch-norm statistics (mean 0, var 1 - eps) the tokens differ."""
    cfg = AE_CONFIGS["tiny"]
    vae = diffusers_flux2_vae(cfg)
    vae.save_pretrained(tmp_path)
    ae = flux2_weights.load_autoencoder(str(tmp_path))
    ae.bn.reset_running_stats()
    ae.bn.running_var.sub_(cfg.bn_eps)
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert rel_err(fm.pack(ae.encode(x)), pipeline_latents(vae, x)) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels on FLUX.2's 4-axis RoPE (in the interpreter on a CPU-only machine)


@pytest.fixture
def triton_only(monkeypatch):
    """The kernels, never their PyTorch references: TRITON_INTERPRET=1 on CPU (flux_kernels/dispatch.py), and the
    references made to fail."""
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("kernels compiled for a GPU in this process")

    def fail(*args, **kwargs):
        raise AssertionError("a PyTorch reference ran instead of the Triton kernel")

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(rope_module, "norm_rope_reference", fail)
    monkeypatch.setattr(attention_module, "attention_reference", fail)


@pytest.mark.parametrize("axes", [(8, 8, 8, 8), (32, 32, 32, 32)])
def test_fused_norm_rope_on_4_axis_positions_matches_diffusers(axes, triton_only):
    """QK RMSNorm + RoPE through the fused kernel, on the pipeline's text and image ids, equals diffusers' RMSNorm then
    apply_rotary_emb with Flux2PosEmbed (theta 2000), forward and gradients (fp32, 1e-5)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    D, T, height, width = sum(axes), 5, 48, 64
    cfg = f2.Flux2Config(context_in_dim=8, hidden_size=D, num_heads=1, axes_dim=axes)
    img_ids, txt_ids = pipeline_ids(cfg, height, width, T, 1)
    ids = torch.cat([txt_ids[0], img_ids[0]]).to(device)
    N = ids.shape[0]
    x = torch.randn(2, N, 3, D, device=device)  # (B, N, H, D), as diffusers holds q
    scale = 1 + 0.5 * torch.randn(D, device=device)
    g = torch.randn(2, 3, N, D, device=device)
    xl, sl = x.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = fm.qk_norm_rope(xl.transpose(1, 2), sl, *fm.rope_freqs(ids, axes, 2000), "triton")
    ours.backward(g)
    xr, sr = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = torch.nn.functional.rms_norm(xr, (D,), sr, 1e-6)
    theirs = apply_rotary_emb(y, Flux2PosEmbed(2000, list(axes))(ids), sequence_dim=1).transpose(1, 2)
    theirs.backward(g)
    assert rel_err(ours, theirs) <= TOL
    assert rel_err(xl.grad, xr.grad) <= TOL and rel_err(sl.grad, sr.grad) <= TOL


def test_triton_backend_matches_sdpa_on_the_tiny_transformer(triton_only):
    """The whole tiny FLUX.2 transformer with the fused QK-norm + RoPE and the flash attention kernels gives the
    PyTorch path's output and parameter gradients (fp32, 1e-5; gradients over all parameters together)."""
    cfg, height, width, T, B = CONFIGS["tiny"]
    model = randomize(f2.Flux2(cfg))
    x = transformer_inputs(cfg, height, width, T, B)
    runs = []
    for backend in ("sdpa", "triton"):  # 'sdpa': torch SDPA and flux_model's own binding of the rope reference
        model.set_attention_backend(backend)
        model.zero_grad()
        out = model(**x)
        out.square().mean().backward()
        runs.append((out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (expected, expected_grad), (out, grad) = runs
    assert rel_err(out, expected) <= TOL and rel_err(grad, expected_grad) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Folders: which family, and one-line errors for what we cannot read


@pytest.mark.parametrize("name,family", [("FluxPipeline", "flux1"), ("Flux2KleinPipeline", "flux2"),
                                         ("Flux2Pipeline", "flux2")])
def test_family_of_reads_model_index(name, family, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name, "_diffusers_version": "0.36.0"}))
    assert families.of_folder(str(tmp_path)).name == family


def test_family_of_refuses_other_folders_in_one_line(tmp_path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (tmp_path / "empty").mkdir()
    cases = {"sdxl": ["StableDiffusionXLPipeline", "not a FLUX pipeline", "Flux2KleinPipeline"],
             "empty": ["no model_index.json"], "missing": ["no such folder"]}
    for folder, words in cases.items():
        with pytest.raises(InputError) as e:
            families.of_folder(str(tmp_path / folder))
        assert len(str(e.value).splitlines()) == 1 and all(w in str(e.value) for w in words), (folder, e.value)


@pytest.mark.parametrize("part,changes,words", [
    ("transformer", {"patch_size": 2}, ["patch_size=2", "not supported"]),
    ("transformer", {"num_layers": "two"}, ["num_layers='two'"]),
    ("transformer", {"eps": 1e-5}, ["eps=1e-05", "not supported"]),
    ("transformer", {"mlp_ratio": 0}, ["mlp_ratio", "positive"]),
    ("vae", {"use_quant_conv": False}, ["use_quant_conv=False", "not supported"]),
    ("vae", {"patch_size": [1, 1]}, ["patch_size"]),
])
def test_bad_configs_give_one_line_errors(part, changes, words, tmp_path):
    if part == "transformer":
        diffusers_flux2_transformer(CONFIGS["tiny"][0]).save_pretrained(tmp_path)
    else:
        diffusers_flux2_vae(AE_CONFIGS["tiny"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as e:
        (flux2_weights.load_transformer if part == "transformer" else flux2_weights.load_autoencoder)(str(tmp_path))
    assert len(str(e.value).splitlines()) == 1 and all(w in str(e.value) for w in words), e.value


def test_missing_config_keys_take_diffusers_defaults(tmp_path):
    """A config.json that leaves keys out loads as diffusers loads it: with Flux2Transformer2DModel's defaults."""
    cfg = f2.Flux2Config(context_in_dim=16, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                         axes_dim=(8, 8, 8, 8))  # mlp_ratio 3, theta 2000, guidance embedding: the defaults
    diffusers_flux2_transformer(cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("mlp_ratio", "rope_theta", "guidance_embeds", "eps", "patch_size", "out_channels"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Flux2Transformer2DModel.from_pretrained(str(tmp_path)).config.guidance_embeds
    assert flux2_weights.load_transformer(str(tmp_path)).cfg == cfg


# ----------------------------------------------------------------------------------------------------------------
# A whole klein folder, written by Flux2KleinPipeline.save_pretrained


def test_klein_folder_loads_and_its_text_conditioning_is_the_pipelines(flux2_folder):
    """The folder is told FLUX.2 by its model_index.json, its transformer and VAE load, and Qwen3Conditioner gives
    the pipeline's own encode_prompt: the same embeddings (chat template, padding, truncation, layers 9/18/27 stacked)
    and the same 4-axis text ids."""
    assert families.of_folder(flux2_folder) is families.FLUX2
    transformer = flux2_weights.load_transformer(os.path.join(flux2_folder, "transformer"))
    assert transformer.cfg == f2.Flux2Config.preset("tiny")
    vae = flux2_weights.load_autoencoder(os.path.join(flux2_folder, "vae"))
    assert vae.cfg == f2.Flux2AutoEncoderConfig.preset("tiny")
    pipe = Flux2KleinPipeline.from_pretrained(flux2_folder, local_files_only=True)
    prompts, T = ["a cat", "two dogs on a mat, one asleep, under a very long and winding sentence that gets cut"], 40
    embeds, ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=T)
    text = f2.Qwen3Conditioner.from_folder(flux2_folder, torch.float32, max_length=T)
    txt = text(prompts)
    assert txt.shape == (2, T, 3 * 16) and torch.equal(txt, embeds)
    assert all(torch.equal(row.float(), f2.text_ids(T)) for row in ids)
    assert not torch.equal(txt[0], txt[1])
