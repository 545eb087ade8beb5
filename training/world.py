"""The tiny world (issue 34): images the code draws, so that SRPO's claims can be watched on a laptop instead of on
50 GB of weights. Each image is one shape (circle, square, triangle) in one of six colours, bright or dark, small
or large, somewhere on a plain background, with its caption ("a small bright red circle on a grey background") and
its labels. Everything follows from (seed, n): the same seed gives the same bytes.

Beside it, the world's judge: a small CNN trained on the labels, which says whether an image shows what its caption
says. It is NOT the reward model: a model that hacks its reward fools the reward model first, so caption agreement
must be measured by a model trained apart from it (the judge of hacking, beside training/hacking.py's statistics).
"""

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, safe_open
from torch import nn

from common.util import derive_seed
from training.hacking import luma

COLOURS = {"red": (1, 0, 0), "yellow": (1, 1, 0), "green": (0, 1, 0), "cyan": (0, 1, 1), "blue": (0, 0, 1),
           "magenta": (1, 0, 1)}
BRIGHTNESS = {"bright": 1.0, "dark": 0.45}  # the colour's channels at 255, or at 0.45 of it (115)
SIZES = {"small": (0.12, 0.17), "large": (0.22, 0.28)}  # the radius of a circle of the shape's area, of the side
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": 0.5, "black": 0.1, "white": 0.9}  # grey levels
LABELS = {"size": tuple(SIZES), "brightness": tuple(BRIGHTNESS), "colour": tuple(COLOURS), "shape": SHAPES,
          "background": tuple(BACKGROUNDS)}  # in the caption's order
# Every shape has the area of a circle of radius r, so that a size is an area whatever the shape: a square of half
# side sqrt(pi)/2 r, an equilateral triangle of circumradius sqrt(4 pi / (3 sqrt 3)) r.
SQUARE, TRIANGLE = np.sqrt(np.pi) / 2, np.sqrt(4 * np.pi / (3 * np.sqrt(3)))
REACH = {"circle": 1.0, "square": SQUARE, "triangle": TRIANGLE}  # the farthest a shape's edge is from its centre
SUPER = 4  # subsamples a pixel side: the edges anti-aliased, as a camera's would be
CHUNK = 256  # images drawn at a time (memory: CHUNK x (SUPER size)^2 floats)
HELD_OUT_SEED = 1_000_000  # the held-out images' seed: never a training batch's (those are derive_seed's 63 bits)
FOREGROUND = 0.1  # a pixel whose channels differ from the background's by more than this is drawn on


def draw_labels(seed, n, size=32, backgrounds=("grey",)):
    """n images' labels from the seed: {name: (n,) index into LABELS[name]} and the geometry, in pixels: "radius",
    "x", "y" (the centre; a triangle's is its centroid). Each image is one row of uniforms, so image i depends on
    (seed, i) alone: a larger n draws more images, the same first ones. Shapes stay whole inside the image."""
    u = np.random.default_rng(seed).random((n, len(LABELS) + 3))
    choices = {**LABELS, "background": [LABELS["background"].index(b) for b in backgrounds]}
    labels = {name: (u[:, k] * len(values)).astype(np.int64) for k, (name, values) in enumerate(choices.items())}
    labels["background"] = np.array(choices["background"], dtype=np.int64)[labels["background"]]
    low, high = np.array(list(SIZES.values())).T[:, labels["size"]] * size
    labels["radius"] = low + (high - low) * u[:, -3]
    margin = np.array(list(REACH.values()))[labels["shape"]] * labels["radius"] + 0.5
    labels["x"], labels["y"] = (margin + (size - 2 * margin) * u[:, k] for k in (-2, -1))
    return labels


