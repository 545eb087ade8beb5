"""training/image_data.py, offline SRPO's real images: captions in both folder conventions, every bad file named, the
modes converted against formulas written out here, preprocessing and x0 against diffusers (VaeImageProcessor,
AutoencoderKL, FluxPipeline's packing), and the latent cache. Real files written by Pillow in tmp_path."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from references import diffusers_vae, rel_err

import flux_model as fm
from common.images import SIXTEEN_BIT
from common.util import InputError
from sampling import flux_sampling
from training import image_data
from weights import flux_weights

H, W = 32, 48  # the training size of most tests (height x width)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def write(folder, name, image=None, caption=None):
    """folder/name (an image, random RGB by default) and its caption beside it, if given; the path."""
    path = os.path.join(folder, name)
    (image or random_image(W + 8, H + 4)).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(caption)
    return path


def problems(folder, height=H, width=W):
    """The lines of the ImageSet's error, past its header."""
    with pytest.raises(InputError) as e:
        image_data.ImageSet(str(folder), height, width)
    header, *lines = str(e.value).splitlines()
    listed = len(lines) - (lines[-1].startswith("... and ") if lines else 0)
    assert header.startswith(f"{folder}: {listed} problem(s)") or listed == image_data.LISTED, header
    return lines


def test_txt_captions(tmp_path):
    write(tmp_path, "b.png", caption="a red\r\nfox \n")
    write(tmp_path, "a.jpg", caption="a cat")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "._b.png").write_bytes(b"macOS resource fork")
    images = image_data.ImageSet(str(tmp_path), H, W)
    assert images.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    assert images.captions == ["a cat", "a red fox"]


def test_metadata_wins_over_txt(tmp_path):
    write(tmp_path, "a.png", caption="from the txt")
    os.mkdir(tmp_path / "sub")
    write(tmp_path / "sub", "c.webp")
    rows = [{"file_name": "a.png", "text": "from metadata", "extra": 1}, {"file_name": "sub/c.webp", "text": "c"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    images = image_data.ImageSet(str(tmp_path), H, W)
    assert images.paths == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "c.webp")]
    assert images.captions == ["from metadata", "c"]


def test_every_bad_file_named_once(tmp_path):
    good = write(tmp_path, "good.png", caption="fine")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (tmp_path / "corrupt.txt").write_text("x")
    with open(good, "rb") as f:
        (tmp_path / "truncated.png").write_bytes(f.read()[:300])
    (tmp_path / "truncated.txt").write_text("x")
    write(tmp_path, "small.png", random_image(W - 1, H + 10), caption="x")
    write(tmp_path, "nocaption.png", random_image(W + 5, H - 2))  # and too small: both said
    write(tmp_path, "empty.png", caption=" \n ")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write(tmp_path, "latin1.png")
    lines = problems(tmp_path)
    expected = [("corrupt.png", "not a readable image"), ("truncated.png", "not a readable image"),
                ("small.png", f"{W - 1}x{H + 10} pixels (width x height), smaller than the training size {W}x{H}"),
                ("nocaption.png", "no caption (expected nocaption.txt beside it"),
                ("nocaption.png", f"{W + 5}x{H - 2} pixels"), ("empty.txt", "empty caption"),
                ("latin1.txt", "not UTF-8")]
    for line, (name, why) in zip(sorted(lines), sorted(expected), strict=True):
        assert line.startswith(str(tmp_path / name)) and why in line, line


