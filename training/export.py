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
its base in memory (the model once, in the export's dtype; float32 for fp8, rounded once).

An export never writes over what it reads, nor into a run's checkpoint; it holds its output folder's lock
(util.RunLock) while it writes, so that a second export to the same place is refused; SIGTERM / SIGINT stop it
before its next tensor with its temporary file removed (util.Stopped), and the temporary file of an export that was
killed is removed by the next one to the same output."""

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn
from tqdm import tqdm

import families
from common.bounds import LORA_RANK
from common.util import (
    InputError,
    RunLock,
    Stopped,
    StopSignals,
    check_folder,
    check_writable,
    write_json,
    written,
)
from flux2_model import Flux2Config
from flux_model import FluxConfig
from training import checkpoints
from weights import flux_weights, lora
from weights.tensor_files import write_safetensors

FORMATS = ("bfl", "fp8", "lora", "merged")
FULL_FILE = "diffusion_pytorch_model.safetensors"
FOLDER_FORMATS = ("lora", "merged")  # --out is a folder; bfl and fp8 write one file
DEMO = "demo"  # --base demo: the tiny demo's base transformer, built in code as `train` without --flux builds it

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
        return families.of_config(self.cfg)


def open_weights(path, cfg=None, family=None):
    """The Weights of a diffusers `transformer/` folder or a single file (diffusers or BFL keys, any float dtype),
    memory-mapped: keys and shapes checked now, each tensor read (and upcast) when asked for."""
    family = family or families.of_transformer(path)
    cfg, links, sources = family.sources(path, cfg)
    # keys, shapes
    meta = flux_weights.load_into(lambda: family.model(cfg), links, sources, path, torch.float32, "meta")
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    by_ours = {}
    for link in links:
        by_ours.setdefault(link.ours, []).append(link)

    def read(key):
        state = {key: torch.empty(shapes[key])}
        flux_weights.copy_linked(state, by_ours[key], sources, path)
        return state[key]

    return Weights(cfg, shapes, read, path)


def in_memory(model, where="memory"):
    """The Weights of a model in memory (a merged LoRA checkpoint, the demo's base)."""
    state = model.state_dict()
    return Weights(model.cfg, {k: tuple(v.shape) for k, v in state.items()}, lambda k: state[k].float(), where)


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
        raise InputError(f"{what} needs --base, the model the checkpoint was trained from (a diffusers FLUX.1 or "
                         f"FLUX.2 folder, or its BFL single file: flux1-dev.safetensors, flux-2-klein-4b.safetensors; "
                         f"--base demo for a checkpoint of the tiny demo, `train` without --flux)")
    sub = os.path.join(base, "transformer")
    return sub if os.path.isdir(sub) else base


def demo_bases(family=None):
    """--base demo: each tiny demo's base transformer (of `family`, or of every family), float32, built or read as
    `train` without --flux starts from it (the family's tiny_frozen_parts), what a demo checkpoint was trained from."""
    for fam in [family] if family else families.FAMILIES:
        for demo in fam.demos:
            *_, load = fam.tiny_frozen_parts("cpu", torch.float32, demo)
            yield load("cpu")


def demo_base(like):
    """The tiny demo base of the checkpoint `like` (Weights): the one of its family with its shapes (else the
    family's first, which open_base then finds the first differing tensor of)."""
    bases = list(demo_bases(like.family))
    return next((b for b in bases if in_memory(b).shapes == like.shapes), bases[0])


def lora_demo_base(lora_file):
    """The tiny demo base transformer that a LoRA file adapts (its layers and shapes, checked on the meta device): a
    LoRA checkpoint names no family or demo of its own."""
    for model in demo_bases():
        with torch.device("meta"):
            meta = type(model)(model.cfg)
        try:
            lora.merge_lora(meta, lora_file)
        except InputError:
            continue
        return model
    raise InputError(f"{lora_file}: adapts no tiny demo transformer (FLUX.1's, FLUX.2's): --base demo is for a "
                     f"checkpoint of `srpo.py train` without --flux")


def open_base(base, like, what):
    """The base's Weights, checked against the checkpoint's (`like`) key by key: a base of another model (other
    widths, depths, no guidance embedding) is one line naming the first tensor that differs."""
    if base == DEMO:
        weights, path = in_memory(demo_base(like), "the tiny demo's base"), "--base demo"
    else:
        path = base_transformer(base, what)
        family = families.of_transformer(path)
        if family is not like.family:
            raise InputError(f"{path}: a {family.title} transformer, but the checkpoint {like.where} is "
                             f"{like.family.title}: not the checkpoint's base model")
        weights = open_weights(path, None if os.path.isdir(path) else like.cfg, family)
    for key in [*like.shapes, *(k for k in weights.shapes if k not in like.shapes)]:  # in the model's order
        theirs, ours = weights.shapes.get(key), like.shapes.get(key)
        if theirs != ours:
            raise InputError(f"{path}: {key} has shape {list(theirs) if theirs else 'none'} but the checkpoint "
                             f"{like.where}'s is {list(ours) if ours else 'none'}: not the checkpoint's base model")
    return weights


def merged_model(checkpoint, base, dtype, device="cpu"):
    """A LoRA checkpoint merged into its base as `sample --lora` does (lora.merge_lora, in dtype, on device): the
    model."""
    lora_file = os.path.join(checkpoint, lora.LORA_FILE)
    if base == DEMO:
        return lora.merge_lora(lora_demo_base(lora_file).to(device, dtype), lora_file)
    path = base_transformer(base, f"{checkpoint}: a LoRA checkpoint")
    # a single file's config: FLUX.1-dev's, FLUX.2's read off it
    model = families.of_transformer(path).load(path, None, dtype, device)
    return lora.merge_lora(model, lora_file)


def checkpoint_weights(checkpoint, base, dtype, device="cpu"):
    """The fine-tuned weights of a checkpoint, full (read lazily) or LoRA (merged into base in memory, on device)."""
    if checkpoint_kind(checkpoint) == "lora":
        return in_memory(merged_model(checkpoint, base, dtype, device))
    return open_weights(checkpoint)


def within(path, folder):
    """Whether path is folder or lies inside it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def run_checkpoint_of(path):
    """The checkpoint folder of a run (one checkpoints.complete lists: checkpoint-N holding state.json) that the
    real path is or lies in, or None."""
    while path != os.path.dirname(path):
        parent = os.path.dirname(path)
        if os.path.basename(path).startswith("checkpoint-") and os.path.isdir(parent) \
                and path in checkpoints.complete(parent).values():
            return path
        path = parent
    return None


def check_out(checkpoint, to, out, base):
    """Before anything is read: --out is not what the export reads (the checkpoint, --base), inside it or, for a
    folder, around it, nor in a run's checkpoint folder, where train --resume would take it for the run's own."""
    target, folder_out = os.path.realpath(out), to in FOLDER_FORMATS
    for flag, given in [("the checkpoint", checkpoint), ("--base", None if base == DEMO else base)]:
        if given is None:
            continue
        source = os.path.realpath(given)
        if within(target, source) or (folder_out and within(source, target)):
            where = "is" if target == source else "lies inside" if within(target, source) else "holds"
            raise InputError(f"--out {out} {where} {flag} {given}: an export never writes over what it reads, give "
                             f"another --out")
    found = run_checkpoint_of(target)
    if found:
        raise InputError(f"--out {out} lies in the checkpoint {found} of a run (its state.json): `train --resume` "
                         f"would take what is written there for the run's own, give another --out")


@contextlib.contextmanager
def output_folder(out, to):
    """The folder an export writes into, checked before anything is read (a read-only or full file system is one
    line, exit 2): a single file's, which must exist (a mistyped path is not made a folder), or --out for lora and
    merged, made if missing and removed again if the export does not complete (no empty folder left behind)."""
    if to not in FOLDER_FORMATS:
        if os.path.isdir(out):
            raise InputError(f"{out}: a folder (expected the path of the .safetensors file to write)")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise InputError(f"{out}: cannot write there, no folder {folder} (make it first)")
        check_room(folder)
        yield folder
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: a file, but --to {to} writes a folder: give a folder's path")
    made = not os.path.exists(out)
    try:
        check_room(out)
        yield out
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_room(folder):
    """util.check_writable (made if missing, a file created in it), and a block free: on a file system with none
    left even the folder's lock could not be written."""
    check_writable(folder)
    if os.statvfs(folder).f_bavail == 0:
        raise InputError(f"{folder}: cannot write the output folder ({os.strerror(errno.ENOSPC)})")


def remove_stale(paths):
    """The temporary files (util.atomic_write's PATH.tmp) of an export that was killed before it renamed them: with
    the folder's lock held, no live export is writing them. Each removed with a note."""
    for path in paths:
        tmp = path + ".tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
            print(f"note: {tmp}: removed the partial file of an export that did not finish", file=sys.stderr)


def check_stop(signals, out):
    """After SIGTERM / SIGINT (util.StopSignals: it only notes the signal), the export stops before its next tensor or
    layer: util.Stopped (exit 75) unwinds through atomic_write, which removes the temporary file, and output_folder."""
    if signals is not None and signals.received:
        raise Stopped(f"{signals.received}: the export to {out} stopped before it completed; nothing of it is left "
                      f"(a file there before is as it was): run the same command again")


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
        model = families.of_config(cfg).model(cfg)
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))}


