"""SRPO's claims, watched in the tiny world (issue 34; docs/world.md): each run of `srpo.py train` on the world
(the default demo) from several seeds, each final checkpoint sampled on every world prompt, and the images measured
by the world's judge (trained apart from the reward model) and by the statistics the claims name. One table, each
cell the mean over the seeds and their spread (half the range).

    python -m tools.world_claims                        # 3 seeds, every run below: ~20 min on 2 cores
    python -m tools.world_claims --seeds 0 1 --runs srpo+bright srpo+dark --out /tmp/claims
    python -m tools.world_claims --lr 1e-4         # a larger step: where hacking shows

The runs (each `train` with the world preset and these flags):
- srpo+bright / srpo+dark: SRPO with the words bright/dark, then swapped: SRP steers by words, so the images'
  mean luma and the share the judge reads bright move toward the positive word, the other way when swapped;
- no-inversion / refl: the ablation without the inversion branch, and ReFL (the plain reward at late steps): the
  paper's hacking, where the reward rises while what the captions say (the judge's agreement) falls;
- srpo-late: SRPO's branches on a late window (low noise) instead of its early one: Direct-Align's claim that early
  timesteps change the images' structure (their coarse layout: a low-pass image) and late ones their texture (the
  rest).

Columns: reward, the reward model's plain score of each prompt; bright, the share the judge reads bright (the
prompts leave the brightness out); luma, the images' mean luma; colour, size, shape, the share the judge reads as the
prompt says (caption agreement); structure and texture, the mean absolute change from the untrained model's images
from the same noise, of their 8 x 8 block means and of the rest.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import cli
from training import world, world_models
from weights import flux_weights, world_weights

RUNS = {"srpo+bright": ["--words", "bright", "dark"], "srpo+dark": ["--words", "dark", "bright"],
        "no-inversion": ["--words", "bright", "dark", "--no-inversion"], "refl": ["--method", "refl"],
        "srpo-late": ["--words", "bright", "dark", "--window", "40", "50"]}
COLUMNS = ("reward", "bright", "luma", "colour", "size", "shape", "structure", "texture")


def train(name, seed, out, budget):
    """`srpo.py train` on the world for run `name` from `seed`, quietly, its steps and lr the world preset's unless
    `budget` (a dict) says; -> its last checkpoint's weights file."""
    flags = ["train", "--demo", "world", *RUNS[name], "--seed", str(seed), "--out", out, "--samples", "0"]
    flags += [f for name, value in budget.items() if value for f in (f"--{name}", str(value))]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        cli.main(flags)
    last = max(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    return os.path.join(out, last, "diffusion_pytorch_model.safetensors")


def images_of(weights, models, texts, seeds):
    """The images of texts[i] from noise seeds[i] by the world's transformer with `weights` (None: the untrained
    one)."""
    model, ae, text = models
    if weights:
        model = flux_weights.load_transformer(weights, model.cfg, torch.float32, "cpu")
    return world_models.sample(model, ae, text, texts, seeds)


def measures(images, base, texts, judge, scorer):
    """The columns of images of `texts` (one each; base: the untrained model's images from the same noise)."""
    labels = world.labels_of(texts)
    logits = judge(F.avg_pool2d(images, 2))
    said = {name: (logits[name].argmax(dim=1) == torch.from_numpy(labels[name])).double().mean().item()
            for name in ("colour", "size", "shape")}
    bright = logits["brightness"].argmax(dim=1) == world.LABELS["brightness"].index("bright")
    low, base_low = (F.avg_pool2d(x, 8) for x in (images, base))
    high, base_high = (x - F.interpolate(lo, scale_factor=8) for x, lo in ((images, low), (base, base_low)))
    return {"reward": scorer.score(images, list(texts)).mean().item(),
            "luma": world.mean_luma(images).mean().item(), "bright": bright.double().mean().item(), **said,
            "structure": (low - base_low).abs().mean().item(), "texture": (high - base_high).abs().mean().item()}


def table(results):
    """Markdown: a row per run, each column's mean over the seeds +- half their range."""
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, rows in results.items():
        cells = [np.array([r[c] for r in rows]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(f"{v.mean():.3f} ± {np.ptp(v) / 2:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--steps", type=int, help="updates per run (default: the world preset's)")
    p.add_argument("--lr", type=float, help="learning rate of every run (default: the world preset's)")
    p.add_argument("--per-prompt", type=int, default=4, help="images of each of the 36 prompts, noise seeds 0, 1, ...")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    jobs = [(p, s) for p in world.prompts() + world.prompts(held_out=True) for s in range(args.per_prompt)]
    texts, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    models, scorer = world_weights.load_world(), world_weights.load_scorer()
    judge = world.load_judge(world_weights.JUDGE)
    base = images_of(None, models, texts, seeds)
    results = {"untrained": [measures(base, base, texts, judge, scorer)]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            for seed in args.seeds:
                out = os.path.join(args.out or tmp, f"{name}-{seed}")
                weights = train(name, seed, out, {"steps": args.steps, "lr": args.lr})
                images = images_of(weights, models, texts, seeds)
                results.setdefault(name, []).append(measures(images, base, texts, judge, scorer))
                print(f"{name} seed {seed}: {results[name][-1]}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
