"""`srpo.py evaluate`: a checkpoint's row of the SRPO paper's Table 1. Each prompt is sampled as `sample --prompts`
samples it (from seeds 0 .. N-1, one folder per seed, resumable), every image is scored by every judge
(sampling/judges/: HPSv2.1, PickScore, CLIP, SGP-HPS, ImageReward, the aesthetic predictors), and the table gives
each judge's mean with a bootstrap 95 % interval; `--compare A B` sets two evaluations side by side with B - A and
its interval.

OUT/ holds images/seed-S/ (the images and their images.jsonl, as `sample --prompts` writes them), prompts.txt (the
prompts sampled), scores.jsonl (one line per image: its prompt index, seed, prompt and every judge's score),
table.md, table.csv and settings.json (what the images and the judges were). The intervals resample prompts, not
images: the images of one prompt are not independent draws.
"""

import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

import reward
from common import bounds
from common.util import (
    InputError,
    RunLock,
    check_folder,
    check_writable,
    manifest_rows,
    read_lines,
    read_prompts,
    write_text,
)
from sampling import judges, sampler
from sampling.judges import JUDGES

EVALUATE_FOLDER = os.path.join("runs", "evaluate")
CHUNK = 8  # images scored at a time
ROW_KEYS = ("index", "seed", "prompt", "image")  # what scores.jsonl says of an image besides its judges' scores
# The HPDv2 benchmark (Wu et al. 2023, HPSv2): 800 prompts in each of 4 styles, the prompts of the SRPO paper's Table 1,
# published as benchmark/STYLE.json in the Hugging Face dataset zhwang/HPDv2; hpsv2 keeps them under HPSV2_CACHE
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_FOLDERS = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hpdv2"),
                 os.path.join(os.environ.get("HPS_ROOT", os.path.expanduser("~/.cache/hpsv2")), "datasets",
                              "benchmark"))


@dataclass
class EvaluateConfig:
    """What `evaluate` scores with, beyond the images' settings (sampler.SampleConfig's flags: --flux, --transformer,
    --lora, --prompts, --steps, ...). models: each judge flag given (--hps CKPT, --imagereward DIR, ...) -> its path."""

    prompts: Annotated[str | None, "the prompts, one per line, or hpdv2: the HPDv2 benchmark's 3,200 (the paper's "
                       "Table 1; default without --flux: the tiny demo's held-out prompts)"] = None
    judges: Annotated[str | None, f"comma-separated judges: {', '.join(JUDGES)} (default: each whose model flag is "
                      "given, SGP-HPS with --hps; without --flux, the tiny demo's, all of them)"] = None
    seeds: Annotated[int, bounds.IMAGES_PER_PROMPT, "images per prompt, from seeds 0 .. N-1 (the images `sample "
                     "--seed S` makes)"] = 1
    out: Annotated[str | None, f"the evaluation's folder (default {EVALUATE_FOLDER}): images/seed-S/, scores.jsonl, "
                   "table.md, table.csv, settings.json; a rerun reuses the images there"] = None
    compare: Annotated[tuple | None, "two evaluation folders A B: their means side by side and B - A with its 95 % "
                       "interval, paired by prompt and seed (nothing is sampled; --out, if given, gets compare.md "
                       "and compare.csv)"] = None
    tokenizer: Annotated[str | None, "CLIP BPE vocabulary for --hps (and --pickscore/--clip folders without one): a "
                         "folder with vocab.json + merges.txt, or a FLUX.1 folder (default: --flux's)"] = None
    resamples: Annotated[int, bounds.RESAMPLES, "bootstrap resamples of the prompts for each 95 % interval"] = 1000
    models: dict | None = None


def evaluate(e, s, held_out):
    """Sample, score, tabulate (or --compare). e: EvaluateConfig; s: sampler.SampleConfig (its prompt, seed, batch
    and out are set here); held_out(demo): the tiny demo's held-out prompts, for a demo run without --prompts (the
    training side's: cli passes training.runtime's)."""
    if e.compare:
        return compare(e)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("evaluate runs in one process: sample on several GPUs first with `torchrun ... srpo.py sample "
                         "--prompts P --seed S --out OUT/images/seed-S`, then evaluate reuses those images")
    if s.flux:
        check_folder(s.flux, "a diffusers-format FLUX.1 or FLUX.2 folder")
    demo = sampler.check_sample_flags(s).demo(s.demo, s.flux)  # None with --flux
    chosen = chosen_judges(e, s)
    out = e.out or EVALUATE_FOLDER
    check_writable(out)
    with RunLock(out):
        prompts = write_prompts(s.prompts, out, demo, held_out)
        for seed in range(e.seeds):
            sampler.sample(replace(s, prompts=os.path.join(out, "prompts.txt"), prompt=None, seed=seed, batch=1,
                                   out=os.path.join(out, "images", f"seed-{seed}")))
        rows = image_rows(out, prompts, e.seeds)
        scores = {name: score_all(judges.load(*judge, demo, s.device), rows, name) for name, judge in chosen.items()}
        table = [(name, *bootstrap(per_prompt(rows, values), e.resamples)) for name, values in scores.items()]
        print(write_results(out, rows, scores, table, settings(e, s, chosen, rows)))


