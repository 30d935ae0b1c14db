"""Gradient accumulation: pooling batch moments, one running-stat update per optimizer step.

When one optimizer step is split into k micro-batches (`optax.MultiSteps`, a
`lax.scan` over micro-batches), updating the running statistics after every
micro-batch applies the momentum k times per step and feeds the running
variance k small-batch estimates. Instead, each micro-batch's `Moments` are
pooled with Chan et al.'s parallel formula (`jaxbn._stats.chan_combine`, the
one copy), which gives exactly the moments of the micro-batches taken
together, and the running statistics are updated once per step from the
pool (`commit_moments`). Normalization inside each micro-batch still uses
that micro-batch's moments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxbn._running import Moments, RunningStats, feature_shape_of, stats_dtype, update_stats
from jaxbn._stats import chan_combine


def empty_moments(feature_shape: int | Sequence[int], dtype: DTypeLike = jnp.float32) -> Moments:
    """The moments of no entries (count 0): the identity of `combine_moments`.

    Start a pool with it (a `lax.scan` carry, the state kept between an
    optimizer's micro-steps); `update_stats` leaves running statistics alone
    for it.

    Args:
      feature_shape: number of features, or the feature shape.
      dtype: dtype of `mean` (float32; complex64 for complex input).

    Returns:
      `Moments` with mean 0, var 0 and count 0, each of the feature shape.

    >>> import jaxbn
    >>> m = jaxbn.empty_moments(2)
    >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
    ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    """
    shape = feature_shape_of(feature_shape)
    dt = stats_dtype(dtype)
    real = np.dtype(jnp.finfo(dt).dtype)
    return Moments(mean=jnp.zeros(shape, dt), var=jnp.zeros(shape, real), count=jnp.zeros(shape, jnp.float32))


def _is_moments(x: object) -> bool:
    return isinstance(x, Moments)


def _pool(parts: Sequence[Moments], stacked: bool) -> Moments:
    """Chan's combination of `parts` (each one part, or a stack of parts on axis 0)."""
    feature_shapes = {tuple(jnp.shape(p.mean)[1:] if stacked else jnp.shape(p.mean)) for p in parts}
    for p in parts:
        shapes = {jnp.shape(p.mean), jnp.shape(p.var), jnp.shape(p.count)}
        if len(shapes) != 1:
            raise ValueError(
                "each Moments must have mean, var and count of one shape, got "
                f"mean {jnp.shape(p.mean)}, var {jnp.shape(p.var)}, count {jnp.shape(p.count)}"
            )
        if stacked and jnp.ndim(p.mean) == 0:
            raise ValueError("with stacked=True every Moments needs a leading axis of parts, got scalar leaves")
    if len(feature_shapes) != 1:
        what = "stacked moments (after the first axis)" if stacked else "moments"
        raise ValueError(
            f"combine_moments needs {what} of one feature shape, got {sorted(feature_shapes)}; pool the "
            "moments of one layer at a time"
        )
    mean_dt = functools.reduce(np.promote_types, [stats_dtype(jnp.result_type(p.mean)) for p in parts])
    var_dt = np.dtype(jnp.finfo(mean_dt).dtype)
    n = [jnp.asarray(p.count).astype(jnp.float32) for p in parts]
    means = [jnp.asarray(p.mean).astype(mean_dt) for p in parts]
    vars_ = [jnp.asarray(p.var).astype(var_dt) for p in parts]
    if not stacked:
        n, means, vars_ = ([v[None] for v in vs] for vs in (n, means, vars_))
    n_all, mean_all, var_all = (jnp.concatenate(vs) for vs in (n, means, vars_))
    # A part with no entry has nothing to say, whatever its mean and var hold.
    empty = n_all <= 0
    n_all = jnp.where(empty, jnp.zeros((), n_all.dtype), n_all)
    mean_all = jnp.where(empty, jnp.zeros((), mean_dt), mean_all)
    m2_all = jnp.where(empty, jnp.zeros((), var_dt), var_all * n_all.astype(var_dt))
    total, mean, m2 = chan_combine(n_all.astype(var_dt), mean_all, m2_all)
    var = m2 / jnp.maximum(total, jnp.ones((), var_dt))
    return Moments(mean=mean, var=var.astype(var_dt), count=total.astype(jnp.float32))


def combine_moments(*moments: Any, stacked: bool = False) -> Any:
    """Pools batch moments exactly: the moments of the batches taken together.

    Chan et al.'s parallel combination, each part weighted by its own
    per-feature count (so masked entries stay out, and a part with count 0
    changes nothing)::

        N = sum n_i,  mean = sum n_i mean_i / N,
        var = (sum n_i var_i + sum n_i |mean_i - mean|^2) / N

    The result equals `jaxbn.moments` of the concatenated batches (counts
    included, to float32 rounding), so `update_stats` with the pool is one
    update with the whole batch's moments: gradient accumulation's running
    statistics. A part whose mean or var is not finite makes the pooled
    feature non-finite, as the concatenated batch would, and `update_stats`
    then leaves that feature alone.

    Args:
      *moments: `Moments` of the same feature shape, or pytrees with `Moments`
        at the same places (one per layer, e.g. what the framework modules
        collect), pooled leaf by leaf.
      stacked: each `Moments` holds a stack of parts on its leading axis
        (what `jax.lax.scan` returns for per-micro-batch moments); all parts
        of all arguments are pooled.

    Returns:
      One `Moments` (or a pytree of them, the structure of the arguments) of
      the feature shape; count float32, mean/var in at least float32.

    Raises:
      ValueError: no argument, parts of different feature shapes, or pytrees
        of different structures.
      TypeError: an argument holds no `Moments`.

    >>> import jax.numpy as jnp, jaxbn
    >>> a = jaxbn.moments(jnp.array([[0.0], [2.0]]))
    >>> b = jaxbn.moments(jnp.array([[4.0], [6.0], [8.0]]))
    >>> m = jaxbn.combine_moments(a, b)
    >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
    ([4.0], [8.0], [5.0])
    """
    if not moments:
        raise ValueError("combine_moments needs at least one Moments to pool")
    if all(_is_moments(m) for m in moments):
        return _pool(moments, stacked)
    leaves = jax.tree.leaves(moments[0], is_leaf=_is_moments)
    if not leaves or not all(_is_moments(leaf) for leaf in leaves):
        raise TypeError(
            "combine_moments takes jaxbn.Moments or pytrees whose leaves are jaxbn.Moments, got "
            f"{type(moments[0]).__name__}"
        )
    structure: Any = jax.tree.structure(moments[0], is_leaf=_is_moments)
    for other in moments[1:]:
        if jax.tree.structure(other, is_leaf=_is_moments) != structure:
            raise ValueError(
                "combine_moments needs pytrees of one structure (the same layers), got "
                f"{structure} and {jax.tree.structure(other, is_leaf=_is_moments)}"
            )
    return jax.tree.map(lambda *parts: _pool(parts, stacked), *moments, is_leaf=_is_moments)


def check_apply(apply: ArrayLike) -> jax.Array | bool:
    """`apply` as a Python bool or a scalar bool array; anything else is a ValueError."""
    if isinstance(apply, bool):
        return apply
    flag = jnp.asarray(apply)
    if flag.shape != () or flag.dtype != jnp.bool_:
        raise ValueError(
            f"apply must be a bool or a scalar boolean array (e.g. optax.MultiSteps.has_updated(state)), "
            f"got dtype {flag.dtype} with shape {flag.shape}"
        )
    return flag


def commit_moments(
    stats: RunningStats,
    pooled: Moments,
    *,
    apply: ArrayLike = True,
    momentum: float | None = 0.99,
    unbiased: bool = False,
) -> tuple[RunningStats, Moments]:
    """The step boundary of gradient accumulation: one update from the pooled moments.

    Where `apply` is True, returns `update_stats(stats, pooled, ...)` and an
    empty pool (`empty_moments`) for the next optimizer step; where it is
    False, `(stats, pooled)` unchanged. `apply` may be traced, e.g.
    `optax.MultiSteps(...).has_updated(opt_state)` after the optimizer's
    update, so one jitted train step serves every micro-step.

    Args:
      stats: the running statistics, feature shape (F...).
      pooled: the pooled `Moments` of the step's micro-batches so far
        (`combine_moments`), same feature shape.
      apply: whether this is the step boundary (Python bool or a scalar bool
        array).
      momentum: as in `update_stats`.
      unbiased: as in `update_stats`.

    Returns:
      `(stats, pooled)` after the boundary: updated stats and an empty pool
      where `apply`, both unchanged otherwise.

    Raises:
      ValueError: `apply` is not a scalar bool, or as `update_stats`.

    >>> import jax.numpy as jnp, jaxbn
    >>> pool = jaxbn.combine_moments(jaxbn.moments(jnp.array([[0.0], [2.0]])),
    ...                              jaxbn.moments(jnp.array([[4.0], [6.0]])))
    >>> stats, pool = jaxbn.commit_moments(jaxbn.init_stats(1), pool, momentum=0.5)
    >>> stats.mean.tolist(), stats.var.tolist(), int(stats.count), pool.count.tolist()
    ([1.5], [3.0], 1, [0.0])
    """
    flag = check_apply(apply)
    new = update_stats(stats, pooled, momentum=momentum, unbiased=unbiased)
    empty = jax.tree.map(jnp.zeros_like, pooled)
    if isinstance(flag, bool):
        return (new, empty) if flag else (stats, pooled)

    def select(a: jax.Array, b: jax.Array) -> jax.Array:
        b = jnp.asarray(b)
        return jnp.where(flag, a, b.astype(jnp.result_type(a)) if jnp.iscomplexobj(a) else b)

    out_stats = RunningStats(*(select(a, b) for a, b in zip(new, stats, strict=True)))
    out_pool = Moments(*(select(a, b) for a, b in zip(empty, pooled, strict=True)))
    return out_stats, out_pool


def commit_layer(
    stats: RunningStats, pooled: Moments, *, apply: ArrayLike, momentum: float | None, unbiased: bool
) -> tuple[RunningStats, Moments]:
    """`commit_moments` for a module's layer, or for a stack of layers (`nn.scan`, `nnx.vmap`).

    A stack's `count` has the stack's leading axes of `stats.mean` (one count
    per layer): each layer is committed with its own count.

    >>> stats = RunningStats(jnp.zeros((2, 1)), jnp.ones((2, 1)), jnp.array([0, 1]))
    >>> pooled = Moments(jnp.full((2, 1), 4.0), jnp.zeros((2, 1)), jnp.ones((2, 1)))
    >>> new, _ = commit_layer(stats, pooled, apply=True, momentum=None, unbiased=False)
    >>> new.mean.tolist(), new.count.tolist()
    ([[4.0], [2.0]], [1, 2])
    """
    commit: Callable[..., tuple[RunningStats, Moments]]
    commit = functools.partial(commit_moments, apply=apply, momentum=momentum, unbiased=unbiased)
    stack_axes = jnp.ndim(stats.count)
    if 0 < stack_axes < jnp.ndim(stats.mean) and jnp.shape(stats.count) == jnp.shape(stats.mean)[:stack_axes]:
        for _ in range(stack_axes):
            commit = jax.vmap(commit)
    return commit(stats, pooled)
