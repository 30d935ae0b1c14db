"""Flax NNX batch norm: a drop-in `BatchNorm` and `recompute_batch_stats`.

`jaxbn.nnx.BatchNorm` takes flax.nnx.BatchNorm's constructor arguments
(same defaults), has its attributes (`mean`, `var`, `scale`, `bias`), follows
`model.train()` / `model.eval()` and `nnx.view(model, use_running_average=...)`,
and adds Batch Renormalization, ghost batches, the unbiased running variance
and `momentum=None` (cumulative average).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Initializer
from jax.typing import ArrayLike, DTypeLike

from jaxbn._accumulate import combine_moments, commit_layer, empty_moments
from jaxbn._checks import AxisIndexGroups, AxisName, Strategy, check_mask
from jaxbn._convert import check_overrides, warn_no_layer
from jaxbn._dtypes import as_float
from jaxbn._module_core import Options, forward
from jaxbn._recompute import BatchMoments, batch_moments, population_stats
from jaxbn._running import Moments, RunningStats
from jaxbn._stats import moments as jaxbn_moments

__all__ = ["BatchNorm", "PooledMoments", "accumulate", "commit_moments", "convert", "freeze", "recompute_batch_stats"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

_NO_MODE = (
    "No `use_running_average` argument was provided to BatchNorm. Consider one of the following options:\n\n"
    "1. Pass `use_running_average` to the BatchNorm constructor:\n\n"
    "  self.bn = jaxbn.nnx.BatchNorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to the BatchNorm __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Use `nnx.view` to create a view of the model with a specific `use_running_average` value:\n\n"
    "  model_view = nnx.view(model, use_running_average=True/False)\n"
)


class PreciseMoments(nnx.Intermediate):
    """The `BatchMoments` a layer sows while `recompute_batch_stats` runs the model."""


class PooledMoments(nnx.BatchStat):
    """A layer's pooled batch moments during gradient accumulation (see `accumulate`).

    A `BatchStat`, so `nnx.state(model, nnx.BatchStat)` and optimizers'
    `wrt=nnx.Param` treat it as the running statistics are treated.

    >>> import jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    >>> jaxbn.nnx.accumulate(bn)
    >>> isinstance(bn.pooled_count, jaxbn.nnx.PooledMoments), isinstance(bn.pooled_count, nnx.BatchStat)
    (True, True)
    """


_POOL = ("pooled_mean", "pooled_var", "pooled_count")


def _assign(var: nnx.Variable[jax.Array], value: jax.Array) -> None:
    """var[...] = value, replacing the array when the dtype changes (a complex running mean)."""
    old = var[...]
    if old.shape == value.shape and old.dtype == value.dtype:
        var[...] = value
    else:
        var.set_value(value)


class BatchNorm(nnx.Module):
    """Batch normalization, a drop-in replacement for `flax.nnx.BatchNorm`.

    Every constructor argument of flax.nnx.BatchNorm is accepted with flax's
    default; `use_fast_variance` is accepted and ignored (the statistics are
    always stable and kept in at least float32), `promote_dtype`,
    `bias_metadata` and `scale_metadata` are honoured as flax honours them.
    Outputs, running stats and gradients match flax's
    `use_fast_variance=False` to float32 rounding; one value per feature in
    training does not raise. The initializers are not stored, so the module's
    graph does not depend on them.

    Args:
      num_features: the number of input features.
      use_running_average: if True, normalize with the stored statistics
        (`model.eval()`); if False with the batch's (`model.train()`).
      axis: the feature axis (NCHW: `axis=1`).
      momentum: EMA decay (see `jaxbn.linen.BatchNorm`), or None for the
        cumulative average (then an int32 `count` BatchStat is kept too).
      epsilon: see `jaxbn.linen.BatchNorm`, as are `dtype`, `param_dtype`,
        `use_bias`, `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups` and `use_fast_variance` (flax's arguments) and
        jaxbn's `renorm`, `renorm_r_max`, `renorm_d_max`,
        `virtual_batch_size`, `unbiased` and `strategy`: the same options,
        one meaning.
      promote_dtype: called as `promote_dtype((x, mean, var, scale, bias),
        dtype=dtype)` before normalizing, as in flax.
      rngs: random keys for the initializers.
      bias_metadata: metadata of the `bias` Param.
      scale_metadata: metadata of the `scale` Param.

    The attribute `accumulate_moments` (False) is gradient-accumulation mode,
    set with its pools by `accumulate`: a training call then normalizes as
    usual but pools the moments of its input into the layer's
    `PooledMoments` instead of updating `mean` and `var`; `commit_moments`
    applies the pool once per optimizer step.

    The attribute `collect_moments` (False) is precise-BN mode, set by
    `recompute_batch_stats` on a view of the model
    (``nnx.with_attributes(model, only=BatchNorm, collect_moments=True)``):
    the layer then normalizes with the batch moments whatever
    `use_running_average` says, leaves the running stats alone and sows the
    moments of its input (a `PreciseMoments`).

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> y.round(2).tolist(), bn.mean[...].round(2).tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 0.4])
    >>> bn.eval()
    >>> bn.use_running_average
    True
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: AxisName = None,
        axis_index_groups: AxisIndexGroups = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        renorm: bool = False,
        renorm_r_max: float = 3.0,
        renorm_d_max: float = 5.0,
        virtual_batch_size: int | None = None,
        unbiased: bool = False,
        strategy: Strategy = "auto",
    ):
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.renorm = renorm
        self.renorm_r_max = renorm_r_max
        self.renorm_d_max = renorm_d_max
        self.virtual_batch_size = virtual_batch_size
        self.unbiased = unbiased
        self.strategy = strategy
        self.collect_moments = False
        self.accumulate_moments = False
        self.frozen = False  # set by `freeze`: on its running statistics whatever the call or the view says
        self._options()  # bad options fail here, when the layer is built

    def __call__(
        self, x: ArrayLike, use_running_average: bool | None = None, *, mask: ArrayLike | None = None
    ) -> jax.Array:
        """Normalizes `x`: with its batch statistics in training, else with the stored ones.

        Args:
          x: the input, `num_features` on `axis`.
          use_running_average: overrides the attribute (`model.train()` /
            `model.eval()`) for this call.
          mask: entries to leave out of the statistics, as in
            `jaxbn.linen.BatchNorm.__call__`.

        Returns:
          `x` normalized, same shape; training updates `mean`, `var` (and
          `count`) in place.
        """
        if not self.collect_moments:
            use_running_average = nnx.module.first_from(
                use_running_average, self.use_running_average, error_msg=_NO_MODE
            )
        training = not self.frozen and (self.collect_moments or not use_running_average)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        raw_mean, raw_var = self.mean[...], self.var[...]
        with jax.numpy_dtype_promotion("standard"):  # flax's promotion rule, also under strict promotion
            promoted = self.promote_dtype((as_float(x), raw_mean, raw_var, scale, bias), dtype=self.dtype)
        x_, mean, var, promoted_scale, bias = (None if a is None else jnp.asarray(a) for a in promoted)
        assert x_ is not None and mean is not None and var is not None
        if promoted_scale is not None and jnp.iscomplexobj(promoted_scale) and not jnp.iscomplexobj(scale):
            promoted_scale = jnp.real(promoted_scale)  # a real scale promoted to complex (dtype=complex64) is real
        scale = promoted_scale
        count = self.count[...] if self.momentum is None else jnp.zeros((), jnp.int32)
        mask = check_mask(mask, x_.shape)
        y, new = forward(x_, RunningStats(raw_mean, raw_var, count), scale, bias, options=self._options(),
                         training=training, mask=mask, inference_stats=(mean, var))
        if self.collect_moments:
            part = batch_moments(
                x_, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            self.sow(PreciseMoments, "precise_moments", part)
        elif training and self.accumulate_moments:
            m = jaxbn_moments(
                x_, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            pooled = combine_moments(self._pool(), jax.tree.map(jax.lax.stop_gradient, m))
            for name, value in zip(_POOL, pooled, strict=True):
                _assign(getattr(self, name), value)
        elif training:
            _assign(self.mean, jax.lax.stop_gradient(new.mean))
            _assign(self.var, jax.lax.stop_gradient(new.var))
            if self.momentum is None:
                self.count[...] = new.count
        return y

    def _pool(self) -> Moments:
        return Moments(*(getattr(self, name)[...] for name in _POOL))

    def _options(self) -> Options:
        """The options from the attributes as they are now (a view or the user may have changed them)."""
        return Options.of(self)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def freeze(model: nnx.Module) -> nnx.Module:
    """A view of `model` whose `jaxbn.nnx.BatchNorm` layers run on their running statistics.

    Fine-tuning with frozen batch norms (torchvision's / detectron2's
    `FrozenBatchNorm2d`, praxis' `force_eval_mode`): every jaxbn BatchNorm of
    the view has `use_running_average=True`, so it normalizes with `mean` and
    `var` and never updates them, whatever a call (`use_running_average=False`)
    or the view's mode (`.train()`) says later; every other module keeps its
    mode (dropout still trains). The view shares its variables with `model`,
    which is not modified. Differentiate `nnx.Param` only (`nnx.grad`'s
    default) and the statistics, `nnx.BatchStat`, get no gradient; leave the
    layers' `scale` and `bias` out of the differentiated filter (or out of
    the optimizer's `wrt`) to freeze them as well.

    Args:
      model: an NNX model containing `jaxbn.nnx.BatchNorm` layers.

    Returns:
      A view of `model` (`nnx.with_attributes`): call it, differentiate it,
      optimize it; `model` is left in its own mode.

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> frozen = jaxbn.nnx.freeze(bn)
    >>> frozen(jnp.array([[3.0], [5.0]])).round(3).tolist(), bn.mean[...].tolist()
    ([[3.0], [5.0]], [0.0])
    """
    return nnx.with_attributes(model, only=BatchNorm, use_running_average=True, frozen=True)


def _layers(model: nnx.Module) -> list[BatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]


def recompute_batch_stats(model: nnx.Module, batches: Iterable[object]) -> None:
    """Replaces every BatchNorm layer's running stats by its input's population statistics, in place.

    "Precise BN" (fvcore's estimator), as `jaxbn.linen.recompute_batch_stats`:
    the model is called on every element of `batches` (a tuple is spread as
    positional arguments) with every `jaxbn.nnx.BatchNorm` normalizing with its
    batch moments, whatever its mode; each layer's `mean` and `var` become the
    count-weighted mean of its input over every entry of every batch and the
    biased variance about it (times N / (N - 1) for `unbiased=True` layers);
    a `count` becomes the number of batches. Nothing else in the model
    changes: parameters, other modules' state and the layers' modes are kept.
    The model runs as a view whose layers are in precise-BN mode
    (``nnx.with_attributes(model, only=BatchNorm, collect_moments=True)``; the
    model itself is not modified), a static attribute, so `nnx.jit` inside the
    model traces that mode apart from the others.

    Args:
      model: an NNX model containing `jaxbn.nnx.BatchNorm` layers.
      batches: an iterable of model inputs.

    Raises:
      ValueError: if the model has no jaxbn BatchNorm layer or `batches` is
        empty, or a layer was never called.

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(1, use_running_average=True, rngs=nnx.Rngs(0))
    >>> jaxbn.nnx.recompute_batch_stats(bn, [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])])
    >>> bn.mean[...].tolist(), bn.var[...].tolist()
    ([3.0], [5.0])
    """
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no jaxbn.nnx.BatchNorm layer to recompute")
    graphdef, state = nnx.split(nnx.with_attributes(model, only=BatchNorm, collect_moments=True))

    def run(state: nnx.State, args: tuple[object, ...]) -> list[tuple[BatchMoments, ...]]:
        collecting = nnx.merge(graphdef, state)
        _, sown = nnx.capture(lambda m, *a: m(*a), PreciseMoments)(collecting, *args)
        by_path = {path[:-1]: tuple(var.get_value()) for path, var in nnx.to_flat_state(sown)}
        return [by_path.get(path, ()) for path, m in nnx.iter_modules(collecting) if isinstance(m, BatchNorm)]

    run_jit = jax.jit(run)
    parts: list[list[BatchMoments]] = [[] for _ in layers]
    n_batches = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        for layer_parts, sown in zip(parts, run_jit(state, args), strict=True):
            layer_parts.extend(sown)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: recompute_batch_stats needs at least one batch")
    missing = sum(not p for p in parts)
    if missing:
        raise ValueError(
            f"{missing} jaxbn.nnx.BatchNorm layer(s) of {type(model).__name__} were never called on the "
            "batches; recompute_batch_stats needs every layer to see the data"
        )
    for layer, layer_parts in zip(layers, parts, strict=True):
        mean, var = population_stats(layer_parts, layer.mean[...], layer.var[...], unbiased=layer.unbiased)
        _assign(layer.mean, mean)
        _assign(layer.var, var)
        if layer.momentum is None:
            layer.count[...] = jnp.asarray(n_batches, jnp.int32)


def accumulate(model: nnx.Module, enable: bool = True) -> None:
    """Switches every `jaxbn.nnx.BatchNorm` of `model` to gradient accumulation (or back), in place.

    With `enable`, each layer gets empty pools (`PooledMoments` attributes
    `pooled_mean`, `pooled_var`, `pooled_count`, feature-shaped) and
    `accumulate_moments=True`: its training calls normalize with the
    micro-batch's moments as usual, leave `mean`/`var` alone and pool the
    moments of their input (Chan's combination, `jaxbn.combine_moments`).
    `commit_moments` then updates the running statistics once per optimizer
    step. `enable=False` removes the pools (commit first: pending moments are
    dropped) and restores the usual per-call updates.

    Args:
      model: an NNX model containing `jaxbn.nnx.BatchNorm` layers.
      enable: turn accumulation on (True) or off (False).

    Raises:
      ValueError: if the model has no jaxbn BatchNorm layer.

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> jaxbn.nnx.accumulate(bn)
    >>> _ = bn(jnp.array([[0.0], [2.0]]))
    >>> bn.mean[...].tolist(), bn.pooled_mean[...].tolist(), bn.pooled_count[...].tolist()
    ([0.0], [1.0], [2.0])
    """
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no jaxbn.nnx.BatchNorm layer to accumulate moments for")
    for layer in layers:
        if enable and not layer.accumulate_moments:
            empty = empty_moments(layer.mean[...].shape, layer.mean[...].dtype)
            for name, value in zip(_POOL, empty, strict=True):
                setattr(layer, name, PooledMoments(value))
        elif not enable and layer.accumulate_moments:
            for name in _POOL:
                delattr(layer, name)
        layer.accumulate_moments = enable


def commit_moments(model: nnx.Module, *, apply: ArrayLike = True) -> None:
    """The step boundary of gradient accumulation: one running-stat update per layer, in place.

    Every accumulating `jaxbn.nnx.BatchNorm` of `model` (see `accumulate`)
    updates `mean`, `var` (and `count`) once from its pooled moments, those of
    the step's whole batch (all its micro-batches together), with its own
    `momentum` and `unbiased` (`jaxbn.commit_moments`), and empties its
    pools. That is one training call on the whole batch, except with
    `virtual_batch_size`: such a call stores the average of its ghost
    batches' moments, the commit the whole batch's (whose variance also holds
    the spread between the ghost batches' means). Layers stacked by
    `nnx.vmap` with ``momentum=None`` (a `count` per layer) are each updated
    with their own count.

    Args:
      model: an NNX model in accumulation mode.
      apply: whether this is the step boundary: a bool or a scalar bool array
        (or an `nnx.Variable` holding one), e.g.
        ``tx.has_updated(opt_state)`` for ``tx = optax.MultiSteps(...)``; with
        `nnx.Optimizer`, ``tx.has_updated(nnx.as_pure(optimizer.opt_state))``
        (optax reads plain arrays). Where False nothing changes.

    Raises:
      ValueError: if no layer of the model accumulates (call `accumulate`).

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(1, momentum=0.5, rngs=nnx.Rngs(0))
    >>> jaxbn.nnx.accumulate(bn)
    >>> _ = bn(jnp.array([[0.0], [2.0]])); _ = bn(jnp.array([[4.0], [6.0]]))
    >>> bn.mean[...].tolist()
    [0.0]
    >>> jaxbn.nnx.commit_moments(bn)
    >>> bn.mean[...].tolist(), bn.var[...].tolist()
    ([1.5], [3.0])
    """
    layers = [layer for layer in _layers(model) if layer.accumulate_moments]
    if not layers:
        raise ValueError(
            f"no jaxbn.nnx.BatchNorm layer of {type(model).__name__} accumulates moments; "
            "call jaxbn.nnx.accumulate(model) before training on micro-batches"
        )
    for layer in layers:
        count = layer.count[...] if layer.momentum is None else jnp.zeros((), jnp.int32)
        old = RunningStats(layer.mean[...], layer.var[...], count)
        new, emptied = commit_layer(old, layer._pool(), apply=apply, momentum=layer.momentum, unbiased=layer.unbiased)
        _assign(layer.mean, new.mean)
        _assign(layer.var, new.var)
        if layer.momentum is None:
            layer.count[...] = new.count
        for name, value in zip(_POOL, emptied, strict=True):
            _assign(getattr(layer, name), value)


# flax.nnx.BatchNorm's settings a converted layer keeps; the overrides may replace them (and set jaxbn's options).
_NNX_SETTINGS = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype", "axis_name",
                 "axis_index_groups", "use_fast_variance", "promote_dtype")
_OVERRIDES = tuple(s for s in _NNX_SETTINGS if s != "param_dtype") + (
    "renorm", "renorm_r_max", "renorm_d_max", "virtual_batch_size", "unbiased", "strategy")


def _converted_layer(old: nnx.BatchNorm, overrides: Mapping[str, Any]) -> BatchNorm:
    """A `jaxbn.nnx.BatchNorm` with `old`'s settings (and the overrides) holding `old`'s Variable objects."""
    settings = {name: getattr(old, name) for name in _NNX_SETTINGS if hasattr(old, name)}
    new = BatchNorm(old.num_features, **{**settings, **overrides}, use_scale=False, use_bias=False,
                    rngs=nnx.Rngs(0))
    new.mean, new.var = old.mean, old.var
    new.scale, new.bias = old.scale, old.bias
    new.use_scale, new.use_bias = old.use_scale, old.use_bias
    return new


def _swap(value: Any, make: Callable[[nnx.BatchNorm], BatchNorm], memo: dict[int, BatchNorm], seen: set[int]) -> Any:
    """`value` with every `nnx.BatchNorm` in it replaced by `make(layer)` (once per layer: sharing is kept)."""
    if isinstance(value, nnx.BatchNorm):
        if id(value) not in memo:
            memo[id(value)] = make(value)
        return memo[id(value)]
    if id(value) in seen or isinstance(value, nnx.Variable):
        return value
    if isinstance(value, nnx.Pytree):
        seen.add(id(value))
        for name, child in list(vars(value).items()):
            if not name.startswith("_pytree__") and (new := _swap(child, make, memo, seen)) is not child:
                setattr(value, name, new)
    elif isinstance(value, list | dict):
        seen.add(id(value))
        for key, child in list(value.items() if isinstance(value, dict) else enumerate(value)):
            if (new := _swap(child, make, memo, seen)) is not child:
                value[key] = new
    elif isinstance(value, tuple):
        items = [_swap(child, make, memo, seen) for child in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def convert(model: Any, **overrides: Any) -> Any:
    """Replaces every `flax.nnx.BatchNorm` of `model` by a `jaxbn.nnx.BatchNorm` holding the same Variables, in place.

    PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` for NNX: each
    `nnx.BatchNorm` attribute of the model (in modules, `nnx.List`,
    `nnx.Dict`, lists, dicts and tuples; a layer shared by several modules
    stays shared) becomes a `jaxbn.nnx.BatchNorm` with that layer's settings
    (`use_running_average`, `axis`, `momentum`, `epsilon`, `dtype`,
    `axis_name`, ...) and *the same Variable objects* `mean`, `var`, `scale`
    and `bias`: `nnx.state(model)` keeps its paths and values, so
    checkpoints load both ways, and an optimizer built on the model before
    the call still updates the same parameters. `overrides` replace
    settings of every converted layer, e.g. ``axis_name="batch"`` (sync-BN
    under `nnx.vmap`, `nnx.pmap` or `jax.shard_map`) or ``strategy="psum"``;
    ``momentum=None`` adds a `count` BatchStat. The converted layers are
    jaxbn's: `freeze`, `accumulate` / `commit_moments` and
    `recompute_batch_stats` apply to the model.

    The model is modified in place and returned (a model that *is* an
    `nnx.BatchNorm` cannot be changed in place: its replacement is
    returned). A model with no `nnx.BatchNorm` is returned unchanged, with a
    `UserWarning`.

    Args:
      model: an NNX module (or a list, dict or tuple of them).
      **overrides: settings of `jaxbn.nnx.BatchNorm` for every converted
        layer: `use_running_average`, `axis`, `momentum`, `epsilon`,
        `dtype`, `axis_name`, `axis_index_groups`, `use_fast_variance`,
        `promote_dtype`, `renorm`, `renorm_r_max`, `renorm_d_max`,
        `virtual_batch_size`, `unbiased`, `strategy`.

    Returns:
      `model`, converted.

    Raises:
      TypeError: an unknown override (or one that would change the
        Variables: `use_bias`, `param_dtype`, ...).
      ValueError: an override with a bad value.

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), nnx.BatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0)))
    >>> mean = model.layers[1].mean
    >>> model = jaxbn.nnx.convert(model)
    >>> type(model.layers[1]).__module__, model.layers[1].mean is mean
    ('jaxbn.nnx', True)
    """
    check_overrides(overrides, _OVERRIDES, "jaxbn.nnx.convert")
    Options(**{k: v for k, v in overrides.items() if k in Options.__dataclass_fields__})  # before any change
    memo: dict[int, BatchNorm] = {}
    out = _swap(model, lambda old: _converted_layer(old, overrides), memo, set())
    if not memo:
        warn_no_layer("flax.nnx.BatchNorm", "jaxbn.nnx.convert", f"in {type(model).__name__}")
    return out
