"""Every fastcl name below its public API that the benchmarks use, in one place.

The benchmarks call fastcl through its public functions (``fastcl.info_nce``,
``fastcl.nt_xent`` with ``backend=...``). Three things have no public form yet, and are
reached here only: which backend ``backend="auto"`` picks at a size (recorded with each
result), the list of the Triton backward strategies and the strategy the default picks,
and how to force one strategy or the reference's chunk size (environment variables the
library reads at call time). When fastcl's internals move, this file is the one to
change; a lookup that fails returns None, so a result loses a label, never its numbers.
"""

from __future__ import annotations

import contextlib
import os

#: Forces the Triton backend's backward strategy under backward_strategy="auto" (read at
#: every call).
BACKWARD_ENV = "FASTCL_BACKWARD"
#: Logit elements per chunk of the chunked PyTorch backend (read at every call).
CHUNK_ENV = "FASTCL_CHUNK_ELEMENTS"


def backward_strategies() -> tuple[str, ...]:
    """The Triton backend's backward strategies, from the library (its one list)."""
    from fastcl.ops.configs import BACKWARD_STRATEGIES

    return tuple(BACKWARD_STRATEGIES)


def chosen_backend(backend: str, device, n_logits: int, needed: frozenset[str] = frozenset()) -> str | None:
    """The backend ``backend`` resolves to for a call with ``n_logits`` logits that needs
    the layout rules ``needed`` (fastcl.ops.dispatch.LAYOUT_FEATURES)."""
    try:
        from fastcl.backends import choose_backend

        return choose_backend(backend, device, n_logits, needed=needed)
    except Exception:
        return None


def chosen_backward(dtype, dim: int, device, grouped: bool = False) -> str | None:
    """The backward strategy the Triton backend runs for these inputs."""
    try:
        from fastcl.ops.configs import backward_strategy

        return backward_strategy(dtype, dim, device, grouped=grouped)
    except Exception:
        return None


def _set_environment(values: dict) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (or, for None, remove) environment variables inside the block."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def forced_backward(strategy: str | None):
    """Run the block with the Triton backward ``strategy`` (None: the library's choice)."""
    return environment(**{BACKWARD_ENV: strategy})
