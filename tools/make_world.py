"""The tiny world's shipped weights (issue 34; docs/world.md), made again bit for bit on a CPU:

    python -m tools.make_world                 # every part into data/world, each file with its .json
    python -m tools.make_world --only scorer   # the parts named (a comma list of PARTS, made in PARTS' order)
    python -m tools.make_world --out /tmp/w    # elsewhere: `cmp` its .safetensors with the shipped ones

The parts (--only; default all):
- judge: the world's judge (training/world.py's Judge, a CNN of 22.5k parameters), trained on the world's labels
  from JudgeConfig's seed. It judges caption agreement apart from the reward model, which a hacking model fools
  first.
- scorer: the world's reward model (training/world_scorer.py), a tiny transformers CLIPModel of the ViT-H-14 layout
  on the byte-level tokenizer, trained contrastively on 64 x 64 world images and their captions (words left out,
  SRP's "word. prompt" form, near misses) and loaded as reward.HPSReward by world_weights.load_scorer; its JSON holds
  zero-shot accuracy per attribute, SRP's bright-minus-dark and large-minus-small rewards, and the plain score of the
  right caption against a wrong colour's.
- autoencoder: flux_model.AutoEncoder at a tiny config (training/world_models.py), 64 x 64 x 3 -> 8 x 8 x 16,
  trained by reconstruction; its held-out reconstruction error in the JSON.
- transformer: flux_model.Flux at width 128, pre-trained by flow matching on the autoencoder's latents (the one in
  --out) with captions through the tiny text encoders, then guidance-distilled; transformer.safetensors and the
  text encoders' text.safetensors, what the shipped judge reads in its samples in the JSON.
Beside each file a JSON says its seed, config, size, the seconds it took, the threads, its held-out measures and the
versions that made it (docs/world.md: the sizes, times and measures of the shipped files).

Bit for bit: one thread (a thread count changes the order of the convolutions' sums; two threads are 1.5x faster on
2 idle cores, 4x slower on 2 cores shared with other runs), the images drawn from seeds, torch's generators seeded,
the metadata's keys sorted (write_safetensors); the same torch, numpy and CPU kind give the same .safetensors bytes
(the JSON's seconds differ). Each run writes every part it names again, each from its own seed.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from common.util import write_json
from training import world, world_models, world_scorer
from weights import tensor_files, world_weights

HELD_OUT = 2000  # images the written judge and scorer are measured on
SAMPLES = 240  # held-out images the autoencoder, and prompts the transformer's samples, are measured on
SAMPLE_STEPS = 20  # Euler steps of the measured samples


def write_safetensors(path, state, metadata):
    """state's tensors as safetensors, the seed's bytes: tensor_files' writer with the names and the metadata's keys
    sorted (safetensors' own save writes its metadata in the order of a Rust hash map, which changes from one
    process to the next: two runs differed in their header alone). The shipped files, written by safetensors' save
    with the metadata sorted afterwards, come out byte for byte the same."""
    tensor_files.write_safetensors(path, [(name, state[name].shape, state[name].dtype) for name in sorted(state)],
                                   state.__getitem__, dict(sorted(metadata.items())), progress=False)


def make_judge(out, config):
    """Train the judge, write judge.safetensors and judge.json into out; the JSON's record."""
    start = time.perf_counter()
    judge = world.train_judge(config)
    seconds = time.perf_counter() - start
    path = os.path.join(out, "judge.safetensors")
    state = {name: t.contiguous() for name, t in judge.state_dict().items()}
    write_safetensors(path, state, world.judge_metadata(config))
    images, labels = world.draw(world.HELD_OUT_SEED, HELD_OUT, config.size, config.backgrounds)
    record = {"file": "judge.safetensors", "seed": config.seed, "config": asdict(config),
              "parameters": sum(t.numel() for t in state.values()), "bytes": os.path.getsize(path),
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "held_out_agreement": judge.agreement(world.to_tensor(images), labels),
              "made_by": "python -m tools.make_world", "torch": torch.__version__, "numpy": np.__version__}
    write_json(os.path.join(out, "judge.json"), record)
    return record