def chosen_judges(e, s):
    """sampling/judges.choose's judges, every file checked before anything loads (without --flux and --judges: all of
    them, the tiny demo's); --tokenizer only where a CLIP judge reads it."""
    chosen = judges.choose(e.judges or (None if s.flux else ",".join(JUDGES)), e.models or {}, s.flux,
                           tokenizer=e.tokenizer)
    if not chosen:
        raise InputError("no judges: give --judges NAME,... with their model flags (e.g. --hps CKPT)")
    if e.tokenizer and not any(tokenizer for *_, tokenizer in chosen.values()):
        raise InputError(f"--tokenizer {e.tokenizer}: it is the CLIP vocabulary of the --hps, --pickscore or --clip "
                         f"judges, and none is given")
    return chosen


def write_prompts(path, out, demo, held_out):
    """OUT/prompts.txt: the prompts to sample, from --prompts (a file, one per line, or `hpdv2`: the HPDv2 benchmark),
    or the tiny demo's held-out prompts (held_out(demo)); a rerun into OUT must sample the same ones."""
    if path is None and demo is None:
        raise InputError("--prompts FILE is required with --flux (one prompt per line, or hpdv2 for the HPDv2 "
                         "benchmark's 3,200)")
    prompts = (hpdv2_prompts() if path == "hpdv2" else read_prompts(path) if path else
               list(held_out(demo)))
    kept = os.path.join(out, "prompts.txt")
    if os.path.isfile(kept) and read_prompts(kept) != prompts:
        raise InputError(f"{kept}: {out} was evaluated on other prompts: give the same --prompts, or another --out")
    write_text(kept, "".join(p + "\n" for p in prompts))
    return prompts


def hpdv2_prompts():
    """HPDv2's 3,200 benchmark prompts, style by style (HPDV2_STYLES, each file a JSON list of 800), from the first
    of HPDV2_FOLDERS that holds the four files."""
    for folder in HPDV2_FOLDERS:
        paths = [os.path.join(folder, f"{style}.json") for style in HPDV2_STYLES]
        if all(map(os.path.isfile, paths)):
            return [prompt for path in paths for prompt in prompt_list(path)]
    raise InputError(f"--prompts hpdv2: the HPDv2 benchmark prompts ({', '.join(s + '.json' for s in HPDV2_STYLES)}) "
                     f"are in none of {', '.join(HPDV2_FOLDERS)}: download benchmark/*.json of the dataset "
                     f"zhwang/HPDv2 into the first (hpsv2.benchmark_prompts() fills the second)")


def prompt_list(path):
    """A JSON list of prompts, each on one line (whitespace runs made one space: prompts.txt holds one per line)."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(f"{path}: expected a JSON list of non-empty prompts, as HPDv2's benchmark files are")
    return [" ".join(p.split()) for p in prompts]


def image_rows(out, prompts, seeds):
    """Every image's row: {"index", "seed", "prompt", "image"} in prompt order, seed by seed."""
    rows = []
    for seed in range(seeds):
        folder = os.path.join(out, "images", f"seed-{seed}")
        made = manifest_rows(os.path.join(folder, "images.jsonl"))
        rows += [{"index": i, "seed": seed, "prompt": p, "image": os.path.relpath(row["image"], out)}
                 for i, (p, row) in enumerate(zip(prompts, made, strict=True))]
    for row in rows:
        row["path"] = os.path.join(out, row["image"])
    return rows


@torch.no_grad()
def score_all(judge, rows, name):
    """Each row's image scored by the judge, CHUNK at a time (an evaluation's images share one size)."""
    values = []
    for start in tqdm(range(0, len(rows), CHUNK), desc=name, unit="chunk", file=sys.stderr):
        chunk = rows[start: start + CHUNK]
        images = torch.stack([reward.load_image(row["path"]) for row in chunk])
        values += judge.score(images, [row["prompt"] for row in chunk]).float().cpu().tolist()
    del judge
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next judge gets the memory back
    return values


