"""On a machine without a GPU, import `flux_kernels` (and with it triton) in Triton-interpreter mode.

Triton fixes compiled vs interpreted when a function is decorated with `@triton.jit`: its own library at
`import triton`, our kernels at `import flux_kernels`. transformers/diffusers import triton early, so this must run
before any test module is collected. TRITON_INTERPRET is then restored, so CPU calls keep running the torch
references unless a test sets TRITON_INTERPRET=1 itself (monkeypatch.setenv); see flux_kernels/dispatch.py.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import flux_kernels.attention  # noqa: F401
    import flux_kernels.rope  # noqa: F401

    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory):
    """A tiny diffusers-format FLUX.1 folder (tests/references.py), written once per session."""
    from references import flux_folder as make

    return make(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="session")
def flux2_folder(tmp_path_factory):
    """A tiny diffusers-format FLUX.2 [klein] base folder (tests/references.py), written once per session."""
    from references import flux2_folder as make

    return make(tmp_path_factory.mktemp("flux2"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and threads spin-waiting on shared cores turn a 1 s run into a minute;
    a module that trains tiny models uses it (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """(transformer, autoencoder, text encoders, HPS scorer): the tiny demo's random models, built in code."""
    from reward import HPSReward
    from sampling import flux_sampling

    model, ae, text = flux_sampling.tiny_models()
    return model, ae, text, HPSReward.tiny()
