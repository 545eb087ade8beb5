"""The command line of srpo.py: the parser, the typed configs made from the flags, and the commands. A flag is declared
once, where its config is: each field of srpo.TrainConfig is a flag of `train`, of sampler.SampleConfig one of
`sample` (and of `evaluate`, beside evaluate.EvaluateConfig's), of scoring.ScoreConfig one of `score`, of
export.ExportConfig one of `export` (add_flags: the help, range and default are the field's), and a default is the
config's, or a preset's where it fits the command line (srpo.PRESETS: each reward's recipe, FLUX.2's, the tiny
demos', LoRA's; sampler.TINY without --flux); the library modules take configs, not flags."""

import argparse
import functools
import os
import shlex
import sys
from dataclasses import MISSING, fields

import torch

import families
import methods
import reward
import srpo
from common import util
from common.bounds import Bounded, annotation
from common.util import Diverged, Fault, InputError, Stopped, parse_device, parse_dtype, read_prompts
from sampling import evaluate, sampler, scoring
from sampling.judges import JUDGES, choose, flag_of
from training import checkpoints, evaluation, export, runtime


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a bad value) on one line as srpo.py's others, not after a usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_ranges(parser, args):
    """Every numeric flag of the command within its range (Bounded), before any file is read or model built."""
    command = next(a for a in parser._actions if a.dest == "command").choices[args.command]
    for action in command._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Bounded) and value is not None:
            action.type.check(action.option_strings[0], value)


TRAIN_USAGE = """SRPO (Direct-Align + semantic relative preference) on FLUX.1-dev or FLUX.2, with an HPS, PickScore or
CLIP reward.

    python srpo.py train                       # tiny offline demo on the CPU (random tiny models, ~1 min)
    python srpo.py train --flux FLUX_DIR --hps HPS_v2.1_compressed.pt --prompts prompts.txt --out runs/srpo
    python srpo.py train --flux FLUX_DIR --reward pickscore --pickscore PickScore_v1 --prompts prompts.txt --out runs/ps
    torchrun --nproc_per_node=8 srpo.py train --flux ...   # FSDP2: the 32 prompts of a step, 4 per GPU
    python srpo.py train --out runs/srpo --resume ...      # continue from the latest complete checkpoint
    python srpo.py train --flux FLUX_DIR --hps ... --images photos/ --out runs/offline   # offline: real images

Every hyperparameter defaults to the official run (global batch 32 prompts, whatever the number of processes; 19
updates, as the released checkpoint holds). Presets (srpo.PRESETS) change a few, each flag's help says which and to
what; a flag you give wins over them all.

Rewards (--reward, the official --reward_model): hps, HPSv2.1 (--hps CKPT); pickscore, PickScore_v1 (--pickscore DIR);
clip, laion CLIP-ViT-H-14 (--clip DIR), scored as the official script scores them (docs/reward.md; its README warns
that the control words, made for HPS, may suit PickScore less). Each reward's launch script sets its defaults (CLIP:
HPS's):"""

FAMILY_NAMES = tuple(f.name for f in families.FAMILIES)  # --family: the tiny demo's models
DEMO_NAMES = tuple(dict.fromkeys(demo for f in families.FAMILIES for demo in f.demos))  # --demo: which of them
def build_parser():
    """The parser of the five commands."""
    parser = Parser(prog="srpo.py", description="SRPO on FLUX.1 and FLUX.2: train, sample, score, evaluate, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="generate images with FLUX.1 or FLUX.2 (or the tiny built-in model)",
                            description="Generate images. Without --flux, a tiny random model built in code runs "
                            "offline.")
    add_flags(sample, sampler.SampleConfig, {"tiny": sampler.TINY}, metavar={"max_sequence_length": "N", "lora": "F"},
              choices={"family": FAMILY_NAMES, "demo": DEMO_NAMES})
    device_flags(sample, "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK, and each process takes its share of "
                 "--prompts)")
    train = sub.add_parser("train", help="SRPO fine-tuning of FLUX.1-dev or FLUX.2 (or the tiny offline demo)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{TRAIN_USAGE}\n\n{recipe_table()}")
    train_flags(train)
    add_flags(train, runtime.RunConfig, metavar={"images": "DIR", "eval_every": "N", "eval_judges": "LIST"},
              choices={"demo": DEMO_NAMES})
    add_flags(train, srpo.TrainConfig, {f"--reward {name}" if name in reward.REWARDS else name: preset
                                        for name, preset in srpo.PRESETS.items()},
              choices={"reward": tuple(reward.REWARDS), "method": tuple(methods.METHODS)},
              metavar={"words": ("P", "N")})
    exporting = sub.add_parser("export", help="a checkpoint as a BFL/ComfyUI file, FP8, an extracted LoRA or merged "
                               "weights", description=cmd_export.__doc__)
    exporting.add_argument("checkpoint", metavar="CHECKPOINT",
                           help="a checkpoint-STEP folder of `train` (full or LoRA)")
    add_flags(exporting, export.ExportConfig, choices={"to": export.FORMATS}, metavar={"base": "FLUX"})
    score = sub.add_parser("score", help="score images with HPSv2/2.1 (or PickScore, CLIP), or SRPO's relative reward",
                           description=scoring.score.__doc__)
    score.add_argument("images", nargs="*", metavar="IMAGE", help="image files, any mode, read as `train --images` "
                       "reads them (transparency on white, 16-bit greyscale scaled, EXIF orientation applied)")
    model_flags(score, reward.REWARDS.values(), lambda kind: f"score with {kind.title}: {kind.path_help}")
    add_flags(score, scoring.ScoreConfig, choices={"preprocess": ("hpsv2", "crop"), "demo": DEMO_NAMES},
              nargs={"relative": 2}, metavar={"relative": ("POS", "NEG"), "save_safetensors": "PATH"})
    evaluate_parser(sub)
    for command in sub.choices.values():  # --help states each range as the error line would
        for action in command._actions:
            if isinstance(action.type, Bounded):
                action.help += f"; valid: {action.type.describe()}"
    return parser


