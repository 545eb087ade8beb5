"""FLUX.1 in one file: the transformer, the autoencoder and the text conditioning.

Read top to bottom: configs, the transformer's pieces (embeddings, RoPE, attention, double and single blocks),
the transformer, the autoencoder, then text conditioning. Module names follow black-forest-labs/flux; reading and
writing the released weights (diffusers folders, BFL single files) is weights/flux_weights.py's.

Shapes: B batch, L image tokens, T text tokens, H heads, D head width, h hidden width.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.util import InputError, check_folder, first_line, load_pretrained, quiet_transformers
from flux_kernels.attention import attention as flash_attention
from flux_kernels.rope import norm_rope as fused_norm_rope
from flux_kernels.rope import norm_rope_reference

# ----------------------------------------------------------------------------------------------------------------
# Configs


class BlockWidths:
    """What a config's width, head count and MLP ratio give the blocks (FLUX.1's and FLUX.2's alike)."""

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio)


@dataclass
class FluxConfig(BlockWidths):
    in_channels: int = 64  # 16 latent channels packed 2x2
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple = (16, 56, 56)
    theta: int = 10000
    guidance_embed: bool = True

    @classmethod
    def preset(cls, name):
        return {"flux-dev": cls(), "tiny": cls(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2,
                                               depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14))}[name]


@dataclass
class AutoEncoderConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    groups: int = 32
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def preset(cls, name):
        return {"flux-dev": cls(), "tiny": cls(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, groups=8)}[name]


# ----------------------------------------------------------------------------------------------------------------
# Transformer pieces


def timestep_embedding(t, dim=256, max_period=10000, time_factor=1000.0):
    """Sinusoidal embedding of t in [0, 1]: [cos(1000 t w_i), sin(1000 t w_i)], w_i = max_period^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden, bias=True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=bias)
        self.out_layer = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


def rope_freqs(ids, axes_dim, theta):
    """RoPE angles for position ids (N, n_axes): axis i rotates pair j by pos_i * theta^(-2j/d_i).

    Returns (cos, sin), each (N, D/2) float32, the axes' frequencies concatenated (FLUX: 8 + 28 + 28 = 64 pairs).
    """
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, i].double()[:, None] * omega[None])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def qk_norm_rope(x, scale, cos, sin, backend):
    """QK RMSNorm (learnable scale, eps 1e-6) then RoPE on interleaved pairs, in fp32: the fused kernel
    (flux_kernels.rope.norm_rope) for backend 'triton', its PyTorch reference otherwise."""
    return (fused_norm_rope if backend == "triton" else norm_rope_reference)(x, scale, cos, sin)


def attend(q, k, v, backend):
    """softmax(q k^T / sqrt(D)) v over the joint [txt, img] sequence, no mask. (B, H, N, D) -> (B, N, H*D).
    The flash kernel (flux_kernels.attention.attention) for backend 'triton', torch SDPA otherwise."""
    out = flash_attention(q, k, v) if backend == "triton" else F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv, num_heads):
    """(B, N, 3*H*D) laid out (3, H, D) -> q, k, v each (B, H, N, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


class Modulation(nn.Module):
    """adaLN: Linear(silu(vec)) chunked into n vectors of width h (shift, scale, gate, ...), one per token row."""

    def __init__(self, dim, n, bias=True):
        super().__init__()
        self.n, self.lin = n, nn.Linear(dim, n * dim, bias=bias)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    return torch.addcmul(shift, layer_norm(x), 1 + scale)  # (1 + scale) * LN(x) + shift


class RMSNorm(nn.Module):
    """The learnable scale of a per-head RMSNorm; the norm itself runs fused with RoPE in qk_norm_rope."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    """The q and k norm scales of one attention (parameters only, named as in BFL's checkpoints)."""

    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    """One stream's attention weights (parameters only: the joint attention runs in the block)."""

    def __init__(self, dim, num_heads, bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=bias)


def clip_float16(x):
    """In float16, x clipped to +-65504 (an overflow becomes the largest finite value, not inf and then NaN in the next
    norm), as diffusers' FLUX blocks do to their residual streams; other dtypes unchanged."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class SwiGLU(nn.Module):
    """silu(a) * b of the two halves [a, b] of the last dim (FLUX.2's MLP activation)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def activation(gated):
    return SwiGLU() if gated else nn.GELU(approximate="tanh")


def mlp(dim, hidden, bias=True, gated=False):
    """Linear, GELU (tanh), Linear; gated (FLUX.2): the first Linear twice as wide, then SwiGLU."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias), activation(gated),
                         nn.Linear(hidden, dim, bias=bias))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined only inside attention ([txt, img] order).

    FLUX.2's block (flux2_model) is this one with bias=False, gated=True (SwiGLU MLPs) and modulation=False: its
    modulation is the model's, shared by all blocks, and comes in to `joint`."""

    def __init__(self, cfg, bias=True, gated=False, modulation=True):
        super().__init__()
        h, self.num_heads, self.backend = cfg.hidden_size, cfg.num_heads, "sdpa"
        if modulation:
            self.img_mod, self.txt_mod = Modulation(h, 6), Modulation(h, 6)
        self.img_attn, self.txt_attn = SelfAttention(h, cfg.num_heads, bias), SelfAttention(h, cfg.num_heads, bias)
        self.img_mlp, self.txt_mlp = mlp(h, cfg.mlp_hidden, bias, gated), mlp(h, cfg.mlp_hidden, bias, gated)

    def heads(self, attn, x, cos, sin):
        """q, k, v (B, H, N, D) of one stream, q and k normalised and rotated."""
        q, k, v = split_heads(attn.qkv(x), self.num_heads)
        norm = attn.norm
        q = qk_norm_rope(q, norm.query_norm.scale, cos, sin, self.backend)
        k = qk_norm_rope(k, norm.key_norm.scale, cos, sin, self.backend)
        return q, k, v

    def forward(self, img, txt, vec, pe):
        return self.joint(img, txt, self.img_mod(vec), self.txt_mod(vec), pe)

    def joint(self, img, txt, img_mod, txt_mod, pe):
        """The block given its modulation: img_mod and txt_mod are each (shift, scale, gate) x 2, each (B, 1, h)."""
        cos, sin = pe
        T = txt.shape[1]
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
        tq, tk, tv = self.heads(self.txt_attn, modulate(txt, t_shift1, t_scale1), cos[:T], sin[:T])
        iq, ik, iv = self.heads(self.img_attn, modulate(img, i_shift1, i_scale1), cos[T:], sin[T:])
        out = attend(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), self.backend)
        txt_out, img_out = out[:, :T], out[:, T:]
        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_out))  # img + gate * f(img)
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_out))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2)))
        return img, clip_float16(txt)  # the text stream only, as diffusers' FluxTransformerBlock


