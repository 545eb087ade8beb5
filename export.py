"""A `srpo.py train` checkpoint as the files other tools run, for FLUX.1 and FLUX.2 (the family is the checkpoint's
config.json `_class_name`: FluxTransformer2DModel or Flux2Transformer2DModel; a --base of the other family is refused):

- bfl: one .safetensors file in black-forest-labs/flux's (flux2's) own parameter names (fused qkv; the keys of
  flux1-dev.safetensors, resp. flux-2-klein-4b.safetensors, which ComfyUI's "Load Diffusion Model" and Forge read),
  bf16 by default;
- fp8: the same file with every linear weight of the blocks in float8_e4m3fn, plain casts without scales (the layout
  of the community flux1-dev-fp8 files), the rest in bf16: half the size (12 GB for FLUX.1-dev);
- lora: a LoRA of rank R extracted from (fine-tuned - base) by truncated SVD, in the file `train --lora-rank` writes;
- merged: a LoRA checkpoint folded into its base, as a diffusers `transformer/` folder.

A checkpoint folder holds the whole transformer in diffusers keys (diffusion_pytorch_model.safetensors and
config.json) or a LoRA (lora.LORA_FILE). Single files are written one tensor at a time from the memory-mapped
checkpoint (write_safetensors), so memory holds one tensor, not the model; a LoRA checkpoint is first merged into
its base in memory (the model once, in the export's dtype)."""

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

import flux2_weights as f2w
import flux_weights as fw
import lora
from flux2_model import Flux2, Flux2Config
from flux_model import Flux, FluxConfig
from util import InputError, atomic_write, check_folder, read_json, write_json, written

FORMATS = ("bfl", "fp8", "lora", "merged")
FULL_FILE = "diffusion_pytorch_model.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float8_e4m3fn: "F8_E4M3"}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

# ----------------------------------------------------------------------------------------------------------------
# The two families


@dataclass(frozen=True)
class Family:
    """What an export needs of a model family: its transformer and config classes, its weights module's functions
    (transformer_sources, load_transformer, save_transformer, the key links to diffusers' names, the diffusers
    config) and what its BFL files are."""
    name: str
    model: type
    config: type
    sources: Callable
    load: Callable
    save: Callable
    links: Callable
    to_diffusers: Callable
    bfl: str


FAMILIES = {
    "FluxTransformer2DModel": Family("FLUX.1", Flux, FluxConfig, fw.transformer_sources, fw.load_transformer,
                                     fw.save_transformer, fw.transformer_links, fw.flux_config_to_diffusers,
                                     "black-forest-labs/flux parameter names, as flux1-dev.safetensors"),
    "Flux2Transformer2DModel": Family("FLUX.2", Flux2, Flux2Config, f2w.transformer_sources, f2w.load_transformer,
                                      f2w.save_transformer, f2w.transformer_links, f2w.config_to_diffusers,
                                      "black-forest-labs/flux2 parameter names, as flux-2-klein-4b.safetensors")}
FLUX2_KEYS = ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight")  # BFL's, diffusers'


def family_of(path):
    """The Family of a transformer: a folder's config.json `_class_name` (as diffusers writes it), a single file's
    keys (FLUX.2's shared single_stream_modulation in BFL's or diffusers' names, BFL's maybe prefixed: all-in-one)."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        name = read_json(config).get("_class_name") if os.path.isfile(config) else None
        if name not in FAMILIES:
            raise InputError(f"{config}: _class_name {name!r} is not a FLUX transformer's (expected "
                             f"{' or '.join(FAMILIES)})")
        return FAMILIES[name]
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    keys = fw.read_sources([path])
    flux2 = any(k in keys or fw.BFL_PREFIX + k in keys for k in FLUX2_KEYS)  # FLUX.2's shared modulation: no FLUX.1
    return FAMILIES["Flux2Transformer2DModel" if flux2 else "FluxTransformer2DModel"]


def family_of_config(cfg):
    """The Family of a model's config: FLUX.2's for a Flux2Config, else FLUX.1's (a FluxConfig)."""
    return FAMILIES["Flux2Transformer2DModel" if isinstance(cfg, Flux2Config) else "FluxTransformer2DModel"]


