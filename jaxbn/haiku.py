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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn._accumulate import check_apply, combine_moments, empty_moments
from jaxbn._checks import Strategy, check_broadcast, check_mask, check_strategy
from jaxbn._convert import FirstUse, batch_mask, check_overrides, current_batch_mask
from jaxbn._dtypes import promote
from jaxbn._norm import normalize, normalize_batch
from jaxbn._recompute import population_from_pool, precise_part
from jaxbn._running import Moments, contributes, narrow_float, stats_dtype, warn_narrow_state
from jaxbn._stats import moments

__all__ = ["BatchNorm", "accumulate", "batch_mask", "commit_moments", "convert", "freeze", "recompute_batch_stats"]

# A BatchNorm's own state bundle holds these while it pools moments (gradient accumulation, precise BN).
_POOL = ("pooled_mean", "pooled_var", "pooled_count")
_DECAY = "decay"  # the layer's decay_rate, for the update outside the transform
_CALLS = "calls"  # precise BN only: the number of calls, to find layers the batches never reached
_EMAS = ("/~/mean_ema", "/~/var_ema")


class _EMAStep(NamedTuple):
    """One step of haiku's zero-debiased EMA, before skipped entries are kept (`_ema_keep`)."""

    counter: jax.Array  # the new counter: up by one when some entry is valid
    hidden: jax.Array  # the new hidden value of every entry, as if it were valid
    average: jax.Array  # the new debiased average of every entry, as if it were valid
    debias: jax.Array  # 1 - decay ** counter
    fresh: jax.Array  # entries with no valid batch yet (counter 0, or a skip marked hidden -0.0)


def _ema_step(
    counter: jax.Array, hidden: jax.Array, value: jax.Array, valid: jax.Array, decay: jax.typing.ArrayLike
) -> _EMAStep:
    """haiku's zero-debiased EMA step, in the dtype of `value`; an entry skipped before its first valid
    batch (hidden marked -0.0, which haiku's rule never produces from its zero start) takes `value` exactly."""
    counter_new = counter + jnp.any(valid).astype(counter.dtype)
    decay = lax.convert_element_type(decay, value.real.dtype)
    one = jnp.ones((), decay.dtype)
    debias = jnp.where(counter_new > 0, one - lax.pow(decay, counter_new), one)
    old_hidden = hidden.astype(value.dtype)
    marked = (old_hidden == 0) & jnp.signbit(old_hidden.real)
    hidden_new = jnp.where(marked, value * debias, old_hidden * decay + value * (one - decay))
    average_new = jnp.where(marked, value, hidden_new / debias)
    return _EMAStep(counter_new, hidden_new, average_new, debias, _fresh(counter, old_hidden))


def _fresh(counter: jax.Array, hidden: jax.Array) -> jax.Array:
    """Entries with no valid batch yet: the counter is 0, or hidden is marked -0.0."""
    return (counter == 0) | ((hidden == 0) & jnp.signbit(hidden.real))


