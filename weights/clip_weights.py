"""CLIP weights on disk -> a frozen `transformers.CLIPModel`, as weights/flux_weights.py is for FLUX: open_clip ViT-H-14
checkpoints (HPSv2/2.1's `{'state_dict': ...}`, fp16) converted on load, or their converted safetensors file read
lazily, and transformers `save_pretrained` folders (PickScore_v1, CLIP-ViT-H-14).

For open_clip checkpoints depth and widths come from the weights' shapes, head counts from ViT-H-14's head widths;
keys and shapes are checked on the meta device before any weight is read.
"""

import os
import pickle
import re
from math import isqrt
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from common.util import InputError, atomic_write, first_line, load_pretrained
from weights.clip_tokenizer import CONTEXT_LENGTH
from weights.tensor_files import open_safetensors, shape_of

# transformers is imported in the functions that build its models and configs: importing it takes ~4 s, which every
# command, and every input error before its one line, would pay otherwise.

VISION_HEAD_WIDTH = 80  # ViT-H-14: 1280 wide, 16 heads
TEXT_HEAD_WIDTH = 64  # ViT-H-14 text tower: 1024 wide, 16 heads


# ----------------------------------------------------------------------------------------------------------------------
# CLIP config of the ViT-H-14 family


def clip_config(vision_width, vision_layers, text_width, text_layers, embed_dim, *, vision_mlp=None, text_mlp=None,
                vocab_size=49408, context_length=CONTEXT_LENGTH, image_size=224, patch_size=14,
                vision_head_width=VISION_HEAD_WIDTH, text_head_width=TEXT_HEAD_WIDTH):
    """A `CLIPConfig` laid out like open_clip's ViT-H-14: exact GELU, LayerNorm eps 1e-5, MLP 4x by default.

    The end token is the last id of the vocabulary and the start token the one before it (true of CLIP's BPE vocab,
    49406/49407, and of the byte-level fallback); transformers pools text features at the first end token.
    """
    from transformers import CLIPConfig  # here, not above: see the imports

    for name, width, head_width in (("vision", vision_width, vision_head_width), ("text", text_width, text_head_width)):
        if width % head_width:
            raise InputError(f"{name} width {width} is not a multiple of the ViT-H-14 head width {head_width}")
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": embed_dim}
    text = dict(common, vocab_size=vocab_size, hidden_size=text_width, intermediate_size=text_mlp or 4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_width // text_head_width,
                max_position_embeddings=context_length, pad_token_id=0, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1)
    vision = dict(common, hidden_size=vision_width, intermediate_size=vision_mlp or 4 * vision_width,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_width // vision_head_width,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------------------------
# open_clip checkpoint -> transformers CLIPModel weights

_TOP_LEVEL = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj", "attn.in_proj": "self_attn.in_proj"}
_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
_TRANSPOSED = ("visual.proj", "text_projection")  # open_clip applies them as x @ P, nn.Linear as x @ W.T


def _hf_name(key):
    """transformers name of an open_clip key (q/k/v still fused as `self_attn.in_proj.*`), None if unknown."""
    m = _BLOCK_KEY.fullmatch(key)
    if m is None:
        return _TOP_LEVEL.get(key)
    tower = "vision_model" if m[1] else "text_model"
    module = _BLOCK.get(m[3])
    return module and f"{tower}.encoder.layers.{m[2]}.{module}.{m[4]}"


class Piece(NamedTuple):
    """Where one `CLIPModel` tensor lies in a checkpoint: rows `rows` of tensor `source`, transposed or not."""

    source: str  # the checkpoint's key
    rows: slice | None  # q, k or v: a third of open_clip's fused in_proj (first dim)
    transposed: bool  # open_clip's x @ P projections, nn.Linear's x @ W.T
    shape: tuple  # the `CLIPModel` tensor's shape
    origin: str  # "'source key' (its shape)", for error messages


def _describe(key, shape):
    return f"'{key}' {tuple(shape)}"


def open_clip_to_hf(shapes):
    """{`CLIPModel` key: Piece} for an open_clip CLIP checkpoint's {key: shape}: keys renamed, `in_proj` split into q,
    k, v (thirds of its rows), the two projections transposed; open_clip's unused `attn_mask` buffer dropped."""
    pieces = {}
    for key, shape in shapes.items():
        if key == "attn_mask":  # the causal mask buffer some open_clip versions saved; transformers builds its own
            continue
        name, origin = _hf_name(key), _describe(key, shape)
        if name is None:
            raise InputError(f"unexpected key {origin}: not an open_clip ViT-H-14 CLIP checkpoint")
        transposed = key in _TRANSPOSED and len(shape) == 2
        if ".in_proj." not in name:
            pieces[name] = Piece(key, None, transposed, tuple(reversed(shape)) if transposed else tuple(shape), origin)
            continue
        if not shape or shape[0] % 3:  # open_clip fuses q, k, v along the output dim: in_proj_weight is (3W, W)
            raise InputError(f"key {origin}: a fused q, k, v projection needs a first dimension divisible by 3")
        n = shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            pieces[name.replace("in_proj", part)] = Piece(key, slice(i * n, (i + 1) * n), False, (n, *shape[1:]),
                                                          origin)
    return pieces


def torch_state_dict(path):
    """Tensors of a torch checkpoint, memory-mapped (no copy in RAM), refusing pickled code (weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise InputError(f"{path}: not a torch checkpoint ({first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it pickles {found[1]}" if found else "pickled objects"
        raise InputError(f"{path}: torch.load(weights_only=True) refused it ({why}); save a plain state_dict") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a torch checkpoint ({first_line(e)})") from None
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if (not isinstance(state_dict, dict) or not state_dict
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise InputError(f"{path}: expected a state_dict of tensors or a dict with one under 'state_dict'")
    return state_dict


def check_checkpoint(path, expected="an open_clip .pt/.bin or a .safetensors file"):
    """A checkpoint is a file that is there: checked before it is read, the error naming what was expected."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a checkpoint (expected {expected})")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file, checkpoint not found (expected {expected})")


