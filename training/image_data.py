"""Offline SRPO's data: real images with captions, each encoded once by the VAE into the x0 that replaces the online
rollout. The SRPO paper and the official README train from "a small dataset of real images" (fewer than 1,500
suffice); the official FLUX script (fastvideo/SRPO.py) keeps that path commented out.

The folder follows the common image-folder convention (Hugging Face datasets' `imagefolder`):
- `metadata.jsonl`: one JSON object per line with "file_name" (relative to the folder) and "text" (the caption);
- else a `.txt` with the caption beside each image, of the same stem (a.png + a.txt).
metadata.jsonl wins when there is one: the .txt files are then ignored, and every image in the folder must be listed
in it, so that none is left out without a word. The images are the folder's own files (not its subfolders') of the
types Pillow reads (png, jpg, webp, ...), hidden files skipped; metadata.jsonl may also name files in subfolders.

Every image is checked before anything is encoded (read whole, converted, measured), and the check names every bad
file, one line each: nothing is silently dropped, and one pass of fixes makes the folder whole.
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from tqdm import tqdm

import flux_model as fm
from common.images import read_bytes, read_rgb
from common.util import InputError, atomic_write, check_folder, read_lines, written

METADATA = "metadata.jsonl"
LISTED = 20  # bad files named one per line in the error; more are counted
CACHE_FORMAT = "image_data 1"  # in every cache key: change it when preprocessing or encoding changes

# ----------------------------------------------------------------------------------------------------------------
# Captions


def image_files(folder):
    """The paths of the folder's own entries named as files Pillow opens (by their extension), sorted; hidden ones
    (macOS's ._a.png) skipped. Entries that are not readable files (a broken link, a folder named a.png) are kept:
    the check names them rather than leave them out without a word."""
    Image.init()
    known = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    return [os.path.normpath(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in known]


def caption_text(lines):
    """A caption as one line: its lines stripped and joined by spaces."""
    return " ".join(line.strip() for line in lines if line.strip())


def parse_row(line):
    """(file_name, text) of one metadata.jsonl line, or None when it is not an object with both as strings."""
    try:
        row = json.loads(line)
        name, text = row["file_name"], row["text"]
    except (ValueError, KeyError, TypeError):
        return None
    return (name, text) if isinstance(name, str) and isinstance(text, str) else None


def metadata_captions(folder, problems):
    """{image path: caption} from folder/metadata.jsonl. A bad line, a missing file, an empty caption, a file
    listed twice or an image of the folder not listed adds one problem naming it (and the line)."""
    path, captions, line_of = os.path.join(folder, METADATA), {}, {}
    for number, line in enumerate(read_lines(path, "metadata file"), 1):
        if not line.strip():
            continue
        where, row = f"{path}, line {number}", parse_row(line)
        if row is None:
            problems.append(f'{where}: expected a JSON object with "file_name" and "text", both strings')
            continue
        image = os.path.normpath(os.path.join(folder, row[0]))
        if image in line_of:
            problems.append(f"{where}: {row[0]} is listed again (first on line {line_of[image]})")
            continue
        line_of[image] = number
        if not os.path.lexists(image):  # an entry that is there but no readable file is named by the check
            problems.append(f"{where}: {image}: no such file")
        elif not caption_text(row[1].splitlines()):
            problems.append(f"{where}: {row[0]}: empty caption")
        else:
            captions[image] = caption_text(row[1].splitlines())
    for image in image_files(folder):
        if image not in line_of:
            problems.append(f"{image}: no caption (not listed in {path})")
    return captions


def txt_captions(folder, problems):
    """{image path: caption} from the .txt beside each image; a missing, empty or unreadable one is a problem."""
    captions = {}
    for image in image_files(folder):
        txt = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(txt):
            problems.append(f"{image}: no caption (expected {os.path.basename(txt)} beside it, or a {METADATA})")
            continue
        try:
            caption = caption_text(read_lines(txt, "caption"))
        except InputError as e:
            problems.append(str(e))
            continue
        if caption:
            captions[image] = caption
        else:
            problems.append(f"{txt}: empty caption")
    return captions


def read_captions(folder, problems):
    """{image path: caption} by metadata.jsonl if the folder has one, else by the .txt files."""
    if os.path.isfile(os.path.join(folder, METADATA)):
        return metadata_captions(folder, problems)
    return txt_captions(folder, problems)


# ----------------------------------------------------------------------------------------------------------------
# Pixels


def load_image(data, path, height, width):
    """The RGB image in `data`, the bytes of file `path` (read_rgb). Refused in one line when unreadable, or when it
    would have to be enlarged to cover width x height (either side shorter than the training size's): enlarging
    invents no detail, and the model would learn blur as a real image."""
    rgb = read_rgb(path, data)
    if rgb.width < width or rgb.height < height:
        raise InputError(f"{path}: {rgb.width}x{rgb.height} pixels (width x height), smaller than the training size "
                         f"{width}x{height}: images are never enlarged")
    return rgb


def preprocess(image, height, width):
    """diffusers' VaeImageProcessor.preprocess(image, height, width, resize_mode="crop") of an RGB PIL image: resized
    (Lanczos, aspect kept) to the smallest size that covers width x height, the centre cropped, [0, 255] scaled to
    [-1, 1] as 2 * (v / 255) - 1: (1, 3, height, width) float32."""
    if width / height > image.width / image.height:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    resized = image.resize(size, resample=Image.Resampling.LANCZOS)
    left, top = size[0] // 2 - width // 2, size[1] // 2 - height // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height))).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous() - 1.0


@torch.no_grad()
def encode(ae, pixels):
    """x0 = pack(scale * (mean - shift)): the VAE posterior's mean, normalised as FLUX's latents are, in the packed
    (1, (H/16)(W/16), 64) layout of the rollout's latents (flux_sampling.initial_noise), float32 on the CPU.
    The mean, not a sample: x0 is cached once per image, and one cached draw would fix the same perturbation for
    the whole run (noise without a sample's point). The official script's commented-out path draws
    latent_dist.sample() instead (and resizes to 1024x1024 without keeping the aspect). The encoder runs in its
    weights' dtype with autocast off, so that the cache key (which includes them) says what made x0."""
    weight = next(ae.parameters())
    with torch.autocast(weight.device.type, enabled=False):
        z = ae.encode(pixels.to(weight.device, weight.dtype))
    return fm.pack(z).float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# The image set and its cached latents


def problem_report(folder, problems):
    """One error for all the bad files: a line each (the first LISTED, the rest counted)."""
    more = [f"... and {len(problems) - LISTED} more"] if len(problems) > LISTED else []
    return "\n".join([f"{folder}: {len(problems)} problem(s) with the images, one per line:",
                      *problems[:LISTED], *more])


class ImageSet:
    """The captioned images of a folder at one training size (height x width, pixels), every one checked before
    anything is encoded and hashed (sha256 of the file's bytes), so that a file changed later is never taken for
    the one checked. The folder's images without a caption are checked too: one pass of fixes mends all. paths,
    captions and digests line up, sorted by path. Checking reads and decodes each file once (some 20 ms for a
    1-megapixel JPEG)."""

    def __init__(self, folder, height, width):
        check_folder(folder, "a folder of captioned images")
        self.folder, self.height, self.width, problems = folder, height, width, []
        captions = read_captions(folder, problems)
        digests = {path: self.check(path, problems) for path in sorted({*captions, *image_files(folder)})}
        self.paths = sorted(captions)
        self.captions = [captions[path] for path in self.paths]
        self.digests = [digests[path] for path in self.paths]
        if problems:
            raise InputError(problem_report(folder, problems))
        if not self.paths:
            raise InputError(f"{folder}: no images (expected image files with a {METADATA} or a .txt caption each)")

    def check(self, path, problems):
        """The file's sha256, or None after adding its problem."""
        try:
            data = read_bytes(path)
            load_image(data, path, self.height, self.width)
        except InputError as e:
            problems.append(str(e))
            return None
        return hashlib.sha256(data).hexdigest()

    def __len__(self):
        return len(self.paths)


def vae_fingerprint(ae):
    """sha256 of the autoencoder's config and every weight (name, dtype, shape, bytes): an entry is reused only with
    the VAE that wrote it (not another checkpoint, a fine-tuned one, or the same one in bf16). Each tensor is
    flattened before its bytes are viewed: a 0-d one (FLUX.2's BatchNorm counter num_batches_tracked) has no
    dimension to view as bytes."""
    h = hashlib.sha256(f"{CACHE_FORMAT} {ae.cfg}".encode())
    for name, t in ae.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class Latents:
    """x0 of each image of an ImageSet (index i: images.paths[i]), encoded once and kept in cache_dir (the run
    folder's latents/) as safetensors named by what x0 depends on: the image file's sha256, the training size and
    the VAE's fingerprint. A resumed run reads them back; a changed image, size or VAE makes a new entry, never
    reuses a stale one. A damaged entry (a copy cut short) is re-made, with a note. Under torchrun, run encode_all
    on one rank and let the others wait (a barrier): two processes writing one entry would share its temporary
    file."""

    def __init__(self, images, ae, cache_dir):
        self.images, self.ae, self.cache_dir, self.encoded = images, ae, cache_dir, 0
        self.vae = vae_fingerprint(ae)
        written(f"the latent cache folder {cache_dir}", lambda: os.makedirs(cache_dir, exist_ok=True))

    def __len__(self):
        return len(self.images)

    def entry(self, i):
        size = f"{self.images.width}x{self.images.height}"
        return os.path.join(self.cache_dir, f"{self.images.digests[i][:32]}-{size}-{self.vae[:16]}.safetensors")

    def __getitem__(self, i):
        """x0 of image i, (1, (H/16)(W/16), 64) float32 on the CPU: from the cache, else encoded and stored."""
        x0 = self.cached(i)
        return self.encode(i) if x0 is None else x0

    def cached(self, i):
        """The stored x0, or None when there is none or it is damaged. Read whole into memory, not mapped: a mapped
        tensor would change under the caller if the file were cut short or written over in place."""
        path, tokens = self.entry(i), (self.images.height // 16) * (self.images.width // 16)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                x0 = load(f.read())["x0"]
            if x0.shape == (1, tokens, 4 * self.ae.cfg.z_channels) and x0.dtype == torch.float32:
                return x0
        except (SafetensorError, OSError, KeyError):
            pass
        print(f"note: {path}: a damaged latent cache entry (of {self.images.paths[i]}), encoded again", file=sys.stderr)
        return None

    def encode(self, i):
        """Encode image i and store its x0 atomically; a file changed since the check is refused."""
        path, h, w = self.images.paths[i], self.images.height, self.images.width
        data = read_bytes(path)
        if hashlib.sha256(data).hexdigest() != self.images.digests[i]:
            raise InputError(f"{path}: changed since the image folder was checked: start the run again to use it")
        x0 = encode(self.ae, preprocess(load_image(data, path, h, w), h, w))
        entry, meta = self.entry(i), {"image": os.path.basename(path), "size": f"{w}x{h}", "format": CACHE_FORMAT}

        def store(tmp):
            save_file({"x0": x0}, tmp, metadata=meta)

        written(f"the latent cache entry {entry}", lambda: atomic_write(entry, store))
        self.encoded += 1
        return x0

    def encode_all(self, progress=True):
        """Make sure every image has its entry (the VAE's work done before training, not in its steps); returns how
        many were encoded now (the rest were read back)."""
        before = self.encoded
        for i in tqdm(range(len(self)), desc="encoding images", disable=not progress):
            if self.cached(i) is None:
                self.encode(i)
        return self.encoded - before