class SingleStreamBlock(nn.Module):
    """One stream over [txt, img]: attention and MLP in parallel from one fused input projection (linear1).
    FLUX.2's: bias=False, gated=True, modulation=False, as for DoubleStreamBlock."""

    def __init__(self, cfg, bias=True, gated=False, modulation=True):
        super().__init__()
        h, self.num_heads, self.backend = cfg.hidden_size, cfg.num_heads, "sdpa"
        if modulation:
            self.modulation = Modulation(h, 3)
        self.linear1 = nn.Linear(h, 3 * h + (2 if gated else 1) * cfg.mlp_hidden, bias=bias)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h, bias=bias)
        self.norm = QKNorm(cfg.head_dim)
        self.activation = activation(gated)

    def forward(self, x, vec, pe):
        return self.joint(x, self.modulation(vec), pe)

    def joint(self, x, mod, pe):
        """The block given its modulation mod = (shift, scale, gate), each (B, 1, h)."""
        shift, scale, gate = mod
        h = x.shape[-1]
        qkv, hidden = self.linear1(modulate(x, shift, scale)).split([3 * h, self.linear1.out_features - 3 * h], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        q = qk_norm_rope(q, self.norm.query_norm.scale, *pe, self.backend)
        k = qk_norm_rope(k, self.norm.key_norm.scale, *pe, self.backend)
        out = self.linear2(torch.cat([attend(q, k, v, self.backend), self.activation(hidden)], -1))
        return clip_float16(torch.addcmul(x, gate, out))  # x + gate * out


class LastLayer(nn.Module):
    def __init__(self, h, out_channels, bias=True):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, bias=bias))
        self.linear = nn.Linear(h, out_channels, bias=bias)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Flux(nn.Module):
    """The FLUX.1 transformer on packed latents. Predicts the flow velocity v ~ eps - x0 at noise level sigma."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise InputError(f"axes_dim {cfg.axes_dim} must sum to the head width {cfg.head_dim}")
        self.cfg = cfg
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.in_channels)

    def set_attention_backend(self, backend):
        """'sdpa' (torch) or 'triton' (flux_kernels/: fused QK-norm + RoPE and flash attention)."""
        if backend not in ("sdpa", "triton"):
            raise InputError(f"unknown attention backend {backend!r}: expected 'sdpa' or 'triton'")
        for block in [*self.double_blocks, *self.single_blocks]:
            block.backend = backend

    def forward(self, img, img_ids, txt, txt_ids, y, timesteps, guidance=None):
        """img (B, L, in), txt (B, T, ctx), ids (L, 3) / (T, 3), y pooled (B, vec), timesteps sigma (B,)."""
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope_freqs(torch.cat([txt_ids, img_ids]), self.cfg.axes_dim, self.cfg.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def pack(z):
    """(B, C, 2h, 2w) latents -> (B, h*w, C*4) tokens; within a token the index is c*4 + ph*2 + pw."""
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x, height, width):
    """Inverse of pack for an image of height x width pixels (16 pixels per token side)."""
    B, _, D = x.shape
    h, w = height // 16, width // 16
    return x.view(B, h, w, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, 2 * h, 2 * w)


def image_ids(height, width, device=None):
    """Position id [0, row, col] of each packed token of a height x width image, row-major: (h*w, 3)."""
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder (16 latent channels, 8x downsampling)


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of the lowest resolution."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the released weights were trained


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(c, groups):
    return nn.ModuleDict({"block_1": ResnetBlock(c, c, groups), "attn_1": AttnBlock(c, groups),
                          "block_2": ResnetBlock(c, c, groups)})


def run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, c in enumerate(chans):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else c, c, cfg.groups)
                                        for j in range(cfg.num_res_blocks))
            if i < len(chans) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
            cin = c
        self.mid = mid_block(cin, cfg.groups)
        self.norm_out = group_norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(run_mid(self.mid, h))))


class Decoder(nn.Module):
    checkpointing = False

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin, cfg.groups)
        levels = []
        for i in reversed(range(len(chans))):  # up[i] works at the resolution of down[i]
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else chans[i], chans[i], cfg.groups)
                                        for j in range(cfg.num_res_blocks + 1))
            if i > 0:
                level.upsample = Upsample(chans[i])
            levels.insert(0, level)
            cin = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        """With `checkpointing` (training's decode for the reward: runtime.ready sets it, as the official README
        advises for direct backpropagation through the VAE) each stage (the middle, every ResnetBlock and upsampler,
        the output layers) keeps only its input for the backward and is recomputed there, one at a time."""
        h = self.stage(self.head, z)
        for level in reversed(self.up):
            for layer in [*level.block, *([level.upsample] if hasattr(level, "upsample") else [])]:
                h = self.stage(layer, h)
        return self.stage(self.tail, h)

    def head(self, z):
        return run_mid(self.mid, self.conv_in(z))

    def tail(self, h):
        return self.conv_out(F.silu(self.norm_out(h)))

    def stage(self, run, h):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(run, h, use_reentrant=False)
        return run(h)


class AutoEncoder(nn.Module):
    """Pixels in [-1, 1] <-> latents normalised as z = scale * (mean - shift)."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def encode(self, x):
        """The posterior mean, normalised: deterministic, which is what reward fine-tuning needs."""
        mean = self.encoder(x)[:, : self.cfg.z_channels]
        return self.cfg.scale_factor * (mean - self.cfg.shift_factor)

    def decode(self, z):
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning: T5 token embeddings (txt) and the CLIP-L pooled embedding (y), as FluxPipeline computes them


