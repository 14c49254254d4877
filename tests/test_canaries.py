"""NaN canaries: every Triton launch in the interpreter, with its buffers padded by NaN.

In Triton's CPU interpreter an unmasked load past the end of a tensor reads whatever
host memory lies there (often zeros, or a neighbouring tensor's values) and the result
stays plausible; on a GPU the same read can fault or return garbage. Under
:func:`nan_canaries`, every tensor a kernel is launched with is moved, for the launch,
into the middle of a larger buffer whose padding holds NaN (integer tensors: a large
sentinel), with its strides and storage offset kept, tensors that share storage kept
sharing it, and the values copied back after the launch. An out-of-bounds read then
turns the result NaN, and an out-of-bounds write changes the padding, which the launch
reports as an error. The loss options of benchmarks/gpu/checks.py run under it, with
ragged sizes and each backward strategy, against the float64 oracle.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from .conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreter checks: on a GPU the kernels compile")

SENTINEL_BYTE = 0x7E  # integer padding: 0x7E7E7E7E, a group id / index no input holds
PAD_BYTES = 1 << 16  # at least this much padding on each side (more for larger tensors)


class _Padded:
    """The tensor arguments of one launch, each moved into NaN-padded storage."""

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name
        self.groups = []  # (original bytes, padded bytes, lo, hi, pad, dtype)

    def move(self, args: list) -> list:
        tensors = [x for x in args if isinstance(x, torch.Tensor)]
        by_storage: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        moved: dict[int, torch.Tensor] = {}
        for views in by_storage.values():
            spans = [(v.storage_offset() * v.element_size(),
                      (v.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride())))
                      * v.element_size() if v.numel() else v.storage_offset() * v.element_size()) for v in views]
            lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
            pad = max(PAD_BYTES, -(-(hi - lo) // 256) * 256)
            original = torch.empty(0, dtype=torch.uint8).set_(views[0].untyped_storage())
            padded = torch.empty(pad + (hi - lo) + pad, dtype=torch.uint8)
            dtype = views[0].dtype
            for part in (padded[:pad], padded[pad + hi - lo:]):
                if dtype.is_floating_point:
                    part.view(dtype).fill_(float("nan"))
                else:
                    part.fill_(SENTINEL_BYTE)
            padded[pad:pad + hi - lo] = original[lo:hi]
            self.groups.append((original, padded, lo, hi, pad, dtype))
            for v, (start, _) in zip(views, spans):
                offset = pad + start - lo
                assert offset % v.element_size() == 0, "views of one storage with unaligned offsets"
                moved[id(v)] = torch.empty(0, dtype=v.dtype).set_(
                    padded.untyped_storage(), offset // v.element_size(), v.shape, v.stride())
        return [moved.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in args]

    def restore(self) -> None:
        """Copy the values back, then check that no padding was written."""
        for original, padded, lo, hi, pad, dtype in self.groups:
            original[lo:hi] = padded[pad:pad + hi - lo]
            for side, part in (("before", padded[:pad]), ("after", padded[pad + hi - lo:])):
                intact = (torch.isnan(part.view(dtype)).all() if dtype.is_floating_point
                          else (part == SENTINEL_BYTE).all())
                if not bool(intact):
                    raise AssertionError(f"kernel {self.kernel_name} wrote outside a {dtype} argument ({side} it)")


@contextlib.contextmanager
def nan_canaries():
    """Every interpreted Triton launch inside the block runs on NaN-padded buffers;
    yields a list that collects the names of the kernels launched."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    original_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        padded = _Padded(self.__name__)
        names = list(kwargs)
        moved = padded.move(list(args) + [kwargs[k] for k in names])
        launched.append(self.__name__)
        try:
            return original_run(self, *moved[: len(args)], grid=grid, warmup=warmup,
                                **dict(zip(names, moved[len(args):])))
        finally:
            padded.restore()

    InterpretedFunction.run = run
    try:
        yield launched
    finally:
        InterpretedFunction.run = original_run


