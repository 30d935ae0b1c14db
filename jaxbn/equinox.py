"""`jaxbn.equinox.BatchNorm`: a drop-in replacement for `equinox.nn.BatchNorm`.

Same constructor, fields, state layout and call as equinox's layer (equinox
0.13), so swapping the import is the whole migration and checkpoints written
with `eqx.tree_serialise_leaves` load either way. The statistics come from
jaxbn's functional core (`jaxbn.moments`, `jaxbn.normalize`,
`jaxbn.update_stats`, and the Flax modules' forward pass), which fixes:

* the running variance starts at 1 in every mode, so inference before any
  training step is the identity (equinox's "ema" mode starts from
  `jnp.empty` and divides by about sqrt(eps): equinox#955);
* "batch" mode's inference statistics are the EMA of the batch statistics,
  with no zero-debias of the variance (equinox divides the hidden variance,
  which starts at 1, by `1 - momentum**k`: +9.5 on the variance after 10
  steps at momentum 0.99);
* statistics are computed in at least float32 (bf16 inputs included), with
  shifted sums and exact cross-device counts;
* `mask=` on `__call__` leaves entries out of the statistics.

Needs equinox (`pip install jaxbn[equinox]`); `import jaxbn` does not import it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox.nn import State, StateIndex
from jax.typing import ArrayLike, DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import jaxbn
from jaxbn._accumulate import check_apply, combine_moments, empty_moments
from jaxbn._checks import check_mask
from jaxbn._convert import check_overrides, warn_no_layer
from jaxbn._dtypes import output_dtype, promote
from jaxbn._module_core import Options, forward
from jaxbn._recompute import population_from_pool, precise_part

__all__ = ["BatchNorm", "accumulate", "commit_moments", "convert", "freeze", "recompute_batch_stats"]

_MASK_HINT = "; BatchNorm sees one example (input_size, *spatial): map the mask with x under jax.vmap"

_LEGACY_WARNING = (
    "When `eqx.nn.BatchNorm(..., mode=...)` is unspecified it defaults to "
    "'ema', for backward compatibility. This typically has a performance "
    "impact, and for new code the user is encouraged to use 'batch' "
    "instead. See `https://github.com/patrick-kidger/equinox/issues/659`."
)

# equinox's field annotations (jaxtyping), as aliases so the strings stay dimension names.
_Channels = Float[Array, "input_size"]
_Flag = Bool[Array, ""]
_Counter = Int[Array, ""]


def _default_float() -> np.dtype:
    """float32, or float64 when jax_enable_x64 is on (equinox's default dtype)."""
    return np.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalization for Equinox, on one example under `jax.vmap` / `pmap` / `shard_map`.

    A drop-in replacement for `equinox.nn.BatchNorm` (same constructor,
    fields, state entries and call), whose statistics come from jaxbn's
    stable, float32, mask-aware core. Given one example `x` of shape
    `(input_size, *spatial)` it computes, per channel `i`::

        y_i = (x_i - mean_i) / sqrt(var_i + eps) * weight_i + bias_i

    with the mean and biased variance over the spatial dimensions *and* the
    batch, which is the axis (or axes) named `axis_name` of the surrounding
    `jax.vmap`, `jax.pmap` or `jax.shard_map`.

    Modes (equinox's meaning):

    * `"batch"`: training normalizes with the batch moments and folds them
      into the running statistics, `new = momentum * old + (1 - momentum) *
      batch` (state: `batch_counter`, `batch_state_index` = (mean, var),
      starting at (0, 1)); inference normalizes with those running statistics
      as they are (no zero-debias, unlike equinox 0.13.8).
    * `"ema"` (and `"legacy"`, which warns as equinox does): training
      normalizes with the running statistics *after* folding in this batch
      (the first training call takes the batch moments as they are);
      inference uses the running statistics (state: `ema_first_time_index`,
      `ema_state_index` = (mean, var), starting at (0, 1) rather than
      equinox's uninitialized memory).

    Statistics are computed in at least float32, created in at least
    float32 (float64 with x64), and an update returns them in the dtype the
    state has (a state cast to bf16 stays bf16); `weight` and `bias` are
    created in `dtype` as equinox creates them. The output dtype is
    equinox's: the promotion of the input and parameter dtypes (without
    parameters, the input's float dtype); integer inputs are promoted to the
    default float dtype as equinox promotes them.

    Pass `mask=` (bool, broadcastable to the example) to leave entries out
    of the statistics. For sync-BN across devices name every batch axis,
    e.g. `axis_name=("data", "batch")` under `jax.pmap(..., axis_name="data")`
    around `jax.vmap(..., axis_name="batch")`.

    Attributes:
      weight, bias: `(input_size,)` arrays, or None without `channelwise_affine`.
      ema_first_time_index, ema_state_index: "ema" mode state entries (else None).
      batch_counter, batch_state_index: "batch" mode state entries (else None).
      axis_name, inference, input_size, eps, channelwise_affine, momentum, mode:
        the constructor arguments ("legacy" stored as "ema").

    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from jaxbn.equinox import BatchNorm
    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    >>> x = jnp.arange(12.0).reshape(4, 3)                     # a batch of 4 examples
    >>> step = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> y, state = step(x, state)
    >>> y[:, 0].round(3).tolist()
    [-1.342, -0.447, 0.447, 1.342]
    >>> state.get(bn.batch_state_index)[0].tolist()           # 0.99 * 0 + 0.01 * batch mean
    [0.045..., 0.055..., 0.065...]
    """

    weight: _Channels | None
    bias: _Channels | None
    ema_first_time_index: None | StateIndex[_Flag]
    ema_state_index: None | StateIndex[tuple[_Channels, _Channels]]
    batch_counter: None | StateIndex[_Counter]
    batch_state_index: None | StateIndex[tuple[_Channels, _Channels]]
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["ema", "batch"] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Literal["ema", "batch", "legacy"] = "legacy",
    ):
        """Builds the layer and its initial state (collected by `eqx.nn.make_with_state`).

        Args:
          input_size: number of channels C of an example `(C, *spatial)`.
          axis_name: the name (or a sequence of names) of the batch axis of the
            surrounding `jax.vmap` / `jax.pmap` / `jax.shard_map`.
          eps: added to the variance.
          channelwise_affine: learn a per-channel `weight` and `bias`.
          momentum: EMA decay of the running statistics (equinox's and flax's
            convention: `new = momentum * old + (1 - momentum) * batch`).
          inference: normalize with the running statistics and leave them
            alone (toggled by `eqx.nn.inference_mode`, overridden per call).
          dtype: dtype of `weight` and `bias` (default float32, float64 with
            x64). The running statistics are created in at least float32.
          mode: "batch", "ema", or "legacy" ("ema" with equinox's warning).

        Raises:
          ValueError: for a mode other than "ema", "batch" or "legacy"
            (equinox's message).
        """
        if mode == "legacy":
            mode = "ema"
            warnings.warn(_LEGACY_WARNING, stacklevel=2)
        if mode not in {"ema", "batch"}:
            raise ValueError("Invalid mode, must be 'ema' or 'batch'.")
        self.mode = mode
        param_dtype = _default_float() if dtype is None else np.dtype(dtype)
        stats_dtype = promote(param_dtype, jnp.float32)
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype=param_dtype)
            self.bias = jnp.zeros((input_size,), dtype=param_dtype)
        else:
            self.weight = None
            self.bias = None
        init_stats = (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
        if mode == "ema":
            self.ema_first_time_index = StateIndex(jnp.array(True))
            self.ema_state_index = StateIndex(init_stats)
            self.batch_counter = None
            self.batch_state_index = None
        else:
            self.batch_counter = StateIndex(jnp.array(0))
            self.batch_state_index = StateIndex(init_stats)
            self.ema_first_time_index = None
            self.ema_state_index = None
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum

    def __call__(
        self,
        x: Array,
        state: State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: ArrayLike | None = None,
    ) -> tuple[Array, State]:
        """Normalizes one example; in training, updates the running statistics.

        Args:
          x: one example, shape `(input_size, *spatial)`; the batch is the
            surrounding transformation's axis `axis_name`.
          state: the `eqx.nn.State` holding the running statistics.
          key: ignored (Equinox API compatibility).
          inference: overrides `self.inference` when not None.
          mask: optional bool array broadcastable to `x` (this example's
            entries); False entries are left out of the statistics and still
            normalized. Under `jax.vmap`, map it with the example.

        Returns:
          `(y, state)`: y of x's shape, and the state with updated statistics
          (unchanged in inference).

        Raises:
          ValueError: for an `x` that is not `(input_size, *spatial)` or a mask
            that does not broadcast to it.
          TypeError: for a floating-point mask.
          NameError: in training, when no transformation binds `axis_name`.
        """
        del key
        if inference is None:
            inference = self.inference
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"x must be one example of shape (input_size, *spatial) with input_size={self.input_size}, "
                f"got shape {x.shape}; call BatchNorm per example, inside "
                f"jax.vmap(..., axis_name={self.axis_name!r}) over the batch"
            )
        mask_ = check_mask(mask, x.shape, target="the example x", hint=_MASK_HINT)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(promote(x.dtype, _default_float()))
        out_dtype = output_dtype(x, self.weight, self.bias, None)
        options = Options(axis=0, momentum=self.momentum, epsilon=self.eps, axis_name=self.axis_name, dtype=out_dtype)
        config = _Config(bool(inference), options)
        entry = state.get(_stats_index(self))
        if isinstance(entry, _Accumulating | _Precise):
            return self._pooling_call(x, state, mask_, config, entry)
        if self.mode == "batch":
            assert self.batch_counter is not None and self.batch_state_index is not None
            counter = state.get(self.batch_counter)
            mean, var = state.get(self.batch_state_index)
            y, (counter, mean, var) = _apply(
                x, self.weight, self.bias, mask_, (counter, mean, var), mode="batch", config=config
            )
            if not inference:
                state = state.set(self.batch_counter, counter)
                state = state.set(self.batch_state_index, (mean, var))
        else:
            assert self.ema_first_time_index is not None and self.ema_state_index is not None
            first_time = state.get(self.ema_first_time_index)
            mean, var = state.get(self.ema_state_index)
            y, (first_time, mean, var) = _apply(
                x, self.weight, self.bias, mask_, (first_time, mean, var), mode="ema", config=config
            )
            if not inference:
                state = state.set(self.ema_first_time_index, first_time)
                state = state.set(self.ema_state_index, (mean, var))
        return y, state


    def _pooling_call(
        self, x: Array, state: State, mask: Array | None, config: _Config, entry: _Accumulating | _Precise
    ) -> tuple[Array, State]:
        """A call on a state from `accumulate` or `recompute_batch_stats`: normalize, pool the moments."""
        precise = isinstance(entry, _Precise)
        mean, var = entry.stats
        if config.inference and not precise:  # inference as usual, with the running statistics
            y = jaxbn.normalize(x, mean, var, self.weight, self.bias, axis=0, epsilon=self.eps,
                                dtype=config.options.dtype)
            return y, state
        if self.mode == "batch" or precise:  # precise BN: every layer normalizes with its batch moments
            mode, aux = "batch", jnp.zeros((), jnp.int32)
        else:
            assert self.ema_first_time_index is not None
            mode, aux = "ema", state.get(self.ema_first_time_index)
        y, pooled = _pool_apply(x, self.weight, self.bias, mask, aux, (mean, var), entry.pooled, mode=mode,
                                config=config._replace(inference=False), precise=precise)
        if isinstance(entry, _Precise):
            return y, state.set(_stats_index(self), entry._replace(pooled=pooled, calls=entry.calls + 1))
        return y, state.set(_stats_index(self), entry._replace(pooled=pooled))


class _Accumulating(NamedTuple):
    """A layer's state entry during gradient accumulation: its (mean, var) and the pool of this step."""

    stats: tuple[Array, Array]
    pooled: jaxbn.Moments


class _Precise(NamedTuple):
    """A layer's state entry while `recompute_batch_stats` runs: (mean, var), the pool, the number of calls."""

    stats: tuple[Array, Array]
    pooled: jaxbn.Moments
    calls: Array


def _stats_index(layer: BatchNorm) -> StateIndex:
    index = layer.batch_state_index if layer.mode == "batch" else layer.ema_state_index
    assert index is not None
    return index


# The two modes' maths, jitted: called eagerly under jax.vmap, one compiled
# program per shape instead of one per primitive (nested in an outer jit, inlined).
_State = tuple[Array, Array, Array]


class _Config(NamedTuple):
    """A call's static options (hashable: jit's static argument); `options.dtype` is the output dtype."""

    inference: bool
    options: Options


@partial(jax.jit, static_argnames=("mode", "config"))
def _apply(
    x: Array, weight: Array | None, bias: Array | None, mask: Array | None, state: _State, *, mode: str,
    config: _Config,
) -> tuple[Array, _State]:
    """One call in `mode` ("batch" or "ema"); the core computes in >= float32 whatever x's dtype."""
    with jax.named_scope("jaxbn.equinox.BatchNorm"):
        if mode == "batch":
            return _batch_mode(x, weight, bias, mask, state, config)
        return _ema_mode(x, weight, bias, mask, state, config)


def _batch_mode(x: Array, w: Array | None, b: Array | None, mask: Array | None, state: _State, c: _Config) -> tuple:
    """"batch" mode: batch moments in training (the Flax modules' forward pass), running stats in inference."""
    counter, mean, var = state
    y, new = forward(x, jaxbn.RunningStats(mean, var, counter), w, b, options=c.options, training=not c.inference,
                     mask=mask)
    # `counter + Python int` keeps the counter's weak type, as equinox's `counter + 1` does.
    new_counter = counter + jnp.where(new.count > counter, 1, 0)
    return y, (new_counter, new.mean.astype(mean.dtype), new.var.astype(var.dtype))


def _ema_mode(x: Array, w: Array | None, b: Array | None, mask: Array | None, state: _State, c: _Config) -> tuple:
    """"ema" mode: normalize with the running stats after folding in this batch (training) or as they are."""
    first_time, mean, var = state
    o = c.options
    if not c.inference:
        batch = jaxbn.moments(x, axis=0, mask=mask, axis_name=o.axis_name)
        first_time, mean, var = _ema_fold(state, batch, o.momentum)
    y = jaxbn.normalize(x, mean, var, w, b, axis=0, epsilon=o.epsilon, dtype=o.dtype)
    return y, (first_time, mean, var)


def _ema_fold(state: _State, batch: jaxbn.Moments, momentum: float | None) -> _State:
    """"ema" mode's update of (first_time, mean, var) with a batch's moments."""
    first_time, mean, var = state
    stats = jaxbn.RunningStats(mean, var, jnp.zeros((), jnp.int32))
    # The first training call takes the batch moments as they are.
    ema = jaxbn.update_stats(stats, batch, momentum=momentum)
    first = jaxbn.update_stats(stats, batch, momentum=0.0)
    mean = jnp.where(first_time, first.mean, ema.mean)
    var = jnp.where(first_time, first.var, ema.var)
    # A batch that update_stats skips (all masked, not finite) does not use up the first time.
    return jnp.logical_and(first_time, first.count == 0), mean, var


@partial(jax.jit, static_argnames=("mode", "config", "precise"))
def _pool_apply(
    x: Array, w: Array | None, b: Array | None, mask: Array | None, aux: Array, stats: tuple[Array, Array],
    pooled: jaxbn.Moments, *, mode: str, config: _Config, precise: bool,
) -> tuple[Array, jaxbn.Moments]:
    """A training call's output (running statistics not updated) and the pool with this batch's moments."""
    with jax.named_scope("jaxbn.equinox.BatchNorm"):
        run = _batch_mode if mode == "batch" else _ema_mode
        y, _ = run(x, w, b, mask, (aux, *stats), config)
        part = jaxbn.moments(x, axis=0, mask=mask, axis_name=config.options.axis_name)
        part = jax.tree.map(jax.lax.stop_gradient, precise_part(part) if precise else part)
        return y, combine_moments(pooled, part)


class _FrozenBatchNorm(BatchNorm):
    """A `BatchNorm` (same fields and leaves) that runs in inference whatever its call says (see `freeze`)."""

    def __init__(self, layer: BatchNorm):
        for field in dataclasses.fields(layer):
            setattr(self, field.name, getattr(layer, field.name))
        self.inference = True

    def __call__(self, x: Array, state: State, **kwargs: Any) -> tuple[Array, State]:
        return super().__call__(x, state, **{**kwargs, "inference": True})


def freeze(model: eqx.Module) -> eqx.Module:
    """`model` with every `jaxbn.equinox.BatchNorm` in inference: fine-tuning on the running statistics.

    Fine-tuning with frozen batch norms (torchvision's / detectron2's
    `FrozenBatchNorm2d`, praxis' `force_eval_mode`): the returned copy's
    jaxbn BatchNorm layers run in inference whatever their call or
    `eqx.nn.inference_mode` says (a call-time ``inference=False`` included),
    so they normalize with the running statistics and return the state
    unchanged, while every other layer keeps its own `inference` (unlike
    `eqx.nn.inference_mode`, which also turns dropout off). The statistics live in the `eqx.nn.State`, which
    `eqx.filter_grad` does not differentiate; to freeze the layers' `weight`
    and `bias` as well, leave them out of the filter you differentiate.

    Args:
      model: a pytree of equinox modules containing `jaxbn.equinox.BatchNorm` layers.

    Returns:
      A copy of `model` whose jaxbn BatchNorm layers always run in inference:
      still `jaxbn.equinox.BatchNorm` instances with the same fields and
      leaves (so `eqx.tree_serialise_leaves` files load both ways).

    >>> import equinox as eqx, jax.numpy as jnp, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1, "batch", mode="batch")
    >>> y, same = jaxbn.equinox.freeze(bn)(jnp.array([3.0]), state)
    >>> y.round(3).tolist(), same.get(bn.batch_counter).tolist()
    ([3.0], 0)
    """
    is_bn = lambda m: isinstance(m, BatchNorm)  # noqa: E731
    return jax.tree.map(lambda m: _FrozenBatchNorm(m) if is_bn(m) else m, model, is_leaf=is_bn)


def _layers(model: object) -> list[BatchNorm]:
    """The jaxbn BatchNorm layers of `model`, each once (a shared layer has one state entry)."""
    found = jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, BatchNorm))
    layers: dict[object, BatchNorm] = {}
    for layer in found:
        if isinstance(layer, BatchNorm):
            layers.setdefault(_stats_index(layer).marker, layer)
    return list(layers.values())


def _with_entries(state: State, entries: dict[object, object]) -> State:
    """A new `State` with the entries of the given markers replaced (`state` itself stays valid)."""
    values, keys = state.tree_flatten()
    return State.tree_unflatten(keys, [entries.get(k, v) for k, v in zip(keys, values, strict=True)])


def _no_layer(model: object, what: str) -> ValueError:
    return ValueError(f"{type(model).__name__} has no jaxbn.equinox.BatchNorm layer to {what}")


def accumulate(model: object, state: State, *, enable: bool = True) -> State:
    """A state in which every `jaxbn.equinox.BatchNorm` of `model` accumulates moments (or the usual state back).

    Gradient accumulation: called with the returned state, a training layer
    normalizes as usual (with the micro-batch's moments in "batch" mode, its
    "ema" normalization in "ema" mode) but leaves its running statistics
    alone and pools the moments of its input into the state (Chan's
    combination, `jaxbn.combine_moments`); `commit_moments` then updates the
    statistics once per optimizer step. The state's structure stays the same
    from call to call, so it can be a `jax.lax.scan` carry or live beside an
    `optax.MultiSteps` state. `enable=False` gives back a state with
    equinox's layout (commit first: pending moments are dropped).

    Args:
      model: a model containing `jaxbn.equinox.BatchNorm` layers.
      state: its `eqx.nn.State` (not invalidated).
      enable: accumulate (True) or return to the usual state (False).

    Returns:
      The new state.

    Raises:
      ValueError: if the model has no jaxbn BatchNorm layer.

    >>> import jax, jax.numpy as jnp, equinox as eqx, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1, "batch", mode="batch")
    >>> acc = jaxbn.equinox.accumulate(bn, state)
    >>> _, acc = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.ones((3, 1)), acc)
    >>> plain = jaxbn.equinox.accumulate(bn, acc, enable=False)   # not committed: statistics unchanged
    >>> [v.tolist() for v in plain.get(bn.batch_state_index)]
    [[0.0], [1.0]]
    """
    layers = _layers(model)
    if not layers:
        raise _no_layer(model, "accumulate moments for")
    entries: dict[object, object] = {}
    for layer in layers:
        index = _stats_index(layer)
        entry = state.get(index)
        stats = entry.stats if isinstance(entry, _Accumulating | _Precise) else tuple(entry)
        if enable:
            pooled = entry.pooled if isinstance(entry, _Accumulating) else empty_moments(
                layer.input_size, jnp.result_type(stats[0]))
            entries[index.marker] = _Accumulating(stats, pooled)
        else:
            entries[index.marker] = stats
    return _with_entries(state, entries)


def _select(flag: Array | bool, new: object, old: object) -> object:
    if isinstance(flag, bool):
        return new if flag else old
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def commit_moments(model: object, state: State, *, apply: ArrayLike = True) -> State:
    """The step boundary of gradient accumulation: one running-stat update per layer from its pooled moments.

    For every layer of `model` accumulating in `state` (see `accumulate`):
    "batch" mode folds the pool into the running statistics with the layer's
    momentum (`jaxbn.commit_moments`: exactly one training step on the whole
    batch) and counts one step; "ema" mode folds it in as its training call
    would (the first step takes it as it is). The pools are emptied.

    Args:
      model: the model whose layers accumulated.
      state: the accumulating state (not invalidated).
      apply: whether this is the step boundary: a bool or a scalar bool array,
        e.g. ``optax.MultiSteps(...).has_updated(opt_state)``; where False
        the state comes back unchanged.

    Returns:
      The new (still accumulating) state.

    Raises:
      ValueError: if no layer accumulates in `state` (call `accumulate`).

    >>> import jax, jax.numpy as jnp, equinox as eqx, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1, "batch", momentum=0.5, mode="batch")
    >>> state = jaxbn.equinox.accumulate(bn, state)
    >>> step = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> _, state = step(jnp.array([[0.0], [2.0]]), state)
    >>> _, state = step(jnp.array([[4.0], [6.0]]), state)
    >>> state = jaxbn.equinox.commit_moments(bn, state)
    >>> [v.tolist() for v in jaxbn.equinox.accumulate(bn, state, enable=False).get(bn.batch_state_index)]
    [[1.5], [3.0]]
    """
    flag = check_apply(apply)
    layers = [layer for layer in _layers(model) if isinstance(state.get(_stats_index(layer)), _Accumulating)]
    if not layers:
        raise ValueError(
            f"no jaxbn.equinox.BatchNorm layer of {type(model).__name__} accumulates moments in this state; "
            "pass the state returned by jaxbn.equinox.accumulate(model, state)"
        )
    entries: dict[object, object] = {}
    for layer in layers:
        entry = state.get(_stats_index(layer))
        mean, var = entry.stats
        empty = jax.tree.map(jnp.zeros_like, entry.pooled)
        if layer.mode == "batch":
            assert layer.batch_counter is not None
            counter = state.get(layer.batch_counter)
            new, pooled = jaxbn.commit_moments(
                jaxbn.RunningStats(mean, var, counter), entry.pooled, apply=flag, momentum=layer.momentum
            )
            entries[layer.batch_counter.marker] = counter + jnp.where(new.count > counter, 1, 0)
            entries[_stats_index(layer).marker] = _Accumulating(
                (new.mean.astype(mean.dtype), new.var.astype(var.dtype)), pooled)
        else:
            assert layer.ema_first_time_index is not None
            first_time = state.get(layer.ema_first_time_index)
            new_state = _ema_fold((first_time, mean, var), entry.pooled, layer.momentum)
            first_time, mean, var = _select(flag, new_state, (first_time, mean, var))  # type: ignore[misc]
            entries[layer.ema_first_time_index.marker] = first_time
            pool = _select(flag, empty, entry.pooled)
            assert isinstance(pool, jaxbn.Moments)
            entries[_stats_index(layer).marker] = _Accumulating((mean, var), pool)
    return _with_entries(state, entries)


def recompute_batch_stats(
    model: object,
    state: State,
    batches: Iterable[object],
    forward: Callable[..., tuple[object, State]] | None = None,
) -> State:
    """Replaces every BatchNorm layer's running statistics by its input's population statistics.

    "Precise BN", with `jaxbn.linen.recompute_batch_stats`'s semantics: the
    model runs over `batches` with every `jaxbn.equinox.BatchNorm`
    normalizing with its batch moments (whatever its mode or `inference`
    flag), and each layer's stored mean and variance become the
    count-weighted mean of its input over every valid entry of every batch
    and the biased variance about it (so the spread of the batch means
    counts too). Masks are respected; a batch whose moments are not finite
    is left out per feature, as a training update leaves it out; features
    no batch reached keep their values. "batch" mode's counter becomes the
    number of batches; "ema" mode's first-time flag is cleared once a
    feature got data.

    Args:
      model: a model containing `jaxbn.equinox.BatchNorm` layers.
      state: its `eqx.nn.State` (not invalidated; parameters untouched).
      batches: an iterable of inputs; a tuple is spread as arguments of `forward`.
      forward: ``forward(model, state, *batch) -> (output, state)``, the
        batched call of the model (what the training step does). Default:
        ``jax.vmap(model, axis_name=name, in_axes=(0, None), out_axes=(0, None))(x, state)``
        with the one `axis_name` every layer shares.

    Returns:
      A new state with the recomputed statistics (equinox's layout).

    Raises:
      ValueError: if the model has no jaxbn BatchNorm layer, `batches` is
        empty, a layer was never called, or `forward` is needed (layers with
        different or composite axis names) but not given.

    >>> import jax.numpy as jnp, equinox as eqx, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1, "batch", mode="batch")
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
    >>> state = jaxbn.equinox.recompute_batch_stats(bn, state, batches)
    >>> [v.tolist() for v in state.get(bn.batch_state_index)], int(state.get(bn.batch_counter))
    ([[3.0], [5.0]], 2)
    """
    layers = _layers(model)
    if not layers:
        raise _no_layer(model, "recompute")
    if forward is None:
        forward = _default_forward(layers)
    entries: dict[object, object] = {}
    for layer in layers:
        entry = state.get(_stats_index(layer))
        stats = entry.stats if isinstance(entry, _Accumulating | _Precise) else tuple(entry)
        empty = empty_moments(layer.input_size, jnp.result_type(stats[0]))
        entries[_stats_index(layer).marker] = _Precise(stats, empty, jnp.zeros((), jnp.int32))
    collecting = _with_entries(state, entries)
    run = eqx.filter_jit(lambda m, s, args: forward(m, s, *args)[1])
    n_batches = 0
    for batch in batches:
        collecting = run(model, collecting, batch if isinstance(batch, tuple) else (batch,))
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: recompute_batch_stats needs at least one batch")
    missing = sum(int(collecting.get(_stats_index(layer)).calls) == 0 for layer in layers)
    if missing:
        raise ValueError(
            f"{missing} jaxbn.equinox.BatchNorm layer(s) of {type(model).__name__} were never called on the "
            "batches; recompute_batch_stats needs every layer to see the data (check `forward`)"
        )
    entries = {}
    for layer in layers:
        entry = collecting.get(_stats_index(layer))
        old_mean, old_var = entry.stats
        mean, var = population_from_pool(entry.pooled, old_mean, old_var, unbiased=False)
        entries[_stats_index(layer).marker] = (mean.astype(old_mean.dtype), var.astype(old_var.dtype))
        if layer.mode == "batch":
            assert layer.batch_counter is not None
            counter = state.get(layer.batch_counter)
            entries[layer.batch_counter.marker] = jnp.asarray(n_batches, jnp.result_type(counter))
        else:
            assert layer.ema_first_time_index is not None
            first_time = state.get(layer.ema_first_time_index)
            entries[layer.ema_first_time_index.marker] = jnp.logical_and(first_time, jnp.all(entry.pooled.count == 0))
    return _with_entries(state, entries)


def _default_forward(layers: list[BatchNorm]) -> Callable[..., tuple[object, State]]:
    names = {_hashable(layer.axis_name) for layer in layers}
    if len(names) != 1 or isinstance(next(iter(names)), tuple):
        raise ValueError(
            f"the BatchNorm layers have the axis names {sorted(names, key=repr)}: pass "
            "forward=lambda model, state, x: ... (the batched call of your training step)"
        )
    (name,) = names

    def vmapped(model: Callable[..., tuple[object, State]], state: State, x: Array) -> tuple[object, State]:
        return jax.vmap(model, axis_name=name, in_axes=(0, None), out_axes=(0, None))(x, state)

    return vmapped


def _hashable(axis_name: Hashable | Sequence[Hashable]) -> Hashable:
    """equinox accepts a sequence (e.g. a list) of names: as a tuple."""
    if isinstance(axis_name, Sequence) and not isinstance(axis_name, str):
        return tuple(axis_name)
    return axis_name


# The fields a converted layer takes from equinox's as they are: its parameters and its places in the State.
_HELD = ("weight", "bias", "ema_first_time_index", "ema_state_index", "batch_counter", "batch_state_index")
# What the overrides may set: the settings that leave the parameters and the state's layout alone.
_OVERRIDES = ("axis_name", "eps", "momentum", "inference")


def _converted_layer(old: eqx.nn.BatchNorm, overrides: dict[str, object]) -> BatchNorm:
    """A `jaxbn.equinox.BatchNorm` with `old`'s settings (and the overrides), parameters and state indices."""
    settings = {"axis_name": old.axis_name, "eps": old.eps, "momentum": old.momentum, "inference": old.inference,
                **overrides}
    new = BatchNorm(old.input_size, settings.pop("axis_name"), channelwise_affine=old.channelwise_affine,
                    mode=old.mode, **settings)  # type: ignore[arg-type]
    return eqx.tree_at(lambda b: [getattr(b, n) for n in _HELD], new, [getattr(old, n) for n in _HELD],
                       is_leaf=lambda v: v is None)


def convert(model: object, **overrides: object) -> object:
    """`model` with every `equinox.nn.BatchNorm` replaced by a `jaxbn.equinox.BatchNorm` on the same state.

    PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` for Equinox: a new
    model (`eqx.tree_at`-style; `model` is not modified) whose
    `eqx.nn.BatchNorm` layers are `jaxbn.equinox.BatchNorm` layers with the
    same settings, the same `weight` and `bias`, and the same state indices
    (the same `StateIndex` markers), so they read and write the same entries
    of the `eqx.nn.State` you already have: the state, the model's leaves
    and `eqx.tree_serialise_leaves` checkpoints are unchanged. `overrides`
    replace settings of every converted layer: `axis_name` (e.g. a tuple of
    names for nested maps), `eps`, `momentum`, `inference`. The converted
    layers are jaxbn's: `freeze`, `accumulate` / `commit_moments` and
    `recompute_batch_stats` apply to the new model. A model with no
    `eqx.nn.BatchNorm` comes back as it is, with a `UserWarning`.

    Args:
      model: a pytree of equinox modules (equinox 0.13's `BatchNorm` layout).
      **overrides: `axis_name`, `eps`, `momentum` or `inference` for every
        converted layer.

    Returns:
      The converted model.

    Raises:
      TypeError: an unknown override (or one that would change the
        parameters or the state's layout: `mode`, `channelwise_affine`, ...).

    >>> import jax, jax.numpy as jnp, equinox as eqx, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(1, "batch", momentum=0.5, mode="batch")
    >>> ours = jaxbn.equinox.convert(bn)                     # equinox's state, as it is
    >>> x = 1e4 + jnp.array([[-1.0], [1.0]])                 # two examples
    >>> _, state = jax.vmap(ours, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    >>> [v.tolist() for v in state.get(ours.batch_state_index)]
    [[5000.0], [1.0]]
    """
    check_overrides(overrides, _OVERRIDES, "jaxbn.equinox.convert")
    is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)  # noqa: E731
    found = [m for m in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(m)]
    if not found:
        warn_no_layer("equinox.nn.BatchNorm", "jaxbn.equinox.convert", f"in {type(model).__name__}")
        return model
    for layer in found:
        if not hasattr(layer, "batch_state_index"):
            raise TypeError(
                "jaxbn.equinox.convert needs equinox 0.13's BatchNorm (fields ema_state_index, batch_state_index, "
                f"mode); this equinox's layer has {sorted(vars(layer))}"
            )
    return jax.tree.map(lambda m: _converted_layer(m, overrides) if is_bn(m) else m, model, is_leaf=is_bn)
