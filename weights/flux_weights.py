"""FLUX.1 weights on disk: diffusers folders and BFL single files, read into and written from `flux_model`; the
machinery weights/flux2_weights.py reuses for FLUX.2.

One table of links per model (`transformer_links`, `autoencoder_links`) maps our module names, which follow
black-forest-labs/flux, to diffusers' keys; loading and saving both read it, so the two directions share a single
definition. Loading builds the model on the meta device, checks every key and shape first, then copies each tensor
from the memory-mapped files straight into its parameter, cast on the way (one copy of the weights in memory)."""

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from common.util import InputError, atomic_write, read_json, write_json
from flux_model import AutoEncoder, AutoEncoderConfig, Flux, FluxConfig
from weights.tensor_files import open_safetensors, shape_of

# ----------------------------------------------------------------------------------------------------------------
# Weights: one table of links per model maps our (BFL) names to diffusers names; loading reads the links one way,
# saving writes them the other way. A link says: rows ours_rows of our tensor are rows theirs_rows of theirs.


@dataclass(frozen=True)
class Link:
    ours: str
    theirs: str
    ours_rows: tuple = None
    theirs_rows: tuple = None
    conv1x1: bool = False  # ours is a (C, C, 1, 1) conv weight, theirs the (C, C) linear weight


def same(ours, theirs, params=("weight", "bias")):
    """One tensor per param, the same on both sides under two names."""
    return [Link(f"{ours}.{p}", f"{theirs}.{p}") for p in params]


def split(ours, parts, params=("weight", "bias")):
    """Rows of our fused tensor, in order, are their tensors `parts` = [(name, rows)] (e.g. q, k, v)."""
    links = []
    for p in params:
        start = 0
        for theirs, n in parts:
            links.append(Link(f"{ours}.{p}", f"{theirs}.{p}", (start, start + n)))
            start += n
    return links


