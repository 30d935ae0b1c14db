"""Batch moments: the one place where jaxbn's statistics are computed.

Local moments use one fused pass over `x` with a per-feature shift `K`, the
mean of a pilot slice of the batch (valid entries only)::

    S1 = sum(w * (x - K)),  S2 = sum(w * |x - K|^2),  n = sum(w)
    mean = K + S1 / n,      M2 = S2 - |S1|^2 / n

The float32 error of M2 is about 2^-24 * S2, and S2 / M2 = 1 + n |mean - K|^2 / M2.
Because M2 >= sum over the p valid pilot entries of |x_i - mean|^2 >= p |K - mean|^2,
S2 / M2 <= 1 + n / p: the pilot is taken dense enough that n / p <= 1024
(and spread over >= 8 positions of every reduced axis), so without a mask the
variance is within ~2.5e-4 relative whatever the data (E[x^2] - E[x]^2 has
no such bound: float32 1e4 + N(0, 1) loses every digit). A mask can hide
the pilot, so with a mask a second pass about the first one's mean always
follows: no branch, one more read of `x`.

Across parts (devices under `axis_name`; under `jax.jit`, slices of the batch
that no shard boundary crosses) each part's `(n_i, mean_i, M2_i)` is combined
with ONE collective and no data-dependent control flow:

* "auto"/"psum": one all-reduce of float64 `[n_i, n_i d_i, M2_i + n_i |d_i|^2]`
  (`d_i` the part's mean with its low bits): N = sum n_i, mean = S1 / N,
  M2 = S2 - |S1|^2 / N, with an error ~2^-53 (1 + mean^2 / var);
* "gather" (and "auto" on TPU, which all-reduces no float64): one all-gather
  of every part's `(n_i, mean_i, M2_i)`, combined by Chan et al.'s formula
  (`chan_combine`)::

      N = sum n_i,  mean = sum n_i mean_i / N,
      M2 = sum M2_i + sum n_i |mean_i - mean|^2

No part needs a shift shared with the others, so the running mean plays no
part: NaN, inf or different on each device, the statistics are the same.
Counts are summed in integers on each part, and in float64 (exact to 2^53)
across parts; the float32 `count` that callers see is the exact count
rounded once (exact up to 2^24 valid entries per feature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn._checks import (
    Axes,
    AxisIndexGroups,
    AxisName,
    Strategy,
    axis_size,
    check_input,
    check_mask,
    check_strategy,
)
from jaxbn._layout import Layout
from jaxbn._running import Moments, stats_dtype
from jaxbn._xla import separate_converts, spelled_apart, typed_spec, wide_collectives

_PILOT = 8
_PILOT_DENSITY = 1024



def _real(dt: jnp.dtype) -> jnp.dtype:
    return jnp.finfo(dt).dtype


def _abs_sq(z: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(z):
        return lax.square(z.real) + lax.square(z.imag)
    return lax.square(z)


def _count_int(mask: jax.Array | None, shape: Sequence[int], red: Sequence[int]) -> jax.Array | int:
    """Per-feature count of valid entries on this device, exact: a Python int without a mask, else int32 keepdims.

    Summed in integers: a float32 sum stops being exact past 2^24 entries (and
    a sequential one stalls there). int32 holds up to 2^31 - 1 per device.
    """
    if mask is None:
        return math.prod(shape[a] for a in red)
    summed = tuple(a for a in red if mask.shape[a] != 1)
    implicit = math.prod(shape[a] for a in red if mask.shape[a] == 1)
    return jnp.sum(mask, axis=summed, keepdims=True, dtype=jnp.int32) * implicit


def _pilot_slice(shape: tuple[int, ...], red: tuple[int, ...]) -> tuple[slice, ...]:
    """Where the pilot is: n / p <= 1024 whatever the shape, and spread over the first reduced axis.

    With several reduced axes (N, H, W): every entry of the first one, the
    first ceil(size / 1024) of the second, all of the rest. A plain slice:
    XLA reads it in place, and on a batch sharded over N under `jax.jit`
    every shard holds part of it (one small all-reduce, no broadcast of one
    shard's rows; slicing a sharded axis is refused under Explicit mesh
    axes). With one reduced axis (N, C): every ceil(N / 8)-th row, at most
    1024 apart (a strided slice, also spread over the shards).
    """
    if len(red) >= 2:
        first_rows = slice(0, -(-shape[red[1]] // _PILOT_DENSITY))
        return tuple(first_rows if a == red[1] else slice(None) for a in range(len(shape)))
    stride = max(1, min(-(-shape[red[0]] // _PILOT), _PILOT_DENSITY)) if red else 1
    return tuple(slice(0, None, stride) if a in red else slice(None) for a in range(len(shape)))


def _pilot_shift(x: jax.Array, red: tuple[int, ...], mask: jax.Array | None, dt: np.dtype) -> jax.Array:
    """A per-feature shift: the mean of the valid entries of the pilot (`_pilot_slice`; 0 if none is valid).

    The mean is written as a reduction of pre-scaled entries, so that K is one
    rounded value that every consumer reads: as `sum / p` XLA re-computes the
    division inside each consumer's fusion, where LLVM contracts it into an
    FMA (`x - K` about the exact quotient, `K + S1 / n` about another value),
    and the mean comes out wrong by up to ulp(K) (0.004 at 1e5 in float32).
    """
    idx = _pilot_slice(x.shape, red)
    pilot = lax.stop_gradient(x[idx].astype(dt))
    if mask is None:
        count = max(1, math.prod(pilot.shape[a] for a in red))  # an empty batch: no pilot, shift 0
        return jnp.sum(pilot * (1.0 / count), axis=red, keepdims=True)
    pm = jnp.broadcast_to(mask, x.shape)[idx]
    inv_n = 1.0 / jnp.maximum(jnp.sum(pm, axis=red, keepdims=True, dtype=jnp.float32), 1.0)
    return jnp.sum(jnp.where(pm, pilot, jnp.zeros((), dt)) * inv_n.astype(dt), axis=red, keepdims=True)


def _shifted_sums(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """S1 = sum(w (x - K)) and S2 = sum(w |x - K|^2): one fused read of `x`, nothing full-size written."""
    dt = shift.dtype
    xa, xb = separate_converts(x, dt)
    d1 = xa - shift
    d2 = spelled_apart(xb, shift)  # K - x: squared, the sign does not matter
    if mask is not None:
        d1 = jnp.where(mask, d1, jnp.zeros((), dt))
        d2 = jnp.where(mask, d2, jnp.zeros((), dt))
    return jnp.sum(d1, axis=red, keepdims=True), jnp.sum(_abs_sq(d2), axis=red, keepdims=True)


def _moments_about(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None, shift: jax.Array, safe_n: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, mean_lo, M2) from the sums about `shift`: mean = K + S1 / n, M2 = S2 - |S1|^2 / n."""
    s1, s2 = _shifted_sums(x, red, mask, shift)
    delta = s1 / safe_n.astype(s1.dtype)
    mean = shift + delta
    return mean, (shift - mean) + delta, jnp.maximum(s2 - _abs_sq(s1) / safe_n, 0.0)


