"""The tiny world's shipped weights (issue 34; docs/world.md), made again bit for bit on a CPU:

    python -m tools.make_world                 # every part into data/world: judge, scorer (+ their .json)
    python -m tools.make_world --only scorer   # the parts named (a comma list of PARTS: judge, scorer)
    python -m tools.make_world --out /tmp/w    # elsewhere: `cmp` its .safetensors with the shipped ones

What it makes so far: the world's judge (training/world.py's Judge, a CNN of 22.5k parameters), trained on the
world's labels (colour, shape, brightness, size, background) from JudgeConfig's seed. It judges caption agreement
apart from the reward model, which a hacking model fools first. Beside each file a JSON says its seed, config, size,
the seconds it took, its held-out agreement and the versions that made it.

The scorer (`--only scorer`, training/world_scorer.py; docs/world.md has its numbers): the world's reward model, a
tiny transformers CLIPModel of the ViT-H-14 layout (304k parameters, 1.2 MB) on the byte-level tokenizer, trained
contrastively on 64 x 64 world images and their captions (words left out, SRP's "word. prompt" form, near misses)
and loaded as reward.HPSReward by world_weights.load_scorer. Its JSON adds the held-out measures: zero-shot accuracy
per attribute over the 72 full captions, SRP's bright-minus-dark and large-minus-small rewards, and the plain
score of the right caption against a wrong colour's.

Bit for bit: one thread (a thread count changes the order of the convolutions' sums; for the scorer two threads
are 1.5x faster on 2 idle cores, 4x slower on 2 cores shared with other runs), the images drawn from seeds, torch's
generators seeded, the metadata's keys sorted (write_safetensors); the same torch, numpy and CPU kind give the same
.safetensors bytes (the JSON's seconds differ). Each run writes every part it names again, each from its own seed.

What the later pieces add here, in this order, each in training/world.py on the project's own classes at tiny sizes
(a quick plain-PyTorch experiment on 2 cores measured versions of them: the sizes and minutes below):
1. the autoencoder: flux_model.AutoEncoder at a tiny config, 32x32x3 images -> 8x8x4 latents (~177k parameters,
   ~2 min), trained on world images by reconstruction; data/world/autoencoder.safetensors;
2. (made: the scorer above) the tiny CLIP scorer, trained contrastively on (image, caption) pairs and used through
   the HPS class (reward.py) as the reward, so that its words (bright, dark, small, large, ...) mean something;
3. the tiny FLUX transformer (flux_model.Flux, width ~128, ~1.3 M parameters, ~6 min or more for sharp shapes)
   pre-trained by flow matching on the autoencoder's latents with the captions through the tiny text encoders, so
   that `sample` draws what a caption says (the judge checks it: colour, brightness, shape);
4. `python srpo.py train` by default on this world, prompts from world.captions(..., leave_out=("brightness",))
   and control words the scorer understands; the random-model demo kept as an option for the tests; then the
   measured claims (issue 34) in one tools/ command with a seed sweep, the judge beside training/hacking.py.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import save

from common.util import atomic_write, write_json
from training import world, world_scorer
from weights import world_weights

HELD_OUT = 2000  # images the written judge is measured on


def write_safetensors(path, state, metadata):
    """safetensors.torch.save's file, atomically, its metadata's keys sorted: safetensors (0.8) writes them in the
    order of a Rust hash map, which changes from one process to the next while the tensors' bytes do not (two runs
    differed in their header alone), and the file is to be the seed's bytes. The header is padded with spaces to
    8 bytes, as safetensors pads it; the tensors' offsets count from its end, so they stand."""
    data = save(state, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    payload = len(text).to_bytes(8, "little") + text + data[8 + length:]

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
    atomic_write(path, write)


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


# --only's part names -> (the make function, its config from the flags)
PARTS = {"judge": lambda out, args: make_judge(out, world.JudgeConfig(seed=args.seed, steps=args.judge_steps)),
         "scorer": lambda out, args: make_scorer(out, world_weights.ScorerConfig(seed=args.seed,
                                                                                 steps=args.scorer_steps))}


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
    records = {part: PARTS[part](args.out, args) for part in parts}
    json.dump(records, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
