"""Precise BN: population statistics of each layer's input over many batches.

The Flax wrappers' `recompute_batch_stats` run the model over the batches
with every jaxbn layer in *collect* mode (Linen: the collection
`PRECISE_COLLECTION` is mutable; NNX: the layers' `collect_moments`
attribute, set on a view by `nnx.with_attributes`). A collecting layer normalizes with its
batch moments, leaves its running statistics alone and reports the
`BatchMoments` of its input; `population_stats` merges every reported part
with Chan's formula (`jaxbn._stats.chan_combine`, the one copy) into the
statistics the layer stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._checks import Axes, AxisIndexGroups, AxisName
from jaxbn._running import Moments, contributes
from jaxbn._stats import chan_combine, moments

#: Linen collection in which each layer sows its `BatchMoments` while
#: `jaxbn.linen.recompute_batch_stats` runs the model; its being mutable is
#: what puts the layers in collect mode.
PRECISE_COLLECTION = "jaxbn_precise_bn"


class BatchMoments(NamedTuple):
    """What a layer reports about one call's input, per feature (all devices).

    Attributes:
      n: number of entries reduced (float32).
      mean: their mean (float32, complex64 for complex input).
      m2: the sum of their squared deviations from `mean`.
    """

    n: jax.Array
    mean: jax.Array
    m2: jax.Array


def batch_moments(
    x: jax.Array,
    *,
    axis: Axes,
    mask: ArrayLike | None,
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
) -> BatchMoments:
    """The `BatchMoments` of a layer's input (the same reduction as training).

    >>> batch_moments(jnp.array([[0.0], [2.0]]), axis=-1, mask=None, axis_name=None, axis_index_groups=None)
    BatchMoments(n=Array([2.], dtype=float32), mean=Array([1.], dtype=float32), m2=Array([2.], dtype=float32))
    """
    m = moments(x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return BatchMoments(m.count, m.mean, m.var * m.count)


def population_stats(
    parts: Sequence[BatchMoments], old_mean: ArrayLike, old_var: ArrayLike, *, unbiased: bool
) -> tuple[jax.Array, jax.Array]:
    """Population `(mean, var)` of every entry the `parts` describe, for a layer's running statistics.

    The parts are merged by Chan's formula, each feature of a part whose
    moments are not finite (inf/NaN in that batch) left out, as
    `update_stats` leaves it out; the variance is M2 / N, or
    M2 / (N - 1) with `unbiased`. Features no part counted keep `old_mean` /
    `old_var`. The mean keeps `old_mean`'s dtype (complex64 when the input was
    complex), the variance `old_var`'s.

    Raises:
      ValueError: `parts` is empty.

    >>> parts = [BatchMoments(jnp.array([2.0]), jnp.array([1.0]), jnp.array([2.0])),
    ...          BatchMoments(jnp.array([2.0]), jnp.array([5.0]), jnp.array([2.0]))]
    >>> mean, var = population_stats(parts, jnp.zeros(1), jnp.ones(1), unbiased=False)
    >>> mean.tolist(), var.tolist()
    ([3.0], [5.0])
    """
    if not parts:
        raise ValueError("no batch moments to combine")
    n, mean, m2 = (jnp.stack(v) for v in zip(*parts, strict=True))
    # A part that could not update running statistics (no valid entry, or inf/NaN in the
    # batch) is left out per feature, as update_stats leaves it out (m2 is finite iff var is).
    ok = contributes(Moments(mean, m2, n))
    n, mean, m2 = (jnp.where(ok, v, jnp.zeros((), v.dtype)) for v in (n, mean, m2))
    n, mean, m2 = chan_combine(n, mean, m2)
    var = m2 / jnp.maximum(n - 1.0 if unbiased else n, 1.0)
    old_mean, old_var = jnp.asarray(old_mean), jnp.asarray(old_var)
    mean_dtype = old_mean.dtype
    if jnp.iscomplexobj(mean) and not jnp.iscomplexobj(old_mean):
        mean_dtype = mean.dtype
    valid = n > 0
    new_mean = jnp.where(valid, mean.astype(mean_dtype), old_mean.astype(mean_dtype))
    new_var = jnp.where(valid, var.astype(old_var.dtype), old_var)
    return new_mean, new_var
