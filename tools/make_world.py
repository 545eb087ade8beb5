"""The tiny world's shipped weights (issue 34; docs/world.md), made again bit for bit on a CPU:

    python -m tools.make_world                 # data/world/: every part, each file with its .json
    python -m tools.make_world --out /tmp/w --only autoencoder,transformer    # elsewhere: `cmp` with the shipped

The parts (--only, in this order; default all):
- judge: the world's judge (training/world.py's Judge, a CNN of 22.5k parameters), trained on the world's labels
  from JudgeConfig's seed. It judges caption agreement apart from the reward model, which a hacking model fools
  first. ~100 s on 2 busy cores.
- autoencoder: flux_model.AutoEncoder at a tiny config (training/world_models.py), 64 x 64 x 3 -> 8 x 8 x 16,
  trained by reconstruction; autoencoder.safetensors, its held-out reconstruction error in the JSON.
- transformer: flux_model.Flux at width 128, pre-trained by flow matching on the autoencoder's latents (the one in
  --out) with captions through the tiny text encoders, then guidance-distilled; transformer.safetensors and the
  text encoders' text.safetensors, what the shipped judge reads in its samples in the JSON.
Beside each file a JSON says its seed, config, size, the seconds it took, the threads, its held-out measures and the
versions that made it. (docs/world.md: the sizes, times and measures of the shipped files.)

Bit for bit: one thread (a thread count changes the order of the convolutions' sums; and two were slower than one
for these sizes on 2 shared cores), the images drawn from seeds, torch's generators seeded; the same torch, numpy
and CPU kind give the same .safetensors bytes (the JSON's seconds differ).

What the later pieces add here: the tiny CLIP scorer, trained contrastively on (image, caption) pairs and used
through the HPS class (reward.py) as the reward; then `python srpo.py train` by default on this world, prompts from
world.captions(..., leave_out=("brightness",)) and control words the scorer understands, and the measured claims
(issue 34) in one tools/ command with a seed sweep, the judge beside training/hacking.py.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import save_file

from common.util import atomic_write, write_json
from training import world, world_models

HELD_OUT = 2000  # images the written judge is measured on
SAMPLES = 240  # held-out images the autoencoder, and prompts the transformer's samples, are measured on
SAMPLE_STEPS = 20  # Euler steps of the measured samples
JUDGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "world", "judge.safetensors")
PARTS = ("judge", "autoencoder", "transformer")  # the transformer is trained on the autoencoder in --out


def make_judge(out, config):
    """Train the judge, write judge.safetensors and judge.json into out; the JSON's record."""
    start = time.perf_counter()
    judge = world.train_judge(config)
    seconds = time.perf_counter() - start
    path = os.path.join(out, "judge.safetensors")
    state = {name: t.contiguous() for name, t in judge.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=world.judge_metadata(config)))
    images, labels = world.draw(world.HELD_OUT_SEED, HELD_OUT, config.size, config.backgrounds)
    record = {"file": "judge.safetensors", "seed": config.seed, "config": asdict(config),
              "parameters": sum(t.numel() for t in state.values()), "bytes": os.path.getsize(path),
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "held_out_agreement": judge.agreement(world.to_tensor(images), labels),
              "made_by": "python -m tools.make_world", "torch": torch.__version__, "numpy": np.__version__}
    write_json(os.path.join(out, "judge.json"), record)
    return record


def save_module(out, name, module, config):
    """Write out/name.safetensors (module's weights, its config in the metadata); its path."""
    path = os.path.join(out, f"{name}.safetensors")
    state = world_models.state_of(module)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=world_models.metadata(config)))
    return path


def record_of(path, module, config, seconds, measures):
    """The JSON record beside a written file."""
    return {"file": os.path.basename(path), "seed": config.seed, "config": asdict(config),
            "parameters": sum(t.numel() for t in module.state_dict().values()), "bytes": os.path.getsize(path),
            "seconds": round(seconds, 1), "threads": torch.get_num_threads(), **measures,
            "made_by": "python -m tools.make_world", "torch": torch.__version__, "numpy": np.__version__}


def make_autoencoder(out, config, images=SAMPLES):
    """Train the autoencoder, write autoencoder.safetensors and autoencoder.json into out; the JSON's record, with
    the reconstruction's mean squared error on `images` held-out images."""
    start = time.perf_counter()
    ae = world_models.train_autoencoder(config)
    seconds = time.perf_counter() - start
    path = save_module(out, "autoencoder", ae, asdict(ae.cfg))
    record = record_of(path, ae, config, seconds, {
        "scale_factor": ae.cfg.scale_factor, "shift_factor": ae.cfg.shift_factor,
        "held_out_mse": round(world_models.reconstruction_mse(ae, images), 6)})
    write_json(os.path.join(out, "autoencoder.json"), record)
    return record


def make_transformer(out, config, prompts=SAMPLES, steps=SAMPLE_STEPS):
    """Train the transformer on out/autoencoder.safetensors' latents, write transformer.safetensors, the text
    encoders' text.safetensors and transformer.json into out; the JSON's record, with what the shipped judge reads
    in its samples of `prompts` held-out captions at `steps` Euler steps (world_models.judged_samples)."""
    ae = world_models.read_module(os.path.join(out, "autoencoder.safetensors"), "autoencoder",
                                  world_models.build_autoencoder)
    text = world_models.text_encoders(config)
    start = time.perf_counter()
    model = world_models.train_transformer(config, ae, text)
    seconds = time.perf_counter() - start
    save_module(out, "text", text, world_models.text_config(config))
    path = save_module(out, "transformer", model, asdict(model.cfg))
    judge = world.load_judge(JUDGE)
    record = record_of(path, model, config, seconds, {
        "text_bytes": os.path.getsize(os.path.join(out, "text.safetensors")),
        "samples": world_models.judged_samples(model, ae, text, judge, prompts, steps)})
    write_json(os.path.join(out, "transformer.json"), record)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("data", "world"), help="the folder (default data/world)")
    p.add_argument("--seed", type=int, default=world.JudgeConfig.seed)
    p.add_argument("--judge-steps", type=int, default=world.JudgeConfig.steps)
    p.add_argument("--only", default=",".join(PARTS), help=f"the parts to (re)make, of {','.join(PARTS)} (default all)")
    args = p.parse_args(argv)
    parts = args.only.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--only: unknown part(s) {sorted(set(parts) - set(PARTS))}; the parts are {','.join(PARTS)}")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # bit for bit: see the docstring; tiny tensors gain nothing from threads anyway
    makers = {"judge": lambda: make_judge(args.out, world.JudgeConfig(seed=args.seed, steps=args.judge_steps)),
              "autoencoder": lambda: make_autoencoder(args.out, world_models.AutoEncoderTraining(seed=args.seed)),
              "transformer": lambda: make_transformer(args.out, world_models.TransformerTraining(seed=args.seed))}
    for part in PARTS:
        if part in parts:
            json.dump(makers[part](), sys.stdout, indent=2)
            print()


if __name__ == "__main__":
    main()
