"""The tiny world as the default demo (issue 34; docs/world.md): `python srpo.py train`, the README's first command,
runs SRPO on the world's shipped models with its scorer as the reward and bright / dark as SRP's words; `sample` and
`score` without a model read the same world; and the fastest of SRPO's claims holds there: swapping SRP's words
moves the images' brightness the other way."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cli
from training import runtime, world
from weights import world_weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python srpo.py train --out DIR`: the README's first command, nothing else given."""
    out = str(tmp_path_factory.mktemp("world") / "run")
    subprocess.run([sys.executable, "srpo.py", "train", "--out", out], cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    return out


def test_the_default_run_trains_srpo_on_the_world_with_its_words(default_run):
    """The world preset: 40 updates of 4 world prompts, SRP's words bright / dark, the held-out evaluations on the
    6 held-out world prompts with the world's scorer."""
    with open(os.path.join(default_run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 40 and all(r["words"] == ["bright", "dark"] for r in log)
    with open(os.path.join(default_run, "eval.jsonl")) as f:
        evals = [json.loads(line) for line in f]
    assert [e["step"] for e in evals] == [0, 10, 20, 30, 40]
    assert all(len(e["per_prompt"]["hps"]) == len(world.prompts(held_out=True)) for e in evals)


def test_sample_and_score_read_the_world_without_flags(default_run, tmp_path, capsys):
    """`sample --transformer CKPT` (the checkpoint fits the world's transformer, so the world's models) remakes a
    held-out evaluation's image; `score IMAGE --prompt P` (the world's scorer) gives its eval.jsonl score."""
    with open(os.path.join(default_run, "eval.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    weights = os.path.join(default_run, "checkpoint-000040", "diffusion_pytorch_model.safetensors")
    for i, prompt in enumerate(runtime.demo_prompts("world", held_out=True)[:2]):
        tile = os.path.join(default_run, "eval", "step-000040", f"{i:05d}.png")
        cli.main(["sample", "--transformer", weights, "--prompt", prompt, "--seed", str(i), "--steps", "28",
                  "--out", str(tmp_path / "x.png")])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(Image.open(tile)))
        capsys.readouterr()
        cli.main(["score", tile, "--prompt", prompt])
        captured = capsys.readouterr()
        assert abs(float(captured.out.split("\t")[0]) - last["per_prompt"]["hps"][i]) <= 1e-6, captured.out
        assert "tiny world demo's" in captured.err


def test_export_takes_the_world_transformer_as_the_demo_base(default_run, tmp_path, capsys):
    """`export CKPT --to lora --base demo`: the checkpoint's shapes pick the world's transformer as its base."""
    cli.main(["export", os.path.join(default_run, "checkpoint-000040"), "--to", "lora", "--rank", "8", "--base",
              "demo", "--out", str(tmp_path / "lora")])
    assert "rank 8 keeps" in capsys.readouterr().out
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("args, words", [
    (["train", "--family", "flux2", "--demo", "world"], "--demo world: the tiny FLUX.2 demos are random"),
    (["train", "--reward", "pickscore"], "the tiny world's reward is its own scorer"),
    (["sample", "--demo", "world", "--family", "flux2"], "--demo world: the tiny FLUX.2 demos are random"),
    (["score", "--demo", "random", "--hps", "x.pt", "--prompt", "a", "x.png"], "--demo picks the tiny demo scorer")])
def test_what_the_world_demo_cannot_do_is_one_line(args, words, tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    args = [str(tmp_path / a) if a in ("x.pt", "x.png") else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, *(["--out", str(tmp_path / "out")] if args[0] == "train" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err


def test_swapped_words_move_the_brightness_the_other_way(tmp_path):
    """SRP steers by words: 10 updates with --words bright dark raise the share of bright images (the judge's
    reading of every world prompt's samples, 2 noise seeds each) above the untrained model's, --words dark bright
    lower it below (lr 1e-4: a larger step than the preset's, to move within 10 updates)."""
    from tools import world_claims

    jobs = [(p, s) for p in world.prompts() + world.prompts(held_out=True) for s in range(2)]
    texts, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    models, scorer = world_weights.load_world(), world_weights.load_scorer()
    judge = world.load_judge(world_weights.JUDGE)
    base = world_claims.images_of(None, models, texts, seeds)
    bright = {}
    for words in (("bright", "dark"), ("dark", "bright")):
        out = str(tmp_path / words[0])
        cli.main(["train", "--words", *words, "--steps", "10", "--lr", "1e-4", "--save-every", "10", "--samples", "0",
                  "--out", out])
        images = world_claims.images_of(os.path.join(out, "checkpoint-000010", "diffusion_pytorch_model.safetensors"),
                                        models, texts, seeds)
        bright[words[0]] = world_claims.measures(images, base, texts, judge, scorer)["bright"]
    untrained = world_claims.measures(base, base, texts, judge, scorer)["bright"]
    assert bright["bright"] > untrained > bright["dark"], (bright, untrained)


def test_the_claims_tool_measures_what_it_says(capsys):
    """tools/world_claims.measures: no change from the untrained images is 0 structure and 0 texture; a uniform shift
    of the pixels is all structure (the 8 x 8 block means move, the rest does not); the judge's reading of the world's
    own images is what their captions say; one run at one step prints its row beside the untrained one."""
    from tools import world_claims

    images, labels = world.draw(world.HELD_OUT_SEED, 24, size=64)
    x, texts = world.to_tensor(images), world.captions(labels, leave_out=("brightness",))
    judge, scorer = world.load_judge(world_weights.JUDGE), world_weights.load_scorer()
    same = world_claims.measures(x, x, texts, judge, scorer)
    assert same["structure"] == same["texture"] == 0 and same["colour"] == same["size"] == 1
    assert same["bright"] == pytest.approx(np.mean(labels["brightness"] == 0))
    shifted = world_claims.measures(x + 0.1, x, texts, judge, scorer)
    assert shifted["structure"] == pytest.approx(0.1, abs=1e-6) and shifted["texture"] < 1e-6
    world_claims.main(["--seeds", "0", "--runs", "srpo+bright", "--steps", "1", "--per-prompt", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| run", "| untrained", "| srpo+bright"]


def test_evaluate_gives_the_before_and_after_rows_and_their_difference(default_run, tmp_path, capsys):
    """`evaluate` of the world's transformer and of the default run's last checkpoint on the held-out prompts, then
    --compare: each table is the mean of its scores.jsonl, B - A the difference of the means inside its interval.
    (What the numbers say is docs/world.md's: the plain score of the world's scorer falls, as SRP trains its relative
    reward with bright / dark, not caption agreement.)"""
    weights = os.path.join(default_run, "checkpoint-000040", "diffusion_pytorch_model.safetensors")
    for name, model in (("before", []), ("after", ["--transformer", weights])):
        cli.main(["evaluate", *model, "--judges", "hps,sgp-hps,aesthetic", "--steps", "28", "--seeds", "2",
                  "--out", str(tmp_path / name)])
    capsys.readouterr()
    cli.main(["evaluate", "--compare", str(tmp_path / "before"), str(tmp_path / "after"), "--out", str(tmp_path)])
    rows = {}
    for name in ("before", "after"):
        with open(tmp_path / name / "scores.jsonl") as f:
            rows[name] = [json.loads(line) for line in f]
        assert len(rows[name]) == 2 * len(world.prompts(held_out=True))
    with open(tmp_path / "compare.csv") as f:
        table = {line.split(",")[0]: [float(v) for v in line.split(",")[1:]] for line in list(f)[1:]}
    for judge in ("hps", "sgp-hps", "aesthetic"):
        means = [np.mean([r[judge] for r in rows[name]]) for name in ("before", "after")]
        assert table[judge][:3] == pytest.approx([*means, means[1] - means[0]], abs=1e-6)
    assert all(low <= diff <= high for _, _, diff, low, high in table.values()), table
