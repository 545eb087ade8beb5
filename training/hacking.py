"""Signs of reward hacking: image statistics that move when a model learns to please its reward instead of the
prompt. Over-saturated, "oily" images (SRPO issue #22: "oily" skin, grid patterns) raise saturation,
colourfulness, contrast and the share of high-frequency energy; a model that collapses to one look drifts away from
the image its step-0 self made from the same noise (pixel RMSE up, SSIM down). None of them is a verdict alone (a
prompt may ask for a vivid image): their trend over training, beside the held-out rewards, is the sign.

Every function takes images (B, 3, H, W) in [0, 1] and gives one number per image (B,), computed in float64.
"""

import torch

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 luma, the weights of PIL's "L" conversion
HF_CUTOFF = 0.25  # of Nyquist: "high frequency" is a period shorter than 8 pixels
SSIM_SIGMA, SSIM_SIZE = 1.5, 11  # Wang et al. 2004's Gaussian window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def luma(images):
    """(B, H, W): Y = 0.299 R + 0.587 G + 0.114 B (Rec. 601, as PIL's "L", without its rounding to 8 bits)."""
    weights = torch.tensor(LUMA, dtype=torch.float64, device=images.device)
    return torch.einsum("bchw,c->bhw", images.double(), weights)


def saturation(images):
    """Mean HSV saturation, S = (max - min) / max over R, G, B, 0 where max = 0 (colorsys.rgb_to_hsv; PIL's "HSV"
    is the same, truncated to 8 bits). Grey is 0, a pure hue 1."""
    top, bottom = images.double().amax(dim=1), images.double().amin(dim=1)
    s = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-300), torch.zeros_like(top))
    return s.mean(dim=(1, 2))


def colourfulness(images):
    """Hasler & Suesstrunk 2003, "Measuring colourfulness in natural images", on the paper's 0-255 pixel scale (so
    their bands apply: 15 slightly, 33 moderately, 45 averagely, 59 quite, 82 highly, 109 extremely colourful):
    M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2), rg = R - G, yb = (R + G) / 2 - B, over the pixels
    (population standard deviations)."""
    r, g, b = (images.double() * 255).unbind(dim=1)
    rg, yb = (r - g).flatten(1), ((r + g) / 2 - b).flatten(1)
    spread = (rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0)).sqrt()
    return spread + 0.3 * (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()


def hf_share(images, cutoff=HF_CUTOFF):
    """The share of the luma's spectral energy above `cutoff` of Nyquist: sum_{r > cutoff} |F|^2 / sum |F|^2, with
    F = FFT2(w (Y - mean Y)), w the 2-D Hann window (numpy.hanning's, 0 at the ends; outer product) and r the
    radial frequency in units of Nyquist, sqrt((2 fx)^2 + (2 fy)^2) with fx, fy in cycles per pixel; 0 for a flat
    image.
    A share, not an energy (as a Laplacian's would be), so that it measures texture apart from contrast (measured
    on its own); the window, so that the jump between opposite edges of a non-periodic image is not counted as
    high frequency."""
    y = luma(images)
    _, h, w = y.shape
    window = torch.outer(*(torch.hann_window(n, periodic=False, dtype=torch.float64, device=y.device)
                           for n in (h, w)))
    energy = torch.fft.fft2((y - y.mean(dim=(1, 2), keepdim=True)) * window).abs() ** 2
    fy, fx = (2 * torch.fft.fftfreq(n, dtype=torch.float64, device=y.device) for n in (h, w))
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff
    share = (energy * high).sum(dim=(1, 2)) / energy.sum(dim=(1, 2)).clamp_min(1e-300)
    flat = y.amax(dim=(1, 2)) == y.amin(dim=(1, 2))  # its mean's rounding would leave the window's own spectrum
    return torch.where(flat, torch.zeros_like(share), share)


def contrast(images):
    """RMS contrast: the population standard deviation of the luma (Rec. 601, see `luma`), in [0, 0.5]."""
    return luma(images).flatten(1).std(dim=1, correction=0)


def drift_l2(images, reference):
    """Pixel RMSE from the reference image of the same seed: sqrt(mean over (c, h, w) of (x - x_ref)^2), in [0, 1]."""
    return ((images.double() - reference.double()) ** 2).flatten(1).mean(dim=1).sqrt()


def gaussian_filter(x, sigma=SSIM_SIGMA, size=SSIM_SIZE):
    """(..., H, W) -> (..., H - size + 1, W - size + 1): the normalized Gaussian window, 'valid' (no padding), as
    Wang et al.'s ssim_index.m filters; separable, so one 1-D pass per axis, each window's dot product with the
    Gaussian (unfold: a float64 conv2d on the CPU is a few times slower)."""
    t = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return x.unfold(-2, size, 1).matmul(g).unfold(-1, size, 1).matmul(g)


def ssim(images, reference, data_range=1.0):
    """Mean SSIM of the luma (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error
    visibility to structural similarity"): over the 11 x 11 Gaussian windows (sigma 1.5) that fit in the image,
    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L the data range. 1 for the same image, below 0 for an anti-correlated one.
    At full resolution, as the paper and scikit-image (Wang's later ssim.m first downsamples by round(min(H, W) /
    256)); images at least 11 pixels on each side."""
    x, y = luma(images), luma(reference)
    if min(x.shape[1:]) < SSIM_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_SIZE} x {SSIM_SIZE} pixels, got {tuple(x.shape[1:])}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my, xx, yy, xy = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y])).chunk(5)
    vx, vy, cxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2))


OF_AN_IMAGE = {"saturation": saturation, "colourfulness": colourfulness, "hf_share": hf_share, "contrast": contrast}
OF_A_PAIR = {"drift_l2": drift_l2, "drift_ssim": ssim}
SIGNS = (*OF_AN_IMAGE, *OF_A_PAIR)


def image_signs(images, reference=None):
    """{name: [one float per image]}: saturation, colourfulness, hf_share, contrast and, given the step-0 images of
    the same seeds (B, 3, H, W), drift_l2 and drift_ssim. Image by image: the float64 copies of a whole batch of
    1024 x 1024 images would take gigabytes."""
    signs = {name: [] for name in (SIGNS if reference is not None else OF_AN_IMAGE)}
    for k in range(len(images)):
        x = images[k:k + 1]
        for name, values in signs.items():
            value = OF_AN_IMAGE[name](x) if name in OF_AN_IMAGE else OF_A_PAIR[name](x, reference[k:k + 1])
            values.append(value.item())
    return signs
