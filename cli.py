"""The command line of srpo.py: the parser, the typed configs made from the flags, and the commands. Every field of
srpo.TrainConfig is a flag of `train`, made from the field (its help, range and default are declared there), and
its default is the official run's, or srpo.PRESETS' (each reward's recipe, FLUX.2's, the tiny demos', LoRA's) where
they fit the command line; the library modules take configs, not flags."""

import argparse
import os
import sys
from dataclasses import fields

import torch

import families
import methods
import reward
import srpo
from common.bounds import (
    FINITE,
    GUIDANCE,
    IMAGES_PER_PROMPT,
    LORA_RANK,
    RUN_STEPS,
    SEED,
    SIZE,
    TIMESTEPS,
    TOKENS,
    Bounded,
    annotation,
)
from common.util import (
    EXIT_DIVERGED,
    EXIT_FAULT,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    Diverged,
    Fault,
    InputError,
    Stopped,
    check_folder,
    check_writable,
    parse_device,
    parse_dtype,
    read_manifest,
    read_prompts,
)
from sampling import sampler
from sampling.sampler import DEFAULT_PROMPT
from training import checkpoints, evaluation, export, image_data, runtime
from weights import clip_weights


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a value that does not parse) on one line as every other error of
    srpo.py, rather than after a usage block."""

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
updates, as the released checkpoint holds). Presets change a few (each flag's help says which, and to what); a later
one wins, a flag you give wins over all: the reward's recipe (below) <- flux2 on a FLUX.2 model <- demo without
--flux (and --batch: one prompt per process) <- flux2-demo on the tiny FLUX.2 <- lora (--lora-rank with --flux).

Rewards (--reward, the official --reward_model): hps, HPSv2.1 (--hps CKPT); pickscore, PickScore_v1 (--pickscore DIR);
clip, laion CLIP-ViT-H-14 (--clip DIR). DIR is a local transformers CLIPModel folder; its CLIP tokenizer is the
folder's own vocab.json + merges.txt when it has them, else --flux's tokenizer/ (the same CLIP vocabulary). As in the
official script, PickScore and CLIP tokenize captions as CLIPProcessor (padding, truncation to 77) and reward
exp(logit_scale) / 20 * img . ((1 + k) t+ - t-), "comparable with HPS". The control words were designed for HPS: the
official README warns that they may suit PickScore less. Each reward's official launch script sets its defaults
(CLIP has none: it takes the HPS values); a flag you give wins:"""

FAMILY_NAMES = tuple(f.name for f in families.FAMILIES)  # --family: the tiny demo's models
DEMO_PROMPTS = (DEFAULT_PROMPT, "a portrait of an old fisherman in natural light",
                "a bowl of ripe peaches on a wooden table", "a lighthouse on a cliff at dawn",
                "a city street in the rain at night", "a honeybee on a sunflower, close-up",
                "a mountain lake with pine trees", "a cup of coffee on a cafe terrace")



# Where `sample` writes without --out: under runs/ (git ignores it, train writes there too), not beside the code
SAMPLE_PNG, SAMPLE_FOLDER = os.path.join("runs", "sample.png"), os.path.join("runs", "samples")


def build_parser():
    """The parser of the four commands."""
    parser = Parser(prog="srpo.py", description="SRPO on FLUX.1 and FLUX.2: train, sample, score and export.")
    sub = parser.add_subparsers(dest="command", required=True)
    sample_flags(sub.add_parser("sample", help="generate images with FLUX.1 or FLUX.2 (or the tiny built-in model)",
                                description="Generate images. Without --flux, a tiny random model built in code "
                                "runs offline."))
    train = sub.add_parser("train", help="SRPO fine-tuning of FLUX.1-dev or FLUX.2 (or the tiny offline demo)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{TRAIN_USAGE}\n\n{recipe_table()}")
    train_flags(train)
    add_config_flags(train)
    export_flags(sub.add_parser("export", help="a checkpoint as a BFL/ComfyUI file, FP8, an extracted LoRA or merged "
                                "weights", description=cmd_export.__doc__))
    score_flags(sub.add_parser("score", help="score images with HPSv2/2.1 (or PickScore, CLIP), or SRPO's relative "
                               "reward", description=cmd_score.__doc__))
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
                                  ("out", SAMPLE_FOLDER if args.prompts else SAMPLE_PNG, None)]:
            if getattr(args, name) is None:
                setattr(args, name, real if args.flux or tiny is None else tiny)
    return args


