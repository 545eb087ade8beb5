"""What the judges share: the preprocessing their references do on 8-bit PIL images, done on tensors, and the
five-Linear scoring head of ImageReward and both aesthetic predictors."""

import torch

from reward import _resize, preprocess

HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the judges' head: e -> 1024 -> 128 -> 64 -> 16 -> 1


def as_8bit(x):
    """x in [0, 1] as an 8-bit image stores it: round(255 clamp(x, 0, 1)) / 255."""
    return (x.clamp(0, 1) * 255).round() / 255


def resize_8bit(images, height, width):
    """(B, 3, H, W) in [0, 1] -> (B, 3, height, width): PIL's bicubic resize of the 8-bit image, as both references
    resize (their processors take PIL images), in float: as_8bit, then the horizontal pass and the vertical one,
    each bicubic antialiased (PIL's kernel, a = -0.5) and stored in 8 bits again, as PIL stores its intermediate
    image (clamped: the overshoot of bicubic at edges is cut between the passes). Equal to PIL's pixels but where a
    sum lands on a half level and PIL's fixed-point arithmetic rounds it the other way: one level, on up to a few
    pixels in a thousand, about as many as transformers' torchvision resize differs from PIL on. Not
    differentiable."""
    x = as_8bit(images)
    if x.shape[-1] != width:
        x = as_8bit(_resize(x, x.shape[-2], width))
    if x.shape[-2] != height:
        x = as_8bit(_resize(x, height, width))
    return x


class ScoreHead(torch.nn.Sequential):
    """The scoring MLP of ImageReward and both aesthetic predictors: s = L5(L4(L3(L2(L1(e))))), nn.Linear layers of
    widths HEAD_WIDTHS and no activation between them. The predictors' Dropout layers (identities in eval) stand as
    nn.Identity at their indices, `linear_at` listing the Linear ones, so that the state_dict keys are the published
    file's."""

    def __init__(self, width, linear_at):
        layers = [torch.nn.Identity() for _ in range(linear_at[-1] + 1)]
        for index, fan_in, fan_out in zip(linear_at, (width, *HEAD_WIDTHS[:-1]), HEAD_WIDTHS, strict=True):
            layers[index] = torch.nn.Linear(fan_in, fan_out)
        super().__init__(*layers)




def clip_pixels(images, size):
    """OpenAI CLIP's preprocessing of the 8-bit PIL image (ImageReward's and the LAION predictor's): resize_8bit of
    the short side to size (the long one to floor(size long / short)), then reward.preprocess's "crop" (its own
    resize keeps that size: the same formula) crops at the centre and normalises with CLIP's mean and std."""
    height, width = images.shape[-2:]
    long = int(size * max(height, width) / min(height, width))
    return preprocess(resize_8bit(images, *((size, long) if height <= width else (long, size))), size, "crop")
