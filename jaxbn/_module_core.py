"""The maths shared by the Flax modules (`jaxbn.linen`, `jaxbn.nnx`).

One copy, used by both wrappers, on top of the functional core
(`jaxbn.batch_norm`, `jaxbn.batch_renorm`, `jaxbn.normalize`): the dtype
policy, ghost (virtual) batches, the renorm dispatch, the flax-compatible
handling of one value per feature, and the moments sown for
`recompute_batch_stats`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._checks import Axes, AxisName, canonical_axes, check_mask, check_momentum, feature_shape
from jaxbn._norm import batch_norm, batch_renorm, normalize
from jaxbn._running import RunningStats
from jaxbn._stats import moments

#: Linen collection in which each layer sows its batch moments while
#: `jaxbn.linen.recompute_batch_stats` runs the model.
PRECISE_COLLECTION = "jaxbn_precise_bn"

# Set while recompute_batch_stats traces the model: every jaxbn layer then
# normalizes with its batch moments, leaves its running stats alone and
# reports the moments of its input (Linen: sown into PRECISE_COLLECTION;
# NNX: appended to this dict under id(layer)).
_RECOMPUTE: contextvars.ContextVar[dict[int, list] | None] = contextvars.ContextVar("jaxbn_recompute", default=None)


@contextlib.contextmanager
def recomputing(sink: dict[int, list]) -> Iterator[dict[int, list]]:
    """Puts jaxbn's Flax layers in recompute mode while the body traces a model."""
    token = _RECOMPUTE.set(sink)
    try:
        yield sink
    finally:
        _RECOMPUTE.reset(token)


def recompute_sink() -> dict[int, list] | None:
    """The sink of the running `recompute_batch_stats`, or None outside it."""
    return _RECOMPUTE.get()


def as_float(x: Any) -> jax.Array:
    """`x` as an array; integer and bool inputs are promoted to float as flax does."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x


def output_dtype(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: Any) -> Any:
    """flax's rule: `dtype`, or the promotion of the input and parameter dtypes."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = jnp.result_type(*[a for a in (x, scale, bias) if a is not None])
    if not jnp.issubdtype(out, jnp.inexact):
        out = jnp.promote_types(out, jnp.float32)
    return out


def module_feature_shape(x: jax.Array, axis: Axes) -> tuple[int, ...]:
    """Feature shape of `x` for the feature axes `axis` (ascending axis order)."""
    return feature_shape(x.shape, canonical_axes(x.ndim, axis))


def check_options(*, momentum: Any, virtual_batch_size: Any) -> None:
    """Validates the module options that the functional core may not see before training."""
    check_momentum(momentum)
    if virtual_batch_size is not None and (
        isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1
    ):
        raise ValueError(f"virtual_batch_size must be None or an int >= 1, got {virtual_batch_size!r}")


def _core(
    x: jax.Array,
    stats: RunningStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName,
    renorm: bool,
    kwargs: dict[str, Any],
) -> tuple[jax.Array, RunningStats]:
    """One training call of the functional core on canonical feature axes.

    With one value per feature (and no `axis_name`) the core refuses to
    train; flax does not, so the input is seen twice along a new reduced
    axis: the moments (mean = x, var = 0), the output and its gradients are
    exactly those of the single value.
    """
    if axis_name is None and math.prod(d for a, d in enumerate(x.shape) if a not in axes) <= 1:
        y2, new = _core(
            jnp.stack([x, x]), stats, scale, bias, axes=tuple(a + 1 for a in axes), mask=mask,
            axis_name=axis_name, renorm=renorm, kwargs=kwargs,
        )
        return y2[0], new
    if renorm:
        return batch_renorm(x, stats, scale, bias, training=True, axis=axes, axis_name=axis_name, mask=mask, **kwargs)
    return batch_norm(x, stats, scale, bias, training=True, axis=axes, axis_name=axis_name, mask=mask, **kwargs)