def coverage(labels, size):
    """(n, size, size) float32: the share of each pixel inside its image's shape, SUPER x SUPER subsamples a pixel.
    With d = (dx, dy) the offset from the centre: the circle is |d| <= r, the square max(|dx|, |dy|) <= sqrt(pi)/2 r,
    the triangle (apex up, image y down) <d, n_k> <= R / 2 for its edges' outward normals n_k = (0, 1) and
    (+-sqrt(3)/2, -1/2), R / 2 its inradius. Each shape's test only on its own images."""
    points = ((np.arange(size * SUPER) + 0.5) / SUPER).astype(np.float32)
    dx = points[None, None, :] - labels["x"][:, None, None].astype(np.float32)
    dy = points[None, :, None] - labels["y"][:, None, None].astype(np.float32)
    r = labels["radius"][:, None, None].astype(np.float32)
    inside = {"circle": lambda dx, dy, r: dx ** 2 + dy ** 2 <= r ** 2,
              "square": lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) <= SQUARE * r,
              "triangle": lambda dx, dy, r: (dy <= TRIANGLE / 2 * r)  # the base, then both slopes at once
              & (np.sqrt(3) / 2 * abs(dx) - dy / 2 <= TRIANGLE / 2 * r)}
    share = np.zeros((len(r), size, size), np.float32)
    for k, test in enumerate(inside.values()):
        mine = labels["shape"] == k
        hits = test(dx[mine], dy[mine], r[mine]).reshape(-1, size, SUPER, size * SUPER)
        counts = hits.sum(axis=2, dtype=np.uint8).reshape(-1, size, size, SUPER).sum(axis=3, dtype=np.uint8)
        share[mine] = counts * np.float32(1 / SUPER ** 2)  # one axis, then the other: a few times faster
    return share


def colour_of(labels):
    """(n, 3) float32 in [0, 1]: the shape's RGB, its colour at its brightness."""
    rgb = np.array(list(COLOURS.values()), dtype=np.float32)[labels["colour"]]
    return rgb * np.array(list(BRIGHTNESS.values()), dtype=np.float32)[labels["brightness"]][:, None]


def render(labels, size):
    """(n, size, size, 3) uint8: the background's grey, blended toward the shape's colour by each pixel's coverage."""
    images = []
    for start in range(0, len(labels["shape"]), CHUNK):
        part = {name: value[start:start + CHUNK] for name, value in labels.items()}
        grey = np.array(list(BACKGROUNDS.values()), dtype=np.float32)[part["background"]][:, None, None, None]
        share = coverage(part, size)[..., None]
        pixels = grey + (colour_of(part)[:, None, None, :] - grey) * share
        images.append(np.rint(pixels * 255).astype(np.uint8))
    return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)


def draw(seed, n, size=32, backgrounds=("grey",)):
    """The world's dataset of n: (images (n, size, size, 3) uint8, labels as draw_labels gives them)."""
    labels = draw_labels(seed, n, size, backgrounds)
    return render(labels, size), labels


def captions(labels, leave_out=()):
    """Each image's caption, "a small bright red circle on a grey background"; the words of the labels in leave_out
    left out (a prompt without its brightness, for SRP's control words to decide it)."""
    words = [[values[i] for i in labels[name]] if name not in leave_out else [""] * len(labels[name])
             for name, values in LABELS.items()]
    return [" ".join(f"a {size} {bright} {colour} {shape}".split()) + (f" on a {ground} background" if ground else "")
            for size, bright, colour, shape, ground in zip(*words, strict=True)]


def labels_of(texts):
    """The labels of captions or prompts as draw_labels gives them ({name: (n,) index into LABELS[name]}), read from
    their words; -1 where a text says none of a label's words (a prompt that leaves it out)."""
    words = [set(t.replace(".", " ").split()) for t in texts]
    return {name: np.array([next((i for i, v in enumerate(values) if v in w), -1) for w in words], dtype=np.int64)
            for name, values in LABELS.items()}


def prompts(held_out=False):
    """The world's prompts for SRPO, without a brightness word (SRP's control words decide it): each (size, colour,
    shape) on grey, 36 in all. One per colour, its size and shape cycling, is held out (never trained on: the
    held-out evaluations'); the other 30 are trained on."""
    combos = [(size, colour, shape) for colour in range(len(COLOURS)) for size in range(len(SIZES))
              for shape in range(len(SHAPES))]
    chosen = [c for c in combos if ((c[0], c[2]) == (c[1] % len(SIZES), c[1] % len(SHAPES))) == held_out]
    labels = {name: np.array([c[k] for c in chosen]) for k, name in enumerate(("size", "colour", "shape"))}
    labels |= {"brightness": labels["size"] * 0, "background": labels["size"] * 0 + LABELS["background"].index("grey")}
    return captions(labels, leave_out=("brightness",))


