"""The aesthetic judges' scoring heads on disk: a torch state_dict (.pth), as the predictors publish theirs, read
with torch.load(weights_only=True, mmap=True) and checked key by key and shape by shape against the head the judge
expects before any tensor is cast, moved or loaded."""

from common.util import InputError
from weights.clip_weights import check_checkpoint, torch_state_dict


def read_head(path, expected, what):
    """{key: CPU tensor} of the state_dict at path, in the file's dtype, holding exactly the keys of `expected`
    ({key: shape}) with those shapes; else a one-line InputError naming the file, the first wrong key and both
    shapes, and `what` the file was expected to be."""
    check_checkpoint(path, what)
    tensors = torch_state_dict(path)
    for key, shape in expected.items():
        if key not in tensors:
            raise InputError(f"{path}: missing key '{key}' {shape} (expected {what})")
        if tuple(tensors[key].shape) != shape:
            raise InputError(f"{path}: key '{key}' {tuple(tensors[key].shape)} does not fit the model's {shape} "
                             f"(expected {what})")
    extra = next((key for key in tensors if key not in expected), None)
    if extra is not None:
        raise InputError(f"{path}: unexpected key '{extra}' {tuple(tensors[extra].shape)} (expected {what}, keys "
                         f"{', '.join(expected)})")
    return {key: tensors[key] for key in expected}
