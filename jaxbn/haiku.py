"""Haiku drop-in: `jaxbn.haiku.BatchNorm` replaces `haiku.BatchNorm`.

Same constructor, call, parameters (`scale`, `offset`) and state
(`mean_ema`/`var_ema`, each with `counter`, `hidden`, `average`: haiku's
zero-debiased exponential moving average), under the same module names, so
haiku checkpoints load unchanged in both directions. Swapping the import is
the whole migration::

    import jaxbn.haiku
    bn = jaxbn.haiku.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)

The statistics come from jaxbn's functional core (`jaxbn.moments`,
`jaxbn.normalize`) instead of haiku's ``E[x^2] - E[x]^2`` in the input dtype:

* stable variance: float32 ``1e4 + N(0, 1)`` gives the right variance, not a
  negative one and NaN outputs;
* statistics computed and stored in (at least) float32 for bf16/fp16 input;
  a state that a user has cast (say to bf16) keeps its dtype through updates;
* `cross_replica_axis` works under `jax.vmap(..., axis_name=...)` as well as
  `jax.pmap` and `jax.shard_map`, and replicas are weighted by their counts of
  valid entries (exact with uneven masks);
* `mask=` on `__call__`: False entries stay out of the statistics;
* a batch whose statistics are not finite (an overflowing mixed-precision
  step) or that is entirely masked leaves the moving averages alone.

Requires dm-haiku (``pip install jaxbn[haiku]``); `import jaxbn` does not
import it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn._checks import check_broadcast, check_mask
from jaxbn._dtypes import as_float, promote
from jaxbn._norm import normalize, normalize_batch
from jaxbn._running import contributes, stats_dtype
from jaxbn._stats import moments

__all__ = ["BatchNorm", "freeze"]


class _GuardedEMA(hk.ExponentialMovingAverage):
    """haiku's zero-debiased EMA (same state names), updated in float32 and skipping bad entries.

    With decay ``d`` and ``counter`` the number of updates applied::

        hidden = d * hidden + (1 - d) * value
        average = hidden / (1 - d ** counter)

    Entries where `valid` is False keep their `hidden` and `average`; the
    counter (one scalar) goes up only when at least one entry is valid, so
    an entirely skipped batch changes nothing. The update is computed in the
    dtype of `value` (float32 or wider) and stored in the dtype of the state
    it was given. As in haiku, `average` is created by the first update (so
    the state `init` returns holds the first batch's statistics); an entry
    not valid then starts at `empty` (0 for the mean, 1 for the variance:
    inference before any valid batch is then the identity).
    """

    def __init__(self, decay: float, *, empty: float, name: str | None = None):
        super().__init__(decay, name=name)
        self.empty = empty

    def __call__(  # type: ignore[override]
        self, value: jax.Array, update_stats: bool = True, *, valid: jax.Array | None = None
    ) -> jax.Array:
        value = jnp.asarray(value)
        if valid is None:
            valid = jnp.ones(value.shape, jnp.bool_)
        counter = hk.get_state("counter", (), jnp.int32, init=jnp.zeros)
        hidden = hk.get_state("hidden", value.shape, value.dtype, init=jnp.zeros)
        counter_new = counter + jnp.any(valid).astype(counter.dtype)
        decay = lax.convert_element_type(self.decay, value.real.dtype)
        one = jnp.ones((), decay.dtype)
        hidden_new = hidden.astype(value.dtype) * decay + value * (one - decay)
        debias = jnp.where(counter_new > 0, one - lax.pow(decay, counter_new), one)
        average_new = hidden_new / debias

        def first_average(shape: Sequence[int], dtype: jax.typing.DTypeLike) -> jax.Array:
            return jnp.where(valid, average_new, jnp.full(shape, self.empty, value.dtype)).astype(dtype)

        average = hk.get_state("average", value.shape, value.dtype, init=first_average)
        hidden_new = jnp.where(valid, hidden_new, hidden.astype(value.dtype)).astype(hidden.dtype)
        average_new = jnp.where(valid, average_new, average.astype(value.dtype)).astype(average.dtype)
        if update_stats:
            hk.set_state("counter", counter_new)
            hk.set_state("hidden", hidden_new)
            hk.set_state("average", average_new)
        return average_new


class BatchNorm(hk.Module):
    """Normalizes inputs to mean ~0 and stddev ~1: a drop-in for `haiku.BatchNorm`.

    Arguments, parameters, state and errors are haiku's (see the module
    docstring for what is fixed). With `is_training` the output is
    ``(x - mean) / sqrt(var + eps) * scale + offset`` with the batch's mean
    and biased variance over the reduced axes (and `cross_replica_axis`);
    otherwise with the moving averages (or, with `test_local_stats`, the
    batch's statistics without updating the averages).

    Args:
      create_scale: whether to create a trainable ``scale`` parameter.
      create_offset: whether to create a trainable ``offset`` parameter.
      decay_rate: decay of the moving averages (haiku's debiased EMA).
      eps: added to the variance.
      scale_init: initializer of ``scale`` (default ones); only with `create_scale`.
      offset_init: initializer of ``offset`` (default zeros); only with `create_offset`.
      axis: the axes to reduce (default: every axis but the channel axis).
      cross_replica_axis: a name or sequence of names bound by `jax.pmap`,
        `jax.shard_map` or `jax.vmap(..., axis_name=...)`: the statistics are
        those of the whole batch across them.
      cross_replica_axis_index_groups: `jax.lax.psum`'s groups (under `pmap`).
      data_format: ``"channels_last"`` / ``"N...C"`` or ``"channels_first"`` / ``"NC..."``.
      name: the module name (default ``batch_norm``, as haiku's).

    Parameters are shaped like the input with 1 on the reduced axes, in the
    input's dtype; the state holds float32 (or wider) statistics in that
    shape.

    >>> import haiku as hk, jax.numpy as jnp, jaxbn.haiku
    >>> f = hk.transform_with_state(lambda x, t: jaxbn.haiku.BatchNorm(True, True, 0.9)(x, t))
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> params, state = f.init(None, x, True)
    >>> y, state = f.apply(params, state, None, x, True)
    >>> y.round(2).tolist(), state["batch_norm/~/var_ema"]["average"].tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [[1.0, 100.0]])
    """

    def __init__(
        self,
        create_scale: bool,
        create_offset: bool,
        decay_rate: float,
        eps: float = 1e-5,
        scale_init: hk.initializers.Initializer | None = None,
        offset_init: hk.initializers.Initializer | None = None,
        axis: Sequence[int] | None = None,
        cross_replica_axis: Hashable | Sequence[Hashable] | None = None,
        cross_replica_axis_index_groups: Sequence[Sequence[int]] | None = None,
        data_format: str = "channels_last",
        name: str | None = None,
    ):
        super().__init__(name=name)
        # haiku's own checks and messages (the missing space is haiku's too).
        if not create_scale and scale_init is not None:
            raise ValueError("Cannot set `scale_init` if `create_scale=False`")
        if not create_offset and offset_init is not None:
            raise ValueError("Cannot set `offset_init` if `create_offset=False`")
        if cross_replica_axis is None and cross_replica_axis_index_groups is not None:
            raise ValueError(
                "`cross_replica_axis` name must be specifiedif `cross_replica_axis_index_groups` are used."
            )
        self.create_scale = create_scale
        self.create_offset = create_offset
        self.eps = eps
        self.scale_init = scale_init or jnp.ones
        self.offset_init = offset_init or jnp.zeros
        self.axis = axis
        self.cross_replica_axis = cross_replica_axis
        self.cross_replica_axis_index_groups = cross_replica_axis_index_groups
        self.channel_index = hk.get_channel_index(data_format)
        self.mean_ema = _GuardedEMA(decay_rate, empty=0.0, name="mean_ema")
        self.var_ema = _GuardedEMA(decay_rate, empty=1.0, name="var_ema")

    def _reduced_axes(self, ndim: int) -> tuple[int, ...]:
        if self.axis is None:
            channel = self.channel_index + ndim if self.channel_index < 0 else self.channel_index
            return tuple(i for i in range(ndim) if i != channel)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        for a in axes:
            if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
                raise ValueError(f"axis={self.axis!r} is out of range for inputs with {ndim} dimensions")
        return tuple(sorted({a % ndim for a in axes}))

    def __call__(
        self,
        inputs: jax.typing.ArrayLike,
        is_training: bool,
        test_local_stats: bool = False,
        scale: jax.typing.ArrayLike | None = None,
        offset: jax.typing.ArrayLike | None = None,
        *,
        mask: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Normalizes `inputs`.

        Args:
          inputs: array of shape (N, ..., C) (channels_last) or (N, C, ...).
          is_training: normalize with batch statistics and update the moving averages.
          test_local_stats: without `is_training`, normalize with the batch statistics
            (the moving averages are not updated).
          scale: array broadcastable to `inputs`; only without `create_scale`.
          offset: array broadcastable to `inputs`; only without `create_offset`.
          mask: optional bool array broadcastable to `inputs` (jaxbn's extra): False
            entries are left out of the statistics (they are still normalized).

        Returns:
          The normalized array, shape of `inputs`, in the dtype haiku gives
          (the promotion of the input and the scale/offset dtypes).
        """
        if self.create_scale and scale is not None:
            raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
        if self.create_offset and offset is not None:
            raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
        x = jnp.asarray(inputs)
        mask = check_mask(mask, x.shape, target="inputs")
        reduced = self._reduced_axes(x.ndim)
        w_shape = tuple(1 if i in reduced else d for i, d in enumerate(x.shape))
        x_float = as_float(x)  # integers promoted as haiku's jnp.mean promotes them
        sdt = stats_dtype(x_float.dtype)
        # The core wants >= 1 feature axis: with every axis reduced (or a
        # scalar input), a trailing feature axis of size 1 is added.
        feat = tuple(i for i in range(x.ndim) if i not in reduced)
        xs = x_float  # the core computes in >= float32 itself: no full-size float32 copy of a bf16 x
        if not feat:
            xs, feat = xs[..., None], (x.ndim,)
            mask = None if mask is None else mask[..., None]
        fshape = tuple(xs.shape[a] for a in feat)

        if self.create_scale:
            scale = hk.get_parameter("scale", w_shape, x.dtype, self.scale_init)
        if self.create_offset:
            offset = hk.get_parameter("offset", w_shape, x.dtype, self.offset_init)
        # haiku's output dtype: the promotion of the (float) input and the scale and offset
        # (Python scalars are weakly typed: they do not promote).
        params = (v for v in (scale, offset) if v is not None and not isinstance(v, int | float))
        out_dtype = promote(x_float.dtype, *(jnp.asarray(v).dtype for v in params))
        # Per-feature scale/offset (the module's own parameters) go into the kernel, so that the
        # normalized x is not kept for the backward pass; other call-time shapes are applied after.
        fused = xs.ndim == x.ndim and all(v is None or jnp.shape(v) == w_shape for v in (scale, offset))
        k_scale, k_offset = (scale, offset) if fused else (None, None)
        k_dtype = out_dtype if fused else sdt

        if is_training or test_local_stats:
            axis_name = self.cross_replica_axis or None
            if isinstance(axis_name, list):
                axis_name = tuple(axis_name)
            groups = self.cross_replica_axis_index_groups
            if axis_name is None and xs.size <= math.prod(fshape):
                # one value per feature: haiku normalizes it to 0 (var 0); the core's kernel refuses to train on it
                m = moments(xs, axis=feat, mask=mask)
                y = normalize(xs, m.mean, m.var, k_scale, k_offset, axis=feat, epsilon=self.eps, dtype=k_dtype)
            else:  # the closed-form kernel: one pass of moments, x the only full-size residual
                y, m = normalize_batch(xs, k_scale, k_offset, axis=feat, epsilon=self.eps, axis_name=axis_name,
                                       axis_index_groups=groups, mask=mask, dtype=k_dtype)
            if is_training:
                valid = contributes(m).reshape(w_shape)
                self.mean_ema(m.mean.reshape(w_shape), valid=valid)
                self.var_ema(m.var.reshape(w_shape), valid=valid)
        else:
            mean = self.mean_ema.average.astype(sdt).reshape(fshape)
            var = self.var_ema.average.astype(np.finfo(sdt).dtype).reshape(fshape)
            y = normalize(xs, mean, var, k_scale, k_offset, axis=feat, epsilon=self.eps, dtype=k_dtype)

        y = y.reshape(x.shape)
        if not fused:
            if scale is not None:
                y = y * check_broadcast(scale, "scale", x.shape, target="inputs").astype(y.dtype)
            if offset is not None:
                y = y + check_broadcast(offset, "offset", x.shape, target="inputs").astype(y.dtype)
        return y.astype(out_dtype)


def _frozen_call(
    affine: bool, next_f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: hk.MethodContext
) -> Any:
    """A method interceptor: a jaxbn BatchNorm call runs with `is_training=False` (see `freeze`)."""
    if not (isinstance(context.module, BatchNorm) and context.method_name == "__call__") or hk.running_init():
        return next_f(*args, **kwargs)  # `init` runs as written: haiku's averages are created by an update
    bound = inspect.signature(BatchNorm.__call__).bind(context.module, *args, **kwargs)
    bound.arguments["is_training"] = False
    bound.arguments["test_local_stats"] = False
    call_args = bound.args[1:]  # without `self`: next_f is the bound method
    if affine:
        return next_f(*call_args, **bound.kwargs)
    with hk.custom_getter(lambda next_getter, value, ctx: lax.stop_gradient(next_getter(value))):
        return next_f(*call_args, **bound.kwargs)


def freeze(fn: Callable[..., Any], *, affine: bool = True) -> Callable[..., Any]:
    """`fn` with every `jaxbn.haiku.BatchNorm` run on its moving averages: fine-tuning with frozen batch norms.

    torchvision's / detectron2's `FrozenBatchNorm2d` and praxis'
    `force_eval_mode`: inside the returned function every jaxbn BatchNorm
    call runs with `is_training=False` and `test_local_stats=False` whatever
    the model passes, so it normalizes with `mean_ema` / `var_ema` and never
    updates them; the rest of the model trains as asked. The averages are
    haiku state, which is not differentiated (`jax.grad` over the params).
    `haiku.BatchNorm` layers are not affected.

    Wrap the forward function *before* `hk.transform_with_state` (the
    layers are frozen while it runs inside the transform). `init` runs
    unfrozen, as haiku creates the averages with the first update; a
    pretrained model's state comes from its checkpoint anyway.

    Args:
      fn: a function that runs haiku modules (your forward function).
      affine: whether the layers' own `scale` and `offset` stay trainable
        (True) or get a zero gradient too (False).

    Returns:
      A function with `fn`'s signature.

    >>> import haiku as hk, jax, jax.numpy as jnp, jaxbn.haiku
    >>> def net(x, is_training):
    ...     return jaxbn.haiku.BatchNorm(True, True, 0.9)(x, is_training)
    >>> f = hk.transform_with_state(jaxbn.haiku.freeze(net))
    >>> params, state = f.init(None, jnp.array([[-1.0], [1.0]]), True)   # averages: mean 0, var 1
    >>> y, new_state = f.apply(params, state, None, jnp.array([[3.0], [5.0]]), True)
    >>> bool(jnp.allclose(y, jnp.array([[3.0], [5.0]]), atol=1e-4))
    True
    >>> jax.tree.all(jax.tree.map(jnp.array_equal, new_state, state))   # the averages are not updated
    True
    """

    @functools.wraps(fn)
    def frozen(*args: Any, **kwargs: Any) -> Any:
        with hk.intercept_methods(functools.partial(_frozen_call, affine)):
            return fn(*args, **kwargs)

    return frozen
