"""Normalization: `normalize`, `batch_norm` and `batch_renorm`.

Each entry point validates its arguments, describes x once (`Layout`),
computes the batch moments once (`jaxbn._stats`), normalizes with the
training kernel (`jaxbn._kernel`) and folds the moments into the running
statistics (`jaxbn._running.update_stats`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._checks import (
    Axes,
    AxisIndexGroups,
    AxisName,
    Strategy,
    axis_size,
    check_epsilon,
    check_input,
    check_mask,
    check_momentum,
    check_renorm_clips,
    check_trainable,
    check_training,
)
from jaxbn._kernel import Reduction, affine, train_affine
from jaxbn._layout import Layout
from jaxbn._running import Moments, RunningStats, check_stats_type, stats_dtype, update_stats
from jaxbn._stats import moments_keepdims


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, broadcast on `axis`.

    Args:
      x: input, shape (..., features, ...), float or complex.
      mean: feature-shaped mean.
      var: feature-shaped variance.
      scale: optional feature-shaped scale (None: no scaling).
      bias: optional feature-shaped offset (None: no offset).
      axis: feature axis or tuple of feature axes.
      epsilon: added to `var`, > 0.
      dtype: output dtype (default: x's dtype). Arithmetic is done in at
        least float32.

    Returns:
      The normalized array, shape of `x`.

    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]), jnp.array([1.0]),
    ...                 epsilon=1e-6).round(3).tolist()
    [[-1.0], [1.0]]
    """
    x = check_input(x)
    check_epsilon(epsilon)
    lay = Layout.of(x.shape, axis)
    mean_, var_ = lay.check(mean, "mean"), lay.check(var, "var")
    scale_, bias_ = lay.check(scale, "scale"), lay.check(bias, "bias")
    assert mean_ is not None and var_ is not None
    return _normalize(x, lay, mean_, var_, scale_, bias_, epsilon, _out_dtype(x, dtype))


def _normalize(
    x: jax.Array, lay: Layout, mean: jax.Array, var: jax.Array, scale: jax.Array | None,
    bias: jax.Array | None, epsilon: float, out_dtype: np.dtype,
) -> jax.Array:
    mul = lax.rsqrt(var.astype(stats_dtype(var.dtype)) + epsilon)
    if scale is not None:
        mul = _scaled(mul, scale)
    return affine(x, lay.keep(mean), lay.keep(mul), lay.keep(bias), out_dtype)  # type: ignore[arg-type]


def _scaled(mul: jax.Array, scale: jax.Array) -> jax.Array:
    """`mul * scale` in the statistics dtype (complex if `scale` is), with no implicit promotion."""
    dt = stats_dtype(scale.dtype) if jnp.iscomplexobj(scale) else mul.dtype
    return mul.astype(dt) * scale.astype(dt)


def _out_dtype(x: jax.Array, dtype: DTypeLike | None) -> np.dtype:
    return x.dtype if dtype is None else np.dtype(dtype)