def test_metadata_problems_name_their_line(tmp_path):
    for name in ["a.png", "b.png", "d.png", "unlisted.png"]:
        write(tmp_path, name)
    lines = ['{"file_name": "a.png", "text": "ok"}', "not json", '{"file_name": "b.png"}', '["a.png", "x"]',
             '{"file_name": "gone.png", "text": "x"}', '{"file_name": "d.png", "text": "  "}', "",
             '{"file_name": "a.png", "text": "again"}', '{"file_name": 3, "text": "x"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    meta = tmp_path / "metadata.jsonl"
    shape = 'expected a JSON object with "file_name" and "text", both strings'
    assert problems(tmp_path) == [f"{meta}, line 2: {shape}", f"{meta}, line 3: {shape}", f"{meta}, line 4: {shape}",
                                  f"{meta}, line 5: {tmp_path / 'gone.png'}: no such file",
                                  f"{meta}, line 6: d.png: empty caption",
                                  f"{meta}, line 8: a.png is listed again (first on line 1)",
                                  f"{meta}, line 9: {shape}",
                                  f"{tmp_path / 'b.png'}: no caption (not listed in {meta})",
                                  f"{tmp_path / 'unlisted.png'}: no caption (not listed in {meta})"]


def test_many_problems_listed_then_counted(tmp_path):
    for i in range(image_data.LISTED + 3):
        write(tmp_path, f"{i:02d}.png")
    with pytest.raises(InputError) as e:
        image_data.ImageSet(str(tmp_path), H, W)
    header, *lines = str(e.value).splitlines()
    assert header == f"{tmp_path}: {image_data.LISTED + 3} problem(s) with the images, one per line:"
    assert len(lines) == image_data.LISTED + 1 and lines[-1] == "... and 3 more"


def test_no_images(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}: no images"):
        image_data.ImageSet(str(tmp_path), H, W)


@pytest.mark.parametrize("size, ok", [((W, H), True), ((W - 1, H), False), ((W, H - 1), False),
                                      ((W - 1, 4 * H), False), ((4 * W, H), True)])
def test_never_enlarged(tmp_path, size, ok):
    """The rule: an image smaller than the training size on either side would need enlarging and is refused."""
    write(tmp_path, "a.png", random_image(*size), caption="x")
    if ok:
        assert len(image_data.ImageSet(str(tmp_path), H, W)) == 1
    else:
        assert problems(tmp_path) == [f"{tmp_path / 'a.png'}: {size[0]}x{size[1]} pixels (width x height), smaller "
                                      f"than the training size {W}x{H}: images are never enlarged"]


def loaded(path):
    with open(path, "rb") as f:
        return np.asarray(image_data.load_image(f.read(), path, 4, 4)).astype(np.int64)


def over_white(rgb, alpha):
    """Compositing on white written out: a * c + (1 - a) * 255, a = alpha / 255."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(a * rgb + (1 - a) * 255).astype(np.int64)


def test_alpha_composited_on_white(tmp_path):
    rng = np.random.default_rng(1)
    rgb, alpha = rng.integers(0, 256, (6, 5, 3)), rng.integers(0, 256, (6, 5))
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8)).save(tmp_path / "rgba.png")
    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]).astype(np.uint8), "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    for name, colour in [("rgba.png", rgb), ("la.png", np.repeat(grey[..., None], 3, 2))]:
        out = loaded(str(tmp_path / name))
        assert np.abs(out - over_white(colour, alpha)).max() <= 1  # Pillow's integer rounding
        assert (out[0, 0] == 255).all() and (out[0, 1] == colour[0, 1]).all()


def test_palette_transparency_is_white(tmp_path):
    im = Image.new("P", (5, 4), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.putpixel((2, 1), 0)  # black in the palette, transparent
    im.save(tmp_path / "p.png", transparency=0)
    out = loaded(str(tmp_path / "p.png"))
    assert (out[1, 2] == 255).all() and (out[0, 0] == [10, 20, 30]).all()


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    v8 = np.arange(256 * 4).reshape(16, 64) % 256
    Image.fromarray((v8 * 257).astype(np.uint16)).save(tmp_path / "g16.png")  # 8 bits widened: v * 257
    assert Image.open(tmp_path / "g16.png").mode in SIXTEEN_BIT
    assert (loaded(str(tmp_path / "g16.png")) == v8[..., None]).all()
    odd = np.array([[0, 128, 129, 385, 65535, 32767]], dtype=np.uint16)  # between the levels: the nearest
    Image.fromarray(odd).save(tmp_path / "odd.png")
    with open(tmp_path / "odd.png", "rb") as f:
        out = np.asarray(image_data.load_image(f.read(), "odd.png", 1, 1))
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 255, 127]


def test_palette_transparency_bytes_composited(tmp_path):
    """A palette with a transparency byte per entry (PNG's tRNS): each colour composited on white by its own alpha."""
    colours = np.array([[0, 0, 0], [200, 100, 50], [10, 20, 30]])
    im = Image.fromarray(np.array([[0, 1, 2, 1]] * 4, np.uint8), "P")
    im.putpalette(colours.astype(np.uint8).tobytes())
    im.save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    out = loaded(str(tmp_path / "p.png"))
    assert np.abs(out[0] - over_white(colours[[0, 1, 2, 1]], np.array([0, 128, 255, 128]))).max() <= 1


def test_cmyk_and_greyscale(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    cmyk.putpixel((1, 1), (0, 0, 0, 255))  # full black
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = loaded(str(tmp_path / "cmyk.jpg"))
    assert np.abs(out[3, 3] - [255, 0, 0]).max() <= 2 and np.abs(out[1, 1]).max() <= 2  # JPEG's rounding
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "l.png")
    assert (loaded(str(tmp_path / "l.png")) == 77).all()


def test_float_pixels_refused(tmp_path):
    Image.fromarray(np.zeros((40, 60), np.float32)).save(tmp_path / "f.tif")
    (tmp_path / "f.txt").write_text("x")
    assert problems(tmp_path) == [f"{tmp_path / 'f.tif'}: 32-bit float pixels (mode F): save it as an 8- or "
                                  f"16-bit image"]


def test_exif_orientation_applied(tmp_path):
    """Orientation 6 (shown rotated 90 degrees clockwise): upright, the stored top-left pixel becomes top-right."""
    stored = np.zeros((4, 6, 3), np.uint8)
    stored[0, 0] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    out = loaded(str(tmp_path / "o.png"))
    assert out.shape == (6, 4, 3) and (out[0, -1] == [255, 0, 0]).all() and out.sum() == 255


def too_large_line(path):
    return (f"{path}: too large to read: 2,250 pixels, over the limit of 2,000 (twice Pillow's Image.MAX_IMAGE_PIXELS, "
            f"its guard against decompression bombs): make it smaller")


def test_too_large_refused_naming_its_pixels_and_the_limit(tmp_path, monkeypatch):
    """Pillow decodes at most twice Image.MAX_IMAGE_PIXELS (its guard against decompression bombs), lowered here to
    keep the files small: an image over it is refused in one line that gives its pixel count and the limit, one
    between the two is read without Pillow's warning (warnings are errors here)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = write(tmp_path, "big.png", random_image(50, 45), caption="x")
    write(tmp_path, "mid.png", random_image(40, 30), caption="x")  # 1,200 pixels: over MAX, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert problems(tmp_path, 16, 16) == [too_large_line(big)]


def test_entries_that_are_not_images_named(tmp_path):
    """Nothing named like an image is left out without a word: a broken symbolic link (also when metadata.jsonl
    lists it), a folder, a pipe and a file the kernel will not read (/proc/self/mem: tests run as root, whom
    permissions do not stop) are each named once, with why; a link to an image is an image."""
    good = write(tmp_path, "good.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    os.symlink(good, tmp_path / "linked.png")
    os.symlink("/proc/self/mem", tmp_path / "mem.png")
    os.mkdir(tmp_path / "folder.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkdir(tmp_path / "sub")
    os.symlink(tmp_path / "sub" / "gone.png", tmp_path / "sub" / "broken.png")
    names = ["good", "broken", "linked", "mem", "folder", "pipe", "sub/broken"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": n}) + "\n"
                                                     for n in names))
    missing = "No such file or directory"
    assert sorted(problems(tmp_path)) == sorted([
        f"{tmp_path / 'broken.png'}: is a broken symbolic link (to {tmp_path / 'gone.png'}: {missing})",
        f"{tmp_path / 'folder.png'}: is a folder, not an image",
        f"{tmp_path / 'mem.png'}: cannot read it (Input/output error)",
        f"{tmp_path / 'pipe.png'}: is not a regular file (a pipe, socket or device), not an image",
        f"{tmp_path / 'sub' / 'broken.png'}: is a broken symbolic link (to {tmp_path / 'sub' / 'gone.png'}: "
        f"{missing})"])
    os.remove(tmp_path / "metadata.jsonl")  # the .txt convention: the same lines, and each "no caption"
    lines = problems(tmp_path)
    assert f"{tmp_path / 'broken.png'}: is a broken symbolic link (to {tmp_path / 'gone.png'}: {missing})" in lines
    assert f"{tmp_path / 'broken.png'}: no caption (expected broken.txt beside it, or a metadata.jsonl)" in lines
    assert f"{tmp_path / 'linked.png'}: no caption (expected linked.txt beside it, or a metadata.jsonl)" in lines
    assert len(lines) == 6 + 4  # the 6 images' missing captions, and the 4 entries that are not readable files


def warning_files(folder, captions=False):
    """Real files that make Pillow warn though they read: a palette with a transparency byte per entry (converted
    to RGB by Pillow, it warns to convert it to RGBA), EXIF with a tag past its end (orientation still applied), and
    1,200 pixels (over an Image.MAX_IMAGE_PIXELS of 1000, under twice it); then one of 2,250 pixels (too large).
    Their paths, the too-large last."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = "Maker", 6
    corrupt = exif.tobytes().replace(b"\x01\x0f\x00\x02\x00\x00\x00\x06", b"\x01\x0f\x00\x02\x00\x00\x00\x60")
    files = [("p.png", random_image(20, 20).quantize(4), {"transparency": bytes([0, 128, 255, 255])}),
             ("exif.png", random_image(20, 20), {"exif": corrupt}), ("mid.png", random_image(40, 30), {}),
             ("big.png", random_image(50, 45), {})]
    for name, image, options in files:
        image.save(folder / name, **options)
        if captions:
            (folder / name).with_suffix(".txt").write_text("a cat")
    return [folder / name for name, _, _ in files]


def run_srpo(*args):
    """`python srpo.py ARGS` as a real process, Pillow's Image.MAX_IMAGE_PIXELS set to 1000 first (so the test
    files stay small): (exit code, stdout lines, stderr lines)."""
    code = "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 1000; import cli; cli.main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout.splitlines(), done.stderr.splitlines()


def test_score_stderr_holds_its_own_lines_only(tmp_path):
    """`score` of files that make Pillow warn prints its note and scores, and no warning (its refusal of a file too
    large: tests/test_reward.py)."""
    warn = warning_files(tmp_path)[:-1]
    code, out, err = run_srpo("score", "--prompt", "a cat", *warn)
    assert code == 0 and [line.split("\t")[1] for line in out] == list(map(str, warn))
    assert len(err) == 1 and err[0].startswith("note: no --hps, --pickscore or --clip"), err


def test_train_stderr_holds_its_own_lines_only(tmp_path):
    """`train --images` over the same files: its error naming the file too large, and no warning of the others."""
    big = warning_files(tmp_path, captions=True)[-1]
    code, _, err = run_srpo("train", "--images", tmp_path, "--height", 16, "--width", 16, "--out", tmp_path / "run")
    assert (code, err) == (2, [f"error: {tmp_path}: 1 problem(s) with the images, one per line:", too_large_line(big)])


@pytest.mark.parametrize("size, height, width", [((100, 70), 48, 64), ((70, 100), 48, 64), ((64, 48), 48, 64),
                                                 ((301, 203), 32, 32), ((97, 200), 64, 32)])
def test_preprocess_matches_diffusers(size, height, width):
    image = random_image(*size, seed=size[0])
    expected = VaeImageProcessor(vae_scale_factor=16).preprocess(image, height, width, resize_mode="crop")
    ours = image_data.preprocess(image, height, width)
    assert ours.shape == (1, 3, height, width) and ours.dtype == torch.float32
    assert (ours - expected).abs().max() <= 1e-6


@pytest.fixture
def tiny_ae(tmp_path):
    """A tiny random diffusers AutoencoderKL with FLUX's shift and scale, saved and loaded by
    flux_weights.load_autoencoder."""
    vae = diffusers_vae(fm.AutoEncoderConfig.preset("tiny"))
    vae.save_pretrained(tmp_path / "vae")
    return vae, flux_weights.load_autoencoder(str(tmp_path / "vae"))


@torch.no_grad()
def test_x0_matches_diffusers(tmp_path, tiny_ae):
    vae, ae = tiny_ae
    os.mkdir(tmp_path / "images")
    image = random_image(80, 52, seed=3)
    write(tmp_path / "images", "a.png", image, caption="x")
    x0 = image_data.Latents(image_data.ImageSet(str(tmp_path / "images"), H, W), ae, str(tmp_path / "latents"))[0]
    pixels = VaeImageProcessor(vae_scale_factor=16).preprocess(image, H, W, resize_mode="crop")
    z = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    expected = FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])
    assert x0.shape == flux_sampling.initial_noise(1, H, W, 0, torch.float32).shape
    assert rel_err(x0, expected) <= 1e-5


