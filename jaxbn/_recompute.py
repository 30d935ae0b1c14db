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

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._accumulate import combine_moments
from jaxbn._checks import Axes, AxisIndexGroups, AxisName
from jaxbn._running import Moments, contributes
from jaxbn._stats import chan_combine, moments

#: Linen collection in which each layer sows its `BatchMoments` while
#: `jaxbn.linen.recompute_batch_stats` runs the model; its being mutable is
#: what puts the layers in collect mode.
PRECISE_COLLECTION = "jaxbn_precise_bn"


@dataclasses.dataclass(frozen=True)
class LayerMoments:
    """A layer's pooled batch moments for gradient accumulation, with the settings its update needs.

    A pytree whose one child is `moments` (a `jaxbn.Moments`); `momentum` and
    `unbiased` are static (pytree metadata), so the pool passes through
    `jax.jit` and `jax.lax.scan` and the step-boundary update
    (`jaxbn.commit_moments`) still knows each layer's settings.

    Attributes:
      moments: the pooled moments of the layer's input, feature shape.
      momentum: the layer's `momentum` (None: cumulative average).
      unbiased: the layer's `unbiased`.

    >>> import jax, jaxbn
    >>> pool = LayerMoments(jaxbn.empty_moments(3), momentum=0.9, unbiased=False)
    >>> [leaf.shape for leaf in jax.tree.leaves(pool)], jax.tree.structure(pool).node_data()[1]
    ([(3,), (3,), (3,)], (0.9, False))
    """

    moments: Moments
    momentum: float | None
    unbiased: bool


jax.tree_util.register_dataclass(LayerMoments, data_fields=["moments"], meta_fields=["momentum", "unbiased"])


def pool_into(pooled: Any, part: LayerMoments) -> LayerMoments:
    """`part` pooled into `pooled` (None: nothing yet): the reduce function of the modules' accumulation.

    >>> one = LayerMoments(Moments(jnp.ones(1), jnp.zeros(1), jnp.ones(1)), 0.9, False)
    >>> pool_into(pool_into(None, one), one).moments.count.tolist()
    [2.0]
    """
    if pooled is None:
        return part
    return LayerMoments(combine_moments(pooled.moments, part.moments), part.momentum, part.unbiased)


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
    return _stored(n, mean, m2, old_mean, old_var, unbiased=unbiased)


def precise_part(part: Moments) -> Moments:
    """`part` with every feature that could not update running statistics (no valid entry, inf/NaN) emptied.

    What precise BN pools batch by batch (`jaxbn.combine_moments`) in the
    Equinox and Haiku modules, as `population_stats` leaves such parts out.

    >>> precise_part(Moments(jnp.array([1.0, jnp.nan]), jnp.ones(2), jnp.full(2, 3.0))).count.tolist()
    [3.0, 0.0]
    """
    ok = contributes(part)
    return Moments(*(jnp.where(ok, v, jnp.zeros((), v.dtype)) for v in part))


def population_from_pool(
    pooled: Moments, old_mean: ArrayLike, old_var: ArrayLike, *, unbiased: bool
) -> tuple[jax.Array, jax.Array]:
    """`population_stats` from moments already pooled (by `precise_part` and `jaxbn.combine_moments`).

    >>> mean, var = population_from_pool(Moments(jnp.array([3.0]), jnp.array([5.0]), jnp.array([4.0])),
    ...                                  jnp.zeros(1), jnp.ones(1), unbiased=True)
    >>> mean.tolist(), var.tolist()
    ([3.0], [6.666666...])
    """
    var = jnp.asarray(pooled.var)
    n = jnp.asarray(pooled.count).astype(var.dtype)
    m2 = var * n
    return _stored(n, jnp.asarray(pooled.mean), m2, old_mean, old_var, unbiased=unbiased)


def _stored(
    n: jax.Array, mean: jax.Array, m2: jax.Array, old_mean: ArrayLike, old_var: ArrayLike, *, unbiased: bool
) -> tuple[jax.Array, jax.Array]:
    """The `(mean, var)` a layer stores from population `(n, mean, M2)`; features with n == 0 keep the old."""
    var = m2 / jnp.maximum(n - 1.0 if unbiased else n, 1.0)
    old_mean, old_var = jnp.asarray(old_mean), jnp.asarray(old_var)
    mean_dtype = old_mean.dtype
    if jnp.iscomplexobj(mean) and not jnp.iscomplexobj(old_mean):
        mean_dtype = mean.dtype
    valid = n > 0
    new_mean = jnp.where(valid, mean.astype(mean_dtype), old_mean.astype(mean_dtype))
    new_var = jnp.where(valid, var.astype(old_var.dtype), old_var)
    return new_mean, new_var
