"""Gaussian negatives (GS-InfoNCE): vectors drawn from N(0, I) on every call.

Eager calls draw with ``torch.randn``. A compiled graph cannot hold a
``torch.Generator``, and the compiler's own random numbers differ from eager ones, so
under torch.compile / torch.export the draw is an opaque operator,
``torch.ops.fastcl.gaussian_negatives``, that makes exactly the eager call on the same
generator (so the same numbers).
"""

from __future__ import annotations

import inspect

import torch


def draw_gaussian_negatives(count: int, dim: int, dtype: torch.dtype, device: torch.device,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` vectors from N(0, I) (GS-InfoNCE's negatives), always drawn in fp32 and
    then cast, so the same generator state gives the same vectors in every dtype."""
    return torch.randn(count, dim, dtype=torch.float32, device=device, generator=generator).to(dtype)


def generator_of(source, device: torch.device) -> torch.Generator | None:
    """The generator to draw from: ``source`` itself (a ``torch.Generator``, or None for
    PyTorch's global one), or, for a loss module with ``generator`` and ``seed``
    attributes (:class:`fastcl.InfoNCELoss`), its generator, made from its seed on
    ``device`` at the first draw."""
    if source is None or isinstance(source, torch.Generator):
        return source
    if source.generator is None and source.seed is not None:
        source.generator = torch.Generator(device=device)
        source.generator.manual_seed(source.seed)
    return source.generator


def gaussian_negatives(count: int, anchors: torch.Tensor, source) -> torch.Tensor | None:
    """``count`` Gaussian negatives in the anchors' dim, dtype and device (None for 0),
    drawn from ``source`` (see :func:`generator_of`)."""
    if not count:
        return None
    if torch.compiler.is_compiling():
        return torch.ops.fastcl.gaussian_negatives(anchors.detach(), count, _generator_slot(source))
    return _draw(count, anchors, generator_of(source, anchors.device))


def _draw(count: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device.type != like.device.type:
        raise ValueError(f"generator is on {generator.device} but anchors are on {like.device}")
    return draw_gaussian_negatives(count, like.shape[1], like.dtype, like.device, generator)


#: What compiled graphs draw from, by slot (id): a generator source (see generator_of).
#: Slot -1 is PyTorch's global generator. Filled while tracing only, so it holds the
#: sources of compiled graphs and no others.
_SOURCES: dict[int, object] = {}


@torch.compiler.assume_constant_result  # run for real while tracing; the graph keeps the int
def _generator_slot(source) -> int:
    if source is None:
        return -1
    _SOURCES[id(source)] = source
    return id(source)


# torch.library.custom_op takes tags from torch 2.5 on.
_SEEDED = ({"tags": (torch.Tag.nondeterministic_seeded,)}
           if "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("fastcl::gaussian_negatives", mutates_args=(), **_SEEDED)
def _gaussian_negatives_op(like: torch.Tensor, count: int, generator_slot: int) -> torch.Tensor:
    """``count`` x D draws on ``like``'s device and dtype from the source in the slot.

    Tagged nondeterministic_seeded so that the compiler never recomputes it in the
    backward (which would draw different numbers). Two draws with identical arguments
    in one compiled graph could still be merged by common-subexpression elimination;
    a loss makes one draw per call, from its own anchors."""
    if generator_slot != -1 and generator_slot not in _SOURCES:
        raise RuntimeError("this graph was traced in another process: the generator of its Gaussian negatives "
                           "does not exist here. Trace (or export) it again in this process.")
    source = None if generator_slot == -1 else _SOURCES[generator_slot]
    return _draw(count, like, generator_of(source, like.device))


@_gaussian_negatives_op.register_fake
def _(like: torch.Tensor, count: int, generator_slot: int) -> torch.Tensor:
    return like.new_empty((count, like.shape[1]))