def export_metadata(weights, checkpoint, layout, dtype):
    """The header of an export: what it is, whence, and the diffusers config that rebuilds its shapes."""
    return {"format": "pt", "model": f"{weights.family.title} transformer", "layout": layout, "dtype": dtype,
            "source": os.path.normpath(checkpoint), "exported_by": "srpo.py export",
            "config": json.dumps(weights.family.to_diffusers(weights.cfg))}


def in_range(weights, narrow, dtype, instead, device="cpu"):
    """make(key) for write_safetensors: the tensor on the host, a key of `narrow` cast to dtype on `device` and
    refused in one line naming it and its largest magnitude when it lies beyond dtype's range. The check is torch's
    own cast, held to round-to-nearest: every element within half an ulp of dtype's largest value (448 for
    float8_e4m3fn, to which values up to 464 round; 65504 for float16, values below 65520). Beyond it the cast
    writes inf (float16) or saturates to the largest value (float8_e4m3fn in torch 2.14; NaN before): wrong weights."""
    info = torch.finfo(dtype)
    half_ulp = info.eps * 2 ** math.floor(math.log2(info.max)) / 2  # at the top of the range: 16 for both

    def make(key):
        t = weights.read(key).to(device)
        if key not in narrow:  # cast by write_safetensors to its own dtype
            return t.cpu()
        cast = t.to(dtype)
        if not (cast.float() - t).abs().max() <= half_ulp:  # NaN and inf fail too
            raise InputError(f"{weights.where}: {key} holds {t.abs().max().item():.4g}, beyond {str(dtype)[6:]}'s "
                             f"range (+-{info.max:g}): {instead}")
        return cast.cpu()

    return make