def counting(ae):
    """ae, its encode calls counted in ae.calls."""
    encode, ae.calls = ae.encode, 0

    def counted(x):
        ae.calls += 1
        return encode(x)

    ae.encode = counted
    return ae


def test_cache_reused_remade_and_keyed(tmp_path, tiny_ae, capsys):
    ae, folder, cache = counting(tiny_ae[1]), tmp_path / "images", str(tmp_path / "latents")
    os.mkdir(folder)
    path = write(folder, "a.png", caption="x")
    latents = image_data.Latents(image_data.ImageSet(str(folder), H, W), ae, cache)
    assert latents.encode_all(progress=False) == 1 and ae.calls == 1
    first = latents[0]
    resumed = image_data.Latents(image_data.ImageSet(str(folder), H, W), ae, cache)
    assert resumed.encode_all(progress=False) == 0 and torch.equal(resumed[0], first) and ae.calls == 1
    with open(resumed.entry(0), "r+b") as f:  # a copy cut short
        f.truncate(100)
    assert torch.equal(resumed[0], first) and ae.calls == 2
    note = f"note: {resumed.entry(0)}: a damaged latent cache entry (of {path}), encoded again"
    assert note in capsys.readouterr().err
    assert torch.equal(resumed[0], first) and ae.calls == 2  # the re-made entry is read back
    other_size = image_data.Latents(image_data.ImageSet(str(folder), 16, 32), ae, cache)
    assert other_size[0].shape == (1, 2, 64) and ae.calls == 3
    with torch.no_grad():
        next(ae.parameters()).add_(0.01)  # another VAE
    assert not torch.equal(image_data.Latents(resumed.images, ae, cache)[0], first) and ae.calls == 4
    write(folder, "a.png", random_image(W + 8, H + 4, seed=9))  # the image changed: re-encoded, not the stale x0
    changed = image_data.Latents(image_data.ImageSet(str(folder), H, W), ae, cache)
    assert changed.encode_all(progress=False) == 1 and len(os.listdir(cache)) == 4