# ----------------------------------------------------------------------------------------------------------------
# Reading: a checkpoint or a base, one tensor at a time by our (BFL) name


@dataclass
class Weights:
    """A FLUX transformer's tensors by our (BFL) name: read(key) gives one, in float32, when it is needed."""
    cfg: FluxConfig | Flux2Config
    shapes: dict
    read: Callable
    where: str

    @property
    def family(self):
        return family_of_config(self.cfg)


def open_weights(path, cfg=None, family=None):
    """The Weights of a diffusers `transformer/` folder or a single file (diffusers or BFL keys, any float dtype),
    memory-mapped: keys and shapes checked now, each tensor read (and upcast) when asked for."""
    family = family or family_of(path)
    cfg, links, sources = family.sources(path, cfg)
    meta = fw.load_into(lambda: family.model(cfg), links, sources, path, torch.float32, "meta")  # keys, shapes
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    by_ours = {}
    for link in links:
        by_ours.setdefault(link.ours, []).append(link)

    def read(key):
        state = {key: torch.empty(shapes[key])}
        fw.copy_linked(state, by_ours[key], sources, path)
        return state[key]

    return Weights(cfg, shapes, read, path)


def in_memory(model):
    """The Weights of a model in memory (a merged LoRA checkpoint)."""
    state = model.state_dict()
    return Weights(model.cfg, {k: tuple(v.shape) for k, v in state.items()}, lambda k: state[k].float(), "memory")


def checkpoint_kind(folder):
    """"full" (diffusion_pytorch_model.safetensors, as flux_weights.save_transformer writes it) or "lora"."""
    check_folder(folder, "a checkpoint folder of srpo.py train")
    if os.path.isfile(os.path.join(folder, lora.LORA_FILE)):
        return "lora"
    if os.path.isfile(os.path.join(folder, FULL_FILE)):
        return "full"
    raise InputError(f"{folder}: neither a full checkpoint ({FULL_FILE} and config.json) nor a LoRA one "
                     f"({lora.LORA_FILE})")


def base_transformer(base, what):
    """The transformer of --base: a diffusers FLUX.1 folder's transformer/, a transformer folder, or a single file."""
    if base is None:
        raise InputError(f"{what} needs the base model the checkpoint was trained from (a diffusers FLUX.1 or FLUX.2 "
                         f"folder, or its BFL single file: flux1-dev.safetensors, flux-2-klein-4b.safetensors)")
    sub = os.path.join(base, "transformer")
    return sub if os.path.isdir(sub) else base


def open_base(base, like, what):
    """The base's Weights, checked against the checkpoint's (`like`) key by key: a base of another model (other
    widths, depths, no guidance embedding) is one line naming the first tensor that differs."""
    path = base_transformer(base, what)
    family = family_of(path)
    if family != like.family:
        raise InputError(f"{path}: a {family.name} transformer, but the checkpoint {like.where} is "
                         f"{like.family.name}: not the checkpoint's base model")
    weights = open_weights(path, None if os.path.isdir(path) else like.cfg, family)
    for key in [*like.shapes, *(k for k in weights.shapes if k not in like.shapes)]:  # in the model's order
        theirs, ours = weights.shapes.get(key), like.shapes.get(key)
        if theirs != ours:
            raise InputError(f"{path}: {key} has shape {list(theirs) if theirs else 'none'} but the checkpoint "
                             f"{like.where}'s is {list(ours) if ours else 'none'}: not the checkpoint's base model")
    return weights


def merged_model(checkpoint, base, dtype):
    """A LoRA checkpoint merged into its base as `sample --lora` does (lora.merge_lora, in dtype): the model."""
    path = base_transformer(base, f"{checkpoint}: a LoRA checkpoint")
    model = family_of(path).load(path, None, dtype)  # a single file's config: FLUX.1-dev's, FLUX.2's read off it
    return lora.merge_lora(model, os.path.join(checkpoint, lora.LORA_FILE))