def to_tensor(images):
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [0, 1], the layout of the project's images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------------------------
# Statistics the claims name; images (B, 3, H, W) in [0, 1], one number per image (B,), float64


def mean_luma(images):
    """The image's mean Rec. 601 luma (training/hacking.py's): what "bright" and "dark" move."""
    return luma(images).mean(dim=(1, 2))


def foreground_share(images, background="grey"):
    """The share of pixels drawn on: some channel more than FOREGROUND away from the background's grey. What
    "small" and "large" move: pi r^2 / size^2 for the world's own images, up to a pixel along the shape's edge
    (its anti-aliasing)."""
    away = (images.double() - BACKGROUNDS[background]).abs().amax(dim=1) > FOREGROUND
    return away.double().mean(dim=(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# The judge: caption agreement, apart from the reward model


@dataclass
class JudgeConfig:
    seed: int = 0
    size: int = 32  # the images' side
    width: int = 16  # channels of the first convolution (then 2x, 2x)
    steps: int = 800  # each on a fresh batch of the world: no image is seen twice, so nothing to overfit
    batch: int = 64
    lr: float = 1e-2  # at step 0, then down a half cosine to 0: the last steps settle rather than jitter
    noise: float = 0.05  # the largest std of Gaussian noise added to a training image: a sampler's images are noisy
    backgrounds: tuple = ("grey",)


class Judge(nn.Module):
    """Three 3x3 convolutions, each followed by ReLU and a 2x2 max-pool, pooled to 4 x 4, then one linear head per
    label: logits over LABELS[name]. Images in [0, 1]."""

    def __init__(self, config):
        super().__init__()
        w = config.width
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(2 * w * 16, len(values)) for name, values in LABELS.items()})

    def forward(self, images):
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def agreement(self, images, labels):
        """{label name: the share of images whose predicted value is their label's}, and "all": every label right."""
        logits = self(images)
        right = {name: logits[name].argmax(dim=1) == torch.from_numpy(labels[name]) for name in LABELS}
        right["all"] = torch.stack(list(right.values())).all(dim=0)
        return {name: r.double().mean().item() for name, r in right.items()}


def cosine_lr(lr, step, steps, warmup=0):
    """lr_t = lr min(1, (t + 1) / warmup) (1 + cos(pi t / steps)) / 2: a short ramp (none at warmup 0), then a half
    cosine to 0, the world's models' schedule: the last steps settle rather than jitter."""
    return lr * min(1.0, (step + 1) / max(warmup, 1)) * (1 + math.cos(math.pi * step / steps)) / 2


def train_judge(config):
    """The judge trained by Adam on cross-entropy summed over the labels, each step on a fresh batch of the world
    (seed derived from config.seed and the step) with Gaussian noise of a random std in [0, config.noise], at
    lr_t = lr (1 + cos(pi t / steps)) / 2. Seeded and deterministic on a CPU: the same config, torch, CPU and thread
    count give the same bytes (a thread count changes the order of the convolutions' sums)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        judge = Judge(config)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "judge noise"))
    optimizer = torch.optim.Adam(judge.parameters(), lr=config.lr)
    for step in range(config.steps):
        images, labels = draw(derive_seed(config.seed, "judge", step), config.batch, config.size, config.backgrounds)
        x = to_tensor(images)
        std = torch.rand(len(x), 1, 1, 1, generator=generator) * config.noise
        x = x + std * torch.randn(x.shape, generator=generator)
        logits = judge(x)
        loss = sum(nn.functional.cross_entropy(logits[name], torch.from_numpy(labels[name])) for name in LABELS)
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"] = cosine_lr(config.lr, step, config.steps)
        loss.backward()
        optimizer.step()
    return judge.eval()


def load_judge(path):
    """The judge written by tools/make_world.py: its weights, its JudgeConfig in the file's metadata."""
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["config"])
    judge = Judge(JudgeConfig(**{**config, "backgrounds": tuple(config["backgrounds"])}))
    judge.load_state_dict(load_file(path))
    return judge.eval()


def judge_metadata(config):
    """The safetensors metadata load_judge reads back."""
    return {"format": "pt", "config": json.dumps(asdict(config))}
