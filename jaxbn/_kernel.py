"""The training kernel: `y = (x - mean) * rstd * scale + bias` where (mean, rstd) are x's own batch statistics.

Autodiff through the reductions would store the centred input and run
extra passes; instead `train_affine` is a `custom_jvp` with a closed-form,
linear tangent (`affine_tangent`) wrapped in `jax.checkpoint`, so:

* forward mode (`jax.jvp`, `jax.hessian`) works;
* reverse mode is JAX's transpose of that linear map: two passes over the
  data (one reduction of `g` and `g * (x - mean)`, one elementwise `dx`),
  one all-reduce when synchronized, and the only residual kept for the
  backward pass is `x` itself plus per-feature vectors (`x_hat` is
  recomputed, not stored);
* second and higher derivatives see the statistics' dependence on `x`
  through `statistics_of`, an identity with its own derivative.

With x_hat = (x - mean) * r, r = 1 / sqrt(var + eps), w the mask and N the
global count, the tangent of y = scale * x_hat + bias is::

    dy = scale * r * (dx - sum(w dx) / N - x_hat * sum(w x_hat dx) / N)
         + dscale * x_hat + dbias
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from jaxbn._checks import AxisName
from jaxbn._running import stats_dtype
from jaxbn._xla import broadcast_like, kept_apart, separate_converts, spelled_apart


@dataclass(frozen=True)
class Reduction:
    """What the batch statistics were reduced over: axes of `x`, and devices (static, hashable).

    Attributes:
      axes: the reduced axes of `x`.
      axis_name: the devices' axis name(s), or None.
      axis_index_groups: `lax.psum`'s groups, as tuples.
    """

    axes: tuple[int, ...]
    axis_name: AxisName | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None

    def sums(self, *vs: jax.Array) -> Sequence[jax.Array]:
        """Per-feature sums of each of `vs` over the reduced axes and the devices (keepdims).

        Across devices they are stacked into one all-reduce; on one device they
        stay separate (the transpose of a stack is a `pad` kernel per sum).
        """
        local = [jnp.sum(v, self.axes, keepdims=True) for v in vs]
        if self.axis_name is None:
            return local
        s = jnp.stack(local)
        groups = None if self.axis_index_groups is None else [list(g) for g in self.axis_index_groups]
        return lax.psum(s, self.axis_name, axis_index_groups=groups)


@dataclass(frozen=True)
class _Options:
    """The kernel's static configuration (hashable: it is a `custom_jvp` non-differentiable argument)."""

    over: Reduction
    out_dtype: np.dtype
    has_scale: bool
    has_bias: bool


def affine(
    x: jax.Array, mean: jax.Array, mul: jax.Array, bias: jax.Array | None, out_dtype: DTypeLike
) -> jax.Array:
    """`(x - mean) * mul + bias` computed in the statistics dtype and cast to `out_dtype`.

    All arrays broadcast against `x` (per-feature ones with reduced axes of
    size 1). A complex result keeps a complex dtype.
    """
    dt = stats_dtype(x.dtype)
    if jnp.iscomplexobj(mean) or jnp.iscomplexobj(mul):
        dt = stats_dtype(np.complex64 if dt != np.float64 else np.complex128)
    y = (x.astype(dt) - mean.astype(dt)) * mul.astype(dt)
    if bias is not None:
        y = y + bias.astype(dt)
    out = np.dtype(out_dtype)
    if jnp.iscomplexobj(y) and not jnp.issubdtype(out, jnp.complexfloating):
        out = stats_dtype(np.complex64)
    return y.astype(out)


def train_affine(
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    rstd: jax.Array,
    count: jax.Array,
    *,
    over: Reduction,
    out_dtype: DTypeLike,
) -> jax.Array:
    """Batch norm's training output with the closed-form derivative (real inputs).

    Args:
      x: input (..., F, ...), float.
      mask: bool, broadcastable to x, or None.
      scale, bias: per-feature (keepdims) or None.
      mean, rstd, count: x's batch statistics over `over` (keepdims),
        treated as functions of x by the derivative.
      over: what the statistics were reduced over.
      out_dtype: dtype of y.

    Returns:
      y, shape of x, dtype `out_dtype`.
    """
    opts = _Options(over, np.dtype(out_dtype), scale is not None, bias is not None)
    s = jnp.ones_like(rstd) if scale is None else scale.astype(rstd.dtype)
    b = jnp.zeros_like(rstd) if bias is None else bias.astype(rstd.dtype)
    stats = tuple(lax.stop_gradient(v) for v in (mean, rstd, count))
    return _train_affine(opts, x, mask, s, b, *stats)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_affine(
    opts: _Options, x: jax.Array, mask: jax.Array | None, s: jax.Array, b: jax.Array,
    mean: jax.Array, rstd: jax.Array, count: jax.Array,
) -> jax.Array:
    return affine(x, mean, rstd * s, b if opts.has_bias else None, opts.out_dtype)