def checkpoint_weights(checkpoint, base, dtype):
    """The fine-tuned weights of a checkpoint, full (read lazily) or LoRA (merged into base in memory)."""
    if checkpoint_kind(checkpoint) == "lora":
        return in_memory(merged_model(checkpoint, base, dtype))
    return open_weights(checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# Writing a safetensors file one tensor at a time


def write_safetensors(path, specs, make, metadata):
    """Write path as safetensors from specs = [(name, shape, dtype)], calling make(name) for each tensor just
    before its bytes are written, so memory holds one tensor at a time (safetensors' own save_file needs them all).
    The format (huggingface/safetensors, "Format"): an 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded with spaces to a multiple of 8, then
    the tensors' bytes back to back. Wider dtypes come first, as safetensors' writer orders them, so every tensor
    starts at a multiple of its item size. Written atomically (temp file, then rename)."""
    specs = sorted(specs, key=lambda s: -s[2].itemsize)
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp):
        with open(tmp, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, shape, dtype in specs:
                t = make(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):  # the header is written: a wrong size would corrupt the file
                    raise ValueError(f"{name}: made {list(t.shape)}, the header says {list(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the host's byte order: little-endian
                bar.update(t.numel() * dtype.itemsize)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written(path, lambda: atomic_write(path, write))
    return path


def check_file_out(out):
    """A single-file export's --out names a file in a folder that exists (a mistyped path is not made a folder)."""
    if os.path.isdir(out):
        raise InputError(f"{out}: a folder (expected the path of the .safetensors file to write)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"{out}: cannot write there, no folder {folder} (make it first)")


# ----------------------------------------------------------------------------------------------------------------
# bfl and fp8: single files in BFL's names


def fp8_keys(cfg):
    """The weights an fp8 export stores in float8_e4m3fn: every nn.Linear weight inside the double and single
    blocks (attention, MLP, and FLUX.1's per-block modulation), 99.4% of FLUX.1-dev's parameters, 95.0% of FLUX.2
    [klein] 4B's (96.1% of 9B's). The rest stays bf16: the input embedders (img_in, txt_in, time_in, vector_in,
    guidance_in) and the final layer, which touch the raw inputs and the predicted velocity; FLUX.2's three shared
    modulations (4.1% of klein 4B), whose error every block would share; biases, added to outputs as they are; the
    RMSNorm scales of q and k, which multiply the attention logits. e4m3fn keeps 3 mantissa bits (a relative
    rounding error of up to 1/16), too coarse there."""
    with torch.device("meta"):
        model = family_of_config(cfg).model(cfg)
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))}


def export_metadata(weights, checkpoint, layout, dtype):
    """The header of an export: what it is, whence, and the diffusers config that rebuilds its shapes."""
    return {"format": "pt", "model": f"{weights.family.name} transformer", "layout": layout, "dtype": dtype,
            "source": os.path.normpath(checkpoint), "exported_by": "srpo.py export",
            "config": json.dumps(weights.family.to_diffusers(weights.cfg))}


def to_bfl(checkpoint, out, base=None, dtype=torch.bfloat16):
    """checkpoint -> out, one .safetensors file in BFL's names (no prefix), every tensor in dtype (bf16: the released
    models' own). A LoRA checkpoint is merged into base first. -> out."""
    check_file_out(out)
    weights = checkpoint_weights(checkpoint, base, dtype)
    specs = [(k, shape, dtype) for k, shape in weights.shapes.items()]
    layout = f"BFL ({weights.family.bfl})"
    return write_safetensors(out, specs, weights.read, export_metadata(weights, checkpoint, layout, str(dtype)[6:]))


