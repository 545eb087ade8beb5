"""FLUX.2 beside flux_model.py: the transformer and the autoencoder, as diffusers' Flux2Transformer2DModel and
AutoencoderKLFlux2 compute them, built from flux_model's pieces where FLUX.2 is the same, and FLUX.2 [klein]'s text
conditioning (Qwen3's hidden states) as Flux2KleinPipeline computes it, and FLUX.2 [dev]'s (Mistral-3's) as
Flux2Pipeline does.

What FLUX.2 changes (the rest is FLUX.1's: LayerNorm + adaLN, QK RMSNorm + RoPE, joint attention, the two kinds of
block, the sinusoidal time embedding, the VAE's encoder and decoder):
- no biases in the transformer; SwiGLU MLPs (silu(a) * b of one projection's halves), 3x the width;
- modulation shared across blocks: one for the image stream of all double blocks, one for their text stream, one for
  all single blocks, computed once from the time (and guidance) embedding; no pooled text vector;
- 4-axis RoPE over (t, h, w, l), theta 2000: image tokens count along h and w, text tokens along l;
- the autoencoder has 32 latent channels and 1x1 quant convs, and its latents are normalised per channel of their 2x2
  patchified (128-channel) form by the batch-norm statistics the released VAE carries, as the Flux2 pipelines do.
Module names follow black-forest-labs/flux2 (its single-file checkpoints); weights/flux2_weights.py maps them to
diffusers'.

Shapes: B batch, L image tokens, T text tokens, h hidden width.
"""

from dataclasses import dataclass

import torch
from torch import nn

import flux_model as fm
from common.util import InputError

# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class Flux2Config(fm.BlockWidths):
    in_channels: int = 128  # 32 latent channels patchified 2x2
    context_in_dim: int = 15360  # three hidden states of the text encoder, stacked (Mistral-3 Small: 3 x 5120)
    hidden_size: int = 6144
    mlp_ratio: float = 3.0
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple = (32, 32, 32, 32)
    theta: int = 2000
    guidance_embed: bool = True

    @classmethod
    def preset(cls, name):
        """The released models' shapes, as black-forest-labs/flux2's src/flux2/model.py states them (Flux2Params for
        dev, Klein4BParams, Klein9BParams; klein's text width is 3 x Qwen3-4B's 2560 resp. 3 x Qwen3-8B's 4096):
        3.9B, 9.1B and 32.2B parameters. klein's base and distilled models share a shape; neither has a guidance
        embedding."""
        return {"flux2-dev": cls(),
                "klein-4b": cls(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                                guidance_embed=False),
                "klein-9b": cls(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                                guidance_embed=False),
                "tiny": cls(in_channels=32, context_in_dim=48, hidden_size=64, num_heads=2, depth=2,
                            depth_single_blocks=2, axes_dim=(8, 8, 8, 8), guidance_embed=False)}[name]


@dataclass
class Flux2AutoEncoderConfig:
    """The fields flux_model's Encoder and Decoder read, and the batch-norm epsilon of the latent statistics."""

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    groups: int = 32
    bn_eps: float = 1e-4

    @classmethod
    def preset(cls, name):
        """The released VAE's shape (black-forest-labs/flux2's AutoEncoderParams), or a tiny one whose patchified
        latents (4 x 8 channels) are the tiny transformer's input."""
        return {"flux2": cls(), "tiny": cls(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8,
                                            groups=8)}[name]


# ----------------------------------------------------------------------------------------------------------------
# Transformer


class DoubleStreamBlock(fm.DoubleStreamBlock):
    """FLUX.1's double block without biases, with SwiGLU MLPs, modulated by the model's shared modulation."""

    def __init__(self, cfg):
        super().__init__(cfg, bias=False, gated=True, modulation=False)

    def forward(self, img, txt, img_mod, txt_mod, pe):
        return self.joint(img, txt, img_mod, txt_mod, pe)


class SingleStreamBlock(fm.SingleStreamBlock):
    """FLUX.1's single block without biases, with a SwiGLU MLP, modulated by the model's shared modulation."""

    def __init__(self, cfg):
        super().__init__(cfg, bias=False, gated=True, modulation=False)

    def forward(self, x, mod, pe):
        return self.joint(x, mod, pe)


