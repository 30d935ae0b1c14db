"""What jaxbn's XLA tricks cost inside a ResNet training step: kernel variants measured from the optimized HLO.

Run from the repository root: ``python docs/bn_variants.py [arch:batch:image:width] [dtypes] [placements]``
(default ``resnet18:16:32:64 float32,bfloat16 1dev``). Each variant patches jaxbn's kernel at trace time (the
library files are not edited), compiles the whole training step of `benchmarks.model` with `jaxbn.linen.BatchNorm`
and prints BN's in-context cost (step minus the identity step) from `benchmarks.hlo.analyze`: bytes accessed,
kernels, temp bytes, each next to flax's. Deterministic: no timing. Variants:

* ``current``: jaxbn as it is;
* ``no-convert-barrier``: `jaxbn._xla.separate_converts` without its optimization barrier (one shared convert);
* ``no-spelling``: `jaxbn._xla.spelled_apart(x, k)` (`k - x`) as `-(x - k)` (its `x - k` CSE'd with the other);
* ``no-tangent-barrier``: the optimization barrier around the bf16 tangent's terms removed;
* ``no-barriers``: every `lax.optimization_barrier` in jaxbn removed;
* ``no-remat``: the tangent not wrapped in `jax.checkpoint`;
* ``no-pilot``: the pilot shift replaced by zero (NOT numerically acceptable: only to price the pilot's kernels);
* ``bare``: no barriers, no spelling, no remat;
* ``row-pilot``: the pilot shift taken from one entry per feature (index 0 of every reduced axis);
* ``tuple-sums``: `Reduction.sums` returns a tuple (one psum of the tuple) instead of a stacked array;
* ``pilot+sums``: row-pilot + tuple-sums;
* ``proposal``: row-pilot + tuple-sums + no-remat;
* ``sample-pilot``: the pilot shift = the mean of the first example (a contiguous slice, index 0 of the batch axis);
* ``sample+sums``: sample-pilot + tuple-sums.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

import jaxbn._kernel as kernel
import jaxbn._stats as stats
import jaxbn._xla as xla
from benchmarks import model


def _plain_converts(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    return x.astype(dtype), x.astype(dtype)


def _identity_barrier(v: object) -> object:
    return v


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    saved: list[tuple[object, str, object]] = []

    def setattr_(obj: object, name: str, value: object) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if variant in ("no-convert-barrier",):
        for mod in (stats, kernel):
            setattr_(mod, "separate_converts", _plain_converts)
    if variant in ("no-spelling", "bare"):
        for mod in (stats, kernel):
            setattr_(mod, "spelled_apart", lambda x, k: -(x - k))
    if variant in ("no-barriers", "bare"):
        setattr_(jax.lax, "optimization_barrier", _identity_barrier)
    if variant == "no-tangent-barrier":
        real = jax.lax.optimization_barrier
        setattr_(xla.lax, "optimization_barrier", real)  # keep the convert barrier
        setattr_(kernel, "lax", _LaxWithoutBarrier())
    if variant in ("no-remat", "bare"):
        setattr_(jax, "checkpoint", lambda f, **_: f)
    if variant in ("row-pilot", "proposal", "pilot+sums"):
        setattr_(stats, "_pilot_shift", _row_pilot)
    if variant in ("sample-pilot", "sample+sums"):
        setattr_(stats, "_pilot_shift", _sample_pilot)
    if variant in ("tuple-sums", "proposal", "pilot+sums", "sample+sums", "local-tuple-sums"):
        setattr_(kernel.Reduction, "sums", _tuple_sums)
    if variant == "proposal":
        setattr_(jax, "checkpoint", lambda f, **_: f)
    if variant == "no-pilot":
        setattr_(
            stats,
            "_pilot_shift",
            lambda x, red, mask, dt: jnp.zeros([1 if a in red else s for a, s in enumerate(x.shape)], dt),
        )
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _row_pilot(x: jax.Array, red: tuple[int, ...], mask: jax.Array | None, dt: jnp.dtype) -> jax.Array:
    """The shift from ONE entry per feature (index 0 on every reduced axis): a slice XLA fuses into the sums."""
    idx = tuple(slice(0, 1) if a in red else slice(None) for a in range(x.ndim))
    return jax.lax.stop_gradient(x[idx].astype(dt))


def _sample_pilot(x: jax.Array, red: tuple[int, ...], mask: jax.Array | None, dt: jnp.dtype) -> jax.Array:
    """The shift from the first example (index 0 of the first reduced axis, every entry of the others): contiguous."""
    idx = tuple(slice(0, 1) if a == red[0] else slice(None) for a in range(x.ndim))
    return jnp.mean(jax.lax.stop_gradient(x[idx].astype(dt)), axis=red, keepdims=True)


def _tuple_sums(self: kernel.Reduction, *vs: jax.Array) -> tuple[jax.Array, ...]:
    """Reduction.sums without the stack (whose transpose is a pad kernel per sum); one psum of the tuple."""
    s = tuple(jnp.sum(v, self.axes, keepdims=True) for v in vs)
    return s if self.axis_name is None else jax.lax.psum(s, self.axis_name)


class _LaxWithoutBarrier:
    """`jax.lax` for `jaxbn._kernel` only, with an identity optimization barrier."""

    def __getattr__(self, name: str) -> Callable[..., object]:
        return _identity_barrier if name == "optimization_barrier" else getattr(jax.lax, name)  # type: ignore[no-any-return]


VARIANTS = (
    "current", "no-convert-barrier", "no-spelling", "no-tangent-barrier", "no-barriers", "no-remat", "no-pilot",
    "bare", "row-pilot", "tuple-sums", "pilot+sums", "proposal", "sample-pilot", "sample+sums",
)  # fmt: skip


WANTED = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set(VARIANTS)


def main() -> None:
    case = model.parse_configs(sys.argv[1] if len(sys.argv) > 1 else "resnet18:16:32:64")[0]
    dtypes = (sys.argv[2] if len(sys.argv) > 2 else "float32,bfloat16").split(",")
    placements = (sys.argv[3] if len(sys.argv) > 3 else "1dev").split(",")
    mib = 2**20
    print(f"{case.label}; BN in-context cost = step - identity step; ratios to flax.linen.BatchNorm (default)")
    print(
        f"{'placement':>9} {'dtype':>8} {'variant':>20} {'BN MiB':>8} {'vs flax':>8} {'BN kernels':>10} {'vs flax':>8}"
        f" {'step temp MiB':>13} {'vs flax':>8} {'all-reduces':>11}"
    )
    for placement in placements:
        for dt in dtypes:
            base = {
                impl: model.compile_step(case, impl, dt, placement)[2] for impl in ("identity", "flax", "flax-exact")
            }
            ident, flax = base["identity"], base["flax"]
            fb, fk = flax.bytes_accessed - ident.bytes_accessed, flax.kernels - ident.kernels
            rows = [("flax", flax), ("flax-exact", base["flax-exact"])]
            for variant in [v for v in VARIANTS if v in WANTED]:
                with patched(variant):
                    jax.clear_caches()
                    rows.append((variant, model.compile_step(case, "jaxbn.linen", dt, placement)[2]))
            for name, c in rows:
                b, k = c.bytes_accessed - ident.bytes_accessed, c.kernels - ident.kernels
                print(
                    f"{placement:>9} {dt:>8} {name:>20} {b / mib:8.1f} {b / fb:7.2f}x {k:10d} {k / fk:7.2f}x"
                    f" {c.temp_bytes / mib:13.2f} {c.temp_bytes / flax.temp_bytes:7.2f}x"
                    f" {c.collectives['all-reduce']:11d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
