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

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (real sizes on the H100)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
