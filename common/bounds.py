"""The valid range of every number a command takes, stated once with its reason: argparse parses a flag's text with
its Bounded, the command line refuses a value outside it before anything is read or built, and the configs check
their fields with the same objects (TrainConfig's annotations), for library users as for the command line."""

import argparse
import math
import typing

from common.util import InputError


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
# Training decodes for the reward untiled; the official script decodes with diffusers' VAE tiling, which splits images
# above 1024 px a side into tiles and changes them (4.4e-2 apart at 1040^2, 1.3e-6 at 1024^2): larger sizes would not
# be the official reward's image.
TRAIN_SIZE = Bounded(int, 16, 1024, why="multiples of 16; the official decode for the reward is tiled above 1024, "
                                        "this one is not; `sample` takes up to 4096")
TIMESTEPS = Bounded(int, 1, 1000, why="FlowMatch's 1000 training timesteps")
RUN_STEPS = Bounded(int, 1, STEPS_MAX, why="50,000 times the official run's 19 updates")
BETA = Bounded(float, 0, 1, open_high=True, why="AdamW's moment decay")
IMAGES_PER_PROMPT = Bounded(int, 1, 64, why="made in one batch: memory grows with it")
TOKENS = Bounded(int, 1, 512, why="T5 tokens, FluxPipeline's limit")
WINDOW_POINTS = Bounded(int, 11, 100_000, why="100 times the official 1000")
WINDOW = Bounded(int, 0, 1000, why="indices into the grid S of --window-grid steps")
PROMPTS = Bounded(int, 1, 4096, why="128 times the official 32, each prompt in turn")
RESAMPLES = Bounded(int, 100, 10_000, why="each draws every prompt: 10,000 of HPDv2's 3,200 take 256 MB")
LORA_RANK = Bounded(int, 1, 3072, why="at most a layer's smaller side, FLUX.1's width 3072")


def check_fields(config):
    """Every field of a dataclass annotated `Annotated[type, Bounded, ...]` within its range, else a one-line
    InputError naming its flag (--name-with-dashes)."""
    for name, hint in typing.get_type_hints(type(config), include_extras=True).items():
        for bounded in getattr(hint, "__metadata__", ()):
            if isinstance(bounded, Bounded):
                bounded.check("--" + name.replace("_", "-"), getattr(config, name))


def annotation(config, name, kind):
    """What the `Annotated[type, ...]` of a config field says of `kind` (Bounded: its range; str: its help), or
    None."""
    hint = typing.get_type_hints(config, include_extras=True)[name]
    return next((note for note in getattr(hint, "__metadata__", ()) if isinstance(note, kind)), None)
