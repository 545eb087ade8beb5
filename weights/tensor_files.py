"""Safetensors files opened lazily (memory-mapped, nothing read until a tensor is asked for), for every model's
weights: FLUX.1's, FLUX.2's and the rewards' CLIP; and written one tensor at a time (export, checkpoints)."""

import json
import math
import os
import struct

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from common.util import InputError, atomic_write, written

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64"}


def open_safetensors(path):
    """A lazy handle on a .safetensors file; bad files become one-line errors."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def shape_of(handle, key):
    return tuple(handle.get_slice(key).get_shape())


def write_safetensors(path, specs, make, metadata, before=None, progress=True):
    """Write path as safetensors from specs = [(name, shape, dtype)], calling make(name) for each tensor just
    before its bytes are written, so memory holds one tensor at a time (safetensors' own save_file needs them all).
    The format (huggingface/safetensors, "Format"): an 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded with spaces to a multiple of 8, then
    the tensors' bytes back to back. Wider dtypes come first, as safetensors' writer orders them, so every tensor
    starts at a multiple of its item size (write_order). Written atomically (temp file, then rename); before(), if
    given, runs before each tensor (export's stop check); progress: a bar of the bytes written."""
    specs = write_order(specs)
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp):
        with open(tmp, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=os.path.basename(path),
                                        disable=not progress) as bar:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, shape, dtype in specs:
                if before:
                    before()
                t = make(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):  # the header is written: a wrong size would corrupt the file
                    raise ValueError(f"{name}: made {list(t.shape)}, the header says {list(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the host's byte order: little-endian
                bar.update(t.numel() * dtype.itemsize)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written(path, lambda: atomic_write(path, write))
    return path


def write_order(specs):
    """The order write_safetensors writes specs in: wider dtypes first, otherwise as given (a stable sort)."""
    return sorted(specs, key=lambda s: -s[2].itemsize)
