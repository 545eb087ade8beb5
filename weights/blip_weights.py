"""ImageReward's checkpoint -> transformers' BLIP towers and the reward head, as weights/clip_weights.py is for CLIP.

The published checkpoint (THUDM/ImageReward's ImageReward.pt) is the state dict of the image-reward package's
`ImageReward` module: `blip.visual_encoder.*` (BLIP's timm-style ViT), `blip.text_encoder.*` (BLIP's BERT with
cross-attention, its med.py) and `mlp.layers.*` (five Linears, Dropouts between them); BLIP's contrastive projections
`blip.vision_proj.*` / `blip.text_proj.*` and the buffer `blip.text_encoder.embeddings.position_ids` are there too,
unused when scoring. Its converted form, a .safetensors file, holds the same keys (read lazily, no pickle).

The judge's names: `vision.*` is a `BlipVisionModel` (timm's ViT keys renamed, RENAMES), `text.*` a `BlipTextModel`
(transformers ported med.py: the same names), `head.{0..4}.*` the five Linears. The ViT's depth, widths, patch and
image size come from the weights' shapes, its head count from BLIP's head width 64 (ViT-B/16 and ViT-L/16 alike);
the text tower's sizes from med_config.json. Keys and shapes are checked against a meta model before any weight is
read.
"""

import re
from math import isqrt
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError
from safetensors.torch import save_file

from common.util import InputError, atomic_write, first_line, read_json
from weights.clip_weights import check_checkpoint, torch_state_dict
from weights.tensor_files import open_safetensors, shape_of

# transformers is imported in the functions that build its configs: importing it takes ~4 s (see clip_weights).

VISION_HEAD_WIDTH = 64  # BLIP's ViTs: ViT-B/16 768 wide, 12 heads; ViT-L/16 1024 wide, 16 heads
VISION_LN_EPS = 1e-6  # BLIP's ViT: LayerNorm(eps=1e-6) (transformers' BlipVisionConfig defaults to 1e-5)
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")

# (checkpoint key, judge key); {i} a block index, {p} weight or bias, {rest} the rest of the key
RENAMES = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm1.{p}", "vision.encoder.layers.{i}.layer_norm1.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm2.{p}", "vision.encoder.layers.{i}.layer_norm2.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision.encoder.layers.{i}.mlp.fc1.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision.encoder.layers.{i}.mlp.fc2.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    ("blip.text_encoder.{rest}", "text.{rest}"),
    # the package's MLP: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (no activations)
    *((f"mlp.layers.{index}.{{p}}", f"head.{j}.{{p}}") for j, index in enumerate((0, 2, 4, 6, 7))),
)
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template):
    return re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: _FIELDS[m[1]], re.escape(template)))


_FORWARD = [(_pattern(source), target) for source, target in RENAMES]
_BACKWARD = [(_pattern(target), source) for source, target in RENAMES]


def _rename(key, table):
    for pattern, template in table:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict())
    return None


def checkpoint_key(judge_key):
    """The checkpoint's name of a judge key (vision.*, text.*, head.*), for messages."""
    return _rename(judge_key, _BACKWARD) or judge_key


class Checkpoint(NamedTuple):
    """An ImageReward checkpoint's tensors under the judge's names, known before any weight is read."""

    path: str
    shapes: dict  # {judge key: shape}
    read: object  # read(judge key) -> the CPU tensor, in the file's dtype


def read_checkpoint(path):
    """Checkpoint of ImageReward.pt (torch.load(weights_only=True), memory-mapped) or its .safetensors (lazy)."""
    path = str(path)
    check_checkpoint(path, "ImageReward.pt or its converted .safetensors")
    if Path(path).suffix == ".safetensors":
        handle = open_safetensors(path)
        shapes = {key: shape_of(handle, key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)

        def get(key):
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise InputError(f"{path}: cannot read '{key}' ({first_line(e)})") from None
    else:
        state_dict = torch_state_dict(path)
        shapes, get = {key: tuple(t.shape) for key, t in state_dict.items()}, state_dict.__getitem__
    names = {}
    for key, shape in shapes.items():
        if key.startswith(UNUSED):
            continue
        name = _rename(key, _FORWARD)
        if name is None:
            raise InputError(f"{path}: unexpected key '{key}' {shape}: not an ImageReward checkpoint (its keys are "
                             f"blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)")
        names[name] = key
    return Checkpoint(path, {name: shapes[key] for name, key in names.items()}, lambda name: get(names[name]))


def blip_vision_config(width, layers, mlp, image_size, patch_size, **kwargs):
    """`BlipVisionConfig` of BLIP's ViT: exact GELU, LayerNorm eps 1e-6, heads of width 64."""
    from transformers import BlipVisionConfig  # here, not above: see the imports

    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                            num_attention_heads=width // VISION_HEAD_WIDTH, image_size=image_size,
                            patch_size=patch_size, hidden_act="gelu", layer_norm_eps=VISION_LN_EPS, **kwargs)