def device_flags(p, device_help):
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=device_help)
    p.add_argument("--attn", choices=["triton", "sdpa"], default=None,
                   help="attention and QK-norm+RoPE kernels (default: triton on CUDA, sdpa elsewhere)")


def sample_flags(p):
    p.add_argument("--flux", help="diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/; "
                   "its scheduler/scheduler_config.json sets the schedule, FLUX.1-dev's when absent), or FLUX.2 folder "
                   "([klein] or [dev], as its model_index.json says)")
    p.add_argument("--transformer", help="replacement transformer weights: one .safetensors file, diffusers or BFL "
                   "keys (e.g. SRPO's diffusion_pytorch_model.safetensors); without --flux, a tiny demo checkpoint's")
    p.add_argument("--family", choices=FAMILY_NAMES, help="without --flux, the tiny demo's model family "
                   "(default: --transformer's own, as its config.json or keys say, else flux1); flux2: `train "
                   "--family flux2`'s tiny FLUX.2 and Qwen3")
    p.add_argument("--prompt", default=None, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts", help="prompt file, one per line: the images of line i (from 0) go to --out/i.png "
                   "(00000.png, ...), listed with their prompts in --out/images.jsonl; the models load once, and a "
                   "run started again skips the prompts whose images exist")
    p.add_argument("--height", type=SIZE, default=None, help="image height, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--width", type=SIZE, default=None, help="image width, a multiple of 16 (1024; tiny: 64)")
    p.add_argument("--steps", type=TIMESTEPS, default=50, help="Euler steps (default 50; FLUX.1-schnell: 4)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="distilled guidance scale (default 3.5; ignored, "
                   "with a note, by a transformer without a guidance embedding such as FLUX.1-schnell's); FLUX.2 "
                   "(default 4): klein base's classifier-free guidance scale (two passes a step above 1), dev's "
                   "guidance embedding, ignored by klein distilled")
    p.add_argument("--max-sequence-length", type=TOKENS, default=None, metavar="N",
                   help="T5 prompt tokens, 1..512 (default 512, as FluxPipeline; tiny: 32; FLUX.1-schnell is run with "
                   "256); FLUX.2: Qwen3 / Mistral-3 tokens, chat template included (default 512, as its pipelines)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed: the same seed gives diffusers' image")
    p.add_argument("--batch", type=IMAGES_PER_PROMPT, default=1,
                   help="images per prompt (diffusers' num_images_per_prompt)")
    p.add_argument("--out", default=None, help=f"output PNG (default {SAMPLE_PNG}); with --batch N, OUT-0.png .. "
                   f"OUT-(N-1).png; with --prompts, a folder (default {SAMPLE_FOLDER})")
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
                   "and the CLIP tokenizer HPS uses (without it: the tiny demo, whose reward is a tiny random CLIP); "
                   "or a FLUX.2 [klein] or [dev] folder (its model_index.json says which)")
    p.add_argument("--family", choices=FAMILY_NAMES, help="the tiny demo's model family (default flux1): flux2 "
                   "trains a random tiny klein-base-like FLUX.2 with a tiny Qwen3, classifier-free guidance on, at "
                   f"--lr {srpo.PRESETS['flux2-demo']['lr']:g} (with --flux, the folder's model_index.json decides)")
    reward_flags(p, lambda kind: f"--reward {kind.name}: {kind.path_help} (needs --flux)" + (
        "; with another --reward: a second, independent reward that scores the held-out evaluations"
        if kind.name == "pickscore" else ""))
    p.add_argument("--prompts", help="prompt file, one prompt per line (default: a few built-in prompts)")
    p.add_argument("--images", metavar="DIR", help="offline SRPO: x0 is the VAE encoding (posterior mean) of a real "
                   "image, centre-cropped to --height x --width, instead of the online rollout, and the prompts are "
                   "the captions (so no --prompts). DIR holds a metadata.jsonl, one {\"file_name\": ..., \"text\": "
                   "...} per line, or else a .txt caption beside each image (a.png, a.txt); metadata.jsonl wins when "
                   "both are there. Every image is checked first (a bad one is named); each x0 is encoded once into "
                   "OUT/latents/, keyed by the file's content: --resume reuses them and encodes only new or changed "
                   "images")
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
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false", help="go ahead on a GPU even where "
                   "the memory pre-flight (a lower bound of what the run needs, before anything is loaded: "
                   "docs/memory.md) says it cannot fit")
    device_flags(p, "cpu or cuda (under torchrun: cuda:LOCAL_RANK)")


