"""Where a kernel's launch configuration comes from (fastcl/ops/configs.py): a tuned table
for the GPU's architecture, else the defaults; launches with rules beyond the default
loss always take their own defaults. Read as on a GPU (the interpreter has one small
configuration for everything), without launching anything."""

import torch

from fastcl.ops import configs
from fastcl.ops.configs import KernelConfig, kernel_config

TUNED = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_D=128, BLOCK_D_OUT=64, num_warps=4, num_stages=4)
TUNED_1024 = dict(TUNED, BLOCK_M=128)
SLAB = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, BLOCK_D_OUT=512, num_warps=4, num_stages=2)
CUDA = torch.device("cuda", 0)


def _gpu_with_table(monkeypatch, table):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(configs, "_arch", lambda index: "sm90")
    monkeypatch.setattr(configs, "_tuned_table", lambda arch: table if arch == "sm90" else {})


def test_tuned_entries_are_read_by_kernel_dtype_family_and_dimension(monkeypatch):
    _gpu_with_table(monkeypatch, {"forward": {"half": {"768": TUNED, "1024": TUNED_1024}},
                                  "backward_dq": {"half": {"768": SLAB}}})
    for dtype in (torch.bfloat16, torch.float16):
        assert kernel_config("forward", dtype, 768, CUDA) == KernelConfig(**TUNED)
        assert kernel_config("forward", dtype, 384, CUDA) == KernelConfig(**TUNED)  # the smallest D >= 384
        assert kernel_config("forward", dtype, 1000, CUDA) == KernelConfig(**TUNED_1024)
        assert kernel_config("forward", dtype, 4096, CUDA) == KernelConfig(**TUNED_1024)  # else the largest
    # Another family, a kernel the table lacks, or no GPU: the defaults.
    for kernel, dtype, device in (("forward", torch.float32, CUDA), ("one_pass_logits", torch.bfloat16, CUDA),
                                  ("forward", torch.bfloat16, None)):
        assert kernel_config(kernel, dtype, 768, device) == configs._DEFAULTS[(kernel, configs.dtype_family(dtype))][0]
    # A slab never wider than D needs (rounded up to a power of two).
    assert kernel_config("backward_dq", torch.bfloat16, 200, CUDA).BLOCK_D_OUT == 256
    assert kernel_config("backward_dq", torch.bfloat16, 768, CUDA).BLOCK_D_OUT == 512


def test_launches_with_more_rules_take_their_own_defaults_not_the_tuned_table(monkeypatch):
    # The tuner measures the default loss; its shapes may spill with more rules compiled in.
    _gpu_with_table(monkeypatch, {"forward": {"half": {"768": TUNED}}})
    assert kernel_config("forward", torch.bfloat16, 768, CUDA, rules=True) == configs._DEFAULTS[("forward", "half")][1]
    for (kernel, family), (default, with_rules) in configs._DEFAULTS.items():
        dtype = torch.bfloat16 if family == "half" else torch.float32
        assert kernel_config(kernel, dtype, 768, rules=True).BLOCK_M == with_rules.BLOCK_M
        # Never a larger tile than the default loss's: more live values per entry.
        assert with_rules.BLOCK_M * with_rules.BLOCK_N <= default.BLOCK_M * default.BLOCK_N, (kernel, family)
    fp64 = kernel_config("one_pass_logits", torch.float64, 768, CUDA, rules=True)
    assert fp64 == kernel_config("forward", torch.float64, 768, CUDA)


def test_the_interpreter_and_an_override_come_first(monkeypatch):
    _gpu_with_table(monkeypatch, {"forward": {"half": {"768": TUNED}}})
    with configs.override_config({"forward": KernelConfig(**SLAB)}):
        assert kernel_config("forward", torch.bfloat16, 768, CUDA, rules=True) == KernelConfig(**SLAB)
        assert kernel_config("backward_ds", torch.bfloat16, 768, CUDA) == configs._DEFAULTS[("backward_ds", "half")][0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_config("forward", torch.bfloat16, 768, CUDA) == configs._INTERPRETER
