"""Kernels and their autograd Functions, one kernel family per file.

- ``infonce_fwd.py``: Triton forward (row log-sum-exp and target logit)
- ``infonce_bwd.py``: Triton backward (query and key gradients)
- ``tiles.py``: Triton device functions both share (similarity and logit tiles)
- ``chunked.py``: the same forward and backward in chunked PyTorch (CPU without Triton)
- ``infonce.py``: the autograd Function over those backends
- ``configs.py``: every kernel's block sizes, in one place
"""
