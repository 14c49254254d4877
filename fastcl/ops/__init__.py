"""Kernels and their autograd Functions, one kernel family per file.

- ``infonce_fwd.py``: Triton forward (row log-sum-exp and target logit)
- ``infonce_bwd.py``: Triton backward, slab strategy (query and key gradients)
- ``infonce_bwd_workspace.py``: Triton backward, workspace strategy (dS per row chunk, then GEMMs)
- ``tiles.py``: Triton device functions they share (similarity and logit tiles)
- ``normalize.py``: per-row scales that fuse L2 normalization into every backend
- ``chunked.py``: the same forward and backward in chunked PyTorch (CPU without Triton)
- ``infonce.py``: the autograd Function over those backends
- ``layout.py``: where each kind of candidate sits among the columns
- ``configs.py``: every kernel's block sizes, in one place (and the tuned tables)
- ``compile_report.py``: compile every kernel for sm_90a without a GPU
"""
