"""Folding an inference-mode batch norm into the Dense or Conv layer before it.

A batch norm in inference mode is an affine map per output feature::

    bn(z) = (z - mean) / sqrt(var + epsilon) * scale + bn_bias = z * m + (bn_bias - mean * m)

with ``m = scale / sqrt(var + epsilon)``. When ``z = layer(kernel, bias)(x)``
is linear in the kernel per output feature (Dense, DenseGeneral, Conv of any
dimension, stride, padding, dilation and ``feature_group_count``), the two
collapse into one layer::

    kernel' = kernel * m             (scaled along the output-feature axes)
    bias'   = (bias - mean) * m + bn_bias

`fold` does this for one layer; `fold_linen` for every (layer, batch norm)
pair of a Flax Linen model's variables (also public as
`jaxbn.interop.fold_linen`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._checks import check_epsilon

__all__ = ["fold", "fold_linen"]

_LAYOUTS = (
    "the kernel's last axis (or, for a multi-axis feature shape F, its last len(F) axes) must be the "
    "output features, as in flax's Dense (in, out), DenseGeneral (..., *features) and Conv "
    "(*window, in // feature_group_count, out)"
)


def _stats_arrays(stats: Any) -> tuple[jax.Array, jax.Array]:
    if isinstance(stats, Mapping):
        if "mean" not in stats or "var" not in stats:
            raise TypeError(
                f"stats must be a jaxbn.RunningStats or a mapping with 'mean' and 'var' (a flax "
                f"batch_stats entry), got a mapping with keys {sorted(stats)}"
            )
        mean, var = stats["mean"], stats["var"]
    elif hasattr(stats, "mean") and hasattr(stats, "var") and not hasattr(stats, "shape"):
        mean, var = stats.mean, stats.var
    else:
        raise TypeError(
            "stats must be a jaxbn.RunningStats (or anything with .mean and .var, or a mapping "
            f"with 'mean' and 'var' such as a flax batch_stats entry), got {type(stats).__name__}"
        )
    return jnp.asarray(mean), jnp.asarray(var)


def _check_float(value: jax.Array, name: str) -> None:
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.complexfloating)):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {value.dtype} with shape {value.shape}"
        )


def fold(
    kernel: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None,
    stats: Any,
    scale: jax.typing.ArrayLike | None = None,
    bn_bias: jax.typing.ArrayLike | None = None,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode batch norm into the Dense or Conv layer before it.

    Returns ``(kernel', bias')`` such that
    ``layer(kernel', bias')(x) == batch_norm(layer(kernel, bias)(x), stats, scale,
    bn_bias, training=False, epsilon=epsilon)``, with::

        m       = scale / sqrt(stats.var + epsilon)
        kernel' = kernel * m                       (along the output-feature axis)
        bias'   = (bias - stats.mean) * m + bn_bias

    Supported layouts: the kernel's LAST axis is its output-feature axis, the
    layout of flax's ``Dense`` (``(in, out)``), ``Conv`` of any rank
    (``(*window, in // feature_group_count, out)``), ``ConvLocal`` and
    ``ConvTranspose``. Grouped and depthwise convolutions (any
    ``feature_group_count``), strides, dilations and any padding are covered:
    the batch norm scales each output feature, and each output feature owns
    its slice ``kernel[..., o]`` whatever the grouping. For a multi-axis feature shape ``F`` (``DenseGeneral``
    with ``features=(a, b)`` followed by a batch norm over ``axis=(-2, -1)``)
    the kernel's last ``len(F)`` axes must be ``F``. PyTorch layouts
    (``(out, in, kh, kw)``) are not: transpose to the flax layout first. The
    batch norm must normalize the layer's output feature axis (flax's
    ``axis=-1`` on NHWC activations), and nothing nonlinear may sit between
    the layer and the batch norm.

    The arithmetic is done in float32 (or wider, for float64 inputs under
    x64); ``kernel'`` keeps ``kernel``'s dtype and ``bias'`` keeps ``bias``'s
    dtype (``kernel``'s dtype when ``bias`` is None). Complex running means
    (from complex inputs) give a complex ``bias'``.

    Args:
      kernel: the layer's kernel, output features on the last axis.
      bias: the layer's bias, feature-shaped, or None for ``use_bias=False``
        (``bias'`` is then created: build the folded layer with a bias).
      stats: the batch norm's running statistics: a `jaxbn.RunningStats`, or
        a flax ``batch_stats`` entry ``{'mean': ..., 'var': ...}``.
      scale: the batch norm's scale (None: ``use_scale=False``, i.e. 1).
      bn_bias: the batch norm's bias (None: ``use_bias=False``, i.e. 0).
      epsilon: the batch norm's epsilon, > 0.

    Returns:
      ``(kernel', bias')``: the kernel's shape and dtype, and a feature-shaped bias.

    Raises:
      ValueError: a feature shape that does not match the kernel's output
        features, a kernel with no input axis, ``epsilon <= 0``.
      TypeError: a non-float kernel, bias or statistic, or ``stats`` of the wrong kind.

    >>> import jax.numpy as jnp, jaxbn
    >>> kernel, bias = jnp.ones((3, 2)), jnp.array([1.0, 2.0])
    >>> stats = jaxbn.RunningStats(mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 1.0]), count=jnp.array(1))
    >>> k, b = jaxbn.fold(kernel, bias, stats, scale=jnp.array([2.0, 1.0]), epsilon=1e-6)
    >>> k.round(3).tolist(), b.round(3).tolist()
    ([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [0.0, 2.0])
    """
    check_epsilon(epsilon)
    kernel = jnp.asarray(kernel)
    _check_float(kernel, "kernel")
    mean, var = _stats_arrays(stats)
    _check_float(mean, "stats.mean")
    _check_float(var, "stats.var")
    if jnp.iscomplexobj(var):
        raise TypeError(f"stats.var must be real, got dtype {var.dtype}")
    fshape = tuple(mean.shape)
    k = len(fshape)
    if k == 0:
        raise ValueError(
            "stats.mean is a scalar; it must have the feature shape, e.g. (features,) for a "
            f"kernel of shape {kernel.shape}"
        )
    if kernel.ndim <= k:
        raise ValueError(
            f"kernel of shape {kernel.shape} has no input axis for the feature shape {fshape} of "
            f"stats.mean; {_LAYOUTS}"
        )
    out_shape = tuple(kernel.shape[-k:])
    if out_shape != fshape:
        raise ValueError(
            f"stats.mean has shape {fshape} but the kernel of shape {kernel.shape} has {out_shape} "
            f"output features on its last {'axis' if k == 1 else f'{k} axes'}; {_LAYOUTS}"
        )

    def feat(value: Any, name: str) -> jax.Array | None:
        if value is None:
            return None
        value = jnp.asarray(value)
        _check_float(value, name)
        if value.shape != fshape:
            raise ValueError(
                f"{name} has shape {value.shape} but the kernel of shape {kernel.shape} has "
                f"{fshape} output features (stats.mean has shape {fshape})"
            )
        return value

    var_ = feat(var, "stats.var")
    scale_, bias_, bn_bias_ = feat(scale, "scale"), feat(bias, "bias"), feat(bn_bias, "bn_bias")
    assert var_ is not None

    # Arithmetic in at least float32; complex only where a complex value comes in.
    given = (v.dtype for v in (mean, var_, scale_, bias_, bn_bias_) if v is not None)
    dt = jnp.result_type(jnp.float32, kernel.dtype, *given)
    real_dt = jnp.finfo(dt).dtype  # float part of a complex dtype
    mul = lax.rsqrt(var_.astype(real_dt) + jnp.asarray(epsilon, real_dt))
    if scale_ is not None:
        mul = mul * scale_.astype(jnp.result_type(real_dt, scale_.dtype))
    new_kernel = kernel.astype(jnp.result_type(real_dt, kernel.dtype)) * jnp.reshape(
        mul, (1,) * (kernel.ndim - k) + fshape
    )
    new_bias = -mean.astype(jnp.result_type(real_dt, mean.dtype))
    if bias_ is not None:
        new_bias = bias_.astype(jnp.result_type(real_dt, bias_.dtype)) + new_bias
    new_bias = new_bias * mul
    if bn_bias_ is not None:
        new_bias = new_bias + bn_bias_.astype(jnp.result_type(real_dt, bn_bias_.dtype))

    def out_dtype(base: Any, value: jax.Array) -> Any:
        if jnp.iscomplexobj(value) and not jnp.issubdtype(base, jnp.complexfloating):
            return jnp.promote_types(base, jnp.complex64)
        return base

    kernel_dtype = out_dtype(kernel.dtype, new_kernel)
    bias_dtype = out_dtype(bias_.dtype if bias_ is not None else kernel.dtype, new_bias)
    return new_kernel.astype(kernel_dtype), new_bias.astype(bias_dtype)


