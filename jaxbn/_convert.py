"""Converting a model built with its framework's own BatchNorm: the glue the four `convert` functions share.

`jaxbn.linen.convert`, `jaxbn.nnx.convert`, `jaxbn.equinox.convert` and
`jaxbn.haiku.convert` each turn the framework's layers into jaxbn's with the
same variables. What they share lives here: the check of the overrides
(unknown names are a `TypeError` when `convert` is called), the warning for
a model with nothing to convert, and `batch_mask`, the one way to give every
layer of a Linen or Haiku model a mask of the examples without editing the
model.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_BATCH_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jaxbn_batch_mask", default=None)


def check_overrides(overrides: Mapping[str, object], allowed: Collection[str], where: str) -> None:
    """Unknown override names are a TypeError that names them and lists the ones `where` takes.

    >>> check_overrides({"axis_nam": "batch"}, ("axis_name", "strategy"), "jaxbn.linen.convert")
    Traceback (most recent call last):
    TypeError: jaxbn.linen.convert got unknown override(s) ['axis_nam']; it takes ['axis_name', 'strategy']
    """
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unknown override(s) {unknown}; it takes {sorted(allowed)}")


def warn_no_layer(layer: str, where: str, when: str, stacklevel: int = 3) -> None:
    """The `UserWarning` of a `convert` that found nothing to convert."""
    warnings.warn(
        f"no {layer} found {when}: {where} converted nothing, and the model runs as it is (its own layers, "
        "if any, are jaxbn's already)",
        UserWarning,
        stacklevel=stacklevel,
    )


class FirstUse:
    """Whether a converted apply function has converted a layer yet; it warns once when a call converted none.

    A wrapped function is traced many times or, once jitted, run without
    tracing: a call that converts nothing is a problem only while no call
    ever has.

    >>> first = FirstUse("flax.linen.BatchNorm", "jaxbn.linen.convert")
    >>> first.done(converted=1)
    >>> first.done(converted=0)   # a jitted call that did not trace: no warning
    """

    def __init__(self, layer: str, where: str):
        self.layer, self.where = layer, where
        self.converted = False
        self.warned = False

    def done(self, converted: int) -> None:
        self.converted = self.converted or converted > 0
        if not (self.converted or self.warned):
            self.warned = True
            warn_no_layer(self.layer, self.where, "in the first call of the converted function", stacklevel=4)


@contextlib.contextmanager
def batch_mask(mask: ArrayLike) -> Iterator[jax.Array]:
    """Within the block, every jaxbn Linen and Haiku BatchNorm called without a mask uses `mask`.

    A mask of the examples, for a model you did not write (its layers are
    never passed one): padded examples, a last batch filled up to the
    compiled shape, uneven shards across devices. `mask` covers the
    *leading* axes of each layer's input, usually just the batch axis (shape
    ``(N,)``), and broadcasts over the rest: ``False`` examples are left out
    of every layer's statistics (they are still normalized). A layer called
    with its own `mask` keeps it. Under `jax.pmap` or `jax.shard_map` enter
    the block inside the mapped function, with the device's part of the mask.

    Enter it around the call that runs the model (inside the function you
    jit or differentiate: the layers read it while they are traced).

    Args:
      mask: a boolean (or 0/1 integer) array of at least one axis, the shape
        of the first axes of every batch-norm input.

    Returns:
      A context manager; it yields the mask as a boolean array.

    Raises:
      TypeError: a floating-point mask.
      ValueError: a scalar mask; inside the block, a layer whose input's
        leading axes do not have the mask's shape.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> model = nn.BatchNorm(use_running_average=False, momentum=0.0)     # flax's own layer
    >>> x = jnp.array([[1.0], [3.0], [100.0]])                            # the last example is padding
    >>> variables = model.init(jax.random.key(0), x)
    >>> apply = jaxbn.linen.convert(model.apply)
    >>> with jaxbn.linen.batch_mask(jnp.array([True, True, False])):
    ...     _, updates = apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["mean"].tolist(), updates["batch_stats"]["var"].tolist()
    ([2.0], [1.0])
    """
    m = jnp.asarray(mask)
    if jnp.issubdtype(m.dtype, jnp.inexact):
        raise TypeError(f"batch_mask takes a boolean mask of the examples, got dtype {m.dtype} with shape {m.shape}")
    if m.ndim == 0:
        raise ValueError("batch_mask takes a mask of the examples with at least one axis (shape (N,)), got a scalar")
    m = m if m.dtype == jnp.bool_ else m != 0
    token = _BATCH_MASK.set(m)
    try:
        yield m
    finally:
        _BATCH_MASK.reset(token)


def current_batch_mask(x_shape: Sequence[int], target: str = "x") -> jax.Array | None:
    """The mask of the enclosing `batch_mask`, shaped to broadcast to `x_shape` (None outside a block).

    >>> with batch_mask(jnp.array([True, False])):
    ...     current_batch_mask((2, 3, 4)).shape
    (2, 1, 1)
    """
    mask = _BATCH_MASK.get()
    if mask is None:
        return None
    shape = tuple(x_shape)
    if mask.ndim > len(shape) or mask.shape != shape[: mask.ndim]:
        raise ValueError(
            f"batch_mask's mask of shape {mask.shape} does not match the first axes of a batch norm's {target} of "
            f"shape {shape}; the mask covers the first (batch) axes of every layer's input"
        )
    return mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