def double_block_links(i, h):
    o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    links = [*same(f"{o}.img_mod.lin", f"{t}.norm1.linear"), *same(f"{o}.txt_mod.lin", f"{t}.norm1_context.linear"),
             *split(f"{o}.img_attn.qkv", [(f"{t}.attn.to_{x}", h) for x in "qkv"]),
             *split(f"{o}.txt_attn.qkv", [(f"{t}.attn.add_{x}_proj", h) for x in "qkv"])]
    for stream, sfx in [("img", ""), ("txt", "added_")]:
        for qk in ("query", "key"):
            links.append(Link(f"{o}.{stream}_attn.norm.{qk}_norm.scale", f"{t}.attn.norm_{sfx}{qk[0]}.weight"))
    links += [*same(f"{o}.img_attn.proj", f"{t}.attn.to_out.0"), *same(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")]
    for stream, ff in [("img", "ff"), ("txt", "ff_context")]:
        links += [*same(f"{o}.{stream}_mlp.0", f"{t}.{ff}.net.0.proj"), *same(f"{o}.{stream}_mlp.2", f"{t}.{ff}.net.2")]
    return links


def single_block_links(i, h, mlp_hidden):
    o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    links = [*same(f"{o}.modulation.lin", f"{t}.norm.linear"),
             *split(f"{o}.linear1", [(f"{t}.attn.to_{x}", h) for x in "qkv"] + [(f"{t}.proj_mlp", mlp_hidden)]),
             *same(f"{o}.linear2", f"{t}.proj_out")]
    return links + [Link(f"{o}.norm.{qk}_norm.scale", f"{t}.attn.norm_{qk[0]}.weight") for qk in ("query", "key")]


def transformer_links(cfg: FluxConfig):
    """BFL <-> diffusers names of every transformer tensor; split sizes from cfg (q, k, v are h rows each)."""
    h, links, tte = cfg.hidden_size, [], "time_text_embed"
    for ours, theirs in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                         ("guidance_in", "guidance_embedder")][: 3 if cfg.guidance_embed else 2]:
        links += [*same(f"{ours}.in_layer", f"{tte}.{theirs}.linear_1"),
                  *same(f"{ours}.out_layer", f"{tte}.{theirs}.linear_2")]
    links += [*same("txt_in", "context_embedder"), *same("img_in", "x_embedder")]
    for i in range(cfg.depth):
        links += double_block_links(i, h)
    for i in range(cfg.depth_single_blocks):
        links += single_block_links(i, h, cfg.mlp_hidden)
    links += same("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # BFL's adaLN rows are (shift, scale); diffusers' are (scale, shift)
        links.append(Link(f"final_layer.adaLN_modulation.1.{p}", f"norm_out.linear.{p}", (0, h), (h, 2 * h)))
        links.append(Link(f"final_layer.adaLN_modulation.1.{p}", f"norm_out.linear.{p}", (h, 2 * h), (0, h)))
    return links


AE_RENAMES = [  # (ours, diffusers) substring rules, applied in order
    ("nin_shortcut", "conv_shortcut"), (".block.", ".resnets."), ("downsample.", "downsamplers.0."),
    ("upsample.", "upsamplers.0."), ("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1"),
    ("mid.attn_1.norm", "mid_block.attentions.0.group_norm"),
    ("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0"), ("mid.attn_1.", "mid_block.attentions.0.to_"),
    ("norm_out", "conv_norm_out"), ("encoder.down.", "encoder.down_blocks."),
]


def autoencoder_links(model: AutoEncoder):
    """Our (BFL) autoencoder names <-> diffusers AutoencoderKL names; diffusers numbers decoder levels top-down."""
    n = len(model.cfg.ch_mult)
    links = []
    for key in model.state_dict():
        theirs = key
        for a, b in AE_RENAMES:
            theirs = theirs.replace(a, b)
        if theirs.startswith("decoder.up."):
            level, rest = theirs[len("decoder.up."):].split(".", 1)
            theirs = f"decoder.up_blocks.{n - 1 - int(level)}.{rest}"
        links.append(Link(key, theirs, conv1x1=".attentions.0.to_" in theirs and key.endswith("weight")))
    return links


def identity_links(model, prefix=""):
    return [Link(k, prefix + k) for k in model.state_dict()]


def by_ours(links):
    """{our name: its links}: what reading or writing one of our tensors alone needs (q, k, v: one fused tensor's)."""
    grouped = {}
    for link in links:
        grouped.setdefault(link.ours, []).append(link)
    return grouped


def to_theirs(state, links):
    """Our state dict -> theirs (views where possible: rows of a contiguous tensor need no copy)."""
    pieces = {}
    for link in links:
        t = state[link.ours]
        t = t[slice(*link.ours_rows)] if link.ours_rows else t
        pieces.setdefault(link.theirs, []).append((link.theirs_rows or (0, 0), t[..., 0, 0] if link.conv1x1 else t))
    return {k: v[0][1] if len(v) == 1 else torch.cat([t for _, t in sorted(v, key=lambda p: p[0])])
            for k, v in pieces.items()}


def read_sources(paths):
    """{key: handle} over one or more safetensors shards, opened lazily (memory-mapped, nothing read yet)."""
    sources = {}
    for path in paths:
        f = open_safetensors(path)
        sources.update(dict.fromkeys(f.keys(), (f, path)))  # noqa: SIM118 (safe_open is not iterable)
    return sources


def load_into(model_fn, links, sources, where, dtype, device):
    """Build model_fn() on the meta device, then fill each parameter straight from the mapped files, cast on the
    way, so memory holds one copy of the weights. Checks keys and shapes before reading any data, and each tensor's
    values as it is copied (finite)."""
    with torch.device("meta"):
        model = model_fn()
    expected = {k: tuple(v.shape) for k, v in to_theirs(model.state_dict(), links).items()}
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    if missing or unexpected:
        msg = [f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}" if missing else "",
               f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}" if unexpected else ""]
        raise InputError(f"{where}: " + "; ".join(m for m in msg if m))
    for key, shape in expected.items():
        got = shape_of(sources[key][0], key)
        if got != shape:
            raise InputError(f"{where}: {key} has shape {list(got)} but the config expects {list(shape)} "
                             f"(in {sources[key][1]})")
    if device == LAZY:
        return LazyState(model, links, sources, where, dtype)
    if torch.device(device).type == "meta":  # a dry run: keys and shapes checked, no weights read
        return model
    state = {k: allocated(v, dtype, device) for k, v in model.state_dict().items()}
    copy_linked(state, links, sources, where)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def allocated(like, dtype, device):
    """An empty tensor of like's shape in dtype on device; a counter (BatchNorm's num_batches_tracked) keeps its
    type."""
    return torch.empty(like.shape, dtype=dtype if like.is_floating_point() else like.dtype, device=device)


LAZY = "lazy"  # load_into's device for a LazyState: the weights read one tensor at a time, when asked


def held(model, dtype):
    """load(device) of a model already in memory (a tiny demo's): the model in dtype on device; LAZY: its state
    dict."""
    return lambda device: model.state_dict() if device == LAZY else model.to(device=device, dtype=dtype)


class LazyState(Mapping):
    """A model's state dict whose tensors are read from the mapped files when indexed, one at a time, on the CPU in
    dtype, and kept by no one here: a process streaming the weights into FSDP2's broadcast holds one tensor, not the
    model (runtime.stream_into). Keys and shapes were checked by load_into; values are checked as they are read."""

    def __init__(self, model, links, sources, where, dtype):
        self.meta, self.sources, self.where, self.dtype = model.state_dict(), sources, where, dtype
        self.links = by_ours(links)

    def __getitem__(self, key):
        state = {key: allocated(self.meta[key], self.dtype, "cpu")}
        copy_linked(state, self.links[key], self.sources, self.where)
        return state[key]

    def __iter__(self):
        return iter(self.meta)

    def __len__(self):
        return len(self.meta)


def copy_linked(state, links, sources, where):
    """Fill the tensors of state (ours, allocated) from the mapped files along links, cast to each one's dtype on the
    way (float8 files are upcast here), and check each tensor's values as it is copied (finite)."""
    for link in links:
        handle = sources[link.theirs][0]
        src = handle.get_slice(link.theirs)[slice(*link.theirs_rows)] if link.theirs_rows else \
            handle.get_tensor(link.theirs)  # whole, 0-dim ones (a BatchNorm's counter) included
        dst = state[link.ours][slice(*link.ours_rows)] if link.ours_rows else state[link.ours]
        dst.copy_(src[..., None, None] if link.conv1x1 else src)
        if not torch.isfinite(dst).all():  # after the cast: a value too large for dtype is caught too
            raise InputError(f"{where}: {link.theirs} has NaN or infinite values in {str(dst.dtype)[6:]} (in "
                             f"{sources[link.theirs][1]}): a damaged file, a diverged run's, or values beyond the "
                             f"dtype's range; use another file")


def weight_files(folder):
    """The safetensors shard paths of a diffusers model folder (sharded with an index, or one file)."""
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: expected a non-empty weight_map object of key -> shard file")
        shards = sorted(set(map(str, weight_map.values())))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(single):
        raise InputError(f"{folder}: no diffusion_pytorch_model.safetensors (or its .index.json)")
    return [single]


def flux_config_from_diffusers(d, where):
    """FluxConfig from a diffusers FluxTransformer2DModel config.json (FLUX's MLP ratio 4 is not in it)."""
    ints = ["in_channels", "pooled_projection_dim", "joint_attention_dim", "num_attention_heads",
            "attention_head_dim", "num_layers", "num_single_layers"]
    try:
        least = {"num_layers": 0, "num_single_layers": 0}  # a model may have no blocks of one kind
        bad = [k for k in ints if not isinstance(d[k], int) or d[k] < least.get(k, 1)]
        axes = tuple(d["axes_dims_rope"])
        if bad or not all(isinstance(a, int) and a > 0 for a in axes):
            raise InputError(f"{where}: config entries must be positive integers: "
                             f"{', '.join(f'{k}={d[k]!r}' for k in bad) or f'axes_dims_rope={axes!r}'}")
        return FluxConfig(in_channels=d["in_channels"], vec_in_dim=d["pooled_projection_dim"],
                          context_in_dim=d["joint_attention_dim"],
                          hidden_size=d["num_attention_heads"] * d["attention_head_dim"],
                          num_heads=d["num_attention_heads"], depth=d["num_layers"],
                          depth_single_blocks=d["num_single_layers"], axes_dim=axes,
                          guidance_embed=bool(d["guidance_embeds"]))
    except KeyError as e:
        raise InputError(f"{where}: missing config entry {e}") from None
    except TypeError as e:
        raise InputError(f"{where}: malformed config ({e})") from None


def read_flux_config(folder):
    """The FluxConfig of a diffusers `transformer/` folder, from its config.json."""
    return flux_config_from_diffusers(read_json(os.path.join(folder, "config.json")), folder)


def flux_config_to_diffusers(cfg: FluxConfig):
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
            "out_channels": None, "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
            "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
            "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": list(cfg.axes_dim)}