def _ema_keep(
    step: _EMAStep, valid: jax.Array, counter: jax.Array, hidden: jax.Array, average: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(hidden, average)` after `step`, in the state's dtypes: a skipped entry keeps its average, and its hidden
    is re-debiased to the new counter (-0.0 while it is still fresh); nothing valid at all is a no-op."""
    old_hidden, old_average = hidden.astype(step.hidden.dtype), average.astype(step.average.dtype)
    kept_hidden = jnp.where(step.fresh, -jnp.zeros_like(old_hidden), old_average * step.debias)
    kept_hidden = jnp.where(step.counter == counter, old_hidden, kept_hidden)
    hidden_new = jnp.where(valid, step.hidden, kept_hidden).astype(hidden.dtype)
    average_new = jnp.where(valid, step.average, old_average).astype(average.dtype)
    return hidden_new, average_new


def _keep(valid: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` where `valid`, else `old`, in the dtype of `old` (the state's)."""
    return jnp.where(valid, new, old.astype(new.dtype)).astype(old.dtype)


class _GuardedEMA(hk.ExponentialMovingAverage):
    """haiku's zero-debiased EMA (same state names), updated in float32 and skipping bad entries.

    With decay ``d`` and ``counter`` the number of updates applied::

        hidden = d * hidden + (1 - d) * value
        average = hidden / (1 - d ** counter)

    which is exactly haiku's for every entry that is valid in every update.
    haiku keeps one scalar `counter` per EMA, so an entry that is skipped
    (`valid` False: masked out or not finite) while others update cannot
    have a debias of its own. What the state allows is kept exact:

    * a skipped entry keeps its `average` exactly (inference reads only
      `average`), and its `hidden` is set to ``average * (1 - d ** counter)``
      so that haiku's invariant ``average = hidden / (1 - d ** counter)``
      still holds (haiku itself can go on training from the checkpoint);
    * an entry skipped before its first valid batch takes that batch's
      value exactly when it comes (as haiku's first update does): its
      `hidden` holds ``-0.0`` until then, a sign bit that haiku's own
      update never produces from its zero start;
    * afterwards, the entry is the debiased EMA of the sequence in which each
      skipped step holds the entry's running average at that step (and
      steps before its first valid batch hold that batch). What it cannot
      be is the debiased EMA of the entry's valid batches alone: that needs
      a counter per entry, which haiku's layout does not have. After ``s``
      skips in ``k`` updates, the next batch weighs ``(1 - d) / (1 - d ** (k + 1))``
      instead of ``(1 - d) / (1 - d ** (k + 1 - s))``.

    The counter (one scalar) goes up only when at least one entry is valid,
    so an entirely skipped batch changes nothing. The update is computed in
    the dtype of `value` (float32 or wider) and stored in the dtype of the
    state it was given (a bfloat16/float16 state warns: it stops moving).
    As in haiku, `average` is created by the first update (so the state
    `init` returns holds the first batch's statistics); an entry not valid
    then starts at `empty` (0 for the mean, 1 for the variance: inference
    before any valid batch is then the identity).
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
        if narrow_float(hidden.dtype):
            warn_narrow_state(hidden.dtype, self.decay, "jaxbn.haiku.BatchNorm")
        step = _ema_step(counter, hidden, value, valid, self.decay)
        counter_new, average_new = step.counter, step.average

        def first_average(shape: Sequence[int], dtype: jax.typing.DTypeLike) -> jax.Array:
            return jnp.where(valid, average_new, jnp.full(shape, self.empty, value.dtype)).astype(dtype)

        average = hk.get_state("average", value.shape, value.dtype, init=first_average)
        hidden_new, average_new = _ema_keep(step, valid, counter, hidden, average)
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
      strategy: how the statistics cross the devices of `cross_replica_axis`,
        as in `jaxbn.moments`: "auto" (default), "psum" or "gather" (jaxbn's,
        keyword only).

    Parameters are shaped like the input with 1 on the reduced axes, in the
    input's dtype; the state holds float32 (or wider) statistics in that
    shape (float64 under jax x64 for float64 or integer input, as haiku).

    Features skipped on their own (masked out, or inf/NaN in them) while
    others update: haiku's state has one scalar ``counter``, so a skipped
    feature keeps its ``average`` exactly (inference reads only that) and
    its ``hidden`` is re-debiased so that ``average = hidden / (1 - decay **
    counter)`` still holds; a feature skipped before its first valid batch
    takes that batch exactly. In general its ``average`` is the debiased EMA
    over the counted steps of its batch values, each skipped step holding
    its average as it stood then. It cannot be the debiased EMA of its valid
    batches alone (that needs a counter per feature): after ``s`` skips in
    ``k`` counted steps its next batch weighs ``(1 - d) / (1 - d ** (k + 1))``
    instead of ``(1 - d) / (1 - d ** (k + 1 - s))``. See docs/haiku.md.

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
        *,
        strategy: Strategy = "auto",
    ):
        super().__init__(name=name)
        check_strategy(strategy)
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
        self.strategy = strategy
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

    def _pooling(self) -> str | None:
        """"accumulate" or "precise" when the state holds this layer's pools (`accumulate`,
        `recompute_batch_stats`), else None."""
        # Read, not hk.get_state: asking for a missing state would add an empty entry to the state.
        bundle = hk.experimental.get_current_state().get(self.module_name, {})
        if _POOL[0] not in bundle:
            return None
        return "precise" if _CALLS in bundle else "accumulate"

    def _pool_moments(self, m: Moments, w_shape: tuple[int, ...], *, precise: bool) -> None:
        """Pools this call's moments into the state (Chan's combination) instead of updating the averages."""
        part = Moments(*(jax.lax.stop_gradient(v).reshape(w_shape) for v in m))
        if precise:
            part = precise_part(part)
            hk.set_state(_CALLS, hk.get_state(_CALLS) + 1)
        old = [hk.get_state(name) for name in _POOL]
        pooled = combine_moments(Moments(*old), part)
        for name, value, stored in zip(_POOL, pooled, old, strict=True):
            hk.set_state(name, value.astype(stored.dtype))
        hk.set_state(_DECAY, jnp.full_like(hk.get_state(_DECAY), self.mean_ema.decay))  # the state's dtype

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
            Without one, the mask of an enclosing `jaxbn.haiku.batch_mask` block.

        Returns:
          The normalized array, shape of `inputs`, in the dtype haiku gives
          (the promotion of the input and the scale/offset dtypes).
        """
        if self.create_scale and scale is not None:
            raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
        if self.create_offset and offset is not None:
            raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
        x = jnp.asarray(inputs)
        mask = check_mask(current_batch_mask(x.shape, "inputs") if mask is None else mask, x.shape, target="inputs")
        reduced = self._reduced_axes(x.ndim)
        w_shape = tuple(1 if i in reduced else d for i, d in enumerate(x.shape))
        # Integers and bools are promoted as haiku's jnp.mean promotes them: to the default float
        # (float64 under jax x64, so int64 input gives float64 output and statistics, as in haiku).
        x_float = x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))
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

        pooling = self._pooling()
        if pooling == "precise":  # recompute_batch_stats: every layer normalizes with its batch moments
            is_training = True
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
                                       axis_index_groups=groups, mask=mask, dtype=k_dtype, strategy=self.strategy)
            if is_training and pooling is not None:
                self._pool_moments(m, w_shape, precise=pooling == "precise")
            elif is_training:
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
    `haiku.BatchNorm` layers are not affected: convert them first,
    ``freeze(convert(forward))``.

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


