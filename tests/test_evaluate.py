"""`srpo.py evaluate` (sampling/evaluate.py): on the tiny world, its images against `srpo.py sample`'s, its scores
against `srpo.py score` on the same files, its table against the scores, a rerun that samples nothing, --compare,
the bootstrap intervals against the normal approximation, the HPDv2 prompts, and bad input in one line."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cli
import srpo
from reward import HPSReward, control_caption
from sampling import evaluate
from sampling.judges import JUDGES, SGPHPS
from training import evaluation

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle on a grey background", "a large blue square on a grey background",
           "a bright green triangle on a grey background"]
TINY = ["--steps", "4"]  # 4 Euler steps: the images only have to exist


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of the world demo: 3 prompts, 2 seeds, every judge (tiny ones, the world's scorer for HPS)."""
    folder = tmp_path_factory.mktemp("evaluate")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    cli.main(["evaluate", "--prompts", str(prompts), "--seeds", "2", "--out", str(folder / "out"), *TINY])
    return folder


def scores(out):
    with open(os.path.join(out, "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_evaluate_samples_as_sample_does_and_scores_as_score_does(evaluated, tmp_path, capsys):
    """Every image is the one `sample --seed S` makes of its prompt, and its HPS the one `score` gives that file."""
    rows = scores(evaluated / "out")
    assert [(r["index"], r["seed"]) for r in rows] == [(i, s) for s in range(2) for i in range(3)]
    assert set(rows[0]) == {"index", "seed", "prompt", "image", *JUDGES}
    row = rows[4]  # prompt 1, seed 1
    cli.main(["sample", "--prompt", PROMPTS[1], "--seed", "1", "--out", str(tmp_path / "one.png"), *TINY])
    made = np.asarray(Image.open(evaluated / "out" / row["image"]))
    assert np.array_equal(made, np.asarray(Image.open(tmp_path / "one.png")))
    capsys.readouterr()
    cli.main(["score", str(evaluated / "out" / row["image"]), "--prompt", PROMPTS[1]])
    assert float(capsys.readouterr().out.split()[0]) == pytest.approx(row["hps"], abs=1e-6)


def test_the_table_is_the_mean_of_each_prompts_mean_with_an_interval_around_it(evaluated):
    rows = scores(evaluated / "out")
    with open(evaluated / "out" / "table.csv") as f:
        table = {line["judge"]: line for line in csv.DictReader(f)}
    assert list(table) == list(JUDGES)
    for name, line in table.items():
        per_prompt = [np.mean([r[name] for r in rows if r["index"] == i]) for i in range(3)]
        assert float(line["mean"]) == pytest.approx(np.mean(per_prompt), abs=1e-6)
        assert float(line["low"]) <= float(line["mean"]) <= float(line["high"])
        assert (line["prompts"], line["images"]) == ("3", "6")
    settings = json.loads((evaluated / "out" / "settings.json").read_text())
    assert settings["seeds"] == 2 and settings["images"]["steps"] == 4 and set(settings["judges"]) == set(JUDGES)


def test_a_rerun_samples_nothing_and_gives_the_same_table(evaluated, capsys):
    out = evaluated / "out"
    made = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    before = (out / "table.md").read_text()
    cli.main(["evaluate", "--prompts", str(evaluated / "prompts.txt"), "--seeds", "2", "--out", str(out), *TINY])
    assert capsys.readouterr().out.count("nothing left to make, the images exist") == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == made
    assert (out / "table.md").read_text() == before


def test_compare_gives_the_difference_paired_by_prompt_and_seed(evaluated, tmp_path, capsys):
    """B is A with every HPS score raised by 0.25: B - A is 0.25 and so is its whole interval."""
    other = tmp_path / "b"
    other.mkdir()
    lines = [r | {"hps": r["hps"] + 0.25} for r in scores(evaluated / "out")]
    (other / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(lines)))
    capsys.readouterr()
    cli.main(["evaluate", "--compare", str(evaluated / "out"), str(other), "--out", str(tmp_path / "c")])
    with open(tmp_path / "c" / "compare.csv") as f:
        table = {line["judge"]: line for line in csv.DictReader(f)}
    assert float(table["hps"]["difference"]) == pytest.approx(0.25)
    assert float(table["hps"]["low"]) == pytest.approx(0.25) and float(table["hps"]["high"]) == pytest.approx(0.25)
    assert float(table["clip"]["difference"]) == 0 and "| hps |" in capsys.readouterr().out


def test_the_bootstrap_interval_matches_the_normal_one_on_a_large_sample():
    """2,000 normal draws: the percentile interval is mean +- 1.96 s / sqrt(n) to a few per cent of its width."""
    x = np.random.default_rng(1).normal(3.0, 2.0, 2000)
    mean, low, high = evaluate.bootstrap(x, 4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert mean == pytest.approx(x.mean())
    assert low == pytest.approx(mean - half, abs=0.05 * half) and high == pytest.approx(mean + half, abs=0.05 * half)
    assert evaluate.bootstrap([0.5] * 7, 100) == (0.5, 0.5, 0.5)


def test_sgp_hps_is_the_hps_difference_of_the_two_captions_in_percent():
    hps = HPSReward.tiny(seed=3)
    images, prompts = torch.rand(2, 3, 64, 64), ["a cat", "a dog"]
    real, cg = (hps.score(images, [control_caption(w, p) for p in prompts]) for w in SGPHPS.words)
    assert torch.allclose(SGPHPS(hps).score(images, prompts), 100 * (real - cg), atol=1e-4)


def test_hpdv2_prompts_are_read_style_by_style(tmp_path, monkeypatch):
    for style in evaluate.HPDV2_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style}\n  two"]))
    monkeypatch.setattr(evaluate, "HPDV2_FOLDERS", (str(tmp_path / "none"), str(tmp_path)))
    assert evaluate.hpdv2_prompts() == [f"{s} {n}" for s in evaluate.HPDV2_STYLES for n in ("one", "two")]


@pytest.mark.parametrize("args, message", [
    (["--judges", "hps,vibes"], "unknown judge 'vibes'"),
    (["--judges", "hps", "--hps", "missing.pt"], "missing.pt"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--prompts", "hpdv2"], "--prompts hpdv2: the HPDv2 benchmark prompts"),
    (["--compare", "A", "B"], "no scores.jsonl there"),
    (["--pickscore", "x"], "--pickscore is given but no judge of --judges reads it"),
    (["--judges", "aesthetic", "--aesthetic", "BERT"], "model_type 'bert'"),  # a judge's folder of another layout
    (["--judges", "imagereward", "--imagereward", "BERT"], "ImageReward"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "EMPTY").write_text("\n \n")
    (tmp_path / "BERT").mkdir()
    (tmp_path / "BERT" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setattr(evaluate, "HPDV2_FOLDERS", (str(tmp_path / "none"),))
    monkeypatch.chdir(tmp_path)
    args = args + (["--judges", "hps"] if args[0] == "--pickscore" else [])
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", *args, "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "images").exists()


def test_with_flux_every_judge_needs_its_file(flux_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--flux", str(flux_folder), "--prompts", str(tmp_path), "--judges", "sgp-hps",
                  "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--judges sgp-hps: give its model, --hps CKPT" in capsys.readouterr().err


def test_train_watches_the_eval_judges_and_reports_those_that_fell(tmp_path, capsys):
    """`train --eval-judges` on the world demo: every evaluation line has each judge's mean and per-prompt scores."""
    out = tmp_path / "run"
    cli.main(["train", "--eval-judges", "sgp-hps,clip", "--steps", "2", "--save-every", "2", "--samples", "0",
              "--out", str(out)])
    with open(out / "eval.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [0, 2]
    for line in lines:
        assert {"hps", "sgp-hps", "clip"} <= set(line) and len(line["per_prompt"]["clip"]) == 6
    assert "held-out sgp-hps" in capsys.readouterr().out  # the first judge picks the best checkpoint


def test_the_report_names_the_judges_that_fell_while_the_reward_rose(tmp_path):
    records = [{"step": 0, "hps": 0.20, "clip": 5.0, "aesthetic": 4.0, "saturation": 0.3},
               {"step": 10, "hps": 0.25, "clip": 4.0, "aesthetic": 4.5, "saturation": 0.4}]
    cfg = srpo.TrainConfig()  # --reward hps
    line = evaluation.judges_fell("eval.jsonl", records, cfg)
    assert line.startswith("held-out judges that fell while hps rose (0.2000 -> 0.2500), step 0 -> 10")
    assert "clip 5.0000 -> 4.0000" in line and "aesthetic" not in line
    records[1]["hps"] = 0.2
    assert evaluation.judges_fell("eval.jsonl", records, cfg) is None


def test_eval_judges_refusals_are_one_line(tmp_path, capsys):
    for args, message in [(["--eval-judges", "hps"], "--eval-judges hps: it is the training reward"),
                          (["--eval-judges", "vibes"], "--eval-judges: unknown judge 'vibes'"),
                          (["--pickscore", "x"], "--pickscore needs --flux")]:
        with pytest.raises(SystemExit) as stop:
            cli.main(["train", *args, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_clip_judge_s_tokenizer_is_read_before_anything_is_sampled(flux2_folder, tmp_path, capsys):
    """--hps beside a FLUX.2 folder, whose tokenizer/ is Qwen's: no CLIP vocabulary, said before sampling."""
    save_file(HPSReward.tiny(seed=1).clip.state_dict(), tmp_path / "hps.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--flux", str(flux2_folder), "--prompts", str(prompts), "--hps",
                  str(tmp_path / "hps.safetensors"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "vocab.json" in err, err
    assert not (tmp_path / "out" / "images").exists()
