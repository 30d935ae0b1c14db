"""The framework modules' forward pass, shared by the wrappers.

One copy, used by `jaxbn.linen`, `jaxbn.nnx` and `jaxbn.equinox`, on top
of the functional core (`jaxbn.batch_norm`, `jaxbn.batch_renorm`,
`jaxbn.normalize`): the module options (`Options`, validated once when a
wrapper builds them), the renorm dispatch and the flax-compatible handling
of one value per feature. `forward` validates its input once and then
enters the functional core below its argument checks. The dtype policy
lives in `jaxbn._dtypes`, ghost batches in `jaxbn._ghost`, precise BN in
`jaxbn._recompute`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxbn._checks import (
    Axes,
    AxisIndexGroups,
    AxisName,
    Strategy,
    check_epsilon,
    check_input,
    check_momentum,
    check_renorm_clips,
    check_strategy,
    check_virtual_batch_size,
)
from jaxbn._dtypes import output_dtype
from jaxbn._ghost import GhostBatches
from jaxbn._layout import Layout
from jaxbn._norm import _normalize, _Prepared, check_real, train_norm, train_renorm
from jaxbn._running import RunningStats


def _as_tuple(value: object) -> object:
    """A list (or other non-string sequence) as a tuple, recursively: the options stay hashable."""
    if isinstance(value, Sequence) and not isinstance(value, str | tuple):
        value = tuple(value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


@dataclass(frozen=True)
class Options:
    """A batch-norm module's normalization options, validated once when built.

    Each wrapper builds one from its fields (Linen), attributes (NNX) or
    constructor arguments (equinox) and hands it to `forward`. The defaults
    are the modules' (flax's, plus jaxbn's renorm clips). Sequences are
    stored as tuples, so an `Options` is hashable (a static `jax.jit`
    argument).

    Attributes:
      axis: the feature axis or axes.
      momentum: EMA decay in [0, 1], or None for the cumulative average.
      epsilon: added to the variance, > 0.
      axis_name: the axis name(s) to synchronize the moments across.
      axis_index_groups: `jax.lax.psum`'s groups.
      dtype: the module's output dtype (see `jaxbn._dtypes.output_dtype`).
      renorm: Batch Renormalization in training.
      renorm_r_max: the clip of renorm's r, >= 1 (checked when `renorm`).
      renorm_d_max: the clip of renorm's d, >= 0 (checked when `renorm`).
      virtual_batch_size: ghost batch size (see `jaxbn._ghost`), or None.
      unbiased: store the unbiased batch variance.
      strategy: how synchronized moments cross devices (see
        `jaxbn.moments`).

    Raises:
      TypeError, ValueError: the argument checks of `jaxbn.batch_norm`
        (momentum, epsilon, renorm clips, strategy) and of
        `virtual_batch_size`.

    >>> Options(momentum="0.9")
    Traceback (most recent call last):
    TypeError: momentum must be a float in [0, 1] or None, got '0.9'
    >>> Options(axis=[1, 2], axis_index_groups=[[0, 1], [2, 3]]).axis_index_groups
    ((0, 1), (2, 3))
    """

    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    axis_name: AxisName = None
    axis_index_groups: AxisIndexGroups = None
    dtype: DTypeLike | None = None
    renorm: bool = False
    renorm_r_max: float = 3.0
    renorm_d_max: float = 5.0
    virtual_batch_size: int | None = None
    unbiased: bool = False
    strategy: Strategy = "auto"

    @classmethod
    def of(cls, module: object) -> Options:
        """The options from `module`'s attributes of the same names (the Linen and NNX modules)."""
        return cls(**{f.name: getattr(module, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        for name in ("axis", "axis_name", "axis_index_groups"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        check_momentum(self.momentum)
        check_epsilon(self.epsilon)
        check_virtual_batch_size(self.virtual_batch_size)
        check_strategy(self.strategy)
        if self.renorm:
            check_renorm_clips(self.renorm_r_max, self.renorm_d_max)


def forward(
    x: ArrayLike,
    stats: RunningStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    options: Options,
    training: bool,
    initializing: bool = False,
    mask: jax.Array | None = None,
    inference_stats: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, RunningStats]:
    """A module's forward pass: `(y, new_stats)`.

    `x`, the statistics and the parameters are validated here, once (the
    options when they were built, the mask by the wrapper), and the
    functional core is entered below its own checks.

    Args:
      x: float input (see `jaxbn._dtypes.as_float`), shape (..., features, ...).
      stats: the running statistics (`count` is ignored unless momentum is None).
      scale: feature-shaped parameter or None.
      bias: feature-shaped parameter or None.
      options: the module's options.
      training: normalize with batch moments and return updated stats.
      initializing: flax's `init`: `axis_name` is not used and a ghost batch
        that does not divide the batch falls back to whole-batch moments.
        (The caller does not store the returned stats then.)
      mask: None, or a mask the wrapper has checked with `check_mask` (bool,
        x's rank) and its own message.
      inference_stats: (mean, var) to normalize with in inference, when the
        wrapper transforms them (NNX's `promote_dtype`); default `stats`.

    Returns:
      `(y, new_stats)`, `y` of x's shape; in inference `new_stats` is `stats`.

    >>> import jaxbn
    >>> y, new = forward(jnp.array([[0.0], [2.0]]), jaxbn.init_stats(1), None, None,
    ...                  options=Options(momentum=0.5), training=True)
    >>> y.round(2).tolist(), new.mean.tolist(), new.var.tolist()
    ([[-1.0], [1.0]], [0.5], [1.0])
    """
    x = check_input(x)
    lay = Layout.of(x.shape, options.axis)
    mean, var = lay.check(stats.mean, "stats.mean"), lay.check(stats.var, "stats.var")
    assert mean is not None and var is not None
    stats = RunningStats(mean, var, jnp.asarray(stats.count))
    scale, bias = lay.check(scale, "scale"), lay.check(bias, "bias")
    out_dtype = output_dtype(x, scale, bias, options.dtype)
    if not training:
        if inference_stats is not None:
            mean, var = lay.check(inference_stats[0], "mean"), lay.check(inference_stats[1], "var")
            assert mean is not None and var is not None
        return _normalize(x, lay, mean, var, scale, bias, options.epsilon, out_dtype), stats
    if options.renorm:
        check_real(x)
    axis_name = None if initializing else options.axis_name
    ghosts = GhostBatches.of(lay, options.virtual_batch_size, initializing)
    if ghosts is None:
        return _train(x, lay, stats, scale, bias, mask, axis_name, options, out_dtype)
    grouped = ghosts.split(x)
    y, new = _train(grouped, Layout.of(grouped.shape, ghosts.axes), ghosts.tile_stats(stats), ghosts.tile(scale),
                    ghosts.tile(bias), ghosts.split_mask(mask), axis_name, options, out_dtype)
    return ghosts.merge(y, new, stats)


def _train(
    x: jax.Array,
    lay: Layout,
    stats: RunningStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    axis_name: AxisName,
    options: Options,
    out_dtype: np.dtype,
) -> tuple[jax.Array, RunningStats]:
    """One training call of the functional core on validated arguments.

    With one value per feature (and no `axis_name`) the core refuses to
    train; flax does not, so the input is seen twice along a new reduced
    axis: the moments (mean = x, var = 0), the output and its gradients are
    exactly those of the single value. An empty batch (no value per feature)
    returns an empty output and `stats` unchanged, as an all-masked batch
    leaves them.
    """
    if lay.reduced_size == 0:  # an empty batch is an all-masked one: nothing to normalize, stats unchanged
        return jnp.zeros(x.shape, out_dtype), stats
    if axis_name is None and lay.reduced_size == 1:
        twice = jnp.stack([x, x])
        y2, new = _train(
            twice, Layout.of(twice.shape, tuple(a + 1 for a in lay.feature_axes)), stats, scale, bias,
            None if mask is None else mask[None], axis_name, options, out_dtype,
        )
        return y2[0], new
    call = _Prepared.checked(x, lay, stats, scale, bias, mask)
    o = options
    if o.renorm:
        return train_renorm(call, o.renorm_r_max, o.renorm_d_max, o.momentum, o.epsilon, axis_name,
                            o.axis_index_groups, o.unbiased, o.strategy, out_dtype)
    return train_norm(call, o.momentum, o.epsilon, axis_name, o.axis_index_groups, o.unbiased, o.strategy,
                      out_dtype)