def _layers(state: Mapping[str, Any]) -> list[str]:
    """The module names of the batch norms in a haiku state (bundles `name/~/mean_ema` and `name/~/var_ema`)."""
    names = [k[: -len(_EMAS[0])] for k in state if k.endswith(_EMAS[0])]
    return [n for n in names if n + _EMAS[1] in state and "average" in state[n + _EMAS[0]]]


def _no_layer(what: str) -> ValueError:
    return ValueError(
        f"the state has no batch norm to {what} (no 'name/~/mean_ema' and 'name/~/var_ema' entries): pass the "
        "state of a transformed function using jaxbn.haiku.BatchNorm, after init"
    )


def _empty_pool(state: Mapping[str, Any], name: str) -> dict[str, jax.Array]:
    """A layer's empty pool; `decay` has the shape of `counter` (one per layer of an `hk.layer_stack`) and the
    dtype of the statistics (float64 under jax x64)."""
    ema = state[name + _EMAS[0]]
    average = jnp.asarray(ema["average"])
    pool = dict(zip(_POOL, empty_moments(average.shape, average.dtype), strict=True))
    return {**pool, _DECAY: jnp.full(jnp.shape(ema["counter"]), jnp.nan, pool[_POOL[1]].dtype)}


def _per_layer(fn: Callable[..., Any], state: Mapping[str, Any], name: str) -> Callable[..., Any]:
    """`fn` of one layer's entries, mapped over the stack axes of an `hk.layer_stack` (the axes of `counter`)."""
    for _ in range(jnp.ndim(state[name + _EMAS[0]]["counter"])):
        fn = jax.vmap(fn)
    return fn


