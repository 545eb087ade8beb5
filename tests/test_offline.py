"""`train --images DIR`, offline SRPO: a run from a folder of captioned images (x0 = the cached VAE encoding of the
image in place of the online rollout), the step against the online step given the same x0, the latent cache across
resumes, rank 0 encoding alone, and bad folders refused before any model loads. Tiny models only."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cli
import families
import srpo
from common.util import InputError
from sampling import flux_sampling
from training import checkpoints, image_data, runtime

CAPTIONS = ("a red fox in the snow", "a bowl of peaches", "a lighthouse at dawn")
TINY = ["--demo", "random", "--height", "32", "--width", "32", "--samples", "0", "--eval-every", "100",
        "--eval-prompts", os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompt.txt")]


pytestmark = pytest.mark.usefixtures("one_thread")


def image_folder(folder, captions=CAPTIONS):
    """folder/i.png, random 40x48 RGB (larger than the 32x32 training size, so each is resized and cropped), with
    its caption in folder/i.txt; the folder as a str."""
    os.makedirs(folder, exist_ok=True)
    for i, caption in enumerate(captions):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(caption)
    return str(folder)


def train(*args):
    cli.main(["train", *TINY, *map(str, args)])


def log_lines(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def weights(out, step):
    return load_file(os.path.join(out, checkpoints.CHECKPOINT.format(step), "diffusion_pytorch_model.safetensors"))


def counted_encodes(monkeypatch):
    """The images the VAE encodes from now on (image_data.encode, behind every cache entry), as a list that grows."""
    calls, encode = [], image_data.encode
    monkeypatch.setattr(image_data, "encode", lambda ae, pixels: calls.append(pixels) or encode(ae, pixels))
    return calls


def no_rollout(*args):
    raise AssertionError("an offline run made an online rollout")


def tiny_vae(family):
    """The tiny demo's VAE of --family (FLUX.2's holds a 0-d BatchNorm counter, which the cache key hashes too)."""
    return next(f for f in families.FAMILIES if f.name == family).tiny_frozen_parts("cpu", torch.float32, "random")[0]


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_offline_step_equals_the_online_step_given_its_x0(family, tmp_path, monkeypatch):
    """The offline run, and an online run over the same captions whose rollout returns, in the order the steps ask,
    the x0 of the image the schedule pairs with that caption: the same log and weights, bit for bit (2 updates of 2
    prompts over 3 images: the second update wraps around the set), for each family's tiny demo."""
    folder = image_folder(tmp_path / "images")
    monkeypatch.setattr(srpo, "online_rollout", no_rollout)
    train("--family", family, "--images", folder, "--out", tmp_path / "offline", "--batch", 2, "--steps", 2,
          "--save-every", 2)

    images = image_data.ImageSet(folder, 32, 32)
    latents = image_data.Latents(images, tiny_vae(family), str(tmp_path / "offline" / "latents"))
    assert all(latents.cached(i) is not None for i in range(len(images)))  # the run's own entries, read back
    order = runtime.visit_order(len(images), srpo.TrainConfig(batch=2))
    queue = [latents[order(step, j)] for step in (1, 2) for j in (0, 1)]
    assert sorted({order(step, j) for step in (1, 2) for j in (0, 1)}) == [0, 1, 2]
    monkeypatch.setattr(srpo, "online_rollout", lambda model, eps, cond, cfg: queue.pop(0))
    (tmp_path / "prompts.txt").write_text("".join(caption + "\n" for caption in images.captions))
    train("--family", family, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "online", "--batch", 2,
          "--steps", 2, "--save-every", 2)

    assert queue == []
    assert log_lines(tmp_path / "offline") == log_lines(tmp_path / "online")
    offline, online = weights(tmp_path / "offline", 2), weights(tmp_path / "online", 2)
    assert offline.keys() == online.keys() and all(torch.equal(offline[k], online[k]) for k in offline)
    assert all(line["grad_norm"] > 0 for line in log_lines(tmp_path / "offline"))  # the steps did move the weights


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_resume_reuses_the_cache_and_encodes_only_changed_images(family, tmp_path, monkeypatch):
    """The decision: the cache is keyed by each file's content, so a resumed run encodes nothing it has seen, and a
    changed image (or another folder) is encoded again, never given a stale x0."""
    folder, out, tiny = image_folder(tmp_path / "images"), tmp_path / "run", ["--family", family]
    calls = counted_encodes(monkeypatch)
    monkeypatch.setattr(srpo, "online_rollout", no_rollout)
    train(*tiny, "--images", folder, "--out", out, "--steps", 1, "--save-every", 1)
    assert len(calls) == 3 and len(os.listdir(out / "latents")) == 3

    train(*tiny, "--images", folder, "--out", out, "--steps", 2, "--save-every", 1, "--resume")
    assert len(calls) == 3 and len(log_lines(out)) == 2

    Image.new("RGB", (48, 40), (200, 30, 30)).save(os.path.join(folder, "1.png"))
    train(*tiny, "--images", folder, "--out", out, "--steps", 3, "--save-every", 1, "--resume")
    assert len(calls) == 4 and len(os.listdir(out / "latents")) == 4 and len(log_lines(out)) == 3


