"""The signs of reward hacking (training/hacking.py), each against an independent computation written out here with
numpy, colorsys and PIL, and on synthetic images whose answer is known. Non-square 8-bit images, so that a height /
width mix-up or a scale slip shows; float64 throughout, so the tolerance where the math is the same is 1e-10 (the
brief's 1e-5 with room to spare)."""

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from training import hacking

TOL = 1e-10


def random_pixels(seed, n=3, h=24, w=40):
    """(n, h, w, 3) uint8: smooth colour blobs plus noise, so that every statistic is away from its bounds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(2 * np.pi * (rng.random() * yy + rng.random() * xx + rng.random())) for _ in range(3 * n)])
    noisy = 0.5 + 0.3 * base.reshape(n, 3, h, w) + 0.15 * rng.standard_normal((n, 3, h, w))
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def as_tensor(pixels, dtype=torch.float64):
    """(n, h, w, 3) uint8 -> (n, 3, h, w) in [0, 1]; float64, so that the input's rounding stays below TOL
    (training/evaluation.py gives float32, which image_signs is checked to take)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).to(dtype) / 255


def constant(rgb, h=16, w=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w)


def luma_np(pixels):
    return pixels.astype(np.float64) / 255 @ np.array([0.299, 0.587, 0.114])


def test_saturation_is_colorsys_and_pil_hsv():
    pixels = random_pixels(0)
    got = hacking.saturation(as_tensor(pixels)).numpy()
    want = [np.mean([colorsys.rgb_to_hsv(*(p / 255))[1] for p in image.reshape(-1, 3)]) for image in pixels]
    assert got == pytest.approx(want, abs=TOL)
    pil = [np.asarray(Image.fromarray(image).convert("HSV"))[..., 1].mean() / 255 for image in pixels]
    assert got == pytest.approx(pil, abs=1 / 255)  # PIL truncates S to 8 bits
    assert hacking.saturation(constant([0.5, 0.5, 0.5])).item() == 0
    assert hacking.saturation(constant([0.0, 0.0, 0.0])).item() == 0  # max = 0: S = 0, not NaN
    assert hacking.saturation(constant([1.0, 0.0, 0.0])).item() == 1


def test_colourfulness_is_hasler_suesstrunk_on_the_0_255_scale():
    pixels = random_pixels(1)
    got = hacking.colourfulness(as_tensor(pixels)).numpy()
    for value, image in zip(got, pixels.astype(np.float64), strict=True):
        r, g, b = image[..., 0], image[..., 1], image[..., 2]
        rg, yb = r - g, 0.5 * (r + g) - b
        want = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
        assert value == pytest.approx(want, abs=1e-8)  # values of ~100: 1e-10 relative
    assert hacking.colourfulness(constant([0.3, 0.3, 0.3])).item() == pytest.approx(0, abs=TOL)
    red = 0.3 * np.hypot(255, 127.5)  # rg = 255, yb = 127.5 everywhere: no spread
    assert hacking.colourfulness(constant([1.0, 0.0, 0.0])).item() == pytest.approx(red, abs=1e-8)


def hf_share_np(pixels, cutoff):
    y = luma_np(pixels)
    h, w = y.shape
    spectrum = np.abs(np.fft.fft2((y - y.mean()) * np.outer(np.hanning(h), np.hanning(w)))) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h) / 0.5, np.fft.fftfreq(w) / 0.5, indexing="ij"))
    return spectrum[radius > cutoff].sum() / spectrum.sum()


def test_hf_share_is_the_windowed_spectrum_above_a_quarter_of_nyquist():
    pixels = random_pixels(2)
    for cutoff in (0.25, 0.6):
        got = hacking.hf_share(as_tensor(pixels), cutoff).numpy()
        assert got == pytest.approx([hf_share_np(image, cutoff) for image in pixels], abs=TOL)
    n = torch.arange(32)
    checkerboard = ((n[:, None] + n[None, :]) % 2).float().expand(1, 3, 32, 32)
    gradient = (n[:, None] + n[None, :]).float().div(62).expand(1, 3, 32, 32)
    assert hacking.hf_share(checkerboard).item() > 0.999
    assert hacking.hf_share(gradient).item() < 0.001
    assert hacking.hf_share(constant([0.2, 0.4, 0.6])).item() == 0  # no energy at all: 0, not NaN


def test_contrast_is_the_std_of_pil_luma():
    pixels = random_pixels(3)
    got = hacking.contrast(as_tensor(pixels)).numpy()
    assert got == pytest.approx([luma_np(image).std() for image in pixels], abs=TOL)
    pil = [np.asarray(Image.fromarray(image).convert("L")).std() / 255 for image in pixels]
    assert got == pytest.approx(pil, abs=0.5 / 255)  # PIL rounds its L to 8 bits
    assert hacking.contrast(constant([0.7, 0.1, 0.4])).item() == pytest.approx(0, abs=TOL)
    halves = torch.cat([torch.zeros(1, 3, 8, 16), torch.ones(1, 3, 8, 16)], dim=2)
    assert hacking.contrast(halves).item() == pytest.approx(0.5, abs=TOL)


def gaussian_np(y, sigma=1.5, size=11):
    """'valid' filtering with the 2-D window, one dot product per position (no separability, no scipy)."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    patches = np.lib.stride_tricks.sliding_window_view(y, (size, size))
    return np.einsum("ijkl,kl->ij", patches, kernel)


def ssim_np(a, b):
    """Wang et al. 2004, eq. 13 with their constants (K1 = 0.01, K2 = 0.03, L = 1) on Rec. 601 luma."""
    x, y = luma_np(a), luma_np(b)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = gaussian_np(x), gaussian_np(y)
    vx, vy, cxy = gaussian_np(x * x) - mx ** 2, gaussian_np(y * y) - my ** 2, gaussian_np(x * y) - mx * my
    return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))


def test_drift_is_pixel_rmse_and_ssim_of_the_luma():
    a, b = random_pixels(4), random_pixels(5)
    x, y = as_tensor(a), as_tensor(b)
    rmse = [np.sqrt(np.mean((p.astype(np.float64) / 255 - q / 255) ** 2)) for p, q in zip(a, b, strict=True)]
    assert hacking.drift_l2(x, y).numpy() == pytest.approx(rmse, abs=TOL)
    assert hacking.ssim(x, y).numpy() == pytest.approx([ssim_np(p, q) for p, q in zip(a, b, strict=True)], abs=TOL)
    assert hacking.drift_l2(x, x).numpy() == pytest.approx([0] * 3, abs=TOL)
    assert hacking.ssim(x, x).numpy() == pytest.approx([1] * 3, abs=TOL)
    assert (hacking.ssim(x, 1 - x) < 0).all()  # the negative: structure anti-correlated
    with pytest.raises(ValueError, match="at least 11 x 11"):
        hacking.ssim(x[:, :, :10], x[:, :, :10])


def test_image_signs_gives_one_float_per_image_drift_only_with_a_reference():
    x = as_tensor(random_pixels(6), torch.float32)
    signs = hacking.image_signs(x)
    assert list(signs) == ["saturation", "colourfulness", "hf_share", "contrast"]
    assert all(len(v) == 3 and all(type(f) is float for f in v) for v in signs.values())
    alone = hacking.image_signs(x[1:2], x[1:2])
    assert alone["drift_l2"] == [0.0] and alone["drift_ssim"] == pytest.approx([1.0], abs=TOL)
    for name, values in signs.items():
        assert values == pytest.approx(hacking.OF_AN_IMAGE[name](x).tolist(), rel=TOL), name
        assert alone[name] == pytest.approx(values[1:2], rel=TOL), name
