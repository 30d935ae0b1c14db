"""Normalization: `normalize`, `batch_norm`, `batch_renorm` and the fused training kernel.

The training path normalizes with batch moments computed once (one fused
pass, `jaxbn._stats`) and differentiates through them with a closed-form
rule instead of autodiff through the reductions. The rule is a `custom_jvp`
whose tangent map is linear and wrapped in `jax.checkpoint`, so:

* forward mode (`jax.jvp`, `jax.hessian`) works;
* reverse mode is JAX's transpose of that linear map: two passes over the
  data (one reduction of `dy` and `dy * xhat`, one elementwise `dx`), one
  all-reduce when synchronized, and the only residual kept for the backward
  pass is `x` itself (1.0x the input's bytes) plus per-feature vectors;
  `xhat` is recomputed, not stored.

With x_hat = (x - mean) * r, r = 1 / sqrt(var + eps), w the mask and N the
global count, the tangent of y = scale * x_hat + bias is::

    dy = scale * r * (dx - sum(w dx) / N - x_hat * sum(w x_hat dx) / N)
         + dscale * x_hat + dbias
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._checks import (
    Axes,
    AxisName,
    axis_size,
    canonical_axes,
    check_epsilon,
    check_feature_array,
    check_input,
    check_mask,
    check_momentum,
    feature_shape,
    reduction_axes,
)
from jaxbn._running import Moments, RunningStats, update_stats
from jaxbn._stats import Strategy, moments_keepdims, stats_dtype


class _Layout:
    """Static facts about x: feature axes, reduced axes and shapes."""

    def __init__(self, x: jax.Array, axis: Axes):
        self.ndim = x.ndim
        self.shape = tuple(x.shape)
        self.axis = axis
        self.feat = canonical_axes(x.ndim, axis)
        self.red = reduction_axes(x.ndim, self.feat)
        self.fshape = feature_shape(x.shape, self.feat)
        self.kshape = tuple(x.shape[a] if a in self.feat else 1 for a in range(x.ndim))

    def keep(self, v: jax.Array | None) -> jax.Array | None:
        """Feature-shaped -> broadcastable against x."""
        return None if v is None else jnp.reshape(v, self.kshape)

    def flat(self, v: jax.Array) -> jax.Array:
        """Broadcastable against x -> feature-shaped."""
        return jnp.broadcast_to(v, self.kshape).reshape(self.fshape)

    def check(self, value: Any, name: str, hint: str = "") -> jax.Array | None:
        return check_feature_array(value, name, self.fshape, self.shape, self.axis, hint)


def _out_dtype(x: jax.Array, dtype: Any) -> Any:
    return x.dtype if dtype is None else jnp.dtype(dtype)


def _affine(x: jax.Array, mean: jax.Array, mul: jax.Array, bias: jax.Array | None, out_dtype: Any) -> jax.Array:
    """(x - mean) * mul + bias in the statistics dtype, cast to `out_dtype`."""
    dt = jnp.result_type(stats_dtype(x.dtype), mean.dtype, mul.dtype)
    y = (x.astype(dt) - mean.astype(dt)) * mul.astype(dt)
    if bias is not None:
        y = y + bias.astype(dt)
    if jnp.iscomplexobj(y) and not jnp.issubdtype(out_dtype, jnp.complexfloating):
        out_dtype = jnp.promote_types(out_dtype, jnp.complex64)
    return y.astype(out_dtype)


def normalize(
    x: jax.typing.ArrayLike,
    mean: jax.typing.ArrayLike,
    var: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> jax.Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, broadcast on `axis`.

    Args:
      x: input, shape (..., features, ...), float or complex.
      mean, var: feature-shaped statistics.
      scale, bias: optional feature-shaped affine parameters.
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
    lay = _Layout(x, axis)
    mean_, var_ = lay.check(mean, "mean"), lay.check(var, "var")
    scale_, bias_ = lay.check(scale, "scale"), lay.check(bias, "bias")
    assert mean_ is not None and var_ is not None
    mul = lax.rsqrt(var_.astype(stats_dtype(var_.dtype)) + epsilon)
    if scale_ is not None:
        mul = mul * scale_
    return _affine(x, lay.keep(mean_), lay.keep(mul), lay.keep(bias_), _out_dtype(x, dtype))  # type: ignore[arg-type]


def _fused_train(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    mean: jax.Array,
    rstd: jax.Array,
    count: jax.Array,
    *,
    red: tuple[int, ...],
    axis_name: AxisName,
    axis_index_groups: Any,
    out_dtype: Any,
) -> jax.Array:
    """y = (x - mean) * rstd * scale + bias where (mean, rstd) ARE x's batch statistics.

    `mean`, `rstd`, `count` (keepdims) must be the batch statistics of `x`
    (stop-gradiented); the custom JVP differentiates through them in closed form.
    """
    has_scale, has_bias = scale is not None, bias is not None
    s = scale if has_scale else jnp.ones_like(rstd)
    b = bias if has_bias else jnp.zeros_like(rstd)
    w = mask  # None: no mask, nothing materialized
    if jnp.iscomplexobj(x) or jnp.iscomplexobj(mean):
        # Complex inputs take plain autodiff through the moments (see _plain_train).
        raise AssertionError("complex inputs must use _plain_train")

    def tangent(x, w, mean, rstd, count, s, dx, ds, db):
        # dy = c * dx + (x - mean) * alpha + beta with per-feature c, alpha,
        # beta. Written so that its transpose (reverse mode) is two passes
        # over the data: alpha and beta transpose to the reductions
        # sum(g * (x - mean)) and sum(g) (the gradients of scale and bias come
        # out of the same sums), the sums of dx to one elementwise pass
        # dx = c * g + w * (a + (x - mean) * b). The two uses of x - mean are
        # spelled differently (x - mean, x + (-mean)) so that XLA does not
        # share, hence materialize, one full-size x - mean between them.
        # With low-precision x or y (bf16) the converts would be shared the
        # same way (and written out in f32): optimization barriers (free, no
        # copy) give each reduction its own convert of x and of the cotangent.
        dt = rstd.dtype
        xf = x.astype(dt)
        xb = xf if x.dtype == dt else lax.optimization_barrier(x).astype(dt)
        dxf = dx.astype(dt)
        wdx = dxf if w is None else jnp.where(w, dxf, jnp.zeros((), dt))
        sums = psum(jnp.stack([jnp.sum(wdx, red, keepdims=True), jnp.sum(wdx * (xf - mean), red, keepdims=True)]))
        inv_n = 1.0 / jnp.maximum(count, 1.0)
        c = s * rstd
        alpha = -c * rstd * rstd * sums[1] * inv_n
        if has_scale:
            alpha = alpha + ds * rstd
        beta = -c * sums[0] * inv_n
        if has_bias:
            beta = beta + db
        if jnp.dtype(out_dtype) == dt:
            return dxf * c + (xb + (-mean)) * alpha + beta
        # Summed in out_dtype: the transpose of each convert is then its own
        # convert of the cotangent, behind its own barrier. (A forward-mode
        # tangent is thus rounded per term: within ~1.5 ulp of out_dtype.)
        t_alpha, t_beta = lax.optimization_barrier(
            (((xb + (-mean)) * alpha).astype(out_dtype), jnp.broadcast_to(beta, x.shape).astype(out_dtype))
        )
        return (dxf * c).astype(out_dtype) + t_alpha + t_beta

    tangent_remat = jax.checkpoint(tangent)

    def psum(v):
        return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=axis_index_groups)

    @jax.custom_jvp
    def stats_of(x, w, mean, rstd, count):
        """Identity on (mean, rstd) whose derivative is theirs as functions of x.

        Used only for second and higher derivatives: at first order its
        tangent is never needed.
        """
        return mean, rstd

    @stats_of.defjvp
    def stats_of_jvp(primals, tangents):
        x, w, mean, rstd, count = primals
        mean_d, rstd_d = stats_of(x, w, mean, rstd, count)
        dx = tangents[0].astype(rstd.dtype)
        if w is not None:
            dx = jnp.where(w, dx, jnp.zeros((), rstd.dtype))
        centered = x.astype(rstd.dtype) - mean_d
        sums = psum(jnp.stack([jnp.sum(dx, red, keepdims=True), jnp.sum(centered * dx, red, keepdims=True)]))
        inv_n = 1.0 / jnp.maximum(count, 1.0)
        return (mean, rstd), (sums[0] * inv_n, -(rstd_d**3) * sums[1] * inv_n)

    @jax.custom_jvp
    def f(x, w, s, b, mean, rstd, count):
        return _affine(x, mean, rstd * s, b, out_dtype)

    @f.defjvp
    def f_jvp(primals, tangents):
        x, w, s, b, mean, rstd, count = primals
        dx, _, ds, db = tangents[:4]
        y = f(x, w, s, b, mean, rstd, count)
        # Tangents of mean/rstd/count are ignored: they are x's own statistics
        # (stop-gradiented by the caller) and the rule differentiates through
        # them; stats_of carries their dependence on x into higher orders.
        mean_d, rstd_d = stats_of(x, w, mean, rstd, count)
        return y, tangent_remat(x, w, mean_d, rstd_d, count, s, dx, ds, db)

    return f(x, w, s, b, lax.stop_gradient(mean), lax.stop_gradient(rstd), lax.stop_gradient(count))


def _plain_train(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    red: tuple[int, ...],
    epsilon: float,
    axis_name: AxisName,
    axis_index_groups: Any,
    strategy: Strategy,
    out_dtype: Any,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Training normalization by plain autodiff through the moments (complex inputs, reference)."""
    n, mean, var = moments_keepdims(x, red, mask, axis_name, axis_index_groups, strategy)
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = _affine(x, mean, mul, bias, out_dtype)
    return y, (lax.stop_gradient(n), lax.stop_gradient(mean), lax.stop_gradient(var))