def evaluate_parser(sub):
    """`evaluate`: sample's flags for the images (not its prompt, seed, batch or output), its own, the judges'."""
    evaluating = sub.add_parser("evaluate", help="a checkpoint's Table 1 row: sample the prompts, score them with the "
                                "judges, a table with 95 % intervals", description=evaluate.__doc__)
    add_flags(evaluating, sampler.SampleConfig, {"tiny": sampler.TINY}, skip=("prompt", "prompts", "seed", "batch",
              "out"), metavar={"lora": "F"}, choices={"family": FAMILY_NAMES, "demo": DEMO_NAMES})
    add_flags(evaluating, evaluate.EvaluateConfig, nargs={"compare": 2},
              metavar={"compare": ("A", "B"), "judges": "LIST", "prompts": "FILE"})
    device_flags(evaluating, "cpu, cuda or cuda:N")
    model_flags(evaluating, JUDGES.values(), lambda kind: f"judge {kind.title} (needs --flux): {kind.path_help}")


def device_flags(p, device_help):
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=device_help)
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")


def train_flags(p):
    """The flags of `train` that are not TrainConfig's nor RunConfig's fields: the demo's family, the reward models,
    the prompt files, the device."""
    p.add_argument("--family", choices=FAMILY_NAMES, help="the tiny demo's model family (default flux1): flux2 "
                   "trains a random tiny klein-base-like FLUX.2 with a tiny Qwen3, classifier-free guidance on, at "
                   f"--lr {srpo.PRESETS['flux2-demo']['lr']:g} (with --flux, the folder's model_index.json decides)")
    model_flags(p, JUDGES.values(), lambda kind: f"{kind.title} (needs --flux): {kind.path_help}; the model of " + (
        f"--reward {kind.name} or " if kind.name in reward.REWARDS else "") + f"--eval-judges {kind.name}")
    p.add_argument("--prompts", help="prompt file, one prompt per line (default: a few built-in prompts)")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line, never trained on: at step "
                   "0, every --eval-every updates and after the last, prompt i is sampled from seed i with 28 Euler "
                   "steps of FluxPipeline's schedule (--flux's scheduler config) at --guidance and --height x "
                   "--width, as `sample --seed i --steps 28` makes it from that step's checkpoint, and scored with "
                   "the --reward model's plain score (no control words) and the --eval-judges: OUT/eval.jsonl, "
                   "OUT/eval/step-N.png (default: the demo's held-out prompts)")
    device_flags(p, "cpu or cuda (under torchrun: cuda:LOCAL_RANK)")


def model_flags(p, kinds, help):
    """--NAME, its file or folder, for each reward (reward.REWARDS) or judge (sampling/judges) of `kinds` that has
    its own (SGP-HPS reads --hps): a new reward or judge gets its flag here."""
    for kind in (kind for kind in kinds if flag_of(kind) == kind.name):
        p.add_argument(f"--{kind.name}", metavar=kind.metavar, help=help(kind))


def flag_value(value):
    """A TrainConfig value as it is typed on the command line: a pair as 'A B'."""
    return " ".join(shlex.quote(str(v)) for v in value) if isinstance(value, tuple) else str(value)