def _ema_entries(state: Mapping[str, Any], name: str) -> tuple[dict[str, jax.Array], ...]:
    return tuple({k: jnp.asarray(state[name + s][k]) for k in ("counter", "hidden", "average")} for s in _EMAS)


def accumulate(state: Mapping[str, Any], *, enable: bool = True) -> dict[str, Any]:
    """A haiku state in which every `jaxbn.haiku.BatchNorm` accumulates moments (or the usual state back).

    Gradient accumulation: applied with the returned state, a training layer
    normalizes with its micro-batch's moments as usual but leaves its moving
    averages alone and pools the moments of its input (Chan's combination,
    `jaxbn.combine_moments`) into its own state entry (``name`` beside
    ``name/~/mean_ema``); `commit_moments` updates the averages once per
    optimizer step. The state's structure stays the same from call to call
    (a `jax.lax.scan` carry, or beside an `optax.MultiSteps` state). Layers
    stacked by `hk.layer_stack` pool each on their own.
    `enable=False` removes the pools (commit first: pending moments are dropped).
    The state does not tell haiku's own `hk.BatchNorm` from jaxbn's: such a
    layer gets a pool it never uses (`commit_moments` leaves the layer alone)
    and goes on updating on every call; `convert` the model to accumulate it.

    Args:
      state: the state of a `hk.transform_with_state` function (after `init`).
      enable: accumulate (True) or return to the usual state (False).

    Returns:
      The new state (a dict; `state` is not modified).

    Raises:
      ValueError: if the state holds no batch norm.

    >>> import haiku as hk, jax.numpy as jnp, jaxbn.haiku
    >>> f = hk.transform_with_state(lambda x: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, True))
    >>> params, state = f.init(None, jnp.zeros((2, 1)))
    >>> acc = jaxbn.haiku.accumulate(state)
    >>> sorted(acc["batch_norm"])
    ['decay', 'pooled_count', 'pooled_mean', 'pooled_var']
    >>> sorted(jaxbn.haiku.accumulate(acc, enable=False)) == sorted(state)
    True
    """
    names = _layers(state)
    if not names:
        raise _no_layer("accumulate moments for")
    out = dict(state)
    for n in names:
        bundle = {k: v for k, v in state.get(n, {}).items() if k not in (*_POOL, _DECAY, _CALLS)}
        if enable:
            pooling = _POOL[0] in state.get(n, {}) and _CALLS not in state[n]
            bundle.update({k: state[n][k] for k in (*_POOL, _DECAY)} if pooling else _empty_pool(state, n))
        if bundle:
            out[n] = bundle
        else:
            out.pop(n, None)  # haiku's own layout has no entry for the layer itself
    return out


