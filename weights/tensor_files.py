"""Safetensors files opened lazily (memory-mapped, nothing read until a tensor is asked for), for every model's
weights: FLUX.1's, FLUX.2's and the rewards' CLIP."""

import os

from safetensors import SafetensorError, safe_open

from common.util import InputError


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
