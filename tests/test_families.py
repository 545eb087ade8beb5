"""families.py, the one table of what differs between FLUX.1 and FLUX.2: each family's names are diffusers' own, and
every way of telling a family (a model, its config, a saved transformer folder or file, a pipeline folder) agrees."""

import json
import os
import re

import diffusers
import pytest
import torch

import families

TINY = {"flux1": families.FLUX1, "flux2": families.FLUX2}


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request):
    return TINY[request.param]


def test_a_family_s_names_are_diffusers_classes(family):
    """The pipelines and the transformer class a family is told by exist in diffusers, and its config writes the
    transformer class as config.json's _class_name."""
    assert all(hasattr(diffusers, name) for name in (*family.pipelines, family.transformer_class))
    assert family.to_diffusers(family.config.preset("tiny"))["_class_name"] == family.transformer_class
    assert families.by_name(family.name) is family


def test_every_way_of_telling_the_family_agrees(family, tmp_path):
    """A tiny model, its config, the folder family.save writes, the single file in it, and a pipeline folder naming
    one of the family's pipelines all give the family itself (not a copy)."""
    torch.manual_seed(0)
    model = family.model(family.config.preset("tiny"))
    family.save(model, str(tmp_path / "transformer"))
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": family.pipelines[0]}))
    told = [families.of_model(model), families.of_config(model.cfg), families.of_folder(str(tmp_path)),
            families.of_transformer(str(tmp_path / "transformer")), families.of_transformer(str(weights))]
    assert all(f is family for f in told), [f.name for f in told]


def test_the_noise_of_a_model_has_its_latent_channels(family):
    """noise_of(model) draws the packed latents the model takes: (B, tokens, in_channels), the same for a seed."""
    model = family.model(family.config.preset("tiny"))
    noise = families.noise_of(model)
    x = noise(2, 32, 48, 7, torch.float32)
    assert x.shape == (2, 2 * 3, model.cfg.in_channels) and torch.equal(x, noise(2, 32, 48, 7, torch.float32))


def test_a_transformer_folder_of_another_model_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(families.InputError) as e:
        families.of_transformer(str(tmp_path))
    assert str(e.value).count("\n") == 0 and all(w in str(e.value) for w in (
        os.path.join(str(tmp_path), "config.json"), "SD3Transformer2DModel", "FluxTransformer2DModel",
        "Flux2Transformer2DModel"))


def test_a_transformer_folder_without_its_config_says_which_file_is_missing(tmp_path):
    """A folder with the weights but no config.json: the missing file named, not a `_class_name None`."""
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(families.InputError) as e:
        families.of_transformer(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}: no config.json (expected a diffusers transformer folder"), e.value


def test_no_code_outside_families_py_tests_which_family_it_has():
    """The family is decided once (families.decide) and asked (its fields), never compared from outside: a third
    family is one entry in the table, with no `is families.FLUX2` or `family == "flux1"` elsewhere to find and fix.
    (Before this test, five such checks sat in cli.py and training/runtime.py.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    compare = re.compile(r"""(\bis(?: not)?|[!=]=)\s*families\.FLUX\d|families\.FLUX\d\s*(\bis\b|[!=]=)|"""
                         r"""(family|\.name)\s*[!=]=\s*["']flux\d["']""")
    found = []
    for folder, _, files in os.walk(root):
        if {"tests", ".git", ".venv"} & set(os.path.relpath(folder, root).split(os.sep)):
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "families.py":
                with open(path, encoding="utf-8") as lines:
                    found += [f"{os.path.relpath(path, root)}:{i}: {line.strip()}"
                              for i, line in enumerate(lines, 1) if compare.search(line)]
    assert not found, "\n".join(found)