def make_scorer(out, config):
    """Train the world's CLIP scorer, write scorer.safetensors and scorer.json into out; the JSON's record, with
    the held-out measures of the file as load_scorer reads it back."""
    start = time.perf_counter()
    scorer = world_scorer.train_scorer(config, log=lambda step, loss: print(f"scorer step {step}: loss {loss:.4f} "
                                                                            f"({time.perf_counter() - start:.0f} s)",
                                                                            file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    path = os.path.join(out, "scorer.safetensors")
    state = {name: t.contiguous() for name, t in scorer.clip.state_dict().items()}
    write_safetensors(path, state, world_weights.scorer_metadata(config))
    record = {"file": "scorer.safetensors", "seed": config.seed, "config": asdict(config),
              "parameters": sum(t.numel() for t in state.values()), "bytes": os.path.getsize(path),
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(), "held_out_images": HELD_OUT,
              "held_out": world_scorer.measure(world_weights.load_scorer(path), HELD_OUT, config.draw_size),
              "made_by": "python -m tools.make_world --only scorer", "torch": torch.__version__,
              "numpy": np.__version__}
    write_json(os.path.join(out, "scorer.json"), record)
    return record


def save_module(out, name, module, config):
    """Write out/name.safetensors (module's weights, its config in the metadata); its path."""
    path = os.path.join(out, f"{name}.safetensors")
    write_safetensors(path, world_models.state_of(module), world_weights.metadata(config))
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
    ae = world_weights.read_module(os.path.join(out, "autoencoder.safetensors"), "autoencoder",
                                  world_weights.build_autoencoder)
    text = world_models.text_encoders(config)
    start = time.perf_counter()
    model = world_models.train_transformer(config, ae, text)
    seconds = time.perf_counter() - start
    save_module(out, "text", text, world_models.text_config(config))
    path = save_module(out, "transformer", model, asdict(model.cfg))
    judge = world.load_judge(world_weights.JUDGE)
    record = record_of(path, model, config, seconds, {
        "text_bytes": os.path.getsize(os.path.join(out, "text.safetensors")),
        "samples": world_models.judged_samples(model, ae, text, judge, prompts, steps)})
    write_json(os.path.join(out, "transformer.json"), record)
    return record


# --only's part names, in the order they are made (the transformer trains on the autoencoder in --out) -> the make
# function and its config from the flags
PARTS = {"judge": lambda out, args: make_judge(out, world.JudgeConfig(seed=args.seed, steps=args.judge_steps)),
         "scorer": lambda out, args: make_scorer(out, world_weights.ScorerConfig(seed=args.seed,
                                                                                 steps=args.scorer_steps)),
         "autoencoder": lambda out, args: make_autoencoder(out, world_models.AutoEncoderTraining(seed=args.seed)),
         "transformer": lambda out, args: make_transformer(out, world_models.TransformerTraining(seed=args.seed))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("data", "world"), help="the folder (default data/world)")
    p.add_argument("--seed", type=int, default=world.JudgeConfig.seed)
    p.add_argument("--judge-steps", type=int, default=world.JudgeConfig.steps)
    p.add_argument("--scorer-steps", type=int, default=world_weights.ScorerConfig.steps)
    p.add_argument("--only", default=",".join(PARTS), help=f"the parts to (re)make, a comma list of {', '.join(PARTS)} "
                                                          "(default: all)")
    args = p.parse_args(argv)
    parts = args.only.split(",")
    if unknown := [part for part in parts if part not in PARTS]:
        p.error(f"--only: unknown part(s) {', '.join(unknown)} (the parts: {', '.join(PARTS)})")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # bit for bit: see the docstring; tiny tensors gain nothing from threads anyway
    records = {part: make(args.out, args) for part, make in PARTS.items() if part in parts}
    json.dump(records, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
