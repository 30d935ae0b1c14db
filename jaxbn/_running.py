"""Running statistics: the explicit state of a batch-norm layer."""

from __future__ import annotations

import numbers
import warnings
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


def narrow_float(dtype: DTypeLike) -> bool:
    """Whether `dtype` is a real float with fewer significand bits than float32 (bfloat16, float16, fp8).

    >>> narrow_float(jnp.bfloat16), narrow_float(jnp.float32)
    (True, False)
    """
    dt = np.dtype(dtype)
    return bool(jnp.issubdtype(dt, jnp.floating)) and jnp.finfo(dt).nmant < jnp.finfo(jnp.float32).nmant


def warn_narrow_state(dtype: DTypeLike, momentum: object, where: str) -> None:
    """Warns (UserWarning, once per trace) that a running state held in a narrow float stalls.

    An update rounds back to the old value whenever its step is below half
    an ulp of the state: with decay `momentum`, whenever the batch is within
    ``eps / (2 * (1 - momentum))`` (relative) of the running value, where
    `eps` is the dtype's machine epsilon (bfloat16 at 0.99: within 39%).
    """
    dt = np.dtype(dtype)
    eps = float(jnp.finfo(dt).eps)
    if isinstance(momentum, numbers.Real) and not isinstance(momentum, bool) and float(momentum) < 1.0:
        stall = f"at momentum={float(momentum):g} a batch within {eps / (2 * (1 - float(momentum))):.0%} " \
            "of the running value does not move it"
    else:
        stall = "a step smaller than half an ulp rounds back to the old value"
    warnings.warn(
        f"{where}: running statistics stored in {dt.name} (machine epsilon {eps:g}) stop moving: {stall}. "
        "Keep running statistics in float32 (the default) and cast them where they are used.",
        UserWarning,
        stacklevel=3,
    )


def feature_shape_of(feature_shape: int | Sequence[int]) -> tuple[int, ...]:
    """`feature_shape` (a count or a shape; Python or numpy ints) as a tuple of ints, or a ValueError."""
    try:
        dims: tuple[object, ...] = (feature_shape,) if _is_int(feature_shape) else tuple(feature_shape)  # type: ignore[arg-type]
    except TypeError:  # neither an int nor a sequence (a bool, a float)
        dims = (None,)
    if any((not _is_int(d)) or d < 0 for d in dims):  # type: ignore[operator]
        raise ValueError(f"feature_shape must be non-negative ints, got {feature_shape!r}")
    return tuple(int(d) for d in dims)  # type: ignore[call-overload]


