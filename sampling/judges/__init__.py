"""Judges: the image scorers that `srpo.py evaluate` reports and `train --eval-judges` watches, as the SRPO paper's
Table 1 and the peers' hacking checks use them (train on one reward, watch the others).

A judge is one class and one JUDGES entry. Its protocol, which reward.py's rewards already follow:
    name, title        the --judges entry (and its model flag --NAME) and the name in tables and messages
    metavar, path_help the model flag's value (FILE or DIR) and what it holds
    check_path(path)   one-line InputError unless path looks like the judge's files; nothing is loaded
    load(path, tokenizer, device, dtype)
                       the frozen judge; tokenizer: a CLIP BPE folder for the judges that need one and do not carry it
    tiny(seed, device, dtype)
                       a random judge of the same architecture at tiny widths, built in code: the offline demo's
    score(images, prompts)
                       (B,) float32 for (B, 3, H, W) images in [0, 1] and B prompts, preprocessed as the judge's own
                       package does (a prompt-free judge ignores the prompts)
A judge whose file is another's (SGP-HPS reads the HPS checkpoint) says so in `flag`.
"""

import torch

from common.util import InputError
from reward import REWARDS, HPSReward, control_caption, tokenizer_folder
from sampling import scoring
from sampling.judges.aesthetic import AestheticV25, LaionAesthetic
from sampling.judges.imagereward import ImageRewardJudge


class SGPHPS:
    """SGP-HPS, the SRPO paper's semantic-guided preference (Table 1): how much more HPSv2.1 finds an image a
    "Realistic photo" than a "CG Render" of its prompt, 100 (HPS(W+ . p) - HPS(W- . p)) with SRP's caption format.
    The paper prints it in HPS's percent units (FLUX.1-dev 0.463 where its HPS is .289), hence the factor 100."""

    name, title, flag = "sgp-hps", "SGP-HPS", "hps"
    metavar, path_help = HPSReward.metavar, HPSReward.path_help
    words = ("Realistic photo", "CG Render")

    def __init__(self, hps):
        self.hps = hps

    check_path = HPSReward.check_path

    @classmethod
    def load(cls, path, tokenizer=None, device="cpu", dtype=torch.float32):
        return cls(HPSReward.load(path, tokenizer, device, dtype))

    @classmethod
    def tiny(cls, seed=0, device="cpu", dtype=torch.float32):
        return cls(HPSReward.tiny(seed, device, dtype))

    def score(self, images, prompts):
        """100 <img, txt(W+ . p) - txt(W- . p)>: SRP's reward with k = 0 and c = 1 (HPS's), in percent."""
        positive, negative = ([control_caption(word, p) for p in prompts] for word in self.words)
        return 100 * self.hps.relative_reward(images, positive, negative, 0)


# `srpo.py evaluate --judges NAME,...` and `train --eval-judges NAME,...`; each judge's file comes from --FLAG
JUDGES = {kind.name: kind for kind in (*REWARDS.values(), SGPHPS, ImageRewardJudge, AestheticV25,
                                             LaionAesthetic)}


def flag_of(kind):
    """The model flag a judge's file comes from: its own name, unless it reads another judge's file."""
    return getattr(kind, "flag", kind.name)


def choose(names, models, flux, given_for="--judges", used=(), tokenizer=None):
    """{name: (judge class, its file or folder: None for the tiny demo's, CLIP tokenizer folder or None)} of the
    comma-separated `names` (None: every judge whose model flag is in `models` and not `used` elsewhere, SGP-HPS with
    --hps's), each file checked, nothing loaded. models: {flag: path} of the model flags given; with --flux every
    judge needs its own, and a flag that neither a judge nor its `used` reads is refused rather than ignored."""
    if names is None:
        names = ",".join(n for n, kind in JUDGES.items() if flag_of(kind) in models and flag_of(kind) not in used)
    chosen = {}
    for name in dict.fromkeys(n.strip() for n in names.split(",") if n.strip()):
        if name not in JUDGES:
            raise InputError(f"{given_for}: unknown judge {name!r} (the judges are {', '.join(JUDGES)})")
        kind, flag = JUDGES[name], flag_of(JUDGES[name])
        if models.get(flag):
            kind.check_path(models[flag])
        elif flux:
            raise InputError(f"{given_for} {name}: give its model, --{flag} {kind.metavar} ({kind.path_help})")
        chosen[name] = (kind, models.get(flag), clip_tokenizer(flag, models.get(flag), tokenizer, flux))
    unused = [flag for flag in models if flag not in {*used, *(flag_of(kind) for kind, *_ in chosen.values())}]
    if unused:
        raise InputError(f"--{unused[0]} is given but no judge of {given_for} reads it")
    return chosen


def clip_tokenizer(flag, path, tokenizer, flux):
    """The CLIP BPE folder of a judge read from a reward's file (--hps, --pickscore, --clip), read now, without a
    model (a FLUX.2 folder's tokenizer/ is Qwen's): the folder's own vocabulary, else `tokenizer` or --flux's. None
    for the other judges, which carry their own."""
    if path is None or flag not in REWARDS:
        return None
    folder = scoring.check_tokenizer(path, tokenizer or tokenizer_folder(path, flux))
    REWARDS[flag].tokenizer_class.from_folder(folder)
    return folder


def load(kind, path, tokenizer, demo, device, dtype=torch.float32):
    """The judge from its file (tokenizer: a CLIP BPE folder, for the judges that need one); without a file, the
    tiny demo's: HPS and SGP-HPS on the demo's HPS-class scorer (the world's reward model), the others random at
    tiny widths, each with its own seed."""
    if path is not None:
        return kind.load(path, tokenizer, device, dtype)
    if flag_of(kind) != "hps":
        return kind.tiny(list(JUDGES.values()).index(kind), device, dtype)
    scorer = scoring.DEMOS[demo](device=device, dtype=dtype)
    return scorer if kind is HPSReward else kind(scorer)
