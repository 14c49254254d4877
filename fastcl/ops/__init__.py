"""Below the plan: the autograd Functions, the dispatch table, the operators and the kernels.

- ``function.py``: the autograd Function of the fused loss (takes a KernelPlan)
- ``ring.py``: the ring autograd Function of fastcl.distributed.ring_info_nce
- ``dispatch.py``: one table, (device, backend, backward strategy) -> forward, backward
- ``operators.py``: ``torch.ops.fastcl.*``: schemas, fake kernels, CUDA kernels
- ``infonce_fwd.py``: Triton forward (row log-sum-exp and target logit) and its launcher
- ``infonce_bwd_slab.py``: Triton backward, slab strategy (query and key gradients)
- ``infonce_bwd_workspace.py``: Triton backward, workspace strategy (dS per row chunk, then GEMMs)
- ``chunked.py``: the same forward and backward in chunked PyTorch
- ``tiles.py``: Triton device functions the kernels share (similarity and logit tiles)
- ``launch.py``: what every Triton launcher passes its kernel (switches, blocks, checks)
- ``normalize.py``: per-row scales that fuse L2 normalization into every backend
- ``group_ranges.py``: with groups, the tiles each block of rows or columns can meet
- ``configs.py``: every kernel's block sizes (and the tuned tables); the "auto" backward rule
- ``layout.py``: where each kind of candidate sits among the columns
- ``compile_report.py``: compile every kernel for sm_90a without a GPU
"""
