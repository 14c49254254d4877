"""Compile every kernel for a CUDA architecture without a GPU, and report its resources.

    python -m fastcl.ops.compile_report            # sm_90a (H100), table of every variant
    python -m fastcl.ops.compile_report --check    # exit 1 on spills or too much shared memory

Triton compiles to a cubin with the ptxas it ships, no driver needed, so this catches
what the CPU interpreter cannot: kernels that do not compile for the GPU, register
spills, shared memory over the limit, and products that do not reach the tensor cores
(it counts the HGMMA / HMMA / DMMA instructions in the machine code). It must run
without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from .configs import KernelConfig, kernel_config
from .launch import Segments, Switches, TileInputs, extra_rules
from .layout import HARDNESS_IN_BATCH

#: Shared memory per block on an H100 (227 KB usable of 228 KB).
H100_SHARED_BYTES = 227 * 1024

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass
class Report:
    kernel: str
    variant: str
    config: KernelConfig
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_ops: int

    def problems(self, shared_limit: int = H100_SHARED_BYTES) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} bytes of register spills")
        if self.shared_bytes > shared_limit:
            found.append(f"{self.shared_bytes} bytes of shared memory (limit {shared_limit})")
        # Full-precision fp32 ("highest" matmul precision) runs on the FMA units by design;
        # the one pass's gradient and row kernels hold no product.
        if (self.tensor_core_ops == 0 and not self.variant.startswith("fp32/ieee")
                and self.kernel not in ("one_pass_grads", "one_pass_rows")):
            found.append("no tensor-core instructions")
        return found


def _variants():
    """(dtype, dot precision) pairs the kernels are launched with."""
    yield torch.bfloat16, "ieee"
    yield torch.float16, "ieee"
    yield torch.float32, "tf32"
    yield torch.float32, "ieee"
    yield torch.float64, "ieee"


def _compile(fn, signature: dict, constexprs: dict, cfg: KernelConfig, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # In the kernel's argument order: the compiler reads the signature positionally.
    signature = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=_aligned(signature))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


#: Integer arguments a launch at a usual embedding width (a multiple of 16, as 384, 768,
#: 1024) passes as multiples of 16; sizes (rows, columns) are left ragged.
_ALIGNED_INTS = re.compile(r"^(dim|guide_dim|stride\w*)$")


def _aligned(signature: dict) -> dict:
    """The specializations Triton's launcher gives a launch on contiguous tensors of such
    a width: every pointer (torch allocations are 256-byte aligned) and every width or
    stride divisible by 16. Without them the compiler cannot vectorize the tile loads,
    keeps a 64-bit address per element in registers and spills where a real launch does
    not; with them the report compiles what the GPU runs."""
    attrs = {}

    def visit(path, name, kind):
        if isinstance(kind, tuple):
            for i, (field, sub) in enumerate(zip(kind._fields, kind)):
                visit(path + (i,), field, sub)
        elif kind.startswith("*") or (kind == "i32" and _ALIGNED_INTS.match(name)):
            attrs[path] = [["tt.divisibility", 16]]

    for i, (name, kind) in enumerate(signature.items()):
        visit((i,), name, kind)
    return attrs


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, spill bytes, tensor-core instruction count) read off the cubin."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return parse_resources(usage, sass)


def parse_resources(usage: str, sass: str) -> tuple[int, int, int]:
    """(registers, spill bytes, tensor-core instruction count) from cuobjdump's resource
    usage and SASS listings of one kernel.

    ptxas puts spilled registers in the thread's stack frame (``STACK:``), not in
    ``LOCAL:`` (local arrays), so spills are both; a frame with no local-memory store
    or load in the code (STL / LDL) is not counted: nothing is spilled through it."""
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    frame = sum(int(m) for m in re.findall(r"\b(?:STACK|LOCAL):(\d+)", usage))
    spills = frame if re.search(r"\b(?:STL|LDL)\b", sass) else 0
    mma = len(re.findall(r"\b[HD]G?MMA\b|\bHGMMA\.", sass))
    return registers, spills, mma


#: Option sets each kernel is compiled with; see compile_one.
FEATURES = ("plain", "normalized", "all", "family")


def report_switches(dtype: torch.dtype, precision: str, features: str) -> Switches:
    """The launch switches of the option set ``features`` (see compile_one)."""
    on = features in ("all", "family")
    family = features == "family"
    return Switches(HAS_TARGETS=on, HARD_WEIGHTED=on, GAUSS_WEIGHTED=on, EXCLUDE_SELF=on,
                    GROUPED=on and not family, NORMALIZED=features in ("normalized", "all", "family"),
                    ACC_FP64=dtype == torch.float64, PRECISION=precision, UPCAST=False, HARD_BLOCKS=family,
                    HARDNESS=HARDNESS_IN_BATCH if family else 0, MARGIN=family, GUIDED=family, EMPTY_ROWS=family)


def compile_one(kernel: str, dtype: torch.dtype, precision: str, features: str, cfg: KernelConfig,
                arch: int = 90) -> Report:
    """Compile one kernel (a name of configs.KERNELS) for one dtype and dot
    precision, with every option off ("plain"), only the fused normalization on
    ("normalized": the default loss), every option of the original layout on ("all"),
    or the loss family's rules on top of that ("family": K hard-negative blocks, the
    hardness penalty in its costliest mode, the margin; groups off, as the loss never
    combines them with K blocks), at ``cfg``."""
    from .infonce_bwd_slab import _infonce_bwd_dk_kernel, _infonce_bwd_dq_kernel
    from .infonce_bwd_workspace import _infonce_dlogits_kernel
    from .infonce_fwd import _infonce_fwd_kernel
    from .infonce_one_pass import _one_pass_logits_kernel

    t = _TRITON_TYPES[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    switches = report_switches(dtype, precision, features)
    # Every argument of the kernels below, by name: inputs and outputs in the input dtype,
    # per-row and per-column values in the accumulator dtype, sizes and strides in i32.
    ins = TileInputs(q=f"*{t}", k=f"*{t}", params=f"*{acc}", targets="*i64", row_groups="*i64", key_groups="*i64",
                     q_norm=f"*{acc}", k_norm=f"*{acc}", scalars=f"*{acc}", thresholds=f"*{acc}",
                     guide_rows=f"*{acc}", guide_cols=f"*{acc}", guide_thresholds=f"*{acc}", n_rows="i32", dim="i32",
                     stride_q="i32", stride_k="i32", n_guide_cols="i32", guide_dim="i32")
    types = dict(ins=ins, seg=Segments(*["i32"] * len(Segments._fields)), tile_ranges_ptr="*i32",
                 row_ranges_ptr="*i32", dq_ptr=f"*{t}", dk_ptr=f"*{t}", ds_ptr=f"*{t}", ds2_ptr=f"*{t}")
    types.update({name: f"*{acc}" for name in (
        "operand_scales_ptr", "lse_ptr", "target_logit_ptr", "grad_rows_ptr", "row_dot_ptr", "col_dot_ptr", "w_ptr",
        "part_max_ptr", "part_sum_ptr", "part_target_ptr", "part_ssum_ptr", "part_starget_ptr")})
    types.update({name: "i32" for name in (
        "stride_dq", "stride_dk", "stride_ds", "stride_ds2", "stride_w", "row0", "n_chunk_rows", "split_cols",
        "stride_part")})
    constexprs = dict(SW=switches, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D)
    if kernel in ("backward_dq", "backward_dk"):
        constexprs["BLOCK_D_OUT"] = cfg.BLOCK_D_OUT
    if kernel == "backward_ds":
        # float16 writes a second operand for dk (infonce_bwd_workspace.py).
        constexprs.update(SPLIT=dtype == torch.float16, WRITE_DS2=dtype == torch.float16)
    kernels = {"forward": _infonce_fwd_kernel, "backward_dq": _infonce_bwd_dq_kernel,
               "backward_dk": _infonce_bwd_dk_kernel, "backward_ds": _infonce_dlogits_kernel,
               "one_pass_logits": _one_pass_logits_kernel}
    if kernel in kernels:
        fn = kernels[kernel]
        sig = {name: types[name] for name in fn.arg_names if name not in constexprs}
    elif kernel in ONE_PASS_KERNELS:
        from .infonce_one_pass import one_pass_signature

        fn, sig, constexprs = one_pass_signature(kernel, t, acc, switches)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    compiled = _compile(fn, sig, constexprs, cfg, arch)
    return Report(kernel, f"{t}/{precision}/{features}", cfg, *_split(compiled))


#: The one-pass kernels (infonce_one_pass.py); their launch configurations come from there.
ONE_PASS_KERNELS = ("one_pass_logits", "one_pass_grads", "one_pass_rows")


def _config(kernel: str, dtype: torch.dtype, dim: int, features: str = "normalized") -> KernelConfig:
    """The configuration a launch with the option set ``features`` (see compile_one)
    takes: as the launchers choose it, from its switches (launch.extra_rules)."""
    rules = extra_rules(report_switches(dtype, "ieee", features))
    if kernel in ONE_PASS_KERNELS:
        from .infonce_one_pass import one_pass_config

        return one_pass_config(kernel, dtype, dim, rules)
    return kernel_config(kernel, dtype, dim, rules=rules)


def kernel_reports(dim: int = 768, arch: int = 90) -> list[Report]:
    """Every kernel at its default configuration, for every dtype/precision, with every
    option off and on."""
    return [compile_one(kernel, dtype, precision, features, _config(kernel, dtype, dim, features), arch)
            for dtype, precision in _variants()
            for features in FEATURES
            for kernel in ("forward", "backward_dq", "backward_dk", "backward_ds", *ONE_PASS_KERNELS)]


def _split(compiled) -> tuple[int, int, int, int]:
    registers, spills, mma = _resources(compiled.asm["cubin"])
    return registers, spills, compiled.metadata.shared, mma


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768, help="embedding dim the configs are chosen for")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = H100)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills, overflows "
                        "shared memory or (outside full-precision fp32) misses the tensor cores")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    reports = kernel_reports(args.dim, args.arch)
    print(f"{'kernel':<12} {'variant':<20} {'blocks (M,N,D,Dout) warps stages':<36} {'regs':>5} "
          f"{'spill':>6} {'smem':>7} {'mma':>5}  problems")
    failed = False
    for r in reports:
        c = r.config
        blocks = f"{c.BLOCK_M},{c.BLOCK_N},{c.BLOCK_D},{c.BLOCK_D_OUT} w{c.num_warps} s{c.num_stages}"
        problems = r.problems()
        failed |= bool(problems)
        print(f"{r.kernel:<12} {r.variant:<20} {blocks:<36} {r.registers:>5} {r.spill_bytes:>6} "
              f"{r.shared_bytes:>7} {r.tensor_core_ops:>5}  {'; '.join(problems)}")
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
