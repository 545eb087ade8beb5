"""tools/memory_estimate.py on tiny models, held to arithmetic done here and its model calls to those a real tiny
training step makes, so the numbers of docs/memory.md cannot drift."""

import math
import types

import pytest
import torch
from test_flux2_train import tiny2  # noqa: F401 (a fixture)
from test_train import train_tiny
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import flux2_model as f2
import flux_model as fm
import reward
import srpo
from common.util import InputError
from sampling import sampler
from tools import memory_estimate as me
from training import checkpoints, memory, runtime
from weights import clip_weights

HEIGHT = WIDTH = 64
TEXT_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_estimate():
    cfgs = fm.FluxConfig.preset("tiny"), fm.AutoEncoderConfig.preset("tiny"), clip_weights.clip_config(**reward.TINY)
    return cfgs, me.estimate(HEIGHT, WIDTH, *cfgs, text_tokens=TEXT_TOKENS)


def test_checkpointed_block_inputs_are_one_bf16_stream_per_block(tiny_estimate):
    """Each block's checkpoint keeps its input stream, (image + text tokens) x width in bf16, and the shared
    conditioning vector vec (1 x width, bf16) once; nothing of the blocks' insides."""
    (flux_cfg, _, _), e = tiny_estimate
    blocks = flux_cfg.depth + flux_cfg.depth_single_blocks
    tokens = (HEIGHT // 16) * (WIDTH // 16) + TEXT_TOKENS
    assert e["block inputs"] == blocks * tokens * flux_cfg.hidden_size * 2 + flux_cfg.hidden_size * 2


def test_vae_largest_saved_tensor_is_an_fp32_group_norm_input(tiny_estimate):
    """CUDA autocast runs GroupNorm in fp32: the decoder's largest saved tensor is the fp32 copy of the input of
    the first full-resolution block, ch * ch_mult[1] channels at H x W (a bf16 rule would give half)."""
    (_, ae_cfg, _), e = tiny_estimate
    assert e["vae largest"] == ae_cfg.ch * ae_cfg.ch_mult[1] * HEIGHT * WIDTH * 4



def test_checkpointed_vae_decode_has_the_same_gradient_and_keeps_under_a_quarter_of_the_tensors():
    """Training's decode for the reward (Decoder.checkpointing) keeps each stage's input only and recomputes the
    stage in the backward: the gradient to the latents is the one without it (fp32), the saved bytes shrink (at
    FLUX.1-dev's size 9.95 GB -> the stage inputs, see docs/memory.md)."""
    ae = fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).requires_grad_(False)
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    latents = torch.randn(1, tokens, 4 * ae.cfg.z_channels, generator=torch.Generator().manual_seed(0))

    def decode(checkpointing):
        ae.decoder.checkpointing = checkpointing
        x, saved = latents.clone().requires_grad_(), me.SavedTensors(ae)
        with saved.record("vae"):
            images = sampler.decode_images(ae, x, HEIGHT, WIDTH)
        (images * torch.linspace(-1, 1, images.numel()).reshape(images.shape)).sum().backward()
        return x.grad, saved.total("vae")

    (grad, kept), (checked_grad, checked_kept) = decode(False), decode(True)
    assert torch.allclose(checked_grad, grad, rtol=0, atol=1e-6) and grad.abs().max() > 0
    assert checked_kept < kept / 4


def test_training_decodes_checkpointed_and_sampling_does_not(tmp_path, monkeypatch):
    """runtime.ready turns the VAE's checkpointing on for the training step's decode; the sample grids decode
    without gradient, where it does nothing."""
    seen = []
    monkeypatch.setattr(srpo, "train", lambda parts, *args: seen.append(parts.ae.decoder.checkpointing))
    monkeypatch.setattr(checkpoints, "report", lambda out: None)
    cli.main(["train", "--demo", "random", "--device", "cpu", "--out", str(tmp_path), "--steps", "1", "--height", "32",
               "--width", "32", "--rollout-steps", "4", "--samples", "1"])
    assert seen == [True] and not fm.AutoEncoder(fm.AutoEncoderConfig.preset("tiny")).decoder.checkpointing


