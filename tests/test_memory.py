"""scripts/memory_estimate.py on tiny models, held to arithmetic done here, so its README numbers cannot drift."""

import pytest

import flux_model as fm
import reward
from scripts import memory_estimate as me

HEIGHT = WIDTH = 64
TEXT_TOKENS = 8


@pytest.fixture(scope="module")
def tiny():
    cfgs = fm.FluxConfig.preset("tiny"), fm.AutoEncoderConfig.preset("tiny"), reward.clip_config(**reward.TINY)
    return cfgs, me.estimate(HEIGHT, WIDTH, *cfgs, text_tokens=TEXT_TOKENS)


def test_checkpointed_block_inputs_are_one_bf16_stream_per_block(tiny):
    """Each block's checkpoint keeps its input stream, (image + text tokens) x width in bf16, and the shared
    conditioning vector vec (1 x width, bf16) once; nothing of the blocks' insides."""
    (flux_cfg, _, _), e = tiny
    blocks = flux_cfg.depth + flux_cfg.depth_single_blocks
    tokens = (HEIGHT // 16) * (WIDTH // 16) + TEXT_TOKENS
    assert e["block inputs"] == blocks * tokens * flux_cfg.hidden_size * 2 + flux_cfg.hidden_size * 2


def test_vae_largest_saved_tensor_is_an_fp32_group_norm_input(tiny):
    """CUDA autocast runs GroupNorm in fp32: the decoder's largest saved tensor is the fp32 copy of the input of
    the first full-resolution block, ch * ch_mult[1] channels at H x W (a bf16 rule would give half)."""
    (_, ae_cfg, _), e = tiny
    assert e["vae largest"] == ae_cfg.ch * ae_cfg.ch_mult[1] * HEIGHT * WIDTH * 4

