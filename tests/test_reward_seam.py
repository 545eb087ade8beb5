"""The reward seam (issue 21, item 9): a reward the project does not ship is one class here and one REWARDS entry,
and scoring, SRPO's relative reward and training take it with nothing else changed.

The new reward is a CLIP of its own: transformers keys in a .safetensors file, open_clip's tokens, "crop"
preprocessing, logit-scaled (exp(logit_scale) = 30) with SRP divisor 10, so that each of its choices shows in the
numbers. References: transformers' CLIPModel forward written out and torchvision's crop, float32, 1e-5 relative; in
training, the same run with HPS on the same weights, whose rewards differ by the factor c alone (1e-5 relative).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_reward import error_of, random_images, ref_crop
from test_train import log_lines, train_tiny
from transformers import CLIPModel

import reward
import srpo
from sampling import flux_sampling
from weights import clip_weights
from weights.clip_tokenizer import OpenClipTokenizer

LOGIT_SCALE = 30.0


class AestheticReward(reward.CLIPScorer):
    """A new reward: what differs from the shipped ones, said once."""

    name, title, metavar = "aesthetic", "TinyAesthetic", "CKPT"
    path_help = "a CLIPModel checkpoint in transformers keys (.safetensors)"
    tokenizer_class = OpenClipTokenizer
    default_preprocess = "crop"
    logit_scaled, srp_divisor = True, 10

    @classmethod
    def check_path(cls, path):
        clip_weights.check_checkpoint(path, "a TinyAesthetic .safetensors file")

    read_clip = staticmethod(clip_weights.load_clip)


@pytest.fixture
def checkpoint(monkeypatch, tmp_path):
    """The registry entry, and the new reward's weights: a tiny random CLIP with exp(logit_scale) = 30."""
    monkeypatch.setitem(reward.REWARDS, AestheticReward.name, AestheticReward)
    clip = reward.HPSReward.tiny(seed=2).clip
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(LOGIT_SCALE))
    save_file(clip.state_dict(), tmp_path / "aesthetic.safetensors")
    return tmp_path / "aesthetic.safetensors"


def load(kind, path):
    return kind.load(path, OpenClipTokenizer.byte_level())


def test_every_reward_carries_what_the_command_line_needs(checkpoint, tmp_path):
    """Flag, title, value name and help, and the one-line check before anything loads, for each registry entry."""
    for name, kind in reward.REWARDS.items():
        assert kind.name == name and all(isinstance(v, str) and v for v in (kind.title, kind.metavar, kind.path_help))
        assert str(tmp_path / "missing") in error_of(kind.check_path, tmp_path / "missing"), name
    assert reward.REWARDS["aesthetic"].check_path(checkpoint) is None
    assert "is a folder, not a checkpoint" in error_of(reward.REWARDS["aesthetic"].check_path, tmp_path)


def test_a_new_reward_scores_and_rewards_as_its_definition(checkpoint):
    """s = 30 cos(img, txt) and r = 30 / 10 img . ((1 + k) t+ - t-), against transformers' CLIPModel on torchvision's
    crop, the captions as the byte-level tokenizer writes them."""
    scorer = load(reward.REWARDS["aesthetic"], checkpoint)
    clip = CLIPModel(reward.HPSReward.tiny().clip.config)
    clip.load_state_dict(load_file(checkpoint))
    clip.eval()
    x, prompts, k = random_images(2, 48, 40, seed=7), ["a cat", "a dog"], torch.tensor([0.1, 0.3])
    positive, negative = [f"Real. {p}" for p in prompts], [f"Oil. {p}" for p in prompts]

    def text(captions):
        out = clip.text_model(input_ids=scorer.tokenizer(captions)).pooler_output
        return F.normalize(clip.text_projection(out), dim=-1)

    with torch.no_grad():
        img = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=ref_crop(x)).pooler_output), dim=-1)
        expected_score = LOGIT_SCALE * (img * text(prompts)).sum(-1)
        expected_srp = LOGIT_SCALE / 10 * (img * ((1 + k)[:, None] * text(positive) - text(negative))).sum(-1)
        assert ((scorer.score(x, prompts) - expected_score).abs().max() / expected_score.abs().max()) <= 1e-5
        srp = scorer.relative_reward(x, positive, negative, k)
        assert ((srp - expected_srp).abs().max() / expected_srp.abs().max()) <= 1e-5


def test_training_on_a_new_reward_needs_nothing_else(checkpoint, tmp_path):
    """One `train` step (runtime.ready, srpo.train) on the new reward and on HPS with the same weights: the same
    rollout, images and features, so the logged SRP rewards differ by c = 30 / 10 against HPS's c = 1."""
    model, ae, text = flux_sampling.tiny_models()
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1)
    logged = {}
    for kind in (reward.HPSReward, reward.REWARDS["aesthetic"]):
        (tmp_path / kind.name).mkdir()
        train_tiny((model, ae, text, load(kind, checkpoint)), tmp_path / kind.name, cfg)
        logged[kind.name] = log_lines(str(tmp_path / kind.name))[0]
    for key in ("reward_denoise", "reward_inversion"):
        hps, new = logged["hps"][key], logged["aesthetic"][key]
        assert math.isfinite(new) and abs(new - LOGIT_SCALE / 10 * hps) <= 1e-5 * abs(new), (key, hps, new)