class ByteTokenizer:
    """Offline stand-in tokenizer for the tiny built-in models: UTF-8 bytes + 2, end token 1, padding 0."""

    vocab_size = 258

    def __call__(self, prompts, max_length, **_):
        rows = [list(p.encode("utf-8")[: max_length - 1]) for p in prompts]
        ids = [[b + 2 for b in r] + [1] + [0] * (max_length - 1 - len(r)) for r in rows]
        return {"input_ids": torch.tensor(ids)}


def load_parts(folder, family, dtype, parts):
    """{name: kind.from_pretrained(folder/name)} for parts = [(name, kind, files it needs)], a file either of "a|b";
    text encoders in dtype. Checks the files first: transformers would build an empty tokenizer without complaint.
    Each load is quiet (util.quiet_transformers: no loading report, no progress bar on stderr)."""
    check_folder(folder, f"a diffusers {family} folder")
    loaded = {}
    for name, kind, needs in parts:
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise InputError(f"{folder}: no {name}/ folder (expected the diffusers {family} layout)")
        for need in needs:
            if not any(os.path.isfile(os.path.join(sub, n)) for n in need.split("|")):
                raise InputError(f"{sub}: no {need.replace('|', ' or ')}")
        if name.startswith("text_encoder"):  # a config that misfits its weights: one line, not a table
            loaded[name] = load_pretrained(kind, sub, kind.__name__, dtype=dtype)
            continue
        try:
            with quiet_transformers():
                loaded[name] = kind.from_pretrained(sub, local_files_only=True)
        except (OSError, ValueError, TypeError, SafetensorError) as e:
            raise InputError(f"{sub}: cannot load {kind.__name__}: {first_line(e)}") from None
    return loaded