def recipe_table():
    """The defaults that differ between the rewards, one column per reward (for --help)."""
    recipes = {name: srpo.PRESETS[name] for name in reward.REWARDS}
    differ = [f for f in fields(srpo.TrainConfig) if any(f.name in recipe for recipe in recipes.values())]
    rows = [["", *(f"--reward {name}" for name in recipes)]]
    rows += [["--" + f.name.replace("_", "-"), *(flag_value(recipe.get(f.name, f.default))
                                                 for recipe in recipes.values())] for f in differ]
    return "\n".join("    " + "".join(cell.ljust(22) for cell in row).rstrip() for row in rows)


def add_flags(parser, config, presets=None, skip=(), **options):
    """One flag --name-with-dashes per field of the dataclass `config` that declares a help (`Annotated[type,
    range, help] = default`): its type the range (a Bounded), a bool a switch, a pair two values; default None, so
    that a command can tell a flag given from one left out (config_from), the field's default and each of the
    `presets`' values (dicts of fields, by name) stated in its help. options: argparse's, per field (choices=...)."""
    for f in fields(config):
        flag, text = "--" + f.name.replace("_", "-"), annotation(config, f.name, str)
        if text is None or f.name in skip:  # given its flag another way (device_flags, reward_flags), or not here
            continue
        if isinstance(f.default, bool):  # an ablation switch, off by default
            parser.add_argument(flag, action="store_true", default=None, help=text)
            continue
        notes = [f"default {flag_value(f.default)}"] if f.default not in (None, MISSING) else []
        notes += [f"{name} {flag_value(p[f.name])}" for name, p in (presets or {}).items() if f.name in p]
        pair = {"nargs": 2, "metavar": ("A", "B")} if isinstance(f.default, tuple) else {}
        parser.add_argument(flag, type=annotation(config, f.name, Bounded), default=None,
                            required=f.default is MISSING, help=f"{text} ({'; '.join(notes)})" if notes else text,
                            **pair | {name: values[f.name] for name, values in options.items() if f.name in values})


def config_from(config, args, *presets, **decided):
    """`config` from a command's flags: each flag given over the presets (dicts of fields, in their order) over the
    fields' defaults; `decided`, the values the command made from its flags, over all."""
    given = {f.name: getattr(args, f.name) for f in fields(config) if getattr(args, f.name, None) is not None}
    return config(**{name: value for preset in presets for name, value in preset.items()} | given | decided)


def config_from_flags(args, world, family, demo):
    """TrainConfig from the flags: the srpo.PRESETS that fit the command line and its model `family`, in their order,
    over TrainConfig's defaults (the tiny demo's --batch: one prompt per process of the `world`), and the flags given
    over them all (demo: the tiny demo's name, None with --flux). The config checks itself."""
    tiny, name = args.flux is None, family.name  # a family's presets are named after it: flux2, flux2-demo, ...
    fits = {name: True, "demo": tiny, f"{name}-demo": tiny, "lora": bool(args.lora_rank) and not tiny,
            "world": demo == "world", f"{name}-refl": not tiny and args.method == "refl",
            f"{name}-flowbp": not tiny and args.method in ("refl", "draft-lv")}
    defaults = {}
    for name, preset in srpo.PRESETS.items():  # a reward's recipe, by its name, fits its --reward
        if fits.get(name, name == (args.reward or srpo.TrainConfig.reward)):
            defaults |= preset
    if tiny:
        defaults.setdefault("batch", world)
    values = {}
    for f in fields(srpo.TrainConfig):
        value = getattr(args, f.name)
        value = defaults.get(f.name, f.default) if value is None else value
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return srpo.TrainConfig(**values)


def run_config(args, family, demo):
    """runtime.RunConfig from `train`'s flags and its model `family`: the prompts read, the reward's model path
    picked by --reward, the held-out judges (--eval-judges, their files checked: sampling/judges.choose)."""
    name = args.reward or srpo.TrainConfig.reward
    prompts = read_prompts(args.eval_prompts) if args.eval_prompts else runtime.demo_prompts(demo, held_out=True)
    models = judge_models(args)
    if args.flux is None and models:
        raise InputError(f"--{next(iter(models))} needs --flux (the tiny demo's reward and judges are built in code)")
    chosen = choose(args.eval_judges, models, args.flux, "--eval-judges", used={name})
    if name in chosen:
        raise InputError(f"--eval-judges {name}: it is the training reward, whose held-out score is always there")
    return config_from(runtime.RunConfig, args, family=family, reward_model=getattr(args, name), judges=chosen,
                       eval_prompts=tuple(prompts), demo=demo)


def judge_models(args):
    """{flag: path} of the judge model flags given (--hps, --pickscore, --imagereward, ...)."""
    given = {flag: getattr(args, flag.replace("-", "_")) for flag in map(flag_of, JUDGES.values())}
    return {flag: path for flag, path in given.items() if path}


