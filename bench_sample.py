"""Time per sampling step: ours (`srpo.euler_sample`) vs diffusers' FluxPipeline, same weights, same steps.

    python bench_sample.py [--hidden 256 --heads 4 --depth 2 --single 4 --size 256 --text 64 --steps 8 --repeat 3]

Both start from the same noise and text embeddings (text encoding is not timed) and end at packed latents; the
script checks that they agree, then prints a table. diffusers is a test-only dependency (requirements-dev.txt).
"""

import argparse
import tempfile
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import flux_model as fm
import srpo


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


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (tokens = (size/16)^2)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    head = a.hidden // a.heads
    axes = (head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8)
    cfg = fm.FluxConfig(vec_in_dim=64, context_in_dim=128, hidden_size=a.hidden, num_heads=a.heads, depth=a.depth,
                        depth_single_blocks=a.single, axes_dim=axes)
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**{k: v for k, v in fm.flux_config_to_diffusers(cfg).items() if k[0] != "_"}).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = fm.load_transformer(d)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[16, 32, 32, 32], latent_channels=16, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    txt, y = torch.randn(1, a.text, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim)

    def theirs():
        return pipe(prompt_embeds=txt, pooled_prompt_embeds=y, height=a.size, width=a.size, guidance_scale=3.5,
                    num_inference_steps=a.steps, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent").images

    def mine():
        x = srpo.initial_noise(1, a.size, a.size, 0, torch.float32)
        cond = (fm.image_ids(a.size, a.size), txt, torch.zeros(a.text, 3), y)
        return srpo.euler_sample(ours, x, srpo.flux_schedule(a.steps, x.shape[1]), cond, 3.5)

    err = ((mine() - theirs()).abs().max() / theirs().abs().max()).item()
    t_ours, t_theirs = (t / a.steps for t in best_times([mine, theirs], a.repeat))
    print(f"config: hidden {a.hidden}, {a.heads} heads, {a.depth} double + {a.single} single blocks, "
          f"{(a.size // 16) ** 2} image + {a.text} text tokens, {a.steps} steps, float32, {a.threads} CPU threads; "
          f"latents agree to {err:.1e} relative")
    print("| sampler | ms / step | ratio to diffusers |\n|---|---|---|")
    print(f"| diffusers FluxPipeline | {1e3 * t_theirs:.2f} | 1.00 |")
    print(f"| ours (srpo.euler_sample) | {1e3 * t_ours:.2f} | {t_ours / t_theirs:.2f} |")


if __name__ == "__main__":
    main()