def _prepare(
    x: Any, stats: RunningStats, scale: Any, bias: Any, axis: Axes, momentum: Any, epsilon: Any, mask: Any
) -> tuple[jax.Array, _Layout, RunningStats, Any, Any, jax.Array | None]:
    x = check_input(x)
    check_momentum(momentum)
    check_epsilon(epsilon)
    lay = _Layout(x, axis)
    if not isinstance(stats, RunningStats):
        if isinstance(stats, tuple) and len(stats) == 3:
            stats = RunningStats(*stats)
        else:
            raise TypeError(f"stats must be a jaxbn.RunningStats, got {type(stats).__name__}")
    hint = f"; build stats with jaxbn.init_stats({lay.fshape if len(lay.fshape) > 1 else lay.fshape[0]})"
    mean = lay.check(stats.mean, "stats.mean", hint)
    var = lay.check(stats.var, "stats.var", hint)
    stats = RunningStats(mean, var, jnp.asarray(stats.count))  # type: ignore[arg-type]
    scale_, bias_ = lay.check(scale, "scale"), lay.check(bias, "bias")
    return x, lay, stats, scale_, bias_, check_mask(mask, x.shape)


def _check_trainable(lay: _Layout, axis_name: AxisName) -> None:
    import math

    n = math.prod(lay.shape[a] for a in lay.red)
    if n <= 1 and axis_name is None:
        raise ValueError(
            f"training needs more than one value per feature, but x of shape {lay.shape} has "
            f"{n} per feature on axis={lay.axis!r}; use a larger batch, set axis_name to "
            "synchronize across devices, or training=False"
        )


