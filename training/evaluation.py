"""Held-out evaluation while training, and the optional TensorBoard view: the instruments that show reward hacking
coming.

Direct reward fine-tuning learns to please its reward model: the training reward keeps rising while the images turn
"oily" or show grid patterns (SRPO issue #22: good at about 10 steps, broken by 20-50; Flow-GRPO and DanceGRPO users
report the same). The instrument is a view the training does not optimize: prompts it never trains on, sampled at
inference settings, scored with the reward model's plain score (no control words) and by the judges of
--eval-judges, rewards it is not trained on. While the model learns, the held-out rewards rise with the training
reward; when it starts to hack, they part: the independent reward flattens or falls while the training reward
climbs. Pick the checkpoint before the parting.

At step 0, every --eval-every updates and after the last, eval prompt i is sampled from seed i (the same noise at
every evaluation) with 28 Euler steps of FluxPipeline's schedule at the branches' guidance, the image
`srpo.py sample --seed i --steps 28` makes from that step's checkpoint, and its 8-bit pixels are scored as
`srpo.py score` scores the file. Rank 0 writes OUT/eval.jsonl (one line per evaluation, written last),
OUT/eval/step-NNNNNN/ (the images and the images.jsonl that `score --manifest` reads), OUT/eval/step-NNNNNN.png (a
grid, each tile captioned with its scores) and, with --tensorboard, OUT/tensorboard/. Beside the scores each image
gets the signs of reward hacking (training/hacking.py: saturation, colourfulness, high-frequency share, contrast, and
the drift from step 0's image of the same seed), which move when the images do, whatever the reward says.
"""

import contextlib
import functools
import json
import math
import os
import shutil

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.util import InputError, atomic_write, read_jsonl, read_prompts, write_text
from sampling import judges, sampler
from training import checkpoints, hacking, runtime

GRID_COLUMNS = 8


def check_run(run):
    """The evaluation's settings, before any work: --tensorboard's package, the prompts (a resumed run's the same as
    its evaluations so far)."""
    if run.tensorboard:
        try:
            import tensorboard  # noqa: F401  optional: only --tensorboard needs it
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    kept = os.path.join(run.out, "eval", "prompts.txt")  # what the run's evaluations so far were made with
    if run.resume and os.path.isfile(kept) and read_prompts(kept) != list(run.eval_prompts):
        raise InputError(f"{kept}: this run was evaluated on other prompts than --eval-prompts gives now: give the "
                         f"same prompts (or another --out), so that eval.jsonl compares like with like")


