"""FLUX.2 weights on disk: diffusers folders and single files (BFL's names or diffusers') read into (diffusers
folders written from) `flux2_model`, with flux_weights' machinery.

The same scheme as FLUX.1's (weights/flux_weights.py): one table of links per model maps our module names, which follow
black-forest-labs/flux2, to diffusers' keys (Flux2Transformer2DModel, AutoencoderKLFlux2); loading and saving read
the same table; loading builds on the meta device, checks every key and shape, then copies straight from the mapped
files. A folder's config.json gives the shapes (a key it leaves out takes diffusers' default, as diffusers does); a
single file's are read off its tensors."""

import dataclasses
import os

import torch

from common.util import InputError, read_json
from flux2_model import Flux2, Flux2AutoEncoder, Flux2AutoEncoderConfig, Flux2Config
from weights import flux_weights
from weights.tensor_files import shape_of

# ----------------------------------------------------------------------------------------------------------------
# Transformer


def weights(ours, theirs):
    return flux_weights.same(ours, theirs, params=("weight",))  # FLUX.2's transformer has no biases


def double_block_links(i, h):
    o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    links = [*flux_weights.split(f"{o}.img_attn.qkv", [(f"{t}.attn.to_{x}", h) for x in "qkv"], params=("weight",)),
             *flux_weights.split(f"{o}.txt_attn.qkv", [(f"{t}.attn.add_{x}_proj", h) for x in "qkv"],
                                 params=("weight",)),
             *weights(f"{o}.img_attn.proj", f"{t}.attn.to_out.0"),
             *weights(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")]
    for stream, sfx in [("img", ""), ("txt", "added_")]:
        for qk in ("query", "key"):
            links.append(flux_weights.Link(f"{o}.{stream}_attn.norm.{qk}_norm.scale",
                                           f"{t}.attn.norm_{sfx}{qk[0]}.weight"))
    for stream, ff in [("img", "ff"), ("txt", "ff_context")]:
        links += [*weights(f"{o}.{stream}_mlp.0", f"{t}.{ff}.linear_in"),
                  *weights(f"{o}.{stream}_mlp.2", f"{t}.{ff}.linear_out")]
    return links


def single_block_links(i):
    o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    links = [*weights(f"{o}.linear1", f"{t}.attn.to_qkv_mlp_proj"), *weights(f"{o}.linear2", f"{t}.attn.to_out")]
    return links + [flux_weights.Link(f"{o}.norm.{qk}_norm.scale", f"{t}.attn.norm_{qk[0]}.weight")
                    for qk in ("query", "key")]


def transformer_links(cfg: Flux2Config):
    """BFL <-> diffusers names of every transformer tensor; q, k, v are h rows each of the double blocks' qkv."""
    h, tge = cfg.hidden_size, "time_guidance_embed"
    links = [*weights("img_in", "x_embedder"), *weights("txt_in", "context_embedder")]
    for ours, theirs in [("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")][
            : 2 if cfg.guidance_embed else 1]:
        links += [*weights(f"{ours}.in_layer", f"{tge}.{theirs}.linear_1"),
                  *weights(f"{ours}.out_layer", f"{tge}.{theirs}.linear_2")]
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        links += weights(f"{name}.lin", f"{name}.linear")
    for i in range(cfg.depth):
        links += double_block_links(i, h)
    for i in range(cfg.depth_single_blocks):
        links += single_block_links(i)
    links += weights("final_layer.linear", "proj_out")
    # BFL's adaLN rows are (shift, scale); diffusers' are (scale, shift)
    ada, out = "final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"
    return links + [flux_weights.Link(ada, out, (0, h), (h, 2 * h)), flux_weights.Link(ada, out, (h, 2 * h), (0, h))]


# Flux2Transformer2DModel's arguments we do not model, with the only value we accept (each is FLUX.2's)
FIXED = {"patch_size": 1, "timestep_guidance_channels": 256, "eps": 1e-6}


def config_from_diffusers(d, where):
    """Flux2Config from a diffusers Flux2Transformer2DModel config.json; a missing key takes diffusers' default (the
    defaults are FLUX.2 [dev]'s, which are Flux2Config's)."""
    dev = Flux2Config()
    get = {"in_channels": dev.in_channels, "joint_attention_dim": dev.context_in_dim, "num_layers": dev.depth,
           "num_single_layers": dev.depth_single_blocks, "num_attention_heads": dev.num_heads,
           "attention_head_dim": dev.head_dim, "rope_theta": dev.theta}
    v = {k: d.get(k, default) for k, default in get.items()}
    least = {"num_layers": 0, "num_single_layers": 0}  # a model may have no blocks of one kind
    bad = [k for k, x in v.items() if not isinstance(x, int) or isinstance(x, bool) or x < least.get(k, 1)]
    axes, ratio = d.get("axes_dims_rope", dev.axes_dim), d.get("mlp_ratio", dev.mlp_ratio)
    if bad or not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and a > 0 for a in axes):
        raise InputError(f"{where}: config entries must be positive integers: "
                         f"{', '.join(f'{k}={v[k]!r}' for k in bad) or f'axes_dims_rope={axes!r}'}")
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        raise InputError(f"{where}: config entry mlp_ratio must be a positive number, got {ratio!r}")
    for k, want in FIXED.items():
        if d.get(k, want) != want:
            raise InputError(f"{where}: {k}={d[k]!r} is not supported (FLUX.2 has {want})")
    if d.get("out_channels") not in (None, v["in_channels"]):
        raise InputError(f"{where}: out_channels={d['out_channels']!r} must be null or in_channels")
    return Flux2Config(in_channels=v["in_channels"], context_in_dim=v["joint_attention_dim"],
                       hidden_size=v["num_attention_heads"] * v["attention_head_dim"], mlp_ratio=float(ratio),
                       num_heads=v["num_attention_heads"], depth=v["num_layers"],
                       depth_single_blocks=v["num_single_layers"], axes_dim=tuple(axes), theta=v["rope_theta"],
                       guidance_embed=bool(d.get("guidance_embeds", dev.guidance_embed)))


def config_to_diffusers(cfg: Flux2Config):
    return {"_class_name": "Flux2Transformer2DModel", **FIXED, "in_channels": cfg.in_channels, "out_channels": None,
            "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks, "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.context_in_dim,
            "mlp_ratio": cfg.mlp_ratio, "axes_dims_rope": list(cfg.axes_dim), "rope_theta": cfg.theta,
            "guidance_embeds": cfg.guidance_embed}


# The tensors a single file's config is read off, in each layout's names: BFL's (black-forest-labs/flux2) and
# diffusers' (Flux2Transformer2DModel); "modulation" and "img_in" tell the layouts apart
FILE_KEYS = {
    "BFL": {"img_in": "img_in.weight", "txt_in": "txt_in.weight", "modulation": "single_stream_modulation.lin.weight",
            "doubles": "double_blocks", "singles": "single_blocks", "guidance": "guidance_in.in_layer.weight",
            "double_norm": "double_blocks.0.img_attn.norm.query_norm.scale",
            "single_norm": "single_blocks.0.norm.query_norm.scale",
            "double_mlp_out": "double_blocks.0.img_mlp.2.weight", "single_out": "single_blocks.0.linear2.weight"},
    "diffusers": {"img_in": "x_embedder.weight", "txt_in": "context_embedder.weight",
                  "modulation": "single_stream_modulation.linear.weight", "doubles": "transformer_blocks",
                  "singles": "single_transformer_blocks",
                  "guidance": "time_guidance_embed.guidance_embedder.linear_1.weight",
                  "double_norm": "transformer_blocks.0.attn.norm_q.weight",
                  "single_norm": "single_transformer_blocks.0.attn.norm_q.weight",
                  "double_mlp_out": "transformer_blocks.0.ff.linear_out.weight",
                  "single_out": "single_transformer_blocks.0.attn.to_out.weight"}}


def file_config(sources, keys):
    """The Flux2Config of a single file, read off its shapes (keys: FILE_KEYS' names of its layout, maybe prefixed):
    the head width is the QK norms', the MLP's from the single blocks' output projection (hidden + mlp inputs); 4
    RoPE axes of a quarter head each and theta 2000, as every released FLUX.2 (neither is in the shapes)."""
    def shape(role):
        return shape_of(sources[keys[role]][0], keys[role])

    def count(role):
        return len({k[len(keys[role]) + 1:].split(".")[0] for k in sources if k.startswith(keys[role] + ".")})

    hidden, in_channels = shape("img_in")
    head = shape("single_norm" if keys["single_norm"] in sources else "double_norm")[0]
    mlp = shape("single_out")[1] - hidden if count("singles") else shape("double_mlp_out")[1]
    return Flux2Config(in_channels=in_channels, context_in_dim=shape("txt_in")[1], hidden_size=hidden,
                       mlp_ratio=mlp / hidden, num_heads=hidden // head, depth=count("doubles"),
                       depth_single_blocks=count("singles"), axes_dim=(head // 4,) * 4,
                       guidance_embed=keys["guidance"] in sources)


def transformer_sources(path, cfg=None):
    """(cfg, links, sources) of a diffusers `transformer/` folder (its config.json) or of a single file, in BFL's
    names (maybe prefixed as in an all-in-one file) or diffusers' (a folder's diffusion_pytorch_model.safetensors
    copied out); a single file's config is read off its shapes unless given. Opened lazily."""
    if os.path.isdir(path):
        cfg = cfg or config_from_diffusers(read_json(os.path.join(path, "config.json")), path)
        return cfg, transformer_links(cfg), flux_weights.read_sources(flux_weights.weight_files(path))
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    sources = flux_weights.transformer_keys(flux_weights.read_sources([path]))
    prefix = flux_weights.BFL_PREFIX if all(k.startswith(flux_weights.BFL_PREFIX) for k in sources) else ""
    layout = next((name for name, keys in FILE_KEYS.items()
                   if prefix + keys["modulation"] in sources and prefix + keys["img_in"] in sources), None)
    if layout is None:
        raise InputError(f"{path}: not a FLUX.2 transformer (expected BFL's single_stream_modulation.lin.weight and "
                         f"img_in.weight, or diffusers' single_stream_modulation.linear.weight and x_embedder.weight; "
                         f"keys look like {', '.join(sorted(sources)[:3])})")
    cfg = cfg or file_config(sources, {role: prefix + key for role, key in FILE_KEYS[layout].items()})
    if layout == "diffusers":
        return cfg, transformer_links(cfg), sources
    with torch.device("meta"):
        return cfg, flux_weights.identity_links(Flux2(cfg), prefix), sources


def load_transformer(path, cfg=None, dtype=torch.float32, device="cpu"):
    """The FLUX.2 transformer of a diffusers `transformer/` folder (one file or shards with an index), of a BFL
    single file (`flux-2-klein-4b.safetensors`, an fp8 one upcast to dtype on load, or an all-in-one file), or of a
    single file in diffusers' keys."""
    cfg, links, sources = transformer_sources(path, cfg)
    return flux_weights.load_into(lambda: Flux2(cfg), links, sources, path, dtype, device)


def save_transformer(model: Flux2, folder):
    """folder/diffusion_pytorch_model.safetensors in diffusers keys (loads strictly into Flux2Transformer2DModel) and
    folder/config.json, each atomically. Returns the weights' path."""
    return flux_weights.save_diffusers(model, transformer_links(model.cfg), config_to_diffusers(model.cfg), folder)


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder


def autoencoder_links(model: Flux2AutoEncoder):
    """FLUX.1's autoencoder links (flux_weights.autoencoder_links), the quant convs moved to the top as diffusers
    keeps them; the batch-norm statistics (bn.*) have the same names on both sides."""
    top = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    links = []
    for link in flux_weights.autoencoder_links(model):
        prefix = next((p for p in top if link.theirs.startswith(p)), None)
        links.append(dataclasses.replace(link, theirs=top[prefix] + link.theirs[len(prefix):]) if prefix else link)
    return links


def autoencoder_config_from_diffusers(d, where):
    """Flux2AutoEncoderConfig from an AutoencoderKLFlux2 config.json; the architecture must be the released one's
    (quant convs, a mid-block attention, 2x2 patches, one channel list for encoder and decoder)."""
    try:
        chans, patch = d["block_out_channels"], d.get("patch_size", [2, 2])
        expected = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                    "act_fn": "silu", "in_channels": 3, "out_channels": 3}
        for k, want in expected.items():
            if d.get(k, want) != want:
                raise InputError(f"{where}: {k}={d[k]!r} is not supported (FLUX.2's autoencoder has {want!r})")
        if list(patch) != [2, 2] or d.get("decoder_block_out_channels") not in (None, chans):
            raise InputError(f"{where}: patch_size must be [2, 2] and decoder_block_out_channels null or equal to "
                             f"block_out_channels")
        return Flux2AutoEncoderConfig(ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans),
                                      num_res_blocks=d.get("layers_per_block", 2),
                                      z_channels=d.get("latent_channels", 32), groups=d.get("norm_num_groups", 32),
                                      bn_eps=d.get("batch_norm_eps", 1e-4))
    except KeyError as e:
        raise InputError(f"{where}: missing config entry {e}") from None
    except (TypeError, IndexError, ZeroDivisionError) as e:
        raise InputError(f"{where}: malformed config ({e})") from None


def load_autoencoder(path, cfg=None, dtype=torch.float32, device="cpu"):
    """The FLUX.2 autoencoder, batch-norm statistics included, of a diffusers `vae/` folder or of BFL's single file
    (our names; cfg: the released VAE's unless given)."""
    if os.path.isdir(path):
        cfg = cfg or autoencoder_config_from_diffusers(read_json(os.path.join(path, "config.json")), path)
        files = flux_weights.weight_files(path)
    else:
        cfg, files = cfg or Flux2AutoEncoderConfig(), [path]
    with torch.device("meta"):
        model = Flux2AutoEncoder(cfg)
        links = autoencoder_links(model) if os.path.isdir(path) else flux_weights.identity_links(model)
    sources = flux_weights.read_sources(files)
    return flux_weights.load_into(lambda: Flux2AutoEncoder(cfg), links, sources, path, dtype, device)

