"""The backends and backward strategies: their names, and what ``"auto"`` picks.

:mod:`fastcl.plan` resolves every loss call's ``backend`` and ``backward_strategy``
here, from the device, the size of the call and the layout features it needs.


Backends, by what runs (``backend=``):

- ``"auto"``: on CPU tensors the native C++ kernel when the extension is built (at every
  size: from N = 4 up it beats the dense loss), else the dense path below
  :data:`TINY_LOGITS` logits and the chunked PyTorch path above; on CUDA tensors the
  dense path below :data:`TINY_LOGITS` (one small product beats a sequence of kernel
  launches), the Triton kernels above (and on CPU tensors under ``TRITON_INTERPRET=1``);
- ``"triton"``, ``"cpp"`` (the native C++ CPU kernel), ``"chunked"`` (chunked PyTorch),
  ``"dense"`` (the dense PyTorch loss of :mod:`fastcl.reference`, differentiated by
  autograd: N x M memory).

Older names stay accepted (:data:`BACKEND_ALIASES`): ``"native"`` is the compiled
operators, i.e. the C++ kernel on CPU tensors and the Triton kernels on CUDA tensors;
``"torch"`` is ``"chunked"`` and ``"reference"`` is ``"dense"``.

Backward strategies (``backward_strategy=``), for the fused backends:

- ``"auto"``: ``"one_pass"`` where :func:`one_pass_applies` (a loss reduced to a scalar
  that needs gradients, on the native kernel or the Triton kernels); else for Triton
  ``"slab"`` with groups or when one gradient slab spans D, else ``"workspace"``
  (:func:`fastcl.ops.configs.backward_strategy`; the environment variable
  ``FASTCL_BACKWARD`` overrides this choice); ``"workspace"`` for the others;
- ``"one_pass"`` (native and Triton, losses reduced to a scalar): the forward forms the
  gradients too, chunk by chunk (6NMD FLOPs instead of 8NMD: the similarities once), and
  the backward only scales them by the incoming gradient. The price is in grad mode
  only: a forward whose backward never runs did the gradient work for nothing
  (evaluate under ``torch.no_grad()``, which takes the forward alone);
- ``"slab"`` (Triton only): every gradient slab recomputes its similarity tiles, no
  buffer;
- ``"workspace"``: the logit gradients of a block of rows in a bounded buffer, then
  matrix products (Triton, and how the native kernel and the chunked path work).

With ``backend="auto"`` an explicit strategy narrows the choice to the fused backends
that offer it. The dense path has no strategy (autograd differentiates it).
"""

from __future__ import annotations

import os

import torch

from . import native
from .ops import dispatch
from .ops.configs import BACKWARD_STRATEGIES as TRITON_STRATEGIES
from .ops.configs import ONE_PASS_MIN_ROWS, one_pass_cpu_blocks
from .ops.configs import backward_strategy as auto_triton_strategy
from .ops.utils import cpu_threads, interpreting

BACKENDS = ("auto", "triton", "cpp", "chunked", "dense")
#: Older backend names, still accepted: "native" (the compiled operators: the C++ kernel
#: on CPU tensors, the Triton kernels on CUDA tensors), "torch" (chunked) and "reference"
#: (dense).
BACKEND_ALIASES = ("native", "torch", "reference")
BACKWARD_STRATEGIES = ("auto",) + TRITON_STRATEGIES

#: Below this many logits (N x M) the "auto" backend takes the dense path: one small
#: matrix product beats any sequence of kernel launches, and 64 K elements is a quarter
#: of a megabyte.
TINY_LOGITS = 1 << 16


def canonical_backend(backend: str, device: torch.device | None = None) -> str:
    """``backend`` by its current name; "native" depends on the device (None: not known yet)."""
    if backend == "native":
        return backend if device is None else ("triton" if device.type == "cuda" else "cpp")
    return {"torch": "chunked", "reference": "dense"}.get(backend, backend)


def choose_backend(backend: str, device: torch.device, n_logits: int, strategy: str = "auto",
                   dense: bool = True, needed: frozenset[str] = frozenset()) -> str:
    """The backend that runs: ``backend`` with its alias resolved, or what "auto" picks
    for ``n_logits`` logits on ``device`` (see the module docstring). ``dense=False``
    (the distributed losses: the dense loss knows no ranks) takes the chunked path
    instead of the dense one. ``needed``: the layout features the call needs
    (:data:`fastcl.ops.dispatch.LAYOUT_FEATURES`); "auto" falls back to the chunked path
    when the backend it would pick lacks one, and a backend named explicitly that lacks
    one is refused."""
    backend = canonical_backend(backend, device)
    if backend == "dense" and not dense:
        return "chunked"
    if backend != "auto":
        lacking = dispatch.unsupported(backend, needed)
        if backend != "dense" and lacking:
            raise ValueError(f"backend {backend!r} does not compute {', '.join(lacking)} on {device.type} tensors"
                             ": use backend='chunked' (or 'auto', which picks a backend that does)")
        return backend
    chosen = _auto_backend(device, n_logits, strategy, dense)
    lacking = dispatch.unsupported(chosen, needed) if chosen != "dense" else ()
    if lacking:
        if strategy not in ("auto",) + dispatch.strategies_of("chunked"):
            raise ValueError(f"backward_strategy={strategy!r} is offered only by backends that do not compute "
                             f"{', '.join(lacking)}")
        return "chunked"
    return chosen