class Flux2(nn.Module):
    """The FLUX.2 transformer on packed latents. Predicts the flow velocity v ~ eps - x0 at noise level sigma."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise InputError(f"axes_dim {cfg.axes_dim} must sum to the head width {cfg.head_dim}")
        self.cfg = cfg
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h, bias=False)
        self.time_in = fm.MLPEmbedder(256, h, bias=False)
        self.guidance_in = fm.MLPEmbedder(256, h, bias=False) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, h, bias=False)
        self.double_stream_modulation_img = fm.Modulation(h, 6, bias=False)
        self.double_stream_modulation_txt = fm.Modulation(h, 6, bias=False)
        self.single_stream_modulation = fm.Modulation(h, 3, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = fm.LastLayer(h, cfg.in_channels, bias=False)

    set_attention_backend = fm.Flux.set_attention_backend

    def forward(self, img, img_ids, txt, txt_ids, timesteps, guidance=None):
        """img (B, L, in), txt (B, T, ctx), ids (L, 4) / (T, 4), timesteps sigma (B,), guidance (B,) for a model with
        a guidance embedding (FLUX.2 [dev]); a model without one ignores it, as diffusers' does."""
        vec = self.time_in(fm.timestep_embedding(timesteps).to(img.dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(fm.timestep_embedding(guidance).to(img.dtype))
        img_mod, txt_mod = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = fm.rope_freqs(torch.cat([txt_ids, img_ids]), self.cfg.axes_dim, self.cfg.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, pe)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, single_mod, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def image_ids(height, width, device=None):
    """Position id [t, h, w, l] = [0, row, col, 0] of each packed token of a height x width image, row-major: (h*w, 4)
    (Flux2Pipeline's latent ids; packing is flux_model.pack, 16 pixels per token side as in FLUX.1)."""
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 4)


def text_ids(length, device=None):
    """Position id [0, 0, 0, l] of text token l: (length, 4) (Flux2Pipeline's text ids)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder (32 latent channels, 8x downsampling; latents normalised in their 2x2 patchified form)


def patchify(z):
    """(B, C, 2h, 2w) -> (B, 4C, h, w), channel c*4 + ph*2 + pw: Flux2Pipeline's _patchify_latents. Its tokens,
    (B, h*w, 4C) row-major, are flux_model.pack(z)."""
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unpatchify(z):
    """Inverse of patchify."""
    B, C, h, w = z.shape
    return z.view(B, C // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * h, 2 * w)


class Encoder(fm.Encoder):
    """FLUX.1's encoder, then a 1x1 conv on the moments (BFL keeps it here, diffusers at the top: quant_conv)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x):
        return self.quant_conv(super().forward(x))


class Decoder(fm.Decoder):
    """A 1x1 conv on the latents (post_quant_conv), then FLUX.1's decoder, checkpointing included."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def head(self, z):
        return super().head(self.post_quant_conv(z))


class Flux2AutoEncoder(nn.Module):
    """Pixels in [-1, 1] <-> latents (B, 32, H/8, W/8), normalised per channel of the patchified form:

        z = unpatchify((patchify(mean) - running_mean) / sqrt(running_var + eps)),

    what Flux2KleinPipeline does after encoding (and undoes before decoding), so that flux_model.pack(z) is the
    pipeline's latent tokens. `bn` holds the released statistics; it is never run (nothing updates them)."""

    def __init__(self, cfg: Flux2AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.bn = nn.BatchNorm2d(4 * cfg.z_channels, eps=cfg.bn_eps, affine=False)

    def statistics(self):
        """(mean, std) of the patchified latents, each (4C, 1, 1)."""
        return self.bn.running_mean[:, None, None], (self.bn.running_var + self.cfg.bn_eps).sqrt()[:, None, None]

    def encode(self, x):
        """The posterior mean, normalised: deterministic, which is what reward fine-tuning needs."""
        mean, std = self.statistics()
        return unpatchify((patchify(self.encoder(x)[:, : self.cfg.z_channels]) - mean) / std)

    def decode(self, z):
        mean, std = self.statistics()
        return self.decoder(unpatchify(patchify(z) * std + mean))


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning of FLUX.2 [klein]: Qwen3's hidden states, as Flux2KleinPipeline computes them


class Qwen3Conditioner(nn.Module):
    """Each prompt as one user turn of Qwen3's chat template (the assistant's turn opened, thinking off), padded to
    max_length; the hidden states after layers 9, 18 and 27 (hidden_states[0] is the embedding) stacked per token:
    txt (B, max_length, 3 * width), the transformer's context (klein 4B: 3 x 2560). Its ids are text_ids."""

    LAYERS = (9, 18, 27)

    def __init__(self, model, tokenizer, max_length=512):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model.eval().requires_grad_(False), tokenizer, max_length

    @torch.no_grad()
    def forward(self, prompts):
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.max_length).to(self.model.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         output_hidden_states=True, use_cache=False)
        return torch.stack([out.hidden_states[k] for k in self.LAYERS], dim=2).flatten(2)

    @classmethod
    def from_folder(cls, folder, dtype=torch.bfloat16, device="cpu", max_length=512):
        """Read text_encoder/ (Qwen3, without its language-model head: only hidden states are used) and tokenizer/
        of a diffusers FLUX.2 [klein] folder."""
        from transformers import Qwen2TokenizerFast, Qwen3Model  # ~4 s to import: only here

        parts = fm.load_parts(folder, "FLUX.2 [klein]", dtype, [
            ("text_encoder", Qwen3Model, ["config.json"]),
            ("tokenizer", Qwen2TokenizerFast, ["tokenizer.json|vocab.json"])])
        return cls(parts["text_encoder"].to(device), parts["tokenizer"], max_length)

    @classmethod
    def tiny(cls, width=16, max_length=32, seed=0):
        """A random tiny Qwen3 (28 layers, so that 9, 18 and 27 are inner ones) with a byte tokenizer: the offline
        FLUX.2 demo's text encoder, txt (B, max_length, 3 * width) as the tiny transformer takes it."""
        from transformers import Qwen3Config, Qwen3Model  # ~4 s: only here

        torch.manual_seed(seed)
        qwen = Qwen3Model(Qwen3Config(vocab_size=ChatByteTokenizer.vocab_size, hidden_size=width,
                                      intermediate_size=2 * width, num_hidden_layers=28, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, pad_token_id=0, eos_token_id=1))
        return cls(qwen, ChatByteTokenizer(), max_length)


class ChatByteTokenizer(fm.ByteTokenizer):
    """The tiny demo's offline stand-in for Qwen's tokenizer: a plain chat template, byte tokens and their mask."""

    def apply_chat_template(self, messages, **_):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def __call__(self, prompts, max_length, **_):
        from transformers import BatchEncoding

        ids = super().__call__(prompts, max_length)["input_ids"]
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids != 0).long()})


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning of FLUX.2 [dev]: Mistral-3's hidden states, as Flux2Pipeline computes them

