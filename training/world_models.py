"""The tiny world's generative models (issue 34; docs/world.md): the project's own FLUX.1 classes at tiny sizes,
trained once on the world's images (training/world.py) by tools/make_world.py and shipped in data/world/, so that
sampling a caption draws what it says and SRPO can be watched on a laptop.

- The autoencoder: flux_model.AutoEncoder, 64 x 64 x 3 images in [-1, 1] -> 8 x 8 x 16 latents (8x down, FLUX's 16
  channels), so that the transformer packs them 2x2 into 16 tokens of 64 channels as at full size. Trained by
  reconstruction on its posterior mean (what encode returns), then its shift and scale set from the latents.
- The text encoders: flux_model.TextConditioner.tiny, random from a seed and frozen, shipped as weights so that a
  change of transformers' initialisation cannot silently change the world.
- The transformer: flux_model.Flux, pre-trained by rectified flow matching on the autoencoder's latents with the
  captions, attribute words dropped at random (SRPO's prompts leave the brightness to its control words), then
  guidance-distilled as FLUX.1-dev is: its guidance input g then does what classifier-free guidance at scale g did.

Every random number comes from the config's seed (common.util.derive_seed, torch generators): the same config,
torch and CPU kind, at the same thread count, give the same bytes.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import flux_model as fm
from common.util import derive_seed
from sampling import flux_sampling, sampler
from training import world

SIZE = 64  # the images' side: 16 pixels a token (8x autoencoder, 2x2 packing), so 16 tokens an image
UNCONDITIONAL = ""  # the empty caption: classifier-free guidance's unconditional pass


@dataclass
class AutoEncoderTraining:
    seed: int = 0
    ch: int = 8  # 8, 16, 32, 32 channels at 64, 32, 16, 8 pixels: a step twice as fast as with 16 at the top
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 1
    groups: int = 8
    steps: int = 1000  # each on a fresh batch of the world: nothing seen twice, nothing to overfit
    batch: int = 32
    lr: float = 2e-3  # Adam, after `warmup` linear steps, down a half cosine to 0
    warmup: int = 20
    latent_noise: float = 0.1  # the decoder trained on z + this x std(z) noise: a sampler's latents are not exact
    stats_images: int = 512  # held-out images whose latents give shift_factor and scale_factor


@dataclass
class TransformerTraining:
    seed: int = 0
    hidden_size: int = 128
    num_heads: int = 4  # head_dim 32 = sum(axes_dim)
    depth: int = 2
    depth_single_blocks: int = 2
    mlp_ratio: float = 4.0  # FLUX.1's own (diffusers' FluxTransformer2DModel has no other)
    axes_dim: tuple = (4, 14, 14)  # RoPE over (0, row, col): the text's ids are all 0
    context_dim: int = 64  # the tiny T5's width (txt) and CLIP's (y)
    pooled_dim: int = 64
    max_length: int = 32  # T5's byte tokens: every attribute word is in a caption's first 31 bytes (the
    # background phrase, always grey here, reaches CLIP's pooled vector alone); a text token costs what an image
    # token does, and an image has 16
    images: int = 8000  # the training set, drawn and encoded once
    steps: int = 4800  # flow matching
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 50
    train_text: bool = True  # the text encoders trained with the transformer (then frozen), as the reference's
    # learned word embeddings: frozen random encoders of bytes left colour at 0.57 and shape at chance (1,100 steps)
    drop_word: float = 0.25  # each attribute word (and the background phrase) left out with this probability
    drop_caption: float = 0.1  # the whole caption left out: the unconditional velocity guidance needs
    distill_steps: int = 200  # guidance distillation from the pre-trained model (0: none)
    distill_lr: float = 5e-4
    guidance_low: float = 1.0  # the guidance scales distilled, g ~ U[low, high]
    guidance_high: float = 5.0


def world_images(seed, n):
    """n world images at SIZE in [-1, 1], (n, 3, 64, 64) float32 (the autoencoder's range), and their labels."""
    images, labels = world.draw(seed, n, SIZE)
    return world.to_tensor(images) * 2 - 1, labels


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder


def autoencoder_config(config, scale=1.0, shift=0.0):
    """The flux_model.AutoEncoderConfig of a training config: FLUX's 16 latent channels, the widths given."""
    return fm.AutoEncoderConfig(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks,
                                z_channels=16, groups=config.groups, scale_factor=scale, shift_factor=shift)


def train_autoencoder(config):
    """flux_model.AutoEncoder trained by Adam on |D(E(x) + s std(E(x)) n) - x|^2 (mean squared error, x in [-1, 1]),
    E the posterior mean, n ~ N(0, I), s = config.latent_noise, each step on a fresh batch of the world, at
    cosine_lr; then normalised (`normalise`). No KL term: encode returns the mean alone, and the noise keeps the
    decoder smooth around the latents instead, for the transformer's latents, which are never exact."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        ae = fm.AutoEncoder(autoencoder_config(config))
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "autoencoder noise"))
    optimizer = torch.optim.Adam(ae.parameters(), lr=config.lr)
    for step in range(config.steps):
        x, _ = world_images(derive_seed(config.seed, "autoencoder", step), config.batch)
        z = ae.encode(x)  # scale 1 and shift 0 while training: the raw posterior mean
        noise = torch.randn(z.shape, generator=generator)
        loss = F.mse_loss(ae.decode(z + config.latent_noise * z.detach().std() * noise), x)
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"] = world.cosine_lr(config.lr, step, config.steps, config.warmup)
        loss.backward()
        optimizer.step()
    return normalise(ae.eval(), config)


@torch.no_grad()
def normalise(ae, config):
    """FLUX's latent normalisation z = scale (mean - shift), set from the raw latents of config.stats_images images
    (a seed of their own): shift their mean, scale 1 / their std, so that the transformer's x0 has unit variance
    as its noise has."""
    x, _ = world_images(derive_seed(config.seed, "autoencoder statistics"), config.stats_images)
    z = torch.cat([ae.encode(part) for part in x.split(128)])
    ae.cfg = autoencoder_config(config, scale=1 / z.std().item(), shift=z.mean().item())
    return ae


@torch.no_grad()
def reconstruction_mse(ae, n=256):
    """The mean of |D(E(x)) - x|^2 over n held-out world images (world.HELD_OUT_SEED), x in [-1, 1]."""
    x, _ = world_images(world.HELD_OUT_SEED, n)
    return sum(F.mse_loss(ae.decode(ae.encode(part)), part, reduction="sum").item() for part in x.split(64)) / x.numel()


# ----------------------------------------------------------------------------------------------------------------
# The text encoders and the captions


def text_encoders(config):
    """The tiny T5 and CLIP of flux_model.TextConditioner.tiny, random from a seed of the config's (the global
    generator left as it was), byte-tokenised to config.max_length tokens."""
    with torch.random.fork_rng():
        return fm.TextConditioner.tiny(config.context_dim, config.pooled_dim, config.max_length,
                                       derive_seed(config.seed, "text encoders"))


def dropped_captions(labels, generator, drop_word, drop_caption):
    """Each image's world.captions caption with each attribute word (and the background phrase) left out with
    probability drop_word, independently, and the whole caption (UNCONDITIONAL) with probability drop_caption:
    the model learns what each word adds, and what a prompt that leaves a word out (SRPO's leave the brightness)
    leaves to chance."""
    n, names = len(labels["colour"]), list(world.LABELS)
    drop = torch.rand(n, len(names), generator=generator) < drop_word
    empty = torch.rand(n, generator=generator) < drop_caption
    return [UNCONDITIONAL if empty[i] else world.captions(
        {name: labels[name][i:i + 1] for name in names},
        leave_out=[name for name, d in zip(names, drop[i], strict=True) if d])[0] for i in range(n)]


def embed(text, prompts, cache):
    """(txt (B, T, ctx), y (B, vec)) of the prompts: each distinct prompt through the frozen encoders once (cache:
    {prompt: (txt, y)}); the captions with dropped words are a few hundred in all."""
    new = [p for p in dict.fromkeys(prompts) if p not in cache]
    if new:
        txt, y = text(new)
        cache.update({p: (txt[i], y[i]) for i, p in enumerate(new)})
    return torch.stack([cache[p][0] for p in prompts]), torch.stack([cache[p][1] for p in prompts])


# ----------------------------------------------------------------------------------------------------------------
# The transformer


def flux_config(config):
    """The flux_model.FluxConfig of a training config: 64 input channels (16 latent channels packed 2x2) and the
    guidance embedding (FLUX.1-dev's family: the sampler feeds it a guidance scale)."""
    return fm.FluxConfig(in_channels=64, vec_in_dim=config.pooled_dim, context_in_dim=config.context_dim,
                         hidden_size=config.hidden_size, mlp_ratio=config.mlp_ratio, num_heads=config.num_heads,
                         depth=config.depth, depth_single_blocks=config.depth_single_blocks,
                         axes_dim=tuple(config.axes_dim), guidance_embed=True)


def velocity(model, x, txt, y, sigma, guidance):
    """v(x, sigma | txt, y, g): one call of the transformer on packed latents (B, 16, 64), as the sampler makes it
    (flux_sampling.Conditioning: the text's position ids all 0, the image's (0, row, col))."""
    txt_ids = torch.zeros(txt.shape[1], 3)
    return model(x, fm.image_ids(SIZE, SIZE), txt, txt_ids, y, sigma, guidance)


@torch.no_grad()
def training_latents(ae, config):
    """The training set: config.images world images (a seed of their own), encoded once and packed, (N, 16, 64),
    and their labels."""
    images, labels = world.draw(derive_seed(config.seed, "transformer images"), config.images, SIZE)
    z = [ae.encode(world.to_tensor(images[i:i + 256]) * 2 - 1) for i in range(0, len(images), 256)]
    return fm.pack(torch.cat(z)), labels


def noised(x0, generator):
    """Rectified flow's x_sigma = sigma eps + (1 - sigma) x0 (the sampler's and srpo.py's convention), sigma =
    sigmoid(n), n ~ N(0, 1) (SD3's logit-normal: the middle of the path, where the image is decided, most often);
    returns (x_sigma, sigma, the velocity target eps - x0)."""
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma[:, None, None]
    return s * eps + (1 - s) * x0, sigma, eps - x0


class Batches:
    """The transformer's training batches: latents of the training set drawn at random, their captions with
    dropped words, embedded (a cache of each distinct caption's embedding), all from one generator."""

    def __init__(self, config, ae, text):
        self.config, self.text, self.cache = config, text, {}
        self.latents, self.labels = training_latents(ae, config)
        self.generator = torch.Generator().manual_seed(derive_seed(config.seed, "transformer batches"))

    def next(self, grad=False):
        """(x0 (B, 16, 64), txt, y, guidance scales g ~ U[low, high] (B,)); grad: the text encoded with autograd
        (the encoders trained too), else through the cache of frozen embeddings."""
        c, g = self.config, self.generator
        index = torch.randint(len(self.latents), (c.batch,), generator=g)
        labels = {name: self.labels[name][index.numpy()] for name in world.LABELS}
        captions = dropped_captions(labels, g, c.drop_word, c.drop_caption)
        txt, y = self.text.encode(captions) if grad else embed(self.text, captions, self.cache)
        guidance = c.guidance_low + (c.guidance_high - c.guidance_low) * torch.rand(c.batch, generator=g)
        return self.latents[index], txt, y, guidance

    def unconditional(self, n):
        """(txt, y) of the empty caption, n times."""
        txt, y = embed(self.text, [UNCONDITIONAL], self.cache)
        return txt.expand(n, -1, -1), y.expand(n, -1)


def train_transformer(config, ae, text):
    """flux_model.Flux pre-trained by rectified flow matching, AdamW on |v(x_sigma, sigma | c, g) - (eps - x0)|^2
    (`noised`), x0 the latents of the world's images (ae.encode), c their captions with dropped words (Batches), at
    cosine_lr; g = guidance_low, fixed (at 1, classifier-free guidance is the conditional velocity itself). Then
    guidance-distilled (`distill_guidance`)."""
    batches = Batches(config, ae, text)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = fm.Flux(flux_config(config))
    trained = [*model.parameters(), *(text.requires_grad_(True).parameters() if config.train_text else ())]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    for step in range(config.steps):
        x0, txt, y, _ = batches.next(grad=config.train_text)
        x, sigma, target = noised(x0, batches.generator)
        guidance = torch.full_like(sigma, config.guidance_low)  # fixed: a random g would be noise in the modulation
        loss = F.mse_loss(velocity(model, x, txt, y, sigma, guidance), target)
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"] = world.cosine_lr(config.lr, step, config.steps, config.warmup)
        loss.backward()
        optimizer.step()
    text.requires_grad_(False)
    return distill_guidance(model.eval(), config, batches)


def distill_guidance(teacher, config, batches):
    """FLUX.1-dev's guidance distillation: the student (the teacher's copy) learns v_s(x, sigma | c, g) ~ v(c) + (g -
    1) (v(c) - v(empty)), the teacher's classifier-free guidance at scale g ~ U[low, high], in one call instead of
    two; AdamW on the squared error at cosine_lr. Returns the student (the teacher itself when distill_steps is 0)."""
    if not config.distill_steps:
        return teacher
    student = copy.deepcopy(teacher).train()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.distill_lr, weight_decay=0.0)
    for step in range(config.distill_steps):
        x0, txt, y, guidance = batches.next()
        x, sigma, _ = noised(x0, batches.generator)
        txt_u, y_u = batches.unconditional(len(x))
        with torch.no_grad():  # both of the teacher's passes in one call
            both = velocity(teacher, torch.cat([x, x]), torch.cat([txt, txt_u]), torch.cat([y, y_u]),
                            torch.cat([sigma, sigma]), torch.cat([guidance, guidance]))
            v_c, v_u = both.chunk(2)
            target = v_c + (guidance - 1)[:, None, None] * (v_c - v_u)
        loss = F.mse_loss(velocity(student, x, txt, y, sigma, guidance), target)
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"] = world.cosine_lr(config.distill_lr, step, config.distill_steps, config.warmup)
        loss.backward()
        optimizer.step()
    return student.eval()


# ----------------------------------------------------------------------------------------------------------------
# Sampling, as `srpo.py sample` does


@torch.no_grad()
def sample(model, ae, text, prompts, seeds, steps=20, guidance=flux_sampling.GUIDANCE):
    """Images (B, 3, 64, 64) in [0, 1] of the prompts, the i-th from noise seed seeds[i] (FluxPipeline's noise),
    by the project's Euler sampler on FLUX.1-dev's schedule (its mu for 16 tokens) at the guidance scale given."""
    device = next(model.parameters()).device
    x = torch.cat([flux_sampling.initial_noise(1, SIZE, SIZE, seed, torch.float32) for seed in seeds]).to(device)
    cond = flux_sampling.conditioning(text(list(prompts)), SIZE, SIZE, device)
    x = sampler.euler_sample(model, x, sampler.flux_schedule(steps, x.shape[1]), cond, guidance)
    return sampler.decode_images(ae, x, SIZE, SIZE)


# ----------------------------------------------------------------------------------------------------------------
# The files: data/world/{autoencoder,transformer,text}.safetensors, each config in its metadata


def state_of(module):
    """A module's tensors for save_file: copies, so that tied weights (T5's embeddings) are separate tensors."""
    return {name: t.detach().clone().contiguous() for name, t in module.state_dict().items()}


def text_config(config):
    """What builds the text encoders again (their weights then read from the file)."""
    return {"context_dim": config.context_dim, "pooled_dim": config.pooled_dim, "max_length": config.max_length,
            "seed": derive_seed(config.seed, "text encoders")}


@torch.no_grad()
def judged_samples(model, ae, text, judge, n, steps=20, guidance=flux_sampling.GUIDANCE):
    """What the samples show, read by the world's judge (trained at 32 x 32: the 64 x 64 samples average-pooled 2x,
    which reads the world's own images right): its agreement with n held-out captions with every word, per label;
    and for the same captions without the brightness word, the share it reads dark and the samples' mean luma
    (what the prompt leaves to chance: a mix of bright and dark is what SRPO's control words then move)."""
    _, labels = world.draw(world.HELD_OUT_SEED, n, SIZE)
    images = sample(model, ae, text, world.captions(labels), range(n), steps, guidance)
    agreement = judge.agreement(F.avg_pool2d(images, 2), labels)
    images = sample(model, ae, text, world.captions(labels, leave_out=("brightness",)), range(n), steps, guidance)
    dark = judge(F.avg_pool2d(images, 2))["brightness"].argmax(dim=1) == world.LABELS["brightness"].index("dark")
    luma = world.mean_luma(images)
    return {"prompts": n, "steps": steps, "guidance": guidance, "agreement": agreement,
            "without_brightness": {"dark_share": dark.double().mean().item(), "luma_mean": luma.mean().item(),
                                   "luma_std": luma.std().item()}}