def forward(
    x: jax.Array,
    stats: RunningStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    training: bool,
    initializing: bool,
    axis: Axes,
    momentum: float | None,
    epsilon: float,
    axis_name: AxisName,
    axis_index_groups: Any,
    mask: Any,
    dtype: Any,
    renorm: bool,
    renorm_r_max: float,
    renorm_d_max: float,
    virtual_batch_size: int | None,
    unbiased: bool,
    inference_stats: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, RunningStats]:
    """A module's forward pass: `(y, new_stats)`.

    Args:
      x: float input (see `as_float`).
      stats: the running statistics (`count` is ignored unless momentum is None).
      scale, bias: feature-shaped parameters or None.
      training: normalize with batch moments and return updated stats.
      initializing: flax's `init`: `axis_name` is not used and a ghost batch
        that does not divide the batch falls back to whole-batch moments.
        (The caller does not store the returned stats then.)
      inference_stats: (mean, var) to normalize with in inference, when the
        wrapper transforms them (NNX's `promote_dtype`); default `stats`.
      Others: the module fields of the same names.

    Returns:
      `(y, new_stats)`; in inference `new_stats` is `stats`.
    """
    out_dtype = output_dtype(x, scale, bias, dtype)
    if not training:
        mean, var = inference_stats if inference_stats is not None else (stats.mean, stats.var)
        return normalize(x, mean, var, scale, bias, axis=axis, epsilon=epsilon, dtype=out_dtype), stats
    if initializing:
        axis_name = None
    axes = canonical_axes(x.ndim, axis)
    kwargs: dict[str, Any] = dict(momentum=momentum, epsilon=epsilon, axis_index_groups=axis_index_groups,
                                  unbiased=unbiased, dtype=out_dtype)
    if renorm:
        kwargs.update(r_max=renorm_r_max, d_max=renorm_d_max)
    groups = _ghost_groups(x, axes, virtual_batch_size, initializing)
    if groups is None:
        return _core(x, stats, scale, bias, axes=axes, mask=check_mask(mask, x.shape), axis_name=axis_name,
                     renorm=renorm, kwargs=kwargs)
    # Ghost batch norm: (N, ...) -> (G, N/G, ...), the group axis an extra feature axis.
    n = x.shape[0]
    gshape = (groups, n // groups)
    xg = x.reshape(gshape + x.shape[1:])
    gaxes = (0,) + tuple(a + 1 for a in axes)
    fshape = (groups,) + feature_shape(x.shape, axes)
    m = check_mask(mask, x.shape)
    if m is not None:
        m = m.reshape((gshape if m.shape[0] == n else (1, 1)) + m.shape[1:])

    def tile(v: jax.Array | None) -> jax.Array | None:
        return None if v is None else jnp.broadcast_to(v, fshape)

    gstats = RunningStats(tile(stats.mean), tile(stats.var), stats.count)  # type: ignore[arg-type]
    yg, new = _core(xg, gstats, tile(scale), tile(bias), axes=gaxes, mask=m, axis_name=axis_name,
                    renorm=renorm, kwargs=kwargs)
    # update_stats is affine in the batch moments: the mean of the groups'
    # updated stats is the update with the mean of the groups' moments.
    return yg.reshape(x.shape), RunningStats(jnp.mean(new.mean, 0), jnp.mean(new.var, 0), new.count)


def _ghost_groups(x: jax.Array, axes: tuple[int, ...], size: int | None, initializing: bool) -> int | None:
    """Number of ghost batches, or None for whole-batch moments."""
    if size is None:
        return None
    if 0 in axes:
        raise ValueError(
            f"virtual_batch_size splits the leading batch axis of x, but axis 0 is a feature axis "
            f"(x has shape {x.shape}); put the batch first or set virtual_batch_size=None"
        )
    n = x.shape[0]
    if n % size:
        if initializing:
            return None
        raise ValueError(
            f"virtual_batch_size={size} must divide the batch size, but x of shape {x.shape} has "
            f"{n} entries on its leading batch axis; use a batch size that is a multiple of {size} "
            "(inference has no such requirement)"
        )
    groups = n // size
    return None if groups == 1 else groups


def precise_moments(x: jax.Array, *, axis: Axes, mask: Any, axis_name: AxisName, axis_index_groups: Any):
    """(count, mean, M2) of a layer's whole input, for `recompute_batch_stats`."""
    m = moments(x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    return m.count, m.mean, m.var * m.count


def combine_moments(parts: Iterable[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan's combination of (count, mean, M2) triples, in float64 on the host.

    Returns:
      (N, mean, M2) of the union: N = sum n_i, mean = sum n_i mean_i / N,
      M2 = sum M2_i + sum n_i |mean_i - mean|^2.
    """
    arrays = [tuple(np.asarray(p) for p in part[:3]) for part in parts]
    if not arrays:
        raise ValueError("no batch moments to combine")
    cplx = any(np.iscomplexobj(p[1]) for p in arrays)
    ft = np.complex128 if cplx else np.float64
    ns = [p[0].astype(np.float64) for p in arrays]
    total = np.sum(ns, axis=0)
    mean = np.sum([n * p[1].astype(ft) for n, p in zip(ns, arrays, strict=True)], axis=0) / np.maximum(total, 1.0)
    m2 = np.sum([p[2].astype(np.float64) + n * np.abs(p[1].astype(ft) - mean) ** 2
                 for n, p in zip(ns, arrays, strict=True)], axis=0)
    return total, mean, m2


def population_stats(
    parts: Iterable[Sequence[Any]], old_mean: Any, old_var: Any, *, unbiased: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Population (mean, var) of a layer's input from its sown moments.

    Features with no entries keep `old_mean` / `old_var`. With `unbiased`
    the variance is M2 / (N - 1).
    """
    total, mean, m2 = combine_moments(parts)
    var = m2 / np.maximum(total - 1.0 if unbiased else total, 1.0)
    old_mean, old_var = np.asarray(old_mean), np.asarray(old_var)
    valid = total > 0
    mean_dtype = np.result_type(old_mean.dtype, np.complex64 if np.iscomplexobj(mean) else np.float32)
    new_mean = np.where(valid, mean, old_mean).astype(mean_dtype)
    new_var = np.where(valid, var, old_var).astype(old_var.dtype)
    return new_mean, new_var