def to_bfl(checkpoint, out, base=None, dtype=torch.bfloat16, signals=None):
    """checkpoint -> out, one .safetensors file in BFL's names (no prefix), every tensor in dtype (bf16: the released
    models' own; float16's range, +-65504, is checked tensor by tensor). A LoRA checkpoint is merged into base
    first. -> out."""
    weights = checkpoint_weights(checkpoint, base, dtype)
    specs = [(k, shape, dtype) for k, shape in weights.shapes.items()]
    layout = f"BFL ({weights.family.bfl})"
    narrow = set(weights.shapes) if dtype == torch.float16 else set()  # bf16 has float32's range
    make = in_range(weights, narrow, dtype, "export it in bfloat16 (the default) or float32")
    return write_safetensors(out, specs, make, export_metadata(weights, checkpoint, layout, str(dtype)[6:]),
                             functools.partial(check_stop, signals, out))


def to_fp8(checkpoint, out, base=None, signals=None, device="cpu"):
    """checkpoint -> out in BFL's names, fp8_keys(cfg) in float8_e4m3fn (round to nearest, no scales: FLUX's
    weights lie well inside e4m3fn's +-448, and one beyond it is refused; cast and checked on `device`), the rest
    bf16. A LoRA checkpoint is merged into base first, in float32 on `device`, so that each merged weight is rounded
    once, fp32 -> fp8 (a bf16 merge would round it twice). -> out."""
    weights = checkpoint_weights(checkpoint, base, torch.float32, device)
    low = fp8_keys(weights.cfg)
    specs = [(k, shape, torch.float8_e4m3fn if k in low else torch.bfloat16) for k, shape in weights.shapes.items()]
    layout = "BFL names; block linear weights float8_e4m3fn (plain casts, no scales), the rest bfloat16"
    make = in_range(weights, low, torch.float8_e4m3fn, "export it with --to bfl", device)
    return write_safetensors(out, specs, make, export_metadata(weights, checkpoint, layout, "float8_e4m3fn"),
                             functools.partial(check_stop, signals, out))


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


def extract_lora(finetuned, base, rank, out, device="cpu", signals=None):
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
        check_stop(signals, out)
        key = f"{layer}.weight"
        delta = (ft.read(key) - bw.read(key)).to(device)
        a, b, spectra[layer] = (t.cpu() for t in svd_lora(delta, rank))
        adapters[f"{layer}.lora_A"], adapters[f"{layer}.lora_B"] = a, b
    if not any(s2.sum() > 0 for s2 in spectra.values()):  # else the table would say it "keeps 100 %" of nothing
        raise InputError(f"{finetuned}: no difference from the base {base} in any layer a LoRA adapts, so there is "
                         f"no LoRA to extract (is --base the checkpoint itself?)")
    path = written(os.path.join(out, lora.LORA_FILE), lambda: lora.save_lora(adapters, ft.cfg, 1.0, out))
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