def test_offload_host_memory_counts_each_pinned_tensor_rounded_up_to_a_power_of_two(tiny_estimate):
    """--offload on CUDA: FSDP2 pins each fp32 parameter and gradient as its own tensor, and PyTorch's host allocator
    rounds each block up to a power of two (full fine-tuning of FLUX.1-dev: ~224 GB of host memory, not 190);
    AdamW's state is not pinned."""
    (flux_cfg, _, _), e = tiny_estimate
    with torch.device("meta"):
        sizes = [p.numel() for p in fm.Flux(flux_cfg).parameters()]
    expected = sum(2 * 2 ** math.ceil(math.log2(4 * n)) + 8 * n for n in sizes)
    assert me.one_gpu(e)["full, --offload"][1] == expected > 16 * sum(sizes)


@pytest.fixture(scope="module")
def klein_tiny():
    """The tiny FLUX.2 transformer and VAE, LoRA rank 4; the branch's velocity with CFG (2 passes) and the
    conditional pass alone (1, --no-branch-cfg), at train's defaults otherwise (the rollout at guidance 1)."""
    cfgs = (f2.Flux2Config.preset("tiny"), f2.Flux2AutoEncoderConfig.preset("tiny"),
            clip_weights.clip_config(**reward.TINY))
    calls = {p: me.model_calls(srpo.TrainConfig(no_branch_cfg=p == 1), sampled_with_cfg=True) for p in (1, 2)}
    return cfgs, {p: me.estimate(HEIGHT, WIDTH, *cfgs, text_tokens=TEXT_TOKENS, lora_rank=4, calls=calls[p])
                  for p in (1, 2)}