def to_fp8(checkpoint, out, base=None):
    """checkpoint -> out in BFL's names, fp8_keys(cfg) in float8_e4m3fn (round to nearest, no scales: FLUX's
    weights lie well inside e4m3fn's +-448, and one beyond it is refused), the rest bf16. A LoRA checkpoint is merged
    into base (in bf16) first. -> out."""
    check_file_out(out)
    weights = checkpoint_weights(checkpoint, base, torch.bfloat16)
    low = fp8_keys(weights.cfg)
    specs = [(k, shape, torch.float8_e4m3fn if k in low else torch.bfloat16) for k, shape in weights.shapes.items()]
    layout = "BFL names; block linear weights float8_e4m3fn (plain casts, no scales), the rest bfloat16"

    def make(key):
        t = weights.read(key)
        if key in low and t.abs().max() > FP8_MAX:  # the cast would make NaN: e4m3fn has no infinity
            raise InputError(f"{weights.where}: {key} holds {t.abs().max().item():.4g}, beyond float8_e4m3fn's "
                             f"range (+-{FP8_MAX:g}): export it with --to bfl")
        return t

    return write_safetensors(out, specs, make, export_metadata(weights, checkpoint, layout, "float8_e4m3fn"))


# ----------------------------------------------------------------------------------------------------------------
# lora: extracted from a full fine-tune by truncated SVD; merged: a LoRA folded into its base


def lora_layers(cfg):
    """Our names of the layers `train --lora-rank` adapts (lora.DOUBLE_TARGETS, SINGLE_TARGETS)."""
    return ([f"double_blocks.{i}.{t}" for i in range(cfg.depth) for t in lora.DOUBLE_TARGETS]
            + [f"single_blocks.{i}.{t}" for i in range(cfg.depth_single_blocks) for t in lora.SINGLE_TARGETS])


def energy(spectra, rank):
    """The share of the squared Frobenius norm of the differences that rank r keeps, over a list of layers' s^2:
    sum_layers sum_{i<=r} s_i^2 / sum_layers sum_i s_i^2 (Eckart-Young: the best rank-r approximation leaves
    exactly the rest). 1 where nothing changed."""
    total = sum(s2.sum().item() for s2 in spectra)
    return sum(s2[:rank].sum().item() for s2 in spectra) / total if total > 0 else 1.0