def test_rank_0_encodes_and_the_others_read_its_entries(tmp_path, monkeypatch):
    """Under torchrun only rank 0 writes the cache (the others wait in its broadcast); every rank then gets the same
    x0 for the same (step, j), the one image_data.Latents gives. A rank that does not see rank 0's entries (another
    machine, --out not shared) stops the run rather than encode them itself, into the files of its neighbours."""
    images = image_data.ImageSet(image_folder(tmp_path / "images"), 32, 32)
    ae, cfg, out = flux_sampling.tiny_models()[1], srpo.TrainConfig(batch=2, height=32, width=32), str(tmp_path)
    monkeypatch.setattr(runtime.Ranks, "from_main", lambda self, obj: obj)  # rank 0 raised nothing
    monkeypatch.setattr(runtime.Ranks, "any", lambda self, flag: flag)  # the other rank agrees
    calls = counted_encodes(monkeypatch)

    def x0_of(rank):
        return runtime.offline_x0(images, ae, out, cfg, runtime.Ranks(rank, 2, torch.device("cpu")))

    with pytest.raises(InputError, match="--out must be a folder they all share"):
        x0_of(1)  # before rank 0 has written anything: what a rank on another machine would see
    assert calls == []
    ranks = {0: x0_of(0), 1: x0_of(1)}
    assert len(calls) == 3
    order = runtime.visit_order(3, cfg)
    fresh = image_data.Latents(images, ae, os.path.join(out, "latents"))
    for step, j in [(1, 0), (1, 1), (2, 0)]:
        assert torch.equal(ranks[0](step, j), ranks[1](step, j))
        assert torch.equal(ranks[1](step, j), fresh[order(step, j)])
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "uncaptioned", "with-prompts"])
def test_bad_image_folders_exit_2_naming_the_file_before_any_model_loads(case, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    if case != "missing":
        image_folder(folder, CAPTIONS if case in ("uncaptioned", "with-prompts") else ())
    if case == "uncaptioned":
        os.remove(folder / "1.txt")
    for owner, name in [(flux_sampling, "tiny_models"), (runtime, "frozen_parts"), (runtime, "processes")]:
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail("a model was loaded or the run started"))
    extra = ["--prompts", tmp_path / "prompts.txt"] if case == "with-prompts" else []
    with pytest.raises(SystemExit) as exit_info:
        train("--images", folder, "--out", tmp_path / "run", *extra)
    errors = capsys.readouterr().err.strip().splitlines()
    expected = {"missing": [f"error: {folder}: no such folder (expected a folder of captioned images)"],
                "empty": [f"error: {folder}: no images (expected image files with a metadata.jsonl or a .txt caption "
                          f"each)"],
                "uncaptioned": [f"error: {folder}: 1 problem(s) with the images, one per line:",
                                f"{folder / '1.png'}: no caption (expected 1.txt beside it, or a metadata.jsonl)"],
                "with-prompts": ["error: --prompts and --images exclude each other: with --images the prompts are "
                                 "the images' captions"]}
    assert exit_info.value.code == 2 and errors == expected[case]
    assert not os.path.exists(tmp_path / "run")