class TextConditioner(nn.Module):
    def __init__(self, t5, t5_tokenizer, clip, clip_tokenizer, max_length=512):
        super().__init__()
        self.t5, self.clip = t5.eval().requires_grad_(False), clip.eval().requires_grad_(False)
        self.t5_tokenizer, self.clip_tokenizer, self.max_length = t5_tokenizer, clip_tokenizer, max_length

    @torch.no_grad()
    def forward(self, prompts):
        """prompts -> (txt (B, max_length, ctx) from T5, y (B, vec) CLIP pooled), both padded to max length."""
        return self.encode(prompts)

    def encode(self, prompts):
        """forward's (txt, y), with autograd where the encoders' weights require it: the tiny world trains its
        encoders with its transformer (training/world_models.py); everywhere else they are frozen."""
        def ids(tokenizer, n):
            out = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
            return out["input_ids"].to(self.t5.device)

        txt = self.t5(ids(self.t5_tokenizer, self.max_length), output_hidden_states=False)[0]
        y = self.clip(ids(self.clip_tokenizer, 77), output_hidden_states=False).pooler_output
        return txt, y

    @classmethod
    def from_folder(cls, flux_dir, dtype=torch.bfloat16, device="cpu", max_length=512):
        """Read text_encoder/ (CLIP-L), tokenizer/, text_encoder_2/ (T5), tokenizer_2/ of a diffusers FLUX folder."""
        # transformers takes ~4 s to import: only where it is used (as in reward.py)
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = load_parts(flux_dir, "FLUX.1", dtype, [
            ("text_encoder", CLIPTextModel, ["config.json"]),
            ("tokenizer", CLIPTokenizer, ["tokenizer.json|vocab.json"]),
            ("text_encoder_2", T5EncoderModel, ["config.json"]),
            ("tokenizer_2", T5TokenizerFast, ["tokenizer.json|spiece.model"])])
        return cls(parts["text_encoder_2"].to(device), parts["tokenizer_2"], parts["text_encoder"].to(device),
                   parts["tokenizer"], max_length)

    @classmethod
    def tiny(cls, context_dim=32, pooled_dim=32, max_length=32, seed=0):
        """Random tiny T5 and CLIP text models with byte tokenizers: the offline demo and the tests."""
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # ~4 s: only here

        torch.manual_seed(seed)
        v = ByteTokenizer.vocab_size
        t5 = T5EncoderModel(T5Config(vocab_size=v, d_model=context_dim, d_kv=8, d_ff=2 * context_dim, num_layers=2,
                                     num_heads=4, pad_token_id=0, eos_token_id=1))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=v, hidden_size=pooled_dim, intermediate_size=2 * pooled_dim,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=1))
        return cls(t5, ByteTokenizer(), clip, ByteTokenizer(), max_length)
