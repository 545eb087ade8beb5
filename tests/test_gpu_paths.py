"""What a first CUDA run would hit, shown on a CPU (issue 20): the meta device or FakeTensorMode "cuda" tensors for
the GPU, process groups of one over gloo, and torch.cuda functions recorded where no GPU can run them."""


import pytest
import torch
import torch.distributed as dist

import cli
import families
import methods
import srpo
from common import util
from training import checkpoints, evaluation, runtime


@pytest.fixture
def cuda_here(monkeypatch):
    """--device cuda accepted as if this machine had GPUs; what torch.cuda.set_device is asked recorded."""
    selected = []
    monkeypatch.setattr(util, "parse_device", torch.device)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


def test_offload_on_cuda_gives_the_host_tensors_a_gloo_backend(cuda_here, monkeypatch):
    """FSDP2's CPUOffloadPolicy keeps the gradients on the host: the clip norm's all_reduce runs on CPU tensors,
    which an nccl-only group refuses ("No backend type associated with device type cpu")."""
    backends, init = [], dist.init_process_group

    def record(backend, **kwargs):
        backends.append(backend)
        init("gloo", **kwargs)  # nccl cannot start here

    monkeypatch.setattr(dist, "init_process_group", record)
    try:
        ranks = runtime.init_ranks("cuda", offload=True)
    finally:
        dist.destroy_process_group()
    assert ranks.fsdp and backends == ["cpu:gloo,cuda:nccl"]
    assert runtime.process_group_backend(torch.device("cuda"), False) == "nccl"
    assert runtime.process_group_backend(torch.device("cpu"), True) == "gloo"


def test_an_offload_step_brings_the_host_gradient_norm_to_the_device(monkeypatch):
    """One train_step whose losses are on the accelerator while the gradient norm is on the host, as FSDP2's
    CPUOffloadPolicy computes it: the meta device stands in for the GPU (it runs the backward; nothing can be read
    back from it). The step must get as far as its one read to the host, which meta tensors cannot give, instead of
    stopping at torch.cat's device mismatch."""
    cfg, device = srpo.TrainConfig(height=32, width=32, batch=1), torch.device("meta")
    model = torch.nn.Linear(2, 1, device=device)
    monkeypatch.setattr(srpo, "shared_noise", lambda cfg, step, device, noise=None: torch.zeros(1, device=device))
    monkeypatch.setattr(srpo, "online_rollout", lambda model, eps, cond, cfg: eps)
    monkeypatch.setattr(srpo, "srp_loss", lambda model, *args: (model.weight.sum(), torch.zeros(1, device=device)))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(0.5))  # on the host
    ranks = runtime.Ranks(0, 1, device, offload=True)
    batch = [srpo.Prompt("a prompt", None, srpo.draw_timestep(cfg, 1, 0))]
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        parts = runtime.Parts(model, torch.optim.AdamW(model.parameters()), None, None, {}, None, 0, families.FLUX1)
        srpo.train_step(parts, batch, 1, cfg, ranks, methods.SRPO)


def test_one_process_on_a_gpu_with_an_index_makes_it_the_current_one(cuda_here):
    """--device cuda:1 --offload in one process: FSDP2's process group of one and its collectives use the current
    GPU, so cuda:1 must be made current (before, only torchrun's LOCAL_RANK was)."""
    ranks = runtime.init_ranks("cuda:1")
    assert ranks.device == torch.device("cuda", 1) and cuda_here == [torch.device("cuda", 1)]
    assert util.this_process("cuda")[2] == torch.device("cuda") and cuda_here == [torch.device("cuda", 1)]


def test_lora_under_fsdp_keeps_the_frozen_base_in_its_bf16_and_the_adapters_in_fp32(tmp_path, monkeypatch):
    """--lora-rank with --offload (FSDP2 in a group of one), the frozen dtype bf16 as on a GPU: FSDP's meta model is
    built in that dtype, so the shards hold the bf16 base as loaded, not widened to fp32 (twice the host memory and
    the copies to the GPU); the trained adapters stay fp32."""
    monkeypatch.setattr(runtime, "frozen_dtype", lambda device: torch.bfloat16, raising=False)
    dtypes = {}

    def inspect(parts, *args):
        for name, p in parts.model.named_parameters():
            dtypes[name] = (p.requires_grad, p.dtype)

    monkeypatch.setattr(srpo, "train", inspect)
    monkeypatch.setattr(checkpoints, "report", lambda out: None)
    cli.main(["train", "--demo", "random", "--device", "cpu", "--out", str(tmp_path), "--lora-rank", "2", "--offload",
               "--steps", "1", "--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "1"])
    frozen = {d for trained, d in dtypes.values() if not trained}
    adapters = {d for trained, d in dtypes.values() if trained}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    assert all(trained == name.endswith((".lora_A", ".lora_B")) for name, (trained, _) in dtypes.items())


def test_a_bf16_base_under_fsdp_before_torch_2_8_is_refused_in_one_line(monkeypatch):
    """FSDP2 before PyTorch 2.8 asserts uniform dtypes in a group (pytorch/pytorch#154103 relaxed it for frozen
    parameters): say so before anything is loaded."""
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.7.1"))
    ranks = runtime.Ranks(0, 1, torch.device("cpu"), offload=True)
    with pytest.raises(util.InputError, match="needs PyTorch 2.8 or later .* this is 2.7.1: upgrade torch"):
        runtime.build_transformer(None, None, ranks, "sdpa", dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.10.0"))
    with pytest.raises(AttributeError):  # past the check: no config to build from
        runtime.build_transformer(None, None, ranks, "sdpa", dtype=torch.bfloat16)


def test_pickscore_as_the_second_judge_is_loaded_in_bf16_on_a_gpu(monkeypatch):
    """--pickscore beside another --reward only scores, without gradient: on a GPU its 0.99 B parameters are bf16
    (2 GB), not fp32 (3.9 GB on every GPU); on a CPU fp32, as before."""
    loads = []
    kind = evaluation.judges.JUDGES["pickscore"]
    monkeypatch.setattr(kind, "load", lambda folder, tokenizer, device, dtype=torch.float32:
                        loads.append((device.type, dtype)))
    run = runtime.RunConfig(judges={"pickscore": (kind, "PickScore_v1", "PickScore_v1")}, out="out")
    for device in ("cuda", "cpu"):
        evaluation.Watch.for_run(run, srpo.TrainConfig(), runtime.Ranks(0, 1, torch.device(device)))
    assert loads == [("cuda", torch.bfloat16), ("cpu", torch.float32)]


def test_training_above_1024_px_a_side_is_refused_in_one_line():
    """The official decode for the reward is tiled above 1024 px a side (diffusers' AutoencoderKL tiles beyond its
    1024 sample size), which changes the image; this decode is not tiled: training refuses those sizes (before
    anything is loaded: TrainConfig is built from the flags)."""
    for height, width, flag in ((1040, 1024, "--height"), (512, 1040, "--width")):
        with pytest.raises(util.InputError, match=f"{flag} must be at least 16 and at most 1024 .*tiled above 1024"):
            srpo.TrainConfig(height=height, width=width)
    assert srpo.TrainConfig(height=1024, width=1024).height == 1024