def reward_flags(p, help):
    """--NAME for each reward model of reward.REWARDS, its file or folder: a new reward gets its flags here."""
    for kind in reward.REWARDS.values():
        p.add_argument(f"--{kind.name}", metavar=kind.metavar, help=help(kind))


def export_flags(p):
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-STEP folder of `train` (full or LoRA)")
    p.add_argument("--to", required=True, choices=export.FORMATS, help="bfl: one safetensors file in BFL's names "
                   "(ComfyUI, Forge, diffusers' from_single_file); fp8: the same with float8_e4m3fn block weights; "
                   "lora: a rank --rank LoRA extracted from (checkpoint - base) by SVD; merged: a LoRA checkpoint "
                   "folded into full weights (a diffusers transformer folder)")
    p.add_argument("--out", required=True, help="the file (bfl, fp8) or folder (lora, merged) to write")
    p.add_argument("--base", metavar="FLUX", help="the model the checkpoint was trained from (a diffusers FLUX.1 or "
                   "FLUX.2 folder, its transformer/, or one file of it: BFL's flux1-dev.safetensors, "
                   "flux-2-klein-4b.safetensors, or one in diffusers keys), of the checkpoint's family; `demo`: "
                   "the tiny demo's (a checkpoint of `train` without --flux): needed by lora, merged and a LoRA "
                   "checkpoint's bfl/fp8")
    p.add_argument("--rank", type=LORA_RANK, help="--to lora: the rank R of the extracted LoRA (the energy table "
                   "printed after it helps choose)")
    p.add_argument("--dtype", help="bfl and merged only: float32, bfloat16 (default, the released models') or "
                   "float16")
    p.add_argument("--device", default="cpu", help="where lora's SVDs run: cpu, cuda or cuda:N")


def score_flags(p):
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, any mode, read as `train --images` reads "
                   "them (transparency on white, 16-bit greyscale scaled, EXIF orientation applied)")
    reward_flags(p, lambda kind: f"score with {kind.title}: {kind.path_help}")
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


def recipe_table():
    """The defaults that differ between the rewards, one column per reward (for --help)."""
    recipes = {name: srpo.PRESETS[name] for name in reward.REWARDS}
    differ = [f for f in fields(srpo.TrainConfig) if any(f.name in recipe for recipe in recipes.values())]
    rows = [["", *(f"--reward {name}" for name in recipes)]]
    rows += [["--" + f.name.replace("_", "-"), *(flag_value(recipe.get(f.name, f.default))
                                                 for recipe in recipes.values())] for f in differ]
    return "\n".join("    " + "".join(cell.ljust(22) for cell in row).rstrip() for row in rows)


def add_config_flags(parser):
    """One flag per TrainConfig field: its help, range and type the field's annotation, the default and each
    preset's value stated; default None, so that config_from_flags can tell a flag given from one left out."""
    choices = {"reward": tuple(reward.REWARDS), "method": tuple(methods.METHODS)}
    for f in fields(srpo.TrainConfig):
        flag, text = "--" + f.name.replace("_", "-"), annotation(srpo.TrainConfig, f.name, str)
        if isinstance(f.default, bool):  # an ablation switch, off by default
            parser.add_argument(flag, action="store_true", default=None, help=text)
            continue
        notes = "".join(f"; {f'--reward {name}' if name in reward.REWARDS else name} {flag_value(preset[f.name])}"
                        for name, preset in srpo.PRESETS.items() if f.name in preset)
        pair = isinstance(f.default, tuple)
        parser.add_argument(flag, type=annotation(srpo.TrainConfig, f.name, Bounded), default=None,
                            choices=choices.get(f.name), nargs=2 if pair else None,
                            metavar=("A", "B") if pair else None,
                            help=f"{text} (default {flag_value(f.default)}{notes})")


