"""Test configuration.

Without a GPU the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must
be set before anything imports triton (``import torch._dynamo`` does), so it is set
here, at the top of the first file pytest imports. With a GPU the same tests run the
compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from .train_support import data_dir  # noqa: E402

# The trainer and evaluator find the data through it, also in the subprocesses tests start
# and from a clone that has no data folder beside it.
os.environ.setdefault("FASTCL_DATA_DIR", str(data_dir()))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (real sizes on the H100)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def trace_backward():
    """True, with Dynamo tracing ``loss.backward()`` inside a compiled step (torch >=
    2.13's ``trace_autograd_ops``); False on older versions, which compile the forward and
    run the backward outside. Set through ``config.patch``: a monkeypatch of the config
    module deletes the flag on undo, which hides it from every later compile."""
    config = torch._dynamo.config
    if not hasattr(config, "trace_autograd_ops"):
        yield False
        return
    with config.patch(trace_autograd_ops=True):
        yield True
