"""One batch-norm layer of each library, as pure functions: what the layer benchmark times.

Implementations (`IMPLEMENTATIONS`): `jaxbn.batch_norm`, `jaxbn.linen.BatchNorm`,
`flax.linen.BatchNorm` (default and `use_fast_variance=False`),
`haiku.BatchNorm` and `equinox.nn.BatchNorm` (the last two when installed).

>>> import jax.numpy as jnp
>>> layer = IMPLEMENTATIONS["jaxbn"].build((8, 4), -1, jnp.float32, None)
>>> y, state = layer.apply(layer.params, layer.state, jnp.ones((8, 4)), True)
>>> y.shape, state.count.item()
((8, 4), 1)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

#: A pytree of arrays (parameters or state): its structure depends on the library.
PyTree: TypeAlias = Any


@dataclasses.dataclass
class Layer:
    """One batch-norm layer of some library, as pure functions.

    `apply(params, state, x, training)` returns `(y, new_state)`; `params`
    holds scale and bias (what is differentiated besides `x`); `prepare`
    turns the benchmark's input into the layout the library takes natively
    (equinox: channels first), outside the timed region.
    """

    params: PyTree
    state: PyTree
    apply: Callable[[PyTree, PyTree, jax.Array, bool], tuple[jax.Array, PyTree]]
    prepare: Callable[[jax.Array], jax.Array] = lambda x: x


Builder: TypeAlias = Callable[[tuple[int, ...], int, DTypeLike, Hashable | None], Layer]


class Implementation(NamedTuple):
    """A row of the layer benchmark: the module that must import, the layer builder, a description."""

    module: str
    build: Builder
    description: str


def _small(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """`shape` with every non-feature axis cut to 2 (for cheap `init`)."""
    feat = axis % len(shape)
    return tuple(s if a == feat else min(s, 2) for a, s in enumerate(shape))


def _jaxbn(shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None) -> Layer:
    import jaxbn

    c = shape[axis]
    params = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}

    def apply(p: PyTree, s: PyTree, x: jax.Array, training: bool) -> tuple[jax.Array, PyTree]:
        return jaxbn.batch_norm(x, s, p["scale"], p["bias"], training=training, axis=axis, axis_name=axis_name)

    return Layer(params, jaxbn.init_stats(c), apply)


def _flax(fast_variance: bool, jaxbn_module: bool = False) -> Builder:
    def build(shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None) -> Layer:
        if jaxbn_module:
            from jaxbn import linen as nn
        else:
            import flax.linen as nn  # type: ignore[no-redef]

        module = nn.BatchNorm(axis=axis, dtype=dtype, axis_name=axis_name, use_fast_variance=fast_variance)
        variables = module.init(jax.random.key(0), jnp.zeros(_small(shape, axis), dtype), use_running_average=True)

        def apply(p: PyTree, s: PyTree, x: jax.Array, training: bool) -> tuple[jax.Array, PyTree]:
            v = {"params": p, "batch_stats": s}
            if not training:
                return module.apply(v, x, use_running_average=True), s  # type: ignore[return-value]
            y, upd = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        return Layer(variables["params"], variables["batch_stats"], apply)

    return build


def _haiku(ours: bool) -> Builder:
    """haiku.BatchNorm, or (`ours`) jaxbn.haiku.BatchNorm swapped in for it: the same code otherwise."""

    def build(shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None) -> Layer:
        return _haiku_layer(shape, axis, dtype, axis_name, ours)

    return build


def _haiku_layer(shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None, ours: bool) -> Layer:
    import haiku as hk

    batch_norm = importlib.import_module("jaxbn.haiku").BatchNorm if ours else hk.BatchNorm
    fmt = "channels_first" if axis % len(shape) == 1 and len(shape) > 2 else "channels_last"

    def make(name: Hashable | None) -> hk.TransformedWithState:
        def fn(x: jax.Array, training: bool) -> jax.Array:
            bn = batch_norm(True, True, 0.99, eps=1e-5, data_format=fmt, cross_replica_axis=name)  # type: ignore[arg-type]
            return bn(x, is_training=training).astype(x.dtype)

        return hk.transform_with_state(fn)

    t = make(axis_name)
    # init outside any named axis (same variables); apply with the cross-replica axis.
    params, state = make(None).init(jax.random.PRNGKey(0), jnp.zeros(_small(shape, axis), dtype), True)

    def apply(p: PyTree, s: PyTree, x: jax.Array, training: bool) -> tuple[jax.Array, PyTree]:
        return t.apply(p, s, None, x, training)  # type: ignore[no-any-return]

    return Layer(params, state, apply)


def _equinox(ours: bool) -> Builder:
    """equinox.nn.BatchNorm, or (`ours`) jaxbn.equinox.BatchNorm swapped in for it: the same code otherwise."""

    def build(shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None) -> Layer:
        return _equinox_layer(shape, axis, dtype, axis_name, ours)

    return build


def _equinox_layer(
    shape: tuple[int, ...], axis: int, dtype: DTypeLike, axis_name: Hashable | None, ours: bool
) -> Layer:
    import equinox as eqx

    batch_norm = importlib.import_module("jaxbn.equinox").BatchNorm if ours else eqx.nn.BatchNorm
    feat = axis % len(shape)
    vname = "_bench_batch"
    names = vname if axis_name is None else (vname, axis_name)
    model, state = eqx.nn.make_with_state(batch_norm)(shape[feat], axis_name=names, mode="batch")
    params = {"scale": model.weight, "bias": model.bias}

    def apply(p: PyTree, s: PyTree, x: jax.Array, training: bool) -> tuple[jax.Array, PyTree]:
        m = eqx.tree_at(lambda m: (m.weight, m.bias), model, (p["scale"], p["bias"]))

        def one(xi: jax.Array, st: PyTree) -> tuple[jax.Array, PyTree]:
            return m(xi, st, inference=not training)  # type: ignore[no-any-return]

        y, new = jax.vmap(one, axis_name=vname, in_axes=(0, None), out_axes=(0, None))(x, s)
        return y.astype(x.dtype), new

    # equinox takes one example at a time, channels first: give it that layout.
    return Layer(params, state, apply, prepare=lambda x: jnp.moveaxis(x, feat, 1) if feat != 1 else x)


#: name -> implementation, in table order.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "jaxbn": Implementation("jaxbn", _jaxbn, "jaxbn.batch_norm (fused closed-form derivative)"),
    "jaxbn.linen": Implementation(
        "jaxbn.linen", _flax(True, jaxbn_module=True), "jaxbn.linen.BatchNorm (drop-in for flax's)"
    ),
    "flax": Implementation("flax", _flax(True), "flax.linen.BatchNorm (default: use_fast_variance=True)"),
    "flax-exact": Implementation("flax", _flax(False), "flax.linen.BatchNorm(use_fast_variance=False)"),
    "haiku": Implementation("haiku", _haiku(False), "haiku.BatchNorm (create_scale, create_offset)"),
    "jaxbn.haiku": Implementation("haiku", _haiku(True), "jaxbn.haiku.BatchNorm (drop-in for haiku's, same call)"),
    "equinox": Implementation(
        "equinox", _equinox(False), "equinox.nn.BatchNorm(mode='batch') under jax.vmap, channels first"
    ),
    "jaxbn.equinox": Implementation(
        "equinox", _equinox(True), "jaxbn.equinox.BatchNorm(mode='batch') (drop-in for equinox's, same call)"
    ),
}
#: The implementation every speedup is relative to.
REFERENCE = "flax"
#: Implementations other than jaxbn: the "anchors".
ANCHORS = ("flax", "flax-exact", "haiku", "equinox")


def available(names: Sequence[str], known: Sequence[str] = tuple(IMPLEMENTATIONS)) -> tuple[list[str], dict[str, str]]:
    """Splits `names` into importable implementations and `{name: reason}` for the others.

    Raises:
      ValueError: a name is not in `known`.
    """
    ok, skipped = [], {}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(known)}")
        module = IMPLEMENTATIONS[name].module if name in IMPLEMENTATIONS else None
        try:
            if module:
                importlib.import_module(module)
        except ImportError as e:
            skipped[name] = f"not installed ({e})"
        else:
            ok.append(name)
    return ok, skipped


#: The timed programs of the layer benchmark, in table order.
MODES = ("train", "train+grad", "infer")
MODE_TITLES = {
    "train": "training forward (y, updated stats)",
    "train+grad": "training forward + backward (y, stats, d/dx, d/dscale, d/dbias)",
    "infer": "inference forward (running stats)",
}
#: Bytes a batch norm must move, in units of x's bytes (the pass model): read x twice
#: (statistics, normalization) and write y in training; read x, write y at inference;
#: forward + backward adds reading x and dy twice and writing dx.
PASSES = {"train": 3, "train+grad": 8, "infer": 2}


def programs(layer: Layer) -> dict[str, Callable[..., object]]:
    """The three timed functions of `layer` (not yet jitted), keyed by mode.

    `train(x, p, s)`, `train+grad(x, p, s, ct)`, `infer(x, p, s)`.
    """

    def train(x: jax.Array, p: PyTree, s: PyTree) -> tuple[jax.Array, PyTree]:
        return layer.apply(p, s, x, True)

    def train_grad(x: jax.Array, p: PyTree, s: PyTree, ct: jax.Array) -> PyTree:
        y, vjp, new = jax.vjp(lambda x, p: layer.apply(p, s, x, True), x, p, has_aux=True)
        dx, dp = vjp(ct)
        return y, new, dx, dp

    def infer(x: jax.Array, p: PyTree, s: PyTree) -> jax.Array:
        return layer.apply(p, s, x, False)[0]

    return {"train": train, "train+grad": train_grad, "infer": infer}


def residual_bytes(layer: Layer, x: jax.Array, features: int) -> tuple[int, int]:
    """Bytes of the residuals `jax.vjp` keeps for the training forward (traced, nothing runs).

    Each distinct residual array counts once; `x` counts if it is kept.

    Returns:
      `(batch_sized, small)`: bytes of the residuals with more elements than
      `features` (they grow with the batch) and of the others (per-feature
      vectors, scalars).
    """

    def residuals(x: jax.Array, p: PyTree) -> list[jax.Array]:
        _, vjp, _ = jax.vjp(lambda x, p: layer.apply(p, layer.state, x, True), x, p, has_aux=True)
        return jax.tree_util.tree_leaves(vjp)

    closed = jax.make_jaxpr(residuals)(x, layer.params)
    seen: set[int] = set()
    big = small = 0
    for v in closed.jaxpr.outvars:
        aval = getattr(v, "aval", None)
        if aval is None or id(v) in seen or not hasattr(aval, "shape"):
            continue
        seen.add(id(v))
        size = math.prod(aval.shape)
        nbytes = size * np.dtype(aval.dtype).itemsize
        if size > features:
            big += nbytes
        else:
            small += nbytes
    return big, small