def test_flux2_branch_with_cfg_keeps_both_passes_graphs(klein_tiny):
    """FLUX.2: each checkpointed block keeps its bf16 input stream (the shared modulation is the model's, outside
    the blocks); with CFG both passes' graphs live until the branch's backward: twice the block inputs and the rest
    of the transformer's graph, the VAE and reward graphs once."""
    (cfg, _, _), e = klein_tiny
    blocks, tokens = cfg.depth + cfg.depth_single_blocks, (HEIGHT // 16) * (WIDTH // 16) + TEXT_TOKENS
    assert e[1]["block inputs"] == blocks * tokens * cfg.hidden_size * 2
    assert e[2]["block inputs"] == 2 * e[1]["block inputs"] and e[2]["transformer rest"] == 2 * e[1]["transformer rest"]
    assert e[2]["vae"] == e[1]["vae"] and e[2]["reward"] == e[1]["reward"]


def test_flux2_lora_params_and_model_calls(klein_tiny):
    """FLUX.2's adapters: R (in + out) per adapted layer, SwiGLU's input layer 2 x the MLP width out; the base's
    count is Flux2's. Model calls per prompt: R rollout forwards (guidance 1: the conditional pass alone) and 2
    branches of `passes` calls, each 3 forwards' work for LoRA (forward, recompute, input gradients), 4 for full."""
    (cfg, _, _), e = klein_tiny
    h, m = cfg.hidden_size, cfg.mlp_hidden
    double, single = 2 * ((h + 3 * h) + (h + h) + (h + 2 * m) + (m + h)), (h + 3 * h + 2 * m) + (h + m + h)
    assert e[2]["lora params"] == 4 * (cfg.depth * double + cfg.depth_single_blocks * single)
    assert e[2]["params"] == sum(p.numel() for p in f2.Flux2(cfg).parameters())
    for passes, modes in ((p, me.one_gpu(e[p])) for p in (1, 2)):
        rollout = srpo.TrainConfig.rollout_steps
        assert modes["LoRA r=4, resident"][4] == (rollout + 2 * passes * 3) * e[passes]["forward flop"]
        assert modes["full, --offload"][4] == (rollout + 2 * passes * 4) * e[passes]["forward flop"]
        assert modes["full, resident"][0] > 16 * e[passes]["params"]  # fp32 weights, gradients, AdamW state


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("models, sampled_with_cfg, flags", [
    ("tiny2", True, {}),  # klein base at train's defaults: the rollout at guidance 1, CFG branches: R + 4
    ("tiny2", True, {"no_branch_cfg": True}),  # R + 2
    ("tiny2", True, {"rollout_guidance": 2.0}),  # PickScore's recipe: the rollout with CFG, 2 R + 4
    ("tiny2", True, {"rollout_guidance": 2.0, "no_branch_cfg": True}),  # every call the conditional pass: R + 2
    ("tiny", False, {"rollout_guidance": 2.0})])  # FLUX.1: the guidance an input of one call, R + 2
def test_model_calls_counted_are_those_a_training_step_makes(request, tmp_path, models, sampled_with_cfg, flags):
    """The calls the time model counts (model_calls: the FLOP, the --offload copies, the minutes) are the transformer
    calls one real `train` step makes on the tiny klein-base-like FLUX.2 or FLUX.1, without and with gradient (a
    forward pre-hook), for the same TrainConfig."""
    cfg = srpo.TrainConfig(height=32, width=32, rollout_steps=4, steps=1, samples=0, batch=1, **flags)
    calls = []
    hook = lambda module, args: calls.append(torch.is_grad_enabled())  # noqa: E731
    train_tiny(request.getfixturevalue(models), tmp_path, cfg,
               prepare=lambda model: model.register_forward_pre_hook(hook))
    assert me.model_calls(cfg, sampled_with_cfg) == (calls.count(False), calls.count(True))


def test_a_flag_out_of_train_range_is_one_line(capsys):
    """The tool's flags are train's, checked by TrainConfig: one line naming the flag, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        me.main(["--model", "klein-4b", "--rollout-guidance", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --rollout-guidance must be")


class WeightCasts(TorchDispatchMode):
    """Records each cast autocast makes of a weight of `model` (aten._to_copy of its storage); alive() -> the bytes
    of those casts still held (by autocast's cache or by the graph) at that moment."""

    def __init__(self, model):
        super().__init__()
        self.weights = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        weight = StorageWeakRef(args[0].untyped_storage()) if func is torch.ops.aten._to_copy.default else None
        if weight in self.weights:
            self.casts.append((weight, StorageWeakRef(out.untyped_storage()), out.untyped_storage().nbytes()))
        return out

    def alive(self):
        return sum(n for _, ref, n in self.casts if not ref.expired())


def test_autocast_caches_weight_casts_in_the_rollout_and_not_in_training_calls():
    """Counted on fake CUDA tensors, a tiny FLUX.1 with fp32 trained weights and a checkpoint on every block, as
    training holds it without FSDP2: without gradient (the rollout, 2 forwards in one region) every weight is cast
    once and its bf16 copy stays cached, 2 bytes a cast parameter; with gradient (a training call) the blocks' casts
    are gone when the forward ends (the checkpoints keep their inputs only), what stays is what the graph of the
    unchecked root (embedders, final layer) saves, as the same region with the cache on would not."""
    cfg, device = fm.FluxConfig.preset("tiny"), torch.device("cuda")
    model = me.meta(lambda: fm.Flux(cfg), torch.float32)  # before the fake mode: parameters cannot be made fake
    with me.fake_cuda():
        model = me.checkpointed(model.to_empty(device="cuda"))
        x = torch.randn(1, (HEIGHT // 16) * (WIDTH // 16), cfg.in_channels, device=device)
        inputs = me.model_inputs(cfg, HEIGHT, WIDTH, TEXT_TOKENS, device)
        blocks = sum(p.numel() for b in [*model.double_blocks, *model.single_blocks] for p in b.parameters())
        with torch.no_grad(), WeightCasts(model) as rollout, sampler.autocast(device):
            model(x, *inputs), model(x, *inputs)
            cached = rollout.alive()
        assert len({weight for weight, _, _ in rollout.casts}) == len(rollout.casts)  # each weight cast once
        assert cached == sum(n for *_, n in rollout.casts) > blocks * 2  # and every cast kept
        with WeightCasts(model) as training, sampler.autocast(device):
            model(x, *inputs)
            kept = training.alive()
        with WeightCasts(model) as old, torch.autocast("cuda", torch.bfloat16):  # the cache on, as before
            model(x, *inputs)
            kept_with_cache = old.alive()
    assert kept <= cached - blocks * 2 and kept_with_cache == cached


def test_preflight_terms_are_the_estimate_s_transformer_and_block_inputs(tiny_estimate):
    """The pre-flight's arithmetic is the estimate's: the same parameter counts and FSDP2 buffers, and the block
    inputs it computes are those measured on fake CUDA tensors (less FLUX.1's one vec, 1 x width in bf16)."""
    (flux_cfg, _, _), e = tiny_estimate
    terms = memory.preflight_terms(flux_cfg, 0, HEIGHT, WIDTH, text_tokens=TEXT_TOKENS)
    assert all(terms[k] == e[k] for k in ("params", "root params", "lora params", "block params", "fsdp"))
    assert terms["block inputs"] == e["block inputs"] - flux_cfg.hidden_size * 2


H100 = 80 * 2**30 * 0.99  # what mem_get_info leaves free on an 80 GB card, about
SERVER = 128 * 2**30


@pytest.fixture
def gpu(monkeypatch):
    """A GPU run's pre-flight on a machine mocked: torch.cuda.mem_get_info's free bytes and the host's memory as
    gpu.free, gpu.host set; the transformer config of --flux as gpu.flux_cfg, so no folder is read. -> its check."""
    machine = types.SimpleNamespace(free=H100, host=SERVER, flux_cfg=fm.FluxConfig.preset("flux-dev"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (machine.free, 80 * 2**30))
    monkeypatch.setattr(memory, "host_memory", lambda: machine.host)
    monkeypatch.setattr(memory, "transformer_config", lambda folder: machine.flux_cfg)

    def check(device="cuda", memory_check=True, offload=False, **train):
        run = runtime.RunConfig(flux="FLUX.1-dev", device=device, no_memory_check=not memory_check, offload=offload)
        memory.preflight(run, srpo.TrainConfig(**train), runtime.Ranks(0, 1, torch.device(device), offload))

    machine.check = check
    return machine


def test_preflight_refuses_full_fine_tuning_of_flux1_on_one_gpu_naming_the_modes_that_fit(gpu):
    """FLUX.1-dev full fine-tuning on one 80 GB GPU (at least 221 GB: 190 of training state, a bf16 copy of the
    weights in the rollout's autocast cache): one line, before anything is loaded, naming the modes that fit a
    128 GiB host (LoRA, resident or offloaded, and FSDP2 over 4 such GPUs: at least 59 GB each, 2 would need 107,
    and no host memory for the weights, which rank 0 streams a tensor at a time, each rank saving its own AdamW
    shard) and, on a 512 GiB one, --offload too; --no-memory-check goes ahead, and so does a CPU run, unchecked."""
    with pytest.raises(InputError) as e:
        gpu.check()
    line = str(e.value)
    assert line.startswith("this run needs at least 221 GB on each GPU (85 GB free)") and "\n" not in line, line
    assert "--lora-rank 64 (~35 GB" in line and "--lora-rank 64 --offload (~9 GB a GPU, 60 GB host)" in line, line
    assert "--offload (~" not in line.replace("64 --offload", ""), line
    assert "torchrun over 4 such GPUs (~59 GB a GPU, 0 GB host)" in line, line
    gpu.host = 512 * 2**30
    with pytest.raises(InputError, match=r"--offload \(~13 GB a GPU, 319 GB host\), torchrun over 4 such GPUs \(~59"):
        gpu.check()
    gpu.check(memory_check=False)
    torch.cuda.mem_get_info = None  # not asked on a CPU
    gpu.check(device="cpu")


def test_preflight_refuses_what_host_memory_cannot_hold_and_lets_what_fits_go(gpu):
    """FLUX.1-dev full with --offload: 224 GB of pinned shards and AdamW's 95 more while it saves, on a 128 GiB host:
    refused naming the host. klein 4B LoRA r=64 resident (at least 17 GB) and with --offload go ahead on a 24 GB
    card."""
    with pytest.raises(InputError, match=r"319 GB of host memory \(the host has 137 GB\): modes that fit: --lora"):
        gpu.check(offload=True)
    gpu.flux_cfg, gpu.free = f2.Flux2Config.preset("klein-4b"), 24 * 2**30 * 0.97
    gpu.check(lora_rank=64)
    gpu.check(lora_rank=64, offload=True)


def test_preflight_over_8_gpus_refuses_flux2_dev_full_and_takes_lora_on_a_141_gb_card():
    """FLUX.2 [dev] (32 B) full fine-tuning over 8 x 80 GB: at least 85.1 GB a GPU (64.4 of state, 3.9 of reward,
    FSDP2's buffers, the allowance), refused; its LoRA r=64, resident on one H200, goes ahead (at least 79 GB)."""
    dev, h200 = f2.Flux2Config.preset("flux2-dev"), 141e9 * 0.99
    line = str(memory.memory_error(dev, srpo.TrainConfig(), 8, False, H100, 2048 * 2**30))
    assert line.startswith("this run needs at least 85 GB on each GPU (85 GB free)"), line
    assert memory.memory_error(dev, srpo.TrainConfig(lora_rank=64), 1, False, h200, SERVER) is None
