"""The before/after sample grids (training/evaluation.py Watch.grid_images) split over the processes as the
held-out evaluation is (my_share): each rank samples its share, rank 0 writes the row, one process's grid bit for
bit. Tiny models only."""

import os
import types

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import ROOT, TORCHRUN, cli

import cli as command_line
import srpo
from training import evaluation

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_two_processes_write_the_grid_of_one(tmp_path):
    """--samples 3 over 2 gloo processes (rank 1 pads its share with prompt 0) == one process: samples-before.png
    identical pixel for pixel; samples-after.png of the same size (the weights agree to FSDP's rounding only)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = ["train", "--demo", "random", "--device", "cpu", "--batch", "2", "--steps", "1", "--height", "32",
             "--width", "32", "--rollout-steps", "4", "--samples", "3", "--eval-prompts",
             os.path.join(ROOT, "tests", "eval_prompt.txt")]
    cli(*TORCHRUN, *flags, "--out", two)
    command_line.main([*flags, "--out", one])
    before = [pixels(os.path.join(out, "samples-before.png")) for out in (one, two)]
    assert before[0].shape == (32, 3 * 32, 3) and np.array_equal(*before)
    after = [pixels(os.path.join(out, "samples-after.png")) for out in (one, two)]
    assert after[0].shape == after[1].shape == before[0].shape


class Rank1Of2:
    """Rank 1 of 2 without a process group: gather hands back rank 0's share beside this rank's, main_writes
    records (rank 0 writes)."""

    rank, world, device, main = 1, 2, CPU, False

    def __init__(self, rank0_share):
        self.rank0_share, self.writes = rank0_share, []

    def gather(self, mine):
        return [self.rank0_share, mine]

    def main_writes(self, what, write):
        self.writes.append(write)


def test_each_rank_samples_its_share_and_the_row_is_in_prompt_order(monkeypatch, tmp_path):
    """Rank 1 of 2 with 3 prompts samples prompts [1, 0] from seeds [1, 0] (0: the padding that keeps the ranks'
    model calls equal), and the row written holds prompts 0, 1, 2 in order, the padding dropped."""
    calls = []

    def sample_grid(family, model, ae, conds, height, width, guidance, device, seeds):
        calls.append((conds, seeds))
        return torch.cat([torch.full((1, 3, height, width), seed / 10) for seed in seeds], dim=3)

    monkeypatch.setattr(evaluation.sampler, "sample_grid", sample_grid)
    cfg = srpo.TrainConfig(height=16, width=16, samples=3)
    parts = types.SimpleNamespace(family=None, model=None, ae=None, conditioning=lambda prompt, cfg, device: prompt)
    ranks = Rank1Of2([(0, torch.full((3, 16, 16), 0.0)[None]), (2, torch.full((3, 16, 16), 0.2)[None])])
    evaluation.Watch([], cfg, str(tmp_path)).grid_images(parts, ["p0", "p1", "p2", "p3"], "grid.png", ranks, True)
    assert calls == [(["p1", "p0"], [1, 0])]
    (write,) = ranks.writes
    images, paths = write.args
    assert paths == [str(tmp_path / "grid.png")]
    assert [images[0, 0, 0, 16 * i].item() for i in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    assert images.shape == (1, 3, 16, 48)