def _batch_stats(
    x: jax.Array, lay: _Layout, mask: jax.Array | None, axis_name: AxisName, groups: Any, strategy: Strategy
) -> tuple[jax.Array, jax.Array, jax.Array]:
    if axis_name is not None:
        axis_size(axis_name, groups)  # clear NameError early
    # The fused rule differentiates through the moments itself: no tangent
    # need enter the moment collective (an invariant all_gather under
    # shard_map has no eager transpose).
    n, mean, var = moments_keepdims(lax.stop_gradient(x), lay.red, mask, axis_name, groups, strategy)
    return lax.stop_gradient(n), lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_norm(
    x: jax.typing.ArrayLike,
    stats: RunningStats,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    mask: jax.typing.ArrayLike | None = None,
    unbiased: bool = False,
    dtype: Any = None,
    strategy: Strategy = "auto",
    fused: bool = True,
) -> tuple[jax.Array, RunningStats]:
    """Batch normalization with explicit running statistics.

    `training=True` normalizes with the batch moments (gradients flow
    through them) and returns the stats updated as `update_stats` would;
    `training=False` normalizes with `stats.mean`/`stats.var` and returns
    `stats` unchanged. Same results as moments -> normalize -> update_stats.

    Args:
      x: input, shape (..., features, ...), float or complex.
      stats: `RunningStats` of the feature shape (`init_stats`).
      scale, bias: optional feature-shaped affine parameters.
      training: use batch statistics and update `stats`.
      axis: feature axis or tuple of feature axes (NCHW: `axis=1`).
      momentum: EMA decay in [0, 1] (flax convention; PyTorch 0.1 == 0.9),
        or None for the cumulative average.
      epsilon: added to the variance, > 0.
      axis_name: axis name(s) to synchronize the statistics across.
      axis_index_groups: `jax.lax.psum`'s groups (pmap only).
      mask: optional bool array broadcastable to `x`; False entries are left
        out of the statistics but still normalized.
      unbiased: store var * n / (n - 1) in the running variance (PyTorch).
      dtype: output dtype (default: x's dtype).
      strategy: cross-device combination, see `jaxbn.moments`.
      fused: use the closed-form derivative (default). False differentiates
        by plain autodiff through the moments (slower, more memory; the
        reference the fused path is tested against). Complex inputs always
        take the plain path.

    Returns:
      `(y, new_stats)`: y has x's shape.

    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, stats = jaxbn.batch_norm(x, jaxbn.init_stats(2), training=True, momentum=0.9)
    >>> y.round(2).tolist(), stats.mean.round(2).tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 0.4])
    """
    x, lay, stats, scale_, bias_, m = _prepare(x, stats, scale, bias, axis, momentum, epsilon, mask)
    out_dtype = _out_dtype(x, dtype)
    if not training:
        return normalize(x, stats.mean, stats.var, scale_, bias_, axis=axis, epsilon=epsilon, dtype=out_dtype), stats
    _check_trainable(lay, axis_name)
    if jnp.iscomplexobj(x) or not fused:
        if axis_name is not None:
            axis_size(axis_name, axis_index_groups)
        y, (n, mean, var) = _plain_train(
            x, lay.keep(scale_), lay.keep(bias_), m, red=lay.red, epsilon=epsilon, axis_name=axis_name,
            axis_index_groups=axis_index_groups, strategy=strategy, out_dtype=out_dtype,
        )
    else:
        n, mean, var = _batch_stats(x, lay, m, axis_name, axis_index_groups, strategy)
        rstd = lax.rsqrt(var + epsilon)
        y = _fused_train(
            x, lay.keep(scale_), lay.keep(bias_), m, mean, rstd, n,
            red=lay.red, axis_name=axis_name, axis_index_groups=axis_index_groups, out_dtype=out_dtype,
        )
    batch = Moments(lay.flat(mean), lay.flat(var), lay.flat(n))
    return y, update_stats(stats, batch, momentum=momentum, unbiased=unbiased)


