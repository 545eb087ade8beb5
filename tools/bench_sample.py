"""Time per sampling step: ours (`sampler.euler_sample`) vs diffusers' FluxPipeline, same weights, same steps.

    python -m tools.bench_sample [--steps 8 --repeat 5 --threads N --configs tiny small]

Both start from the same noise and text embeddings (text encoding is not timed) and end at packed latents; the
script checks that they agree, then prints a table. diffusers is a test-only dependency (requirements-dev.txt).
"""

import argparse
import tempfile
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import flux_model as fm
from sampling import flux_sampling, sampler
from weights import flux_weights


def best_times(fns, repeat):
    """The best of `repeat` wall times of each function, the functions interleaved so that a busy machine
    slows them alike."""
    times = [[] for _ in fns]
    for _ in range(repeat + 1):  # the first round warms up
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t[1:]) for t in times]


CONFIGS = {  # name: (FluxConfig, image side in pixels, text tokens)
    "tiny": (fm.FluxConfig.preset("tiny"), 64, 32),  # what `srpo.py sample` runs by default
    "small": (fm.FluxConfig(vec_in_dim=64, context_in_dim=128, hidden_size=256, num_heads=4, depth=2,
                            depth_single_blocks=4, axes_dim=(16, 24, 24)), 256, 64),
}


@torch.no_grad()
def bench(cfg, size, text, steps, repeat):
    """(ms per step ours, ms per step diffusers, relative difference of the final latents)."""
    torch.manual_seed(0)
    diffusers_cfg = flux_weights.flux_config_to_diffusers(cfg)
    ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_cfg.items() if k[0] != "_"}).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = flux_weights.load_transformer(d)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[16, 32, 32, 32], latent_channels=16, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    txt, y = torch.randn(1, text, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim)

    def theirs():
        return pipe(prompt_embeds=txt, pooled_prompt_embeds=y, height=size, width=size, guidance_scale=3.5,
                    num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent").images

    def mine():
        x = flux_sampling.initial_noise(1, size, size, 0, torch.float32)
        cond = flux_sampling.Conditioning(fm.image_ids(size, size), txt, torch.zeros(text, 3), y)
        return sampler.euler_sample(ours, x, sampler.flux_schedule(steps, x.shape[1]), cond, 3.5)

    err = ((mine() - theirs()).abs().max() / theirs().abs().max()).item()
    t_ours, t_theirs = best_times([mine, theirs], repeat)
    return 1e3 * t_ours / steps, 1e3 * t_theirs / steps, err


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=tuple(CONFIGS), help="the rows to time")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"float32, {a.steps} steps, {a.threads} CPU threads, best of {a.repeat}, torch {torch.__version__}\n")
    print("| config | width x blocks | tokens (image + text) | diffusers ms/step | ours ms/step | ours / diffusers "
          "| latents rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name in a.configs:
        cfg, size, text = CONFIGS[name]
        ours, theirs, err = bench(cfg, size, text, a.steps, a.repeat)
        print(f"| {name} | {cfg.hidden_size} x ({cfg.depth} + {cfg.depth_single_blocks}) | {(size // 16) ** 2} + "
              f"{text} | {theirs:.2f} | {ours:.2f} | {ours / theirs:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