def init_stats(feature_shape: int | Sequence[int], dtype: DTypeLike = jnp.float32) -> RunningStats:
    """Fresh running statistics: mean 0, var 1, count 0.

    Args:
      feature_shape: number of features, or the feature shape for several feature axes.
      dtype: a real floating dtype for `mean` and `var` (default float32;
        float64 under jax x64 is updated in float64). A dtype narrower than
        float32 (bfloat16, float16) warns: such a state stops moving once the
        EMA's steps fall below half its ulp (see `update_stats`).

    Returns:
      A `RunningStats` with `mean` and `var` of shape `feature_shape`.

    Raises:
      ValueError: `feature_shape` is not made of non-negative ints.
      TypeError: `dtype` is not a real floating dtype.

    >>> import jaxbn
    >>> stats = jaxbn.init_stats(3)
    >>> stats.mean.tolist(), stats.var.tolist(), int(stats.count)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    """
    shape = feature_shape_of(feature_shape)
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a floating dtype such as jnp.float32, got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"dtype must be a real floating dtype such as jnp.float32, got {dt.name}: integer running "
            "statistics would truncate every update (a complex mean comes from complex input by itself)"
        )
    if narrow_float(dt):
        warn_narrow_state(dt, None, "init_stats")
    return RunningStats(
        mean=jnp.zeros(shape, dt),
        var=jnp.ones(shape, dt),
        count=jnp.zeros((), jnp.int32),
    )


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


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
    (PyTorch's `momentum=None`), with `w = 1 / (count + 1)`::

        new = old + (batch - old) * w,  computed as  (1 - w) * old + w * batch

    Both are evaluated in the convex form, a weighted sum of two values of
    the same sign for the variance, so the result keeps the relative
    precision of its dtype at any magnitude: a batch variance of 1e-8 is
    stored as 1e-8 to float32 rounding, not as the ``0.0`` that
    ``1 + (1e-8 - 1) * 1`` gives in float32.

    `unbiased=True` stores `var * n / (n - 1)` (PyTorch's running_var rule).

    Nothing can poison the state: a feature whose batch has no valid entry
    (`moments.count == 0`) or whose batch mean or variance is not finite
    (inf/NaN, e.g. an overflowing mixed-precision step that the optimizer
    will skip) keeps its old `mean` and `var`. `count` goes up by one only
    when at least one feature was updated, so an entirely masked or entirely
    non-finite batch is a no-op and `momentum=None` stays the exact average
    of the batches that contributed (the moments of an empty batch, N=0,
    have count 0: it is a no-op too). `count` is one scalar: a feature that
    sits out a counted call keeps its value, and its next update still uses
    ``w = 1 / (count + 1)`` with the shared count (the rule above, applied
    call by call), which is not the plain average of that feature's own
    batches. (A `count` of the feature shape is also accepted and then
    counts per feature.)

    Precision: the arithmetic runs in at least float32, and in float64 when
    the state or the moments are float64 (jax x64). `stats` is not
    modified; the result keeps the dtypes of `stats` (a complex batch mean
    makes `mean` complex). A state held in bfloat16 or float16 is updated
    in float32 and rounded back, so a step below half its ulp is lost: with
    decay `m` the state stops moving once the batch is within
    ``eps / (2 * (1 - m))`` of it (bfloat16 at 0.99: within 39%). This
    warns (`UserWarning`) at trace time; keep running statistics in float32.

    Args:
      stats: the current `RunningStats`, feature shape (F...).
      moments: batch `Moments` with the same feature shape.
      momentum: EMA decay in [0, 1], or None for the cumulative average.
      unbiased: store the unbiased batch variance.

    Returns:
      The updated `RunningStats`.

    Raises:
      ValueError: for a bad `momentum` or mismatched feature shapes.
      TypeError: for a non-numeric `momentum`, or `stats` that is not a
        `RunningStats` (a `Moments` or a plain tuple).

    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.Moments(jnp.array([2.0, jnp.nan]), jnp.array([4.0, 1.0]), jnp.array([5.0, 5.0]))
    >>> new = jaxbn.update_stats(jaxbn.init_stats(2), m, momentum=0.5)
    >>> new.mean.tolist(), new.var.tolist(), int(new.count)
    ([1.0, 0.0], [2.5, 1.0], 1)
    """
    check_momentum(momentum)
    check_stats_type(stats)
    if not isinstance(moments, Moments):
        raise TypeError(
            f"moments must be a jaxbn.Moments (from jaxbn.moments), got {type(moments).__name__}"
        )
    if stats.mean.shape != moments.mean.shape or stats.var.shape != moments.var.shape:
        raise ValueError(
            f"stats has feature shape {stats.mean.shape} but moments has {moments.mean.shape}; "
            "build stats with jaxbn.init_stats(feature_shape) for the same features"
        )
    for leaf in (stats.mean, stats.var):
        if narrow_float(leaf.dtype):
            warn_narrow_state(leaf.dtype, momentum, "update_stats")
            break
    count = jnp.asarray(stats.count)
    if count.ndim and count.shape != stats.mean.shape:
        raise ValueError(
            f"stats.count must be a scalar (or of the feature shape {stats.mean.shape}), got shape {count.shape}"
        )
    batch_mean, batch_var = jnp.asarray(moments.mean), jnp.asarray(moments.var)
    # At least float32, float64 if the state or the moments are float64 (bf16 stats stay bf16 on the way out).
    var_dt = np.promote_types(stats_dtype(jnp.asarray(stats.var).dtype), stats_dtype(batch_var.real.dtype))
    mean_dt = np.promote_types(stats_dtype(jnp.asarray(stats.mean).dtype), stats_dtype(batch_mean.dtype))
    mean_dt = np.promote_types(mean_dt, var_dt)  # numpy and jax agree on {f32, f64, c64, c128}
    old_mean, old_var = jnp.asarray(stats.mean).astype(mean_dt), jnp.asarray(stats.var).astype(var_dt)
    batch_mean, batch_var = batch_mean.astype(mean_dt), batch_var.real.astype(var_dt)
    if unbiased:
        n = jnp.asarray(moments.count).astype(var_dt)
        batch_var = jnp.where(n > 1, batch_var * n / jnp.maximum(n - 1, 1), batch_var)
    if momentum is None:
        w = 1.0 / (count.astype(var_dt) + 1.0)  # exact for counts below 2^24 (2^53 in float64)
        keep = 1.0 - w
    elif isinstance(momentum, numbers.Real):
        keep, w = float(momentum), 1.0 - float(momentum)  # weakly typed: the state's dtype
    else:  # a (possibly traced) array
        keep = jnp.asarray(momentum).astype(var_dt)
        w = 1.0 - keep
    new_var = keep * old_var + w * batch_var
    if isinstance(keep, float):
        new_mean = keep * old_mean + w * batch_mean
    else:
        new_mean = keep.astype(mean_dt) * old_mean + w.astype(mean_dt) * batch_mean
    updated = contributes(moments)
    out_mean_dt = mean_dt if jnp.iscomplexobj(batch_mean) and not jnp.iscomplexobj(stats.mean) else stats.mean.dtype
    step = updated if count.ndim else jnp.any(updated)
    return RunningStats(
        mean=_keep_where(updated, new_mean, old_mean).astype(out_mean_dt),
        var=_keep_where(updated, new_var, old_var).astype(stats.var.dtype),
        count=count + step.astype(count.dtype),
    )


def check_stats_type(stats: object, name: str = "stats") -> None:
    """`stats` must be a `RunningStats`: a `Moments` or any other 3-tuple is refused.

    >>> check_stats_type(Moments(jnp.zeros(2), jnp.ones(2), jnp.ones(2)))
    Traceback (most recent call last):
    TypeError: stats must be a jaxbn.RunningStats (mean, var, count), got a jaxbn.Moments: ...
    """
    if isinstance(stats, RunningStats):
        return
    what = "a jaxbn.Moments: batch moments are folded in with jaxbn.update_stats(stats, moments)" if isinstance(
        stats, Moments) else f"{type(stats).__name__}"
    raise TypeError(
        f"{name} must be a jaxbn.RunningStats (mean, var, count), got {what}; "
        "build one with jaxbn.init_stats(features) or jaxbn.RunningStats(mean, var, count)"
    )
