"""The command line of srpo.py: one parser, each flag defined once; TrainConfig <-> flags in one place (every field
of the config is a flag of `train`, its default the official run's, the reward recipe's or the tiny demo's)."""

import argparse
import math
import os
from dataclasses import fields

import torch

import reward
from sampling import DEFAULT_PROMPT
from util import InputError, check_folder


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a value that does not parse) on one line as every other error of
    srpo.py, rather than after a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class Bounded:
    """A numeric flag's type and valid range, stated once: argparse parses the text with it, check_ranges refuses
    a value outside the range before anything is read or built, and TrainConfig checks its fields with the same
    object. A float must be finite; low and high are inclusive unless open; why says where a bound comes from."""

    def __init__(self, kind, low=None, high=None, *, open_low=False, open_high=False, why=""):
        assert kind is float or (low is not None and high is not None), "an integer flag needs both bounds"
        self.kind, self.low, self.high, self.open_low, self.open_high, self.why = (kind, low, high, open_low,
                                                                                   open_high, why)

    def __call__(self, text):
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                             f"{self.describe()}, got {text!r}") from None

    def describe(self):
        """The range in words, e.g. 'at least 1 and at most 1000' or 'a finite number in [0, 1)'."""
        why = f" ({self.why})" if self.why else ""
        if self.kind is int:
            return f"at least {self.low} and at most {self.high}{why}"
        if self.low is not None and self.high is not None:
            return (f"a finite number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.open_high else ']'}{why}")
        if self.low is not None:
            return f"a finite number {'>' if self.open_low else '>='} {self.low:g}{why}"
        return f"a finite number{why}"

    def fits(self, v):
        if isinstance(v, float) and not math.isfinite(v):
            return False
        low = self.low is None or (v > self.low if self.open_low else v >= self.low)
        return low and (self.high is None or (v < self.high if self.open_high else v <= self.high))

    def check(self, flag, value):
        """value (or each of a pair) in range, else a one-line InputError naming the flag."""
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if not self.fits(v):
                raise InputError(f"{flag} must be {self.describe()}, got {v}")


# The valid ranges, each bound with its reason (it is printed with the error): an integer is bounded on both sides,
# so that no value makes a run build a list, a schedule or a batch that fills the memory before it fails.
STEPS_MAX = 1_000_000
FINITE = Bounded(float)
POSITIVE = Bounded(float, 0, open_low=True)
NON_NEGATIVE = Bounded(float, 0)
GUIDANCE = Bounded(float, 0, why="a negative scale is outside what FLUX.1-dev was distilled on")
SEED = Bounded(int, 0, 2**64 - 1, why="what torch.Generator takes")
SIZE = Bounded(int, 16, 4096, why="multiples of 16; 4096 = 65,536 image tokens, 16 times FLUX.1's 1024 x 1024")
TIMESTEPS = Bounded(int, 1, 1000, why="FlowMatch's 1000 training timesteps")
RUN_STEPS = Bounded(int, 1, STEPS_MAX, why="50,000 times the official run's 19 updates")
BETA = Bounded(float, 0, 1, open_high=True, why="AdamW's moment decay")
IMAGES_PER_PROMPT = Bounded(int, 1, 64, why="made in one batch: memory grows with it")
TOKENS = Bounded(int, 1, 512, why="T5 tokens, FluxPipeline's limit")
WINDOW_POINTS = Bounded(int, 11, 100_000, why="100 times the official 1000")


def check_ranges(parser, args):
    """Every numeric flag of the command within its range (Bounded), before any file is read or model built."""
    command = next(a for a in parser._actions if a.dest == "command").choices[args.command]
    for action in command._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Bounded) and value is not None:
            action.type.check(action.option_strings[0], value)


REWARD_MODELS = {"hps": "--hps CKPT, HPSv2.1's HPS_v2.1_compressed.pt", "pickscore": "--pickscore DIR, a "
                 "transformers folder of PickScore_v1", "clip": "--clip DIR, a transformers folder of CLIP-ViT-H-14"}


def build_parser(config, demo, recipes):
    """The parser of the three commands. config is the TrainConfig class (its docstring is `train`'s usage), demo
    and recipes the tiny demo's and each reward's defaults."""
    parser = Parser(prog="srpo.py", description="SRPO on FLUX.1-dev: train, sample and score.")
    sub = parser.add_subparsers(dest="command", required=True)
    sample_flags(sub.add_parser("sample", help="generate images with a FLUX.1 model (or the tiny built-in one)",
                                description="Generate images. Without --flux, a tiny random model built in code "
                                "runs offline."))
    train = sub.add_parser("train", help="SRPO fine-tuning of FLUX.1-dev (or the tiny offline demo)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{config.__doc__}\n\n{recipe_table(config, recipes)}")
    train_flags(train)
    add_config_flags(train, config, demo, recipes)
    score_flags(sub.add_parser("score", help="score images with HPSv2/2.1 (or PickScore, CLIP), or SRPO's relative "
                               "reward", description=reward.cmd_score.__doc__))
    for command in sub.choices.values():  # --help states each range as the error line would
        for action in command._actions:
            if isinstance(action.type, Bounded):
                action.help += f"; valid: {action.type.describe()}"
    return parser