def local_moments(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None
) -> tuple[jax.Array | int, jax.Array, jax.Array, jax.Array]:
    """(n, mean, mean_lo, M2) of `x` over the axes `red` on this device, keepdims.

    One pass of shifted sums about the pilot shift. A mask may hide the
    pilot, so with a mask a second pass about the first one's mean always
    follows (one more read of `x`, no branch): that mean lies within
    ~2^-24 sqrt(S2 / n) of the true one, inside the data.

    The mean is returned as `mean + mean_lo` (`mean` the rounded value,
    `mean_lo` the few bits below its last place that the shifted sums know):
    at large offsets (1e6 in float32, ulp 0.0625) the cross-device
    combination needs them. `n` is the exact count (`_count_int`: a Python
    int without a mask, else int32); `M2` is float32 (or wider). Features
    with n == 0 get mean 0 and M2 0.
    """
    dt = stats_dtype(x.dtype)
    n = _count_int(mask, x.shape, red)
    safe_n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0).astype(_real(dt))
    mean, lo, m2 = _moments_about(x, red, mask, _pilot_shift(x, red, mask, dt), safe_n)
    if mask is None:
        return n, mean, lo, m2
    mean, lo, m2 = _moments_about(x, red, mask, lax.stop_gradient(mean), safe_n)
    valid = n > 0
    zero = jnp.zeros((), dt)
    return n, jnp.where(valid, mean, zero), jnp.where(valid, lo, zero), m2