def _auto_backend(device: torch.device, n_logits: int, strategy: str, dense: bool) -> str:
    cpu_kernel = device.type == "cpu" and native.available() and not interpreting()
    if n_logits <= TINY_LOGITS and strategy == "auto" and not cpu_kernel:
        return "dense" if dense else "chunked"
    if device.type == "cuda":
        return "triton"
    # The interpreter runs the Triton kernels on CPU for tests; a compiled graph cannot
    # hold an interpreted launch, so under torch.compile the CPU takes the operator.
    if interpreting() and not torch.compiler.is_compiling():
        return "triton"
    if strategy == "slab":
        raise ValueError("backward_strategy='slab' is a strategy of the Triton kernels, which run on CUDA tensors "
                         f"(or on CPU tensors under TRITON_INTERPRET=1), not on {device.type} tensors")
    return "cpp" if native.available() else "chunked"


def choose_strategy(strategy: str, backend: str, x: torch.Tensor, grouped: bool = False,
                    reduced: bool = True, needs_grad: bool = True, n_cols: int = 0, n_grad_cols: int = 0) -> str:
    """The backward strategy ``backend`` runs for queries like ``x`` against ``n_cols``
    columns (``n_grad_cols`` with a gradient): ``strategy``, or what "auto" picks (module
    docstring). A strategy that forms the gradients in the forward only serves losses
    reduced to a scalar (``reduced``)."""
    device = x.device.type
    if backend == "triton" and device == "cpu" and not interpreting():
        raise ValueError("backend 'triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    offered = [s for s in dispatch.strategies(device, backend)
               if reduced or s not in dispatch.GRADIENTS_IN_FORWARD]
    if strategy == "auto":
        if "one_pass" in offered and one_pass_applies(backend, x, grouped, needs_grad, n_cols, n_grad_cols):
            return "one_pass"
        if backend == "triton":
            return auto_triton_strategy(x.dtype, x.shape[1], x.device, grouped=grouped)
        return "workspace" if "workspace" in offered or not offered else offered[0]
    if strategy in dispatch.GRADIENTS_IN_FORWARD and not reduced and strategy in dispatch.strategies(device, backend):
        raise ValueError(f"backward_strategy={strategy!r} forms the gradients in the forward, which needs a loss "
                         "reduced to a scalar (reduction='mean' or 'sum'), not per-row losses (reduction='none')")
    if strategy not in offered:
        raise ValueError(f"backward_strategy={strategy!r} is not offered by backend {backend!r} on {device} tensors"
                         + (f" (it offers {tuple(offered)})" if offered else ""))
    return strategy


#: bf16 on Triton takes the one pass up to this many logits. Measured on an H200 (D = 768,
#: default block shapes; benchmarks/results/gpu/20261130-h200-runner): the one pass was
#: faster at N x M = 2^24, 2^25 and 2^28 (1.43 vs 1.99 ms, 1.86 vs 2.84, 4.43 vs 4.82) and
#: slower at 2^29, 2^32 and 2^33 (9.59 vs 9.08 ms, 70.5 vs 69.4, 178 vs 141).
ONE_PASS_BF16_MAX_LOGITS = 1 << 28


def one_pass_applies(backend: str, x: torch.Tensor, grouped: bool, needs_grad: bool, n_cols: int,
                     n_grad_cols: int) -> bool:
    """Whether "auto" takes the one pass for a loss reduced to a scalar (the caller has
    checked that): all of

    1. a gradient is needed (grad mode on, some input or the temperature requires one)
       and torch.export is not tracing (an exported program runs the forward alone);
    2. ``FASTCL_BACKWARD`` does not name a recomputing strategy;
    3. Triton: no groups (its products run over every column, where the slab backward
       skips the tiles without a common group), and float32 / float64 inputs, or
       bfloat16 with at most :data:`ONE_PASS_BF16_MAX_LOGITS` logits (N x M); float16
       only when forced (not yet timed on a GPU);
    4. native: a chunk keeps at least ``ONE_PASS_MIN_ROWS`` rows within the strip budget
       of :func:`~fastcl.ops.configs.one_pass_cpu_blocks` (fewer rows make the dk
       product memory-bound).

    ``FASTCL_BACKWARD=one_pass`` (as ``backward_strategy="one_pass"`` does) waives the
    cost rules, groups in 3 and 4; ``FASTCL_CPU_TILE_ROWS`` waives 4.
    """
    if not needs_grad or torch.compiler.is_exporting():
        return False
    forced = os.environ.get("FASTCL_BACKWARD", "")
    if forced and forced != "one_pass":
        return False
    if backend == "triton":
        if forced == "one_pass":
            return True
        if grouped:
            return False
        if x.dtype == torch.bfloat16:
            return x.shape[0] * n_cols <= ONE_PASS_BF16_MAX_LOGITS
        return x.dtype in (torch.float32, torch.float64)
    if forced == "one_pass" or os.environ.get("FASTCL_CPU_TILE_ROWS", ""):
        return True
    rows, _ = one_pass_cpu_blocks(x.shape[0], n_cols, n_grad_cols, x.shape[1], cpu_threads(), grouped)
    return rows >= ONE_PASS_MIN_ROWS

