"""Interchange with PyTorch, and deployment helpers.

PyTorch's ``BatchNorm1d/2d/3d`` keep ``weight``, ``bias`` (when
``affine=True``), ``running_mean``, ``running_var`` and
``num_batches_tracked``; jaxbn and Flax keep ``params/{scale, bias}`` and
``batch_stats/{mean, var}``. The values are the same per-channel vectors:

=======================  ===========================
PyTorch state dict       jaxbn / Flax variables
=======================  ===========================
``weight``               ``params/scale``
``bias``                 ``params/bias``
``running_mean``         ``batch_stats/mean``
``running_var``          ``batch_stats/var``
``num_batches_tracked``  (``count``, optional)
=======================  ===========================

Layouts. PyTorch activations are NCHW: normalize them with ``axis=1``
(``jaxbn.batch_norm(x, stats, axis=1)``, ``jaxbn.linen.BatchNorm(axis=1)``),
or transpose the input to NHWC and keep flax's default ``axis=-1``; the
variables are per channel and do not change. PyTorch kernels are
``(out, in, *window)``; flax's are ``(*window, in, out)``: see
`kernel_from_torch`.

Momentum runs the other way. PyTorch's ``momentum`` is the weight of the new
batch, jaxbn's (flax's) is the decay of the old value::

    torch:  running = (1 - m_torch) * running + m_torch * batch
    jaxbn:  running = m_jaxbn * running + (1 - m_jaxbn) * batch

so ``m_jaxbn = 1 - m_torch`` (PyTorch's default 0.1 is jaxbn's 0.9), and
``None`` (the cumulative average) is ``None`` on both sides; see
`torch_momentum_to_jaxbn`. PyTorch normalizes with the biased batch variance
but stores the unbiased one (``var * n / (n - 1)``) in ``running_var``: pass
``unbiased=True`` to reproduce its training-time running statistics
exactly.

This module never imports torch: it takes anything ``np.asarray`` takes,
and torch tensors (on any device, with or without grad).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn._fold import _path
from jaxbn._fold import fold_linen as fold_linen

__all__ = [
    "fold_linen",
    "from_torch",
    "from_torch_model",
    "jaxbn_momentum_to_torch",
    "kernel_from_torch",
    "kernel_to_torch",
    "to_torch",
    "to_torch_model",
    "torch_momentum_to_jaxbn",
]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _numpy(value: Any, name: str) -> np.ndarray:
    """np.asarray of a numpy / jax array or a torch tensor (detached, moved to CPU)."""
    if hasattr(value, "detach"):
        value = value.detach()
    if hasattr(value, "cpu") and callable(value.cpu):
        value = value.cpu()
    if str(getattr(value, "dtype", "")) in ("torch.bfloat16", "torch.float16") and hasattr(value, "float"):
        value = value.float()  # numpy has no bfloat16: go through float32
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: cannot convert a {type(value).__name__} to a numpy array ({e})") from e


def _float(value: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype} with shape {value.shape}")
    return value


def _prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if not prefix:
        return dict(state)
    p = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(p) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(p)}


def _check_momentum(m: Any, name: str) -> float | None:
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a float in [0, 1] or None, got {m!r}")
    if not 0.0 <= float(m) <= 1.0:
        raise ValueError(f"{name}={m!r} is outside [0, 1]")
    return float(m)


def torch_momentum_to_jaxbn(momentum: float | None) -> float | None:
    """PyTorch's BatchNorm momentum -> jaxbn's (flax's): ``1 - momentum``.

    PyTorch weights the new batch by ``momentum``; jaxbn decays the old value
    by it. ``None`` (PyTorch's cumulative average) maps to ``None`` (jaxbn's).

    Args:
      momentum: PyTorch's momentum in [0, 1], or None.

    Returns:
      jaxbn's momentum, or None.

    >>> from jaxbn.interop import torch_momentum_to_jaxbn
    >>> torch_momentum_to_jaxbn(0.1), torch_momentum_to_jaxbn(None)
    (0.9, None)
    """
    m = _check_momentum(momentum, "momentum")
    return None if m is None else 1.0 - m


def jaxbn_momentum_to_torch(momentum: float | None) -> float | None:
    """jaxbn's (flax's) momentum -> PyTorch's: ``1 - momentum``; None stays None.

    The inverse of `torch_momentum_to_jaxbn`.

    Args:
      momentum: jaxbn's momentum (the EMA decay) in [0, 1], or None.

    Returns:
      PyTorch's momentum, or None.

    >>> from jaxbn.interop import jaxbn_momentum_to_torch
    >>> round(jaxbn_momentum_to_torch(0.99), 6), jaxbn_momentum_to_torch(None)
    (0.01, None)
    """
    m = _check_momentum(momentum, "momentum")
    return None if m is None else 1.0 - m


def from_torch(
    state: Mapping[str, Any],
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
    count: bool = False,
) -> dict[str, Any]:
    """A PyTorch BatchNorm state dict -> jaxbn/Flax variables.

    ``weight``/``bias`` become ``params/scale``/``params/bias`` and
    ``running_mean``/``running_var`` become ``batch_stats/mean``/``var``. A
    module built with ``affine=False`` has no ``weight``/``bias``: the result
    then has no ``params`` (load it into a batch norm with
    ``use_scale=False, use_bias=False``); a lone ``weight`` or ``bias`` gives
    just that param. ``num_batches_tracked`` is dropped unless ``count=True``.
    For NCHW models normalize with ``axis=1``; the variables are the same.

    Args:
      state: the module's ``state_dict()``, values numpy arrays, torch tensors
        or anything ``np.asarray`` takes (torch is never imported).
      prefix: take the keys under this module prefix, e.g. ``"layer1.0.bn1"``
        for a whole model's state dict (other keys are ignored).
      dtype: dtype of the returned arrays (float32).
      count: also return ``num_batches_tracked`` as ``batch_stats['count']``
        (int32 scalar), the number of updates `jaxbn.RunningStats.count` holds
        and ``jaxbn.linen.BatchNorm(momentum=None)`` keeps (other modules have no count).

    Returns:
      ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` of jax arrays.

    Raises:
      ValueError: missing running statistics (``track_running_stats=False``),
        unknown keys, or vectors whose shapes differ.
      TypeError: non-float values.

    >>> import numpy as np
    >>> from jaxbn.interop import from_torch
    >>> state = {"weight": np.ones(2), "bias": np.zeros(2), "running_mean": np.array([0.5, 1.0]),
    ...          "running_var": np.array([2.0, 3.0]), "num_batches_tracked": np.array(7)}
    >>> v = from_torch(state)
    >>> v["batch_stats"]["mean"].tolist(), v["params"]["scale"].dtype
    ([0.5, 1.0], dtype('float32'))
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping (a state_dict), got {type(state).__name__}")
    where = f" under prefix {prefix!r}" if prefix else ""
    sub = _prefixed(state, prefix)
    unknown = sorted(k for k in sub if k not in _BN_KEYS)
    if unknown:
        hint = (
            "; for a whole model's state dict pass prefix='<module name>' or use from_torch_model"
            if any("." in str(k) for k in unknown)
            else ""
        )
        raise ValueError(
            f"state{where} has keys {unknown} that a PyTorch BatchNorm does not have "
            f"(expected {list(_BN_KEYS)}){hint}"
        )
    if "running_mean" not in sub or "running_var" not in sub:
        raise ValueError(
            f"state{where} has no running_mean/running_var (found {sorted(sub)}): a PyTorch "
            "BatchNorm with track_running_stats=False always normalizes with batch statistics, "
            "which has no inference-mode equivalent to convert; save it with track_running_stats=True"
        )
    arrays = {k: _float(_numpy(sub[k], k), k) for k in ("weight", "bias", "running_mean", "running_var") if k in sub}
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["running_mean"].ndim != 1:
        raise ValueError(f"state{where} must hold vectors of one shape (channels,), got shapes {shapes}")
    out: dict[str, Any] = {}
    names = (("weight", "scale"), ("bias", "bias"))
    params = {new: jnp.asarray(arrays[old], dtype) for old, new in names if old in arrays}
    if params:
        out["params"] = params
    stats = {"mean": jnp.asarray(arrays["running_mean"], dtype), "var": jnp.asarray(arrays["running_var"], dtype)}
    if count:
        n = _numpy(sub["num_batches_tracked"], "num_batches_tracked") if "num_batches_tracked" in sub else 0
        stats["count"] = jnp.asarray(n, jnp.int32).reshape(())
    out["batch_stats"] = stats
    return out


def _get(tree: Mapping, key: str) -> Any:
    return tree[key] if isinstance(tree, Mapping) and key in tree else None


def to_torch(
    variables: Mapping[str, Any], *, num_batches_tracked: int | None = None, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """jaxbn/Flax batch-norm variables -> a PyTorch BatchNorm state dict (numpy arrays).

    ``params/scale``/``bias`` become ``weight``/``bias``, ``batch_stats/mean``/
    ``var`` become ``running_mean``/``running_var``. Without params the result
    suits ``affine=False``; with only one of ``scale``/``bias`` (flax's
    ``use_scale=False`` or ``use_bias=False``), the other is filled with ones
    (or zeros) so that it loads into an ``affine=True`` module.
    ``num_batches_tracked`` is the argument, else ``batch_stats['count']`` if
    present, else 0. Load with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Args:
      variables: ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}``
        of one batch norm (params optional), e.g. ``variables`` of a model
        narrowed to the layer: ``{c: v['BatchNorm_0'] for c, v in variables.items()}``.
      num_batches_tracked: the value to store (int64 scalar).
      dtype: dtype of the float arrays (float32, PyTorch's default).

    Returns:
      ``{'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'}``
      (``weight``/``bias`` only when there are params).

    Raises:
      ValueError: missing batch_stats, shapes that differ or are not 1-D
        (PyTorch's BatchNorm has one channel axis).
      TypeError: complex statistics (PyTorch's BatchNorm is real).

    >>> import jax.numpy as jnp
    >>> from jaxbn.interop import to_torch
    >>> sd = to_torch({"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    ...                "batch_stats": {"mean": jnp.zeros(2), "var": jnp.ones(2)}})
    >>> sorted(sd), sd["running_var"].tolist(), int(sd["num_batches_tracked"])
    (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], [1.0, 1.0], 0)
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping of collections, got {type(variables).__name__}")
    stats, params = _get(variables, "batch_stats"), _get(variables, "params") or {}
    if stats is None or _get(stats, "mean") is None or _get(stats, "var") is None:
        raise ValueError(
            "variables must hold batch_stats/mean and batch_stats/var of one batch norm, got "
            f"collections {sorted(variables)}" + (f" with batch_stats keys {sorted(stats)}" if stats else "")
        )
    arrays = {"running_mean": _numpy(stats["mean"], "mean"), "running_var": _numpy(stats["var"], "var")}
    for old, new in (("scale", "weight"), ("bias", "bias")):
        if _get(params, old) is not None:
            arrays[new] = _numpy(params[old], old)
    for k, v in arrays.items():
        if np.iscomplexobj(v):
            raise TypeError(f"{k} is complex ({v.dtype}); PyTorch's BatchNorm holds real statistics")
        _float(v, k)
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["running_mean"].ndim != 1:
        raise ValueError(
            f"variables must hold vectors of one shape (channels,) (PyTorch's BatchNorm has one channel "
            f"axis), got shapes {shapes}"
        )
    if ("weight" in arrays) != ("bias" in arrays):
        c = arrays["running_mean"].shape
        arrays.setdefault("weight", np.ones(c))
        arrays.setdefault("bias", np.zeros(c))
    keys = ("weight", "bias", "running_mean", "running_var")
    out: dict[str, np.ndarray] = {k: np.array(arrays[k], dtype) for k in keys if k in arrays}  # writable copies
    if num_batches_tracked is None:
        c = _get(stats, "count")
        num_batches_tracked = 0 if c is None else int(_numpy(c, "count"))
    out["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def kernel_from_torch(weight: Any) -> np.ndarray:
    """A PyTorch Linear or Conv weight -> the flax kernel layout.

    ``Linear`` ``(out, in)`` -> ``(in, out)``; ``ConvNd`` ``(out, in // groups,
    *window)`` -> ``(*window, in // groups, out)`` (both are cross-correlations:
    no flip). Not for ``ConvTransposeNd``, whose weight is ``(in, out // groups, *window)``.

    Args:
      weight: the weight, ndim >= 2 (numpy array or torch tensor).

    Returns:
      The kernel as a numpy array.

    >>> import numpy as np
    >>> from jaxbn.interop import kernel_from_torch
    >>> kernel_from_torch(np.zeros((8, 3, 5, 5))).shape
    (5, 5, 3, 8)
    """
    w = _numpy(weight, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions (out, in, *window), got shape {w.shape}")
    return np.array(np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)))  # a contiguous, writable copy


def kernel_to_torch(kernel: Any) -> np.ndarray:
    """A flax Dense or Conv kernel -> the PyTorch Linear/ConvNd weight layout (inverse of `kernel_from_torch`).

    Args:
      kernel: ``(in, out)`` or ``(*window, in // groups, out)``.

    Returns:
      ``(out, in)`` or ``(out, in // groups, *window)``, a numpy array.

    >>> import numpy as np
    >>> from jaxbn.interop import kernel_to_torch
    >>> kernel_to_torch(np.zeros((5, 5, 3, 8))).shape
    (8, 3, 5, 5)
    """
    k = _numpy(kernel, "kernel")
    if k.ndim < 2:
        raise ValueError(f"kernel must have at least 2 dimensions (..., in, out), got shape {k.shape}")
    return np.array(np.transpose(k, (k.ndim - 1, k.ndim - 2) + tuple(range(k.ndim - 2))))  # writable copy


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _node(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def from_torch_model(
    state_dict: Mapping[str, Any], mapping: Mapping[str, Any], *, dtype: Any = jnp.float32, count: bool = False
) -> dict[str, Any]:
    """Several modules of a PyTorch state dict -> flax variables, by module name.

    Each ``mapping`` entry maps a PyTorch module prefix (``"bn1"``,
    ``"layer1.0.conv1"``) to a flax module path (``"BatchNorm_0"``,
    ``"layer1_0/Conv_0"`` or a tuple of names). A module with
    ``running_mean`` is a batch norm (converted as `from_torch` does); any
    other module with a ``weight`` of ndim >= 2 is a ``Linear``/``ConvNd``
    (``kernel`` via `kernel_from_torch`, and ``bias`` when present). Keys of
    ``state_dict`` outside the mapped prefixes are ignored.

    Args:
      state_dict: a PyTorch model's ``state_dict()`` (numpy arrays or tensors).
      mapping: ``{torch_prefix: flax_path}``.
      dtype: dtype of the returned arrays.
      count: keep each batch norm's ``num_batches_tracked`` as ``batch_stats/.../count``
        (as in `from_torch`).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` nested by flax path (``batch_stats``
      only when a batch norm is mapped).

    Raises:
      ValueError: a prefix with no keys, or a module that is neither kind.

    >>> import numpy as np
    >>> from jaxbn.interop import from_torch_model
    >>> sd = {"fc.weight": np.zeros((4, 3)), "fc.bias": np.zeros(4), "bn.running_mean": np.zeros(4),
    ...       "bn.running_var": np.ones(4), "bn.weight": np.ones(4), "bn.bias": np.zeros(4)}
    >>> v = from_torch_model(sd, {"fc": "Dense_0", "bn": "BatchNorm_0"})
    >>> v["params"]["Dense_0"]["kernel"].shape, sorted(v["batch_stats"]["BatchNorm_0"])
    ((3, 4), ['mean', 'var'])
    """
    out: dict[str, Any] = {}
    for prefix, path in mapping.items():
        fpath = _path(path, "flax path")
        sub = _prefixed(state_dict, prefix)
        if not sub:
            raise ValueError(f"no key of state_dict starts with {prefix.rstrip('.') + '.'!r}")
        if "running_mean" in sub or "running_var" in sub:
            for collection, value in from_torch(sub, dtype=dtype, count=count).items():
                _put(out.setdefault(collection, {}), fpath, value)
            continue
        weight = sub.get("weight")
        shape = getattr(weight, "shape", None)
        if weight is None or shape is None or len(shape) < 2:
            raise ValueError(
                f"module {prefix!r} has keys {sorted(sub)} and is neither a BatchNorm (running_mean, "
                "running_var) nor a Linear/ConvNd (weight of ndim >= 2)"
            )
        layer = {"kernel": jnp.asarray(kernel_from_torch(weight), dtype)}
        if sub.get("bias") is not None:
            layer["bias"] = jnp.asarray(_float(_numpy(sub["bias"], "bias"), "bias"), dtype)
        _put(out.setdefault("params", {}), fpath, layer)
    return out


def to_torch_model(
    variables: Mapping[str, Any], mapping: Mapping[str, Any], *, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Flax variables -> a PyTorch state dict, by module name (inverse of `from_torch_model`).

    A flax module with ``batch_stats`` is written as a BatchNorm (`to_torch`);
    one with a ``kernel`` param as a Linear/ConvNd (``weight`` via
    `kernel_to_torch`, and ``bias`` when present).

    Args:
      variables: the flax model's variables.
      mapping: ``{torch_prefix: flax_path}``, as in `from_torch_model`.
      dtype: dtype of the float arrays.

    Returns:
      A flat state dict ``{"<prefix>.<name>": numpy array}``.

    Raises:
      ValueError: a flax path with neither batch_stats nor a kernel.

    >>> import jax.numpy as jnp
    >>> from jaxbn.interop import to_torch_model
    >>> v = {"params": {"Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}}
    >>> {k: a.shape for k, a in to_torch_model(v, {"fc": "Dense_0"}).items()}
    {'fc.weight': (4, 3), 'fc.bias': (4,)}
    """
    out: dict[str, np.ndarray] = {}
    for prefix, path in mapping.items():
        fpath = _path(path, "flax path")
        p = prefix.rstrip(".")
        stats = _node(_get(variables, "batch_stats"), fpath)
        params = _node(_get(variables, "params"), fpath)
        if stats is not None:
            sd = to_torch({"params": params or {}, "batch_stats": stats}, dtype=dtype)
        elif isinstance(params, Mapping) and "kernel" in params:
            sd = {"weight": np.asarray(kernel_to_torch(params["kernel"]), dtype)}
            if params.get("bias") is not None:
                sd["bias"] = np.array(_numpy(params["bias"], "bias"), dtype)
        else:
            raise ValueError(
                f"flax module {'/'.join(fpath)!r} has neither batch_stats nor a kernel param"
            )
        out.update({f"{p}.{k}": v for k, v in sd.items()})
    return out
