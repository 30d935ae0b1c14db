"""Two per-feature sums of one input: two reductions, or one variadic reduction that reads it once.

Batch norm needs two sums per feature over the batch twice per training
step: `sum(x - K)` and `sum((x - K)**2)` forward, `sum(g)` and
`sum(g * (x - mean))` backward. A two-pass train+grad reaches the floor of 8
passes over x's bytes only if each pair is computed in ONE kernel that reads
its inputs once. XLA's CPU backend does not fuse two sibling reductions
into one kernel; a variadic `lax.reduce` of both terms is one kernel, but
that backend emits it as a scalar loop. This part measures both ways on the
layer grid's shapes (kernels, XLA's bytes accessed over x's bytes, and wall
time, interleaved), which is why jaxbn keeps two reductions on that backend.

``python -m benchmarks reductions [--reps N] [--shapes KEYS] [--json]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import grid, hlo, timing
from jaxbn._xla import spelled_apart


def two_reductions(x: jax.Array, k: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """sum(x - k) and sum((x - k)**2) as two reductions, each fusing its own `x - k` (what jaxbn compiles)."""
    return jnp.sum(x - k, axes), jnp.sum(jnp.square(spelled_apart(x, k)), axes)


def one_variadic_reduction(x: jax.Array, k: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The same sums as one variadic `lax.reduce`: one kernel, x read once."""
    d = x - k
    zero = jnp.zeros((), x.dtype)
    return lax.reduce((d, d * d), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


WAYS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "two reductions": two_reductions,
    "one variadic reduction": one_variadic_reduction,
}


def measure(cases: Sequence[grid.Case], reps: int) -> dict[str, Any]:
    """Per case and way: kernels, bytes accessed / x's bytes, median ms (interleaved), largest difference."""
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for case in cases:
        x = jax.random.normal(jax.random.key(0), case.shape, jnp.float32) * 2.0 + 3.0
        axes = tuple(a for a in range(x.ndim) if a != case.axis % x.ndim)
        k = jnp.full([1 if a in axes else d for a, d in enumerate(x.shape)], 3.0, jnp.float32)
        results = {}
        for name, fn in WAYS.items():
            f = jax.jit(fn, static_argnums=2)
            compiled = f.lower(x, k, axes).compile()
            results[name] = jax.block_until_ready(compiled(x, k))  # also the untimed warm-up call
            jobs[(case.key, name)] = lambda c=compiled, x=x, k=k: c(x, k)
            rows[(case.key, name)] = {
                "case": case.key,
                "shape": list(case.shape),
                "way": name,
                "kernels": hlo.count_kernels(compiled.as_text() or ""),
                "bytes_passes": hlo.bytes_accessed(compiled) / x.nbytes,
            }
        ref = results["two reductions"]
        for name in WAYS:
            got = results[name]
            rows[(case.key, name)]["max_rel_diff"] = max(
                float(jnp.max(jnp.abs(g - r) / jnp.maximum(jnp.abs(r), 1e-30))) for g, r in zip(got, ref, strict=True)
            )
    times = timing.interleave(jobs, reps)
    for key, ts in times.items():
        rows[key]["median_ms"] = timing.median_ms(ts)
    for case in cases:
        base = rows[(case.key, "two reductions")]["median_ms"]
        for name in WAYS:
            rows[(case.key, name)]["time_vs_two"] = rows[(case.key, name)]["median_ms"] / base
    return {"config": {"reps": reps, "shapes": [c.key for c in cases]}, "results": list(rows.values())}


def format_report(rep: dict[str, Any]) -> str:
    out = [
        f"two per-feature sums of float32 x: kernels, XLA bytes accessed / x's bytes, median ms over "
        f"{rep['config']['reps']} interleaved reps, time relative to two reductions",
        f"{'shape':<10}{'way':<24}{'kernels':>8}{'passes':>8}{'ms':>10}{'vs two':>8}",
    ]
    for r in rep["results"]:
        out.append(
            f"{r['case']:<10}{r['way']:<24}{r['kernels']:>8}{r['bytes_passes']:>8.2f}"
            f"{r['median_ms']:>10.2f}{r['time_vs_two']:>7.2f}x"
        )
    return "\n".join(out)


def main(argv: Sequence[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks reductions", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="interleaved timed repetitions (default 10)")
    p.add_argument("--shapes", default="nhwc56,nhwc14", help="comma-separated layer-grid keys")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    opts = p.parse_args(list(argv))
    by_key = {c.key: c for c in grid.GRID}
    unknown = [s for s in opts.shapes.split(",") if s not in by_key]
    if unknown:
        p.error(f"unknown --shapes {unknown}; known: {', '.join(by_key)}")
    rep = measure([by_key[s] for s in opts.shapes.split(",")], opts.reps)
    print(json.dumps(rep, indent=1) if opts.json else format_report(rep))
    return rep
