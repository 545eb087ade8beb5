"""The tiny FLUX.1 and FLUX.2 transformers on the Triton kernels against torch SDPA: the velocity and every weight
gradient, through each family's conditioning (FLUX.2's tiny klein-base-like model with its CFG's two passes), in
fp32, in bf16 and in fp32 under bf16 autocast (as training runs). Then one FLUX-shaped double block, FLUX.1-dev's
(24 heads of 128) at 1024 x 1024 (512 text + 4,096 image tokens), fp32 weights under bf16 autocast: its output and
weight gradients, to the tiny models' autocast tolerance (2e-2, the gradients 2e-1). On a GPU the kernels run
compiled, the check tools/gpu_check.sh makes; elsewhere run it under the Triton interpreter, fp32 only, the block at
2 heads of 128 and 37 tokens:

    python -m tools.backend_parity                       # on a GPU
    TRITON_INTERPRET=1 python -m tools.backend_parity    # on a CPU (kernels must be interpreted to run there)

Prints one line per case, OK or FAIL, and exits 1 if any failed."""

import sys

import torch

import families
import flux_model as fm
from flux_kernels.dispatch import INTERPRETED

PROMPTS = ["a red fox in the snow", "two dogs on a beach"]
HEIGHT, WIDTH = 64, 96  # non-square: 4 x 6 tokens
# (weights, autocast, tolerance on the velocity): gradients sum over many tokens, so theirs is 10 times looser
CASES = ((torch.float32, False, 1e-5), (torch.bfloat16, False, 2e-2), (torch.float32, True, 2e-2))
# One double block: (config, text tokens, image height, width in pixels); the interpreter's at FLUX's head width
FLUX_BLOCK = (fm.FluxConfig.preset("flux-dev"), 512, 1024, 1024)
TINY_BLOCK = (fm.FluxConfig(hidden_size=256, num_heads=2), 7, 80, 96)


def errors(module, run, autocast, device):
    """(relative error of y = run(backend), of the weight gradients of mean(y^2)): max |triton - sdpa| / max |sdpa|,
    both in fp32, y computed under bf16 autocast when asked."""
    out = {}
    for backend in ("sdpa", "triton"):
        module.zero_grad()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            y = run(backend)
        y.float().square().mean().backward()
        out[backend] = y.float(), torch.cat([p.grad.float().flatten() for p in module.parameters()])
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out["triton"], out["sdpa"], strict=True)]


def parity(family, dtype, autocast, device):
    """(relative error of the velocity, of the weight gradients): max |triton - sdpa| / max |sdpa|, on the tiny demo's
    models as training builds them (family.tiny_frozen_parts: FLUX.2's text with the negative prompt)."""
    _, text, _, load = family.tiny_frozen_parts("cpu", dtype, "random")
    model = load(device)
    cond = family.conditioning(text(PROMPTS), HEIGHT, WIDTH, device, dtype)
    x = families.noise_of(model)(len(PROMPTS), HEIGHT, WIDTH, 0, torch.float32).to(device, dtype)
    t, guidance = (torch.full((len(PROMPTS),), value, device=device, dtype=dtype) for value in (0.7, 3.5))

    def velocity(backend):
        model.set_attention_backend(backend)
        return cond.velocity(model, x, t, guidance)

    return errors(model, velocity, autocast, device)


def block_parity(cfg, text_tokens, height, width, autocast, device):
    """errors() of one FLUX.1 double block (random fp32 weights, seed 0) on random text and image streams at RoPE's
    positions of a height x width image: y = its two streams' outputs, [txt, img]."""
    torch.manual_seed(0)
    block = fm.DoubleStreamBlock(cfg).to(device)
    txt, img = (torch.randn(1, n, cfg.hidden_size, device=device) for n in (text_tokens, height * width // 256))
    vec = torch.randn(1, cfg.hidden_size, device=device)
    ids = torch.cat([torch.zeros(text_tokens, 3), fm.image_ids(height, width)]).to(device)
    pe = fm.rope_freqs(ids, cfg.axes_dim, cfg.theta)

    def streams(backend):
        block.backend = backend
        img_out, txt_out = block(img, txt, vec, pe)
        return torch.cat([txt_out, img_out], 1)

    return errors(block, streams, autocast, device)


def report(what, err, tol):
    """Print the case's line; True if it is within tol (the weight gradients within 10 tol: they sum over tokens)."""
    ok = err[0] <= tol and err[1] <= 10 * tol
    print(f"{what}: triton vs sdpa rel. err. output {err[0]:.1e}, weight grads {err[1]:.1e}:", "OK" if ok else "FAIL")
    return ok


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not INTERPRETED:
        sys.exit("without a GPU the kernels run only under TRITON_INTERPRET=1 (else triton would be their torch "
                 "reference, and the check empty): TRITON_INTERPRET=1 python -m tools.backend_parity")
    gpu = device.type == "cuda"
    cases = CASES if gpu else CASES[:1]  # the interpreter's bf16 is not the GPU's
    ok = []
    for family in families.FAMILIES:
        for dtype, autocast, tol in cases:
            ok.append(report(f"tiny {family.title} {dtype}{' + bf16 autocast' if autocast else ''} on {device.type}",
                             parity(family, dtype, autocast, device), tol))
    cfg, text_tokens, height, width = FLUX_BLOCK if gpu else TINY_BLOCK
    _, autocast, tol = CASES[2] if gpu else CASES[0]
    ok.append(report(f"FLUX.1 double block, {cfg.num_heads} heads x {cfg.head_dim}, "
                     f"{text_tokens + height * width // 256} tokens{' + bf16 autocast' if autocast else ''} on "
                     f"{device.type}", block_parity(cfg, text_tokens, height, width, autocast, device), tol))
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
