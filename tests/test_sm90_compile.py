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
    # 5 dtype/precision variants x {plain, normalized, all options} x 4 kernels, a line each.
    assert sum(line.startswith(("forward", "backward")) for line in result.stdout.splitlines()) == 60, report
