"""Interchange with PyTorch, and deployment utilities.

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

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.typing import VariableDict
from jax.typing import DTypeLike

from jaxbn._checks import check_epsilon, check_float, check_module_path, check_momentum
from jaxbn._fold import fold

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

#: A module's path in a variables tree: ``"Conv_0"``, ``"block1/Conv_0"`` or ``("block1", "Conv_0")``.
ModulePath = str | Sequence[str]
#: A path in a variables tree as `flax.traverse_util.flatten_dict` spells it.
_Key = tuple[str, ...]


def _numpy(value: object, name: str) -> np.ndarray:
    """A private numpy copy of a numpy / jax array or a torch tensor (detached, moved to CPU).

    Always a copy: ``tensor.numpy()`` shares memory with the tensor, and on
    CPU jax may wrap a numpy buffer without copying, so an array returned
    from here must never alias the caller's buffer (one more PyTorch step
    would otherwise change the "immutable" jax arrays handed back).
    """
    if hasattr(value, "detach"):
        value = value.detach()
    if hasattr(value, "cpu") and callable(value.cpu):
        value = value.cpu()
    if str(getattr(value, "dtype", "")) in ("torch.bfloat16", "torch.float16") and hasattr(value, "float"):
        value = value.float()  # numpy has no bfloat16: go through float32
    try:
        return np.array(value, copy=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: cannot convert a {type(value).__name__} to a numpy array ({e})") from e


def _float(value: np.ndarray, name: str) -> np.ndarray:
    check_float(value, name, complex_ok=False)
    return value


def _prefixed(state: Mapping[str, object], prefix: str) -> dict[str, object]:
    if not prefix:
        return dict(state)
    p = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(p) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(p)}


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
    check_momentum(momentum, torch=True)
    return None if momentum is None else 1.0 - float(momentum)


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
    check_momentum(momentum)
    return None if momentum is None else 1.0 - float(momentum)


def from_torch(
    state: Mapping[str, object],
    *,
    prefix: str = "",
    dtype: DTypeLike = jnp.float32,
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


def to_torch(
    variables: VariableDict, *, num_batches_tracked: int | None = None, dtype: DTypeLike = np.float32
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
    stats, params = variables.get("batch_stats"), variables.get("params") or {}
    if not isinstance(stats, Mapping) or stats.get("mean") is None or stats.get("var") is None:
        raise ValueError(
            "variables must hold batch_stats/mean and batch_stats/var of one batch norm, got "
            f"collections {sorted(variables)}" + (f" with batch_stats keys {sorted(stats)}" if stats else "")
        )
    arrays = {"running_mean": _numpy(stats["mean"], "mean"), "running_var": _numpy(stats["var"], "var")}
    for old, new in (("scale", "weight"), ("bias", "bias")):
        if params.get(old) is not None:
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
        stored = stats.get("count")
        num_batches_tracked = 0 if stored is None else int(_numpy(stored, "count"))
    out["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def _weight_array(value: object, name: str, layout: str) -> np.ndarray:
    """A Linear/Conv weight or kernel as numpy, at least 2-D."""
    array = _numpy(value, name)
    if array.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions {layout}, got shape {array.shape}")
    return array


def kernel_from_torch(weight: object) -> np.ndarray:
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
    w = _weight_array(weight, "weight", "(out, in, *window)")
    return np.array(np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)))  # a contiguous, writable copy


def kernel_to_torch(kernel: object) -> np.ndarray:
    """A flax Dense or Conv kernel -> the PyTorch Linear/ConvNd weight layout (inverse of `kernel_from_torch`).

    Args:
      kernel: ``(in, out)`` or ``(*window, in // groups, out)``.

    Returns:
      ``(out, in)`` or ``(out, in // groups, *window)``, a numpy array.

    >>> import numpy as np
    >>> from jaxbn.interop import kernel_from_torch, kernel_to_torch
    >>> w = np.arange(24.0).reshape(4, 3, 2)  # Conv1d weight (out, in, width)
    >>> bool((kernel_to_torch(kernel_from_torch(w)) == w).all())
    True
    """
    k = _weight_array(kernel, "kernel", "(..., in, out)")
    return np.array(np.transpose(k, (k.ndim - 1, k.ndim - 2) + tuple(range(k.ndim - 2))))  # writable copy


def _flat(tree: Mapping[str, Any]) -> dict[_Key, Any]:
    """`tree` flattened by path (empty modules kept, so that they survive a round trip)."""
    return traverse_util.flatten_dict(tree, keep_empty_nodes=True)


def _plain(tree: object) -> object:
    """A nested copy with plain dicts (FrozenDicts unfrozen), leaves shared."""
    return traverse_util.unflatten_dict(_flat(tree)) if isinstance(tree, Mapping) else tree


def _under(flat: Mapping[_Key, Any], path: _Key) -> dict[_Key, Any]:
    """The entries of a flattened tree strictly under `path`, keyed relative to it."""
    n = len(path)
    return {k[n:]: v for k, v in flat.items() if len(k) > n and k[:n] == path}


def _without(flat: Mapping[_Key, Any], path: _Key) -> dict[_Key, Any]:
    """A flattened tree without `path` and everything under it (parents left empty disappear)."""
    n = len(path)
    return {k: v for k, v in flat.items() if k[:n] != path}


def _subtree(flat: Mapping[_Key, Any], path: _Key, collection: str) -> object:
    """The module (nested dict) or leaf at `path` of a flattened collection, or a KeyError saying where it stops."""
    if path in flat:
        return flat[path]
    below = _under(flat, path)
    if below:
        return traverse_util.unflatten_dict(below)
    for i, name in enumerate(path):
        have = sorted({k[i] for k in flat if len(k) > i and k[:i] == path[:i]})
        if name not in have:
            where = "/".join(path[:i]) or "the top level"
            raise KeyError(
                f"{'/'.join(path)!r} is not in variables[{collection!r}]: no {name!r} under {where} (found {have})"
            )
    raise KeyError(f"{'/'.join(path)!r} is not in variables[{collection!r}]")


def fold_linen(
    variables: VariableDict,
    pairs: Sequence[tuple[ModulePath, ModulePath]],
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
    params, stats = _flat(variables["params"]), _flat(variables.get("batch_stats", {}))
    seen: set[_Key] = set()
    folded: list[tuple[_Key, _Key, jax.Array, jax.Array]] = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise TypeError(f"each pair must be (layer_path, bn_path), got {pair!r}")
        layer = check_module_path(pair[0], "layer path")
        bn = check_module_path(pair[1], "batch-norm path")
        for p in (layer, bn):
            if p in seen:
                raise ValueError(f"{'/'.join(p)!r} appears in more than one pair")
            seen.add(p)
        layer_params = _subtree(params, layer, "params")
        if not isinstance(layer_params, Mapping) or "kernel" not in layer_params:
            have = sorted(layer_params) if isinstance(layer_params, Mapping) else type(layer_params).__name__
            raise ValueError(f"layer {'/'.join(layer)!r} has no 'kernel' param (found {have}); name a Dense or Conv")
        bn_stats = _subtree(stats, bn, "batch_stats")
        bn_params = _under(params, bn)  # empty for use_scale=False and use_bias=False
        try:
            kernel, bias = fold(
                layer_params["kernel"], layer_params.get("bias"), bn_stats,  # type: ignore[arg-type]
                bn_params.get(("scale",)), bn_params.get(("bias",)), epsilon=epsilon,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"folding {'/'.join(bn)!r} into {'/'.join(layer)!r}: {e}") from e
        folded.append((layer, bn, kernel, bias))
    for layer, bn, kernel, bias in folded:
        params[layer + ("kernel",)], params[layer + ("bias",)] = kernel, bias
        params, stats = _without(params, bn), _without(stats, bn)
    out = {name: _plain(tree) for name, tree in variables.items()}
    out["params"] = traverse_util.unflatten_dict(params)
    if stats:
        out["batch_stats"] = traverse_util.unflatten_dict(stats)
    else:
        out.pop("batch_stats", None)
    return out


def from_torch_model(
    state_dict: Mapping[str, object],
    mapping: Mapping[str, ModulePath],
    *,
    dtype: DTypeLike = jnp.float32,
    count: bool = False,
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
    out: dict[_Key, Any] = {}
    for prefix, path in mapping.items():
        fpath = check_module_path(path, "flax path")
        sub = _prefixed(state_dict, prefix)
        if not sub:
            raise ValueError(f"no key of state_dict starts with {prefix.rstrip('.') + '.'!r}")
        if "running_mean" in sub or "running_var" in sub:
            for collection, value in from_torch(sub, dtype=dtype, count=count).items():
                out.update({(collection, *fpath, *k): v for k, v in _flat(value).items()})
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
        out.update({("params", *fpath, k): v for k, v in layer.items()})
    return traverse_util.unflatten_dict(out)


def to_torch_model(
    variables: VariableDict, mapping: Mapping[str, ModulePath], *, dtype: DTypeLike = np.float32
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
    trees = {name: _flat(variables.get(name) or {}) for name in ("batch_stats", "params")}
    for prefix, path in mapping.items():
        fpath = check_module_path(path, "flax path")
        p = prefix.rstrip(".")
        stats, params = (traverse_util.unflatten_dict(_under(trees[name], fpath)) for name in trees)
        if stats:
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
