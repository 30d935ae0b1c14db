"""Argument validation shared by every jaxbn entry point.

Every check runs at trace time on static shapes and Python values, so a bad
call fails before anything is compiled, with a message that names the
argument, the shapes involved and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

Axes = int | Sequence[int]
#: A collective's axis name (bound by pmap, vmap or shard_map), a tuple of them, or None.
AxisName = Hashable | tuple[Hashable, ...]
#: `jax.lax.psum`'s `axis_index_groups`: a partition of the axis indices, or None.
AxisIndexGroups = Sequence[Sequence[int]] | None
#: How synchronized moments cross devices (see `jaxbn.moments`).
Strategy = Literal["auto", "gather", "psum"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def canonical_axes(ndim: int, axis: Axes, *, name: str = "axis") -> tuple[int, ...]:
    """Returns `axis` as a sorted tuple of non-negative ints, validated for `ndim`."""
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        axes: tuple[object, ...] = (axis,)
    elif isinstance(axis, Sequence):
        axes = tuple(axis)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
    if not axes:
        raise ValueError(f"{name} must name at least one feature axis, got {axis!r}")
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input with {ndim} dimensions "
                f"(valid axes are {-ndim}..{ndim - 1})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice")
    return tuple(sorted(out))


def check_input(x: ArrayLike, *, name: str = "x") -> jax.Array:
    """Returns `x` as an array; raises TypeError unless it is floating or complex."""
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
        raise TypeError(
            f"{name} must be a floating-point or complex array, got dtype {x.dtype} with "
            f"shape {x.shape}; cast it first, e.g. {name}.astype(jnp.float32)"
        )
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return x


def check_feature_array(
    value: ArrayLike | None, name: str, expected: tuple[int, ...], x_shape: Sequence[int], axis: Axes, hint: str = ""
) -> jax.Array | None:
    """Checks that a per-feature array (`scale`, `stats.mean`, ...) has the feature shape."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.shape != expected and value.size == math.prod(expected) and value.ndim <= len(x_shape):
        # A broadcast-shaped array such as (1, 1, 1, C): accept it when its
        # non-unit dimensions are exactly the features.
        squeezed = tuple(d for d in value.shape if d != 1)
        if squeezed == tuple(d for d in expected if d != 1):
            return value.reshape(expected)
    if value.shape != expected:
        raise ValueError(
            f"{name} has shape {value.shape} but x of shape {tuple(x_shape)} has feature "
            f"shape {expected} on axis={axis!r}{hint}"
        )
    return value


def check_broadcast(
    value: ArrayLike, name: str, shape: Sequence[int], *, target: str = "x", hint: str = ""
) -> jax.Array:
    """`value` as an array of the rank of `shape`; a ValueError unless it broadcasts to `shape`.

    numpy's broadcasting rule, spelled out (leading 1s added) so that
    code run with rank promotion "raise" accepts the result.

    Args:
      value: the array to check (a mask, haiku's call-time `scale`, ...).
      name: its argument name, for the message.
      shape: the shape it must broadcast to.
      target: what `shape` is, for the message ("x", "inputs", "the example x").
      hint: appended to the message (the framework's fix).

    >>> check_broadcast(jnp.ones(3), "scale", (2, 3)).shape
    (1, 3)
    >>> check_broadcast(jnp.ones(4), "scale", (5, 3), target="inputs")
    Traceback (most recent call last):
    ValueError: scale of shape (4,) does not broadcast to inputs of shape (5, 3)
    """
    value = jnp.asarray(value)
    shape = tuple(shape)
    ok = value.ndim <= len(shape) and all(v in (1, s) for v, s in zip(value.shape[::-1], shape[::-1], strict=False))
    if not ok:
        raise ValueError(f"{name} of shape {value.shape} does not broadcast to {target} of shape {shape}{hint}")
    return value.reshape((1,) * (len(shape) - value.ndim) + value.shape)