def read_clip_weights(path):
    """(pieces, fetch) for an open_clip `.pt`/`.bin` or a `.safetensors` file, either key naming (open_clip keys are
    converted): pieces is {`CLIPModel` key: Piece}, known from the file's header or its memory map before any weight
    is read; fetch(piece) -> that CPU tensor, in the file's dtype.

    Torch checkpoints are memory-mapped (fetch gives views of the map); safetensors files are read lazily, one
    tensor per fetch (q, k and v each read only their rows).
    """
    path = Path(path)
    check_checkpoint(path)
    if path.suffix == ".safetensors":
        handle = open_safetensors(str(path))
        shapes = {key: shape_of(handle, key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)

        def read(key, rows):
            try:
                return handle.get_slice(key)[rows] if rows is not None else handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise InputError(f"{path}: cannot read '{key}' ({first_line(e)})") from None
    else:
        state_dict = torch_state_dict(path)
        shapes = {key: tuple(t.shape) for key, t in state_dict.items()}

        def read(key, rows):
            return state_dict[key] if rows is None else state_dict[key][rows]

    if any(key.startswith(("vision_model.", "text_model.")) for key in shapes):
        pieces = {key: Piece(key, None, False, shape, _describe(key, shape)) for key, shape in shapes.items()}
    else:
        pieces = open_clip_to_hf(shapes)

    def fetch(piece):
        tensor = read(piece.source, piece.rows)
        return tensor.T if piece.transposed else tensor

    return pieces, fetch


def _layer_count(pieces, tower):
    indices = {int(m[1]) for key in pieces if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def config_from_weights(pieces):
    """Infer the ViT-H-14-family `CLIPConfig` (depths, widths, patch, image size, vocab) from the pieces' shapes."""
    def shape(key, ndim=2):
        if key not in pieces:
            raise InputError(f"missing key '{key}': not a CLIP ViT checkpoint")
        if len(pieces[key].shape) != ndim:
            raise InputError(f"key {pieces[key].origin}: expected {ndim} dimensions for {key}")
        return pieces[key].shape

    patch_key = "vision_model.embeddings.patch_embedding.weight"
    token_key = "text_model.embeddings.token_embedding.weight"
    vision_width, _, patch_size, _ = shape(patch_key, 4)
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = isqrt(max(positions - 1, 0))  # positions = grid^2 + 1 (the class token)
    vocab_size, text_width = shape(token_key)
    try:
        return clip_config(
            vision_width, _layer_count(pieces, "vision_model"), text_width, _layer_count(pieces, "text_model"),
            shape("visual_projection.weight")[0],
            vision_mlp=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
            text_mlp=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
            vocab_size=vocab_size, context_length=shape("text_model.embeddings.position_embedding.weight")[0],
            image_size=grid * patch_size, patch_size=patch_size)
    except InputError as e:  # a width that is no multiple of ViT-H-14's head width
        raise InputError(f"{e} (widths from keys {pieces[patch_key].origin} and {pieces[token_key].origin})") from None


def _meta_clip(pieces):
    """A shape-only `CLIPModel` for the inferred config, after checking every key and shape of `pieces` against it."""
    from transformers import CLIPModel  # here, not above: see the imports

    with torch.device("meta"):
        model = CLIPModel(config_from_weights(pieces))
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, want in expected.items():
        if key not in pieces:
            raise InputError(f"missing key '{key}' {want} for the inferred ViT-H-14-family config")
        if pieces[key].shape != want:
            raise InputError(f"key {pieces[key].origin} does not fit the ViT-H-14-family config inferred from the "
                             f"other keys ({key} needs {want})")
    extra = next((key for key in pieces if key not in expected), None)
    if extra:
        raise InputError(f"unexpected key {pieces[extra].origin} for the inferred ViT-H-14-family config")
    return model


def load_clip(path, device="cpu", dtype=torch.float32):
    """Frozen `CLIPModel` from an open_clip checkpoint or a converted safetensors file.

    Keys and shapes are checked, and the model built on the meta device, before any weight is read; then the weights
    are read one tensor at a time, cast and moved, so no second full copy exists: torch checkpoints are
    memory-mapped (with a matching dtype on the CPU the weights stay views of the mapped file), safetensors files are
    read tensor by tensor.
    """
    pieces, fetch = read_clip_weights(path)
    model = _meta_clip(pieces)
    tensors = {key: fetch(piece).to(device=device, dtype=dtype).contiguous() for key, piece in pieces.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    for embeddings in (model.vision_model.embeddings, model.text_model.embeddings):
        # position_ids is a non-persistent buffer, absent from the checkpoint and still on the meta device
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
    return model.eval().requires_grad_(False)


def convert_checkpoint(src, dst):
    """Write an open_clip checkpoint as a safetensors file in `CLIPModel` key names, same dtype (fp16 for HPS).

    One-time step: later loads read it without pickle or key mapping. Checked against the inferred config first;
    written atomically (a temporary file renamed over `dst`), so `dst` is never left half written.
    """
    dst = Path(dst)
    if dst.is_dir():
        raise InputError(f"{dst}: is a folder, not a file to write")
    pieces, fetch = read_clip_weights(src)
    _meta_clip(pieces)
    tensors = {key: fetch(piece).contiguous() for key, piece in pieces.items()}
    try:
        atomic_write(str(dst), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{dst}: cannot write ({first_line(e)})") from None


# ----------------------------------------------------------------------------------------------------------------------
# transformers CLIPModel folders (PickScore_v1, CLIP-ViT-H-14)


def load_clip_folder(folder, device="cpu", dtype=torch.float32):
    """Frozen `CLIPModel` from a local `save_pretrained` folder: config.json + weights.

    Every weight of the config must be in the files with its shape (transformers would initialise a missing one at
    random); extra keys are ignored, as transformers does.
    """
    from transformers import CLIPModel  # here, not above: see the imports

    clip = load_pretrained(CLIPModel, folder, "CLIP model", dtype=dtype)
    return clip.to(device).eval().requires_grad_(False)
