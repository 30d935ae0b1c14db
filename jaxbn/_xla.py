"""Keeping XLA from writing full-size temporaries that a fused reduction does not need.

Two reductions of the same elementwise expression (``sum(x - K)`` and
``sum((x - K)**2)``; the two backward sums) each fuse into a kernel that
reads `x` once and writes only per-feature results. When both consume ONE
shared HLO value, XLA's fusion pass instead computes that value once and
writes it to memory for both readers, e.g. (bf16 input)::

    %convert = f32[32,56,56,64] convert(bf16[32,56,56,64] %x)      # written out: 2x x's bytes
    %r1 = f32[64] reduce(%convert, ...), to_apply=add
    %r2 = f32[64] reduce(multiply(%convert, %convert), ...)

The functions below make the readers' expressions distinct values, so each
reduction keeps its own fused convert/subtract and nothing full-size is
written. They change no value. They serve XLA's CPU backend only
(`splits_sibling_reductions`): XLA:GPU's multi-output fusion computes
sibling reductions of one value in one kernel, which a barrier would keep
apart, so on every other backend the plain expressions run.

`wide_collectives` says whether the backend all-reduces float64, which the
cross-device statistics use.
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

T = TypeVar("T")


def splits_sibling_reductions() -> bool:
    """Whether to keep sibling reductions' shared operands apart: on XLA's CPU backend only.

    Measured there (docs/benchmark.md, "What each trick buys"): without them
    the bfloat16 layer writes a full-size float32 copy of `x`.
    """
    return jax.default_backend() == "cpu"


def wide_collectives() -> bool:
    """Whether collectives may carry float64: not on TPU.

    XLA:TPU has no float64 and rewrites 64-bit types away, but not in an
    all-reduce (openxla/xla#26995: "rewriting is not implemented"), so there
    the statistics cross devices in float32 (an all-gather, or Chan's
    formula through two all-reduces).
    """
    return jax.default_backend() != "tpu"


def kept_apart(v: T) -> T:
    """`v` behind an optimization barrier on XLA's CPU backend (`splits_sibling_reductions`), else `v`."""
    return lax.optimization_barrier(v) if splits_sibling_reductions() else v


def separate_converts(x: jax.Array, dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
    """Two copies of `x.astype(dtype)` that XLA will not merge into one written convert.

    Without a convert there is nothing to share and `x` is returned twice.
    With one (bf16 -> f32), an optimization barrier (free: no copy, no
    kernel) separates the two converts so each fuses into its own consumer.
    """
    if x.dtype == jnp.dtype(dtype):
        return x, x
    a, b = kept_apart((x, x))
    return a.astype(dtype), b.astype(dtype)


def spelled_apart(x: jax.Array, k: jax.Array) -> jax.Array:
    """`k - x`, the negated difference: not CSE'd with a plain `x - k`, and with no kernel of its own.

    Use it for the second of two consumers of `x - k` (see the module docstring),
    where the sign is squared away or folded into a per-feature factor.
    (`x + (-k)` would also stay apart, but its `-k` is a small kernel of its
    own on XLA's CPU backend.) `k` passes an optimization barrier first, so
    that its broadcast to x's shape is not the one the plain `x - k` makes:
    one shared broadcast is written out in full for the reductions that
    read it.
    """
    return kept_apart(k) - x


def broadcast_like(v: jax.Array, x: jax.Array) -> jax.Array:
    """`v` broadcast to x's shape, sharded like `x` when x's type says how (Explicit mesh axes).

    A plain broadcast of a replicated per-feature vector is typed replicated;
    behind an optimization barrier nothing reshards it, and the transpose of
    its use then all-gathers the whole cotangent. Broadcast straight into x's
    sharding, each device makes only its part, and the transpose is a
    reduction (one small all-reduce).
    """
    spec = typed_spec(x)
    if spec is None or all(s is None for s in spec):
        return jnp.broadcast_to(v, x.shape)
    return jnp.broadcast_to(v, x.shape, out_sharding=jax.typeof(x).sharding)


def typed_spec(x: jax.Array) -> tuple[object, ...] | None:
    """The PartitionSpec of x's type as a tuple (entries None where unsharded), or None if the type has none.

    Under `jax.jit` over a mesh with Explicit axes the sharding is part of
    the type; with Auto axes (or an older JAX) every entry is None.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return None if spec is None else tuple(spec)