@_train_affine.defjvp
def _train_affine_jvp(opts: _Options, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, mask, s, b, mean, rstd, count = primals
    dx, _, ds, db = tangents[:4]
    y = _train_affine(opts, x, mask, s, b, mean, rstd, count)
    # The tangents of mean/rstd/count are ignored: they are x's own statistics
    # (stop-gradiented by the caller) and the closed form differentiates
    # through them; statistics_of carries their dependence on x into higher orders.
    mean_d, rstd_d = statistics_of(opts.over, x, mask, mean, rstd, count)
    tangent = jax.checkpoint(affine_tangent, static_argnums=(0,))
    return y, tangent(opts, x, mask, mean_d, rstd_d, count, s, dx, ds, db)


def affine_tangent(
    opts: _Options, x: jax.Array, mask: jax.Array | None, mean: jax.Array, rstd: jax.Array, count: jax.Array,
    s: jax.Array, dx: jax.Array, ds: jax.Array, db: jax.Array,
) -> jax.Array:
    """The closed-form tangent `dy = c * dx + (x - mean) * alpha + beta` (module docstring).

    c, alpha, beta are per feature. Its transpose (reverse mode) is two
    passes over the data: alpha and beta transpose to the reductions
    sum(g * (x - mean)) and sum(g) (which are also the scale and bias
    gradients), the sums of dx to one elementwise pass. The two uses of
    `x - mean` and of the converts of `x` and of the cotangent are kept
    apart (`jaxbn._xla`) so that no full-size temporary is written.
    """
    dt = rstd.dtype
    xa, xb = separate_converts(x, dt)
    dxf = dx.astype(dt)
    wdx = dxf if mask is None else jnp.where(mask, dxf, jnp.zeros((), dt))
    sums = opts.over.sums(wdx, wdx * (xa - mean))
    inv_n = 1.0 / jnp.maximum(count, 1.0)
    c = s * rstd
    alpha = -c * rstd * rstd * sums[1] * inv_n
    if opts.has_scale:
        alpha = alpha + ds * rstd
    beta = -c * sums[0] * inv_n
    if opts.has_bias:
        beta = beta + db
    centred = spelled_apart(xb, mean)  # mean - x: the sign goes into alpha
    alpha = -alpha
    if opts.out_dtype == dt:
        return dxf * c + centred * alpha + beta
    # Summed in out_dtype: the transpose of each convert is then its own
    # convert of the cotangent, behind its own barrier. (A forward-mode
    # tangent is thus rounded per term: within ~1.5 ulp of out_dtype.)
    t_alpha, t_beta = kept_apart(
        ((centred * alpha).astype(opts.out_dtype), broadcast_like(beta, x).astype(opts.out_dtype))
    )
    return (dxf * c).astype(opts.out_dtype) + t_alpha + t_beta


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def statistics_of(
    over: Reduction, x: jax.Array, mask: jax.Array | None, mean: jax.Array, rstd: jax.Array, count: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Identity on (mean, rstd) whose derivative is theirs as functions of `x`.

    Needed only for second and higher derivatives: at first order its
    tangent is never used.
    """
    return mean, rstd


@statistics_of.defjvp
def _statistics_of_jvp(over: Reduction, primals: tuple, tangents: tuple) -> tuple[tuple, tuple]:
    x, mask, mean, rstd, count = primals
    mean_d, rstd_d = statistics_of(over, x, mask, mean, rstd, count)
    dx = tangents[0].astype(rstd.dtype)
    if mask is not None:
        dx = jnp.where(mask, dx, jnp.zeros((), rstd.dtype))
    centred = x.astype(rstd.dtype) - mean_d
    sums = over.sums(dx, centred * dx)
    inv_n = 1.0 / jnp.maximum(count, 1.0)
    return (mean, rstd), (sums[0] * inv_n, -(rstd_d**3) * sums[1] * inv_n)
