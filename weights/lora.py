"""LoRA for the FLUX.1 and FLUX.2 transformers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"): a frozen linear layer W plus a trained low-rank update,

    y = W x + b + (alpha / r) B A x,    A (r, in), B (out, r), B = 0 at the start (the base model exactly)

on the attention projections and MLPs of every double and single block (FLUX.2's blocks have the same names; their
modulation is the model's, shared, and left out as FLUX.1's per-block one is). Files use the layout diffusers'
`FluxPipeline.load_lora_weights` and `Flux2KleinPipeline.load_lora_weights` read (PEFT's `lora_A` / `lora_B` on
diffusers module names, `transformer.` prefix), the names from the family's table of links: a fused projection of
ours that diffusers splits (a double block's qkv; FLUX.1's single-block linear1 = q, k, v and the MLP input, which
FLUX.2's diffusers model keeps fused as to_qkv_mlp_proj) is written as the separate layers, A copied and B split by
rows, which is exact: row i of B A depends on row i of B only."""

import math
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import families
from common.util import InputError, atomic_write, derive_seed
from weights import flux_weights

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
# Every linear layer of the blocks but the adaLN modulations (diffusers' FLUX LoRA scripts leave those out too). On
# FLUX.2 a superset of the default of diffusers' FLUX.2 [klein] DreamBooth LoRA script (to_q/k/v, to_out.0, the single
# blocks' to_qkv_mlp_proj and attn.to_out): the text stream's attention and both MLPs (ff.linear_in/out) too, as FLUX.1.
DOUBLE_TARGETS = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mlp.0", "txt_mlp.2")
SINGLE_TARGETS = ("linear1", "linear2")


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank update: y = W x + b + (alpha / r) B A x. W and b are the wrapped layer's own
    (frozen) parameters under their own names, so the base keys of the state dict do not change; A and B are fp32."""

    def __init__(self, base, rank, alpha, generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        device = base.weight.device
        # A as PEFT initialises it (kaiming_uniform_ with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn on the CPU
        # from the run's seed: the same adapters on any device and any number of processes
        bound = 1 / math.sqrt(self.in_features)
        a = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x):
        return super().forward(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_adapters(model, rank, alpha, seed):
    """Freeze the model and put a LoRALinear on every target layer of its blocks. -> the model."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(derive_seed(seed, "lora"))
    names = [f"double_blocks.{i}.{t}" for i in range(len(model.double_blocks)) for t in DOUBLE_TARGETS]
    names += [f"single_blocks.{i}.{t}" for i in range(len(model.single_blocks)) for t in SINGLE_TARGETS]
    for name in names:
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, LoRALinear(model.get_submodule(name), rank, alpha, g))
    return model


def weight_links(flux_cfg, key):
    """{name: [links]} of the transformer's weights, by our name (key="ours") or diffusers' (key="theirs")."""
    links = {}
    for link in families.of_config(flux_cfg).links(flux_cfg):
        if link.ours.endswith(".weight"):
            links.setdefault(getattr(link, key), []).append(link)
    return links


def diffusers_lora(adapters, flux_cfg, scale):
    """Our adapters ({layer.lora_A, layer.lora_B}) -> diffusers' keys, with (alpha / r) folded into B: the file
    then means scale 1, PEFT's convention when no alpha is stored (lora_alpha = r), and every loader applies ours."""
    by_ours = weight_links(flux_cfg, "ours")
    state = {}
    for key, a in adapters.items():
        if not key.endswith(".lora_A"):
            continue
        layer = key.removesuffix(".lora_A")
        b = adapters[f"{layer}.lora_B"] * scale
        for link in by_ours[f"{layer}.weight"]:
            theirs = "transformer." + link.theirs.removesuffix(".weight")
            state[f"{theirs}.lora_A.weight"] = a.clone()
            state[f"{theirs}.lora_B.weight"] = (b[slice(*link.ours_rows)] if link.ours_rows else b).contiguous()
    return state


def save_lora(adapters, flux_cfg, scale, folder):
    """folder/pytorch_lora_weights.safetensors, atomically. -> its path."""
    path = os.path.join(folder, LORA_FILE)
    state = diffusers_lora(adapters, flux_cfg, scale)
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return path


LORA_KEY = re.compile(r"(?:transformer\.)?(.+)\.(lora_A\.weight|lora_B\.weight|alpha)")


def read_lora(path):
    """{diffusers layer: {"lora_A.weight": A, "lora_B.weight": B, "alpha": a (optional)}} of a diffusers/PEFT
    FLUX LoRA file (keys transformer.LAYER.lora_A.weight, ...; a stored alpha means scale alpha / r)."""
    sources = flux_weights.read_sources([path])
    layers = {}
    for key, (handle, _) in sources.items():
        m = LORA_KEY.fullmatch(key)
        if not m or key.startswith(("text_encoder", "unet")):
            raise InputError(f"{path}: {key} is not a LoRA key of a FLUX transformer (expected "
                             f"transformer.LAYER.lora_A.weight and .lora_B.weight, as diffusers writes them)")
        layers.setdefault(m[1], {})[m[2]] = handle.get_tensor(key)
    if not layers:
        raise InputError(f"{path}: holds no tensors (expected a FLUX LoRA: transformer.LAYER.lora_A.weight, ...)")
    for layer, parts in layers.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise InputError(f"{path}: {layer} needs both lora_A.weight and lora_B.weight")
    return layers


@torch.no_grad()
def merge_lora(model, path, strength=1.0):
    """W += strength (alpha / r) B A for every layer of the file (ours or a diffusers/PEFT FLUX LoRA), merged once
    so that sampling costs nothing per step. Keys and shapes are checked first; on the meta device only that."""
    links, layers = weight_links(model.cfg, "theirs"), read_lora(path)
    params = dict(model.named_parameters())
    family_links = families.of_config(model.cfg).links(model.cfg)
    shapes = {k: v.shape for k, v in flux_weights.to_theirs(params, family_links).items()}
    for layer, parts in layers.items():
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        out_in = shapes.get(f"{layer}.weight")
        if out_in is None:
            raise InputError(f"{path}: {layer} is not a linear layer of this FLUX transformer")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(out_in):
            raise InputError(f"{path}: transformer.{layer}.lora_B.weight {list(b.shape)} x lora_A.weight "
                             f"{list(a.shape)} does not make the layer's {list(out_in)} weight")
    if next(model.parameters()).device.type == "meta":
        return model
    device = next(model.parameters()).device  # B A computed where the weights are (a GPU: no CPU matmuls)
    for layer, parts in layers.items():
        a, b = (parts[k].to(device, torch.float32) for k in ("lora_A.weight", "lora_B.weight"))
        scale = float(parts["alpha"]) / a.shape[0] if "alpha" in parts else 1.0
        delta = (strength * scale) * (b @ a)
        for link in links[f"{layer}.weight"]:
            w = params[link.ours]
            w = w[slice(*link.ours_rows)] if link.ours_rows else w
            d = delta[slice(*link.theirs_rows)] if link.theirs_rows else delta
            w.copy_((w.float() + d).to(w.dtype))
    return model
