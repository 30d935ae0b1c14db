"""Independent float64 numpy references for batch normalization.

Nothing here imports jaxbn: these are the textbook formulas the library is
checked against.
"""

from __future__ import annotations

import numpy as np


def as_axes(ndim, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    feat = tuple(sorted(a % ndim for a in axes))
    red = tuple(a for a in range(ndim) if a not in feat)
    return feat, red


def moments(x, axis=-1, mask=None):
    """(mean, biased var, count) over every axis but `axis`, float64, two-pass."""
    x = np.asarray(x)
    x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    feat, red = as_axes(x.ndim, axis)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)
    n = w.sum(axis=red)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN data gives inf/NaN moments, as it should
        mean = (w * x).sum(axis=red) / np.maximum(n, 1)
        d = x - np.expand_dims(mean, red)
        var = (w * np.abs(d) ** 2).sum(axis=red) / np.maximum(n, 1)
    return mean, var, n


def expand(v, ndim, axis):
    _, red = as_axes(ndim, axis)
    return np.expand_dims(np.asarray(v, np.float64) if not np.iscomplexobj(v) else np.asarray(v), red)


def normalize(x, mean, var, scale=None, bias=None, axis=-1, eps=1e-5):
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    nd = x.ndim
    y = (x - expand(mean, nd, axis)) / np.sqrt(expand(var, nd, axis) + eps)
    if scale is not None:
        y = y * expand(scale, nd, axis)
    if bias is not None:
        y = y + expand(bias, nd, axis)
    return y


def contributes(mean, var, n):
    """Per feature: does a batch with these moments update the running stats? (valid entries, finite)."""
    return (np.asarray(n) > 0) & np.isfinite(mean) & np.isfinite(var)


def update(old_mean, old_var, count, mean, var, n, momentum=0.99, unbiased=False):
    """One running-stat update, written from the definition (docs/contract.md), float64.

    EMA: new = momentum * old + (1 - momentum) * batch; momentum=None:
    new = old + (batch - old) / (count + 1). Features that do not contribute
    (no valid entry, or a non-finite batch mean/var) keep their values; the
    count goes up only if some feature contributed.
    """
    old_mean, old_var = np.asarray(old_mean, np.float64), np.asarray(old_var, np.float64)
    ok = contributes(mean, var, n)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        bvar = np.where(n > 1, var * n / np.maximum(n - 1, 1), var) if unbiased else var
        if momentum is None:  # old + (batch - old) / (count + 1), written without its cancellation
            new_mean = (count * old_mean + mean) / (count + 1)
            new_var = (count * old_var + bvar) / (count + 1)
        else:
            new_mean = momentum * old_mean + (1 - momentum) * mean
            new_var = momentum * old_var + (1 - momentum) * bvar
    return np.where(ok, new_mean, old_mean), np.where(ok, new_var, old_var), count + int(np.any(ok))


def cumulative_average(batch_means, batch_vars, batch_counts, mean0=0.0, var0=1.0):
    """momentum=None from its definition: per feature, the plain average of the batches that contributed.

    `batch_*` are lists (one entry per batch) of feature-shaped arrays. Features
    that never contributed keep (mean0, var0). Returns (mean, var, number of
    batches in which some feature contributed).
    """
    ok = np.stack([contributes(m, v, n) for m, v, n in zip(batch_means, batch_vars, batch_counts, strict=True)])
    means = np.where(ok, np.stack(batch_means), 0.0)
    vars_ = np.where(ok, np.stack(batch_vars), 0.0)
    k = ok.sum(0)
    mean = np.where(k > 0, means.sum(0) / np.maximum(k, 1), mean0)
    var = np.where(k > 0, vars_.sum(0) / np.maximum(k, 1), var0)
    return mean, var, int(ok.any(axis=tuple(range(1, ok.ndim))).sum())