def vision_config(checkpoint):
    """The ViT's `BlipVisionConfig` from the checkpoint's shapes: positions = (image_size / patch)^2 + 1."""
    def shape(key, ndim):
        if key not in checkpoint.shapes:
            raise InputError(f"{checkpoint.path}: missing key '{checkpoint_key(key)}': not an ImageReward checkpoint")
        if len(checkpoint.shapes[key]) != ndim:
            raise InputError(f"{checkpoint.path}: key '{checkpoint_key(key)}' {checkpoint.shapes[key]}: expected "
                             f"{ndim} dimensions")
        return checkpoint.shapes[key]

    width, _, patch_size, _ = shape("vision.embeddings.patch_embedding.weight", 4)
    positions = shape("vision.embeddings.position_embedding", 3)[1]
    grid = isqrt(max(positions - 1, 0))
    if grid * grid + 1 != positions or width % VISION_HEAD_WIDTH:
        raise InputError(f"{checkpoint.path}: a ViT of width {width} (keys 'blip.visual_encoder.patch_embed.proj."
                         f"weight', 'blip.visual_encoder.pos_embed') with {positions} positions: expected a square "
                         f"grid + 1 and a width divisible by {VISION_HEAD_WIDTH}")
    layers = len({m[1] for key in checkpoint.shapes if (m := re.match(r"vision\.encoder\.layers\.(\d+)\.", key))})
    mlp = shape("vision.encoder.layers.0.mlp.fc1.weight", 2)[0]
    return blip_vision_config(width, layers, mlp, grid * patch_size, patch_size)


# med_config.json's fields the text tower reads, with transformers' BertConfig defaults (the package's reader)
BERT_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "max_position_embeddings": 512, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-12, "pad_token_id": 0}
BERT_SIZES = tuple(BERT_DEFAULTS)[:6]  # the positive integers, vocab_size to max_position_embeddings


def blip_text_config(fields, encoder_width):
    """`BlipTextConfig` of BLIP's BERT with cross-attention to encoder_width-wide image tokens; fields as in
    BERT_DEFAULTS. is_decoder only builds the cross-attention layers: scoring runs it bidirectionally."""
    from transformers import BlipTextConfig  # here, not above: see the imports

    return BlipTextConfig(**fields, encoder_hidden_size=encoder_width, is_decoder=True, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, bos_token_id=None, eos_token_id=None, sep_token_id=None)


def text_config(med_config, encoder_width, min_positions):
    """The text tower's `BlipTextConfig` from med_config.json (BERT_DEFAULTS for what it leaves out)."""
    med = read_json(str(med_config))
    fields = {key: med.get(key, default) for key, default in BERT_DEFAULTS.items()}
    sizes = [key for key in BERT_SIZES if not isinstance(fields[key], int) or fields[key] <= 0]
    if sizes:
        raise InputError(f"{med_config}: '{sizes[0]}' is {fields[sizes[0]]!r}, expected a positive integer")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise InputError(f"{med_config}: hidden_size {fields['hidden_size']} is not a multiple of "
                         f"num_attention_heads {fields['num_attention_heads']}")
    if fields["max_position_embeddings"] < min_positions:
        raise InputError(f"{med_config}: max_position_embeddings {fields['max_position_embeddings']} is under the "
                         f"{min_positions} tokens a prompt is padded to")
    try:
        return blip_text_config(fields, encoder_width)
    except (TypeError, ValueError) as e:
        raise InputError(f"{med_config}: {first_line(e)}") from None


def check_keys(checkpoint, expected, what):
    """Every key of expected ({judge key: shape}, a meta judge's) in the checkpoint with its shape, and no other."""
    for key, shape in expected.items():
        if key not in checkpoint.shapes:
            raise InputError(f"{checkpoint.path}: missing key '{checkpoint_key(key)}' {shape} for {what}")
        if tuple(checkpoint.shapes[key]) != tuple(shape):
            raise InputError(f"{checkpoint.path}: key '{checkpoint_key(key)}' {tuple(checkpoint.shapes[key])} does "
                             f"not fit {what} ({tuple(shape)})")
    extra = next((key for key in checkpoint.shapes if key not in expected), None)
    if extra:
        raise InputError(f"{checkpoint.path}: unexpected key '{checkpoint_key(extra)}' "
                         f"{tuple(checkpoint.shapes[extra])} for {what}")


def convert_checkpoint(src, dst):
    """Write ImageReward.pt as a .safetensors file with the same keys and dtypes (a one-time step: later loads read
    it lazily, without pickle). Its keys are checked first; written atomically."""
    if Path(dst).is_dir():
        raise InputError(f"{dst}: is a folder, not a file to write")
    read_checkpoint(src)  # the layout's check: one line on an unknown key
    tensors = {key: t.contiguous() for key, t in torch_state_dict(str(src)).items()}
    try:
        atomic_write(str(dst), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{dst}: cannot write ({first_line(e)})") from None