class _Prepared:
    """A validated call: x, its layout, stats, scale/bias and mask as arrays."""

    def __init__(
        self, x: ArrayLike, stats: RunningStats | None, scale: ArrayLike | None, bias: ArrayLike | None,
        axis: Axes, momentum: float | None, epsilon: float, mask: ArrayLike | None,
    ):
        self.x = check_input(x)
        check_momentum(momentum)
        check_epsilon(epsilon)
        self.lay = lay = Layout.of(self.x.shape, axis)
        fshape = lay.feature_shape
        self.running = stats is not None
        if stats is None:  # normalize_batch: no running statistics involved
            stats = RunningStats(jnp.zeros(fshape), jnp.ones(fshape), jnp.zeros((), jnp.int32))
        check_stats_type(stats)
        mean, var, count = stats
        hint = f"; build stats with jaxbn.init_stats({fshape if len(fshape) > 1 else fshape[0]})"
        mean_, var_ = lay.check(mean, "stats.mean", hint), lay.check(var, "stats.var", hint)
        assert mean_ is not None and var_ is not None
        self.stats = RunningStats(mean_, var_, jnp.asarray(count))
        self.scale, self.bias = lay.check(scale, "scale"), lay.check(bias, "bias")
        self.mask = check_mask(mask, self.x.shape)

    @classmethod
    def checked(
        cls, x: jax.Array, lay: Layout, stats: RunningStats, scale: jax.Array | None, bias: jax.Array | None,
        mask: jax.Array | None,
    ) -> _Prepared:
        """A call from arguments validated by the caller (the module core): nothing is checked again.

        `stats`, `scale` and `bias` are feature-shaped for `lay`, `mask` of
        x's rank (`check_mask`), `x` floating or complex.
        """
        call = cls.__new__(cls)
        call.x, call.lay, call.stats, call.scale, call.bias, call.mask = x, lay, stats, scale, bias, mask
        call.running = True
        return call

    def inference(self, epsilon: float, out_dtype: np.dtype) -> tuple[jax.Array, RunningStats]:
        s = self.stats
        return _normalize(self.x, self.lay, s.mean, s.var, self.scale, self.bias, epsilon, out_dtype), s

    def train(
        self, epsilon: float, axis_name: AxisName, groups: AxisIndexGroups, strategy: Strategy, out_dtype: np.dtype
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Training normalization with the batch moments: (y, count, mean, var), moments keepdims."""
        lay = self.lay
        if jnp.iscomplexobj(self.x):  # plain autodiff through the moments
            check_trainable(self.x.shape, lay.axis, lay.reduced_size, axis_name)
            n, mean, var = moments_keepdims(self.x, lay.reduced_axes, self.mask, axis_name, groups, strategy)
            mul = lax.rsqrt(var + epsilon)
            if self.scale is not None:
                mul = _scaled(mul, jnp.reshape(self.scale, lay.keep_shape))
            return affine(self.x, mean, mul, lay.keep(self.bias), out_dtype), n, mean, var
        over, n, mean, var = self.batch_moments(axis_name, groups, strategy)
        y = train_affine(self.x, self.mask, lay.keep(self.scale), lay.keep(self.bias), mean,
                         lax.rsqrt(var + epsilon), n, over=over, out_dtype=out_dtype)
        return y, n, mean, var

    def batch_moments(
        self, axis_name: AxisName, groups: AxisIndexGroups, strategy: Strategy
    ) -> tuple[Reduction, jax.Array, jax.Array, jax.Array]:
        """(reduction, count, mean, var) of the batch, keepdims, as constants (the kernel differentiates)."""
        check_trainable(self.x.shape, self.lay.axis, self.lay.reduced_size, axis_name)
        if axis_name is not None:
            axis_size(axis_name, groups)  # a clear NameError early
        over = Reduction(self.lay.reduced_axes, axis_name,
                         None if groups is None else tuple(tuple(g) for g in groups))
        # No tangent enters the moments' collective (an invariant all_gather
        # under shard_map has no eager transpose): the kernel's rule covers them.
        n, mean, var = moments_keepdims(lax.stop_gradient(self.x), self.lay.reduced_axes, self.mask,
                                        axis_name, groups, strategy)
        return over, n, mean, var

    def updated(
        self, n: jax.Array, mean: jax.Array, var: jax.Array, momentum: float | None, unbiased: bool
    ) -> RunningStats:
        lay = self.lay
        batch = Moments(lay.flat(mean), lay.flat(var), lay.flat(n))
        return update_stats(self.stats, lax.stop_gradient(batch), momentum=momentum, unbiased=unbiased)


def batch_norm(
    x: ArrayLike,
    stats: RunningStats,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    mask: ArrayLike | None = None,
    unbiased: bool = False,
    dtype: DTypeLike | None = None,
    strategy: Strategy = "auto",
) -> tuple[jax.Array, RunningStats]:
    """Batch normalization with explicit running statistics.

    `training=True` normalizes with the batch moments (gradients flow
    through them) and returns the stats updated as `update_stats` would;
    `training=False` normalizes with `stats.mean`/`stats.var` and returns
    `stats` unchanged. Same results as moments -> normalize -> update_stats.

    Args:
      x: input, shape (..., features, ...), float or complex.
      stats: `RunningStats` of the feature shape (`init_stats`).
      scale: optional feature-shaped scale (None: no scaling).
      bias: optional feature-shaped offset (None: no offset).
      training: use batch statistics and update `stats`; a Python bool
        (``None`` is a TypeError, not inference).
      axis: feature axis or tuple of feature axes (NCHW: `axis=1`).
      momentum: EMA decay in [0, 1] (flax convention; PyTorch 0.1 == 0.9),
        or None for the cumulative average.
      epsilon: added to the variance, > 0.
      axis_name: axis name(s) to synchronize the statistics across: a name
        or a tuple of names (a list is a TypeError: pass a tuple).
      axis_index_groups: `jax.lax.psum`'s groups (pmap only).
      mask: optional bool array broadcastable to `x`; False entries are left
        out of the statistics but still normalized.
      unbiased: store var * n / (n - 1) in the running variance (PyTorch).
      dtype: output dtype (default: x's dtype).
      strategy: cross-device combination, see `jaxbn.moments`.

    Returns:
      `(y, new_stats)`: y has x's shape. A feature whose batch moments are
      not finite (inf/NaN in the batch) keeps its running stats; an
      entirely masked or non-finite batch leaves `stats` as they were. An
      empty batch (N=0) is an entirely masked one: with `axis_name` an empty
      shard contributes nothing; without, training on it is the ValueError
      for fewer than two values per feature.

    The derivative is a closed form (`jaxbn._kernel`): two passes over the
    data in reverse mode and only `x` kept for the backward pass. Complex
    inputs are differentiated by plain autodiff through the moments.

    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, stats = jaxbn.batch_norm(x, jaxbn.init_stats(2), training=True, momentum=0.9)
    >>> y.round(2).tolist(), stats.mean.round(2).tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 0.4])
    """
    check_training(training)
    call = _Prepared(x, stats, scale, bias, axis, momentum, epsilon, mask)
    out_dtype = _out_dtype(call.x, dtype)
    if not training:
        return call.inference(epsilon, out_dtype)
    return train_norm(call, momentum, epsilon, axis_name, axis_index_groups, unbiased, strategy, out_dtype)


def normalize_batch(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
    strategy: Strategy = "auto",
) -> tuple[jax.Array, Moments]:
    """`batch_norm`'s training output without running statistics: `(y, batch moments)`.

    For modules whose running averages follow their framework's own rule
    (haiku's debiased EMA): the same closed-form kernel, one pass of moments,
    and the `Moments` to fold in (with `jaxbn._running.contributes` deciding
    which features may update). Arguments as in `batch_norm`.

    >>> import jax.numpy as jnp
    >>> y, m = normalize_batch(jnp.array([[1.0], [3.0]]), epsilon=1e-6)
    >>> y.round(3).tolist(), m.mean.tolist(), m.var.tolist()
    ([[-1.0], [1.0]], [2.0], [1.0])
    """
    call = _Prepared(x, None, scale, bias, axis, None, epsilon, mask)
    y, n, mean, var = call.train(epsilon, axis_name, axis_index_groups, strategy, _out_dtype(call.x, dtype))
    lay = call.lay
    return y, Moments(lay.flat(mean), lay.flat(var), lay.flat(n))


def batch_renorm(
    x: ArrayLike,
    stats: RunningStats,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    mask: ArrayLike | None = None,
    unbiased: bool = False,
    dtype: DTypeLike | None = None,
    strategy: Strategy = "auto",
) -> tuple[jax.Array, RunningStats]:
    """Batch Renormalization (Ioffe, 2017).

    With s_B = sqrt(batch var + eps) and s = sqrt(running var + eps)::

        r = stop_gradient(clip(s_B / s, 1 / r_max, r_max))
        d = stop_gradient(clip((batch mean - running mean) / s, -d_max, d_max))
        y = ((x - batch mean) / s_B * r + d) * scale + bias      (training)

    In inference it normalizes with the running stats. Running stats update
    as `update_stats` does with the batch moments. Arguments as in
    `batch_norm`, plus `r_max` >= 1 and `d_max` >= 0.

    Returns:
      `(y, new_stats)`.

    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, _ = jaxbn.batch_renorm(x, jaxbn.init_stats(1), training=True, r_max=1.0, d_max=0.0)
    >>> y.round(2).tolist()
    [[-1.0], [1.0]]
    """
    check_training(training)
    call = _Prepared(x, stats, scale, bias, axis, momentum, epsilon, mask)
    check_real(call.x)
    check_renorm_clips(r_max, d_max)
    out_dtype = _out_dtype(call.x, dtype)
    if not training:
        return call.inference(epsilon, out_dtype)
    return train_renorm(call, r_max, d_max, momentum, epsilon, axis_name, axis_index_groups, unbiased, strategy,
                        out_dtype)


def check_real(x: jax.Array) -> None:
    """Batch renorm's input must be real."""
    if jnp.iscomplexobj(x):
        raise TypeError(f"batch_renorm takes real inputs, got x of dtype {x.dtype}; use batch_norm for complex x")


def train_norm(
    call: _Prepared, momentum: float | None, epsilon: float, axis_name: AxisName, groups: AxisIndexGroups,
    unbiased: bool, strategy: Strategy, out_dtype: np.dtype,
) -> tuple[jax.Array, RunningStats]:
    """`batch_norm`'s training branch on a validated call."""
    y, n, mean, var = call.train(epsilon, axis_name, groups, strategy, out_dtype)
    return y, call.updated(n, mean, var, momentum, unbiased)


def train_renorm(
    call: _Prepared, r_max: float, d_max: float, momentum: float | None, epsilon: float, axis_name: AxisName,
    axis_index_groups: AxisIndexGroups, unbiased: bool, strategy: Strategy, out_dtype: np.dtype,
) -> tuple[jax.Array, RunningStats]:
    """`batch_renorm`'s training branch on a validated real call (clips checked)."""
    lay = call.lay
    over, n, mean, var = call.batch_moments(axis_name, axis_index_groups, strategy)
    rstd = lax.rsqrt(var + epsilon)
    run_mean = lax.stop_gradient(jnp.reshape(call.stats.mean, lay.keep_shape)).astype(mean.dtype)
    run_rstd = lax.stop_gradient(lax.rsqrt(jnp.reshape(call.stats.var, lay.keep_shape).astype(rstd.dtype) + epsilon))
    r = jnp.clip(run_rstd / rstd, 1.0 / r_max, r_max)
    d = jnp.clip((mean - run_mean) * run_rstd, -d_max, d_max)
    # y = x_hat * (scale * r) + (scale * d + bias): batch norm with an adjusted affine.
    s = lay.keep(call.scale)
    eff_scale = r if s is None else s.astype(r.dtype) * r
    eff_bias = d if s is None else s.astype(d.dtype) * d
    if call.bias is not None:
        eff_bias = eff_bias + jnp.reshape(call.bias, lay.keep_shape).astype(d.dtype)
    y = train_affine(call.x, call.mask, eff_scale, eff_bias, mean, rstd, n, over=over, out_dtype=out_dtype)
    return y, call.updated(n, mean, var, momentum, unbiased)