def batch_renorm(
    x: jax.typing.ArrayLike,
    stats: RunningStats,
    scale: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    mask: jax.typing.ArrayLike | None = None,
    unbiased: bool = False,
    dtype: Any = None,
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
    x, lay, stats, scale_, bias_, m = _prepare(x, stats, scale, bias, axis, momentum, epsilon, mask)
    if jnp.iscomplexobj(x):
        raise TypeError(f"batch_renorm takes real inputs, got dtype {x.dtype}; use batch_norm for complex x")
    if not (isinstance(r_max, jax.core.Tracer) or float(r_max) >= 1.0):
        raise ValueError(f"r_max must be >= 1, got {r_max!r}")
    if not (isinstance(d_max, jax.core.Tracer) or float(d_max) >= 0.0):
        raise ValueError(f"d_max must be >= 0, got {d_max!r}")
    out_dtype = _out_dtype(x, dtype)
    if not training:
        return normalize(x, stats.mean, stats.var, scale_, bias_, axis=axis, epsilon=epsilon, dtype=out_dtype), stats
    _check_trainable(lay, axis_name)
    n, mean, var = _batch_stats(x, lay, m, axis_name, axis_index_groups, strategy)
    rstd = lax.rsqrt(var + epsilon)
    run_mean = lax.stop_gradient(jnp.reshape(stats.mean, lay.kshape))
    run_rstd = lax.stop_gradient(lax.rsqrt(jnp.reshape(stats.var, lay.kshape) + epsilon))
    r = jnp.clip(run_rstd / rstd, 1.0 / r_max, r_max)
    d = jnp.clip((mean - run_mean) * run_rstd, -d_max, d_max)
    s = lay.keep(scale_)
    # y = x_hat * (scale * r) + (scale * d + bias): batch norm with an adjusted affine.
    eff_scale = r if s is None else s * r
    eff_bias = d if s is None else s * d
    if bias_ is not None:
        eff_bias = eff_bias + jnp.reshape(bias_, lay.kshape)
    y = _fused_train(
        x, eff_scale, eff_bias, m, mean, rstd, n,
        red=lay.red, axis_name=axis_name, axis_index_groups=axis_index_groups, out_dtype=out_dtype,
    )
    batch = Moments(lay.flat(mean), lay.flat(var), lay.flat(n))
    return y, update_stats(stats, batch, momentum=momentum, unbiased=unbiased)
