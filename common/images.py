"""Image files read as 8-bit RGB, one reader for `score` (the rewards) and `train --images` (training/image_data.py):
every bad file refused in one line that names it and says why."""

import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from common.util import InputError, first_line

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit greyscale PNG/TIFF as one of these
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)  # what a corrupt file raises


def sixteen_to_eight(im, path):
    """16-bit greyscale as 8-bit L, v8 = round(v16 / 257): 65535 -> 255, and v * 257 (8 bits widened to 16) back to
    v. Pillow's own convert("L") clips every value above 255 to white instead."""
    a = np.asarray(im).astype(np.float64)
    if a.min() < 0 or a.max() > 65535:
        raise InputError(f"{path}: {im.mode} pixels outside 0..65535 (expected 16-bit greyscale): save it as 8-bit")
    return Image.fromarray(np.rint(a / 257).astype(np.uint8))


def to_rgb(im, path):
    """8-bit RGB for the VAE. 16-bit greyscale is scaled (sixteen_to_eight); transparency (an alpha channel or a
    palette's transparent colour) is composited onto white, because the colour under a transparent pixel is
    whatever the editor left there (often black), which Pillow's convert("RGB") would show; everything else
    (greyscale, palette, CMYK, YCbCr) is Pillow's convert("RGB"), as diffusers' convert_to_rgb does (no ICC colour
    management, as in diffusers)."""
    if im.mode == "F":
        raise InputError(f"{path}: 32-bit float pixels (mode F): save it as an 8- or 16-bit image")
    if im.mode in SIXTEEN_BIT:
        im = sixteen_to_eight(im, path)
    try:
        if im.mode in ALPHA or "transparency" in im.info:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise InputError(f"{path}: cannot convert its {im.mode} pixels to RGB ({first_line(e)})") from None


def file_problem(path):
    """Why the entry at `path` is no file to read, or None for a file (or a link to one): nothing there, a broken
    symbolic link, a folder, or a pipe, socket or device (whose read could wait forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}: {e.strerror})"
        return "no such file" if isinstance(e, FileNotFoundError) else f"cannot read it ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return "is a folder, not an image"
    return None if stat.S_ISREG(mode) else "is not a regular file (a pipe, socket or device), not an image"


def read_bytes(path):
    """The bytes of the image file `path`; what is no file (file_problem) or cannot be read is refused in one line."""
    problem = file_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None


def too_large(path, error):
    """The one line for Pillow's DecompressionBombError: the image's pixel count (from Pillow's message) against the
    limit, twice Image.MAX_IMAGE_PIXELS (Pillow only warns between once and twice it)."""
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    count = f"{int(pixels[1]):,} pixels" if pixels else first_line(error)
    return InputError(f"{path}: too large to read: {count}, over the limit of {2 * Image.MAX_IMAGE_PIXELS:,} (twice "
                      f"Pillow's Image.MAX_IMAGE_PIXELS, its guard against decompression bombs): make it smaller")


def read_rgb(path, data=None):
    """The image file `path` (its bytes `data`, when the caller has read them) as 8-bit RGB, as both `score` and
    `train --images` see it: its first frame, upright (EXIF orientation applied, as diffusers' load_image does), every
    mode made RGB by to_rgb. Refused in one line when it is no file, too large or unreadable (Pillow's reason).
    Pillow's warnings are about what it read anyway (metadata it skipped, a size under the limit, a palette it would
    rather see as RGBA, which to_rgb does), so they are kept off stderr, where only the command's lines belong."""
    data = read_bytes(path) if data is None else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im), path)
    except Image.DecompressionBombError as e:
        raise too_large(path, e) from None
    except Image.UnidentifiedImageError:  # Pillow's own message names only the in-memory copy
        raise InputError(f"{path}: not a readable image (no format Pillow knows: damaged, or not an image)") from None
    except UNREADABLE as e:
        raise InputError(f"{path}: not a readable image ({first_line(e)})") from None
