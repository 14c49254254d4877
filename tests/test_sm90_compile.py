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


def test_spills_are_read_from_the_stack_frame():
    # ptxas puts spilled registers in the stack frame (STACK), not in LOCAL, which stays 0:
    # a report reading LOCAL alone called every spilling kernel clean.
    from fastcl.ops.compile_report import parse_resources

    usage = " Function k:\n  REG:255 STACK:120 SHARED:1024 LOCAL:0 CONSTANT[0]:728 TEXTURE:0\n"
    spilling = "  /*0100*/  STL [R1+0x10], R4 ;\n  /*0110*/  HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ ;\n" \
               "  /*0120*/  LDL.LU R4, [R1+0x10] ;\n"
    assert parse_resources(usage, spilling) == (255, 120, 1)
    # A frame nothing is stored to or loaded from spills nothing.
    clean = "  /*0110*/  HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ ;\n  /*0120*/  HMMA.16816.F32 R4, R8, R12, R4 ;\n"
    assert parse_resources(usage.replace("STACK:120", "STACK:0"), clean) == (255, 0, 2)
    assert parse_resources(usage, clean)[1] == 0


def test_report_compiles_with_the_launchers_alignment():
    # Pointers and the widths / strides of a usual embedding width are passed as
    # multiples of 16 (what Triton's launcher specializes on); sizes stay ragged.
    from fastcl.ops.compile_report import _aligned
    from fastcl.ops.launch import Segments, TileInputs

    ins = TileInputs(q="*bf16", k="*bf16", params="*fp32", targets="*i64", row_groups="*i64", key_groups="*i64",
                     q_norm="*fp32", k_norm="*fp32", scalars="*fp32", thresholds="*fp32", guide_rows="*fp32",
                     guide_cols="*fp32", guide_thresholds="*fp32", n_rows="i32", dim="i32", stride_q="i32",
                     stride_k="i32", n_guide_cols="i32", guide_dim="i32")
    attrs = _aligned(dict(ins=ins, seg=Segments(*["i32"] * len(Segments._fields)), lse_ptr="*fp32", row0="i32",
                          stride_w="i32", BLOCK_M="constexpr"))
    fields = TileInputs._fields
    aligned_ins = {fields[path[1]] for path in attrs if path[0] == 0}
    assert aligned_ins == set(fields) - {"n_rows", "n_guide_cols"}
    assert not any(path[0] == 1 for path in attrs)  # the column segments are sizes
    assert (2,) in attrs and (4,) in attrs and (3,) not in attrs and (5,) not in attrs


def test_launches_take_the_configuration_of_their_option_set():
    # Rules beyond the default loss spill at the default loss's tiles: every launch that
    # compiles them must take the configuration made (and compile-checked) for them. Run
    # without the interpreter, which has one configuration for everything.
    code = (
        "import sys, torch\n"
        "from triton.runtime.jit import JITFunction\n"
        "import sm90_launches as L\n"
        "from fastcl.ops.configs import kernel_config\n"
        "names = {'_infonce_fwd_kernel': 'forward', '_infonce_bwd_dq_kernel': 'backward_dq',\n"
        "         '_infonce_bwd_dk_kernel': 'backward_dk', '_infonce_dlogits_kernel': 'backward_ds',\n"
        "         '_one_pass_logits_kernel': 'one_pass_logits'}\n"
        "for module in L.MODULES:\n"
        "    for name, value in list(vars(module).items()):\n"
        "        if isinstance(value, JITFunction):\n"
        "            setattr(module, name, L.Recorder(value, launches := globals().setdefault('launches', [])))\n"
        "for variant in ('bf16/plain', 'fp16/family', 'fp32/family'):\n"
        "    del launches[:]\n"
        "    L.record(variant, launches)\n"
        "    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[variant[:4]]\n"
        "    rules = variant.endswith('family')\n"
        "    for fn, _, kw in launches:\n"
        "        if fn.__name__ in names:\n"
        "            cfg = kernel_config(names[fn.__name__], dtype, 96, rules=rules)\n"
        "            same = (kw['BLOCK_M'], kw['BLOCK_N'], kw['num_warps']) == (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps)\n"
        "            differs = cfg != kernel_config(names[fn.__name__], dtype, 96, rules=not rules)\n"
        "            print(variant, fn.__name__, same, differs)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.path.dirname(here), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert {(variant, kernel) for variant, kernel, _, _ in lines} == {
        (v, k) for v in ("bf16/plain", "fp16/family", "fp32/family")
        for k in ("_infonce_fwd_kernel", "_infonce_bwd_dq_kernel", "_infonce_bwd_dk_kernel",
                  "_infonce_dlogits_kernel", "_one_pass_logits_kernel")}, result.stdout
    assert all(same == "True" for _, _, same, _ in lines), result.stdout
    # The two sets differ for some kernel, or the check above would prove nothing.
    assert any(differs == "True" for variant, _, _, differs in lines if variant == "fp16/family"), result.stdout