def per_prompt(rows, values):
    """Each prompt's mean score over its seeds, in prompt order: the unit the intervals resample."""
    by_prompt = {}
    for row, value in zip(rows, values, strict=True):
        by_prompt.setdefault(row["index"], []).append(value)
    return [float(np.mean(v)) for _, v in sorted(by_prompt.items())]


def bootstrap(x, resamples, seed=0):
    """(mean, low, high): the mean of x and its percentile-bootstrap 95 % interval, x resampled with replacement
    `resamples` times (Efron 1979); a fixed seed, so that a table is the same at every run."""
    x = np.asarray(x, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(low), float(high)


def markdown(header, rows):
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def settings(e, s, chosen, rows):
    """settings.json: what the images were made with (seed 0's images.jsonl settings, the seed left out) and what
    judged them, so that two evaluations can be told apart."""
    made = manifest_rows(os.path.join(os.path.dirname(rows[0]["path"]), "images.jsonl"))[0]
    images = {k: v for k, v in made.items() if k not in ("image", "prompt", "seed")}
    return {"prompts": s.prompts, "seeds": e.seeds, "images": images, "resamples": e.resamples,
            "judges": {name: path and os.path.realpath(path) for name, (_, path, _) in chosen.items()}}


def write_results(out, rows, scores, table, setup):
    """scores.jsonl (one line per image), table.md, table.csv and settings.json, each written whole. -> the table."""
    lines = [{k: row[k] for k in ROW_KEYS} | {n: v[i] for n, v in scores.items()}
             for i, row in enumerate(rows)]
    write_text(os.path.join(out, "scores.jsonl"), "".join(json.dumps(line) + "\n" for line in lines))
    prompts = len({row["index"] for row in rows})
    text = markdown(["judge", "mean", "95 % interval", "prompts", "images"],
                    [[n, f"{m:.4f}", f"[{lo:.4f}, {hi:.4f}]", str(prompts), str(len(rows))] for n, m, lo, hi in table])
    write_text(os.path.join(out, "table.md"), text + "\n")
    write_text(os.path.join(out, "table.csv"), "judge,mean,low,high,prompts,images\n" + "".join(
        f"{n},{m:.6f},{lo:.6f},{hi:.6f},{prompts},{len(rows)}\n" for n, m, lo, hi in table))
    write_text(os.path.join(out, "settings.json"), json.dumps(setup, indent=2) + "\n")
    return text


def compare(e):
    """Two evaluations' tables side by side: for each judge both have, A's and B's means and B - A with its
    bootstrap 95 % interval over prompts, the images paired by prompt index and seed (the same prompts required)."""
    a, b = (read_scores(folder) for folder in e.compare)
    if a.keys() != b.keys() or any(a[key]["prompt"] != b[key]["prompt"] for key in a):
        raise InputError(f"--compare {e.compare[0]} {e.compare[1]}: their images are not of the same prompts and "
                         f"seeds (evaluate both with the same --prompts and --seeds)")
    keys = sorted(a)
    names = [n for n in a[keys[0]] if n not in ROW_KEYS and n in b[keys[0]]]
    rows = [{"index": key[0]} for key in keys]
    table = []
    for name in names:
        mean_a, mean_b = (float(np.mean([s[k][name] for k in keys])) for s in (a, b))
        diff = per_prompt(rows, [b[k][name] - a[k][name] for k in keys])
        table.append((name, mean_a, mean_b, *bootstrap(diff, e.resamples)))
    header = ["judge", "A", "B", "B - A", "95 % interval"]
    text = markdown(header, [[n, f"{ma:.4f}", f"{mb:.4f}", f"{d:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]"]
                             for n, ma, mb, d, lo, hi in table])
    if e.out:
        check_writable(e.out)
        write_text(os.path.join(e.out, "compare.md"), f"A: {e.compare[0]}\nB: {e.compare[1]}\n\n{text}\n")
        write_text(os.path.join(e.out, "compare.csv"), "judge,a,b,difference,low,high\n" + "".join(
            f"{n},{ma:.6f},{mb:.6f},{d:.6f},{lo:.6f},{hi:.6f}\n" for n, ma, mb, d, lo, hi in table))
    print(f"A: {e.compare[0]}\nB: {e.compare[1]}\n{text}")


def read_scores(folder):
    """An evaluation's scores.jsonl as {(prompt index, seed): its line}."""
    path = os.path.join(folder, "scores.jsonl")
    if not os.path.isfile(path):
        raise InputError(f"--compare {folder}: no scores.jsonl there (an `srpo.py evaluate --out` folder)")
    rows = {}
    for number, line in enumerate(read_lines(path, "scores"), 1):
        try:
            row = json.loads(line)
            rows[row["index"], row["seed"]] = row
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {number}: expected a JSON object with \"index\" and \"seed\"") from None
    return rows