def bn_train_grads(x, dy, scale, axis=-1, mask=None, eps=1e-5):
    """Closed-form gradients of y = scale * (x - mu) / sqrt(var + eps) + bias.

    mu, var are the (masked) batch statistics; every entry is normalized.
    Returns (dx, dscale, dbias), float64.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    nd = x.ndim
    _, red = as_axes(nd, axis)
    mean, var, n = moments(x, axis, mask)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)
    r = 1 / np.sqrt(expand(var, nd, axis) + eps)
    xhat = (x - expand(mean, nd, axis)) * r
    g = np.ones_like(r) if scale is None else expand(scale, nd, axis)
    s_dy = dy.sum(axis=red, keepdims=True)
    s_dyx = (dy * xhat).sum(axis=red, keepdims=True)
    nn = np.maximum(expand(n, nd, axis), 1)
    dx = g * r * (dy - w * (s_dy + xhat * s_dyx) / nn)
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


def renorm_train(x, run_mean, run_var, scale=None, bias=None, axis=-1, r_max=3.0, d_max=5.0, eps=1e-5, mask=None):
    """Batch Renormalization (Ioffe 2017) in training: (y, batch mean, batch var, count), float64."""
    x = np.asarray(x, np.float64)
    nd = x.ndim
    mean, var, n = moments(x, axis, mask)
    s_b = np.sqrt(var + eps)
    s = np.sqrt(np.asarray(run_var, np.float64) + eps)
    r = np.clip(s_b / s, 1 / r_max, r_max)
    d = np.clip((mean - np.asarray(run_mean, np.float64)) / s, -d_max, d_max)
    y = (x - expand(mean, nd, axis)) / expand(s_b, nd, axis) * expand(r, nd, axis) + expand(d, nd, axis)
    if scale is not None:
        y = y * expand(scale, nd, axis)
    if bias is not None:
        y = y + expand(bias, nd, axis)
    return y, mean, var, n


def ghost_train(x, scale=None, bias=None, axis=-1, virtual_batch_size=1, eps=1e-5):
    """Ghost batch norm in training: consecutive slices of `virtual_batch_size` entries of axis 0,
    each normalized with its own moments. Returns (y, per-group means, per-group vars, per-group counts)."""
    x = np.asarray(x, np.float64)
    ys, means, variances, counts = [], [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        xg = x[start:start + virtual_batch_size]
        mean, var, n = moments(xg, axis)
        ys.append(normalize(xg, mean, var, scale, bias, axis, eps))
        means.append(mean)
        variances.append(var)
        counts.append(n)
    return np.concatenate(ys, axis=0), np.stack(means), np.stack(variances), np.stack(counts)


def ghost_stats(x, virtual_batch_size, mask=None, old_mean=0.0, old_var=1.0, count=0, momentum=0.99, axis=-1):
    """Ghost batch norm's running-stat update from its definition, float64.

    Per feature, the batch moments are the mean of the moments of the ghost
    batches (consecutive slices of axis 0) that contribute (a valid entry,
    finite moments); features with no contributing group keep their values.
    Returns (mean, var, count) after one update.
    """
    x = np.asarray(x, np.float64)
    full = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    groups = [moments(x[g:g + virtual_batch_size], axis, full[g:g + virtual_batch_size])
              for g in range(0, x.shape[0], virtual_batch_size)]
    ok = np.stack([contributes(*g) for g in groups])
    k = ok.sum(0)
    with np.errstate(invalid="ignore"):
        mean = np.where(ok, np.stack([g[0] for g in groups]), 0.0).sum(0) / np.maximum(k, 1)
        var = np.where(ok, np.stack([g[1] for g in groups]), 0.0).sum(0) / np.maximum(k, 1)
    return update(old_mean, old_var, count, mean, var, k, momentum)


def normal(seed, shape, dtype=np.float32):
    """Standard-normal test data from numpy (jax.random compiles a kernel for every new shape)."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.complexfloating):
        return ((rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def bernoulli(seed, p, shape):
    """A bool mask with P(True) = p."""
    return np.random.default_rng(seed).random(shape) < p