BFL_PREFIX = "model.diffusion_model."


def file_links(sources, cfg, model_fn, where):
    """Links for a single file, its layout told by its keys: diffusers names or BFL names (maybe prefixed)."""
    keys = set(sources)
    if "x_embedder.weight" in keys:
        return transformer_links(cfg)
    prefix = BFL_PREFIX if all(k.startswith(BFL_PREFIX) for k in keys) else ""
    if prefix + "img_in.weight" in keys:
        with torch.device("meta"):
            return identity_links(model_fn(), prefix)
    raise InputError(f"{where}: not a FLUX transformer (no x_embedder.weight or img_in.weight; "
                     f"keys look like {', '.join(sorted(keys)[:3])})")


def transformer_sources(path, cfg=None):
    """(cfg, links, sources) of a diffusers `transformer/` folder, or of one .safetensors file with diffusers or BFL
    keys: what load_transformer reads, opened lazily. cfg defaults to the folder's config.json, else flux-dev."""
    if os.path.isdir(path):
        cfg = cfg or read_flux_config(path)
        files = weight_files(path)
    elif os.path.exists(path):
        cfg, files = cfg or FluxConfig(), [path]
    else:
        raise InputError(f"{path}: no such file or folder")
    sources = transformer_keys(read_sources(files))
    return cfg, file_links(sources, cfg, lambda: Flux(cfg), path), sources