def config_from_flags(args, world, family):
    """TrainConfig from the flags: the srpo.PRESETS that fit the command line and its model `family`, in their order,
    over TrainConfig's defaults (the tiny demo's --batch: one prompt per process of the `world`), and the flags given
    over them all. The config checks itself."""
    demo, name = args.flux is None, family.name  # a family's presets are named after it: flux2, flux2-demo, ...
    fits = {name: True, "demo": demo, f"{name}-demo": demo, "lora": bool(args.lora_rank) and not demo,
            f"{name}-flowbp": not demo and args.method in ("refl", "draft-lv"),
            f"{name}-refl": not demo and args.method == "refl"}
    defaults = {}
    for name, preset in srpo.PRESETS.items():  # a reward's recipe, by its name, fits its --reward
        if fits.get(name, name == (args.reward or srpo.TrainConfig.reward)):
            defaults |= preset
    if demo:
        defaults["batch"] = world
    values = {}
    for f in fields(srpo.TrainConfig):
        value = getattr(args, f.name)
        value = defaults.get(f.name, f.default) if value is None else value
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return srpo.TrainConfig(**values)


def run_config(args, family):
    """runtime.RunConfig from `train`'s flags and its model `family`: the prompts read, the reward's model path
    picked by --reward."""
    name = args.reward or srpo.TrainConfig.reward
    return runtime.RunConfig(
        out=args.out, flux=args.flux, family=family, reward_model=getattr(args, name),
        judge=args.pickscore if name != "pickscore" else None, resume=args.resume,
        eval_prompts=tuple(read_prompts(args.eval_prompts) if args.eval_prompts else evaluation.EVAL_PROMPTS),
        eval_every=args.eval_every, tensorboard=args.tensorboard, offload=args.offload, device=args.device,
        attn=args.attn, images=args.images, memory_check=args.memory_check)


def check_branch_cfg(args, cfg, family):
    """--no-branch-cfg drops the unconditional pass of a model sampled with classifier-free guidance (FLUX.2 [klein]
    base, the tiny FLUX.2 demo): refused, rather than accepted and ignored, where a branch makes one pass already
    (FLUX.1, whose guidance is the model's input; a FLUX.2 [klein] distilled or [dev] folder)."""
    if not cfg.no_branch_cfg or family.uses_cfg(args.flux, family.guidance):
        return
    given = f"--flux {args.flux}" if args.flux else f"--family {family.name} (the tiny demo)"
    raise InputError(f"--no-branch-cfg drops a classifier-free guidance pass, and the model of {given} makes one "
                     f"pass a velocity (no CFG): nothing for it to do; give one or the other")


CLIP_VOCABULARY = ("vocab.json", "merges.txt")


def check_reward_flags(args, name, family):
    """Before anything loads: the model flag of --reward is given, and no other but --pickscore, which beside
    another --reward scores the held-out evaluations (the tiny demo takes none); the files or folders look right."""
    demo = args.flux is None
    given = [other for other in reward.REWARDS if getattr(args, other)]
    if demo and given:
        raise InputError(f"--{given[0]} needs --flux (the tiny demo scores with a tiny random CLIP built in code)")
    other = next((other for other in given if other not in (name, "pickscore")), None)
    if other:
        raise InputError(f"--{other} is the model of --reward {other}, but --reward is {name} (the default is hps)")
    if demo:
        return
    check_folder(args.flux, "a diffusers FLUX folder")
    path = getattr(args, name)
    if not path:
        kind = reward.REWARDS[name]
        raise InputError(f"--{name} is required with --flux and --reward {name} (--{name} {kind.metavar}: "
                         f"{kind.path_help})")
    if args.pickscore and name != "pickscore":
        reward.REWARDS["pickscore"].check_path(args.pickscore)
    reward.REWARDS[name].check_path(path)
    vocabulary = runtime.reward_tokenizer(runtime.RunConfig(flux=args.flux, family=family, reward_model=path))
    if not family.clip_tokenizer and not all(os.path.isfile(os.path.join(vocabulary, f)) for f in CLIP_VOCABULARY):
        raise InputError(f"--{name} {path}: on a FLUX.2 folder (whose tokenizer/ is Qwen's) the reward's CLIP "
                         f"tokenizer is read from {vocabulary}: put {' + '.join(CLIP_VOCABULARY)} there (CLIP's, e.g. "
                         f"a FLUX.1 folder's tokenizer/ files)")


