"""Every kernel compiles for the H100 (sm_90a) without spilling registers, within the
shared-memory limit, and on the tensor cores: checked without a GPU by compiling with
the ptxas Triton ships (the CPU interpreter cannot see any of this)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "fastcl.ops.compile_report", "--check", "--dim", "768"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # 5 dtype/precision variants x {plain, normalized, all options, the loss family's rules}
    # x 4 kernels, a line each.
    assert sum(line.startswith(("forward", "backward")) for line in result.stdout.splitlines()) == 80, report
    assert sum("/family" in line for line in result.stdout.splitlines()) == 35, report  # the one pass's 3 too


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_projection_kernel_stays_small_on_sm90():
    # The workspace backward's last pass (scale, normalization term, rounding) is
    # bandwidth-bound: it needs many blocks per SM, so few registers (a 32 x 128 tile on 4
    # warps had taken all 255; 8 x 128 on 8 warps takes at most 66).
    code = (
        "from fastcl.ops.compile_report import _compile, _split\n"
        "from fastcl.ops.configs import KernelConfig\n"
        "from fastcl.ops.infonce_bwd_workspace import PROJECT_ROWS_BLOCKS, _project_rows_kernel\n"
        "blocks = dict(PROJECT_ROWS_BLOCKS); warps = blocks.pop('num_warps')\n"
        "for o, g, x, acc in [('bf16', 'fp32', 'bf16', 'fp32'), ('fp16', 'fp32', 'fp16', 'fp32'),\n"
        "                     ('fp32', 'fp32', 'fp32', 'fp32'), ('fp64', 'fp64', 'fp64', 'fp64')]:\n"
        "  for normalized, row_factors in ((True, True), (True, False), (False, True), (False, False)):\n"
        "    sig = dict(out_ptr='*' + o, grad_ptr='*' + g, x_ptr='*' + x, dot_ptr='*' + acc, norm_ptr='*' + acc,\n"
        "               params_ptr='*' + acc, factor_ptr='*' + acc, row_factor_ptr='*' + acc, n_rows='i32',\n"
        "               dim='i32', stride_out='i32',\n"
        "               stride_grad='i32', stride_x='i32', eps_ptr='*' + acc)\n"
        "    cfg = KernelConfig(32, 32, 32, 32, warps, 1)\n"
        "    regs, spills, _, _ = _split(_compile(_project_rows_kernel, sig, dict(blocks, NORMALIZED=normalized,\n"
        "                                         ROW_FACTORS=row_factors),\n"
        "                                         cfg, 90))\n"
        "    print(o, normalized, regs, spills)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 16, result.stdout
    for g, x, regs, spills in lines:
        assert int(spills) == 0 and int(regs) <= 80, f"{g}/{x}: {regs} registers, {spills} bytes spilled"


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_every_launch_binds_and_compiles_as_on_a_gpu():
    # The launchers' real arguments (tuple arguments included) through Triton's runtime
    # binder, then compiled for sm_90a: what a GPU launch does before the kernel runs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, os.path.join(root, "tests", "sm90_launches.py")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = {tuple(line.split()) for line in result.stdout.splitlines()}
    kernels = {name for name, _ in compiled}
    assert kernels == {"_infonce_fwd_kernel", "_infonce_bwd_dq_kernel", "_infonce_bwd_dk_kernel",
                       "_infonce_dlogits_kernel", "_project_rows_kernel", "_one_pass_logits_kernel",
                       "_one_pass_grads_kernel", "_one_pass_rows_kernel"}, result.stdout
    assert {variant for _, variant in compiled} == {"bf16/plain", "fp16/family", "fp32/family", "fp64/plain"}