def my_share(n, ranks):
    """(prompt indices this rank samples, how many of them are its own): r, r + w, ... padded with prompt 0 to
    ceil(n / w), so that every rank runs the same number of model calls (FSDP's all-gathers are collective)."""
    mine = list(range(ranks.rank, n, ranks.world))
    return mine + [0] * (-(-n // ranks.world) - len(mine)), len(mine)


def quantized(images):
    """(B, 3, H, W) in [0, 1] as the 8-bit file holds it (save_png's rounding), back in [0, 1]: what is scored."""
    return sampler.to_8bit(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def sample_and_score(parts, prompts, scorers, schedule, cfg, ranks):
    """This rank's share of the eval prompts sampled, then scored one image at a time (as `score` does), fp32.
    -> [(index, image (3, H, W), {name: score})] of its own prompts."""
    indices, own = my_share(len(prompts), ranks)
    conds = [parts.conditioning(prompts[i], cfg, ranks.device) for i in indices]
    row = sampler.sample_grid(parts.family, parts.model, parts.ae, conds, cfg.height, cfg.width, cfg.guidance,
                              ranks.device, seeds=indices, schedule=schedule)
    images = quantized(row).split(cfg.width, dim=3)
    results = []
    for i, image in zip(indices[:own], images, strict=False):
        scores = {name: scorer.score(image.to(ranks.device), [prompts[i]]).item()
                  for name, scorer in scorers.items()}
        results.append((i, image[0], scores))
    return results


def step_zero_images(out, indices, like):
    """The step-0 evaluation images of these prompts (the same seeds), read back from OUT/eval/step-000000/ as
    (B, 3, H, W) in [0, 1]: the 8-bit pixels that were scored, so a resumed run has them too. None when one is
    missing, unreadable or of another size than `like` (a run folder without its step-0 evaluation): the drift is
    then left out."""
    pixels = []
    try:
        for i in indices:
            with Image.open(os.path.join(out, "eval", "step-000000", f"{i:05d}.png")) as image:
                pixels.append(np.asarray(image.convert("RGB")))
    except OSError:
        return None
    if any(p.shape != (*like.shape[2:], 3) for p in pixels):
        return None
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


def captioned_grid(images, captions):
    """(H', W', 3) uint8: the tiles in rows of GRID_COLUMNS, each cell a tile with its caption lines below it
    (PIL's default font); the cells are equal, so tile k is at (k // cols, k % cols) times the cell size."""
    font = ImageFont.load_default()
    h, w = images[0].shape[:2]
    line = font.getbbox("Ag")[3] + 2
    cell_w = max([w, *(math.ceil(font.getlength(text)) + 2 for caption in captions for text in caption)]) + 4
    cell_h = h + line * max(map(len, captions)) + 4
    cols = min(len(images), GRID_COLUMNS)
    grid = Image.new("RGB", (cols * cell_w, -(-len(images) // cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = k % cols * cell_w, k // cols * cell_h
        grid.paste(Image.fromarray(image), (x, y))
        for j, text in enumerate(caption):
            draw.text((x + 2, y + h + 2 + j * line), text, fill="black", font=font)
    return np.asarray(grid)


class Watch:
    """The run's instruments: the held-out evaluations (none without prompts) and TensorBoard (with `board`). The
    loop calls them where they run: open(), log() each step, evaluate() when due(), best_step() for the pruning."""

    def __init__(self, prompts, cfg, out, every=None, extra=None, schedule=sampler.FLUX_DEV, board=False):
        self.prompts, self.cfg, self.out = list(prompts), cfg, out
        self.every = every or cfg.save_every
        self.extra = extra or {}  # {name: scorer} beside the training reward's plain score
        self.schedule, self.board, self.writer = schedule, board, None

    @classmethod
    def for_run(cls, run, cfg, ranks):
        """A run's (runtime.RunConfig): its judges (--eval-judges) are loaded here, before the training parts, in the
        frozen parts' dtype (bf16 on GPUs: they score without gradient, and fp32 would add 3.9 GB on each GPU for a
        ViT-H-14 CLIP)."""
        extra = {name: judges.load(*judge, run.demo, ranks.device, runtime.frozen_dtype(ranks.device))
                 for name, judge in run.judges.items()}
        schedule = sampler.read_schedule(run.flux) if run.flux else sampler.FLUX_DEV
        return cls(run.eval_prompts, cfg, run.out, run.eval_every, extra, schedule, run.tensorboard)

    def grid_images(self, parts, prompts, name, ranks, wanted):
        """The before/after view, OUT/name: the first --samples prompts at FLUX.1-dev's inference settings (the model
        family's noise, mu and conditioning), prompt i from seed i. Each rank samples its share (my_share), rank 0
        gathers the images in prompt order and writes the row: one process's grid, bit for bit (one image at a time,
        each from its own seed)."""
        cfg, path = self.cfg, os.path.join(self.out, name)
        prompts = prompts[: cfg.samples]
        if not (wanted and prompts):
            return
        indices, own = my_share(len(prompts), ranks)
        conds = [parts.conditioning(prompts[i], cfg, ranks.device) for i in indices]
        row = sampler.sample_grid(parts.family, parts.model, parts.ae, conds, cfg.height, cfg.width, cfg.guidance,
                                  ranks.device, seeds=indices)
        mine = list(zip(indices[:own], row.cpu().split(cfg.width, dim=3), strict=False))
        images = torch.cat([image for _, image in sorted(r for share in ranks.gather(mine) for r in share)], dim=3)
        ranks.main_writes(f"the sample grid {path}", functools.partial(sampler.save_png, images, [path]))

    @contextlib.contextmanager
    def open(self, parts, ranks):
        """Watch the run from parts.start, closing TensorBoard's files at the end: what a resumed run redoes (steps
        > start; a new run's step 0 too) is dropped from eval.jsonl and TensorBoard first."""
        self.parts, self.ranks = parts, ranks
        keep = parts.start if parts.start else -1
        path = os.path.join(self.out, "eval.jsonl")
        ranks.main_writes(f"the evaluation log {path}", functools.partial(checkpoints.trim_log, path, keep))
        if self.board and ranks.main:
            from torch.utils.tensorboard import SummaryWriter  # optional: only --tensorboard imports tensorboard

            self.writer = SummaryWriter(os.path.join(self.out, "tensorboard"), purge_step=keep + 1)
        try:
            yield self
        finally:
            if self.writer:
                self.writer.close()

    def log(self, record):
        """A step's log record, its numbers as TensorBoard scalars train/NAME."""
        if self.writer:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{name}", value, record["step"])

    def due(self, step):
        """An evaluation every --eval-every updates and after the last."""
        return step % self.every == 0 or step == self.cfg.steps

    def best_step(self):
        """The saved step with the best held-out score so far (best_saved), None before any: on rank 0, which
        writes eval.jsonl and prunes the checkpoints."""
        best = best_saved(read_jsonl(os.path.join(self.out, "eval.jsonl")), self.cfg)
        return best and best[0]["step"]

    def evaluate(self, step):
        """Every eval prompt sampled and scored, each rank its share; rank 0 gathers and writes."""
        if not self.prompts:
            return
        scorers = {self.cfg.reward: self.parts.reward, **self.extra}
        mine = sample_and_score(self.parts, self.prompts, scorers, self.schedule, self.cfg, self.ranks)
        results = sorted(r for share in self.ranks.gather(mine) for r in share)
        self.ranks.main_writes(f"the evaluation of step {step} in {self.out}",
                               functools.partial(self.write, step, results, list(scorers)))

    def write(self, step, results, names):
        """eval/step-NNNNNN/ (images, images.jsonl), eval/step-NNNNNN.png, the eval.jsonl line last (the scores and
        the signs of reward hacking, training/hacking.py: each one's mean and per-prompt list), then TensorBoard. A
        failed write (a full disk) removes this evaluation's folder and grid: none is left half made."""
        folder = os.path.join(self.out, "eval", f"step-{step:06d}")
        images = torch.stack([image for _, image, _ in results])
        grid = captioned_grid(list(sampler.to_8bit(images).numpy()),
                              [[f"{name} {s[name]:.4f}" for name in names] for _, _, s in results])
        # step 0's images are these; later ones drift from them
        reference = images if step == 0 else step_zero_images(self.out, [i for i, _, _ in results], images)
        per_prompt = {**{name: [s[name] for _, _, s in results] for name in names},
                      **hacking.image_signs(images, reference)}
        record = {"step": step, **{name: sum(v) / len(v) for name, v in per_prompt.items()}, "per_prompt": per_prompt}
        try:
            os.makedirs(folder, exist_ok=True)
            write_text(os.path.join(self.out, "eval", "prompts.txt"), "".join(p + "\n" for p in self.prompts))
            paths = sampler.save_png(images, [os.path.join(folder, f"{i:05d}.png") for i, _, _ in results])
            write_text(os.path.join(folder, "images.jsonl"), "".join(
                json.dumps({"image": os.path.basename(path), "prompt": self.prompts[i], "seed": i}) + "\n"
                for path, (i, _, _) in zip(paths, results, strict=True)))
            atomic_write(folder + ".png", functools.partial(Image.fromarray(grid).save, format="PNG"))
            checkpoints.append_log(os.path.join(self.out, "eval.jsonl"), record)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(folder + ".png"):
                os.remove(folder + ".png")
            raise
        if self.writer:
            for name in per_prompt:
                self.writer.add_scalar(f"eval/{name}", record[name], step)
            self.writer.add_image("eval/grid", grid, step, dataformats="HWC")


def best_saved(records, cfg):
    """(the record of the best saved step, the score's name) over eval.jsonl's records, None if no saved step was
    evaluated. The score is the first independent judge's (--eval-judges) when there is one, else the training
    reward model's plain score."""
    others = [name for name in records[0] if name in judges.JUDGES and name != cfg.reward] if records else []
    name = others[0] if others else cfg.reward
    saved = [r for r in records if name in r and r["step"] and (r["step"] % cfg.save_every == 0
                                                                 or r["step"] == cfg.steps)]
    return (max(saved, key=lambda r: r[name]), name) if saved else None


def report(out, cfg):
    """The held-out evaluations in two lines: the best saved checkpoint, and how the signs of reward hacking
    moved."""
    path = os.path.join(out, "eval.jsonl")
    records = read_jsonl(path)
    for line in (best_checkpoint(out, path, records, cfg), judges_fell(path, records, cfg), signs_moved(path, records)):
        if line:
            print(line)


def best_checkpoint(out, path, records, cfg):
    """Which saved checkpoint scored best on the held-out reward (best_saved; the pruning keeps it). None before
    any was saved."""
    found = best_saved(records, cfg)
    if not found:
        return None
    best, name = found
    records = [r for r in records if name in r]  # a line mended by hand without its scores is not compared
    folder = checkpoints.complete(out).get(best["step"])
    return (f"held-out {name} ({path}): best saved checkpoint step {best['step']} ({best[name]:.4f}; "
            f"{folder or f'no longer kept (--keep {cfg.keep})'}); step {records[0]['step']}: {records[0][name]:.4f}, "
            f"step {records[-1]['step']}: {records[-1][name]:.4f}")


def judges_fell(path, records, cfg):
    """The held-out judges that fell from the first evaluation to the last while the training reward's held-out score
    rose: the sign of reward hacking the peers watch (FlowBP, Flow-GRPO). None without such a judge."""
    first, last = (records[0], records[-1]) if len(records) > 1 else ({}, {})
    if cfg.reward not in first or cfg.reward not in last or last[cfg.reward] <= first[cfg.reward]:
        return None
    fell = [f"{name} {first[name]:.4f} -> {last[name]:.4f}" for name in first if name in judges.JUDGES
            and name != cfg.reward and name in last and last[name] < first[name]]
    return fell and (f"held-out judges that fell while {cfg.reward} rose ({first[cfg.reward]:.4f} -> "
                     f"{last[cfg.reward]:.4f}), step {first['step']} -> {last['step']} ({path}): {', '.join(fell)}: "
                     f"the reward may be hacked")


def signs_moved(path, records):
    """Each sign of reward hacking at the first evaluation and at the last (the drift where both have it). None
    with fewer than two evaluations that have the signs."""
    signed = [r for r in records if "saturation" in r]  # lines written before the signs were measured have none
    if len(signed) < 2:
        return None
    first, last = signed[0], signed[-1]
    moved = ", ".join(f"{name} {first[name]:.4g} -> {last[name]:.4g}" for name in hacking.SIGNS
                      if name in first and name in last)
    return f"signs of reward hacking ({path}), step {first['step']} -> {last['step']}: {moved}"
