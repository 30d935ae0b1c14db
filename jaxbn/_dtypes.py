"""The modules' dtype policy: which dtype goes in and which comes out.

The functional core refuses integer inputs and keeps the input dtype; the
framework modules (Flax, equinox, haiku) follow their frameworks instead:
integer and bool inputs are promoted to float, and the output dtype is the
module's `dtype` or the promotion of the input and parameter dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike


def as_float(x: ArrayLike) -> jax.Array:
    """`x` as an array; integer and bool inputs are promoted to float as flax does.

    >>> as_float(jnp.array([1, 2], jnp.int32)).dtype
    dtype('float32')
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(promote(x.dtype, jnp.float32))
    return x


def promote(*dtypes: DTypeLike) -> np.dtype:
    """JAX's standard promotion of `dtypes`, also under `jax_numpy_dtype_promotion="strict"`.

    The modules choose their output dtype by flax's promotion rule on
    purpose; strict mode (equinox's and haiku's test setting) refuses that
    rule for implicit promotions only, so it is applied explicitly here.

    >>> promote(jnp.bfloat16, jnp.float32), promote(jnp.int32, jnp.float32)
    (dtype('float32'), dtype('float32'))
    """
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*dtypes))


def output_dtype(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: DTypeLike | None) -> np.dtype:
    """flax's rule: `dtype`, or the promotion of the input and parameter dtypes (at least float).

    >>> output_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), None, None)
    dtype('float32')
    >>> output_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), None, jnp.bfloat16)
    dtype(bfloat16)
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    out = promote(*[a.dtype for a in (x, scale, bias) if a is not None])
    if not jnp.issubdtype(out, jnp.inexact):
        out = promote(out, jnp.float32)
    return out