# ----------------------------------------------------------------------------------------------------------------
# The commands


def score_inputs(args):
    """(model kind, its file or folder, tokenizer folder, image paths, prompts) of `score`, every input checked
    before anything loads; --save-safetensors then converts the --hps checkpoint (None: nothing else to do)."""
    models = [name for name in reward.REWARDS if getattr(args, name) is not None]
    if len(models) > 1:
        raise InputError("give one of --hps CKPT (HPSv2/2.1), --pickscore DIR and --clip DIR")
    if args.manifest and (args.images or args.prompt is not None):
        raise InputError("--manifest lists the images and their prompts: give it without IMAGE and --prompt")
    if models:
        reward.REWARDS[models[0]].check_path(getattr(args, models[0]))
    if args.save_safetensors:
        check_conversion(args.hps, args.save_safetensors)
    paths, prompts = read_manifest(args.manifest) if args.manifest else (args.images, [args.prompt] * len(args.images))
    if not paths and not args.save_safetensors:
        raise InputError("no images to score")
    if None in prompts:
        raise InputError("--prompt is required: the prompt the images were made for (or --manifest)")
    reward.captions_for(prompts, len(paths))  # an empty prompt, before the model loads (SRP captions are never empty)
    for path in paths:  # every file checked before the model loads; read again when scored, one at a time
        reward.load_image(path)
    if not models:
        return demo_scorer(args), None, None, paths, prompts
    model = getattr(args, models[0])
    tokenizer = check_tokenizer(model, args.tokenizer) if paths else None
    if args.save_safetensors:
        clip_weights.convert_checkpoint(args.hps, args.save_safetensors)
        print(args.save_safetensors)
        model = args.save_safetensors
    return (reward.REWARDS[models[0]], model, tokenizer, paths, prompts) if paths else None