def merge(checkpoint, base, out, dtype=torch.bfloat16, signals=None):
    """A LoRA checkpoint folded into its base, W + B A (lora.merge_lora, what `sample --lora` does, in dtype),
    written as a diffusers transformer folder (diffusers' keys along the family's links, config.json), a tensor at a
    time. Peak memory: the model once in dtype. -> the weights file's path."""
    if checkpoint_kind(checkpoint) != "lora":
        raise InputError(f"{checkpoint}: a full checkpoint: its {FULL_FILE} is already the merged model")
    model = merged_model(checkpoint, base, dtype)
    family = families.of_config(model.cfg)
    theirs = flux_weights.to_theirs(model.state_dict(), family.links(model.cfg))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FULL_FILE)
    write_safetensors(path, [(k, t.shape, t.dtype) for k, t in theirs.items()], lambda k: theirs[k].contiguous(),
                      {"format": "pt"}, functools.partial(check_stop, signals, path))
    config = os.path.join(out, "config.json")
    written(config, lambda: write_json(config, family.to_diffusers(model.cfg)))
    return path


def outputs(to, out):
    """The files an export writes."""
    if to not in FOLDER_FORMATS:
        return [out]
    return [os.path.join(out, lora.LORA_FILE)] if to == "lora" else [os.path.join(out, f) for f in (FULL_FILE,
                                                                                                  "config.json")]


def check_flags(to, rank, dtype):
    """The flags that go together, before any file is looked at."""
    if to not in FORMATS:
        raise InputError(f"unknown export format {to!r}: expected one of {', '.join(FORMATS)}")
    if rank is not None and to != "lora":
        raise InputError(f"a rank is for a LoRA export (--to lora), not --to {to}")
    if rank is None and to == "lora":
        raise InputError("a LoRA export needs its rank (--rank R)")
    if dtype is not None and to in ("fp8", "lora"):
        raise InputError(f"--dtype is for --to bfl and merged: --to {to} writes "
                         f"{'float8_e4m3fn and bfloat16' if to == 'fp8' else 'float32 (the SVD factors)'}")


@dataclass
class ExportConfig:
    """`srpo.py export`'s settings, each field with a help one of its flags (cli.py makes them as train's from
    srpo.TrainConfig; a field without a default is a flag that must be given); checkpoint is its CHECKPOINT."""

    checkpoint: str
    to: Annotated[str, "bfl: one safetensors file in BFL's names (ComfyUI, Forge, diffusers' from_single_file); fp8: "
                  "the same with float8_e4m3fn block weights; lora: a rank --rank LoRA extracted from (checkpoint - "
                  "base) by SVD; merged: a LoRA checkpoint folded into full weights (a diffusers transformer folder)"]
    out: Annotated[str, "the file (bfl, fp8) or folder (lora, merged) to write"]
    base: Annotated[str | None, "the model the checkpoint was trained from (a diffusers FLUX.1 or FLUX.2 folder, its "
                    "transformer/, or one file of it: BFL's flux1-dev.safetensors, flux-2-klein-4b.safetensors, or "
                    "one in diffusers keys), of the checkpoint's family; `demo`: the tiny demo's (a checkpoint of "
                    "`train` without --flux): needed by lora, merged and a LoRA checkpoint's bfl/fp8"] = None
    rank: Annotated[int | None, LORA_RANK, "--to lora: the rank R of the extracted LoRA (the energy table printed "
                    "after it helps choose)"] = None
    dtype: Annotated[str | None, "bfl and merged only: float32, bfloat16 (default, the released models') or "
                     "float16"] = None
    device: Annotated[str, "where lora's SVDs and fp8's LoRA merge and casts run: cpu, cuda or cuda:N"] = "cpu"


def export(checkpoint, to, out, base=None, rank=None, dtype=None, device="cpu"):
    """`srpo.py export`: checkpoint to one of FORMATS at out (bfl and merged in dtype, bfloat16 unless given),
    refused in one line before anything is read if --out is an input or in a run's checkpoint (check_out), holding
    the output folder's lock while it writes; a LoRA extraction prints its energy table. -> out's file (bfl, fp8) or
    weights file (lora, merged)."""
    check_flags(to, rank, dtype)
    check_out(checkpoint, to, out, base)
    dtype = dtype or torch.bfloat16
    with StopSignals() as signals, output_folder(out, to) as folder, RunLock(folder):
        remove_stale(outputs(to, out))
        if to == "bfl":
            return to_bfl(checkpoint, out, base, dtype, signals)
        if to == "fp8":
            return to_fp8(checkpoint, out, base, signals, device)
        if to == "merged":
            return merge(checkpoint, base, out, dtype, signals)
        report = extract_lora(checkpoint, base, rank, out, device, signals)
        print("\n".join(describe_lora(report, rank)))
        return report["path"]
