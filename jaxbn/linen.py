"""Flax Linen batch norm: a drop-in `BatchNorm` and `recompute_batch_stats`.

`jaxbn.linen.BatchNorm` has flax.linen.BatchNorm's fields (same order and
defaults), call signature and variable tree, so variables made by either
load into the other; it adds Batch Renormalization, ghost batches, the
unbiased running variance and `momentum=None` (cumulative average).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict
from flax.typing import Initializer, VariableDict
from jax.nn import initializers
from jax.typing import ArrayLike, DTypeLike

from jaxbn._accumulate import commit_layer
from jaxbn._checks import AxisIndexGroups, AxisName, Strategy, check_mask
from jaxbn._convert import FirstUse, batch_mask, check_overrides, current_batch_mask
from jaxbn._dtypes import as_float
from jaxbn._layout import Layout
from jaxbn._module_core import Options, forward
from jaxbn._recompute import PRECISE_COLLECTION, BatchMoments, LayerMoments, batch_moments, pool_into, population_stats
from jaxbn._running import Moments, RunningStats
from jaxbn._stats import moments as jaxbn_moments

__all__ = [
    "MOMENTS",
    "BatchNorm",
    "LayerMoments",
    "batch_mask",
    "commit_moments",
    "convert",
    "freeze",
    "recompute_batch_stats",
]

#: The collection in which training layers pool their batch moments instead of updating
#: `batch_stats` (gradient accumulation): make it mutable by name, e.g.
#: ``model.apply(variables, x, mutable=[jaxbn.linen.MOMENTS])``, then `commit_moments` once per step.
MOMENTS = "batch_moments"


def _lifted(collection: str) -> str:
    return (f"a lifted transform (nn.scan, nn.vmap, ...) around the layer must list the collection {collection!r} "
            "in variable_axes, e.g. variable_axes={True: 0}")


# Set by `freeze` while its function runs: None, "stats" or "all" (affine too). A jax user context,
# so it is part of jit's cache key: a function traced frozen is not reused unfrozen, nor the reverse.
_FROZEN = jax.make_user_context(None)
# Set by `convert` while its function runs: the overrides of each enclosing `convert` (for jit's cache too).
_CONVERTED = jax.make_user_context(())

# A collection no jaxbn code ever names: mutable only under `mutable=True`.
_ANY_COLLECTION = "jaxbn_any_collection_probe"


def _collects_moments(module: nn.Module, collection: str = PRECISE_COLLECTION) -> bool:
    """Whether `collection` (PRECISE_COLLECTION: `recompute_batch_stats` runs this layer) is mutable by name.

    `model.apply(..., mutable=True)` makes every collection mutable; that is
    not a request to collect, so a collection nobody names must not be.
    """
    return module.is_mutable_collection(collection) and not module.is_mutable_collection(_ANY_COLLECTION)


def _check_lifted(module: nn.Module, collection: str, what: str) -> None:
    """Raises if an enclosing module makes `collection` mutable by name but `module` (inside a lifted transform
    that does not carry the collection) cannot write it: its moments would be lost."""
    if _collects_moments(module, collection):
        return
    outer = (m for m in nn.module._context.module_stack if isinstance(m, nn.Module) and m.scope is not None)
    if any(_collects_moments(m, collection) for m in outer):
        raise ValueError(f"{what} of the BatchNorm layer {'/'.join(module.path)!r}: {_lifted(collection)}")


class BatchNorm(nn.Module):
    """Batch normalization, a drop-in replacement for `flax.linen.BatchNorm`.

    The fields up to `force_float32_reductions` are flax's, in flax's order
    and with flax's defaults; `use_fast_variance` and
    `force_float32_reductions` are accepted for compatibility and otherwise
    ignored (the statistics are always stable and kept in at least float32).
    Outputs, running stats and gradients match flax's
    `use_fast_variance=False` to float32 rounding. Like flax, `init` does not
    update the running stats and does not use `axis_name`, and one value per
    feature in training does not raise.

    Running stats (collection `batch_stats`): `mean`, `var`, and `count`
    (int32, only when `momentum=None`). Parameters (`params`): `scale`, `bias`.

    Attributes:
      use_running_average: if True, normalize with the stored statistics
        instead of the batch's (may be given at call time instead).
      axis: the feature axis or axes (NCHW: `axis=1`).
      momentum: EMA decay, `new = momentum * old + (1 - momentum) * batch`
        (PyTorch's momentum is `1 - momentum`), or None for the cumulative
        average of every batch so far.
      epsilon: added to the variance.
      dtype: output dtype (default: promotion of input and parameter dtypes).
      param_dtype: dtype of `scale` and `bias`.
      use_bias: learn a bias.
      use_scale: learn a scale.
      bias_init: initializer of `bias`.
      scale_init: initializer of `scale`.
      axis_name: axis name(s) to synchronize the statistics across.
      axis_index_groups: `jax.lax.psum`'s groups (pmap only).
      use_fast_variance: accepted for compatibility, ignored.
      force_float32_reductions: accepted for compatibility, ignored.
      renorm: Batch Renormalization (Ioffe 2017) in training.
      renorm_r_max: the clip of the renorm scale correction r, >= 1.
      renorm_d_max: the clip of the renorm shift correction d, >= 0.
      virtual_batch_size: ghost batch norm: in training the first batch axis
        is split into groups of this size, each normalized with its own
        moments; the running stats take the mean of the groups' moments.
      unbiased: store the unbiased batch variance (var * n / (n - 1)).
      strategy: how the statistics cross devices, as in `jaxbn.moments`:
        "auto" (default), "psum" or "gather" (the same results; see
        docs/sync.md).

    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> y.round(2).tolist(), updates['batch_stats']['mean'].round(2).tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 0.4])
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: AxisName = None
    axis_index_groups: AxisIndexGroups = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    renorm: bool = False
    renorm_r_max: float = 3.0
    renorm_d_max: float = 5.0
    virtual_batch_size: int | None = None
    unbiased: bool = False
    strategy: Strategy = "auto"

    @nn.compact
    def __call__(
        self, x: ArrayLike, use_running_average: bool | None = None, *, mask: ArrayLike | None = None
    ) -> jax.Array:
        """Normalizes `x` with the batch's or the stored statistics.

        During `init` the running stats are not updated and `axis_name` is
        not used, as in flax. While `recompute_batch_stats` runs the model
        (the collection ``"jaxbn_precise_bn"`` is mutable by name) the layer
        normalizes with the batch moments whatever its mode, leaves its
        running stats alone and sows the moments of `x` there. While the
        collection `MOMENTS` (``"batch_moments"``) is mutable by name, a
        training layer normalizes as usual but pools the moments of `x` there
        (a `LayerMoments`) instead of updating its running stats: gradient
        accumulation, committed once per step by `commit_moments`. Inside a
        lifted transform (`nn.scan`, `nn.vmap`, ...) that does not list the
        collection in its `variable_axes`, either mode raises a ValueError.

        Args:
          x: the input, shape (..., features, ...).
          use_running_average: overrides the field of the same name.
          mask: optional bool array broadcastable to `x`; False entries are
            left out of the statistics (they are still normalized). Without
            one, the mask of an enclosing `jaxbn.linen.batch_mask` block.

        Returns:
          The normalized input, shape of `x`.
        """
        initializing = self.is_initializing()
        frozen = _FROZEN.value
        if not (initializing or frozen):
            _check_lifted(self, PRECISE_COLLECTION, "recompute_batch_stats cannot collect the moments")
        collecting = not initializing and not frozen and _collects_moments(self)
        if not (collecting and self.use_running_average is None and use_running_average is None) and not frozen:
            use_running_average = nn.merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
        training = collecting or not (frozen or use_running_average)
        accumulating = training and not (initializing or collecting) and _collects_moments(self, MOMENTS)
        if training and not (initializing or collecting):
            _check_lifted(self, MOMENTS, f"gradient accumulation ({MOMENTS!r} is mutable) cannot pool the moments")
        options = Options.of(self)
        x = as_float(x)
        fshape = Layout.of(x.shape, self.axis).feature_shape
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
        ra_count = None
        if self.momentum is None:
            ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None

        count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)
        stats = RunningStats(ra_mean.value, ra_var.value, count)
        if frozen:  # FrozenBatchNorm: the statistics are constants
            stats = jax.lax.stop_gradient(stats)
            if frozen == "all":
                scale, bias = jax.lax.stop_gradient((scale, bias))
        mask = check_mask(current_batch_mask(x.shape) if mask is None else mask, x.shape)
        y, new = forward(x, stats, scale, bias, options=options, training=training, initializing=initializing,
                         mask=mask)
        if collecting:
            part = batch_moments(
                x, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            self.sow(PRECISE_COLLECTION, "moments", (part, jnp.asarray(self.unbiased)))
        elif accumulating:
            m = jaxbn_moments(x, axis=self.axis, mask=mask, axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups)
            pooled = LayerMoments(m, self.momentum, self.unbiased)
            self.sow(MOMENTS, "moments", pooled, reduce_fn=pool_into, init_fn=lambda: None)
        elif training and not initializing:
            ra_mean.value = new.mean
            ra_var.value = new.var
            if ra_count is not None:
                ra_count.value = new.count
        return y


def freeze(apply_fn: Callable[..., Any], *, affine: bool = True) -> Callable[..., Any]:
    """`apply_fn` with every `jaxbn.linen.BatchNorm` frozen: fine-tuning on the running statistics.

    torchvision's / detectron2's `FrozenBatchNorm2d` and praxis'
    `force_eval_mode`: inside the returned function every jaxbn BatchNorm
    normalizes with its stored `mean` and `var` whatever `use_running_average`
    (field or argument) says, never updates them (nothing is written to
    `batch_stats`, so it need not be mutable) and stops their gradient. The
    rest of the model runs as asked (dropout stays in training mode, say).
    `flax.linen.BatchNorm` layers are not affected: convert them first,
    ``freeze(convert(model.apply))``.

    The layers are frozen while the returned function runs, and jit's cache
    tells frozen and unfrozen traces apart: call it inside or around a jitted
    function (``freeze(jax.jit(model.apply))`` works), and a function jitted
    elsewhere runs frozen inside it and unfrozen outside it.

    Args:
      apply_fn: usually `model.apply`; any function that runs Linen modules.
      affine: whether `scale` and `bias` stay trainable (True) or get a zero
        gradient too (False).

    Returns:
      A function with `apply_fn`'s signature.

    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False)
    >>> v = bn.init(jax.random.key(0), jnp.zeros((2, 1)))
    >>> v = {**v, 'batch_stats': {'mean': jnp.array([1.0]), 'var': jnp.array([4.0])}}
    >>> jaxbn.linen.freeze(bn.apply)(v, jnp.array([[3.0], [5.0]])).round(3).tolist()
    [[1.0], [2.0]]
    """
    mode = "stats" if affine else "all"

    @functools.wraps(apply_fn)
    def frozen(*args: Any, **kwargs: Any) -> Any:
        with _FROZEN(mode):
            return apply_fn(*args, **kwargs)

    return frozen


def recompute_batch_stats(
    model: nn.Module, variables: VariableDict, batches: Iterable[object], **apply_kwargs: Any
) -> VariableDict:
    """Replaces every BatchNorm layer's running stats by its input's population statistics.

    "Precise BN" (fvcore's estimator): the model is run over `batches` with
    every `jaxbn.linen.BatchNorm` normalizing with its batch moments, as in
    training, and each layer's stored `mean` and `var` become the
    count-weighted mean of its input over every entry of every batch and the
    biased variance about it (so the spread of the batch means counts too).
    A layer with `unbiased=True` stores that variance times N / (N - 1), N its
    total count; a stored `count` becomes the number of batches.
    `torch.optim.swa_utils.update_bn` instead averages per-batch variances.

    While this runs the layers never update their running stats (a renorm
    layer corrects with the stats in `variables`), and they normalize with
    batch moments whatever `use_running_average` says. Layers inside lifted
    transforms (`nn.scan`, `nn.vmap`) need the collection
    `"jaxbn_precise_bn"` in their `variable_axes` (`{True: 0}` covers it).

    Args:
      model: a Linen model containing `jaxbn.linen.BatchNorm` layers.
      variables: its variables (`params`, `batch_stats`, ...); not modified.
      batches: an iterable of model inputs; a tuple is spread as positional
        arguments of `model.apply`.
      **apply_kwargs: passed to every `model.apply` call (e.g. `train=True`,
        `rngs=...`).

    Returns:
      A copy of `variables` with new `batch_stats` (same tree and dtypes).

    Raises:
      ValueError: if `batches` is empty, no jaxbn BatchNorm layer reported
        its moments, or a layer ran without reporting them (a lifted
        transform without the collection in its `variable_axes`).

    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=True)
    >>> v = bn.init(jax.random.key(0), jnp.zeros((2, 1)))
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
    >>> v = jaxbn.linen.recompute_batch_stats(bn, v, batches)
    >>> v['batch_stats']['mean'].tolist(), v['batch_stats']['var'].tolist()
    ([3.0], [5.0])
    """
    mutable = ["batch_stats", PRECISE_COLLECTION]

    def run(v: VariableDict, args: tuple[object, ...]) -> Mapping[str, Any]:
        _, state = model.apply(v, *args, mutable=mutable, **apply_kwargs)
        return state.get(PRECISE_COLLECTION, {})

    run_jit = jax.jit(run)
    parts: dict[tuple[str, ...], list[BatchMoments]] = {}
    unbiased: dict[tuple[str, ...], bool] = {}
    n_batches = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        for path, sown in traverse_util.flatten_dict(run_jit(variables, args)).items():
            layer = path[:-1]  # (..., module, "moments") -> the module's path
            for part, flag in sown:
                parts.setdefault(layer, []).append(part)
                unbiased[layer] = unbiased.get(layer, False) or bool(jnp.any(flag))
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: recompute_batch_stats needs at least one batch")
    if not parts:
        raise ValueError(
            f"no jaxbn.linen.BatchNorm layer reported its moments in {type(model).__name__}: "
            "recompute_batch_stats only recomputes jaxbn's layers (flax.linen.BatchNorm layers do not report "
            "their moments: run jaxbn.linen.convert(jaxbn.linen.recompute_batch_stats)(model, ...) to convert "
            f"them), and {_lifted(PRECISE_COLLECTION)}"
        )
    stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
    for layer, layer_parts in parts.items():
        mean, var = population_stats(
            layer_parts, stats[layer + ("mean",)], stats[layer + ("var",)], unbiased=unbiased[layer]
        )
        stats[layer + ("mean",)], stats[layer + ("var",)] = mean, var
        if layer + ("count",) in stats:
            stats[layer + ("count",)] = jnp.full_like(stats[layer + ("count",)], n_batches)  # one per stacked layer
    out = {**variables, "batch_stats": traverse_util.unflatten_dict(stats)}
    return FrozenDict(out) if isinstance(variables, FrozenDict) else out


def commit_moments(
    batch_stats: VariableDict, moments: VariableDict, *, apply: ArrayLike = True
) -> tuple[VariableDict, VariableDict]:
    """The step boundary of gradient accumulation: one running-stat update per layer from its pooled moments.

    During the micro-batches of an optimizer step, apply the model with the
    collection `MOMENTS` mutable (and `batch_stats` not):
    every training `jaxbn.linen.BatchNorm` normalizes with its micro-batch's
    moments as usual, leaves `batch_stats` alone, and pools the moments of
    its input into `MOMENTS` (Chan's combination, `jaxbn.combine_moments`:
    pass the collection back in to keep pooling, or pool per-micro-batch
    collections yourself, e.g. the stacked output of a `jax.lax.scan`, with
    ``jaxbn.combine_moments(stacked, stacked=True)``). Then this function
    updates each layer's `batch_stats` once, with its own `momentum` and
    `unbiased`, from the moments of the step's whole batch (all its
    micro-batches together; `jaxbn.commit_moments`), and empties the pools.
    That is one training step on the whole batch, except with
    `virtual_batch_size`: such a step stores the average of its ghost
    batches' moments, the commit the whole batch's (whose variance also holds
    the spread between the ghost batches' means). Layers stacked by
    `nn.scan` / `nn.vmap` with ``momentum=None`` (a `count` per layer) are
    each updated with their own count. Layers inside a lifted transform need
    the collection `MOMENTS` in its `variable_axes` (``{True: 0}`` covers it).

    Args:
      batch_stats: the model's `batch_stats` collection.
      moments: the `MOMENTS` collection (pooled over the step's micro-batches).
      apply: whether this is the step boundary: a bool or a scalar bool array,
        e.g. ``optax.MultiSteps(...).has_updated(opt_state)``; where False,
        both collections come back unchanged.

    Returns:
      `(batch_stats, moments)`: the updated statistics and emptied pools (same
      trees, dtypes and layers) where `apply`, the inputs otherwise.

    Raises:
      ValueError: a pool's layer has no `mean`/`var` in `batch_stats`, or as
        `jaxbn.commit_moments`.

    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5)
    >>> v = bn.init(jax.random.key(0), jnp.zeros((2, 1)))
    >>> _, a = bn.apply(v, jnp.array([[0.0], [2.0]]), mutable=[jaxbn.linen.MOMENTS])
    >>> _, b = bn.apply({**v, **a}, jnp.array([[4.0], [6.0]]), mutable=[jaxbn.linen.MOMENTS])
    >>> stats, pool = jaxbn.linen.commit_moments(v['batch_stats'], b[jaxbn.linen.MOMENTS])
    >>> stats['mean'].tolist(), stats['var'].tolist()
    ([1.5], [3.0])
    """
    is_pool = lambda v: isinstance(v, LayerMoments)  # noqa: E731
    flat_pools = traverse_util.flatten_dict(_unfreeze(moments), is_leaf=lambda _, v: is_pool(v))
    stats = traverse_util.flatten_dict(_unfreeze(batch_stats))
    new_pools = {}
    for path, pool in flat_pools.items():
        if not is_pool(pool):
            raise ValueError(
                f"moments holds {type(pool).__name__} at {'/'.join(path)}; pass the {MOMENTS!r} collection "
                "that jaxbn.linen.BatchNorm layers pooled into"
            )
        layer = path[:-1]
        if layer + ("mean",) not in stats or layer + ("var",) not in stats:
            raise ValueError(
                f"batch_stats has no mean/var for the layer {'/'.join(layer) or '(root)'} whose moments were "
                "pooled; pass the batch_stats of the model that produced the moments"
            )
        count_key = layer + ("count",)
        old = RunningStats(stats[layer + ("mean",)], stats[layer + ("var",)],
                           stats.get(count_key, jnp.zeros((), jnp.int32)))
        new, emptied = commit_layer(old, pool.moments, apply=apply, momentum=pool.momentum, unbiased=pool.unbiased)
        stats[layer + ("mean",)], stats[layer + ("var",)] = new.mean, new.var
        if count_key in stats:
            stats[count_key] = new.count
        new_pools[path] = LayerMoments(Moments(*emptied), pool.momentum, pool.unbiased)
    out_stats = traverse_util.unflatten_dict(stats)
    out_pools = traverse_util.unflatten_dict(new_pools) if new_pools else _unfreeze(moments)
    if isinstance(batch_stats, FrozenDict):
        out_stats = FrozenDict(out_stats)
    if isinstance(moments, FrozenDict):
        out_pools = FrozenDict(out_pools)
    return out_stats, out_pools


def _unfreeze(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _unfreeze(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# The fields a converted layer takes from flax's layer (those flax has) or from the overrides.
_CONVERT_FIELDS = tuple(f.name for f in dataclasses.fields(BatchNorm) if f.init and f.name not in ("parent", "name"))
_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))
_FLAX_CALL = inspect.signature(nn.BatchNorm.__call__)


def _converted_layer(
    overrides: Mapping[str, Any],
    converted: list[str],
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
) -> Any:
    """A method interceptor: a `flax.linen.BatchNorm` call runs a `jaxbn.linen.BatchNorm` in the same scope."""
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    converted.append("/".join(module.path))
    call = _FLAX_CALL.bind(module, *args, **kwargs).arguments
    fields = {name: getattr(module, name) for name in _CONVERT_FIELDS if hasattr(module, name)}
    # Bound to flax's layer's own scope: the same variables, paths, rngs and mutable collections.
    scope: Any = module.scope
    layer = BatchNorm(**{**fields, **overrides}, parent=scope)
    return layer(call["x"], call.get("use_running_average"), mask=call.get("mask"))


def convert(apply_fn: Callable[..., Any], **overrides: Any) -> Callable[..., Any]:
    """`apply_fn` with every `flax.linen.BatchNorm` running as a `jaxbn.linen.BatchNorm`: no edit of the model.

    PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` for Linen: inside
    the returned function each call of a `flax.linen.BatchNorm` (or a
    subclass) runs `jaxbn.linen.BatchNorm`'s computation with that layer's
    own fields, in that layer's scope: it reads and writes the same `params`
    (`scale`, `bias`) and `batch_stats` (`mean`, `var`) at the same paths, so
    the variable tree is unchanged and checkpoints load both ways. The
    call's `use_running_average` and `mask` pass through; a call without a
    mask takes the one of an enclosing `batch_mask` block. `overrides`
    replace fields of every converted layer, e.g. ``axis_name="batch"`` (a
    model becomes sync-BN under ``jax.pmap(..., axis_name="batch")``) or
    ``strategy="psum"``; ``momentum=None`` adds a `count` to `batch_stats`.

    The converted layers are jaxbn's in every respect, so the rest of
    `jaxbn.linen` applies: ``freeze(convert(model.apply))``, accumulation
    (the `MOMENTS` collection, `commit_moments`), and
    ``convert(recompute_batch_stats)(model, variables, batches)``.
    `apply_fn` is any function that runs Linen modules. The layers are
    converted while the returned function runs, and jit's cache tells
    converted and plain traces apart: call it inside or around a jitted
    function (``convert(jax.jit(model.apply))`` works). If its first call
    converts no layer, it warns (`UserWarning`): the model has no
    `flax.linen.BatchNorm`, or it ran from a jit cache traced under another
    `convert` with the same overrides.

    Args:
      apply_fn: usually `model.apply`; any function that runs Linen modules.
      **overrides: fields of `jaxbn.linen.BatchNorm` to set on every converted
        layer (`axis_name`, `axis_index_groups`, `strategy`, `momentum`,
        `epsilon`, `renorm`, `virtual_batch_size`, `unbiased`, ...).

    Returns:
      A function with `apply_fn`'s signature.

    Raises:
      TypeError: an override that is not a field of `jaxbn.linen.BatchNorm`.
      ValueError: an override with a bad value (momentum, epsilon, strategy, ...).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> model = nn.BatchNorm(use_running_average=False, momentum=0.0)   # flax's own layer
    >>> x = 1e4 + jnp.array([[-1.0], [1.0]])                            # E[x^2] - E[x]^2 loses it
    >>> variables = model.init(jax.random.key(0), x)
    >>> _, flax_stats = model.apply(variables, x, mutable=["batch_stats"])
    >>> _, stats = jaxbn.linen.convert(model.apply)(variables, x, mutable=["batch_stats"])
    >>> flax_stats["batch_stats"]["var"].tolist(), stats["batch_stats"]["var"].tolist()
    ([0.0], [1.0])
    """
    check_overrides(overrides, _CONVERT_FIELDS, "jaxbn.linen.convert")
    Options(**{k: v for k, v in overrides.items() if k in _OPTION_FIELDS})  # bad values fail here
    first = FirstUse("flax.linen.BatchNorm", "jaxbn.linen.convert")
    key = repr(sorted(overrides.items()))  # equal overrides convert alike: they may share jit's traces

    @functools.wraps(apply_fn)
    def converted(*args: Any, **kwargs: Any) -> Any:
        layers: list[str] = []
        with (_CONVERTED((*_CONVERTED.value, key)),
              nn.intercept_methods(functools.partial(_converted_layer, dict(overrides), layers))):
            out = apply_fn(*args, **kwargs)
        first.done(len(layers))
        return out

    return converted
