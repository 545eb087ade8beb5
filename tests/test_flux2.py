"""flux2_model.py and flux2_weights.py against diffusers (the independent reference), on random tiny models saved by
diffusers' own save_pretrained and read by our loaders.

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
from safetensors.torch import load_file

import flux2_model as f2
import flux2_weights as f2w
import flux_model as fm
import flux_weights as fw
from kernels import attention as attention_module
from kernels import rope as rope_module
from kernels.dispatch import INTERPRETED
from util import InputError

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
    ours = f2w.load_transformer(str(tmp_path))
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
    bfl = {k: v.clone() for k, v in f2w.load_transformer(str(tmp_path)).state_dict().items()}
    converted = single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers(bfl)
    expected = ref.state_dict()
    assert sorted(converted) == sorted(expected)
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k


def test_saved_transformer_loads_strictly_into_diffusers(tmp_path):
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ours = randomize(f2.Flux2(cfg), seed=5).eval()
    path = f2w.save_transformer(ours, str(tmp_path))
    ref = Flux2Transformer2DModel.from_pretrained(str(tmp_path)).eval()
    ref.load_state_dict(load_file(path), strict=True)
    x = transformer_inputs(cfg, height, width, T, B)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x, pipeline_ids(cfg, height, width, T, B))) <= TOL
    assert torch.equal(run_ours(f2w.load_transformer(str(tmp_path)), x), run_ours(ours, x))  # lossless round trip


@pytest.mark.parametrize("part", ["double qk rows", "final shift/scale"])
def test_wrong_weights_are_caught(part, tmp_path):
    """The parity tests can fail: q and k of one block's text stream swapped, or the final layer's shift and scale
    (the halves the links swap between BFL's and diffusers' order), change the output."""
    cfg, height, width, T, B = CONFIGS["3heads-guidance"]
    ref = diffusers_flux2_transformer(cfg)
    ref.save_pretrained(tmp_path)
    ours, h = f2w.load_transformer(str(tmp_path)), cfg.hidden_size
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
            ref = Flux2Transformer2DModel(**{k: v for k, v in f2w.config_to_diffusers(cfg).items()
                                             if not k.startswith("_")})
            ours = f2.Flux2(cfg)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in fw.to_theirs(ours.state_dict(), f2w.transformer_links(cfg)).items()} \
            == theirs, name
        assert round(sum(p.numel() for p in ours.parameters()) / 1e9) == billions, name
