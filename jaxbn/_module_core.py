"""The framework modules' forward pass, shared by the wrappers.

One copy, used by `jaxbn.linen`, `jaxbn.nnx` and `jaxbn.equinox`, on top
of the functional core (`jaxbn.batch_norm`,
`jaxbn.batch_renorm`, `jaxbn.normalize`): the renorm dispatch and the
flax-compatible handling of one value per feature. The dtype policy lives in
`jaxbn._dtypes`, ghost batches in `jaxbn._ghost`, precise BN in
`jaxbn._recompute`.
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxbn._checks import Axes, AxisIndexGroups, AxisName, check_mask, check_momentum, check_virtual_batch_size
from jaxbn._dtypes import output_dtype
from jaxbn._ghost import GhostBatches
from jaxbn._layout import Layout
from jaxbn._norm import batch_norm, batch_renorm, normalize
from jaxbn._running import RunningStats


class _TrainOptions(TypedDict, total=False):
    momentum: float | None
    epsilon: float
    axis_index_groups: AxisIndexGroups
    unbiased: bool
    dtype: DTypeLike


def check_options(*, momentum: object, virtual_batch_size: object) -> None:
    """Validates the module options that the functional core may not see before training.

    >>> check_options(momentum="0.9", virtual_batch_size=None)
    Traceback (most recent call last):
    TypeError: momentum must be a float in [0, 1] or None, got '0.9'
    """
    check_momentum(momentum)
    check_virtual_batch_size(virtual_batch_size)


def _train(
    x: jax.Array,
    stats: RunningStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName,
    renorm: tuple[float, float] | None,
    options: _TrainOptions,
) -> tuple[jax.Array, RunningStats]:
    """One training call of the functional core on canonical feature axes.

    `renorm` is None for batch norm, `(r_max, d_max)` for batch renorm.

    With one value per feature (and no `axis_name`) the core refuses to
    train; flax does not, so the input is seen twice along a new reduced
    axis: the moments (mean = x, var = 0), the output and its gradients are
    exactly those of the single value.
    """
    if axis_name is None and Layout.of(x.shape, axes).reduced_size <= 1:
        y2, new = _train(
            jnp.stack([x, x]), stats, scale, bias, axes=tuple(a + 1 for a in axes), mask=mask,
            axis_name=axis_name, renorm=renorm, options=options,
        )
        return y2[0], new
    if renorm is not None:
        r_max, d_max = renorm
        return batch_renorm(x, stats, scale, bias, training=True, axis=axes, axis_name=axis_name, mask=mask,
                            r_max=r_max, d_max=d_max, **options)
    return batch_norm(x, stats, scale, bias, training=True, axis=axes, axis_name=axis_name, mask=mask, **options)


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
    axis_index_groups: AxisIndexGroups,
    mask: ArrayLike | None,
    dtype: DTypeLike | None,
    renorm: bool,
    renorm_r_max: float,
    renorm_d_max: float,
    virtual_batch_size: int | None,
    unbiased: bool,
    inference_stats: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, RunningStats]:
    """A module's forward pass: `(y, new_stats)`.

    Args:
      x: float input (see `jaxbn._dtypes.as_float`), shape (..., features, ...).
      stats: the running statistics (`count` is ignored unless momentum is None).
      scale: feature-shaped parameter or None.
      bias: feature-shaped parameter or None.
      training: normalize with batch moments and return updated stats.
      initializing: flax's `init`: `axis_name` is not used and a ghost batch
        that does not divide the batch falls back to whole-batch moments.
        (The caller does not store the returned stats then.)
      axis: the feature axis or axes.
      momentum: EMA decay, or None for the cumulative average.
      epsilon: added to the variance.
      axis_name: the axis name(s) to synchronize the moments across.
      axis_index_groups: `jax.lax.psum`'s groups.
      mask: bool array broadcastable to `x`, or None.
      dtype: the module's output dtype (see `jaxbn._dtypes.output_dtype`).
      renorm: Batch Renormalization in training.
      renorm_r_max: the clip of renorm's r.
      renorm_d_max: the clip of renorm's d.
      virtual_batch_size: ghost batch size (see `jaxbn._ghost`), or None.
      unbiased: store the unbiased batch variance.
      inference_stats: (mean, var) to normalize with in inference, when the
        wrapper transforms them (NNX's `promote_dtype`); default `stats`.

    Returns:
      `(y, new_stats)`, `y` of x's shape; in inference `new_stats` is `stats`.

    >>> import jaxbn
    >>> y, new = forward(jnp.array([[0.0], [2.0]]), jaxbn.init_stats(1), None, None, training=True,
    ...                  initializing=False, axis=-1, momentum=0.5, epsilon=1e-5, axis_name=None,
    ...                  axis_index_groups=None, mask=None, dtype=None, renorm=False, renorm_r_max=3.0,
    ...                  renorm_d_max=5.0, virtual_batch_size=None, unbiased=False)
    >>> y.round(2).tolist(), new.mean.tolist(), new.var.tolist()
    ([[-1.0], [1.0]], [0.5], [1.0])
    """
    out_dtype = output_dtype(x, scale, bias, dtype)
    if not training:
        mean, var = inference_stats if inference_stats is not None else (stats.mean, stats.var)
        return normalize(x, mean, var, scale, bias, axis=axis, epsilon=epsilon, dtype=out_dtype), stats
    if initializing:
        axis_name = None
    layout = Layout.of(x.shape, axis)
    options = _TrainOptions(momentum=momentum, epsilon=epsilon, axis_index_groups=axis_index_groups,
                            unbiased=unbiased, dtype=out_dtype)
    clips = (renorm_r_max, renorm_d_max) if renorm else None
    checked_mask = check_mask(mask, x.shape)
    ghosts = GhostBatches.of(layout, virtual_batch_size, initializing)
    if ghosts is None:
        return _train(x, stats, scale, bias, axes=layout.feature_axes, mask=checked_mask, axis_name=axis_name,
                      renorm=clips, options=options)
    y, new = _train(ghosts.split(x), ghosts.tile_stats(stats), ghosts.tile(scale), ghosts.tile(bias),
                    axes=ghosts.axes, mask=ghosts.split_mask(checked_mask), axis_name=axis_name, renorm=clips,
                    options=options)
    return ghosts.merge(y, new, stats)
