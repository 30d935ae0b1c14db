"""Folding an inference-mode batch norm into the Dense or Conv layer before it.

A batch norm in inference mode is an affine map per output feature::

    bn(z) = (z - mean) / sqrt(var + epsilon) * scale + bn_bias = z * m + (bn_bias - mean * m)

with ``m = scale / sqrt(var + epsilon)``. When ``z = layer(kernel, bias)(x)``
is linear in the kernel per output feature (Dense, DenseGeneral, Conv of any
dimension, stride, padding, dilation and ``feature_group_count``), the two
collapse into one layer::

    kernel' = kernel * m             (scaled along the output-feature axes)
    bias'   = (bias - mean) * m + bn_bias

`fold` does this for one layer (`jaxbn.interop.fold_linen` does it for every
(layer, batch norm) pair of a Flax Linen model's variables).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn._checks import check_epsilon, check_float
from jaxbn._running import Moments, RunningStats

__all__ = ["fold"]

_LAYOUTS = (
    "the kernel's last axis (or, for a multi-axis feature shape F, its last len(F) axes) must be the "
    "output features, as in flax's Dense (in, out), DenseGeneral (..., *features) and Conv "
    "(*window, in // feature_group_count, out)"
)


def _stats_arrays(stats: RunningStats | Mapping[str, ArrayLike]) -> tuple[jax.Array, jax.Array]:
    if isinstance(stats, Mapping):
        if "mean" not in stats or "var" not in stats:
            raise TypeError(
                f"stats must be a jaxbn.RunningStats or a mapping with 'mean' and 'var' (a flax "
                f"batch_stats entry), got a mapping with keys {sorted(stats)}"
            )
        mean, var = stats["mean"], stats["var"]
    elif isinstance(stats, Moments):
        raise TypeError(
            "stats must be the running statistics (a jaxbn.RunningStats), got a jaxbn.Moments: one batch's "
            "moments; fold them in with jaxbn.update_stats first"
        )
    elif hasattr(stats, "mean") and hasattr(stats, "var") and not hasattr(stats, "shape"):
        mean, var = stats.mean, stats.var
    else:
        raise TypeError(
            "stats must be a jaxbn.RunningStats (or anything with .mean and .var, or a mapping "
            f"with 'mean' and 'var' such as a flax batch_stats entry), got {type(stats).__name__}"
        )
    return jnp.asarray(mean), jnp.asarray(var)


def fold(
    kernel: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None,
    stats: RunningStats | Mapping[str, ArrayLike],
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
    check_float(kernel, "kernel")
    mean, var = _stats_arrays(stats)
    check_float(mean, "stats.mean")
    check_float(var, "stats.var")
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

    def feat(value: ArrayLike | None, name: str) -> jax.Array | None:
        if value is None:
            return None
        value = jnp.asarray(value)
        check_float(value, name)
        if value.shape != fshape:
            raise ValueError(
                f"{name} has shape {value.shape} but the kernel of shape {kernel.shape} has "
                f"{fshape} output features (stats.mean has shape {fshape})"
            )
        return value

    var_ = feat(var, "stats.var")
    scale_, bias_, bn_bias_ = feat(scale, "scale"), feat(bias, "bias"), feat(bn_bias, "bn_bias")
    assert var_ is not None

    # Arithmetic in at least float32; complex only where a complex value comes in: the mixed real/complex
    # products are meant, so they run under standard promotion also under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
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

    def out_dtype(base: np.dtype, value: jax.Array) -> np.dtype:
        if jnp.iscomplexobj(value) and not jnp.issubdtype(base, jnp.complexfloating):
            with jax.numpy_dtype_promotion("standard"):
                return jnp.promote_types(base, jnp.complex64)
        return base

    kernel_dtype = out_dtype(kernel.dtype, new_kernel)
    bias_dtype = out_dtype(bias_.dtype if bias_ is not None else kernel.dtype, new_bias)
    return new_kernel.astype(kernel_dtype), new_bias.astype(bias_dtype)
