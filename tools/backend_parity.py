"""The tiny FLUX.1 and FLUX.2 transformers on the Triton kernels against torch SDPA: the velocity and every weight
gradient, through each family's conditioning (FLUX.2's tiny klein-base-like model with its CFG's two passes), in
fp32, in bf16 and in fp32 under bf16 autocast (as training runs). On a GPU the kernels run compiled, the check
tools/gpu_check.sh makes; elsewhere run it under the Triton interpreter, fp32 only:

    python -m tools.backend_parity                       # on a GPU
    TRITON_INTERPRET=1 python -m tools.backend_parity    # on a CPU (kernels must be interpreted to run there)

Prints one line per case, OK or FAIL, and exits 1 if any failed."""

import sys

import torch

import families
from flux_kernels.dispatch import INTERPRETED

PROMPTS = ["a red fox in the snow", "two dogs on a beach"]
HEIGHT, WIDTH = 64, 96  # non-square: 4 x 6 tokens
# (weights, autocast, tolerance on the velocity): gradients sum over many tokens, so theirs is 10 times looser
CASES = ((torch.float32, False, 1e-5), (torch.bfloat16, False, 2e-2), (torch.float32, True, 2e-2))


def velocity_and_grads(model, cond, x, t, guidance, autocast):
    """v = cond.velocity(model, x, t, g) and the weight gradients of mean(v^2), both in fp32."""
    model.zero_grad()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        v = cond.velocity(model, x, t, guidance)
    v.float().square().mean().backward()
    return v.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def parity(family, dtype, autocast, device):
    """(relative error of the velocity, of the weight gradients): max |triton - sdpa| / max |sdpa|, on the tiny demo's
    models as training builds them (family.tiny_frozen_parts: FLUX.2's text with the negative prompt)."""
    _, text, _, load = family.tiny_frozen_parts("cpu", dtype)
    model = load(device)
    cond = family.conditioning(text(PROMPTS), HEIGHT, WIDTH, device, dtype)
    x = families.noise_of(model)(len(PROMPTS), HEIGHT, WIDTH, 0, torch.float32).to(device, dtype)
    t, guidance = (torch.full((len(PROMPTS),), value, device=device, dtype=dtype) for value in (0.7, 3.5))
    out = {}
    for backend in ("sdpa", "triton"):
        model.set_attention_backend(backend)
        out[backend] = velocity_and_grads(model, cond, x, t, guidance, autocast)
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out["triton"], out["sdpa"], strict=True)]


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not INTERPRETED:
        sys.exit("without a GPU the kernels run only under TRITON_INTERPRET=1 (else triton would be their torch "
                 "reference, and the check empty): TRITON_INTERPRET=1 python -m tools.backend_parity")
    cases = CASES if device.type == "cuda" else CASES[:1]  # the interpreter's bf16 is not the GPU's
    failed = False
    for family in families.FAMILIES:
        for dtype, autocast, tol in cases:
            err = parity(family, dtype, autocast, device)
            ok = err[0] <= tol and err[1] <= 10 * tol
            failed |= not ok
            print(f"tiny {family.title} {dtype}{' + bf16 autocast' if autocast else ''} on {device.type}: triton vs "
                  f"sdpa rel. err. velocity {err[0]:.1e}, weight grads {err[1]:.1e}:", "OK" if ok else "FAIL")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
