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

import warnings
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox.nn import State, StateIndex
from jax.typing import ArrayLike, DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import jaxbn
from jaxbn._checks import check_mask
from jaxbn._dtypes import output_dtype, promote
from jaxbn._module_core import Options, forward

__all__ = ["BatchNorm", "freeze"]

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
        stats = jaxbn.RunningStats(mean, var, jnp.zeros((), jnp.int32))
        # The first training call takes the batch moments as they are.
        ema = jaxbn.update_stats(stats, batch, momentum=o.momentum)
        first = jaxbn.update_stats(stats, batch, momentum=0.0)
        mean = jnp.where(first_time, first.mean, ema.mean)
        var = jnp.where(first_time, first.var, ema.var)
        # A batch that update_stats skips (all masked, not finite) does not use up the first time.
        first_time = jnp.logical_and(first_time, first.count == 0)
    y = jaxbn.normalize(x, mean, var, w, b, axis=0, epsilon=o.epsilon, dtype=o.dtype)
    return y, (first_time, mean, var)


def freeze(model: eqx.Module) -> eqx.Module:
    """`model` with every `jaxbn.equinox.BatchNorm` in inference: fine-tuning on the running statistics.

    Fine-tuning with frozen batch norms (torchvision's / detectron2's
    `FrozenBatchNorm2d`, praxis' `force_eval_mode`): the returned copy's
    jaxbn BatchNorm layers have `inference=True`, so they normalize with the
    running statistics and return the state unchanged, while every other
    layer keeps its own `inference` (unlike `eqx.nn.inference_mode`, which
    also turns dropout off). The statistics live in the `eqx.nn.State`, which
    `eqx.filter_grad` does not differentiate; to freeze the layers' `weight`
    and `bias` as well, leave them out of the filter you differentiate.

    Args:
      model: a pytree of equinox modules containing `jaxbn.equinox.BatchNorm` layers.

    Returns:
      A copy of `model` whose jaxbn BatchNorm layers have `inference=True`.

    >>> import equinox as eqx, jax.numpy as jnp, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1, "batch", mode="batch")
    >>> y, same = jaxbn.equinox.freeze(bn)(jnp.array([3.0]), state)
    >>> y.round(3).tolist(), same.get(bn.batch_counter).tolist()
    ([3.0], 0)
    """
    is_bn = lambda m: isinstance(m, BatchNorm)  # noqa: E731
    return jax.tree.map(lambda m: eqx.tree_at(lambda b: b.inference, m, True) if is_bn(m) else m, model, is_leaf=is_bn)