def svd_lora(delta, rank):
    """(A, B) with B A the best rank-r approximation of delta (out, in): delta = U S V^T, B = U_r S_r, A = V_r^T.
    A gets orthonormal rows and B the singular values; the file stores no alpha, so scale 1. -> (A, B, s^2)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous(), s.double().square()


def check_rank(rank, weights, layers):
    """Before any SVD: 1 <= rank <= min(out, in) of every adapted layer."""
    for layer in layers:
        out_features, in_features = weights.shapes[f"{layer}.weight"]
        if not 1 <= rank <= min(out_features, in_features):
            raise InputError(f"rank {rank}: {layer}.weight is {out_features} x {in_features}, so the rank must be "
                             f"between 1 and {min(out_features, in_features)}")


def largest_untargeted(finetuned, base, layers):
    """(key, max |fine-tuned - base|) over the tensors a LoRA of these layers leaves out (biases, norms,
    modulations, embedders, final layer): what the extracted LoRA cannot carry. (None, 0.0) if none changed."""
    targeted, worst = {f"{layer}.weight" for layer in layers}, (None, 0.0)
    for key in finetuned.shapes:
        if key not in targeted:
            diff = (finetuned.read(key) - base.read(key)).abs().max().item()
            worst = max(worst, (key, diff), key=lambda p: p[1])
    return worst


def extract_lora(finetuned, base, rank, out, device="cpu"):
    """A LoRA of rank `rank` from a full checkpoint and its base: per adapted layer (our fused qkv / linear1 as one
    matrix, the layout of `train --lora-rank`), the truncated SVD of (W_ft - W_base) in float32 on device, written
    to out/pytorch_lora_weights.safetensors by lora.save_lora. -> {"path", "energy": {layer: kept}, "overall",
    "table": {r: overall kept at rank r}, "untargeted": (key, max abs difference)}."""
    if checkpoint_kind(finetuned) == "lora":
        raise InputError(f"{finetuned}: a LoRA checkpoint already: its {lora.LORA_FILE} is the LoRA")
    ft = open_weights(finetuned)
    bw = open_base(base, ft, f"{finetuned}: extracting a LoRA")
    layers = lora_layers(ft.cfg)
    check_rank(rank, ft, layers)
    adapters, spectra = {}, {}
    for layer in tqdm(layers, desc="SVD", unit="layer"):
        key = f"{layer}.weight"
        delta = (ft.read(key) - bw.read(key)).to(device)
        a, b, spectra[layer] = (t.cpu() for t in svd_lora(delta, rank))
        adapters[f"{layer}.lora_A"], adapters[f"{layer}.lora_B"] = a, b
    path = lora.save_lora(adapters, ft.cfg, 1.0, out)
    widest = max(len(s2) for s2 in spectra.values())
    table = {r: energy(spectra.values(), r) for r in sorted({2 ** i for i in range(2, 10) if 2 ** i < widest} | {rank})}
    return {"path": path, "energy": {layer: energy([s2], rank) for layer, s2 in spectra.items()},
            "overall": table[rank], "table": table, "untargeted": largest_untargeted(ft, bw, layers)}


def describe_lora(report, rank):
    """The lines `export --to lora` prints: energy kept overall for a few ranks, the worst layers, what is left out."""
    lines = [f"{report['path']}: rank {rank} keeps {report['overall']:.2%} of the fine-tune's squared difference "
             f"(sum of s_i^2 over i <= r / all, per layer's SVD)", "rank  energy kept (all adapted layers)"]
    lines += [f"{r:>4}  {e:.2%}{'  <-' if r == rank else ''}" for r, e in report["table"].items()]
    worst = sorted(report["energy"].items(), key=lambda p: p[1])[:3]
    lines.append("least kept: " + ", ".join(f"{layer} {e:.2%}" for layer, e in worst))
    key, diff = report["untargeted"]
    lines.append(f"left out (not LoRA layers): largest difference {diff:.3g} in {key}" if key else
                 "left out (not LoRA layers): nothing, they equal the base")
    return lines


def merge(checkpoint, base, out, dtype=torch.bfloat16):
    """A LoRA checkpoint folded into its base, W + B A (lora.merge_lora, what `sample --lora` does, in dtype),
    written as a diffusers transformer folder (diffusers' keys along the family's links, config.json), a tensor at a
    time. Peak memory: the model once in dtype. -> the weights file's path."""
    if checkpoint_kind(checkpoint) != "lora":
        raise InputError(f"{checkpoint}: a full checkpoint: its {FULL_FILE} is already the merged model")
    model = merged_model(checkpoint, base, dtype)
    family = family_of_config(model.cfg)
    theirs = fw.to_theirs(model.state_dict(), family.links(model.cfg))
    os.makedirs(out, exist_ok=True)
    path = write_safetensors(os.path.join(out, FULL_FILE), [(k, t.shape, t.dtype) for k, t in theirs.items()],
                             lambda k: theirs[k].contiguous(), {"format": "pt"})
    write_json(os.path.join(out, "config.json"), family.to_diffusers(model.cfg))
    return path


def export(checkpoint, to, out, base=None, rank=None, dtype=torch.bfloat16, device="cpu"):
    """`srpo.py export`: checkpoint to one of FORMATS at out; a LoRA extraction prints its energy table. -> out's
    file (bfl, fp8) or weights file (lora, merged)."""
    if to not in FORMATS:
        raise InputError(f"unknown export format {to!r}: expected one of {', '.join(FORMATS)}")
    if rank is not None and to != "lora":
        raise InputError(f"a rank is for a LoRA export (--to lora), not --to {to}")
    if to == "bfl":
        return to_bfl(checkpoint, out, base, dtype)
    if to == "fp8":
        return to_fp8(checkpoint, out, base)
    if to == "merged":
        return merge(checkpoint, base, out, dtype)
    if rank is None:
        raise InputError("a LoRA export needs its rank (--rank R)")
    report = extract_lora(checkpoint, base, rank, out, device)
    print("\n".join(describe_lora(report, rank)))
    return report["path"]