def parse_args(parser, argv):
    """The parsed command line, with the defaults that depend on other flags filled in."""
    args = parser.parse_args(argv)
    if args.command == "sample":  # the tiny built-in model is small and offline: its own defaults
        for name, real, tiny in [("height", 1024, 64), ("width", 1024, 64), ("max_sequence_length", 512, 32),
                                  ("out", "samples" if args.prompts else "sample.png", None)]:
            if getattr(args, name) is None:
                setattr(args, name, real if args.flux or tiny is None else tiny)
    return args


def device_flags(p, device_help):
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=device_help)
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")


def sample_flags(p):
    p.add_argument("--flux", help="diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/; "
                   "its scheduler/scheduler_config.json sets the schedule, FLUX.1-dev's when absent)")
    p.add_argument("--transformer", help="replacement transformer weights: one .safetensors file, diffusers or BFL "
                   "keys (e.g. SRPO's diffusion_pytorch_model.safetensors); without --flux, a tiny demo checkpoint's")
    p.add_argument("--prompt", default=None, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts", help="prompt file, one per line: the images of line i (from 0) go to --out/i.png "
                   "(00000.png, ...), listed with their prompts in --out/images.jsonl; the models load once, and a "
                   "run started again skips the prompts whose images exist")
    p.add_argument("--height", type=SIZE, default=None, help="image height, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--width", type=SIZE, default=None, help="image width, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--steps", type=TIMESTEPS, default=50, help="Euler steps (default 50; FLUX.1-schnell: 4)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="distilled guidance scale (default 3.5; ignored, "
                   "with a note, by a transformer without a guidance embedding such as FLUX.1-schnell's)")
    p.add_argument("--max-sequence-length", type=TOKENS, default=None, metavar="N",
                   help="T5 prompt tokens, 1..512 (default 512, as FluxPipeline; tiny: 32; FLUX.1-schnell is run with "
                   "256)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed: the same seed gives diffusers' image")
    p.add_argument("--batch", type=IMAGES_PER_PROMPT, default=1,
                   help="images per prompt (diffusers' num_images_per_prompt)")
    p.add_argument("--out", default=None, help="output PNG (default sample.png); with --batch N, OUT-0.png .. "
                   "OUT-(N-1).png; with --prompts, a folder (default samples)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else "
                   "float32)")
    p.add_argument("--lora", metavar="FILE", help="a FLUX LoRA (a training checkpoint's pytorch_lora_weights."
                   "safetensors, or a diffusers/PEFT one) merged into the transformer's weights once, at load time")
    p.add_argument("--lora-scale", type=FINITE, default=1.0, help="strength of --lora (default 1)")
    device_flags(p, "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK, and each process takes its share of "
                 "--prompts)")


def train_flags(p):
    """The flags of `train` that are not TrainConfig fields: where the models, prompts and outputs are."""
    p.add_argument("--flux", help="diffusers-format FLUX.1-dev folder: the starting transformer, VAE, text encoders "
                   "and the CLIP tokenizer HPS uses (without it: the tiny demo, whose reward is a tiny random CLIP)")
    p.add_argument("--hps", help="--reward hps: HPSv2/HPSv2.1 checkpoint, open_clip .pt or converted .safetensors "
                   "(needs --flux)")
    p.add_argument("--pickscore", metavar="DIR", help="--reward pickscore: PickScore_v1 as a transformers CLIPModel "
                   "folder (config.json + weights; tokenizer: its vocab.json + merges.txt, else --flux's); with "
                   "another --reward: a second, independent reward that scores the held-out evaluations")
    p.add_argument("--clip", metavar="DIR", help="--reward clip: CLIP-ViT-H-14-laion2B-s32B-b79K as a transformers "
                   "CLIPModel folder (config.json + weights; tokenizer: its vocab.json + merges.txt, else --flux's)")
    p.add_argument("--prompts", help="prompt file, one prompt per line (default: a few built-in prompts)")
    p.add_argument("--out", default="runs/srpo", help="output folder: checkpoint-STEP/, log.jsonl, samples-*.png "
                   "(default runs/srpo)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line, never trained on: at step "
                   "0, every --eval-every updates and after the last, prompt i is sampled from seed i with 28 Euler "
                   "steps of FluxPipeline's schedule (--flux's scheduler config) at --guidance and --height x "
                   "--width, as `sample --seed i --steps 28` makes it from that step's checkpoint, and scored with "
                   "the --reward model's plain score (no control words; with --pickscore beside another --reward, "
                   "PickScore too): OUT/eval.jsonl, OUT/eval/step-N.png (default: 4 built-in prompts)")
    p.add_argument("--eval-every", type=RUN_STEPS, metavar="N", help="evaluate every N updates (default: --save-every)")
    p.add_argument("--tensorboard", action="store_true", help="also write OUT/tensorboard/: the log's scalars, the "
                   "evaluation means and grids (needs the optional tensorboard package)")
    p.add_argument("--offload", action="store_true", help="FSDP2's CPU offload: weights, gradients and AdamW state "
                   "in host memory, one block at a time on the GPU (one process, or under torchrun)")
    device_flags(p, "cpu or cuda (under torchrun: cuda:LOCAL_RANK)")


def score_flags(p):
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, any mode (converted to RGB)")
    p.add_argument("--hps", help="HPS checkpoint: HPS_v2(.1)_compressed.pt (open_clip) or its converted .safetensors")
    p.add_argument("--pickscore", metavar="DIR", help="PickScore model folder in transformers format (config.json + "
                   "weights); captions tokenized as its CLIPProcessor does")
    p.add_argument("--clip", metavar="DIR", help="CLIP model folder in transformers format (e.g. laion "
                   "CLIP-ViT-H-14-laion2B-s32B-b79K), scored as PickScore: exp(logit_scale) <img, txt>")
    p.add_argument("--tokenizer", help="CLIP BPE vocabulary: a folder with vocab.json + merges.txt, or a FLUX.1 "
                   "folder (its tokenizer/); default for --pickscore/--clip: the model folder's own files")
    p.add_argument("--prompt", help="the prompt the images were made for")
    p.add_argument("--manifest", help="images.jsonl of a `sample --prompts` folder: scores each image against its "
                   "own prompt, then prints the mean (instead of IMAGE and --prompt)")
    p.add_argument("--relative", nargs=2, metavar=("POS", "NEG"), help="SRP reward with these control words, e.g. "
                   "Real Painting")
    p.add_argument("--k", type=FINITE, default=0.0, help="k of the SRP reward (default 0)")
    p.add_argument("--preprocess", choices=["hpsv2", "crop"], default=None,
                   help="hpsv2: longest side to 224 + zero pad (HPS default); crop: short side to 224 + centre crop "
                   "(SRPO training, PickScore default)")
    p.add_argument("--save-safetensors", metavar="PATH", help="convert --hps to a safetensors file first (later "
                   "loads are fast and pickle-free), then score from it; IMAGE may be omitted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on every device, "
                   "as scores print with 6 decimals)")


def flag_value(value):
    """A TrainConfig value as it is typed on the command line: a pair as 'A B'."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def recipe_table(config, recipes):
    """The defaults that differ between the rewards, one column per reward (for --help)."""
    differ = [f for f in fields(config) if any(f.name in recipe for recipe in recipes.values())]
    rows = [["", *(f"--reward {name}" for name in recipes)]]
    rows += [["--" + f.name.replace("_", "-"), *(flag_value(recipe.get(f.name, f.default))
                                                 for recipe in recipes.values())] for f in differ]
    return "\n".join("    " + "".join(cell.ljust(22) for cell in row).rstrip() for row in rows)


def add_config_flags(parser, config, demo, recipes):
    """One flag per config field; default None so that config_from_flags can tell the demo's and the reward's
    defaults apart."""
    for f in fields(config):
        notes = [f"; --reward {r} {flag_value(recipe[f.name])}" for r, recipe in recipes.items() if f.name in recipe]
        tiny = f"; tiny demo {demo[f.name]}" if f.name in demo else ""
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["valid"], default=None,
                            choices=f.metadata["choices"],
                            nargs=len(f.default) if isinstance(f.default, tuple) else None,
                            metavar=("A", "B") if isinstance(f.default, tuple) else None,
                            help=f"{f.metadata['help']} (default {flag_value(f.default)}{''.join(notes)}{tiny})")


def config_from_flags(args, config, demo, recipes, world):
    """The config from the flags: where a flag is not given, the official values of --reward's recipe, or, in the
    tiny demo, the demo's (its --batch: one prompt per process of the `world`). The config checks itself."""
    defaults = {**recipes[args.reward or config.reward], **({**demo, "batch": world} if args.flux is None else {})}
    values = {}
    for f in fields(config):
        value = getattr(args, f.name)
        value = defaults.get(f.name, f.default) if value is None else value
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return config(**values)


def check_reward_flags(args, name):
    """Before anything loads: the model flag of --reward is given, and no other but --pickscore, which beside
    another --reward scores the held-out evaluations (the tiny demo takes none); the files or folders look right."""
    demo = args.flux is None
    given = [other for other in REWARD_MODELS if getattr(args, other)]
    if demo and given:
        raise InputError(f"--{given[0]} needs --flux (the tiny demo scores with a tiny random CLIP built in code)")
    other = next((other for other in given if other not in (name, "pickscore")), None)
    if other:
        raise InputError(f"--{other} is the model of --reward {other}, but --reward is {name} (the default is hps)")
    if demo:
        return
    check_folder(args.flux, "a diffusers FLUX.1 folder")
    path = getattr(args, name)
    if not path:
        raise InputError(f"--{name} is required with --flux and --reward {name} ({REWARD_MODELS[name]})")
    if args.pickscore and name != "pickscore":
        reward.check_clip_folder(args.pickscore, "PickScore")
    if name != "hps":
        reward.check_clip_folder(path, reward.REWARDS[name].title)
    elif not os.path.isfile(path):
        raise InputError(f"{path}: no such file (expected an HPSv2/HPSv2.1 checkpoint)")