# black-forest-labs/flux2's system message for text-to-image (src/flux2/system_messages.py), as Flux2Pipeline sends it
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")


class Mistral3Conditioner(nn.Module):
    """Each prompt as a user turn after BFL's system message, through Mistral-3's chat template (no generation prompt),
    padded to max_length; the hidden states after layers 10, 20 and 30 stacked per token: txt (B, max_length,
    3 * width), FLUX.2 [dev]'s context (3 x Mistral-3 Small's 5120). "[IMG]" is removed from prompts first, as the
    pipeline does (Pixtral's processor counts image tokens). Its ids are text_ids."""

    LAYERS = (10, 20, 30)

    def __init__(self, model, processor, max_length=512):
        super().__init__()
        self.model, self.processor, self.max_length = model.eval().requires_grad_(False), processor, max_length

    @torch.no_grad()
    def forward(self, prompts):
        messages = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]
        tokens = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                    return_dict=True, return_tensors="pt", padding="max_length",
                                                    truncation=True, max_length=self.max_length)
        out = self.model(input_ids=tokens["input_ids"].to(self.model.device),
                         attention_mask=tokens["attention_mask"].to(self.model.device), output_hidden_states=True,
                         use_cache=False)
        return torch.stack([out.hidden_states[k] for k in self.LAYERS], dim=2).flatten(2)

    @classmethod
    def from_folder(cls, folder, dtype=torch.bfloat16, device="cpu", max_length=512):
        """Read text_encoder/ (Mistral-3 without its language-model head: only hidden states are used; its vision
        tower is loaded but never run) and tokenizer/ (Pixtral's processor) of a diffusers FLUX.2 [dev] folder."""
        from transformers import AutoProcessor, Mistral3Model  # slow to import: only here

        parts = fm.load_parts(folder, "FLUX.2 [dev]", dtype, [
            ("text_encoder", Mistral3Model, ["config.json"]),
            ("tokenizer", AutoProcessor, ["tokenizer.json"])])
        return cls(parts["text_encoder"].to(device), parts["tokenizer"], max_length)