def check_mask(
    mask: ArrayLike | None, x_shape: Sequence[int], *, target: str = "x", hint: str = ""
) -> jax.Array | None:
    """`mask` as a bool array of x's rank, or None; the one mask check of every entry point.

    Bool and integer (0/1) masks are accepted, floating and complex ones
    refused (a weight array is not a mask). `target` and `hint` name the
    framework's input in the message, as in `check_broadcast`.

    Raises:
      TypeError: a floating-point or complex mask.
      ValueError: a mask that does not broadcast to `x_shape`.

    >>> check_mask(jnp.array([1, 0]), (2, 3)).tolist()
    Traceback (most recent call last):
    ValueError: mask of shape (2,) does not broadcast to x of shape (2, 3)
    >>> check_mask(jnp.array([[1], [0]]), (2, 3)).tolist()
    [[True], [False]]
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if jnp.issubdtype(mask.dtype, jnp.inexact):
        raise TypeError(
            f"mask must be a boolean array, got dtype {mask.dtype} with shape {mask.shape}; use mask > 0 for a "
            "weight array (integer 0/1 masks are accepted too)"
        )
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return check_broadcast(mask, "mask", x_shape, target=target, hint=hint)


def check_momentum(momentum: object, *, torch: bool = False) -> None:
    """momentum must be None (cumulative average) or a real number in [0, 1].

    A Python or numpy number, or a 0-d real array (a traced value passes
    unchecked); strings such as ``'0.9'`` and bools are refused.

    Args:
      momentum: the value to check.
      torch: whether it is PyTorch's momentum (the weight of the new batch),
        for the hint in the message.

    Raises:
      TypeError: not a real number or None.
      ValueError: outside [0, 1].

    >>> check_momentum("0.9")
    Traceback (most recent call last):
    TypeError: momentum must be a float in [0, 1] or None, got '0.9'
    """
    if momentum is None or isinstance(momentum, jax.core.Tracer):
        return
    real_array = (
        isinstance(momentum, np.ndarray | jax.Array)
        and momentum.ndim == 0
        and (jnp.issubdtype(momentum.dtype, jnp.floating) or jnp.issubdtype(momentum.dtype, jnp.integer))
    )
    if isinstance(momentum, bool) or not (isinstance(momentum, numbers.Real) or real_array):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:  # type: ignore[arg-type]
        hint = (
            "PyTorch's momentum is the weight of the new batch (default 0.1)"
            if torch
            else "jaxbn's momentum is the EMA decay (new = momentum * old + (1 - momentum) * batch), "
            "so PyTorch's 0.1 is jaxbn's 0.9"
        )
        raise ValueError(f"momentum={momentum!r} is outside [0, 1]; {hint}")


def check_virtual_batch_size(size: object) -> None:
    """virtual_batch_size must be None or an int >= 1 (ghost batches).

    >>> check_virtual_batch_size(0)
    Traceback (most recent call last):
    ValueError: virtual_batch_size must be None or an int >= 1, got 0
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"virtual_batch_size must be None or an int >= 1, got {size!r}")


def check_float(value: np.ndarray | jax.Array, name: str, *, complex_ok: bool = True) -> None:
    """Raises TypeError unless `value` (numpy or jax) has a floating (or, if allowed, complex) dtype.

    >>> check_float(np.arange(3), "kernel")
    Traceback (most recent call last):
    TypeError: kernel must be a floating-point array, got dtype int64 with shape (3,)
    """
    ok = jnp.issubdtype(value.dtype, jnp.floating) or (complex_ok and jnp.issubdtype(value.dtype, jnp.complexfloating))
    if not ok:
        raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype} with shape {value.shape}")


def check_module_path(path: object, what: str) -> tuple[str, ...]:
    """A module path in a Flax variables tree: ``"Conv_0"``, ``"block1/Conv_0"`` or a tuple of names.

    >>> check_module_path("block1/Conv_0", "layer path")
    ('block1', 'Conv_0')
    """
    if isinstance(path, str):
        parts = tuple(s for s in path.split("/") if s)
    elif isinstance(path, Sequence) and all(isinstance(s, str) for s in path):
        parts = tuple(path)
    else:
        raise TypeError(f"{what} must be a module name, an 'a/b' path or a tuple of names, got {path!r}")
    if not parts:
        raise ValueError(f"{what} must name a module, got {path!r}")
    return parts


def check_epsilon(epsilon: object) -> None:
    """epsilon must be a finite number > 0 (a traced value passes unchecked).

    >>> check_epsilon(float("inf"))
    Traceback (most recent call last):
    ValueError: epsilon must be > 0 and finite, got inf: every output would be 0
    """
    if isinstance(epsilon, jax.core.Tracer):
        return
    if isinstance(epsilon, bool | str) or not isinstance(epsilon, numbers.Real | np.ndarray | jax.Array):
        raise TypeError(f"epsilon must be a number > 0, got {epsilon!r}")
    value = float(epsilon)  # type: ignore[arg-type]
    if not value > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    if not math.isfinite(value):
        raise ValueError(f"epsilon must be > 0 and finite, got {epsilon!r}: every output would be 0")