def transformer_keys(sources):
    """The transformer's keys: in an all-in-one file (ComfyUI's) those prefixed BFL_PREFIX, else all of them."""
    if any(k.startswith(BFL_PREFIX) for k in sources):
        return {k: v for k, v in sources.items() if k.startswith(BFL_PREFIX)}
    return sources


def load_transformer(path, cfg=None, dtype=torch.float32, device="cpu"):
    """A FLUX transformer from a diffusers `transformer/` folder, or from one .safetensors file with diffusers or
    BFL keys (`flux1-dev.safetensors`, the SRPO release, or an fp8 file of either, upcast to dtype on load)."""
    cfg, links, sources = transformer_sources(path, cfg)
    return load_into(lambda: Flux(cfg), links, sources, path, dtype, device)


def save_transformer(model: Flux, folder):
    """Write folder/diffusion_pytorch_model.safetensors in diffusers keys (loads strictly into diffusers'
    FluxTransformer2DModel) and folder/config.json, each atomically (temp file, then rename)."""
    return save_diffusers(model, transformer_links(model.cfg), flux_config_to_diffusers(model.cfg), folder)


def save_diffusers(model, links, config, folder):
    """folder/diffusion_pytorch_model.safetensors (model's weights in diffusers keys, along links) and
    folder/config.json (config), each atomically. Returns the weights' path."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in to_theirs(model.state_dict(), links).items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(folder, "config.json"), config)
    return path


def ae_config_from_diffusers(d, where):
    try:
        chans = d["block_out_channels"]
        if d.get("use_quant_conv", True) or d.get("use_post_quant_conv", True):
            raise InputError(f"{where}: a FLUX autoencoder has no quant convs (use_quant_conv must be false)")
        return AutoEncoderConfig(ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans),
                                 num_res_blocks=d["layers_per_block"], z_channels=d["latent_channels"],
                                 groups=d["norm_num_groups"], scale_factor=d["scaling_factor"],
                                 shift_factor=d["shift_factor"])
    except KeyError as e:
        raise InputError(f"{where}: missing config entry {e}") from None


def load_autoencoder(path, cfg=None, dtype=torch.float32, device="cpu"):
    """The FLUX autoencoder from a diffusers `vae/` folder or BFL's `ae.safetensors` (cfg: flux-dev by default)."""
    if os.path.isdir(path):
        cfg = cfg or ae_config_from_diffusers(read_json(os.path.join(path, "config.json")), path)
        sources = read_sources(weight_files(path))
        with torch.device("meta"):
            links = autoencoder_links(AutoEncoder(cfg))
    else:
        cfg = cfg or AutoEncoderConfig()
        sources = read_sources([path])
        with torch.device("meta"):
            links = identity_links(AutoEncoder(cfg))
    return load_into(lambda: AutoEncoder(cfg), links, sources, path, dtype, device)