# ----------------------------------------------------------------------------------------------------------------
# The commands


def cmd_score(args):
    """`srpo.py score`: scoring.score, its ScoreConfig from the flags (the reward model: the one flag given)."""
    given = [name for name in reward.REWARDS if getattr(args, name) is not None]
    if len(given) > 1:
        raise InputError("give one of --hps CKPT (HPSv2/2.1), --pickscore DIR and --clip DIR")
    model = {"reward": given[0], "model": getattr(args, given[0])} if given else {}
    scoring.score(config_from(scoring.ScoreConfig, args, model))


def cmd_train(args):
    """`srpo.py train`: the configs from the flags, every input checked, then the run (training/runtime.py sets it
    up)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    family = families.decide(args.flux, args.family)  # decided once: --flux's model_index.json, or the tiny demo's
    demo = family.demo(args.demo, args.flux)  # None with --flux
    cfg, run = config_from_flags(args, world, family, demo), run_config(args, family, demo)
    runtime.check_inputs(run, cfg)
    images, prompts = runtime.train_data(run, args.prompts, cfg)
    evaluation.check_run(run)
    with runtime.processes(run, cfg, world) as ranks:
        begin = checkpoints.start_point(run.out, cfg, run.resume, ranks)  # a refused --resume: before any model loads
        watch = evaluation.Watch.for_run(run, cfg, ranks)
        try:
            parts = runtime.training_parts(run, cfg, prompts, ranks, begin, images)
            srpo.train(parts, prompts, cfg, run.out, ranks, methods.METHODS[cfg.method], watch)
        except (Fault, Diverged) as e:
            raise type(e)(f"{e}; {checkpoints.checkpoint_note(run.out, isinstance(e, Diverged))}") from None
    if ranks.main:
        checkpoints.report(run.out)
        evaluation.report(run.out, cfg)


def cmd_export(args):
    """Write a training checkpoint in the formats people run (training/export.py): a BFL-keyed single file for ComfyUI
    and Forge, an FP8 one, a LoRA extracted by truncated SVD, or a LoRA checkpoint merged into full weights. Every file
    is written tensor by tensor to a temporary name, then renamed, under the output folder's lock; an --out onto
    what the export reads or into a run's checkpoint is refused."""
    e = config_from(export.ExportConfig, args)
    device = parse_device(e.device)
    dtype = parse_dtype(e.dtype, device) if e.dtype else None  # None: the format's own
    print(export.export(e.checkpoint, e.to, e.out, e.base, e.rank, dtype, device))


def cmd_sample(args):
    """`srpo.py sample`: sampler.sample, its SampleConfig from the flags (without --flux: TINY's defaults)."""
    sampler.sample(config_from(sampler.SampleConfig, args, {} if args.flux else sampler.TINY))


def cmd_evaluate(args):
    """`srpo.py evaluate`: sampling.evaluate.evaluate, its configs from the flags (the judges' files: their flags)."""
    e = config_from(evaluate.EvaluateConfig, args, models=judge_models(args))
    evaluate.evaluate(e, config_from(sampler.SampleConfig, args, {} if args.flux else sampler.TINY,
                                     prompts=e.prompts), functools.partial(runtime.demo_prompts, held_out=True))


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "score": cmd_score, "evaluate": cmd_evaluate,
            "export": cmd_export}


def main(argv=None):
    """`python srpo.py COMMAND`: one line on stderr and an exit code for every way a command ends."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_ranges(parser, args)
        COMMANDS[args.command](args)
    except (InputError, Fault, Diverged, Stopped) as e:
        # Faults, divergences and stops are agreed on by every process of a torchrun: one of them says it
        if isinstance(e, InputError) or os.environ.get("RANK", "0") == "0":
            print(f"{'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        codes = {InputError: util.EXIT_INPUT, Fault: util.EXIT_FAULT, Diverged: util.EXIT_DIVERGED,
                 Stopped: util.EXIT_STOPPED}
        sys.exit(next(code for kind, code in codes.items() if isinstance(e, kind)))
    except KeyboardInterrupt:
        # SIGINT where no StopSignals waits for a step or a prompt's images to end: while train loads its models
        # (before its first step), or a command with nothing to save. Every write is atomic: nothing is half written.
        if os.environ.get("RANK", "0") == "0":
            again = " (with --resume once --out holds a checkpoint)" if args.command == "train" else ""
            print(f"stopped: SIGINT (Ctrl-C) with nothing to save ({args.command} was not in a step it could finish: "
                  f"setting up, e.g. loading the models): every file written is whole; the same command{again} starts "
                  f"again", file=sys.stderr)
        sys.exit(util.EXIT_INTERRUPTED)