def axis_size(axis_name: AxisName, axis_index_groups: AxisIndexGroups = None) -> int:
    """Number of participants in a collective over `axis_name`, or a clear NameError."""
    check_axis_name(axis_name)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    size = 1
    for n in names:
        try:
            size *= lax.axis_size(n)
        except NameError as e:
            raise NameError(
                f"axis_name={axis_name!r}: the axis {n!r} is not bound here. Bind it by "
                f"calling under jax.pmap(..., axis_name={n!r}), jax.vmap(..., axis_name={n!r}) "
                f"or jax.shard_map over a mesh with an axis named {n!r}; or pass axis_name=None "
                "(under plain jax.jit on a sharded batch the statistics are global already)"
            ) from e
    if axis_index_groups is not None:
        groups = [list(g) for g in axis_index_groups]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"axis_index_groups must all have the same size, got {axis_index_groups!r}")
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(size)):
            raise ValueError(
                f"axis_index_groups={axis_index_groups!r} must partition the {size} indices of "
                f"axis_name={axis_name!r}"
            )
        size = sizes.pop()
    return size


def check_trainable(shape: Sequence[int], axis: Axes, per_feature: int, axis_name: AxisName) -> None:
    """Training needs more than one value per feature unless `axis_name` brings more from other devices."""
    if per_feature <= 1 and axis_name is None:
        raise ValueError(
            f"training needs more than one value per feature, but x of shape {tuple(shape)} has "
            f"{per_feature} per feature on axis={axis!r}; use a larger batch, set axis_name to "
            "synchronize across devices, or training=False"
        )


def check_renorm_clips(r_max: object, d_max: object) -> None:
    """Batch renorm's clips: r_max >= 1, d_max >= 0 (traced values are not checked)."""
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, jax.core.Tracer):
            continue
        if isinstance(value, bool | str) or not isinstance(value, numbers.Real | np.ndarray | jax.Array):
            raise TypeError(f"{name} must be a number >= {low:g}, got {value!r}")
        if not float(value) >= low:  # type: ignore[arg-type]
            raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


def check_training(training: object, name: str = "training") -> None:
    """`training` must be a bool (Python, numpy, or a concrete 0-d bool array): None is refused, not read as False.

    >>> check_training(None)
    Traceback (most recent call last):
    TypeError: training must be True or False, got None; ...
    """
    if isinstance(training, bool | np.bool_):
        return
    concrete = isinstance(training, np.ndarray | jax.Array) and not isinstance(training, jax.core.Tracer)
    if concrete and training.ndim == 0 and training.dtype == np.bool_:  # type: ignore[attr-defined]
        return
    if isinstance(training, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool, got a traced value {training!r}; mark it static "
            f"(jax.jit(..., static_argnames={name!r})) or branch with jax.lax.cond"
        )
    raise TypeError(
        f"{name} must be True or False, got {training!r}; {name}=None is not read as False: "
        "pass training=False for inference"
    )


def check_axis_name(axis_name: object) -> None:
    """`axis_name` must be None, a hashable name, or a tuple of names (a list is refused).

    >>> check_axis_name(["data", "model"])
    Traceback (most recent call last):
    TypeError: axis_name must be a name or a tuple of names, got the list ['data', 'model']; ...
    """
    if isinstance(axis_name, list):
        raise TypeError(
            f"axis_name must be a name or a tuple of names, got the list {axis_name!r}; "
            f"pass axis_name={tuple(axis_name)!r}"
        )
    if not isinstance(axis_name, Hashable):
        raise TypeError(f"axis_name must be a name or a tuple of names, got {type(axis_name).__name__} {axis_name!r}")


def check_strategy(strategy: object) -> None:
    """`strategy` must be one of "auto", "gather", "psum" (how synchronized moments cross devices).

    >>> check_strategy("mean")
    Traceback (most recent call last):
    ValueError: strategy must be 'auto', 'gather' or 'psum', got 'mean'
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto', 'gather' or 'psum', got {strategy!r}")