# ------------------------------------------------------- the canaries catch what they should

import triton  # noqa: E402  (after conftest has switched the interpreter on)
import triton.language as tl  # noqa: E402


@triton.jit
def _sum_first_block(x_ptr, out_ptr, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    else:
        x = tl.load(x_ptr + offsets)  # reads past n when n < BLOCK
    tl.store(out_ptr, tl.sum(x, 0))


@triton.jit
def _fill_block(out_ptr, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(out_ptr + offsets, offsets.to(tl.float32), mask=offsets < n)
    else:
        tl.store(out_ptr + offsets, offsets.to(tl.float32))  # writes past n


def _sum(x: torch.Tensor, masked: bool) -> float:
    out = torch.zeros(1)
    _sum_first_block[(1,)](x, out, x.numel(), MASKED=masked, BLOCK=16)
    return float(out)


def test_an_unmasked_read_past_the_end_turns_nan():
    storage = torch.ones(64)
    x = storage[8:13]  # five ones with real neighbours: without canaries the read looks fine
    assert _sum(x, masked=False) == 16.0  # plausible and wrong: it summed the neighbours
    with nan_canaries() as launched:
        assert torch.isnan(torch.tensor(_sum(x, masked=False)))
        assert _sum(x, masked=True) == 5.0  # the masked kernel is not flagged
    assert launched == ["_sum_first_block", "_sum_first_block"]


def test_an_unmasked_write_past_the_end_is_reported():
    storage = torch.zeros(64)
    out = storage[8:13]
    with nan_canaries():
        _fill_block[(1,)](out, out.numel(), MASKED=True, BLOCK=16)
        assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # values come back from the padded copy
        with pytest.raises(AssertionError, match="wrote outside"):
            _fill_block[(1,)](out, out.numel(), MASKED=False, BLOCK=16)
    assert storage[13:].eq(0).all()  # the real neighbours were never touched


def test_shared_storage_stays_shared():
    # Two arguments that are views of one storage (the launchers pass one buffer for
    # several unused pointers) must alias in the padded copy too.
    storage = torch.arange(32, dtype=torch.float32)
    a, b = storage[:8], storage[4:12]
    padded = _Padded("test")
    a2, b2 = padded.move([a, b])
    assert a2.untyped_storage().data_ptr() == b2.untyped_storage().data_ptr()
    assert torch.equal(a2, a) and torch.equal(b2, b)
    b2[0] = -1.0  # storage[4], seen by both
    assert a2[4] == -1.0
    padded.restore()
    assert storage[4] == -1.0


# ------------------------------------------------------------------ every loss option

from benchmarks.gpu.checks import OPTIONS, check  # noqa: E402
from internals import backward_strategies, forced_backward  # noqa: E402

# Ragged: no size a multiple of the interpreter's 16-wide tiles.
SIZES = [(37, 20), (50, 33)]


@pytest.mark.parametrize("strategy", backward_strategies())
@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_options_read_nothing_out_of_bounds(option, strategy):
    for n, d in SIZES:
        with forced_backward(strategy), nan_canaries() as launched:
            result = check(OPTIONS[option], n, d, torch.float32, DEVICE, backend="triton")
        assert launched, "no Triton kernel ran: the canaries checked nothing"
        errors = result["errors"]
        assert all(e < float("inf") for e in errors.values()), f"N={n} D={d}: non-finite result {errors}"
        assert result["ok"], f"N={n} D={d}: errors {errors} over {result['tolerance']}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_other_dtypes_read_nothing_out_of_bounds(dtype):
    for strategy in backward_strategies():
        with forced_backward(strategy), nan_canaries() as launched:
            result = check(OPTIONS["hard"], 37, 20, dtype, DEVICE, backend="triton")
        assert launched and result["ok"], (strategy, result)
