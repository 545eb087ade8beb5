"""SRPO on FLUX.1-dev in one script.

    python srpo.py sample --flux FLUX_DIR --prompt "a cat" --out cat.png    # FLUX.1-dev, same image as diffusers
    python srpo.py sample                                                   # tiny built-in model, offline, seconds

Every command runs offline. Bad input ends in one line on stderr and exit code 2.
"""

import argparse
import math
import os
import sys

import torch

import flux_model as fm
from flux_model import InputError

# ----------------------------------------------------------------------------------------------------------------
# Sampling: flow matching, x_sigma = sigma * eps + (1 - sigma) * x0, the model predicts v ~ eps - x0.


def time_shift(mu, sigmas):
    """FLUX's resolution-dependent shift of a schedule: t' = e^mu / (e^mu + (1/t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_schedule(steps, seq_len, base_shift=0.5, max_shift=1.15, base_len=256, max_len=4096):
    """The FLUX.1-dev sigmas for `steps` Euler steps on seq_len packed tokens: linspace(1, 1/steps, steps), shifted
    with mu linear in seq_len (0.5 at 256 tokens, 1.15 at 4096), then 0 appended. float32, as diffusers computes."""
    m = (max_shift - base_shift) / (max_len - base_len)
    mu = seq_len * m + (base_shift - m * base_len)
    sigmas = time_shift(mu, torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float())
    return torch.cat([sigmas, torch.zeros(1)])


def euler_sample(model, x, sigmas, cond, guidance, progress=False):
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1]: x += (sigma_next - sigma) * v, in float32.

    cond = (img_ids, txt, txt_ids, y). The model sees sigma rounded through its dtype as diffusers passes it."""
    from tqdm import tqdm

    img_ids, txt, txt_ids, y = cond
    g = torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32)
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        t = (sigmas[i] * 1000).to(x.dtype).expand(x.shape[0]) / 1000
        v = model(x, img_ids, txt, txt_ids, y, t.to(x.device), g.to(x.dtype))
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
    return x


def initial_noise(batch, height, width, seed, dtype):
    """Packed N(0, I) latents drawn on the CPU exactly as diffusers' FluxPipeline draws them for this seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    return fm.pack(torch.randn((batch, 16, 2 * (height // 16), 2 * (width // 16)), generator=g, dtype=dtype))


def decode_images(ae, x, height, width):
    """Packed latents -> images in [0, 1], (B, 3, H, W)."""
    return (ae.decode(fm.unpack(x, height, width)) / 2 + 0.5).clamp(0, 1)


def save_png(images, out):
    """Write images (B, 3, H, W) in [0, 1]: `out` for one image, `stem-i.png` for several. Returns the paths."""
    from PIL import Image

    stem, ext = os.path.splitext(out)
    paths = [out] if len(images) == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(len(images))]
    for img, path in zip(images, paths, strict=True):
        pixels = (img.permute(1, 2, 0).float() * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(pixels).save(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Building the models


def tiny_models(seed=0):
    """The built-in tiny FLUX, autoencoder and text encoders, random with a fixed seed: no files, no downloads."""
    torch.manual_seed(seed)
    model = fm.Flux(fm.FluxConfig.preset("tiny")).eval()
    ae = fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).eval()
    text = fm.TextConditioner.tiny(model.cfg.context_in_dim, model.cfg.vec_in_dim, seed=seed)
    return model, ae, text


def load_flux_folder(flux_dir, transformer_file, dtype, device):
    """A diffusers FLUX.1 folder, optionally with replacement transformer weights (e.g. SRPO's file)."""
    fm.check_folder(flux_dir, "a diffusers FLUX.1 folder")
    sub = os.path.join(flux_dir, "transformer")
    cfg = fm.flux_config_from_diffusers(fm.read_json(os.path.join(sub, "config.json")), sub)
    model = fm.load_transformer(transformer_file or sub, cfg, dtype, device)
    ae = fm.load_autoencoder(os.path.join(flux_dir, "vae"), None, dtype, device)
    return model, ae


def parse_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: expected cpu, cuda or cuda:N")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive multiples of 16, got {height}x{width}")


# ----------------------------------------------------------------------------------------------------------------
# Direct-Align with SRPO's relative reward (python srpo.py train)


# ----------------------------------------------------------------------------------------------------------------
# Commands


@torch.no_grad()
def cmd_sample(args):
    check_size(args.height, args.width)
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    prompts = [args.prompt] * args.batch
    if args.flux:
        load_flux_folder(args.flux, args.transformer, dtype, "meta")  # check every file before the slow part
        text = fm.TextConditioner.from_folder(args.flux, dtype, device)
        txt, y = text(prompts)
        del text  # the text encoders (10 GB for T5-XXL) are not needed past this point
        model, ae = load_flux_folder(args.flux, args.transformer, dtype, device)
    else:
        if args.transformer:
            raise InputError("--transformer needs --flux (the folder that gives the config, VAE and text encoders)")
        model, ae, text = tiny_models()
        txt, y = text(prompts)
        model, ae = model.to(device, dtype), ae.to(device, dtype)
    model.set_attention_backend(args.attn or ("triton" if device.type == "cuda" else "sdpa"))
    x = initial_noise(args.batch, args.height, args.width, args.seed, txt.dtype).to(device, dtype)
    sigmas = flux_schedule(args.steps, x.shape[1])
    cond = (fm.image_ids(args.height, args.width, device).to(dtype), txt.to(dtype), torch.zeros(
        txt.shape[1], 3, device=device, dtype=dtype), y.to(dtype))
    x = euler_sample(model, x, sigmas, cond, args.guidance, progress=True)
    for path in save_png(decode_images(ae, x, args.height, args.width), args.out):
        print(path)


def build_parser():
    parser = argparse.ArgumentParser(prog="srpo.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images with FLUX.1-dev (or the tiny built-in model)",
                       description="Generate images. Without --flux, a tiny random model built in code runs offline.")
    p.add_argument("--flux", help="diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/)")
    p.add_argument("--transformer", help="replacement transformer weights: one .safetensors file, diffusers or BFL "
                   "keys (e.g. SRPO's diffusion_pytorch_model.safetensors)")
    p.add_argument("--prompt", default="a photo of a red fox in the snow", help="text prompt")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    p.add_argument("--guidance", type=float, default=3.5, help="distilled guidance scale (default 3.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives diffusers' image")
    p.add_argument("--batch", type=int, default=1, help="images for the prompt (diffusers' num_images_per_prompt)")
    p.add_argument("--out", default="sample.png", help="output PNG; with --batch N, OUT-0.png .. OUT-(N-1).png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else "
                   "float32)")
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "sample" and args.height is None:
        args.height = 1024 if args.flux else 64
    if args.command == "sample" and args.width is None:
        args.width = 1024 if args.flux else 64
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