def commit_moments(state: Mapping[str, Any], *, apply: jax.typing.ArrayLike = True) -> dict[str, Any]:
    """The step boundary of gradient accumulation: one moving-average update per layer from its pooled moments.

    Every accumulating layer (see `accumulate`) folds its pooled moments into
    `mean_ema` and `var_ema` as one training call on the whole batch would
    (haiku's zero-debiased EMA with the layer's `decay_rate`; features with no
    valid entry or non-finite moments are left alone) and empties its pool.

    Args:
      state: the accumulating state.
      apply: whether this is the step boundary: a bool or a scalar bool array,
        e.g. ``optax.MultiSteps(...).has_updated(opt_state)``; where False
        the state comes back unchanged.

    Returns:
      The new (still accumulating) state; `state` is not modified.

    Raises:
      ValueError: if no layer accumulates in `state` (call `accumulate`).

    >>> import haiku as hk, jax.numpy as jnp, jaxbn.haiku
    >>> f = hk.transform_with_state(lambda x: jaxbn.haiku.BatchNorm(False, False, 0.5)(x, True))
    >>> params, state = f.init(None, jnp.zeros((2, 1)))
    >>> state = jaxbn.haiku.accumulate(state)
    >>> _, state = f.apply(params, state, None, jnp.array([[0.0], [2.0]]))
    >>> _, state = f.apply(params, state, None, jnp.array([[4.0], [6.0]]))
    >>> state = jaxbn.haiku.commit_moments(state)
    >>> state["batch_norm/~/mean_ema"]["average"].tolist(), state["batch_norm/~/var_ema"]["average"].tolist()
    ([[3.0]], [[5.0]])
    """
    flag = check_apply(apply)
    names = [n for n in _layers(state) if n in state and _POOL[0] in state[n] and _CALLS not in state[n]]
    if not names:
        raise ValueError("no batch norm accumulates moments in this state; pass jaxbn.haiku.accumulate(state)")

    def commit_layer(pool: dict[str, jax.Array], *emas: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
        pooled = Moments(*(pool[k] for k in _POOL))
        valid = contributes(pooled)
        out = []
        for ema, value in zip(emas, (pooled.mean, pooled.var), strict=True):
            step = _ema_step(ema["counter"], ema["hidden"], value, valid, pool[_DECAY])
            hidden, average = _ema_keep(step, valid, ema["counter"], ema["hidden"], ema["average"])
            out.append({"counter": step.counter, "hidden": hidden, "average": average})
        return out

    out = dict(state)
    for name in names:
        pool = state[name]
        emas = _ema_entries(state, name)
        new_emas = _per_layer(commit_layer, state, name)({k: jnp.asarray(pool[k]) for k in (*_POOL, _DECAY)}, *emas)
        for suffix, new, old in zip(_EMAS, new_emas, emas, strict=True):
            out[name + suffix] = {**state[name + suffix], **_where(flag, new, old)}
        empty = {k: jnp.zeros_like(pool[k]) for k in _POOL}
        out[name] = {**pool, **_where(flag, empty, {k: pool[k] for k in _POOL})}
    return out


def _where(flag: jax.Array | bool, new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    if isinstance(flag, bool):
        return new if flag else old
    return {k: jnp.where(flag, new[k], old[k]) for k in new}


def recompute_batch_stats(
    f: hk.TransformedWithState,
    params: hk.Params,
    state: hk.State,
    batches: Iterable[object],
    *,
    rng: jax.Array | None = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Replaces every BatchNorm layer's moving averages by its input's population statistics.

    "Precise BN", with `jaxbn.linen.recompute_batch_stats`'s semantics:
    ``f.apply(params, state, rng, *batch, **apply_kwargs)`` runs on every
    element of `batches` (a tuple is spread as positional arguments) with
    every `jaxbn.haiku.BatchNorm` normalizing with its batch moments
    (whatever `is_training` says) and leaving its averages alone; then each
    layer's `mean_ema` / `var_ema` ``average`` become the count-weighted mean
    of its input over every valid entry of every batch and the biased
    variance about it (the spread of the batch means counts too). Masks are
    respected; a batch whose moments are not finite is left out per feature;
    features no batch reached keep their ``average``. ``counter`` becomes the
    number of batches and ``hidden`` is set to match it (``average * (1 -
    decay ** counter)``, for the kept features too; one that never had a valid
    batch stays marked to take its next batch as it is), so later training
    continues haiku's EMA from there. Layers stacked by `hk.layer_stack` are
    recomputed each on its own; haiku's own `hk.BatchNorm` layers are left alone.

    Args:
      f: the `hk.transform_with_state` of a function using `jaxbn.haiku.BatchNorm`.
      params: its parameters (untouched).
      state: its state (not modified).
      batches: an iterable of inputs.
      rng: the `rng` passed to `f.apply`.
      **apply_kwargs: passed to every `f.apply` call.

    Returns:
      The new state (haiku's layout).

    Raises:
      ValueError: if the state holds no batch norm, `batches` is empty, or a
        jaxbn layer was never called.

    >>> import haiku as hk, jax.numpy as jnp, jaxbn.haiku
    >>> f = hk.transform_with_state(lambda x, training: jaxbn.haiku.BatchNorm(False, False, 0.9)(x, training))
    >>> params, state = f.init(None, jnp.zeros((2, 1)), True)
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
    >>> state = jaxbn.haiku.recompute_batch_stats(f, params, state, batches, training=False)
    >>> state["batch_norm/~/mean_ema"]["average"].tolist(), state["batch_norm/~/var_ema"]["average"].tolist()
    ([[3.0]], [[5.0]])
    """
    names = _layers(state)
    if not names:
        raise _no_layer("recompute")
    collecting = dict(state)
    for name in names:
        calls = jnp.zeros(jnp.shape(state[name + _EMAS[0]]["counter"]), jnp.int32)
        collecting[name] = {**state.get(name, {}), **_empty_pool(state, name), _CALLS: calls}
    haiku_layers: set[str] = set()  # haiku's own hk.BatchNorm layers: left alone

    def record(next_f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ctx: hk.MethodContext) -> Any:
        if isinstance(ctx.module, hk.BatchNorm) and ctx.method_name == "__call__":
            haiku_layers.add(ctx.module.module_name)
        return next_f(*args, **kwargs)

    def run(state: hk.State, args: tuple[object, ...]) -> hk.State:
        with hk.intercept_methods(record):
            return f.apply(params, state, rng, *args, **apply_kwargs)[1]

    run_jit = jax.jit(run)
    n_batches = 0
    for batch in batches:
        collecting = run_jit(collecting, batch if isinstance(batch, tuple) else (batch,))
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: recompute_batch_stats needs at least one batch")
    called = [n for n in names if np.all(np.asarray(collecting[n][_CALLS]) > 0)]
    missing = [n for n in names if n not in called and n not in haiku_layers]
    if missing:
        raise ValueError(
            f"the batch norm(s) {missing} were never called on the batches; recompute_batch_stats needs every "
            "layer to see the data"
        )

    def recompute_layer(pool: dict[str, jax.Array], *emas: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
        pooled = Moments(*(pool[k] for k in _POOL))
        mean, var = population_from_pool(pooled, emas[0]["average"], emas[1]["average"], unbiased=False)
        valid = pooled.count > 0
        out = []
        for ema, value in zip(emas, (mean, var), strict=True):
            counter, hidden = ema["counter"], ema["hidden"]
            debias = 1 - lax.convert_element_type(pool[_DECAY], value.real.dtype) ** n_batches
            # as if one EMA step had taken the population statistics: features no batch reached keep their
            # average, with hidden re-debiased to the new counter (still marked -0.0 if they never had a batch)
            step = _EMAStep(jnp.asarray(n_batches, counter.dtype), value * debias, value, debias,
                            _fresh(counter, hidden.astype(value.dtype)))
            hidden, average = _ema_keep(step, valid, counter, hidden, ema["average"])
            out.append({"counter": step.counter, "hidden": hidden, "average": average})
        return out

    out = dict(state)
    for name in called:
        pool = {k: jnp.asarray(collecting[name][k]) for k in (*_POOL, _DECAY)}
        new_emas = _per_layer(recompute_layer, state, name)(pool, *_ema_entries(state, name))
        for suffix, new in zip(_EMAS, new_emas, strict=True):
            out[name + suffix] = {**state[name + suffix], **new}
    return out


# What an override may set on every converted layer: the settings that leave params and state as they are.
_CONVERT_ARGS = ("decay_rate", "eps", "axis", "cross_replica_axis", "cross_replica_axis_index_groups", "data_format",
                 "strategy", "axis_name")
_HK_CALL = inspect.signature(hk.BatchNorm.__call__)


def _converted_call(
    overrides: Mapping[str, Any],
    converted: list[str],
    next_f: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: hk.MethodContext,
) -> Any:
    """A method interceptor: an `hk.BatchNorm` call runs a `jaxbn.haiku.BatchNorm` of the same module name."""
    module = context.module
    if not (isinstance(module, hk.BatchNorm) and context.method_name == "__call__"):
        return next_f(*args, **kwargs)
    converted.append(module.module_name)
    call = _HK_CALL.bind(module, *args, **kwargs).arguments
    settings: dict[str, Any] = {
        "create_scale": module.create_scale,
        "create_offset": module.create_offset,
        "decay_rate": module.mean_ema.decay,
        "eps": module.eps,
        "scale_init": module.scale_init if module.create_scale else None,
        "offset_init": module.offset_init if module.create_offset else None,
        "axis": module.axis,
        "cross_replica_axis": module.cross_replica_axis,
        "cross_replica_axis_index_groups": module.cross_replica_axis_index_groups,
        "data_format": "channels_first" if module.channel_index == 1 else "channels_last",
        **overrides,
    }
    # The same module name: the same parameters (`name/scale`) and state (`name/~/mean_ema`, ...).
    layer = BatchNorm(**settings, name=hk.experimental.force_name(module.module_name))
    return layer(call["inputs"], call["is_training"], call.get("test_local_stats", False), call.get("scale"),
                 call.get("offset"))


def convert(forward: Callable[..., Any], **overrides: Any) -> Callable[..., Any]:
    """`forward` with every `haiku.BatchNorm` running as a `jaxbn.haiku.BatchNorm`: no edit of the model.

    PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` for Haiku: inside
    the returned function each call of an `hk.BatchNorm` (those that
    `hk.nets.ResNet` and other haiku models build included) runs a
    `jaxbn.haiku.BatchNorm` with that layer's settings and module name, so it
    reads and writes the same parameters (`scale`, `offset`) and state
    (`mean_ema`, `var_ema`): the params and state trees are unchanged and
    checkpoints load both ways. The call's arguments pass through; the
    mask of an enclosing `batch_mask` block reaches every layer.
    `overrides` replace settings of every converted layer: `axis_name` (an
    alias of `cross_replica_axis`: the model becomes sync-BN under
    ``jax.pmap(..., axis_name=...)`` or `jax.vmap`), `strategy`,
    `decay_rate`, `eps`, `axis`, `cross_replica_axis_index_groups`,
    `data_format`.

    The converted layers are jaxbn's, so the rest of `jaxbn.haiku` applies to
    ``hk.transform_with_state(convert(forward))``: `freeze` (wrap either way
    round), `accumulate` / `commit_moments` and `recompute_batch_stats`.
    Wrap the function *before* `hk.transform_with_state`. If its first call
    converts no layer, it warns (`UserWarning`).

    Args:
      forward: a function that runs haiku modules (your forward function).
      **overrides: settings of `jaxbn.haiku.BatchNorm` for every converted layer.

    Returns:
      A function with `forward`'s signature.

    Raises:
      TypeError: an override that is not one of the settings above, or both
        `axis_name` and `cross_replica_axis`.
      ValueError: a bad `strategy`.

    >>> import haiku as hk, jax.numpy as jnp, jaxbn.haiku
    >>> def forward(x):
    ...     return hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training=True)   # haiku's own layer
    >>> f = hk.transform_with_state(jaxbn.haiku.convert(forward))
    >>> x = 1e4 + jnp.array([[-1.0], [1.0]])                   # E[x^2] - E[x]^2 loses it
    >>> params, state = f.init(None, x)
    >>> state["batch_norm/~/var_ema"]["average"].tolist(), hk.transform_with_state(forward).init(None, x)[1][
    ...     "batch_norm/~/var_ema"]["average"].tolist()
    ([[1.0]], [[0.0]])
    """
    check_overrides(overrides, _CONVERT_ARGS, "jaxbn.haiku.convert")
    overrides = dict(overrides)
    if "axis_name" in overrides:
        if "cross_replica_axis" in overrides:
            raise TypeError("jaxbn.haiku.convert takes axis_name or cross_replica_axis (the same setting), not both")
        overrides["cross_replica_axis"] = overrides.pop("axis_name")
    if "strategy" in overrides:
        check_strategy(overrides["strategy"])
    first = FirstUse("haiku.BatchNorm", "jaxbn.haiku.convert")

    @functools.wraps(forward)
    def converted(*args: Any, **kwargs: Any) -> Any:
        layers: list[str] = []
        with hk.intercept_methods(functools.partial(_converted_call, overrides, layers)):
            out = forward(*args, **kwargs)
        first.done(len(layers))
        return out

    return converted
