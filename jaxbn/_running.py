"""Running statistics: the explicit state of a batch-norm layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxbn._checks import check_momentum


def stats_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype statistics are computed in: at least float32 (complex kept), never a promotion error.

    >>> stats_dtype(jnp.bfloat16), stats_dtype(jnp.complex64)
    (dtype('float32'), dtype('complex64'))
    """
    dt = np.dtype(dtype)
    if jnp.issubdtype(dt, jnp.complexfloating):
        return np.dtype(np.complex128) if dt == np.complex128 else np.dtype(np.complex64)
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


class RunningStats(NamedTuple):
    """Running statistics of one batch-norm layer (a pytree of arrays).

    Attributes:
      mean: feature shape, float32 (complex64 once fed complex input), starts at 0.
      var: feature shape, float32, starts at 1.
      count: int32 scalar, the number of updates applied, starts at 0.

    It is a NamedTuple, so it passes through `jax.jit`, `jax.lax.scan` and
    optimizers' tree utilities as is.

    >>> import jax, jaxbn
    >>> stats = jaxbn.init_stats(4)
    >>> [leaf.shape for leaf in jax.tree_util.tree_leaves(stats)]
    [(4,), (4,), ()]
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, name fixed by the API


class Moments(NamedTuple):
    """Batch moments over the reduced axes (and devices), per feature.

    Attributes:
      mean: feature shape, float32 (complex for complex input).
      var: feature shape, float32: the biased (population) variance E|x - mean|^2.
      count: feature shape, float32: the number of entries reduced, all devices.

    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.moments(jnp.array([[0.0], [2.0], [4.0]]))
    >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
    ([2.0], [2.666666...], [3.0])
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, name fixed by the API


def init_stats(feature_shape: int | Sequence[int], dtype: DTypeLike = jnp.float32) -> RunningStats:
    """Fresh running statistics: mean 0, var 1, count 0.

    Args:
      feature_shape: number of features, or the feature shape for several feature axes.
      dtype: dtype of `mean` and `var` (default float32).

    Returns:
      A `RunningStats` with `mean` and `var` of shape `feature_shape`.

    >>> import jaxbn
    >>> stats = jaxbn.init_stats(3)
    >>> stats.mean.tolist(), stats.var.tolist(), int(stats.count)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    """
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise ValueError(f"feature_shape must be non-negative ints, got {feature_shape!r}")
    return RunningStats(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros((), jnp.int32),
    )


def _keep_where(updated: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` where `updated`, else `old` exactly.

    `old + zeros_like(new)` gives `old` the sharding of `new`: under Explicit
    mesh axes `select` refuses operands sharded differently (ghost batches
    over a sharded batch: per-group moments sharded, the old stats replicated).
    """
    return jnp.where(updated, new, old + jnp.zeros_like(new))


def contributes(moments: Moments) -> jax.Array:
    """Per feature: may this batch update running statistics? (some valid entry, finite mean and var)

    The one rule behind `update_stats` and the framework modules' own
    running averages (haiku's debiased EMA).

    >>> import jax.numpy as jnp
    >>> contributes(Moments(jnp.array([1.0, jnp.inf, 2.0]), jnp.ones(3), jnp.array([4.0, 4.0, 0.0]))).tolist()
    [True, False, False]
    """
    return (jnp.asarray(moments.count) > 0) & jnp.isfinite(moments.mean) & jnp.isfinite(moments.var)


def update_stats(
    stats: RunningStats, moments: Moments, *, momentum: float | None = 0.99, unbiased: bool = False
) -> RunningStats:
    """Folds one batch's moments into the running statistics.

    With `momentum` (the EMA decay, flax's convention; PyTorch's momentum is
    `1 - momentum`)::

        new = momentum * old + (1 - momentum) * batch

    With `momentum=None`, the cumulative average of all batches so far
    (PyTorch's `momentum=None`)::

        new = old + (batch - old) / (count + 1)

    `unbiased=True` stores `var * n / (n - 1)` (PyTorch's running_var rule).

    Nothing can poison the state: a feature whose batch has no valid entry
    (`moments.count == 0`) or whose batch mean or variance is not finite
    (inf/NaN, e.g. an overflowing mixed-precision step that the optimizer
    will skip) keeps its old `mean` and `var`. `count` goes up by one only
    when at least one feature was updated, so an entirely masked or entirely
    non-finite batch is a no-op and `momentum=None` stays the exact average
    of the batches that contributed. `stats` is not modified; the result
    keeps the dtypes of `stats` (a complex batch mean makes `mean` complex).

    Args:
      stats: the current `RunningStats`, feature shape (F...).
      moments: batch `Moments` with the same feature shape.
      momentum: EMA decay in [0, 1], or None for the cumulative average.
      unbiased: store the unbiased batch variance.

    Returns:
      The updated `RunningStats`.

    Raises:
      ValueError: for a bad `momentum` or mismatched feature shapes.
      TypeError: for a non-numeric `momentum`.

    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.Moments(jnp.array([2.0, jnp.nan]), jnp.array([4.0, 1.0]), jnp.array([5.0, 5.0]))
    >>> new = jaxbn.update_stats(jaxbn.init_stats(2), m, momentum=0.5)
    >>> new.mean.tolist(), new.var.tolist(), int(new.count)
    ([1.0, 0.0], [2.5, 1.0], 1)
    """
    check_momentum(momentum)
    if stats.mean.shape != moments.mean.shape or stats.var.shape != moments.var.shape:
        raise ValueError(
            f"stats has feature shape {stats.mean.shape} but moments has {moments.mean.shape}; "
            "build stats with jaxbn.init_stats(feature_shape) for the same features"
        )
    n = jnp.asarray(moments.count).astype(jnp.float32)
    batch_mean, batch_var = moments.mean, moments.var.astype(jnp.float32)
    # Arithmetic in at least float32 whatever the stored dtype (bf16 stats stay bf16 on the way out).
    mean_dt = stats_dtype(batch_mean.dtype if jnp.iscomplexobj(batch_mean) else stats.mean.dtype)
    old_mean, old_var = stats.mean.astype(mean_dt), stats.var.astype(jnp.float32)
    batch_mean = batch_mean.astype(mean_dt)
    if unbiased:
        batch_var = jnp.where(n > 1, batch_var * n / jnp.maximum(n - 1, 1), batch_var)
    if momentum is None:
        weight = 1.0 / (stats.count.astype(jnp.float32) + 1.0)
        new_mean = old_mean + (batch_mean - old_mean) * weight.astype(mean_dt)
        new_var = old_var + (batch_var - old_var) * weight
    else:
        new_mean = momentum * old_mean + (1.0 - momentum) * batch_mean
        new_var = momentum * old_var + (1.0 - momentum) * batch_var
    updated = contributes(moments)
    out_mean_dt = mean_dt if jnp.iscomplexobj(batch_mean) and not jnp.iscomplexobj(stats.mean) else stats.mean.dtype
    return RunningStats(
        mean=_keep_where(updated, new_mean, old_mean).astype(out_mean_dt),
        var=_keep_where(updated, new_var, old_var).astype(stats.var.dtype),
        count=jnp.asarray(stats.count) + jnp.any(updated).astype(jnp.asarray(stats.count).dtype),
    )
