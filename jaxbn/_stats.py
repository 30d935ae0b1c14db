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
no such bound: float32 1e4 + N(0, 1) loses every digit).

A mask can hide most or all of the pilot. Then the pass checks its own
bound: if any feature's S2 exceeds `_CANCELLATION * M2`, a second pass
about the mean just found (now inside the data) replaces the sums. It runs
only when needed (`lax.cond`), so the one-pass speed stays for every batch
whose pilot was good.

Across devices (`axis_name`), strategy "auto" = "psum" (`shifted_moments`):
every device sums about the same shift (the running mean passed in, 0 in
`moments`), so the sums add up and the forward combination is ONE all-reduce;
a check on the reduced values (identical on every device) runs a second pass
about the mean when the bound above fails, or Chan's combination of the
per-device moments when the shift was not the same on every device. Without
`axis_name` the same shifted sums serve a batch whose type says it is
sharded along a reduced axis (`jax.jit` over a mesh with Explicit axes),
any batch under `jax.set_mesh` of a mesh with Auto axes (whose types say
nothing), and `strategy="psum"`: the pilot would cost XLA's partitioner an
all-reduce of its own there. Otherwise one device keeps the pilot, which
needs no branch.
Strategy "gather" all-gathers the per-device triples `(n_i, mean_i, M2_i)`
and combines them with Chan et al.'s parallel formula (`chan_combine`)::

    N = sum n_i,  mean = sum n_i mean_i / N,
    M2 = sum M2_i + sum n_i |mean_i - mean|^2