def test_file_changed_after_the_check_refused(tmp_path, tiny_ae):
    os.mkdir(tmp_path / "images")
    path = write(tmp_path / "images", "a.png", caption="x")
    latents = image_data.Latents(image_data.ImageSet(str(tmp_path / "images"), H, W), tiny_ae[1], str(tmp_path / "c"))
    write(tmp_path / "images", "a.png", random_image(W + 8, H + 4, seed=5))
    with pytest.raises(InputError, match=f"^{path}: changed since the image folder was checked"):
        latents[0]


def test_encoded_in_the_weights_dtype(tmp_path, tiny_ae):
    """The caller's autocast leaves x0 as it is (the cache key names what made it); bf16 weights are another entry."""
    ae = tiny_ae[1]
    os.mkdir(tmp_path / "images")
    write(tmp_path / "images", "a.png", caption="x")
    images = image_data.ImageSet(str(tmp_path / "images"), H, W)
    x0 = image_data.Latents(images, ae, str(tmp_path / "fp32"))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(image_data.Latents(images, ae, str(tmp_path / "autocast"))[0], x0)
    bf16 = image_data.Latents(images, flux_weights.load_autoencoder(str(tmp_path / "vae"), dtype=torch.bfloat16),
                              str(tmp_path / "fp32"))
    assert bf16.entry(0) != image_data.Latents(images, ae, str(tmp_path / "fp32")).entry(0)
    assert bf16[0].dtype == torch.float32 and rel_err(bf16[0], x0) <= 3e-2  # bf16's 8 bits of mantissa