def check_conversion(src, dst):
    """--save-safetensors DST: an --hps checkpoint to convert, and a new file in a folder that exists."""
    if not src:
        raise InputError("--save-safetensors converts an --hps checkpoint")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise InputError(f"--save-safetensors {dst} is the --hps checkpoint itself: give another path (it would be "
                         f"overwritten by its conversion)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise InputError(f"--save-safetensors {dst}: cannot write there, no folder {folder} (make it first)")


def check_tokenizer(model, tokenizer):
    """The --tokenizer folder, or the model folder's own, checked before the model loads. -> tokenizer folder."""
    if tokenizer:
        check_folder(tokenizer, "a --tokenizer folder: vocab.json + merges.txt, or a FLUX.1 folder")
    tokenizer = tokenizer or reward.tokenizer_folder(model, None)  # a PickScore/CLIP folder may hold its own
    if tokenizer is None:
        raise InputError("--tokenizer DIR is required (vocab.json + merges.txt, or a FLUX.1 folder; a --pickscore or "
                         "--clip folder that holds them needs none)")
    return tokenizer


def demo_scorer(args):
    """No model flag: the tiny random HPS scorer that the built-in demo trains with (its eval.jsonl's scores), to
    try `score` on the demo's images; said on stderr, since its scores mean nothing for real images."""
    if args.tokenizer:
        raise InputError("--tokenizer goes with --hps, --pickscore or --clip (the tiny demo scorer has its own)")
    print("note: no --hps, --pickscore or --clip: scoring with the tiny random HPS scorer of the built-in demo "
          "(`srpo.py train` without --flux), whose scores say nothing about real images", file=sys.stderr)
    return reward.HPSReward


@torch.no_grad()
def cmd_score(args):
    """Print one score per image (score, tab, path): the HPS score <img, txt> of L2-normalised CLIP features
    (PickScore, CLIP: times exp(logit_scale)); with --relative POS NEG, SRPO's reward
    c img . ((1 + k) txt('POS. prompt') - txt('NEG. prompt')), c = 1 for HPS and exp(logit_scale) / 20 for
    PickScore and CLIP, as the official script trains with them."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or "float32", device)  # 6 decimals: fp32
    inputs = score_inputs(args)
    if inputs is None:  # --save-safetensors alone: converted, nothing to score
        return
    kind, model, tokenizer, paths, prompts = inputs
    scorer = kind.tiny(device=device, dtype=dtype) if model is None else kind.load(model, tokenizer, device, dtype)
    values = []
    for path, prompt in zip(paths, prompts, strict=True):  # one at a time: sizes may differ, thousands may come
        image = reward.load_image(path)
        if args.relative:
            positive, negative = (srpo.control_caption(word, prompt) for word in args.relative)
            value = scorer.relative_reward(image[None], positive, negative, args.k, args.preprocess)
        else:
            value = scorer.score(image[None], prompt, args.preprocess)
        values.append(value.item())
        print(f"{values[-1]:.6f}\t{path}")
    if args.manifest:
        print(f"{sum(values) / len(values):.6f}\tmean of {len(values)} images")


def cmd_train(args):
    """`srpo.py train`: the configs from the flags, every input checked, then the run (training/runtime.py sets it
    up)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    family = families.decide(args.flux, args.family)  # decided once: --flux's model_index.json, or the tiny demo's
    cfg = config_from_flags(args, world, family)
    check_branch_cfg(args, cfg, family)
    check_reward_flags(args, cfg.reward, family)
    if args.flux and family.check_guidance:
        family.check_guidance(args.flux, cfg)
    run = run_config(args, family)
    images, prompts = train_data(run, args.prompts, cfg)
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


def train_data(run, prompt_file, cfg):
    """(images, prompts) of a run, before any model loads: with --images the folder's ImageSet, every image checked,
    and its captions as the prompts; else (None, --prompts' or the demo's)."""
    if run.images is None:
        return None, read_prompts(prompt_file) if prompt_file else list(DEMO_PROMPTS)
    if prompt_file:
        raise InputError("--prompts and --images exclude each other: with --images the prompts are the images' "
                         "captions")
    images = image_data.ImageSet(run.images, cfg.height, cfg.width)
    return images, images.captions



def cmd_export(args):
    """Write a training checkpoint in the formats people run (training/export.py): a BFL-keyed single file for ComfyUI
    and Forge, an FP8 one, a LoRA extracted by truncated SVD, or a LoRA checkpoint merged into full weights. Every file
    is written tensor by tensor to a temporary name, then renamed, under the output folder's lock; an --out onto
    what the export reads or into a run's checkpoint is refused."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device) if args.dtype else None  # None: the format's own
    print(export.export(args.checkpoint, args.to, args.out, args.base, args.rank, dtype, device))


def cmd_sample(args):
    """`srpo.py sample`: the images of sampler.sample, its SampleConfig from the flags (the default --out's runs/
    made first, as train makes its --out)."""
    if args.out == SAMPLE_PNG:
        check_writable(os.path.dirname(SAMPLE_PNG))
    sampler.sample(sampler.SampleConfig(**{f.name: getattr(args, f.name) for f in fields(sampler.SampleConfig)}))


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "score": cmd_score, "export": cmd_export}


def main(argv=None):
    """`python srpo.py train|sample|score|export`: one line on stderr and an exit code for every way a command ends."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        check_ranges(parser, args)
        COMMANDS[args.command](args)
    except (InputError, Fault, Diverged, Stopped) as e:
        # Faults, divergences and stops are agreed on by every process of a torchrun: one of them says it
        if isinstance(e, InputError) or os.environ.get("RANK", "0") == "0":
            print(f"{'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        codes = {InputError: EXIT_INPUT, Fault: EXIT_FAULT, Diverged: EXIT_DIVERGED, Stopped: EXIT_STOPPED}
        sys.exit(next(code for kind, code in codes.items() if isinstance(e, kind)))
    except KeyboardInterrupt:
        # SIGINT where no StopSignals waits for a step or a prompt's images to end: while train loads its models
        # (before its first step), or a command with nothing to save. Every write is atomic: nothing is half written.
        if os.environ.get("RANK", "0") == "0":
            again = " (with --resume once --out holds a checkpoint)" if args.command == "train" else ""
            print(f"stopped: SIGINT (Ctrl-C) with nothing to save ({args.command} was not in a step it could finish: "
                  f"setting up, e.g. loading the models): every file written is whole; the same command{again} starts "
                  f"again", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