Path = str | Sequence[str]


def _path(p: Any, what: str) -> tuple[str, ...]:
    if isinstance(p, str):
        parts = tuple(s for s in p.split("/") if s)
    elif isinstance(p, Sequence) and all(isinstance(s, str) for s in p):
        parts = tuple(p)
    else:
        raise TypeError(f"{what} must be a module name, an 'a/b' path or a tuple of names, got {p!r}")
    if not parts:
        raise ValueError(f"{what} must name a module, got {p!r}")
    return parts


def _to_dict(tree: Any) -> Any:
    """A nested copy with plain dicts (FrozenDicts unfrozen), leaves shared."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _get(tree: Mapping, path: tuple[str, ...], collection: str) -> Any:
    node: Any = tree
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            have = sorted(node) if isinstance(node, Mapping) else []
            where = "/".join(path[:i]) or "the top level"
            raise KeyError(
                f"{'/'.join(path)!r} is not in variables[{collection!r}]: no {name!r} under {where} "
                f"(found {have})"
            )
        node = node[name]
    return node


def _pop(tree: dict, path: tuple[str, ...]) -> None:
    """Removes tree[path] if present, and every dict left empty on the way up."""
    nodes = [tree]
    for name in path[:-1]:
        nxt = nodes[-1].get(name)
        if not isinstance(nxt, dict):
            return
        nodes.append(nxt)
    nodes[-1].pop(path[-1], None)
    for parent, name in zip(reversed(nodes[:-1]), reversed(path[:-1]), strict=True):
        child = parent.get(name)
        if isinstance(child, dict) and not child:
            del parent[name]


def fold_linen(
    variables: Mapping[str, Any],
    pairs: Sequence[tuple[Path, Path]],
    *,
    epsilon: float = 1e-5,
) -> dict[str, Any]:
    """Folds each Linen batch norm into the Dense or Conv before it, over a whole model.

    Each pair names a layer (a ``Dense``, ``DenseGeneral`` or ``Conv``: params
    ``kernel`` and optionally ``bias``) and the batch norm applied to its output
    (``flax.linen.BatchNorm`` or ``jaxbn.linen.BatchNorm`` over the last axis:
    params ``scale``/``bias`` as present, ``batch_stats`` ``mean``/``var``).
    Names are module paths as in the variables tree: ``"Conv_0"``,
    ``"block1/Conv_0"`` or ``("block1", "Conv_0")``.

    The result holds the variables of the same model built WITHOUT those
    batch norms and with ``use_bias=True`` on the folded layers: each layer's
    ``kernel`` and ``bias`` are folded (a bias is created where the layer had
    none), the batch norms' ``params`` and ``batch_stats`` entries are
    removed (and collections or modules left empty with them). Other entries
    and collections are kept as they are. ``variables`` is not modified.

    Args:
      variables: the model's variables, ``{'params': ..., 'batch_stats': ...}``.
      pairs: ``[(layer_path, bn_path), ...]``.
      epsilon: the batch norms' epsilon (flax's default 1e-5).

    Returns:
      The folded variables, a plain (nested) dict.

    Raises:
      KeyError: a path that is not in the variables.
      ValueError: a layer or batch norm named twice, or shapes that do not fold (see `fold`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxbn.interop import fold_linen
    >>> with_bn = nn.Sequential([nn.Dense(3, use_bias=False), nn.BatchNorm(use_running_average=True)])
    >>> x = jnp.ones((2, 4))
    >>> variables = with_bn.init(jax.random.key(0), x)
    >>> folded = fold_linen(variables, [("layers_0", "layers_1")])
    >>> sorted(folded), sorted(folded["params"]["layers_0"])
    (['params'], ['bias', 'kernel'])
    >>> y = nn.Sequential([nn.Dense(3)]).apply(folded, x)
    >>> bool(jnp.allclose(y, with_bn.apply(variables, x), atol=1e-5))
    True
    """
    check_epsilon(epsilon)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "variables must be a flax variables mapping with a 'params' collection, got "
            f"{type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    out = _to_dict(variables)
    params = out["params"]
    batch_stats = out.get("batch_stats", {})
    seen: set[tuple[str, ...]] = set()
    folded: list[tuple[tuple[str, ...], tuple[str, ...], jax.Array, jax.Array]] = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise TypeError(f"each pair must be (layer_path, bn_path), got {pair!r}")
        layer = _path(pair[0], "layer path")
        bn = _path(pair[1], "batch-norm path")
        for p in (layer, bn):
            if p in seen:
                raise ValueError(f"{'/'.join(p)!r} appears in more than one pair")
            seen.add(p)
        layer_params = _get(params, layer, "params")
        if not isinstance(layer_params, Mapping) or "kernel" not in layer_params:
            have = sorted(layer_params) if isinstance(layer_params, Mapping) else type(layer_params).__name__
            raise ValueError(f"layer {'/'.join(layer)!r} has no 'kernel' param (found {have}); name a Dense or Conv")
        stats = _get(batch_stats, bn, "batch_stats")
        bn_params: Mapping = {}
        try:
            bn_params = _get(params, bn, "params")
        except KeyError:  # use_scale=False and use_bias=False: no params
            pass
        try:
            kernel, bias = fold(
                layer_params["kernel"], layer_params.get("bias"), stats,
                bn_params.get("scale"), bn_params.get("bias"), epsilon=epsilon,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"folding {'/'.join(bn)!r} into {'/'.join(layer)!r}: {e}") from e
        folded.append((layer, bn, kernel, bias))
    for layer, bn, kernel, bias in folded:
        node = _get(params, layer, "params")
        node["kernel"], node["bias"] = kernel, bias
        _pop(params, bn)
        _pop(batch_stats, bn)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    return out
