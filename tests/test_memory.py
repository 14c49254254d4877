"""No N x M buffer exists at any point: peak memory is O((N + M) * D).

On CPU the peak is read from the PyTorch profiler's allocator record (every torch
allocation, with the running total) plus tracemalloc (numpy's allocations, which is
where the Triton interpreter keeps its tiles). At N = M = 2048 an N x M float32 matrix
is 16 MiB while each input is 128 KiB, so a bound of 4 MiB on the extra peak leaves no
room for one, yet plenty for the inputs' gradients and the kernels' per-row vectors.
On a GPU the allocator's peak is checked at N = M = 65536, D = 768.
"""

import tracemalloc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import allocated_above_start, allocation_records
from fastcl import info_nce
from fastcl.ops.configs import KernelConfig, one_pass_cpu_blocks, override_config

N, D = 2048, 16
NM_BYTES = N * N * 4


def _peak_cpu_bytes(fn) -> int:
    """Peak bytes allocated by torch (profiler record) plus Python and numpy (tracemalloc)
    during fn. One unmeasured call first, so that lazy imports and caches stay out."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()  # inside: the profiler's own start-up is not ours to count
        try:
            fn()
            _, python_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Above the level at the session's start: the running total is process-wide, so
    # tensors that earlier tests keep alive (compiled graphs, caches) would count too.
    return max(allocated_above_start(allocation_records(prof))) + python_peak


def _step(backend, **options):
    a = torch.randn(N, D, requires_grad=True)
    p = torch.randn(N, D, requires_grad=True)

    def run():
        info_nce(a, p, backend=backend, **options).backward()

    return run


def test_measurement_sees_a_dense_matrix():
    # The same measurement on the dense reference must see the N x M logits: otherwise a
    # pass below would prove nothing.
    assert _peak_cpu_bytes(_step("reference")) > NM_BYTES


@pytest.mark.parametrize("options", [dict(), dict(symmetric=True, gaussian_negatives=64)], ids=["plain", "sym"])
def test_chunked_path_never_holds_n_by_m(monkeypatch, options):
    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", str(1 << 14))  # 64 KiB logit chunks
    peak = _peak_cpu_bytes(_step("torch", **options))
    assert peak < NM_BYTES // 4, f"peak {peak} bytes; N x M would be {NM_BYTES}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter measurement; the GPU test is below")
def test_triton_path_never_holds_n_by_m():
    # The slab backward holds no buffer at all. (The workspace backward and the one pass,
    # "auto" for fp32 losses with gradients, hold a buffer capped by
    # FASTCL_WORKSPACE_BYTES, 1 GiB by default: all of N x M at this size.)
    big_tiles = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_D=16, BLOCK_D_OUT=16, num_warps=1, num_stages=1)
    with override_config(big_tiles):
        peak = _peak_cpu_bytes(_step("triton", hard_negative_weight=2.0, backward_strategy="slab"))
    assert peak < NM_BYTES // 4, f"peak {peak} bytes; N x M would be {NM_BYTES}"


def _transient_cpu_bytes(fn) -> tuple[int, int]:
    """(transient, retained) torch bytes of ``fn = (prepare, step)``: the step's peak above
    the level before it, less what it leaves allocated (the input gradients), from the
    profiler's record. ``prepare`` makes fresh inputs outside the measurement."""
    prepare, fn = fn
    prepare()
    fn()  # once unmeasured: lazy set-up stays out
    prepare()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    totals = allocated_above_start(allocation_records(prof))
    return max(totals) - totals[-1], totals[-1]


def test_native_step_end_to_end_stays_under_five_percent_of_dense():
    # Issue 4's memory target, end to end (normalization included), at D=768: the native
    # kernel normalizes on the fly, so beyond the gradients it returns it holds only its
    # per-thread blocks and one scale per row, not the unit rows (6 MiB each here) nor
    # their gradients.
    from fastcl import native

    if not native.available():
        pytest.skip(f"native extension unavailable: {native.status().reason}")
    n, d = 2048, 768
    a0, p0 = torch.randn(n, d), torch.randn(n, d)

    def step(backend, **options):
        leaves = []  # made outside the measured call, and kept: their gradients stay allocated

        def run():
            leaves[:] = [a0.clone().requires_grad_(), p0.clone().requires_grad_()]
            return leaves

        def measured():
            info_nce(*leaves, backend=backend, **options).backward()

        return run, measured

    dense, _ = _transient_cpu_bytes(step("reference"))
    # The recomputing kernel: two blocks per thread.
    ours, retained = _transient_cpu_bytes(step("native", backward_strategy="workspace"))
    one_input = n * d * 4
    assert retained >= 2 * one_input, "the measurement must see the two input gradients"
    assert ours < 0.05 * dense, f"native transient {ours / 2**20:.1f} MiB vs dense {dense / 2**20:.1f} MiB"
    assert ours < one_input, f"native transient {ours / 2**20:.1f} MiB: a normalized copy is {one_input / 2**20:.0f} MiB"
    # The one pass ("auto" here) holds a strip of logits and scaled rows per thread, as
    # large as its rule allows (at most the gradients' size), and hands the gradients it
    # kept from the forward over to the backward without a copy.
    threads = torch.get_num_threads()
    rows, _ = one_pass_cpu_blocks(n, n, n, d, threads, False)
    strips = threads * rows * (n + d) * 4
    ours, retained = _transient_cpu_bytes(step("native"))
    assert retained >= 2 * one_input, "the measurement must see the two input gradients"
    assert ours < strips + one_input // 2, (f"one pass transient {ours / 2**20:.1f} MiB, strips "
                                            f"{strips / 2**20:.1f} MiB, gradients {2 * one_input / 2**20:.0f} MiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hard", [False, True], ids=["unsup", "sup"])
def test_gpu_peak_memory_at_65536(hard):
    n, d = 65536, 768
    a, p, h = (torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    info_nce(a, p, h if hard else None, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = (3 if hard else 2) * n * d * 2
    # Gradients (one per input), the concatenated candidates and the workspace backward's
    # fp32 dk accumulator: a few times the inputs (normalization is fused: no unit rows),
    # plus the workspace, capped at DEFAULT_WORKSPACE_BYTES. The logits alone would be
    # n * (2n) * 2 bytes = 16 GiB.
    from fastcl.ops.infonce_bwd_workspace import DEFAULT_WORKSPACE_BYTES

    bound = 4 * inputs + DEFAULT_WORKSPACE_BYTES
    assert extra < bound, f"extra peak {extra / 2**30:.2f} GiB for {inputs / 2**30:.2f} GiB of inputs"