Counts are summed in integers, on each device and across devices; the
float32 `count` that callers see is the exact count rounded once (exact up
to 2^24 valid entries per feature, within 2^-24 relative above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
from jaxbn._xla import separate_converts, spelled_apart, typed_spec

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


def _count(mask: jax.Array | None, shape: Sequence[int], red: Sequence[int]) -> jax.Array:
    """`_count_int` as float32 (keepdims over `red`): the nearest float32 to the exact count."""
    n = _count_int(mask, shape, red)
    if isinstance(n, int):
        return jnp.full((1,) * len(shape), float(n), jnp.float32)
    return n.astype(jnp.float32)


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


#: With a mask, a first pass whose shift K lies more than sqrt(_CANCELLATION) standard deviations
#: from the mean (sum |x - K|^2 > _CANCELLATION * M2) is redone about the mean it found. Below that
#: the float32 cancellation error of M2 = S2 - S1^2 / n is at most ~_CANCELLATION * 2^-24 ~ 6e-5.
_CANCELLATION = 1024.0


def local_moments(
    x: jax.Array, red: tuple[int, ...], mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(n, mean, mean_lo, M2) of `x` over the axes `red` on this device, keepdims.

    One pass of shifted sums about the pilot shift; with a mask, a second
    pass about the mean when the first one's error bound failed (module
    docstring). Under `vmap` with a per-example mask JAX evaluates both
    branches of that `lax.cond`.

    The mean is returned as `mean + mean_lo` (`mean` the rounded value,
    `mean_lo` the few bits below its last place that the shifted sums know):
    at large offsets (1e6 in float32, ulp 0.0625) the cross-device
    combination needs them. `n` and `M2` are float32 (or wider); features
    with n == 0 get mean 0 and M2 0.
    """
    dt = stats_dtype(x.dtype)
    n = _count(mask, x.shape, red)
    safe_n = jnp.maximum(n, 1.0).astype(_real(dt))

    def moments_about(shift: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        s1, s2 = _shifted_sums(x, red, mask, shift)
        delta = s1 / safe_n.astype(s1.dtype)
        mean = shift + delta
        return mean, (shift - mean) + delta, jnp.maximum(s2 - _abs_sq(s1) / safe_n, 0.0)

    def cancelled(shift: jax.Array, mean: jax.Array, m2: jax.Array) -> jax.Array:
        # S2 = M2 + n |mean - K|^2 exactly, so this is the pass's own S2 / M2 test.
        return jnp.any(m2 + n.astype(m2.dtype) * _abs_sq(mean - shift) > _CANCELLATION * m2)

    shift = _pilot_shift(x, red, mask, dt)
    mean, lo, m2 = moments_about(shift)
    if mask is not None:
        mean, lo, m2 = lax.cond(
            cancelled(shift, mean, m2),
            lambda: moments_about(lax.stop_gradient(mean)),
            lambda: (mean, lo, m2),
        )
    valid = n > 0
    zero = jnp.zeros((), dt)
    return jnp.broadcast_to(n.astype(m2.dtype), m2.shape), jnp.where(valid, mean, zero), jnp.where(valid, lo, zero), m2


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


#: Counts cross devices as two float32 limbs (`n // _LIMB`, `n % _LIMB`): each limb's sum is an
#: integer below 2^24, so exact, up to 2^36 entries in all and 4096 participants.
_LIMB = 4096


def _fold(
    term: Callable[[int, int], jax.Array],
    size: int,
    op: Callable[[jax.Array, jax.Array], jax.Array],
    neutral: jax.typing.ArrayLike,
) -> jax.Array:
    """`op`-reduction to a scalar of the vector whose entries `lo:hi` are `term(lo, hi)`: no reduce instruction.

    A reduce of a small vector is a kernel of its own (two on XLA's CPU
    backend, which splits it into a tree); slices combined elementwise are
    work that XLA fuses into one kernel. The terms are formed from slices of
    their inputs, eight entries at a time, never sliced out of one computed
    vector: XLA writes out a vector that several slices read (one more
    kernel). `op` must be associative and commutative (add modulo 2^32,
    max); `neutral` pads the last slice.
    """
    width = max(1, min(_FOLD, size))
    acc = None
    for lo in range(0, size, width):
        hi = min(lo + width, size)
        t = term(lo, hi)
        if hi - lo < width:
            t = jnp.concatenate([t, jnp.full((width - (hi - lo),), neutral, t.dtype)])
        acc = t if acc is None else op(acc, t)
    if acc is None:
        return jnp.asarray(neutral)
    while acc.shape[0] > 1:
        width = -(-acc.shape[0] // _FOLD)
        if width * _FOLD != acc.shape[0]:
            acc = jnp.concatenate([acc, jnp.full((width * _FOLD - acc.shape[0],), neutral, acc.dtype)])
        v, acc = acc, acc[:width]
        for j in range(1, _FOLD):
            acc = op(acc, v[j * width:(j + 1) * width])
    return acc[0]


#: `_fold`'s fan-in: few levels, so that XLA fuses them all into one kernel.
_FOLD = 8


def _fingerprint(k: jax.Array) -> jax.Array:
    """32 bits (float32 0 or 1) of a hash of the bit pattern of `k`: equal arrays give equal bits.

    `sum_f bits(k_f) * m_f mod 2^32` with odd multipliers `m_f`: arrays that
    differ in one element always differ here, others with chance ~2^-32.
    Summed by slices of `k` (`_fold`), so the whole hash is one small
    kernel. A float64 `k` (jax x64) hashes its two 32-bit words per element.
    """
    parts = [k.real, k.imag] if jnp.iscomplexobj(k) else [k]
    flat = jnp.concatenate([jnp.ravel(p) for p in parts])
    if flat.dtype.itemsize != 4:  # 32-bit words first: a 64-bit bitcast adds an axis
        flat = jnp.ravel(lax.bitcast_convert_type(flat, jnp.uint32))
    i = np.arange(flat.size, dtype=np.uint64)
    mult = ((i * 0x9E3779B1 + 0x7F4A7C15) % 2**32 | 1).astype(np.uint32)

    def term(lo: int, hi: int) -> jax.Array:
        return lax.bitcast_convert_type(flat[lo:hi], jnp.uint32) * mult[lo:hi]

    h = _fold(term, flat.size, jnp.add, jnp.uint32(0))
    return ((h >> lax.iota(jnp.uint32, 32)) & jnp.uint32(1)).astype(jnp.float32)


def _typed_sharded(x: jax.Array, red: tuple[int, ...]) -> bool:
    """Whether `x`'s type says it is sharded along a reduced axis (a mesh with Explicit axes)."""
    spec = typed_spec(x)
    return spec is not None and any(a < len(spec) and spec[a] is not None for a in red)


def _context_mesh_shards() -> bool:
    """Whether `jax.set_mesh` put a mesh with an Auto axis of size > 1 in context.

    Under `jax.jit` over such a mesh a batch's type says nothing of how it is
    sharded: the partitioner may split it across devices, and then a shift
    taken from a slice of the batch would cost an all-reduce of its own.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    auto = jax.sharding.AxisType.Auto
    return any(n > 1 and t == auto for n, t in zip(mesh.axis_sizes, mesh.axis_types, strict=True))


def _known_shared(x: jax.Array, shift: jax.Array, axis_name: AxisName) -> bool:
    """Whether `shift` is typed replicated over `axis_name` (shard_map's manual axes, x typed varying)."""
    if not _is_varying(x, axis_name):
        return False  # no type information (pmap, vmap, shard_map without check_vma)
    aval = jax.typeof(shift)
    varying = getattr(getattr(aval, "mat", None), "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", None) or frozenset()
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return not any(n in varying for n in names)


def shifted_moments(
    x: jax.Array,
    red: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
    shift: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, mean, biased var) over `red` (and the devices of `axis_name`), keepdims: one pass when the shift is good.

    Every device sums about the same shift `K` (`shift`, e.g. the running
    mean; 0 if None), so the sums add up across devices: one all-reduce of
    `(S1, S2)`, plus the count in integer limbs if there is a mask, plus a
    fingerprint of `K` when nothing proves it is the same on every device.
    Without `axis_name` there is no all-reduce (and on a batch sharded under
    `jax.jit` the reductions' own all-reduce is the only one: `K` needs
    none). From the reduced values, identical on every device:

    * `K` differed between devices (fingerprint bits not all 0 or all 1):
      the local moments about each device's own pilot, combined by Chan's
      formula (two more all-reduces);
    * `S2 > _CANCELLATION * M2` for some feature (K far from the mean): the
      sums again about the mean just found (one more pass, one more
      all-reduce);
    * otherwise (the common case) nothing more.

    The sums cross devices as the operands of one all-reduce (nothing packs
    them first). The common branch returns them untouched, so on the common
    path the branch costs only its index and the conditional; the mean and
    variance are formed after it, in the kernels that use them.
    """
    dt = stats_dtype(x.dtype)
    synced = axis_name is not None
    size = axis_size(axis_name, axis_index_groups) if synced else 1
    kshape = tuple(1 if a in red else d for a, d in enumerate(x.shape))
    if shift is None:
        k = jnp.zeros(kshape, dt)
        check_shared = False
    else:
        k = lax.stop_gradient(shift)
        if jnp.iscomplexobj(k) and not jnp.issubdtype(dt, jnp.complexfloating):
            k = k.real
        k = jnp.broadcast_to(k.astype(dt), kshape)
        check_shared = synced and not _known_shared(x, k, axis_name)
    cplx = jnp.iscomplexobj(k)
    k_ = 2 if cplx else 1

    def reduced(parts: list[jax.Array]) -> list[jax.Array]:
        """The sums of `parts` over the devices: ONE all-reduce (of several operands, no packing kernel)."""
        if not synced:
            return list(parts)
        dt_all = np.result_type(*(p.dtype for p in parts))  # one dtype under jax x64 too
        out = lax.psum(tuple(p.astype(dt_all) for p in parts), axis_name, axis_index_groups=axis_index_groups)
        return [o.astype(p.dtype) for o, p in zip(out, parts, strict=True)]

    s1, s2 = _shifted_sums(x, red, mask, k)
    parts = [*_pack(s1), s2]
    n_local = _count_int(mask, x.shape, red)
    if synced and not isinstance(n_local, int):
        parts += [(n_local // _LIMB).astype(jnp.float32), (n_local % _LIMB).astype(jnp.float32)]
    if check_shared:
        parts.append(_fingerprint(k))
    rdt = _real(dt)

    def count(r: Sequence[jax.Array]) -> jax.Array:
        """N (float32, keepdims) from the reduced values `r`: exact, rounded once."""
        if isinstance(n_local, int):
            return jnp.full((1,) * x.ndim, float(n_local * size), jnp.float32)
        if not synced:
            return n_local.astype(jnp.float32)
        hi, lo = r[k_ + 1:k_ + 3]
        return hi * float(_LIMB) + lo

    def inv_count(r: Sequence[jax.Array]) -> jax.Array:
        if isinstance(n_local, int):  # a constant: the mean and variance are multiplies XLA fuses anywhere
            return jnp.asarray(1.0 / max(n_local * size, 1), rdt)
        return 1.0 / jnp.maximum(count(r), 1.0).astype(rdt)

    def about(center: jax.Array, t1: jax.Array, t2: jax.Array, inv_n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, M2) from the sums about `center`: M2 = S2 - |S1|^2 / N."""
        return center + t1 * inv_n.astype(t1.dtype), t2 - _abs_sq(t1) * inv_n

    # Each branch maps the reduced values to values of the same form: the kept sums
    # about K as they are (no kernel at all), or else (mean, -M2) in the place of (S1, S2).
    # The sign bit tells them apart (S2 >= 0; -M2 is -0.0 or below), so nothing after
    # the branch reads the index: XLA would re-compute it there from t, whose buffers r reuses.
    def _flagged(m2: jax.Array) -> jax.Array:
        return -jnp.maximum(m2, 0.0)

    def keep(*r: jax.Array) -> tuple[jax.Array, ...]:
        return r

    def recentre(*r: jax.Array) -> tuple[jax.Array, ...]:
        inv_n = inv_count(r)
        g = lax.stop_gradient(about(k, _unpack(r[:k_], cplx), r[k_], inv_n)[0])
        t1, t2 = _shifted_sums(x, red, mask, g)
        u = reduced([*_pack(t1), t2])
        mean, m2 = about(g, _unpack(u[:k_], cplx), u[k_], inv_n)
        return (*_pack(mean), _flagged(m2), *r[k_ + 1:])

    def chan(*r: jax.Array) -> tuple[jax.Array, ...]:
        n_i, mean_i, lo_i, m2_i = local_moments(x, red, mask)

        def psum_packed(vs: list[jax.Array]) -> list[jax.Array]:
            return list(lax.psum(jnp.stack(vs), axis_name, axis_index_groups=axis_index_groups))

        _, gmean, gm2 = chan_combine(n_i, mean_i, m2_i, psum_packed, mean_lo=lo_i)
        return (*_pack(gmean.astype(dt)), _flagged(gm2.astype(rdt)), *r[k_ + 1:])

    # The branch to take, from reduced values only (the same on every device): 1 where the
    # cancellation bound fails for some feature, 2 where the shift differed. Sums about K:
    # S2 = M2 + N |mean - K|^2, and M2 = S2 - |S1|^2 / N loses about 2^-24 * S2 to
    # cancellation, so the bound S2 <= C * M2 keeps it within C * 2^-24. Codes per feature
    # (and per fingerprint bit), folded from slices of the reduced values (`_fold`).
    t = reduced(parts)
    flat = [jnp.ravel(jnp.broadcast_to(v, kshape)) for v in t[:k_ + 1]]
    inv_flat = jnp.ravel(jnp.broadcast_to(inv_count(t), kshape))

    def cancelled(lo: int, hi: int) -> jax.Array:
        t1, t2 = _unpack([v[lo:hi] for v in flat[:k_]], cplx), flat[k_][lo:hi]
        return (_CANCELLATION * (t2 - _abs_sq(t1) * inv_flat[lo:hi]) < t2).astype(jnp.int32)

    index = _fold(cancelled, flat[k_].size, jnp.maximum, 0)
    branches = [keep, recentre]
    if check_shared:
        bits = t[-1]

        def differ(lo: int, hi: int) -> jax.Array:
            return jnp.where(bits[lo:hi] * (size - bits[lo:hi]) > 0, 2, 0).astype(jnp.int32)

        index = jnp.maximum(index, _fold(differ, bits.size, jnp.maximum, 0))
        branches.append(chan)
    r = lax.switch(index, branches, *t)
    inv_n = inv_count(r)
    a, b = _unpack(r[:k_], cplx), r[k_]
    kept = ~jnp.signbit(b)
    mean_k, m2_k = about(k, a, b, inv_n)
    mean, m2 = jnp.where(kept, mean_k, a), jnp.where(kept, m2_k, -b)
    big_n = count(r)
    var = jnp.maximum(m2, 0.0) * inv_n
    if not isinstance(n_local, int):
        mean = jnp.where(big_n > 0, mean, jnp.zeros((), dt))
    return jnp.broadcast_to(big_n, var.shape), mean, var


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
    shift: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, biased var) with reduced axes kept as size 1. Inputs pre-validated.

    `shift` (keepdims, e.g. the running mean) is the value every device sums
    about under `axis_name` with strategy "auto"/"psum" (`shifted_moments`),
    and without `axis_name` on a batch typed sharded (or with "psum"); it
    changes no result, only how often the exact fallback runs.
    """
    check_strategy(strategy)
    if axis_name is not None and strategy != "gather":
        return shifted_moments(x, red, mask, axis_name, axis_index_groups, shift)
    if axis_name is None and (
        strategy == "psum" or (shift is not None and (_typed_sharded(x, red) or _context_mesh_shards()))
    ):
        # A batch sharded under jax.jit (by its type, or maybe: a mesh with Auto axes in context): the
        # partitioner all-reduces every reduction over a sharded axis, the pilot's too. Sums about the
        # shared shift need one all-reduce (and a branch).
        return shifted_moments(x, red, mask, None, None, shift)
    else:
        n, mean, mean_lo, m2 = local_moments(x, red, mask)
        if axis_name is not None:
            n, mean, m2 = gathered_moments(n, mean, mean_lo, m2, axis_name, axis_index_groups)
    var = m2 / jnp.maximum(n, 1.0)
    return n, mean, var


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
      strategy: cross-device combination: "auto" or "psum" (one
        all-reduce of sums about 0; a second one when the data's mean is
        more than ~32 standard deviations from 0) or "gather" (one
        all-gather of every device's moments). Same results. Without
        `axis_name`, "psum" also sums about 0 (one all-reduce, from XLA's
        partitioner, on a batch sharded under `jax.jit`) where "auto" and
        "gather" first take a shift from a slice of the batch (no branch).

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