def _as_float_count(n: jax.Array | int, like: jax.Array) -> jax.Array:
    """An exact count in `like`'s (real) dtype, rounded once, of its shape."""
    return jnp.broadcast_to(jnp.asarray(n, like.dtype), like.shape)


def chan_combine(
    n: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    total: Callable[[list[jax.Array]], list[jax.Array]] | None = None,
    *,
    mean_lo: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chan et al.'s parallel combination of per-part `(n, mean, M2)`: the one copy.

    The parts' means are compared with a common reference `K0`, the
    count-weighted mean of their rounded means, so that the differences
    `e_i = (mean_i - K0) + mean_lo_i` are exact (Sterbenz) and small::

        N = sum n_i,  K0 = sum n_i mean_i / N,  e = sum n_i e_i / N,
        mean = K0 + e,  M2 = sum (M2_i + n_i |e_i|^2) - N |e|^2

    (= sum M2_i + sum n_i |mean_i - mean|^2; e is tiny, so nothing cancels.)
    `total(vs)` sums each array of `vs` over the parts and returns values that
    broadcast against a part: an all-reduce across devices (one collective
    per call, see `global_moments`), or by default a sum over the first
    axis of stacked parts. It is called twice.

    Args:
      n, mean, m2: per-part counts (float), means (real or complex) and sums
        of squared deviations; stacked on axis 0 when `total` is None.
      total: the sum over parts (see above).
      mean_lo: optional low-order parts of the means (see `local_moments`).

    Returns:
      `(N, mean, M2)` of the union (leading axis dropped when `total` is None).

    >>> import jax.numpy as jnp
    >>> N, mu, M2 = chan_combine(jnp.array([2.0, 3.0]), jnp.array([0.0, 5.0]), jnp.array([2.0, 2.0]))
    >>> float(N), float(mu), float(M2)
    (5.0, 3.0, 34.0)
    """
    stacked = total is None
    reduce = _sum_over_parts if total is None else total
    cplx = jnp.iscomplexobj(mean)
    big_n, *sums = reduce([n, *_pack(n.astype(mean.dtype) * mean)])
    safe_n = jnp.maximum(big_n, 1.0)
    k0 = _unpack([s / safe_n for s in sums], cplx)
    e_i = mean - k0 if mean_lo is None else (mean - k0) + mean_lo
    *e_sums, q = reduce([*_pack(n.astype(e_i.dtype) * e_i), m2 + n * _abs_sq(e_i)])
    e = _unpack([s / safe_n for s in e_sums], cplx)
    gm2 = jnp.maximum(q - big_n * _abs_sq(e), 0.0)
    gmean = k0 + e
    if stacked:
        return big_n[0], gmean[0], gm2[0]
    return big_n, gmean, gm2


def _sum_over_parts(vs: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(v, axis=0, keepdims=True) for v in vs]


def _pack(mean: jax.Array) -> list[jax.Array]:
    return [mean.real, mean.imag] if jnp.iscomplexobj(mean) else [mean]


def _unpack(parts: Sequence[jax.Array], complex_: bool) -> jax.Array:
    return lax.complex(parts[0], parts[1]) if complex_ else parts[0]


def _is_varying(x: jax.Array, axis_name: AxisName) -> bool:
    """Whether `x` is typed as varying over every name in `axis_name` (shard_map's manual axes)."""
    aval = jax.typeof(x)
    varying = getattr(getattr(aval, "mat", None), "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", None) or frozenset()
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(n in varying for n in names)


def _all_gather(packed: jax.Array, axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> jax.Array:
    """All-gathers `packed` over `axis_name`: one collective, stacked on a new leading axis."""
    if axis_index_groups is None and _is_varying(packed, axis_name):
        # Under shard_map, gather into a value typed as replicated (like
        # psum's result), so the statistics can leave with out_specs=P().
        try:
            return lax.all_gather(packed, axis_name, to="invarying")
        except TypeError:  # a JAX whose all_gather has no `to`
            pass
    if isinstance(axis_name, tuple) and axis_index_groups is None:
        # One name at a time: one all_gather over names bound by different
        # transformations (pmap over vmap) fails in JAX; a vmap's is free.
        for name in reversed(axis_name):
            packed = lax.all_gather(packed, name)
        return packed
    return lax.all_gather(packed, axis_name, axis_index_groups=axis_index_groups)


def _wide_combine(
    n: jax.Array | int, mean: jax.Array, lo: jax.Array, m2: jax.Array,
    total: Callable[[jax.Array], jax.Array], parts: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, mean, biased var) of the union of parts: ONE call of `total` on float64 sums about 0.

    Each part contributes `[n_i, n_i d_i, M2_i + n_i |d_i|^2]` with `d_i` its
    mean (plus its low bits), in float64; `total` sums the stacked values over
    the parts (an all-reduce, or a reduction over a sharded axis), and::

        N = sum n_i,  mean = S1 / N,  M2 = S2 - |S1|^2 / N

    cancels only what float64 holds: the error is ~2^-53 (1 + mean^2 / var)
    relative, 1e-4 at an offset of 1e6 standard deviations. Nothing needs a
    shift shared by the parts, so any running mean (NaN, inf, different per
    device) changes nothing. A Python-int `n` (no mask: every part the same,
    known when tracing) is not summed: N = n * parts.

    Differentiated by its own rule (`_wide_combine_jvp`), in the statistics
    dtype: the float64 values are made under `jax.enable_x64`, which JAX does
    not hold when it differentiates a traced program later (`grad` of a
    `jit`, `scan` or `remat` that contains this), so no float64 op may be
    left for JAX's own differentiation rules.
    """
    if isinstance(n, int):
        return _wide_sums((total, parts, n), None, mean, lo, m2)
    return _wide_sums((total, parts, None), n, mean, lo, m2)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _wide_sums(
    static: tuple[Callable[[jax.Array], jax.Array], int, int | None], n: jax.Array | None, mean: jax.Array,
    lo: jax.Array, m2: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_wide_combine`'s float64 sums; `static` is (total, parts, the Python-int count or None)."""
    total, parts, fixed_n = static
    dt, rdt = mean.dtype, m2.dtype
    cplx = jnp.iscomplexobj(mean)
    with jax.enable_x64(True):
        wide, wide_c = np.dtype(np.float64), np.dtype(np.complex128 if cplx else np.float64)
        n64 = jnp.asarray(n if fixed_n is None else fixed_n, wide)
        d = mean.astype(wide_c) + lo.astype(wide_c)
        rows = [*_pack(n64.astype(wide_c) * d), m2.astype(wide) + n64 * _abs_sq(d)]
        if fixed_n is None:
            rows.insert(0, jnp.broadcast_to(n64, m2.shape))
        r = total(jnp.stack([jnp.broadcast_to(v, m2.shape) for v in rows]))
        big_n = r[0] if fixed_n is None else jnp.full(r.shape[1:], float(fixed_n * parts), wide)
        s = r[1:] if fixed_n is None else r
        safe_n = jnp.maximum(big_n, 1.0)
        s1 = _unpack(list(s[:-1]), cplx)
        gmean = s1 / safe_n.astype(s1.dtype)
        var = jnp.maximum(s[-1] - _abs_sq(s1) / safe_n, 0.0) / safe_n
        return big_n.astype(rdt), gmean.astype(dt), var.astype(rdt)


@_wide_sums.defjvp
def _wide_combine_jvp(
    static: tuple[Callable[[jax.Array], jax.Array], int, int | None], primals: tuple, tangents: tuple
) -> tuple[tuple, tuple]:
    """Tangents of (N, mean, var) in the statistics dtype, through one more `total` (linear: one transposed sum).

    With `d_i = mean_i + lo_i` and N fixed: d mean = sum n_i dd_i / N and
    d var = (sum dM2_i + 2 sum n_i Re(conj(d_i - mean) dd_i)) / N (the term
    in d mean vanishes because sum n_i (d_i - mean) = 0).
    """
    total, _, fixed_n = static
    n, mean, lo, m2 = primals
    _, dmean, dlo, dm2 = tangents
    out = _wide_sums(static, n, mean, lo, m2)
    big_n, gmean, _ = out
    nf = jnp.asarray(n if fixed_n is None else fixed_n, m2.dtype)
    dd = dmean + dlo
    delta = (mean - gmean) + lo
    cross = (jnp.conj(delta) * dd).real if jnp.iscomplexobj(dd) else delta * dd
    rows = [*_pack(nf.astype(dd.dtype) * dd), dm2 + 2.0 * nf * cross]
    t = total(jnp.stack([jnp.broadcast_to(v, m2.shape) for v in rows]))
    safe_n = jnp.maximum(big_n, 1.0)
    dgmean = _unpack(list(t[:-1]), jnp.iscomplexobj(dd)) / safe_n.astype(dd.dtype)
    return out, (jnp.zeros_like(big_n), dgmean, t[-1] / safe_n)


def _chan_parts(
    n: jax.Array | int, mean: jax.Array, lo: jax.Array, m2: jax.Array,
    total: Callable[[list[jax.Array]], list[jax.Array]],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, mean, biased var) of the union of parts by Chan's formula in the statistics dtype (two `total` calls)."""
    big_n, gmean, gm2 = chan_combine(_as_float_count(n, m2), mean, m2, total, mean_lo=lo)
    return big_n, gmean, gm2 / jnp.maximum(big_n, 1.0)


def _psum(axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> Callable[[jax.Array], jax.Array]:
    return lambda v: lax.psum(v, axis_name, axis_index_groups=axis_index_groups)


def synced_moments(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None,
    axis_name: AxisName, axis_index_groups: AxisIndexGroups, strategy: Strategy,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, mean, biased var) over `red` and the devices of `axis_name`, keepdims: one collective.

    "psum" (and "auto" where the backend all-reduces float64): local moments,
    then one all-reduce of float64 sums (`_wide_combine`). "gather" (and
    "auto" on TPU): one all-gather of the per-device moments, then Chan's
    formula. "psum" on TPU: Chan's formula through two float32 all-reduces.
    """
    n, mean, lo, m2 = local_moments(x, red, mask)
    if strategy == "gather" or (strategy == "auto" and not wide_collectives()):
        big_n, gmean, gm2 = gathered_moments(_as_float_count(n, m2), mean, lo, m2, axis_name, axis_index_groups)
        return big_n, gmean, gm2 / jnp.maximum(big_n, 1.0)
    psum = _psum(axis_name, axis_index_groups)
    if wide_collectives():
        return _wide_combine(n, mean, lo, m2, psum, axis_size(axis_name, axis_index_groups))
    return _chan_parts(n, mean, lo, m2, lambda vs: list(psum(jnp.stack(vs))))


def _batch_parts(x: jax.Array, red: tuple[int, ...]) -> tuple[int, int]:
    """(axis, parts): how to split a reduced axis into parts that no device boundary crosses.

    Under `jax.jit` a batch may be sharded across devices. Moments taken
    per part, each about its own pilot, need no collective; combining the
    parts is one reduction over a (sharded) axis, which XLA's partitioner
    turns into one all-reduce. The mesh comes from x's type (which carries
    the mesh of the step's sharded arguments) or else from `jax.set_mesh`.
    With Explicit axes the type says which reduced axis is sharded and how
    many ways; with Auto axes the parts are as many as the mesh's devices
    (but its Manual axes: `pmap`, `shard_map`), as far as the axis divides:
    a multiple of the shard count is as good as the count itself. No mesh
    (one device): one part.
    """
    first = red[0] if red else 0
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return first, 1
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if jax.sharding.AxisType.Explicit in types.values():
        spec = typed_spec(x) or ()
        for a in red:
            names = spec[a] if a < len(spec) else None
            if names is not None:
                names = names if isinstance(names, tuple) else (names,)
                return a, math.prod(mesh.shape[nm] for nm in names)
        return first, 1
    devices = math.prod(mesh.shape[n] for n, t in types.items() if t == jax.sharding.AxisType.Auto)
    size = x.shape[first] if red else 0
    return first, math.gcd(size, devices) if size else 1


def _split(v: jax.Array, axis: int, parts: int) -> jax.Array:
    """`v` with `axis` split into (parts, size / parts) (a size-1 axis into (1, 1))."""
    inner = v.shape[axis] // parts if v.shape[axis] != 1 else 1
    outer = parts if v.shape[axis] != 1 else 1
    return v.reshape(*v.shape[:axis], outer, inner, *v.shape[axis + 1:])


def sharded_moments(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, mean, biased var) over `red`, keepdims, with no collective but the final reduction (`_batch_parts`)."""
    axis, parts = _batch_parts(x, red)
    if parts == 1:
        n, mean, _, m2 = local_moments(x, red, mask)
        big_n = _as_float_count(n, m2)
        return big_n, mean, m2 / jnp.maximum(big_n, 1.0)
    xs = _split(x, axis, parts)
    ms = None if mask is None else _split(mask, axis, parts)
    red_s = tuple(a + 1 if a >= axis else a for a in red)
    n, mean, lo, m2 = local_moments(xs, red_s, ms)
    kshape = tuple(1 if a in red else d for a, d in enumerate(x.shape))
    if wide_collectives():
        out = _wide_combine(n, mean, lo, m2, lambda v: jnp.sum(v, axis + 1), parts)
    else:
        out = _chan_parts(n, mean, lo, m2, lambda vs: [jnp.sum(v, axis, keepdims=True) for v in vs])
    return tuple(jnp.reshape(v, kshape) for v in out)  # type: ignore[return-value]


def gathered_moments(
    n: jax.Array,
    mean: jax.Array,
    mean_lo: jax.Array,
    m2: jax.Array,
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`strategy="gather"`: all-gathers the per-device (n, mean + mean_lo, M2) and combines them (Chan)."""
    cplx = jnp.iscomplexobj(mean)
    fields = [n, *_pack(mean), *_pack(mean_lo), m2]
    packed = jnp.stack(fields)
    g = _all_gather(packed, axis_name, axis_index_groups)
    if isinstance(axis_name, tuple) and g.ndim > packed.ndim + 1:
        g = g.reshape((-1, *packed.shape))
    k = 2 if cplx else 1
    part = [g[:, i] for i in range(len(fields))]
    return chan_combine(part[0], _unpack(part[1:1 + k], cplx), part[-1], mean_lo=_unpack(part[1 + k:1 + 2 * k], cplx))


def moments_keepdims(
    x: jax.Array,
    red: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    strategy: Strategy = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, biased var) with reduced axes kept as size 1. Inputs pre-validated.

    With `axis_name`: `synced_moments` (one collective). Without: the batch
    in parts that no device boundary crosses (`sharded_moments`), so that
    under `jax.jit` on a sharded batch the only collective is the final
    reduction's all-reduce; on one device, one part.
    """
    check_strategy(strategy)
    if axis_name is not None:
        return synced_moments(x, red, mask, axis_name, axis_index_groups, strategy)
    return sharded_moments(x, red, mask)


def moments(
    x: jax.typing.ArrayLike,
    *,
    axis: Axes = -1,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    strategy: Strategy = "auto",
) -> Moments:
    """Per-feature mean, biased variance and count of a batch.

    Numerically stable (shifted sums, Chan's parallel combination across
    devices) and computed in at least float32. With `axis_name`, the moments
    are those of the whole batch across that axis, each device weighted by
    its own count of valid entries.

    Args:
      x: input of any float or complex dtype, shape (..., features, ...).
      axis: the feature axis or a tuple of feature axes; every other axis is
        reduced.
      mask: optional bool array broadcastable to `x`; False entries are left
        out of the statistics.
      axis_name: a name or tuple of names bound by `jax.pmap`,
        `jax.shard_map` or `jax.vmap(..., axis_name=...)` to reduce across.
      axis_index_groups: `jax.lax.psum`'s groups (under `pmap` only).
      strategy: cross-device combination: "psum" (one all-reduce of
        every device's moments as float64 sums), "gather" (one all-gather
        of every device's moments, combined by Chan's formula) or "auto"
        ("psum", or "gather" on TPU, whose collectives carry no float64).
        Same results; no branch. Without `axis_name` it changes nothing.

    Returns:
      `Moments(mean, var, count)`, each of the feature shape. `count` is
      float32: the exact number of valid entries (summed in integers, on
      each device and across devices) rounded once, so exact up to 2^24.

    Raises:
      TypeError: for a non-float `x` or mask.
      ValueError: for a bad `axis` or a mask that does not broadcast to `x`.
      NameError: for an `axis_name` that no transformation binds.

    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
    ([2.0, 20.0], [1.0, 100.0], [2.0, 2.0])
    """
    x = check_input(x)
    lay = Layout.of(x.shape, axis)
    m = check_mask(mask, x.shape)
    n, mean, var = moments_keepdims(x, lay.reduced_axes, m, axis_name, axis_index_groups, strategy)
    return Moments(mean=lay.flat(mean), var=lay.flat(var), count=lay.flat(n))
